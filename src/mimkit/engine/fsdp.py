"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for --strategy fsdp: sharding, sharded checkpoints, final.pt.

    torchrun --nproc_per_node 8 -m mimkit pretrain --model mae_vit_huge_patch14 --strategy fsdp --data_path /imagenet

Each transformer block is one FSDP unit (the model lists them with `transformer_blocks()`: the engine imports no
model), the root holds the rest. Under --amp bf16 parameters are all-gathered in bf16 and gradients reduced in
fp32 (MixedPrecisionPolicy). Checkpoints are `torch.distributed.checkpoint` folders, each rank writing its own
shard; they load on any number of processes, under FSDP or DDP or one process. final.pt holds the full weights
(gathered to rank 0), so every other command reads it as any mimkit checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from mimkit.errors import CheckpointError, ConfigError

SHARD_DIR = "sharded"


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` went through fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shardable_blocks(model: nn.Module, model_name: str = "this model") -> list[nn.Module]:
    """The blocks FSDP wraps one by one; ConfigError for a model that lists none (checked before any work)."""
    blocks = list(model.transformer_blocks()) if hasattr(model, "transformer_blocks") else []
    if not blocks:
        raise ConfigError(f"--strategy fsdp: {model_name} lists no transformer blocks to shard one by one "
                          "(FSDP wraps MAE-family models); use --strategy ddp")
    return blocks


def shard_model(model: nn.Module, device: torch.device, amp: str, world_size: int,
                model_name: str = "this model") -> nn.Module:
    """fully_shard each block, then the root, over all ranks (in place) -> the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = shardable_blocks(model, model_name)
    if amp == "fp16":
        raise ConfigError("--strategy fsdp with --amp fp16: use --amp bf16 (bf16 parameters, fp32 gradient "
                          "reduction) or --amp off")
    mesh = init_device_mesh(device.type, (world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp == "bf16"
          else MixedPrecisionPolicy())
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reduce-scatter (FSDP2's counterpart of DDP's no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_norm(norm: torch.Tensor) -> float:
    """A clip_grad_norm_ result as a float (a DTensor under FSDP: its full value)."""
    full = getattr(norm, "full_tensor", None)
    return float((full() if full is not None else norm).item())


# ---------------------------------------------------------------------------------------------- checkpoints
def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> list[str]:
    """Every rank writes its shard of the model and optimiser state into `folder` (a collective) -> file names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(folder))
    return sorted(p.name for p in folder.iterdir())


def shard_folder(ckpt: dict, path: Optional[str | Path], ckpt_dir: Optional[Path]) -> Path:
    """The folder of a sharded checkpoint's shards, checked: CheckpointError naming a missing rank's file."""
    info = ckpt["sharded"]
    name = info["folder"]
    roots = []
    if path is not None:
        p = Path(path)
        roots += [p.parent, p.parent.parent, p] if p.suffix == ".pt" else [p.parent, p]
    if ckpt_dir is not None:
        roots.append(Path(ckpt_dir))
    found = next((r / name / SHARD_DIR for r in roots if (r / name / SHARD_DIR).is_dir()), None)
    if found is None and path is not None and (Path(path).parent / SHARD_DIR).is_dir():
        found = Path(path).parent / SHARD_DIR
    if found is None:
        raise CheckpointError(f"the sharded checkpoint {name}/ is missing its {SHARD_DIR}/ folder next to "
                              f"{path or ckpt_dir}; copy the whole checkpoint folder")
    missing = [f for f in info.get("files", []) if not (found / f).exists()]
    if missing:
        raise CheckpointError(f"sharded checkpoint {found} is missing {', '.join(missing)} (written by "
                              f"{info.get('world_size', '?')} ranks, one file each); copy the whole folder or "
                              "resume from an earlier checkpoint")
    return found


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read a sharded checkpoint into `model` and `optimizer` on any number of processes (FSDP, DDP or one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(folder))
    except Exception as e:  # a torn or foreign folder: one line, not DCP's traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the sharded checkpoint {folder}: {first[:300]}") from None
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's weights on CPU on rank 0 (a collective; empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
