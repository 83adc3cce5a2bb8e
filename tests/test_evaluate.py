"""mimkit knn / rankme end to end, and the bad-input errors every evaluation command gives before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.engine.checkpoint import make_checkpoint
from mimkit.models import create_model

TINY_KW = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=2)


def save_tiny(path: Path, seed: int = 0, size: int = 32) -> Path:
    """A tiny MAE saved in the mimkit checkpoint format (config names its architecture)."""
    torch.manual_seed(seed)
    m = create_model("mae_vit_tiny_patch16", img_size=size, **TINY_KW)
    cfg = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": TINY_KW, "norm_pix_loss": False},
           "data": {"input_size": size}}
    torch.save(make_checkpoint(model=m.state_dict(), optimizer={}, epoch=0, step=0, config=cfg), path)
    return path


def write_colour_set(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 32,
                     val_classes: int | None = None) -> Path:
    """train/ and val/ class folders of noisy solid-colour images, one colour per class (easy to separate)."""
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]
    for split, n, nc in (("train", train, classes), ("val", val, val_classes or classes)):
        for c in range(nc):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(colours[c])[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny checkpoint, labelled colour set)."""
    d = tmp_path_factory.mktemp("eval")
    return save_tiny(d / "tiny.pt"), write_colour_set(d / "data")


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_knn_cli_writes_results(tiny, tmp_path, capsys) -> None:
    ckpt, data = tiny
    rc = main(["knn", "--checkpoint", str(ckpt), "--data_path", str(data), "--k", "1", "5",
               "--output_dir", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    r = _results(tmp_path)
    assert set(r["metrics"]) == {"knn_top1_k1", "knn_top1_k5"}
    assert r["metrics"]["knn_top1_k1"] == 100.0  # three well-separated colours: even random features split them
    assert r["checkpoint"] == str(ckpt) and r["data"] == str(data) and r["config"]["k"] == [1, 5]
    assert r["num_train"] == 24 and r["num_val"] == 12
    assert "knn_top1_k5" in capsys.readouterr().out  # the summary table


@pytest.mark.slow
def test_rankme_cli_matches_metric(tiny, tmp_path) -> None:
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import eval_transform
    from mimkit.metrics import rankme
    from mimkit.models.loading import model_from_checkpoint
    from mimkit.tasks.evaluation.features import extract_features

    ckpt, data = tiny
    assert main(["rankme", "--checkpoint", str(ckpt), "--data_path", str(data), "--output_dir", str(tmp_path),
                 "--device", "cpu"]) == 0
    m = _results(tmp_path)["metrics"]
    model, _ = model_from_checkpoint(ckpt)
    feats, _ = extract_features(model, open_dataset(str(data), "train", eval_transform(32)), 8)
    assert m["rankme"] == pytest.approx(rankme(feats), rel=1e-6)
    assert 1.0 <= m["rankme"] <= m["max_rank"] == min(24, 32)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_bad_inputs_one_clear_line(command, tiny, tmp_path, capsys) -> None:
    ckpt, data = tiny
    flag = "--checkpoint" if command == "knn" else "--finetune"
    base = [command, flag, str(ckpt), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    one = write_colour_set(tmp_path / "one", classes=1)
    assert "at least 2" in _error(base + ["--data_path", str(one)], capsys)
    differ = write_colour_set(tmp_path / "differ", classes=3, val_classes=2)
    assert "differ from the training set" in _error(base + ["--data_path", str(differ)], capsys)
    empty = write_colour_set(tmp_path / "empty")
    for f in (empty / "val").rglob("*.png"):
        f.unlink()
    assert "no images" in _error(base + ["--data_path", str(empty)], capsys)
    official = tmp_path / "official.pth"  # an official-style file: {"model": state dict}, no config
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, official)
    msg = _error([command, flag, str(official), "--model", "mae_vit_small_patch16", "--data_path", str(data),
                  "--output_dir", str(tmp_path / "o")], capsys)
    assert "does not fit" in msg and "shape" in msg
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_random_init_summary_says_so(tmp_path, capsys) -> None:
    from mimkit.tasks.evaluation.common import report

    for rnd in (False, True):
        report(tmp_path / str(rnd), "linprobe", {"acc1": 50.0}, "runs/pre", "digits",
               {"model": {"random_init": rnd}})
    report(tmp_path / "knn", "knn", {"knn_top1_k20": 50.0}, "runs/pre", "digits",
           {"model": "mae_vit_base_patch16", "random_init": True})  # knn's config: a model name, flat flags
    out = capsys.readouterr().out
    assert "mimkit knn: random weights, architecture of runs/pre on digits" in out
    assert "mimkit linprobe: runs/pre on digits" in out
    assert "mimkit linprobe: random weights, architecture of runs/pre on digits" in out
