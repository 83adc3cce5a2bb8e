"""The CPU presets linprobe/digits.yaml and finetune/digits.yaml load through the CLI's config path and run."""

from __future__ import annotations

import json

import pytest
from test_evaluate import save_tiny

from mimkit.cli import main
from mimkit.config import PRESET_DIR


@pytest.mark.slow
@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_digits_preset_runs_from_the_cli(command, tmp_path) -> None:
    preset = f"{command}/digits.yaml"
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
    assert cfg["data"]["data_path"] == "digits" and cfg["data"]["input_size"] == 32
    assert cfg["schedule"]["epochs"] == 1
    if command == "linprobe":
        assert cfg["optimization"]["opt"] == "sgd" and cfg["data"]["augmentation"]["enabled"] is False
    else:
        assert cfg["data"]["augmentation"]["aa"] in (None, "none") and cfg["optimization"]["layer_decay"] == 0.75
