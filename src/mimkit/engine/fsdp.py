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
    """The blocks FSDP wraps one by one: the model's `transformer_blocks()`, else its `blocks` list (a timm ViT
    classifier), else its backbone's; ConfigError for a model that lists none (checked before any work)."""
    blocks = list(model.transformer_blocks()) if hasattr(model, "transformer_blocks") else []
    if not blocks:
        for holder in (model, getattr(model, "backbone", None), getattr(model, "encoder", None)):
            found = getattr(holder, "blocks", None) if isinstance(holder, nn.Module) else None
            if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found):
                blocks = list(found)
                break
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


def deferred_init(strategy: str, world_size: int):
    """An InitRecorder when --strategy fsdp runs over several processes (the model is then built on the meta
    device under it, see `building`), else None (an ordinary build on CPU)."""
    from mimkit.engine.meta_init import InitRecorder

    return InitRecorder() if strategy == "fsdp" and world_size > 1 else None


def building(recorder) -> contextlib.AbstractContextManager:
    """The context a model is built in: on meta and recorded under FSDP (`deferred_init`), else as it is."""
    if recorder is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(recorder)
    stack.enter_context(torch.device("meta"))
    return stack


def place_model(model: nn.Module, recorder, device: torch.device, amp: str, strategy: str, world_size: int,
                log, model_name: str = "this model", weights_needed: bool = True) -> None:
    """Put a built model where training runs: on `device` (DDP, one process), or sharded over the ranks and
    materialised shard by shard when it was built under `recorder`; `log` receives the line saying which."""
    from mimkit.engine.memory import fmt_bytes

    if recorder is None:
        model.to(device)
        if strategy == "fsdp":
            log("--strategy fsdp in a single process shards nothing: the whole model stays on this process")
        return
    peak = shard_deferred(model, recorder, device, amp, world_size, model_name, weights_needed)
    log(f"FSDP2: {len(shardable_blocks(model, model_name))} blocks and the root sharded over {world_size} ranks"
        + (" (bf16 parameters, fp32 gradient reduction)" if amp == "bf16" else "")
        + f"; built on the meta device, materialised shard by shard (at most {fmt_bytes(peak)} held in full)")


def shard_deferred(model: nn.Module, recorder, device: torch.device, amp: str, world_size: int,
                   model_name: str = "this model", weights_needed: bool = True) -> int:
    """Shard a model built on the meta device under `recorder` (an engine.meta_init.InitRecorder), then
    materialise it shard by shard: each rank holds its rows, never the whole model -> peak bytes held in full.

    The weights are bitwise those of a normal build with the same seed (the build's ops replayed in order).
    weights_needed=False (a sharded checkpoint fills weights and optimiser next): only buffers are replayed."""
    from mimkit.engine.meta_init import meta_tensors

    metas = meta_tensors(model)
    shard_model(model, device, amp, world_size, model_name)
    model.to_empty(device=device)
    lives = meta_tensors(model)
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    pairs = [(m, lives[n]) for n, m in metas.items() if weights_needed or n in buffers]
    return recorder.materialise(pairs, device, draws=weights_needed)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's broadcast_buffers does before a forward:
    FSDP2 leaves buffers alone, so ranks would drift apart and a sharded checkpoint (one copy of each buffer, from
    whichever rank DCP picks) would not resume bitwise."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reduce-scatter (FSDP2's counterpart of DDP's no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_ (2-norm over every gradient, scaled by max_norm / (norm + 1e-6) when above) whose
    norm is the same fp32 number under DDP, FSDP and one process -> the norm before clipping.

    Squares are summed in fp64 per tensor (under FSDP its local shard, the partial sums then all-reduced): the
    order the pieces are added in moves the fp64 sum by ~1e-16 and leaves the fp32 norm as it is. (clip_grad_norm_
    on DTensors adds shard norms in another order than on whole tensors: a clip coefficient one ulp apart, which
    AdamW turns into 1e-6 differences in the key biases, whose gradient is rounding noise.)
    """
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = local = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        part = g.to_local() if hasattr(g, "to_local") else g
        sq = part.detach().double().pow(2).sum()
        if hasattr(g, "to_local"):
            sharded = sharded + sq
        else:
            local = local + sq
    if any(hasattr(g, "to_local") for g in grads) and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sharded)  # FSDP: every rank's part of every sharded gradient
    norm = torch.sqrt(sharded + local).float()
    coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    with torch.no_grad():
        for g in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef)
    return float(norm)


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


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Read a full (non-sharded) checkpoint -- one written on one process or under DDP -- into a sharded model
    and its optimiser: every rank holds the whole checkpoint and keeps its own rows of each tensor.

    `optim_sd` is torch's `optimizer.state_dict()` (parameters numbered in param_groups order); DCP's loader
    wants parameter names, so the numbers are mapped to this model's names through the optimiser's own groups.
    Raises CheckpointError naming what does not fit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, model_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint does not fit this model: {first[:300]}") from None
    if not optim_sd:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    groups, saved_groups = optimizer.param_groups, optim_sd.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                               for g, s in zip(groups, saved_groups)):
        raise CheckpointError("optimizer state does not fit this run: the checkpoint's parameter groups "
                              f"({[len(s['params']) for s in saved_groups]} parameters) are not this run's "
                              f"({[len(g['params']) for g in groups]})")
    by_name: dict = {"state": {}, "param_groups": []}
    for g, s in zip(groups, saved_groups):
        fqns = [names[id(p)] for p in g["params"]]
        for idx, fqn in zip(s["params"], fqns):
            if idx in optim_sd.get("state", {}):
                by_name["state"][fqn] = optim_sd["state"][idx]
        by_name["param_groups"].append({**s, "params": fqns})
    set_optimizer_state_dict(model, optimizer, by_name, options=opts)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's weights on CPU on rank 0 (a collective; empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
