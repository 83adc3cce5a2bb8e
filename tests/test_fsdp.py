"""--strategy fsdp (FSDP2 on CPU / gloo, 2 processes) and resuming on another number of processes.

FSDP matches DDP; a SIGTERM'd FSDP run resumed on 2 ranks is bitwise the straight run; its sharded checkpoint
resumes on 1 process and under DDP; a 2-rank DDP run stopped mid-epoch and resumed on 1 process reads each image of
that epoch exactly once; FSDP's final.pt loads in knn, linprobe and export; bad input is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, write_images

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fsdp_worker.py")
# 16 images, batch 2 x 2 ranks: 4 iterations an epoch, 8 optimiser steps in 2 epochs; fp32 so FSDP == DDP
COMMON = [*TINY_MODEL, "--epochs", "2", "--blr", "1e-2", "--warmup_epochs", "1", "--num_workers", "0",
          "--device", "cpu", "--amp", "off", "--batch_size", "2", "--print_freq", "1", "--clip_grad", "1.0"]


def launch(nproc: int, out: Path, data: Path, *extra: str, sigterm_at: int = 0) -> subprocess.CompletedProcess:
    """`mimkit pretrain` on `nproc` processes (torchrun when > 1) through the recording worker."""
    pre = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    cmd = [*pre, str(WORKER), str(out / "keys"), *COMMON, "--data_path", str(data), "--output_dir", str(out),
           *extra]
    paths = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths),
           "SIGTERM_AT": str(sigterm_at)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


def stopped(r: subprocess.CompletedProcess) -> bool:
    """A rank ended with the signal-stop exit code 75 (torchrun then stops the other one and exits 1)."""
    return "exitcode  : 75" in r.stderr or r.returncode == 75


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "step"]


def final_weights(run: Path) -> dict:
    return torch.load(run / "checkpoints/final.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The straight FSDP and DDP runs, and an FSDP run stopped by SIGTERM after optimiser step 3 (mid-epoch 0)."""
    d = tmp_path_factory.mktemp("fsdp")
    write_images(d / "data/train", 16, classes=2)  # pretraining reads train/; knn and linprobe also val/
    write_images(d / "data/val", 8, classes=2, seed=1)
    out = {"data": d / "data/train", "labelled": d / "data"}
    for name, extra, stop in (("fsdp", ["--strategy", "fsdp"], 0), ("ddp", [], 0),
                              ("fsdp_stopped", ["--strategy", "fsdp", "--save_freq_steps", "2"], 3)):
        r = launch(2, d / name, out["data"], *extra, sigterm_at=stop)
        assert stopped(r) if stop else r.returncode == 0, r.stderr[-3000:]
        out[name] = d / name
    return out


def test_fsdp_matches_ddp(runs):
    log = (runs["fsdp"] / "log.txt").read_text()
    assert "FSDP2: 3 blocks and the root sharded over 2 ranks" in log and "per rank under fsdp over 2" in log
    fsdp, ddp = step_losses(runs["fsdp"]), step_losses(runs["ddp"])
    assert len(fsdp) == len(ddp) == 8
    assert max(abs(a - b) for a, b in zip(fsdp, ddp)) <= 1e-5
    a, b = final_weights(runs["fsdp"]), final_weights(runs["ddp"])
    assert a.keys() == b.keys()
    for k in a:  # final.pt under FSDP: the full, ordinary weights
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_sharded_checkpoint_layout_and_sigterm_resume_is_bitwise(runs, tmp_path):
    stopped = runs["fsdp_stopped"]
    ckpt = torch.load(stopped / "checkpoints/latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["sharded"]["world_size"] == 2 and ckpt["model"] == {}
    files = ckpt["sharded"]["files"]
    assert sorted(f for f in files if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    run = tmp_path / "resumed"
    shutil.copytree(stopped, run)
    r = launch(2, run, runs["data"], "--strategy", "fsdp", "--save_freq_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    straight, resumed = final_weights(runs["fsdp"]), final_weights(run)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert step_losses(run)[-5:] == step_losses(runs["fsdp"])[-5:]


def test_fsdp_checkpoint_resumes_on_one_process_and_under_ddp(runs, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(runs["fsdp_stopped"], one)
    r = launch(1, one, runs["data"])
    assert r.returncode == 0, r.stderr[-3000:]
    log = (one / "log.txt").read_text()
    assert "world size 2 -> 1: accum_iter 1 -> 2 keeps the effective batch 4" in log
    assert "read the sharded checkpoint of 2 FSDP rank(s) on 1 process(es) without FSDP" in log
    assert torch.load(one / "checkpoints/final.pt", weights_only=True)["step"] == 8  # the same schedule of steps
    ddp = tmp_path / "ddp"
    shutil.copytree(runs["fsdp_stopped"], ddp)
    r = launch(2, ddp, runs["data"], "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(ddp / "checkpoints/final.pt", weights_only=True)
    assert final["step"] == 8 and "sharded" not in final
    # the weights continue from the shards: close to the straight FSDP run (only the reduction order differs)
    for k, v in final_weights(runs["fsdp"]).items():
        torch.testing.assert_close(final["model"][k], v, rtol=0, atol=1e-5, msg=k)


def test_ddp_stopped_mid_epoch_resumed_on_one_process_sees_each_image_once(runs, tmp_path):
    run = tmp_path / "ddp_stop"
    r = launch(2, run, runs["data"], "--save_freq_steps", "100", sigterm_at=3)
    assert stopped(r), r.stderr[-3000:]
    r = launch(1, run, runs["data"], "--epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [json.loads(line) for f in sorted((run / "keys").glob("keys-rank*.jsonl"))
            for line in f.read_text().splitlines()]
    seen = Counter(i for e, i in keys if e == 0)
    assert sorted(seen) == list(range(16)) and set(seen.values()) == {1}  # every image of epoch 0, once
    assert "epoch 0 continues at sample 12 of its list (iteration 6 here, 3 before)" in (run / "log.txt").read_text()


def test_fsdp_final_pt_loads_in_knn_linprobe_export(runs, tmp_path, capsys):
    from mimkit.cli import main

    final = runs["fsdp"] / "checkpoints/final.pt"
    data = str(runs["labelled"])
    assert main(["knn", "--checkpoint", str(final), "--data_path", data, "--k", "3", "--device", "cpu",
                 "--output_dir", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", "--finetune", str(final), "--data_path", data, "--epochs", "1", "--warmup_epochs", "0",
                 "--batch_size", "8", "--device", "cpu", "--num_workers", "0", "--output_dir",
                 str(tmp_path / "lp")]) == 0
    assert main(["export", str(final), "--format", "safetensors", "--output", str(tmp_path / "w.safetensors")]) == 0
    assert (tmp_path / "w.safetensors").stat().st_size > 0
    assert "Traceback" not in capsys.readouterr().err


def test_bad_input_is_one_line(runs, tmp_path):
    # a sharded checkpoint missing a rank's file: refused before any work, the folder untouched
    run = tmp_path / "torn"
    shutil.copytree(runs["fsdp_stopped"], run)
    (run / "checkpoints/step-3/sharded/__1_0.distcp").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = launch(1, run, runs["data"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is missing __1_0.distcp" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # an accum_iter that cannot keep the effective batch after the world size changed
    run = tmp_path / "accum"
    shutil.copytree(runs["fsdp_stopped"], run)
    r = launch(1, run, runs["data"], "--batch_size", "2", "--accum_iter", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not the checkpoint's effective batch 4" in r.stderr and "--batch_size 2 --accum_iter 2" in r.stderr
