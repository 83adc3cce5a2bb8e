"""GPU benchmark suite: ViT-B/16 MAE training step, end-to-end data paths, FreezeOut saving; JSON + markdown.

One script for the first GPU at hand (one device, no network; sized for at most 8 minutes on an H100/H200-class
GPU, not yet run on one), and a tiny CPU run in CI so it cannot rot (tests/test_gpu_suite.py):

    python benchmarks/gpu_suite.py --output_dir runs/gpu_suite                      # the GPU, full sizes
    python benchmarks/gpu_suite.py --tiny --device cpu --output_dir /tmp/gpu_suite  # CI smoke, tiny sizes

1. Training step, ViT-B/16 at 224 px, mask 0.75, batch --batch_size, fixed inputs (pretrain_throughput.Runner):
     mimkit bf16 autocast + fused AdamW; the same + torch.compile; the official recipe's fp16 autocast +
     GradScaler; Hugging Face ViTMAEForPreTraining of the same config and weights, same images and noise (bf16).
   images/s (median step), MFU (pretrain_throughput.flops_per_image over the data-sheet bf16 peak), peak memory
   (torch.cuda.max_memory_allocated, reset before each variant).
2. End to end, the real training loop (pretrain_throughput.time_loop), bf16, no compile: synthetic tensors in
   memory; a synthetic JPEG folder (pretrain_throughput.write_jpegs, 1.75 x input px) and the same images as
   WebDataset shards (mimkit.data.shards.write_shards), each with augmentation in --num_workers workers and with
   data.augment_on=device (on CUDA workers only read JPEG bytes; nvJPEG decodes, the crops resize on the GPU).
3. FreezeOut saving: the step time with k = 0..depth encoder blocks frozen (measured, as the FreezeOutHook
   freezes them), integrated over each schedule's freezing times; beside it the counted-FLOP saving
   (freezeout_speedup.cost_by_frozen) and the FreezeOut paper's estimate (freezeout_speedup.reference_estimate).
4. Memory (benchmarks/memory.py's rows): activation peak and step time of ViT-B and ViT-L with and without
   --grad_checkpointing, one process per row; the DDP vs FSDP rows need 2 processes (benchmarks/memory.py).

Writes <output_dir>/gpu_suite.json and gpu_suite.md after every section (a run cut short keeps what it measured);
a section that fails is recorded with its error and the next one runs; a section not started by --budget_s
seconds is skipped and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import freezeout_speedup as fo  # noqa: E402
import pretrain_throughput as pt  # noqa: E402

TINY_ARCH = ["--input_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
             "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2"]
FREEZEOUT_CONFIGS = ("linear:0.5", "cubic:0.8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="runs/gpu_suite", help="gpu_suite.json and gpu_suite.md go here")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (the GPU; exits when there is none)")
    p.add_argument("--model", default="mae_vit_base_patch16", help="a mimkit model name")
    p.add_argument("--batch_size", type=int, default=256, help="images per step (sections 1 and 3)")
    p.add_argument("--e2e_batch_size", type=int, default=128, help="images per step of the end-to-end runs")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (compile included)")
    p.add_argument("--e2e_steps", type=int, default=12, help="timed steps per end-to-end run")
    p.add_argument("--num_workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="DataLoader workers of the end-to-end runs")
    p.add_argument("--shard_size", type=int, default=256, help="images per shard (section 2)")
    p.add_argument("--tiny", action="store_true", help="CI smoke run: a 2-block 32 px model, a few steps, "
                   "no torch.compile")
    p.add_argument("--sections", nargs="+", default=["step", "e2e", "freezeout", "memory"],
                   choices=("step", "e2e", "freezeout", "memory"), help="what to run")
    p.add_argument("--memory_batch_size", type=int, default=64, help="images per step of the memory rows (4)")
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="start no further section after this many seconds (each section takes 1-3 minutes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.batch_size, args.e2e_batch_size = "mae_vit_tiny_patch16", 4, 4
        args.steps, args.warmup, args.e2e_steps = 2, 1, 2
        args.num_workers, args.shard_size, args.memory_batch_size = 1, 5, 4
    return args


def bench_args(args, device: torch.device, batch: int, steps: int, amp: str = "bf16", compile_: bool = False):
    """A pretrain_throughput argument namespace for this suite's sizes."""
    argv = ["--model", args.model, "--batch_size", str(batch), "--steps", str(steps), "--warmup",
            str(args.warmup), "--device", str(device), "--amp", amp, "--seed", str(args.seed), "--no_memory"]
    argv += TINY_ARCH if args.tiny else ["--input_size", "224"]
    argv += ["--compile"] if compile_ else []
    return pt.parse_args(argv)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_steps(runner, warmup: int, steps: int) -> list[float]:
    return [t for i, t in enumerate(runner.step() for _ in range(warmup + steps)) if i >= warmup]


# ---------------------------------------------------------------------------------------------- 1. step
def step_section(args, device: torch.device) -> list[dict]:
    """Images/s, MFU and peak memory of each training-step variant (same weights, images, noise)."""
    variants = [("mimkit, bf16 + fused AdamW", "ours", "bf16", False),
                ("mimkit, bf16 + fused AdamW + torch.compile", "ours", "bf16", True),
                ("mimkit, official recipe's fp16 AMP + GradScaler", "ours", "fp16", False),
                ("Hugging Face ViTMAEForPreTraining, bf16", "hf", "bf16", False)]
    base = bench_args(args, device, args.batch_size, args.steps)
    probe = pt.build_ours(base)
    flops = pt.flops_per_image(probe, base.mask_ratio)
    peak, peak_src = pt.peak_tflops(base, device)
    imgs, noise = pt.make_inputs(base, probe.num_patches, device)
    del probe
    rows = []
    for label, impl, amp, compile_ in variants:
        row = {"variant": label, "impl": impl, "amp": amp, "compile": compile_, "gflop_per_image": flops / 1e9,
               "peak_tflops_assumed": peak, "peak_source": peak_src}
        if compile_ and args.tiny:
            rows.append({**row, "skipped": "torch.compile is not run at --tiny sizes"})
            continue
        if amp == "fp16" and device.type != "cuda":  # fp16 autocast + GradScaler needs CUDA: say what ran instead
            row["amp"] = amp = "off"
            row["variant"] = label = "mimkit, fp32 (the official recipe's fp16 AMP + GradScaler needs CUDA)"
        a = bench_args(args, device, args.batch_size, args.steps, amp, compile_)
        reset_memory(device)
        try:
            model = pt.build_ours(a)
            if impl == "hf":
                model = pt.build_hf(a, model)
            runner = pt.Runner(impl, model, a, device, imgs, noise)
            times = time_steps(runner, args.warmup, args.steps)
        except Exception as e:  # e.g. a compile failure: the other variants still count
            traceback.print_exc()
            rows.append({**row, "skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        med = statistics.median(times)
        achieved = flops * args.batch_size / med / 1e12
        row.update(images_per_s=args.batch_size / med, step_s_median=med, step_s=times, first_loss=runner.first_loss,
                   achieved_tflops=achieved, mfu=achieved / peak if peak else None, peak_bytes=peak_memory(device))
        rows.append(row)
        print(f"[step] {label:52} {row['images_per_s']:10.1f} images/s", flush=True)
        del runner, model
    reset_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------- 2. end to end
def e2e_section(args, device: torch.device) -> dict:
    """The training loop on synthetic tensors, and on JPEGs / shards with worker or device augmentation."""
    from mimkit.data.sources import open_dataset
    from mimkit.data.device_augment import DeviceAugment, DeviceSamples, collate_device, device_step
    from mimkit.data.packing import write_shards
    from mimkit.data.transforms import mean_std, pretrain_transform

    amp = "bf16" if device.type == "cuda" else "off"
    a = bench_args(args, device, args.e2e_batch_size, args.e2e_steps, amp)
    n = a.batch_size * (max(1, a.warmup) + a.steps)
    px = round(a.input_size * 1.75)
    res: dict = {"images": n, "jpeg_px": px, "num_workers": args.num_workers, "amp": amp, "runs": []}
    with tempfile.TemporaryDirectory(prefix="mimkit_gpu_suite_") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        t0 = time.perf_counter()
        pt.write_jpegs(tmp / "jpeg", n, px)
        shards = write_shards(str(tmp / "jpeg"), tmp / "shards", args.shard_size)["train"]["pattern"]
        res["prepare_s"] = time.perf_counter() - t0
        augment = DeviceAugment((a.input_size, a.input_size), *mean_std(3))
        runs = [("synthetic tensors", "-", pt._Synthetic(n, a.input_size, args.seed), 0, {})]
        for source, spec in (("JPEG folder", str(tmp / "jpeg")), ("shards", shards)):
            runs.append((source, "workers", open_dataset(spec, "train", pretrain_transform(a.input_size)),
                         args.num_workers, {}))
            runs.append((source, "device", DeviceSamples(open_dataset(spec, "train", None),
                                                         jpeg_bytes=device.type == "cuda"), args.num_workers,
                         {"collate": collate_device, "wrap_step": lambda s: device_step(s, augment)}))
        for k, (source, aug_on, ds, workers, extra) in enumerate(runs):
            times = pt.time_loop(a, device, ds, workers, tmp / f"run{k}", **extra)
            med = statistics.median(times)
            res["runs"].append({"data": source, "augment_on": aug_on, "num_workers": workers,
                                "images_per_s": a.batch_size / med, "step_s_median": med, "step_s": times})
            print(f"[e2e] {source:18} augment on {aug_on:8} {a.batch_size / med:10.1f} images/s", flush=True)
    synth = res["runs"][0]["images_per_s"]
    for r in res["runs"]:
        r["of_synthetic"] = r["images_per_s"] / synth
    return res


# ---------------------------------------------------------------------------------------------- 3. FreezeOut
def freezeout_section(args, device: torch.device) -> dict:
    """Measured step time by frozen-block count, integrated over FreezeOut schedules; counted and estimated."""
    from mimkit.engine.freezeout import FreezeOutHook, freeze_times

    amp = "bf16" if device.type == "cuda" else "off"
    a = bench_args(args, device, args.batch_size, args.steps, amp)
    reset_memory(device)
    model = pt.build_ours(a)
    depth = len(model.blocks)
    hook = FreezeOutHook(model, 0.5, "linear")  # only its block_of(): which block a parameter freezes with
    imgs, noise = pt.make_inputs(a, model.num_patches, device)
    runner = pt.Runner("ours", model, a, device, imgs, noise)
    step_s = []
    for k in range(depth + 1):  # frozen as the hook freezes: blocks < k (and the stem), run under no_grad
        for name, prm in runner.model.named_parameters():
            prm.requires_grad_(not 0 <= hook.block_of(name) < k)
        runner.model.frozen_prefix = k
        step_s.append(statistics.median(time_steps(runner, max(1, args.warmup // 2), args.steps)))
        print(f"[freezeout] {k:2}/{depth} blocks frozen: {a.batch_size / step_s[-1]:10.1f} images/s", flush=True)
    del runner, model
    reset_memory(device)
    fo_args = fo.parse_args(["--models", args.model, "--input_size", str(a.input_size),
                             "--patch_size", str(a.patch_size or 16), "--device", "cpu"])
    kw = [] if not args.tiny else ["embed_dim=32", "depth=2", "num_heads=2", "decoder_embed_dim=32",
                                   "decoder_depth=1", "decoder_num_heads=2"]
    fo_args.model_kw = kw
    flops = fo.cost_by_frozen(fo.pretrain_argv(fo_args, args.model, "regular", "demo", Path(args.output_dir)))["flops"]
    schedules = []
    for config in FREEZEOUT_CONFIGS:
        how, _, t0 = config.partition(":")
        t = freeze_times(depth, float(t0), how)
        # fraction of training spent with exactly k blocks frozen: block i freezes at t_i (increasing in i)
        bounds = [0.0, *t, 1.0]
        share = [max(0.0, min(1.0, bounds[k + 1]) - min(1.0, bounds[k])) for k in range(depth + 1)]
        measured = sum(s * x for s, x in zip(share, step_s)) / step_s[0]
        counted = sum(s * f for s, f in zip(share, flops)) / flops[0]
        schedules.append({"config": config, "t_i": t, "share_by_frozen": share, "time_saving": 1 - measured,
                          "speedup": 1 / measured, "flop_saving": 1 - counted,
                          "reference_estimate": fo.reference_estimate(t)})
        print(f"[freezeout] {config}: time saving {100 * (1 - measured):.1f}%", flush=True)
    return {"depth": depth, "batch_size": a.batch_size, "amp": amp, "step_s_by_frozen": step_s,
            "flops_per_image_by_frozen": flops, "schedules": schedules}


def memory_section(a, device: torch.device) -> dict:
    """4. benchmarks/memory.py's rows on this device: activation peak and step time with and without
    --grad_checkpointing, ViT-B and ViT-L (one process per row, so each peak is its own)."""
    import memory as M

    models = ["mae_vit_tiny_patch16"] if a.tiny else [a.model, "mae_vit_large_patch16"]
    common = ["--batch_size", str(a.memory_batch_size), "--input_size", "224", "--steps", "1" if a.tiny else "3",
              "--device", str(device)] + (["--tiny"] if a.tiny else [])
    rows = [M.run_child(["--_row", name, mode, *common]) for name in models for mode in ("off", "on")]
    for r in rows:
        print(f"[memory] {r['model']} checkpointing {r['grad_checkpointing']}: activations "
              f"{r['activation_bytes'] / 2**20:.0f} MiB, step {r['step_s']:.3f} s", flush=True)
    return {"rows": rows, "strategies": "DDP vs FSDP rows need 2 processes: benchmarks/memory.py (gloo on a CPU)"}


# ---------------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    """The three tables."""
    lines = [f"GPU suite on {res['device']} (torch {res['torch']}), {res['wall_s']:.0f} s, "
             f"command: `{res['command']}`", ""]
    if "step" in res:
        lines += [f"**Training step**, {res['settings']['model']}, batch {res['settings']['batch_size']}:", "",
                  "| variant | images/s | MFU | peak memory GiB | first loss |", "|---|---|---|---|---|"]
        for r in res["step"]:
            if "skipped" in r:
                lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
            lines.append(f"| {r['variant']} (amp {r['amp']}) | {r['images_per_s']:.1f} | {mfu} | {mem} | "
                         f"{r['first_loss']:.5f} |")
        ours = next((r for r in res["step"] if r["impl"] == "ours" and "images_per_s" in r), None)
        hf = next((r for r in res["step"] if r["impl"] == "hf"), None)
        if ours and hf:
            lines += ["", f"mimkit bf16 / Hugging Face: {ours['images_per_s'] / hf['images_per_s']:.2f}x"]
    if "e2e" in res:
        e = res["e2e"]
        lines += ["", f"**End to end** (the training loop, batch {res['settings']['e2e_batch_size']}, amp {e['amp']}, "
                  f"{e['num_workers']} workers, {e['jpeg_px']} px JPEGs):", "",
                  "| data | augmentation on | images/s | of synthetic |", "|---|---|---|---|"]
        for r in e["runs"]:
            lines.append(f"| {r['data']} | {r['augment_on']} | {r['images_per_s']:.1f} | "
                         f"{100 * r['of_synthetic']:.0f}% |")
    if "freezeout" in res:
        f = res["freezeout"]
        lines += ["", f"**FreezeOut saving** ({f['depth']} blocks, batch {f['batch_size']}, amp {f['amp']}):", "",
                  "| schedule | time saving (measured steps) | speed-up | FLOP saving (counted) | "
                  "saving estimate (paper) |", "|---|---|---|---|---|"]
        for s in f["schedules"]:
            lines.append(f"| {s['config']} | {100 * s['time_saving']:.1f}% | {s['speedup']:.3f} | "
                         f"{100 * s['flop_saving']:.1f}% | {100 * s['reference_estimate']['time_saving']:.1f}% |")
    if "memory" in res:
        lines += ["", f"**Activation checkpointing** (batch {res['settings']['memory_batch_size']}, fp32, one process "
                  "per row; activations = max_memory_allocated during the step above what it held before):", "",
                  "| model | checkpointing | activation peak MiB | step s |", "|---|---|---|---|"]
        for r in res["memory"]["rows"]:
            lines.append(f"| {r['model']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                         f"{r['activation_bytes'] / 2**20:,.0f} | {r['step_s']:.3f} |")
    for key, what in (("failed", "failed"), ("not_run", "not run")):
        for name, why in res.get(key, {}).items():
            lines += ["", f"**{name}**: {what}: {why}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pt.resolve_device(args.device)
    if args.device == "auto" and device.type == "cpu":  # the full ViT-B suite on a CPU would run for hours
        print("gpu_suite: no GPU found; for the CPU smoke run use --tiny --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # mimkit's default (misc.tf32)
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"device": pt.describe_device(device), "torch": torch.__version__, "settings": vars(args),
                 "command": " ".join(["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"GPU suite on {res['device']}: {', '.join(args.sections)}", flush=True)
    sections = {"step": step_section, "e2e": e2e_section, "freezeout": freezeout_section, "memory": memory_section}
    for name in args.sections:
        if time.perf_counter() - t0 > args.budget_s:
            res.setdefault("not_run", {})[name] = f"--budget_s {args.budget_s:.0f} s spent before it started"
        else:
            try:
                res[name] = sections[name](args, device)
            except Exception as e:  # one failing section must not cost the others' figures (device time is scarce)
                res.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        res["wall_s"] = time.perf_counter() - t0
        write(res, out)
    print("\n" + markdown(res) + f"\nwritten: {out / 'gpu_suite.json'}, {out / 'gpu_suite.md'}")
    return 1 if res.get("failed") else 0


def write(res: dict, out: Path) -> None:
    """gpu_suite.json and gpu_suite.md as they stand."""
    (out / "gpu_suite.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu_suite.md").write_text(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
