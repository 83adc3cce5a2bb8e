"""Activation checkpointing (--grad_checkpointing): bitwise equal losses and gradients on CPU in fp32, frozen blocks
skipped, state dicts unchanged, bad uses refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch

import mimkit.models.checkpointing as GC
from mimkit.models.registry import create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=2, drop_path=0.2)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: torch.nn.Module, imgs: torch.Tensor, fn) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one backward, from the same RNG state (masks and drop path)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = fn(model, imgs)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_bitwise(plain: torch.nn.Module, ckpt: torch.nn.Module, fn, steps: int = 2) -> None:
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(ckpt.parameters(), lr=1e-3)
    for _ in range(steps):  # two optimiser steps: the second runs on updated weights
        la, ga = _step(plain, imgs, fn)
        lb, gb = _step(ckpt, imgs, fn)
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and ga
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
        opt_a.step()
        opt_b.step()


def _counting(monkeypatch) -> list:
    calls = []
    real = GC.checkpoint

    def counted(fn, *a, **kw):
        calls.append(fn)
        return real(fn, *a, **kw)

    monkeypatch.setattr(GC, "checkpoint", counted)
    return calls


def _mae_loss(m, imgs):
    return m(imgs, mask_ratio=0.75)[0]


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "localmim_vit_tiny_patch16"])
def test_mae_and_localmim_bitwise(name, monkeypatch):
    torch.manual_seed(0)
    kw = dict(TINY, depth=4, decoder_depth=1) if name.startswith("localmim") else TINY
    plain = create_model(name, **kw).train()
    ckpt = copy.deepcopy(plain)
    n = ckpt.set_grad_checkpointing(True)
    assert n == len(plain.transformer_blocks())
    calls = _counting(monkeypatch)
    _assert_bitwise(plain, ckpt, _mae_loss)
    assert len(calls) == 2 * n  # every block recomputed, in each of the two steps
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # names unchanged: checkpoints interchange


def test_first_n_encoder_blocks_only(monkeypatch):
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", **TINY)
    assert model.set_grad_checkpointing(2) == 2
    assert [GC.is_checkpointed(b) for b in model.blocks] == [True, True, False]
    assert not any(GC.is_checkpointed(b) for b in model.decoder_blocks)
    assert model.set_grad_checkpointing(False) == 0
    assert not any(GC.is_checkpointed(b) for b in model.transformer_blocks())
    assert type(model.blocks[0]).__name__ == "Block"


def test_frozen_blocks_are_skipped(monkeypatch):
    """FreezeOut's frozen prefix and a frozen encoder run without checkpointing: they hold no activations."""
    torch.manual_seed(0)
    plain = create_model("mae_vit_tiny_patch16", **TINY).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = _counting(monkeypatch)
    for m in (plain, ckpt):
        m.frozen_prefix = 2
        for p in [*m.patch_embed.parameters(), *m.blocks[0].parameters(), *m.blocks[1].parameters()]:
            p.requires_grad_(False)
    _assert_bitwise(plain, ckpt, _mae_loss, steps=1)
    assert len(calls) == 1 + 2  # encoder block 2 and the 2 decoder blocks
    calls.clear()
    for m in (plain, ckpt):
        m.frozen_prefix = 0
        m.apply_freeze_mode("encoder_only")
    _assert_bitwise(plain, ckpt, _mae_loss, steps=1)
    assert len(calls) == 2  # the decoder blocks only: the frozen encoder saves nothing


def test_finetuned_vit_bitwise(monkeypatch):
    from mimkit.models.heads import vit_classifier

    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", **TINY)
    plain = vit_classifier(mae, 5, global_pool=True, drop_path=0.2).train()
    ckpt = copy.deepcopy(plain)
    assert GC.apply_grad_checkpointing(ckpt, True, "vit") == 3
    calls = _counting(monkeypatch)
    target = torch.tensor([0, 1, 2, 3])
    _assert_bitwise(plain, ckpt, lambda m, x: torch.nn.functional.cross_entropy(m(x), target))
    assert len(calls) == 6


def test_no_blocks_refused():
    from mimkit.errors import UserError

    with pytest.raises(UserError, match="no transformer blocks"):
        GC.apply_grad_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), True, "resnet")


def test_cli_refusals(tmp_path, capsys):
    from mimkit.cli import main

    rc = main(["incremental", "--data_path", "digits", "--grad_checkpointing", "--output_dir", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert rc == 2 and "--grad_checkpointing" in err and "--finetune" in err and "Traceback" not in err
    assert not (tmp_path / "i").exists()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--grad_checkpointing", "some", "--output_dir", str(tmp_path / "p")])
    assert e.value.code == 2 and "number of blocks" in capsys.readouterr().err
    rc = main(["pretrain", "model.grad_checkpointing=-1", "--output_dir", str(tmp_path / "p")])
    assert rc == 2 and "model.grad_checkpointing" in capsys.readouterr().err


def test_find_blocks_walks_into_a_backbone_with_transformer_blocks():
    from mimkit.models.checkpointing import encoder_blocks, find_blocks

    mae = create_model("mae_vit_tiny_patch16", **TINY)

    class Wrapper(torch.nn.Module):  # a model holding an MAE as its backbone (no blocks of its own)
        def __init__(self) -> None:
            super().__init__()
            self.backbone = mae
            self.head = torch.nn.Linear(2, 2)

    w = Wrapper()
    # the inner transformer_blocks(): encoder and decoder; encoder_blocks: the encoder's alone
    assert find_blocks(w) == list(mae.blocks) + list(mae.decoder_blocks)
    assert encoder_blocks(w) == list(mae.blocks)
    assert find_blocks(mae.blocks[0]) == [] and encoder_blocks(torch.nn.Linear(2, 2)) == []
