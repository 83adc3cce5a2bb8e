"""Memory accounting (engine/memory.py), the out-of-memory one-liner, and the ViT-g / ViT-G builders (meta only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.data.datasets import collate_batch
from mimkit.engine.distributed import DistInfo
from mimkit.engine.logging import RunLogger
from mimkit.engine.loop import LoopSettings, Trainer
from mimkit.engine.memory import fmt_bytes, memory_line, oom_advice, peak_bytes, state_bytes
from mimkit.engine.optim import build_adamw, param_groups, set_lr
from mimkit.errors import UserError
from mimkit.models import create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def _meta(name: str):
    with torch.device("meta"):
        return create_model(name)


@pytest.mark.parametrize("name,enc_params,width,depth,fc1", [
    ("mae_vit_giant_patch14", 1_010_840_576, 1408, 40, 6144),
    ("mae_vit_gigantic_patch14", 1_842_348_032, 1664, 48, 8192),
])
def test_giant_models_on_meta(name, enc_params, width, depth, fc1):
    """ViT-g/14 and ViT-G/14: timm's encoder widths (the counts equal timm's vit_giant / vit_gigantic without
    position embeddings), the official 512-d, 8-block decoder; never materialised."""
    import timm

    m = _meta(name)
    assert all(p.device.type == "meta" for p in m.parameters())
    enc = sum(p.numel() for n, p in m.named_parameters() if m.is_encoder_param(n) and n != "pos_embed")
    assert enc == enc_params
    timm_name = {"mae_vit_giant_patch14": "vit_giant_patch14_224",
                 "mae_vit_gigantic_patch14": "vit_gigantic_patch14_224"}[name]
    with torch.device("meta"):
        peer = timm.create_model(timm_name, num_classes=0)
    assert enc == sum(p.numel() for n, p in peer.named_parameters() if n != "pos_embed")
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.patch_size) == (width, depth, 16, 14)
    assert m.blocks[0].mlp.fc1.out_features == fc1
    assert (m.decoder_embed.out_features, len(m.decoder_blocks), m.decoder_blocks[0].mlp.fc1.out_features) == \
        (512, 8, 2048)
    # fp32 AdamW: 16 bytes a parameter on every DDP rank; FSDP over 8 ranks: about an eighth
    ddp, fsdp = state_bytes(m, "adamw", "ddp", 8), state_bytes(m, "adamw", "fsdp", 8)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert ddp["total"] == 4 * ddp["params"] + 12 * trainable
    assert abs(fsdp["total"] * 8 / ddp["total"] - 1) < 1e-3


def test_models_command_lists_giants(capsys):
    from mimkit.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mae_vit_giant_patch14" in out and "mae_vit_gigantic_patch14" in out


def test_state_bytes_ddp_vs_fsdp_and_frozen():
    torch.manual_seed(0)
    m = create_model("mae_vit_tiny_patch16", **TINY)
    n = sum(p.numel() for p in m.parameters())
    t = sum(p.numel() for p in m.parameters() if p.requires_grad)
    ddp = state_bytes(m, "AdamW (fused)", "ddp", 2)
    assert (ddp["weights"], ddp["grads"], ddp["optimizer"]) == (4 * n, 4 * t, 8 * t)
    fsdp = state_bytes(m, "AdamW (fused)", "fsdp", 2)
    assert 0.5 <= fsdp["total"] / ddp["total"] < 0.52  # half, plus the padding of odd dim-0 sizes
    m.apply_freeze_mode("encoder_only")
    frozen = state_bytes(m, "adamw", "ddp", 1)
    assert frozen["weights"] == 4 * n and frozen["grads"] < ddp["grads"]
    line = memory_line(m, "AdamW (fused)", "ddp", 2)
    assert line.startswith("memory: ") and "per rank under ddp over 2" in line and "(fsdp: " in line


def test_peak_bytes_and_format():
    peak = peak_bytes(torch.device("cpu"))
    assert peak is not None and peak > 10 * 2**20  # a Python process with torch holds more than 10 MiB
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 * 2**30) == "3.0 GiB"


def test_oom_advice_keeps_effective_batch():
    text = oom_advice(64, 1, 8, "ddp", False)
    assert "--grad_checkpointing" in text and "--strategy fsdp" in text
    assert "--batch_size 32 --accum_iter 2 (the same effective batch 512)" in text
    text = oom_advice(64, 1, 8, "fsdp", True)
    assert "--grad_checkpointing" not in text and "--strategy" not in text


def _trainer(tmp: Path, step_fn) -> Trainer:
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", **TINY)
    data = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), 0) for i in range(8)]
    opt = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))
    s = LoopSettings(epochs=1, batch_size=4, seed=0)
    return Trainer(model=model, optimizer=opt, dataset=data, collate=collate_batch, step_fn=step_fn,
                   lr_schedule=lambda o, e: set_lr(o, 1e-3), settings=s, dist=DistInfo(),
                   run=RunLogger(tmp, tensorboard=False, print_freq=1), ckpt=None, config={}, config_yaml="")


def test_oom_in_first_steps_is_one_line(tmp_path):
    def step(m, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t = _trainer(tmp_path, step)
    with pytest.raises(UserError) as e:
        t.fit()
    msg = str(e.value)
    assert "\n" not in msg and "out of memory in the first steps" in msg
    assert "--grad_checkpointing" in msg and "--strategy fsdp" in msg and "--batch_size 2 --accum_iter 2" in msg


def test_startup_and_peak_lines(tmp_path):
    from mimkit.tasks.pretrain import pretrain_step

    t = _trainer(tmp_path, pretrain_step(0.75, "masked_only"))
    t.fit()
    t.run.close()
    log = (tmp_path / "log.txt").read_text()
    assert "memory: " in log and "per rank under ddp over 1" in log
    assert "memory after the first step: " in log and "(peak RSS of the process)" in log


@pytest.mark.slow
def test_memory_benchmark_tiny_run(tmp_path):
    """benchmarks/memory.py at tiny sizes: every row lands in memory.json and memory.md; FSDP halves the state."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), "--tiny", "--models", "mae_vit_tiny_patch16", "--steps", "1",
                        "--batch_size", "4", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "memory.json").read_text())
    assert [row["grad_checkpointing"] for row in res["checkpointing"]] == [False, True]
    assert res["checkpointing"][1]["blocks_checkpointed"] == 6
    ddp, fsdp = res["strategies"]
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    assert 0.49 < fsdp["total_bytes"] / ddp["total_bytes"] < 0.52  # measured local shards: half of DDP's
    assert abs(fsdp["total_bytes"] / fsdp["estimate_bytes"] - 1) < 0.02  # state_bytes' estimate holds
    assert "| mae_vit_tiny_patch16 | fsdp | 2 |" in (tmp_path / "memory.md").read_text()
