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


def _suite(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--output_dir", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(600)  # well under a minute on an idle 2-core machine
def test_gpu_suite_tiny_cpu_run_writes_json_and_table(tmp_path: Path) -> None:
    done = _suite(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert "failed" not in res and "not_run" not in res
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


def test_gpu_suite_skips_sections_past_its_time_budget(tmp_path: Path) -> None:
    done = _suite(tmp_path, "--budget_s", "0", "--sections", "e2e", "freezeout")
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(res["not_run"]) == {"e2e", "freezeout"} and "e2e" not in res
    assert "**freezeout**: not run: --budget_s 0 s spent" in (tmp_path / "gpu_suite.md").read_text()
