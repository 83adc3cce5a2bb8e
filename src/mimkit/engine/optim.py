"""Optimiser parameter groups and learning-rate schedules (the official MAE recipe)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names exempt from weight decay besides biases and 1-D params: tokens and position embeddings."""
    declared = set(getattr(model, "no_weight_decay", lambda: set())())
    tokens = {n for n, _ in model.named_parameters() if n.endswith(("_token", "pos_embed"))}
    return declared | tokens


def param_groups(model: nn.Module, weight_decay: float, extra_groups: Iterable[dict] = ()) -> list[dict]:
    """Two AdamW groups, decay and no-decay (biases, norms, tokens); frozen parameters are left out.

    Each group carries `lr_scale` (1.0) and `names`, so schedules and logs can address them.
    """
    skip = no_weight_decay_names(model)
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if (p.ndim <= 1 or name.endswith(".bias") or name in skip) else decay
        group["params"].append(p)
        group["names"].append(name)
    groups = [
        {**no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "group": "no_decay"},
        {**decay, "weight_decay": weight_decay, "lr_scale": 1.0, "group": "decay"},
    ]
    return [g for g in groups if g["params"]] + list(extra_groups)


def fused_supported(device: torch.device) -> bool:
    """Whether the installed torch has a fused AdamW kernel for this device type (CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: CUDA only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `groups` (unchanged); the fused kernel wherever torch has one (`fused=None`), else for-each.

    The fused kernel reads fp32 parameters and keeps its moments in fp32, as the unfused one does; updates
    agree within float rounding (tests/test_precision.py).
    """
    if fused is None:
        fused = fused_supported(device)
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):  # a parameter type or device the kernel does not take
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """'AdamW (fused)' / 'AdamW (unfused)': which kernel the start-up line reports."""
    return f"{type(optimizer).__name__} ({'fused' if optimizer.defaults.get('fused') else 'unfused'})"


def scaled_lr(base_lr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """The linear scaling rule: lr = blr * (batch * accum_iter * world_size) / 256."""
    return base_lr * batch_size * accum_iter * world_size / 256


def warmup_cosine(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Per-iteration schedule of the official code: linear warmup, then half-cosine to min_lr.

    `epoch` is fractional (epoch + iteration / iterations_per_epoch).
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write lr * group['lr_scale'] into every param group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
