"""Smoke test of benchmarks/freezeout_speedup.py: one regular/FreezeOut pair, 1 epoch, a few images, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "freezeout_speedup.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_freezeout_benchmark_writes_both_runs_and_the_speedup(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--models", "mae_vit_tiny_patch16", "--configs", "regular", "linear:0.5",
           "--epochs", "1", "--num_images", "16", "--batch_size", "8", "--k", "5",
           "--model_kw", "depth=4", "embed_dim=32", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=1",
           "decoder_num_heads=2", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    runs = {r["config"]: r for r in res["runs"]}
    assert set(runs) == {"regular", "linear:0.5"}
    for r in runs.values():
        assert r["total_time_s"] > 0 and len(r["epoch_time_s"]) == 1 and r["epoch_time_s"][0] > 0
        assert r["steps"] == 2 and r["memory"]["peak_bytes"] > 0
        assert 0 <= r["knn"]["knn_top1_k5"] <= 100
    fo, reg = runs["linear:0.5"], runs["regular"]
    assert fo["speedup"] == pytest.approx(reg["total_time_s"] / fo["total_time_s"])
    assert reg["speedup"] == 1.0
    # 2 steps over 4 blocks, linear t_0 = 0.5: block 0 freezes after step 1 (t = 0.5), so step 2 runs 1 frozen
    assert reg["frozen_per_step"] == [0, 0] and fo["frozen_per_step"] == [0, 1]
    assert 0 < fo["flop_saving"] < 1 and reg["flop_saving"] == 0
    # reference estimate: 2/3 x mean(1 - t_i), t = 0.5, 0.625, 0.75, 0.875
    assert fo["reference_estimate"]["time_saving"] == pytest.approx(2 / 3 * (0.5 + 0.375 + 0.25 + 0.125) / 4)
    assert "speed-up (measured)" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_freezeout_benchmark_runs_localmim_to_its_table(tmp_path: Path) -> None:
    """LocalMIM rows at tiny size: the run that died in loading.py (decoder_blocks) before any table."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--models", "localmim_vit_tiny_patch16", "--configs", "regular", "linear:0.5",
           "--epochs", "1", "--num_images", "16", "--batch_size", "8", "--k", "5", "--hog_nbins", "4",
           "--model_kw", "depth=4", "embed_dim=32", "num_heads=2", "decoder_embed_dim=16", "decoder_depth=1",
           "decoder_num_heads=2", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = {r["config"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"regular", "linear:0.5"}
    assert all(0 <= r["knn"]["knn_top1_k5"] <= 100 for r in runs.values())
    assert runs["linear:0.5"]["frozen_per_step"] == [0, 1] and 0 < runs["linear:0.5"]["flop_saving"] < 1
    assert "localmim_vit_tiny_patch16" in (out / "results.md").read_text()


def test_counted_flops_hold_forward_and_backward() -> None:
    """The benchmark's per-image FLOPs with k frozen blocks are forward + backward, as FreezeOut's own count.

    Entering a FlopCounterMode clears its counts: one counter re-entered for backward once dropped the forward's
    FLOPs, which inflated every "counted saving" (ViT-B LocalMIM, 224 px: 85 % instead of 57 % with all blocks
    frozen)."""
    import importlib.util

    import torch

    from mimkit.engine.freezeout import FreezeOutHook
    from mimkit.tasks import pretrain

    spec = importlib.util.spec_from_file_location("freezeout_speedup", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8", "--data_path", "digits",
            "model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
            "model.kwargs.decoder_embed_dim=32", "model.kwargs.decoder_depth=1", "model.kwargs.decoder_num_heads=2"]
    cost = bench.cost_by_frozen(argv, batch=2)["flops"]
    torch.manual_seed(0)
    model = pretrain.build_model(bench.build_cfg(argv), "cpu").train()
    hook = FreezeOutHook(model, 0.5, "linear")
    every, none = hook.count_flops()
    assert cost[0] == pytest.approx(every) and cost[-1] == pytest.approx(none)
    assert len(cost) == 3 and cost[0] > cost[1] > cost[2] > 0.25 * cost[0]  # the forward always runs
