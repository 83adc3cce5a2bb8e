"""Memory before the work: what the model's state costs per rank (DDP vs FSDP), the measured peak, and the
one line an out-of-memory error becomes.

Small pure functions, reusable by any command that wants an estimate before it starts:

    state_bytes(model, "adamw", "fsdp", world_size=8)   # {'params', 'trainable', 'weights', 'grads', 'optimizer', 'total'}
    peak_bytes(torch.device("cuda"))                   # max_memory_allocated; peak RSS on CPU
    oom_advice(batch_size=64, accum_iter=1, world_size=8, strategy="ddp", grad_checkpointing=False)
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch
import torch.nn as nn

# fp32 values the optimiser keeps per trainable parameter (AdamW: exp_avg and exp_avg_sq)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "lars": 1, "none": 0}


def optimizer_states(optimizer_kind: str) -> int:
    """fp32 values of optimiser state per trainable parameter for an optimiser name ('AdamW (fused)' -> 2)."""
    name = optimizer_kind.split()[0].lower() if optimizer_kind else "none"
    return OPTIMIZER_STATES.get(name, 2)


def state_bytes(model: nn.Module, optimizer_kind: str = "adamw", strategy: str = "ddp", world_size: int = 1,
                param_bytes: int = 4) -> dict[str, int]:
    """Bytes per rank of the model's weights, gradients and optimiser state (fp32 master weights).

    DDP: every rank holds all of them; FSDP: each rank holds 1/world_size of each (parameters are sharded on
    dim 0, padded to a multiple of world_size). Activations are not included: they depend on the batch and are
    what --grad_checkpointing cuts. Works on a meta-device model (nothing is allocated).
    """
    shards = max(1, world_size) if strategy == "fsdp" else 1
    params = trainable = weights = grads = 0
    for p in model.parameters():
        n = p.numel()
        rows = p.shape[0] if p.dim() else 1
        local = n if shards == 1 else -(-rows // shards) * (n // max(rows, 1))  # dim-0 shard, rounded up
        params += n
        weights += local
        if p.requires_grad:
            trainable += n
            grads += local
    k = optimizer_states(optimizer_kind)
    out = {"params": params, "trainable": trainable, "weights": weights * param_bytes, "grads": grads * param_bytes,
           "optimizer": k * grads * 4}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


def peak_bytes(device: torch.device) -> Optional[int]:
    """The peak memory so far: CUDA max_memory_allocated on a GPU, this process's peak RSS on a CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; GiB and MiB as nvidia-smi counts them."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: int) -> str:
    """1_037_577_676 -> '1.04B'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def memory_line(model: nn.Module, optimizer_kind: str, strategy: str, world_size: int) -> str:
    """The start-up line: parameters, and weights + gradients + optimiser state per rank under DDP and FSDP."""
    ddp = state_bytes(model, optimizer_kind, "ddp", world_size)
    fsdp = state_bytes(model, optimizer_kind, "fsdp", world_size)
    used = fsdp if strategy == "fsdp" else ddp
    other = ddp if strategy == "fsdp" else fsdp
    name = optimizer_kind.split()[0] if optimizer_kind else "optimiser"
    line = (f"memory: {fmt_count(ddp['params'])} parameters ({fmt_count(ddp['trainable'])} trainable); per rank "
            f"under {strategy} over {world_size}: weights {fmt_bytes(used['weights'])} + gradients "
            f"{fmt_bytes(used['grads'])} + {name} state {fmt_bytes(used['optimizer'])} = {fmt_bytes(used['total'])}")
    if world_size > 1:
        line += f" ({'ddp' if strategy == 'fsdp' else 'fsdp'}: {fmt_bytes(other['total'])})"
    return line + ", activations not included"


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error (CUDA's, or a CPU allocation failure)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def oom_advice(batch_size: int, accum_iter: int, world_size: int, strategy: str, grad_checkpointing) -> str:
    """The switches that cut memory, each with the flags that keep the effective batch."""
    tips = []
    if grad_checkpointing is not True:
        tips.append("--grad_checkpointing (recompute block activations)")
    if strategy != "fsdp" and world_size > 1:
        tips.append("--strategy fsdp (shard weights, gradients and optimiser state over the ranks)")
    elif strategy != "fsdp":
        tips.append("--strategy fsdp under torchrun on several GPUs (shards the model's state)")
    if batch_size > 1:
        half = batch_size // 2
        accum = accum_iter * batch_size // half if batch_size % half == 0 else None
        if accum is not None:
            tips.append(f"--batch_size {half} --accum_iter {accum} (the same effective batch "
                        f"{batch_size * accum_iter * world_size})")
    return "; ".join(tips) if tips else "a smaller model or input size"
