"""End-to-end `mimkit pretrain` on tiny data: artifacts, bitwise resume, auto-resume, pruning, corrupt images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.engine.checkpoint import atomic_save

pytestmark = pytest.mark.slow


def pretrain(out: Path, data: Path, *extra: str) -> int:
    argv = ["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(out), "--batch_size", "4",
            "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1", "--print_freq", "1", *extra]
    return main(argv)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_writes_every_artifact(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "2", "--save_freq_epochs", "1", "--save_freq_steps", "3",
                    "--save_safetensors") == 0
    for rel in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoints/latest.pt", "checkpoints/final.pt",
                "checkpoints/epoch-1/model.pt", "checkpoints/epoch-2/config.yaml", "checkpoints/epoch-2/log.txt",
                "checkpoints/step-6/model.pt", "checkpoints/epoch-2/model.safetensors", "recon_init.png",
                "recon_epoch-2.png"):
        assert (out / rel).exists(), rel
    assert list((out / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(r["loss"] > 0 for r in epochs)
    assert {"loss", "loss_avg", "lr", "samples_per_s", "iter_s"} <= set(next(r for r in records if r["kind"] == "step"))
    ckpt = torch.load(out / "checkpoints/final.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "scheduler", "epoch", "step", "config", "rng", "mimkit_version"} <= set(ckpt)
    assert ckpt["step"] == 8 and ckpt["config"]["optimization"]["lr"] == pytest.approx(1e-2 * 4 / 256)
    # the resolved config is a valid config file again
    assert main(["pretrain", str(out / "config.yaml"), "--output_dir", str(tmp_path / "again"), "--epochs", "1",
                 "--max_steps", "1"]) == 0


def test_resume_at_epoch_boundary_is_bitwise(tmp_path: Path, image_folder: Path) -> None:
    straight = tmp_path / "straight"
    assert pretrain(straight, image_folder, "--epochs", "2") == 0
    split = tmp_path / "split"
    # 4 iterations per epoch: stop after the first epoch's steps, then resume from latest.pt
    assert pretrain(split, image_folder, "--epochs", "2", "--max_steps", "4", "--save_freq_steps", "4") == 0
    assert torch.load(split / "checkpoints/latest.pt", weights_only=True)["step"] == 4
    assert pretrain(split, image_folder, "--epochs", "2") == 0  # auto_resume picks up latest.pt
    assert_bitwise_equal(weights(straight / "checkpoints/final.pt"), weights(split / "checkpoints/final.pt"))
    assert "latest.pt at epoch 0, batch 4, step 4" in (split / "log.txt").read_text()


def test_resume_mid_epoch_with_workers_is_bitwise(tmp_path: Path, image_folder: Path) -> None:
    straight = tmp_path / "straight"
    assert pretrain(straight, image_folder, "--epochs", "2", "--num_workers", "2") == 0
    split = tmp_path / "split"
    assert pretrain(split, image_folder, "--epochs", "2", "--num_workers", "2", "--max_steps", "6",
                    "--save_freq_steps", "2") == 0
    resume_from = split / "checkpoints/step-6"
    assert pretrain(split, image_folder, "--epochs", "2", "--num_workers", "2", "--resume", str(resume_from)) == 0
    assert_bitwise_equal(weights(straight / "checkpoints/final.pt"), weights(split / "checkpoints/final.pt"))
    assert "step-6 at epoch 1, batch 2, step 6" in (split / "log.txt").read_text()


def test_keep_last_n_prunes_old_checkpoints(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "3", "--save_freq_epochs", "1", "--save_freq_steps", "1",
                    "--keep_last_n", "2") == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("epoch-*")) == ["epoch-2", "epoch-3"]
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-11", "step-12"]
    assert not list(ck.glob(".*tmp*"))
    # latest.pt is the newest checkpoint written (the epoch-3 one, written after step-12)
    assert torch.load(ck / "latest.pt", weights_only=True)["epoch"] == 3


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data, 7)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "run"
    assert pretrain(out, data, "--epochs", "2") == 0
    log = (out / "log.txt").read_text()
    assert "skipped images 1 this epoch, 1 in all" in log and "skipped images 1 this epoch, 2 in all" in log
    assert log.count("skipping unreadable image") == 2 and "broken.jpg" in log  # warned once per epoch
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    assert [(e["skipped_images_epoch"], e["skipped_images"]) for e in epochs] == [(1, 1), (1, 2)]


def test_nonfinite_loss_stops_with_step_named(tmp_path: Path, image_folder: Path, capsys) -> None:
    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "1", "--lr", "1e30") == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "epoch 0, iteration" in err
    # skip mode trains through, counting the skipped steps
    out2 = tmp_path / "run2"
    assert pretrain(out2, image_folder, "--epochs", "1", "--lr", "1e30", "optimization.on_nonfinite=skip") == 0
    last = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_nonfinite"] >= 1


def test_atomic_save_never_leaves_half_written_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "latest.pt"
    atomic_save({"v": torch.ones(2)}, target)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"v": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_resume_from_foreign_file_is_one_clear_error(tmp_path: Path, image_folder: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert pretrain(tmp_path / "run", image_folder, "--resume", str(bad)) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "bad.pt" in err
