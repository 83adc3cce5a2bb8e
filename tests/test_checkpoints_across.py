"""Checkpoints across commands: the normalisation a checkpoint was trained with carries under any --model, and
every command that takes an encoder takes any mimkit checkpoint holding one (pretrain, linprobe, finetune,
segment), with the checkpoint's own architecture."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_evaluate import TINY_KW

from mimkit.engine.checkpoint import make_checkpoint
from mimkit.models import create_model

MEAN, STD = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]


@pytest.fixture
def normed(tmp_path):
    """A tiny pretraining checkpoint trained with its own mean / std."""
    m = create_model("mae_vit_tiny_patch16", img_size=32, **TINY_KW)
    cfg = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": TINY_KW},
           "data": {"input_size": 32, "mean": MEAN, "std": STD}}
    path = tmp_path / "normed.pt"
    torch.save(make_checkpoint(model=m.state_dict(), optimizer={}, epoch=0, step=0, config=cfg), path)
    return path


def _config(module, flag: str, ckpt, tmp_path, *extra: str):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args([flag, str(ckpt), "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                         *extra])
    return module.config_from_args(args)


@pytest.mark.parametrize("command, flag", [("continual", "--continual_checkpoint"), ("pretrain", "--init_from")])
@pytest.mark.parametrize("model", ["mae_vit_tiny_patch16", "continual_mae_vit_base_patch16", "mae_vit"])
def test_checkpoint_normalisation_carries_under_an_explicit_model(command, flag, model, normed, tmp_path):
    import importlib

    mod = importlib.import_module(f"mimkit.tasks.{command}")
    cfg = _config(mod, flag, normed, tmp_path, "--model", model)
    assert cfg.model.type == model
    assert list(cfg.data.mean) == pytest.approx(MEAN) and list(cfg.data.std) == pytest.approx(STD)


@pytest.mark.parametrize("command, flag", [("continual", "--continual_checkpoint"), ("pretrain", "--init_from")])
def test_explicit_mean_std_beat_the_checkpoints(command, flag, normed, tmp_path):
    import importlib

    mod = importlib.import_module(f"mimkit.tasks.{command}")
    cfg = _config(mod, flag, normed, tmp_path, "--model", "mae_vit_small_patch16", "--mean", "0.5,0.5,0.5",
                  "--std", "0.25,0.25,0.25")
    assert list(cfg.data.mean) == pytest.approx([0.5] * 3) and list(cfg.data.std) == pytest.approx([0.25] * 3)
