"""`mimkit segment --eval / --predict` from a trained checkpoint: the checkpoint run's settings and class names,
results beside earlier ones, predictions of a folder tree; a segment checkpoint as --finetune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import write_generic
from test_segment_cli import TINY

from mimkit.cli import main

pytestmark = pytest.mark.slow  # end-to-end CLI runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run on the mosaics with sliding-window inference (the demo preset says whole)."""
    out = tmp_path_factory.mktemp("seg") / "run"
    args = [a for a in TINY if a not in ("--test_mode", "whole")]
    assert main(["segment", *args, "--max_iters", "2", "--warmup_iters", "1", "--test_mode", "slide",
                 "test.stride=[16,16]", "test.num_overlays=2", "--output_dir", str(out)]) == 0
    return out


def test_eval_uses_the_checkpoint_runs_settings_unless_given(trained, tmp_path, capsys) -> None:
    run = json.loads((trained / "results.json").read_text())
    ckpt = str(trained / "checkpoints" / "final.pt")
    capsys.readouterr()
    assert main(["segment", "--eval", "--resume", ckpt, "--output_dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "mimkit segment --eval: UperNet from" in out
    assert "test slide (window [32, 32], stride [16, 16]), crop [32, 32]" in out and "except yours" not in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["test_mode"] == "slide" and res["metrics"] == run["metrics"]  # the run's own numbers
    assert main(["segment", "--eval", "--resume", ckpt, "--test_mode", "whole", "--output_dir",
                 str(tmp_path / "ev2")]) == 0
    assert "except yours: test.mode" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["test_mode"] == "whole"


def test_eval_takes_class_names_from_the_checkpoint(tmp_path) -> None:
    data = write_generic(tmp_path / "data", n=2)
    out = tmp_path / "run"
    assert main(["segment", *TINY, "--data_path", str(data), "--max_iters", "1", "--batch_size", "2",
                 "--input_size", "16", "--output_dir", str(out)]) == 0
    (data / "classes.txt").unlink()  # the checkpoint holds the names
    assert main(["segment", "--eval", "--resume", str(out / "checkpoints" / "final.pt"), "--output_dir",
                 str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(res["metrics"]["per_class"]) == ["sky", "road", "car"] and res["data"] == str(data)


def test_predict_a_folder_tree_skips_bad_files_and_never_overwrites(trained, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("x.png", "x.jpg", "sub/y.png"):
        Image.fromarray((rng.random((20, 28, 3)) * 255).astype(np.uint8)).save(photos / name)
    (photos / "broken.png").write_bytes(b"not an image")
    ckpt = str(trained / "checkpoints" / "final.pt")
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["segment", "--predict", str(photos), "--resume", ckpt, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    pred = out / "predictions"
    for name in ("x.png", "x.jpg", "sub/y.png"):  # no collision, the tree kept
        assert np.array(Image.open(pred / f"{name}_label.png")).shape == (20, 28)
        assert (pred / f"{name}_overlay.png").exists()
    assert printed.count("warning: skipped") == 1 and "broken.png" in printed and "skipped 1 unreadable" in printed
    legend = (pred / "legend.csv").read_text().splitlines()
    assert legend[0] == "index,name,r,g,b" and legend[1].startswith('0,"brick",') and len(legend) == 9
    assert Image.open(pred / "legend.png").size[1] > 8 * 10
    first = (pred / "x.png_label.png").read_bytes()
    assert main(["segment", "--predict", str(photos / "x.png"), "--resume", ckpt, "--output_dir", str(out)]) == 0
    assert (out / "predictions-2" / "x.png_label.png").exists()
    assert (pred / "x.png_label.png").read_bytes() == first  # the earlier predictions are kept


def test_finetune_from_a_segment_checkpoint_takes_its_backbone(trained, tmp_path) -> None:
    data = write_generic(tmp_path / "data", n=2)
    out = tmp_path / "ft"
    assert main(["segment", "--finetune", str(trained / "checkpoints" / "final.pt"), "--data_path", str(data),
                 "--max_iters", "1", "--batch_size", "2", "--input_size", "32", "--lr", "1e-12", "--num_workers",
                 "0", "model.channels=8", "model.aux_channels=8", "logging.tensorboard=false", "--test_mode",
                 "whole", "--output_dir", str(out)]) == 0
    assert "backbone of segment checkpoint" in (out / "log.txt").read_text()
    src = torch.load(trained / "checkpoints" / "final.pt", weights_only=True)["model"]
    new = torch.load(out / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert new["decode_head.conv_seg.weight"].shape[0] == 3  # the new data's classes
    for k in ("backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight", "backbone.pos_embed"):
        torch.testing.assert_close(new[k], src[k], atol=1e-6, rtol=0)  # lr ~ 0: the weights it started from


def test_eval_says_when_the_checkpoints_data_is_gone(tmp_path, capsys) -> None:
    data = write_generic(tmp_path / "data", n=2)
    out = tmp_path / "run"
    assert main(["segment", *TINY, "--data_path", str(data), "--max_iters", "1", "--batch_size", "2",
                 "--input_size", "16", "--output_dir", str(out)]) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["segment", "--eval", "--resume", str(out / "checkpoints" / "final.pt"), "--output_dir",
                 str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"trained on {data}, which is not here; give --data_path" in err
    assert main(["segment", "--eval", "--resume", str(out / "checkpoints" / "final.pt"), "--data_path",
                 str(tmp_path / "moved"), "--output_dir", str(tmp_path / "ev")]) == 0


def test_predict_with_nothing_readable_exits_2_and_leaves_no_folder(trained, tmp_path, capsys) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("a.png", "b.jpg"):
        (junk / name).write_bytes(b"not an image")
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["segment", "--predict", str(junk), "--resume", str(trained / "checkpoints" / "final.pt"),
                 "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of the 2 file(s) given to --predict could be read" in err, err
    assert not (out / "predictions").exists()


def test_eval_with_predict_and_a_pretraining_checkpoint_are_refused_in_user_terms(trained, tmp_path, capsys) -> None:
    ckpt = str(trained / "checkpoints" / "final.pt")
    capsys.readouterr()
    assert main(["segment", "--eval", "--predict", str(tmp_path), "--resume", ckpt,
                 "--output_dir", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval and --predict are two runs: give one" in err, err
    pre = tmp_path / "pretrain.pt"  # what `mimkit pretrain` writes: an MAE with its decoder, no model.arch
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 8, 8),
                          "decoder_embed.weight": torch.zeros(4, 8)},
                "optimizer": {}, "config": {"model": {"type": "mae_vit_tiny_patch16"}}, "epoch": 1, "step": 3}, pre)
    assert main(["segment", "--eval", "--resume", str(pre), "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a pretraining checkpoint" in err and "pass it to --finetune" in err, err
