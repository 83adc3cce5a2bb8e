"""The CPU presets {pretrain,linprobe,finetune}/{digits,photos}.yaml load through the CLI's config path and run."""

from __future__ import annotations

import json

import pytest
from test_evaluate import save_tiny

from mimkit.cli import main
from mimkit.config import PRESET_DIR


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "photos"])
@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_digits_preset_runs_from_the_cli(command, data, tmp_path) -> None:
    preset = f"{command}/{data}.yaml"
    assert (PRESET_DIR / preset).is_file()
    ckpt = save_tiny(tmp_path / "tiny.pt")  # 32 px / patch 8, like the presets' input size
    out = tmp_path / "run"
    # the preset given by its name under configs/ (not a path), then a tiny override set
    argv = [command, preset, "--finetune", str(ckpt), "--epochs", "1", "--warmup_epochs", "0",
            "--max_steps", "1", "--output_dir", str(out), "--device", "cpu", "--num_workers", "0"]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    acc1 = r["metrics"]["acc1"]
    assert 0.0 <= acc1 <= 100.0
    # the preset's values reached the run (flags above override only what they name)
    cfg = r["config"]
    assert cfg["data"]["data_path"] == data and cfg["data"]["input_size"] == 32
    assert cfg["schedule"]["epochs"] == 1
    if command == "linprobe":
        assert cfg["optimization"]["opt"] == "sgd" and cfg["data"]["augmentation"]["enabled"] is False
    else:
        assert cfg["data"]["augmentation"]["aa"] in (None, "none") and cfg["optimization"]["layer_decay"] == 0.75


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "photos"])
def test_pretrain_preset_runs_from_the_cli(data, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", f"pretrain/{data}.yaml", "--epochs", "1", "--max_steps", "2", "--output_dir", str(out),
            "--device", "cpu"]
    assert main(argv) == 0
    assert (out / "checkpoints" / "final.pt").is_file()
    cfg = (out / "config.yaml").read_text()
    assert f"data_path: {data}" in cfg and "type: mae_vit_nano_patch4_dec64d2b" in cfg and "input_size: 32" in cfg
    import torch

    ckpt = torch.load(out / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    assert tuple(ckpt["model"]["patch_embed.proj.weight"].shape) == (96, 3, 4, 4)  # patch 4, 96-d, as named
