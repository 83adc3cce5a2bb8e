"""Peak activation memory and step time with and without --grad_checkpointing; model state per rank, DDP vs FSDP.

    python benchmarks/memory.py --output_dir runs/memory                                  # the defaults below
    python benchmarks/memory.py --models mae_vit_base_patch16 --batch_size 16 --skip_dist # checkpointing only
    python benchmarks/memory.py --tiny --output_dir /tmp/memory                           # seconds, a smoke run

1. Checkpointing: one MAE pretraining step (mask 0.75, fp32, AdamW) per model at --input_size px, batch
   --batch_size, each configuration in a fresh process. Peak activation memory = the peak during forward + backward
   above the memory held just before it (weights, gradients and optimiser state already allocated): on CUDA
   max_memory_allocated - memory_allocated; on a CPU the process's peak RSS - its RSS before the step (the peak RSS
   cannot be reset, hence one process per row). Step time: the median of --steps steps after that one.
2. DDP vs FSDP: 2 gloo processes on a CPU (NCCL on GPUs when --device cuda and 2 GPUs are at hand) build the model,
   wrap it (DDP, or FSDP2 fully_shard per block), take --steps steps; each rank sums the bytes its weights,
   gradients and AdamW state actually hold (local shards under FSDP), beside engine.memory.state_bytes' estimate.

Writes <output_dir>/memory.json and memory.md. Timings from a loaded or shared machine are only comparable within
one run (ratios), which is what the table reports beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, decoder_embed_dim=32, decoder_depth=2,
            decoder_num_heads=2)


def rss_now() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(name: str, tiny: bool, size: int):
    from mimkit.models import create_model

    torch.manual_seed(0)
    return create_model(name, **(TINY if tiny else {"img_size": size}))


def one_row(name: str, ckpt: bool, batch: int, size: int, steps: int, device: str, tiny: bool) -> dict:
    """Runs in its own process: activation peak of the first step, then the median step time."""
    from mimkit.engine.optim import build_adamw, param_groups
    from mimkit.models.checkpointing import apply_grad_checkpointing

    dev = torch.device(device)
    model = build(name, tiny, size).to(dev).train()
    n_ckpt = apply_grad_checkpointing(model, True, name) if ckpt else 0
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), dev)
    for p in model.parameters():  # gradients and optimiser state held before the measured step, as in training
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    g = torch.Generator().manual_seed(0)
    px = TINY["img_size"] if tiny else size
    imgs = torch.randn(batch, 3, px, px, generator=g).to(dev)

    def step():
        loss = model(imgs, mask_ratio=0.75)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        act = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_now()
        step()
        act = max(0, rss_peak() - base)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"model": name, "grad_checkpointing": ckpt, "blocks_checkpointed": n_ckpt, "batch": batch,
            "input_size": px, "activation_bytes": act, "step_s": statistics.median(times) if times else None}


def dist_row(name: str, strategy: str, batch: int, size: int, steps: int, tiny: bool) -> None:
    """Runs under torchrun: each rank's measured weights + gradients + AdamW state; rank 0 prints JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mimkit.engine.fsdp import shard_model
    from mimkit.engine.memory import state_bytes
    from mimkit.engine.optim import build_adamw, param_groups

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cpu")
    model = build(name, tiny, size).train()
    estimate = state_bytes(model, "adamw", strategy, world)["total"]
    if strategy == "fsdp":
        shard_model(model, dev, "off", world, name)
        wrapped = model
    else:
        wrapped = DDP(model)
    opt = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), dev)
    px = TINY["img_size"] if tiny else size
    imgs = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        wrapped(imgs, mask_ratio=0.75)[0].backward()
        opt.step()
        times.append(time.perf_counter() - t)

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    weights = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    out = [None] * world
    dist.all_gather_object(out, {"weights": weights, "grads": grads, "optimizer": states})
    if rank == 0:
        row = {"model": name, "strategy": strategy, "world_size": world, "batch_per_rank": batch,
               "per_rank": out, "total_bytes": max(r["weights"] + r["grads"] + r["optimizer"] for r in out),
               "estimate_bytes": estimate, "step_s": statistics.median(times[1:])}
        print("ROW " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def run_child(args: list[str], nproc: int = 1) -> dict:
    pre = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([*pre, __file__, *args], capture_output=True, text=True, env=env)
    rows = [line[4:] for line in r.stdout.splitlines() if line.startswith("ROW ")]
    if r.returncode or not rows:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(rows[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def write(out: Path, result: dict) -> None:
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    lines = [f"machine: {result['machine']}", "", "| model | batch | checkpointing | activation peak MiB | "
             "vs off | step s | vs off |", "|---|---|---|---|---|---|---|"]
    ck = result["checkpointing"]
    for r in ck:
        off = next(o for o in ck if o["model"] == r["model"] and not o["grad_checkpointing"])
        lines.append(f"| {r['model']} | {r['batch']} | {'on (' + str(r['blocks_checkpointed']) + ' blocks)' if r['grad_checkpointing'] else 'off'} "
                     f"| {mib(r['activation_bytes'])} | {r['activation_bytes'] / max(off['activation_bytes'], 1):.2f} "
                     f"| {r['step_s']:.3f} | {r['step_s'] / off['step_s']:.2f} |")
    if result["strategies"]:
        lines += ["", "| model | strategy | ranks | weights+grads+AdamW per rank MiB (measured) | estimate MiB | "
                  "vs ddp | step s |", "|---|---|---|---|---|---|---|"]
        for r in result["strategies"]:
            ddp = next(o for o in result["strategies"] if o["model"] == r["model"] and o["strategy"] == "ddp")
            lines.append(f"| {r['model']} | {r['strategy']} | {r['world_size']} | {mib(r['total_bytes'])} | "
                         f"{mib(r['estimate_bytes'])} | {r['total_bytes'] / ddp['total_bytes']:.2f} | "
                         f"{r['step_s']:.3f} |")
    (out / "memory.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dist_batch_size", type=int, default=2, help="per-rank batch of the DDP vs FSDP rows")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip_dist", action="store_true", help="no DDP vs FSDP rows")
    p.add_argument("--tiny", action="store_true", help="tiny model, 32 px: a smoke run in seconds")
    p.add_argument("--output_dir", default="runs/memory")
    p.add_argument("--_row", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_dist", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._row:
        row = one_row(a._row[0], a._row[1] == "on", a.batch_size, a.input_size, a.steps, a.device, a.tiny)
        print("ROW " + json.dumps(row), flush=True)
        return
    if a._dist:
        dist_row(a._dist[0], a._dist[1], a.dist_batch_size, a.input_size, a.steps, a.tiny)
        return
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--batch_size", str(a.batch_size), "--dist_batch_size", str(a.dist_batch_size), "--input_size",
              str(a.input_size), "--steps", str(a.steps), "--device", a.device] + (["--tiny"] if a.tiny else [])
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch "
               f"{torch.__version__}" + (f", {torch.cuda.get_device_name()}" if a.device.startswith("cuda") else ""))
    result = {"machine": machine, "command": " ".join(sys.argv), "checkpointing": [], "strategies": []}
    for name in a.models.split(","):
        for mode in ("off", "on"):
            result["checkpointing"].append(run_child(["--_row", name, mode, *common]))
            write(out, result)
        if not a.skip_dist:
            for strategy in ("ddp", "fsdp"):
                result["strategies"].append(run_child(["--_dist", name, strategy, *common], nproc=2))
                write(out, result)
    print((out / "memory.md").read_text())


if __name__ == "__main__":
    main()
