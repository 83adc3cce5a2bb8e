"""One output scheme: runs/<command>/<timestamp> by default, an explicit folder resumes, nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL, write_images

from mimkit import config as C
from mimkit.cli import main


def _pretrain(*extra: str) -> int:
    return main(["pretrain", *TINY_MODEL, "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
                 "--max_steps", "1", "logging.tensorboard=false", *extra])


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    data = tmp_path / "imgs"
    write_images(data, 8)
    assert _pretrain("--data_path", str(data), "--output_dir", str(tmp_path / "pre")) == 0
    return tmp_path / "pre/checkpoints/final.pt"


def test_new_run_dir_is_new_every_time(tmp_path: Path) -> None:
    a, b = C.new_run_dir("knn", tmp_path), C.new_run_dir("knn", tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "knn" and a.is_dir() and b.is_dir()
    assert b.name.startswith(a.name)  # the same second: suffixed -2


def test_default_run_folders_never_meet(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "imgs"
    write_images(data, 8)
    assert _pretrain("--data_path", str(data)) == 0
    assert _pretrain("--data_path", str(data)) == 0
    runs = sorted((tmp_path / "runs/pretrain").iterdir())
    assert len(runs) == 2 and all((r / "checkpoints/final.pt").is_file() for r in runs)
    assert "resumed" not in (runs[1] / "log.txt").read_text()  # a default folder is always a fresh run
    cfg = (runs[1] / "config.yaml").read_text()
    assert f"output_dir: {runs[1].relative_to(tmp_path)}" in cfg  # the resolved folder is recorded


def test_an_explicit_folder_resumes(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    write_images(data, 8)
    out = tmp_path / "run"
    assert _pretrain("--data_path", str(data), "--output_dir", str(out), "--max_steps", "0") == 0
    assert _pretrain("--data_path", str(data), "--output_dir", str(out), "--max_steps", "0", "--epochs", "2") == 0
    log = (out / "log.txt").read_text()
    assert "resumed from" in log and "at epoch 1" in log
    # raising --epochs after a finished run recomputes the schedule, and says so
    assert "the schedule changed since the checkpoint (epochs 1 -> 2)" in log and "the lr goes from" in log


def test_knn_never_overwrites_results(tmp_path: Path, tiny_ckpt: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    labelled = tmp_path / "lab"
    write_images(labelled / "train", 8, classes=2)
    write_images(labelled / "val", 4, classes=2, seed=1)
    argv = ["knn", "--checkpoint", str(tiny_ckpt), "--data_path", str(labelled), "--k", "1", "3"]
    assert main(argv) == 0 and main(argv) == 0
    assert len(list((tmp_path / "runs/knn").glob("*/results.json"))) == 2
    out = tmp_path / "mine"
    assert main([*argv, "--output_dir", str(out)]) == 0
    first = (out / "results.json").read_text()
    assert main([*argv, "--output_dir", str(out), "--k", "2"]) == 0
    assert (out / "results.json").read_text() == first  # kept
    assert "knn_top1_k2" in json.loads((out / "results-2.json").read_text())["metrics"]


def test_visualize_writes_into_a_new_run_folder(tmp_path: Path, tiny_ckpt: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    img = write_images(tmp_path / "one", 1)[0]
    assert main(["visualize", str(tiny_ckpt), str(img)]) == 0
    assert main(["visualize", str(tiny_ckpt), str(img)]) == 0
    assert len(list((tmp_path / "runs/visualize").glob("*/reconstruction.png"))) == 2
