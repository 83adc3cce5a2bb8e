"""benchmarks/gpu_suite.py at tiny sizes on CPU: every section runs and lands in the JSON and the markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~30 s on an idle 2-core machine
def test_gpu_suite_tiny_cpu_run_writes_json_and_table(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    step = {r["variant"]: r for r in res["step"]}
    assert len(step) == 4 and "skipped" in step["mimkit, bf16 + fused AdamW + torch.compile"]
    ran = [r for r in res["step"] if "skipped" not in r]
    assert all(r["images_per_s"] > 0 and len(r["step_s"]) == 2 and r["gflop_per_image"] > 0 for r in ran)
    # the same weights, images and noise: mimkit and Hugging Face compute the same first loss
    ours, hf = step["mimkit, bf16 + fused AdamW"], step["Hugging Face ViTMAEForPreTraining, bf16"]
    assert ours["first_loss"] == pytest.approx(hf["first_loss"], rel=1e-2)
    runs = {(r["data"], r["augment_on"]): r for r in res["e2e"]["runs"]}
    assert set(runs) == {("synthetic tensors", "-"), ("JPEG folder", "workers"), ("JPEG folder", "device"),
                         ("shards", "workers"), ("shards", "device")}
    assert all(r["images_per_s"] > 0 for r in runs.values()) and runs[("synthetic tensors", "-")]["of_synthetic"] == 1
    fo = res["freezeout"]
    assert len(fo["step_s_by_frozen"]) == fo["depth"] + 1 == 3
    for s in fo["schedules"]:
        assert 0 < s["flop_saving"] < 1 and abs(sum(s["share_by_frozen"]) - 1) < 1e-9
    table = (tmp_path / "gpu_suite.md").read_text()
    for text in ("**Training step**", "Hugging Face ViTMAEForPreTraining", "**End to end**", "| shards | device |",
                 "**FreezeOut saving**", "| cubic:0.8 |"):
        assert text in table
