"""Smoke test of benchmarks/pretrain_throughput.py: one step of each implementation on a tiny model, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_throughput.py"


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~15 s on an idle 2-core machine; generous for a loaded CI box
def test_pretrain_throughput_writes_both_implementations_and_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
           "--depth", "1", "--batch_size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
           "--variants", "fused,bf16,bf16+fused", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("ours", "hf"):
        assert res[name]["images_per_s"] > 0
        assert len(res[name]["step_s"]) == 1
        assert res[name]["peak_memory"]["peak_bytes"] > 0
    # same weights, images and noise: the two implementations compute the same first loss
    assert res["ours"]["first_loss"] == pytest.approx(res["hf"]["first_loss"], rel=1e-5)
    assert res["ratio"] == pytest.approx(res["ours"]["images_per_s"] / res["hf"]["images_per_s"])
    assert res["gflop_per_image"] > 0
    assert "ratio ours/HF images/s" in done.stdout
    # the fp32 / fused / bf16 variants ran in the same interleaved run, from the same weights, images and noise
    assert set(res["variants"]) == {"fused", "bf16", "bf16+fused"}
    for name, v in res["variants"].items():
        assert v["images_per_s"] > 0 and len(v["step_s"]) == 1
        assert v["speedup_vs_hf"] == pytest.approx(v["images_per_s"] / res["hf"]["images_per_s"])
        rel = 2e-2 if "bf16" in name else 1e-6  # bf16 autocast: within the stated tolerance of fp32
        assert v["first_loss"] == pytest.approx(res["ours"]["first_loss"], rel=rel)
    assert isinstance(res["cpu"]["bf16"], bool) and res["cpu"]["model"].startswith("CPU ")
    assert "bf16+fused" in done.stdout


def test_flops_per_image_matches_the_known_vit_b_figure():
    """About 58 GFLOP per training image for ViT-B/16 at 224 px and mask 0.75 (3 x forward matmuls)."""
    import importlib.util

    import torch

    from mimkit.models import create_model

    spec = importlib.util.spec_from_file_location("pretrain_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
    assert bench.flops_per_image(model, 0.75) / 1e9 == pytest.approx(58.7, abs=0.5)
    assert bench.flops_per_image(model, 0.0) > 2 * bench.flops_per_image(model, 0.75)
