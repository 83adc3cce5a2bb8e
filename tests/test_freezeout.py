"""FreezeOut schedule: t_i formula, frozen blocks constant and gradient-free, less autograd work, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import TINY_MODEL
from mimkit.cli import main
from mimkit.engine.freezeout import FreezeOutHook, freeze_times
from mimkit.errors import UserError
from mimkit.models import create_model


@pytest.mark.parametrize("how, fn", [("linear", lambda x: x), ("squared", lambda x: x**2), ("cubic", lambda x: x**3)])
def test_freeze_times_follow_the_formula(how, fn) -> None:
    t = freeze_times(12, 0.8, how)
    assert t == pytest.approx([fn(0.8 + 0.2 * i / 12) for i in range(12)])
    assert all(a < b for a, b in zip(t, t[1:])) and t[-1] < 1


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(UserError, match="how_scale"):
        freeze_times(4, 0.5, "quartic")
    with pytest.raises(UserError, match="t_0"):
        freeze_times(4, 1.5, "linear")
    with pytest.raises(UserError, match="encoder blocks"):
        FreezeOutHook(nn.Linear(2, 2), 0.5, "linear")


def count_autograd_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return len(seen)


def tiny_mae(depth: int = 4):
    return create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_frozen_prefix_builds_no_graph_and_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = tiny_mae(depth=4)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    full = count_autograd_nodes(model(x, noise=noise)[0])
    hook = FreezeOutHook(model, 0.5, "linear")

    class FakeTrainer:
        optimizer = torch.optim.AdamW(hook.param_groups(0.05), lr=1e-3)
        state = type("S", (), {"step": 0})()

        def rewrap(self):
            pass

    trainer = FakeTrainer()
    n_groups = len(trainer.optimizer.param_groups)
    hook._freeze_through(2, trainer)
    loss = model(x, noise=noise)[0]
    partial = count_autograd_nodes(loss)
    assert partial < full
    loss.backward()
    frozen = [n for n, _ in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token"))]
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and not p.requires_grad, n
    assert model.blocks[2].attn.qkv.weight.grad is not None
    # frozen groups left the optimiser
    assert len(trainer.optimizer.param_groups) == n_groups - 4
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for n, p in model.named_parameters() if n in frozen)


def run(out: Path, data: Path, *extra: str) -> int:
    return main(["pretrain", *TINY_MODEL, "model.kwargs.depth=4", "--data_path", str(data), "--output_dir", str(out),
                 "--batch_size", "4", "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1",
                 "--freezeout", "--how_scale", "linear", "--t_0", "0.5", *extra])


@pytest.mark.slow
def test_blocks_stay_bitwise_constant_after_t_i_and_resume_keeps_frozen_state(tmp_path: Path, image_folder: Path):
    # 2 epochs x 4 iterations; linear t_0=0.5 over 4 blocks: t = 0.5, 0.625, 0.75, 0.875
    straight = tmp_path / "straight"
    assert run(straight, image_folder, "--epochs", "2", "--save_freq_steps", "1", "--keep_last_n", "0") == 0
    ck = straight / "checkpoints"
    w = {s: torch.load(ck / f"step-{s}/model.pt", weights_only=True)["model"] for s in (4, 5, 8)}
    assert torch.equal(w[4]["blocks.0.attn.qkv.weight"], w[8]["blocks.0.attn.qkv.weight"])  # froze at step 4
    assert torch.equal(w[4]["patch_embed.proj.weight"], w[8]["patch_embed.proj.weight"])
    assert torch.equal(w[5]["blocks.1.mlp.fc1.weight"], w[8]["blocks.1.mlp.fc1.weight"])  # froze at step 5
    assert not torch.equal(w[4]["decoder_pred.weight"], w[8]["decoder_pred.weight"])  # the decoder trains on
    frozen = [torch.load(ck / f"step-{s}/model.pt", weights_only=True)["extra"]["FreezeOutHook"]["frozen"]
              for s in range(1, 9)]
    assert frozen == [0, 0, 0, 1, 2, 3, 4, 4]
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["frozen_blocks"] for r in records if r["kind"] == "freezeout"] == [1, 4]
    log = (straight / "log.txt").read_text()
    # the schedule and the events in one unit (optimiser steps), and they agree with what happened
    assert "0: t=0.500 step 4, 1: t=0.625 step 5, 2: t=0.750 step 6, 3: t=0.875 step 7" in log
    assert "1/4 blocks frozen after optimiser step 4 (" in log and "4/4 blocks frozen after optimiser step 7 (" in log
    assert "FreezeOut on (linear, t_0 0.5" in log and "of the counted FLOPs saved" in log

    split = tmp_path / "split"
    assert run(split, image_folder, "--epochs", "2", "--max_steps", "5", "--save_freq_steps", "5") == 0
    assert run(split, image_folder, "--epochs", "2") == 0
    a = torch.load(ck / "final.pt", weights_only=True)
    b = torch.load(split / "checkpoints/final.pt", weights_only=True)
    assert b["extra"]["FreezeOutHook"]["frozen"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_localmim_pretrains_with_hog_and_freezeout(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "mim"
    argv = ["pretrain", "--model", "localmim_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
            "model.kwargs.embed_dim=32", "model.kwargs.depth=4", "model.kwargs.num_heads=2", "--hog_nbins", "4",
            "--hog_bias", "--data_path", str(image_folder), "--output_dir", str(out), "--batch_size", "4",
            "--num_workers", "0", "--epochs", "2", "--freezeout", "--freeze_heads", "--t_0", "0.5"]
    assert main(argv) == 0
    ck = torch.load(out / "checkpoints/final.pt", weights_only=True)
    assert ck["config"]["model"]["kwargs"]["hog_nbins"] == 4 and ck["extra"]["FreezeOutHook"]["frozen"] >= 3
    assert any(k.startswith("decoder.0.") for k in ck["model"])
