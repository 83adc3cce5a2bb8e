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


# ---------------------------------------------------------------------------------------------- every command's
SEG_TINY = ["--random_init", "--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32",
            "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2",
            "model.kwargs.decoder_embed_dim=32", "model.kwargs.decoder_depth=1", "model.kwargs.decoder_num_heads=2",
            "model.channels=16", "model.aux_channels=8", "--batch_size", "8", "--num_workers", "0",
            "--test_mode", "whole", "logging.tensorboard=false", "--max_iters", "2", "test.num_overlays=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real tiny runs: {'pretrain': tiny checkpoint, 'linprobe' / 'finetune' / 'segment': run folders}, data."""
    from test_evaluate import save_tiny, write_colour_set

    from mimkit.cli import main

    d = tmp_path_factory.mktemp("across")
    tiny = save_tiny(d / "tiny.pt")
    data = write_colour_set(d / "data")
    common = ["--data_path", str(data), "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8",
              "--device", "cpu", "--num_workers", "0", "--input_size", "32"]
    assert main(["linprobe", "--finetune", str(tiny), *common, "--opt", "sgd", "--no_aug",
                 "--output_dir", str(d / "linprobe")]) == 0
    assert main(["finetune", "--finetune", str(tiny), *common, "--aa", "none", "--reprob", "0",
                 "--output_dir", str(d / "finetune")]) == 0
    assert main(["segment", *SEG_TINY, "--output_dir", str(d / "segment")]) == 0
    return {"pretrain": tiny, "linprobe": d / "linprobe", "finetune": d / "finetune",
            "segment": d / "segment"}, data


def _encoder_blocks(kind: str, path) -> dict:
    """The encoder's block weights as the checkpoint holds them, in MAE names."""
    from mimkit.io import load_checkpoint_file, resolve_checkpoint

    sd = load_checkpoint_file(resolve_checkpoint(path))["model"]
    prefix = {"pretrain": "", "linprobe": "encoder.", "finetune": "", "segment": "backbone."}[kind]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + "blocks.")}


KINDS = ["linprobe", "finetune", "segment"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_commands_checkpoint_loads_as_its_encoder(kind, runs) -> None:
    from mimkit.models.loading import model_from_checkpoint

    paths, _ = runs
    model, desc = model_from_checkpoint(paths[kind])
    assert "patch 8, encoder 2x32" in desc and model.img_size == (32, 32)
    own = model.state_dict()
    blocks = _encoder_blocks(kind, paths[kind])
    assert blocks and all(torch.equal(own[k], v) for k, v in blocks.items())
    if kind == "linprobe":  # the probe trained nothing in the encoder: the pretraining weights exactly
        assert all(torch.equal(v, _encoder_blocks("pretrain", paths["pretrain"])[k]) for k, v in blocks.items())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_knn_and_continual_take_every_commands_checkpoint(kind, runs, tmp_path, capsys) -> None:
    from mimkit.cli import main
    from mimkit.tasks import continual as CT
    from mimkit.tasks.pretrain import build_model
    from mimkit.tasks.preflight import load_weights

    paths, data = runs
    assert main(["knn", "--checkpoint", str(paths[kind]), "--data_path", str(data), "--k", "3",
                 "--output_dir", str(tmp_path / "knn")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    cfg = _config(CT, "--continual_checkpoint", paths[kind], tmp_path)
    assert cfg.model.kwargs.embed_dim == 32 and cfg.model.kwargs.depth == 2 and cfg.model.kwargs.patch_size == 8
    model = build_model(cfg)
    report = load_weights(model, cfg.model.init_from)
    assert report.decoder_fresh == (kind != "pretrain")
    blocks = _encoder_blocks(kind, paths[kind])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in blocks.items())


@pytest.mark.slow
def test_linprobe_takes_a_finetune_checkpoint(runs, tmp_path) -> None:
    import json

    from mimkit.cli import main

    paths, data = runs
    out = tmp_path / "lp"
    assert main(["linprobe", "--finetune", str(paths["finetune"]), "--data_path", str(data), "--epochs", "1",
                 "--warmup_epochs", "0", "--batch_size", "8", "--device", "cpu", "--num_workers", "0",
                 "--input_size", "32", "--opt", "sgd", "--no_aug", "--output_dir", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())["config"]["model"]["arch"]["probe_encoder"]
    assert saved["kwargs"]["embed_dim"] == 32 and saved["kwargs"]["depth"] == 2


@pytest.mark.slow
def test_visualize_refuses_a_checkpoint_without_decoder_in_one_line(runs, tmp_path, capsys) -> None:
    from PIL import Image

    from mimkit.cli import main

    paths, _ = runs
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "i.png")
    assert main(["visualize", str(paths["finetune"]), str(tmp_path / "i.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no MAE decoder" in err and "pretraining checkpoint" in err


def test_a_checkpoint_without_vit_encoder_is_one_line_naming_what_to_give(tmp_path, capsys) -> None:
    from mimkit.cli import main
    from mimkit.models.resnet import resnet18_cifar

    path = tmp_path / "resnet.pt"  # an incremental-style ResNet checkpoint: no ViT encoder in it
    torch.save(make_checkpoint(model=resnet18_cifar(nf=8).state_dict(), optimizer={}, epoch=0, step=0,
                               config={"model": {"nf": 8}}), path)
    for argv in (["knn", "--checkpoint", str(path), "--data_path", str(tmp_path), "--output_dir",
                  str(tmp_path / "k")],
                 ["export", str(path), "--format", "pt2", "--output", str(tmp_path / "e.pt2")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds no ViT encoder" in err and "linprobe / finetune / segment" in err
    assert not (tmp_path / "e.pt2").exists()


@pytest.mark.slow
def test_a_finetune_checkpoint_rebuilds_the_mae_it_came_from(runs) -> None:
    """Not the generic `mae_vit` with a default 8 x 512 decoder: the pretraining model's own type and decoder."""
    from mimkit.models.loading import model_from_checkpoint

    paths, _ = runs
    source, _ = model_from_checkpoint(paths["pretrain"])
    model, _ = model_from_checkpoint(paths["finetune"])
    assert model.model_name == source.model_name
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in source.state_dict().items()}  # decoder included
