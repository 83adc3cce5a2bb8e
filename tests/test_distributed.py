"""Two-process DDP on CPU (gloo): ranks end identical, and equal a single process with the same effective batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ddp_worker.py")

# mask_ratio 0 with the dense loss makes the step independent of each rank's masking RNG, so the
# 2-process run must match one process with twice the batch up to float reduction order. fp32 (--amp off): under
# bf16 autocast (`auto` on a CPU with bf16 units) the two batch splits round differently, beyond that tolerance.
COMMON = [*TINY_MODEL, "--epochs", "2", "--blr", "1e-2", "--warmup_epochs", "1", "--mask_ratio", "0",
          "--loss_mode", "all_pixels", "--num_workers", "0", "--device", "cpu", "--save_freq_epochs", "1",
          "--amp", "off"]


def launch(nproc: int, dump: Path, data: Path, out: Path, batch: int) -> subprocess.CompletedProcess:
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(dump), *COMMON, "--data_path", str(data), "--output_dir", str(out),
           "--batch_size", str(batch)]
    # this checkout's package first (not whichever one the venv installed), then the test helpers
    paths = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_gloo_matches_single_process(tmp_path: Path, image_folder: Path) -> None:
    r = launch(2, tmp_path / "ddp", image_folder, tmp_path / "run_ddp", batch=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp/rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp/rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
    # only rank 0 writes the run folder
    assert (tmp_path / "run_ddp/checkpoints/final.pt").exists()
    log = (tmp_path / "run_ddp/log.txt").read_text()
    assert "2 process(es)" in log and "effective batch 4" in log

    r = launch(1, tmp_path / "single", image_folder, tmp_path / "run_single", batch=4)
    assert r.returncode == 0, r.stderr[-3000:]
    single = torch.load(tmp_path / "single/rank0.pt", weights_only=True)
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"DDP vs single process at {k}")
    # and training moved the weights (so the comparison is not vacuous)
    ckpt = torch.load(tmp_path / "run_single/checkpoints/epoch-1/model.pt", weights_only=True)["model"]
    assert any(not torch.equal(ckpt[k], single[k]) for k in single)
