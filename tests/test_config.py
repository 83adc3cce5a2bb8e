"""Config system: layers, seed 001 JSON, typos, types and impossible values named before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimkit import config as C
from mimkit.cli import build_parser
from mimkit.errors import ConfigError
from mimkit.tasks.pretrain import config_from_args

SEED001_JSON = {
    "model": {"type": "mae_vit_base_patch16", "norm_pix_loss": True, "mask_ratio": 0.75},
    "optimization": {"batch_size": 4096, "base_lr": 2.4e-3, "min_lr": 0.0, "weight_decay": 0.05,
                     "optimizer": "adamw", "adam_beta1": 0.9, "adam_beta2": 0.95, "gradient_clip": 1.0},
    "schedule": {"epochs": 1600, "warmup_epochs": 40, "start_epoch": 0},
    "data": {"data_path": "./data/imagenet/train", "input_size": 224, "num_workers": 10, "pin_memory": True,
             "augmentation": {}},
    "checkpointing": {"checkpoint_dir": "./checkpoints", "save_freq_epochs": 50, "save_freq_steps": 10000,
                      "keep_last_n": 5},
    "logging": {"print_freq": 100, "console_clear_freq": 100},
    "misc": {"auto_resume": True, "resume": ""},
}


def cfg_of(argv: list[str]):
    args = build_parser().parse_args(["pretrain", *argv])
    return config_from_args(args)


def test_seed001_json_loads_as_is(tmp_path: Path) -> None:
    f = tmp_path / "mae_pretrain_vit_base.json"
    f.write_text(json.dumps(SEED001_JSON))
    cfg = cfg_of([str(f)])
    assert cfg.model.type == "mae_vit_base_patch16" and cfg.model.norm_pix_loss is True
    assert cfg.optimization.base_lr == pytest.approx(2.4e-3) and cfg.optimization.gradient_clip == 1.0
    assert cfg.schedule.epochs == 1600 and cfg.checkpointing.save_freq_steps == 10000
    assert cfg.misc.resume is None and cfg.data.data_path == "./data/imagenet/train"


def test_shipped_presets_load() -> None:
    presets = sorted(p.relative_to(C.PRESET_DIR) for p in C.PRESET_DIR.rglob("*") if p.suffix in (".yaml", ".json"))
    pretrain = [p for p in presets if str(p).startswith("pretrain/")]
    assert len(pretrain) >= 5
    for p in pretrain:
        cfg = cfg_of([str(p)])
        assert cfg.model.type
    base = cfg_of(["pretrain/mae_vit_base.yaml", "--data_path", "/x"])
    assert (base.schedule.epochs, base.schedule.warmup_epochs, base.optimization.base_lr) == (800, 40, 1.5e-4)
    assert base.optimization.batch_size * base.optimization.accum_iter * 8 == 4096
    assert (base.optimization.adam_beta1, base.optimization.adam_beta2, base.optimization.weight_decay) == (
        0.9, 0.95, 0.05)


def test_layers_flags_then_overrides_win() -> None:
    cfg = cfg_of(["--data_path", "/d", "--blr", "1e-4", "--epochs", "3", "optimization.base_lr=2e-4",
                  "--norm_pix_loss", "--input_size", "64"])
    assert cfg.optimization.base_lr == pytest.approx(2e-4)  # dotted override beats the flag
    assert cfg.schedule.epochs == 3 and cfg.model.norm_pix_loss is True and C.input_size(cfg) == (64, 64)
    assert cfg.model.type == "mae_vit_large_patch16"  # official default when a data path is given


def test_no_data_path_means_demo_preset() -> None:
    cfg = cfg_of(["--epochs", "2"])
    assert cfg.data.data_path is None and cfg.model.type == "mae_vit_demo_patch8" and cfg.schedule.epochs == 2
    assert dict(cfg.model.kwargs) == {} and cfg.misc.preset == "pretrain/demo.yaml"


def test_rectangular_input_size() -> None:
    cfg = cfg_of(["--data_path", "/d", "data.input_size=[32,64]"])
    assert C.input_size(cfg) == (32, 64)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["optimization.base_lrr=1"], "unknown config key 'optimization.base_lrr' (did you mean 'optimization.base_lr'"),
        (["model.mask_ratoi=0.5"], "did you mean 'model.mask_ratio'"),
        (["--mask_ratio", "1.0"], "'model.mask_ratio': 1.0 (must be in [0, 1)"),
        (["--batch_size", "0"], "'optimization.batch_size': 0"),
        (["optimization.batch_size=abc"], "optimization.batch_size"),
        (["--loss_mode", "dense"], "model.loss_mode"),
        (["--freeze_mode", "encoder"], "model.freeze_mode"),
        (["--t_0", "0"], "freezeout.t_0"),
        (["--how_scale", "quartic"], "freezeout.how_scale"),
        (["missing.yaml"], "config file not found: missing.yaml"),
        (["novalue="], "novalue"),
    ],
)
def test_bad_config_names_the_key(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_of(["--data_path", "/d", *argv])
    assert needle in str(e.value)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mimkit", "pretrain", "--output_dir", str(out), "--input_size", "70"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "not a multiple of the patch size" in r.stderr
    assert not out.exists()  # nothing was started


def test_missing_data_path_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mimkit", "pretrain", "--data_path", str(tmp_path / "nope"),
                        "--output_dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    assert not out.exists()


def test_a_misspelt_preset_gets_a_did_you_mean() -> None:
    from mimkit import config as C
    from mimkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config file not found: linprobe/digit.yaml \(did you mean 'linprobe/digits.yaml'\?\)"):
        C.load_file("linprobe/digit.yaml")
