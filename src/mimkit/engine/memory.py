"""Memory, the one estimator: what the model's state costs per rank (DDP vs FSDP), the activations of a step
traced on the meta device, the whole peak against what the machine has, the measured peak, and the one line an
out-of-memory error becomes.

Reusable by any command that wants an estimate before it starts (the model is never run for real):

    state_bytes(model, "adamw", "fsdp", world_size=8)   # {'params', 'trainable', 'weights', 'grads', 'optimizer',
                                                        #  'total'}
    traced_peak(model, lambda m: m(torch.empty(2, 3, 512, 512, device="meta")).sum())   # activations + temporaries
    estimate(model, "adamw", activations, device="cpu").line()    # 'estimated peak memory 3.1 GB (...) of 20.9 GB free'
    peak_bytes(torch.device("cuda"))                   # max_memory_allocated; peak RSS on CPU
    oom_advice(batch_size=64, accum_iter=1, world_size=8, strategy="ddp", grad_checkpointing=False)
"""

from __future__ import annotations

import os
import resource
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

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


# ------------------------------------------------------------------ activations, traced on the meta device
# measured peak RSS growth of a step / traced_peak: 0.6-1.5 over the calibration table in docs/benchmarks.md
# ("Memory told before the work", benchmarks/memory_estimate.py); the largest (convolutions' workspaces, and the
# allocator's fixed cost on the smallest rows), so a refusal errs toward "does not fit"
CALIBRATION = 1.5


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an op allocates (not views, not in-place results) until it is freed; the
    highest count is the peak of activations and temporaries."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:  # a fresh allocation, not a view of one
                n = t.untyped_storage().nbytes()
                self.live += n
                weakref.finalize(t, self._free, n)
        self.peak = max(self.peak, self.live)
        return out


def traced_peak(model: nn.Module, run: Callable[[nn.Module], Any], backward: bool = True) -> int:
    """Peak bytes of activations and temporaries of `run(model)` (and the backward of its result when `backward`),
    traced with the model's parameters and buffers swapped for meta tensors: shapes only, nothing allocated, the
    model's own tensors untouched. `run` makes its inputs on the meta device, e.g. torch.empty(N, 3, H, W,
    device="meta"), and returns a tensor (summed before backward). Counted in the parameters' dtypes (fp32: AMP
    needs less). Weights, gradients and optimiser state are not included (see state_bytes)."""
    swapped = []
    try:
        for mod in model.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(mod, kind)
                for name, t in list(table.items()):
                    if t is None or t.device.type == "meta":
                        continue
                    swapped.append((table, name, t))
                    meta = torch.empty_like(t, device="meta")
                    table[name] = nn.Parameter(meta, t.requires_grad) if kind == "_parameters" else meta
        mode = _LiveBytes()
        with mode, torch.enable_grad() if backward else torch.no_grad():
            out = run(model)
            if backward:
                out = out if out.dim() == 0 else out.sum()
                if out.requires_grad:
                    out.backward()
        return int(mode.peak)
    finally:
        for table, name, t in swapped:
            table[name] = t


def available_bytes(device: str = "cpu") -> Optional[int]:
    """Memory this run may use: the GPU's total memory, else MemAvailable (Linux), else None (unknown)."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_available():
            _, total = torch.cuda.mem_get_info(torch.device(device) if ":" in str(device) else None)
            return int(total)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


@dataclass
class Footprint:
    """An estimate of a run's peak and its parts (bytes per process), for the start-up line and the refusal."""

    weights: int
    optimizer: int  # gradients + optimiser state
    activations: int  # the larger of a training step's and an evaluation pass's, calibrated
    available: Optional[int]

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        """True when the peak fits in 90 % of the machine's memory (or nothing is known about the machine)."""
        return self.available is None or self.peak <= 0.9 * self.available

    def line(self) -> str:
        """'estimated peak memory 22.8 GiB (weights 248.6 MiB, gradients + optimiser 745.6 MiB, activations
        21.8 GiB) of 19.6 GiB free'"""
        free = f" of {fmt_bytes(self.available)} free" if self.available is not None else ""
        return (f"estimated peak memory {fmt_bytes(self.peak)} (weights {fmt_bytes(self.weights)}, gradients + "
                f"optimiser {fmt_bytes(self.optimizer)}, activations {fmt_bytes(self.activations)}){free}")


def estimate(model: nn.Module, optimizer_kind: str, activations: int, device: str = "cpu", strategy: str = "ddp",
             world_size: int = 1) -> Footprint:
    """The Footprint of a run: state_bytes of `model` under `optimizer_kind` plus `activations` (traced_peak's
    bytes, multiplied here by CALIBRATION) against what `device` has."""
    st = state_bytes(model, optimizer_kind, strategy, world_size)
    return Footprint(st["weights"], st["grads"] + st["optimizer"], int(activations * CALIBRATION),
                     available_bytes(device))


def gb(n: Optional[float]) -> str:
    """Bytes as '1.2 GB'."""
    return "?" if n is None else f"{n / 1e9:.1f} GB"
