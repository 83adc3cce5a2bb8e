"""Custom normalisation (facebookresearch/mae#179): data.mean / data.std reach the transforms, the checkpoint,
and every command that reads the checkpoint; `mimkit stats` computes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from omegaconf import OmegaConf
from PIL import Image

from mimkit import config as C
from mimkit.cli import main
from mimkit.data.transforms import eval_transform, mean_std, pretrain_transform
from mimkit.errors import ConfigError
from mimkit.models.loading import architecture_of, model_from_checkpoint

MEAN, STD = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]


def test_values_reach_the_transforms():
    img = Image.new("RGB", (16, 16), (51, 102, 153))  # 0.2, 0.4, 0.6 exactly
    x = eval_transform(16, 3, MEAN, STD)(img)
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-6)  # (v - mean) / std = 0
    x = pretrain_transform(16, 3, mean=[0, 0, 0], std=[0.5, 0.5, 0.5])(img)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.4, 0.8, 1.2]), atol=1e-6)
    g = eval_transform(16, 1, [0.5], [0.25])(Image.new("L", (16, 16), 255))
    assert torch.allclose(g, torch.full_like(g, 2.0))


@pytest.mark.parametrize("mean, std, match", [
    ([0.5, 0.5], [0.2, 0.2], "data.mean has 2 value"),
    ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], "must be > 0"),
    ([0.5, 0.5, 0.5], None, "together"),
])
def test_bad_values_are_one_clear_error(mean, std, match):
    with pytest.raises(ConfigError, match=match):
        mean_std(3, mean, std)


def test_flag_parses_any_number_of_channels():
    assert C.float_list("0.5") == [0.5] and C.float_list("0.1,0.2, 0.3") == [0.1, 0.2, 0.3]
    assert C.float_list("[1,2]") == [1.0, 2.0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny pretraining run with --mean / --std (one step)."""
    from conftest import write_images

    root = tmp_path_factory.mktemp("norm")
    write_images(root / "imgs", 8, size=32)
    out = root / "run"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(root / "imgs"), "--output_dir", str(out),
                 "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0",
                 "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]) == 0
    return out


@pytest.mark.slow
def test_saved_in_the_checkpoint_and_reused(run_dir, monkeypatch):
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["config"]["data"]["mean"] == pytest.approx(MEAN) and ckpt["config"]["data"]["std"] == pytest.approx(STD)
    model, _ = model_from_checkpoint(run_dir)  # a run folder: its final.pt
    assert model.normalization == (pytest.approx(MEAN), pytest.approx(STD))
    assert architecture_of(run_dir)["data"]["mean"] == pytest.approx(MEAN)  # continual / init_from keep them
    # the pretraining transform used them
    from mimkit.tasks.pretrain import open_train_set

    cfg = OmegaConf.create(ckpt["config"])
    norm = [t for t in open_train_set(cfg, 3).transform.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == pytest.approx(MEAN) and list(norm.std) == pytest.approx(STD)


@pytest.mark.slow
def test_visualize_shows_the_original_in_its_true_colours(run_dir, tmp_path):
    img = tmp_path / "flat.png"
    Image.new("RGB", (32, 32), (100, 150, 200)).save(img)
    assert main(["visualize", str(run_dir), str(img), "--output", str(tmp_path / "r.png")]) == 0
    pic = np.asarray(Image.open(tmp_path / "r.png"))
    # bottom-left pixel = the 'original' column: normalised and un-normalised with the same (custom) statistics
    assert pic[-1, 0].tolist() == pytest.approx([100, 150, 200], abs=1)


@pytest.mark.slow
def test_knn_uses_the_checkpoint_statistics(run_dir, monkeypatch, tmp_path):
    from test_evaluate import write_colour_set

    import mimkit.data.transforms as T

    seen = []
    real = T.eval_transform
    monkeypatch.setattr(T, "eval_transform", lambda *a, **k: seen.append(a[2:4]) or real(*a, **k))
    data = write_colour_set(tmp_path / "set", train=3, val=2)
    assert main(["knn", "--checkpoint", str(run_dir), "--data_path", str(data), "--output_dir",
                 str(tmp_path / "knn"), "--num_workers", "0"]) == 0
    assert seen and all(list(m) == pytest.approx(MEAN) and list(s) == pytest.approx(STD) for m, s in seen)


@pytest.mark.slow
def test_classifier_runs_adopt_them_and_export_records_them(run_dir, tmp_path):
    from mimkit.tasks.evaluation.config import LinprobeConfig
    from mimkit.tasks.evaluation.common import adopt_normalization, load_encoder

    cfg = C.build_config(LinprobeConfig, [])
    encoder, _ = load_encoder(str(run_dir))
    assert adopt_normalization(cfg, encoder) == (pytest.approx(MEAN), pytest.approx(STD))
    assert list(cfg.data.mean) == pytest.approx(MEAN)  # written into the run's config, so its checkpoints carry it
    user = C.build_config(LinprobeConfig, [("flags", {"data": {"mean": [0.5] * 3, "std": [0.5] * 3}})])
    assert adopt_normalization(user, encoder) == ([0.5] * 3, [0.5] * 3)  # an explicit flag wins

    assert main(["export", str(run_dir), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    rec = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert rec["normalization"]["mean"] == pytest.approx(MEAN)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(MEAN) and pre["image_std"] == pytest.approx(STD)
    again, _ = model_from_checkpoint(tmp_path / "hf")  # and a Hugging Face folder brings them back
    assert again.normalization == (pytest.approx(MEAN), pytest.approx(STD))


def test_stats_command_computes_them(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (4, 4), (255, 102, 51)).save(d / "a.png")
    Image.new("RGB", (4, 4), (0, 0, 153)).save(d / "b.png")
    assert main(["stats", "--data_path", str(d), "--output", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["images"] == 2
    assert s["mean"] == pytest.approx([0.5, 0.2, 0.4])  # per channel over every pixel of both images
    assert s["std"] == pytest.approx([0.5, 0.2, 0.2])
    out = capsys.readouterr().out
    assert "--mean 0.5000,0.2000,0.4000 --std 0.5000,0.2000,0.2000" in out  # what to paste
    Image.new("RGB", (4, 4), (0, 0, 0)).save(d / "a.png")
    Image.new("RGB", (4, 4), (0, 0, 0)).save(d / "b.png")
    assert main(["stats", "--data_path", str(d)]) == 2
    assert "is constant" in capsys.readouterr().err


def test_stats_command_grayscale_reads_16bit(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(d / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(d / "b.png")
    assert main(["stats", "--data_path", str(d), "--in_chans", "1", "--output", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["mean"] == pytest.approx([0.5]) and s["std"] == pytest.approx([0.5])


@pytest.mark.slow
def test_continual_from_the_checkpoint_keeps_them(run_dir, tmp_path):
    import argparse

    from mimkit.tasks.continual import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--continual_checkpoint", str(run_dir), "--data_path", str(tmp_path),
                         "--output_dir", str(tmp_path / "c")])
    cfg = config_from_args(args)
    assert list(cfg.data.mean) == pytest.approx(MEAN) and list(cfg.data.std) == pytest.approx(STD)
