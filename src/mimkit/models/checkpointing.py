"""Activation checkpointing of transformer blocks (timm's `set_grad_checkpointing` name).

A checkpointed block keeps only its input in forward and recomputes its activations in backward
(`torch.utils.checkpoint`, non-reentrant, RNG state preserved so drop path draws the same masks): on CPU in fp32
the losses and every gradient are bitwise those of the run without it.

The block's class is swapped for a subclass whose `forward` runs under checkpoint, so parameter names and state
dicts are unchanged (FSDP2's `fully_shard` swaps classes the same way and composes with it). A block that runs
without autograd (no_grad, a frozen prefix) or whose parameters and input need no gradient holds no activations:
it runs as it is.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

GradCheckpointing = Union[bool, int]
_CLASSES: dict[type, type] = {}


class _CheckpointedForward:
    """Mixin placed before a block's own class: forward under torch.utils.checkpoint when it would save anything."""

    def forward(self, *args, **kwargs):  # noqa: D401  (the block's own forward, recomputed in backward)
        run = super().forward  # type: ignore[misc]
        if needs_saving(self, args):
            return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        return run(*args, **kwargs)


def needs_saving(module: nn.Module, args: Sequence) -> bool:
    """Whether running `module` on `args` would save activations for backward."""
    if not torch.is_grad_enabled():
        return False
    if any(torch.is_tensor(a) and a.requires_grad for a in args):
        return True
    return any(p.requires_grad for p in module.parameters())


def _checkpointed_class(cls: type) -> type:
    if issubclass(cls, _CheckpointedForward):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {"_plain_class": cls})
    return _CLASSES[cls]


def is_checkpointed(block: nn.Module) -> bool:
    """Whether `block` runs under activation checkpointing."""
    return isinstance(block, _CheckpointedForward)


def checkpoint_blocks(blocks: Iterable[nn.Module], n: GradCheckpointing) -> int:
    """Checkpoint the first `n` of `blocks` (True = all, False / 0 = none), plain again for the rest -> count."""
    blocks = list(blocks)
    count = len(blocks) if n is True else (0 if n is False or n is None else max(0, min(int(n), len(blocks))))
    for i, blk in enumerate(blocks):
        if i < count:
            blk.__class__ = _checkpointed_class(type(blk))
        elif is_checkpointed(blk):
            blk.__class__ = _plain(type(blk))
    return count


def _plain(cls: type) -> type:
    """The class under the checkpointing mixin (also below a class FSDP derived from it)."""
    for base in cls.__mro__:
        if "_plain_class" in base.__dict__:
            plain = base.__dict__["_plain_class"]
            if base is cls:
                return plain
            # FSDP made FSDP<Checkpointed...> from it: rebuild the same derivation over the plain class
            extra = tuple(b for b in cls.__bases__ if b is not base)
            return type(cls.__name__, (*extra, plain), {})
    return cls


def parse_grad_checkpointing(value) -> GradCheckpointing:
    """A config / flag value -> False, True or a positive block count; ValueError when it is none of them."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value if value else False
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "all"):
        return True
    if text in ("false", "no", "off", "none", "0"):
        return False
    if text.isdigit():
        return int(text)
    raise ValueError(value)


def find_blocks(model: nn.Module, encoder_only: bool = False) -> list[nn.Module]:
    """The transformer blocks of `model`: its `transformer_blocks()` (encoder and decoder; skipped with
    encoder_only), else its `blocks` list, else the same walk into its `backbone` / `encoder`."""
    if not encoder_only and hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
        return list(blocks)
    for name in ("backbone", "encoder"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            found = find_blocks(inner, encoder_only)
            if found:
                return found
    return []


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's blocks alone (`blocks`, or a backbone's / encoder's)."""
    return find_blocks(model, encoder_only=True)


def apply_grad_checkpointing(model: nn.Module, value: GradCheckpointing, model_name: str = "this model") -> int:
    """model.grad_checkpointing on any model: the model's own `set_grad_checkpointing` (MAE, LocalMIM: encoder and
    decoder), else the first N / all encoder blocks -> blocks checkpointed; UserError for a model without blocks."""
    from mimkit.errors import UserError

    value = parse_grad_checkpointing(value)
    if value is False:
        return 0
    blocks = encoder_blocks(model)
    if not blocks:
        raise UserError(f"--grad_checkpointing: {model_name} has no transformer blocks to recompute "
                        "(it applies to ViT models); leave the flag out")
    own = getattr(model, "set_grad_checkpointing", None)
    if own is not None and hasattr(model, "transformer_blocks"):
        return own(value)
    return checkpoint_blocks(blocks, value)


def grad_checkpointing_line(model: nn.Module, value: GradCheckpointing, count: int) -> str | None:
    """The start-up line for `count` checkpointed blocks (None when none); an N above the encoder's depth is
    said, not silently cut: like a slice, N >= depth means every encoder block (a preset's N stays usable on a
    shallower checkpoint), and the line names the depth so a typo shows."""
    if not count:
        return None
    value = parse_grad_checkpointing(value)
    depth = len(encoder_blocks(model))
    note = ""
    if value is not True and int(value) > depth:
        note = f"; --grad_checkpointing {int(value)} asks for more than the encoder's {depth} blocks: all {depth}"
    return (f"activation checkpointing: {count} block(s) recompute their activations in backward (frozen blocks "
            f"are skipped){note}")
