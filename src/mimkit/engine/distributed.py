"""torchrun / DDP helpers: init from the environment, rank-0 helpers, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mimkit.errors import UserError


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:local_rank when available, else cpu; a CUDA device without CUDA is a UserError."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"bad value for 'misc.device': '{name}' (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"misc.device is '{name}' but no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    """Wait for every rank (no-op when single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float over ranks (no-op when single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank, so all ranks take the same branch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_int(value: int, device: torch.device) -> int:
    """The largest of an int over ranks (a stop request: 0 = none, else the signal number)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def keep_effective_batch(old: tuple[int, int, int], batch: int, accum: int, world: int,
                         accum_given: bool = False) -> tuple[int, Optional[str]]:
    """Resuming on another number of processes: the accum_iter that keeps the checkpoint's effective batch.

    `old`: the checkpoint's (batch, accum_iter, world size). Returns (accum_iter, a log line or None); a ConfigError
    naming a --batch_size / --accum_iter that keeps it when this batch size cannot (or `accum_given` asks otherwise).
    """
    from mimkit.errors import ConfigError

    ob, oa, ow = old
    eff = ob * oa * ow
    if batch * accum * world == eff:
        if world == ow:
            return accum, None
        return accum, (f"world size {ow} -> {world}: batch {batch} x accum_iter {accum} x {world} keeps the "
                       f"effective batch {eff}")
    if world == ow:
        return accum, None  # the same world size: a changed batch is the user's choice (the lr follows it)
    if not accum_given and eff % (batch * world) == 0:
        new = eff // (batch * world)
        return new, (f"world size {ow} -> {world}: accum_iter {accum} -> {new} keeps the effective batch {eff} "
                     f"(batch {batch} x accum_iter {new} x {world})")
    options = [(b, eff // (b * world)) for b in range(batch, 0, -1) if eff % (b * world) == 0]
    fix = (f"--batch_size {options[0][0]} --accum_iter {options[0][1]}" if options
           else f"a number of processes that divides {eff}")
    raise ConfigError(
        f"resuming on {world} process(es): batch {batch} x accum_iter {accum} x {world} = {batch * accum * world} "
        f"is not the checkpoint's effective batch {eff} (batch {ob} x accum_iter {oa} x {ow}); use {fix}, or "
        "--no_auto_resume to start over")
