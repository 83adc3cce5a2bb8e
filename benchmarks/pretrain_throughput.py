"""Pretraining throughput and peak memory: mimkit's MaskedAutoencoderViT against Hugging Face ViTMAEForPreTraining.

A "step" is one full training step: forward (loss), backward and an AdamW(0.9, 0.95) update, the parameter groups
of mimkit.engine.optim applied to both models. Both models are built from the same config with the same weights
(ours converted with mimkit.models.convert.mae_to_hf) and see the same images and the same masking noise, so they
compute the same loss (printed as a check). Steps are interleaved (ours, HF, ours, HF, ...) and medians reported,
so a machine shared with other jobs slows both alike; the ratio is ours / HF images per second (> 1: we are faster).
"ours" and "hf" use the same precision (--amp) and the same AdamW (fused on GPU, for-each on CPU): like for like.

--variants adds mimkit's faster settings to the same interleaved run, each a fresh model with the same weights,
images and noise: `fused` (fused AdamW), `bf16` (bf16 autocast), `bf16+fused` (both: what `--amp auto` and the
default optimiser give on a CPU with native bf16) and `fp32` (ours again, unfused, fp32). Each is reported as
images/s, its speed-up over the reference (HF at --amp) and over "ours", and its first loss (bf16 within ~1% of fp32).
The result records the CPU model and its bf16 capability as torch reports it (AVX-512 BF16 / AMX-BF16), the
capability `--amp auto` follows. Time it on an idle machine: a loaded one slows every variant, not alike.

Peak memory is measured for each model in its own fresh subprocess (the same command with --memory_child):
  * CUDA: torch.cuda.max_memory_allocated() over warm-up and timed steps (weights, gradients, optimiser state,
    activations; the allocator's cache is not counted).
  * CPU:  peak resident set size (resource.getrusage ru_maxrss) minus the RSS of the process after its imports
    and before the model is built: weights, gradients, optimiser state, activations and allocator slack.

Model FLOPs utilisation (GPU) uses the matmul FLOPs of a training step derived from the config (flops_per_image:
3 x forward; about 58 GFLOP per image for ViT-B/16 at 224 px and mask 0.75) over an assumed dense peak
(PEAK_TFLOPS below, bf16 tensor cores; override with --peak_tflops).

--loop times the real mimkit training loop (mimkit.engine.loop.Trainer with the pretraining step function) on
(a) synthetic tensors already in memory (no workers; and, for reference, the bare step of the comparison
without loop or DataLoader, random masks as in the loop) and (b) JPEG files decoded and augmented by the official
pretraining transform in --num_workers DataLoader workers, written to a temporary folder from the built-in demo
images (upscaled to --jpeg_px, about ImageNet's average size at 224). Each round builds a fresh model and loop
(weights from --seed) and runs warm-up + steps; rounds alternate synthetic, JPEG, synthetic, JPEG, ...
The first step of every round (DataLoader start-up) is never timed.

    # CPU (figures in docs/benchmarks.md)
    python benchmarks/pretrain_throughput.py --model mae_vit_tiny_patch16 --batch_size 16 --steps 8 --warmup 2
    python benchmarks/pretrain_throughput.py --model mae_vit_base_patch16 --batch_size 8 --steps 4 --warmup 1
    # fp32 / fused AdamW / bf16 / both beside the HF fp32 reference, one interleaved run (issue 15's table)
    python benchmarks/pretrain_throughput.py --model mae_vit_base_patch16 --batch_size 8 --steps 4 --warmup 1 \
        --variants fused,bf16,bf16+fused --no_memory --json vitb_cpu_bf16.json
    python benchmarks/pretrain_throughput.py --loop --model mae_vit_tiny_patch16 --batch_size 16 --steps 8
    # GPU, the target configuration
    python benchmarks/pretrain_throughput.py --model mae_vit_base_patch16 --batch_size 256 --device cuda \
        --amp bf16 --tf32 --compile --steps 30 --warmup 10 --json vitb_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
               "V100": 125.0, "4090": 165.0, "3090": 71.0}
ARCH_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16", help="a mimkit model name (`mimkit models` lists them)")
    p.add_argument("--batch_size", type=int, default=8, help="images per step")
    p.add_argument("--input_size", type=int, default=224, help="image side in pixels")
    for name in ARCH_FLAGS:
        p.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="share of patches removed")
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixel targets")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off",
                   help="precision of ours and the HF reference: off = fp32 | bf16 | fp16 (GPU only); "
                   "`--variants` adds mimkit's faster settings beside them")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions (GPU)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU; default from the device name (bf16 dense)")
    p.add_argument("--seed", type=int, default=0, help="weights, images and noise")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; None = torch's choice")
    p.add_argument("--no_memory", action="store_true", help="skip the per-model memory subprocesses")
    p.add_argument("--loop", action="store_true", help="time the mimkit training loop: synthetic vs JPEG data")
    p.add_argument("--num_workers", type=int, default=2, help="--loop: DataLoader workers for the JPEG run")
    p.add_argument("--rounds", type=int, default=2, help="--loop: interleaved rounds of (warm-up + steps) each")
    p.add_argument("--jpeg_px", type=int, default=None, help="--loop: JPEG side; None = 1.75 x input_size")
    p.add_argument("--variants", default=None,
                   help="comma-separated extra mimkit settings in the same interleaved run, each beside the two base "
                        "rows ('ours' and 'hf': --amp precision, for-each AdamW on CPU, fused on GPU): fp32, fused "
                        "(fused AdamW), bf16 (bf16 autocast), bf16+fused (what --amp auto gives on a bf16 CPU); "
                        "fp16, fp16+fused on GPU. Columns 'x HF' and 'x ours' are speed-ups over those base rows")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--memory_child", choices=("ours", "hf"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch_size must be >= 1, --warmup >= 0")
    args.variants = [v.strip() for v in (args.variants or "").split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown '{v}' (choose from {', '.join(VARIANTS)})")
    return args


# variant name -> (autocast: bf16 | fp16 | off, fused AdamW)
VARIANTS = {"fp32": ("off", False), "fused": ("off", True), "bf16": ("bf16", False), "bf16+fused": ("bf16", True),
            "fp16": ("fp16", False), "fp16+fused": ("fp16", True)}


# ---------------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    return dev


def model_overrides(args) -> dict:
    kw = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    return dict(kw, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)


def build_ours(args):
    from mimkit.models import create_model

    torch.manual_seed(args.seed)
    return create_model(args.model, **model_overrides(args))


def build_hf(args, ours):
    """ViTMAEForPreTraining with ours' config and weights (fused SDPA attention, as ours)."""
    import transformers

    from mimkit.models.convert import hf_config_kwargs, mae_to_hf

    config = transformers.ViTMAEConfig(**hf_config_kwargs(ours), mask_ratio=args.mask_ratio)
    config._attn_implementation = "sdpa"
    hf = transformers.ViTMAEForPreTraining(config)
    legacy = "vit.encoder.layer.0.layernorm_before.weight" in hf.state_dict()  # transformers 4.x names
    hf.load_state_dict(mae_to_hf(ours.state_dict(), legacy=legacy), strict=True)
    return hf


def make_inputs(args, num_patches: int, device: torch.device):
    g = torch.Generator().manual_seed(args.seed + 1)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g)
    noise = torch.rand(args.batch_size, num_patches, generator=g)
    return imgs.to(device), noise.to(device)


class Runner:
    """One implementation's training step: model, AdamW (mimkit's groups), autocast, grad scaler."""

    def __init__(self, name: str, model, args, device: torch.device, imgs, noise, amp: str | None = None,
                 fused: bool | None = None):
        from mimkit.engine.optim import build_adamw, param_groups

        amp = args.amp if amp is None else amp
        fused = device.type == "cuda" if fused is None else fused  # ours / hf: fused on GPU only, as before
        self.name, self.imgs, self.noise, self.device = name, imgs, noise, device
        self.model = model.to(device).train()
        self.opt = build_adamw(param_groups(self.model, 0.05), 1.5e-4, (0.9, 0.95), device, fused=fused)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.mask_ratio = args.mask_ratio
        self.fwd = torch.compile(self.model) if args.compile else self.model
        self.times: list[float] = []
        self.first_loss = None

    def loss(self):
        if self.name != "hf":
            return self.fwd(self.imgs, mask_ratio=self.mask_ratio, noise=self.noise)[0]
        return self.fwd(pixel_values=self.imgs, noise=self.noise).loss

    def step(self) -> float:
        """One training step; returns its wall time in seconds (device synchronised)."""
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        dt = time.perf_counter() - t0
        if self.first_loss is None:
            self.first_loss = loss.item()
        return dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_image(model, mask_ratio: float) -> float:
    """Matmul FLOPs of one training image (3 x forward: backward costs twice the forward), from the config.

    Counts patch embedding (all patches, as the official code), encoder blocks on 1 + kept tokens, decoder
    embedding, decoder blocks on 1 + all tokens, prediction head; attention scores and weighted sums included;
    norms, softmax, GELU and the loss (O(tokens x width)) left out.
    """
    n_patch, pix = model.num_patches, model.patch_size ** 2 * model.in_chans
    t_enc = 1 + int(n_patch * (1 - mask_ratio))
    t_dec = 1 + n_patch

    def blocks(blks, tokens: int) -> float:
        total = 0.0
        for b in blks:
            d, hidden = b.attn.qkv.in_features, b.mlp.fc1.out_features
            total += 2 * tokens * (4 * d * d + 2 * d * hidden)  # qkv + proj + mlp
            total += 2 * 2 * tokens * tokens * d  # q @ k^T and attn @ v
        return total

    d, dd = model.embed_dim, model.decoder_embed.out_features
    fwd = (2 * n_patch * pix * d + blocks(model.blocks, t_enc) + 2 * t_enc * d * dd
           + blocks(model.decoder_blocks, t_dec) + 2 * t_dec * dd * pix)
    return 3 * fwd


def peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}: dense bf16 data-sheet peak"
    return None, f"{name}: unknown peak, pass --peak_tflops"


# ---------------------------------------------------------------------------------------------- memory
def rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark so far
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_child(args) -> None:
    """Run warm-up + a few steps of one implementation in this fresh process; print its peak memory as JSON."""
    import transformers  # noqa: F401  the same imports in both children, before the baseline

    device = resolve_device(args.device)
    base = rss_now_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours = build_ours(args)
    num_patches = ours.num_patches
    model = ours if args.memory_child == "ours" else build_hf(args, ours)
    del ours  # the HF child keeps only the HF model
    imgs, noise = make_inputs(args, num_patches, device)
    runner = Runner(args.memory_child, model, args, device, imgs, noise)
    for _ in range(max(1, args.warmup) + min(args.steps, 2)):
        runner.step()
    if device.type == "cuda":
        out = {"peak_bytes": torch.cuda.max_memory_allocated(device), "how": "torch.cuda.max_memory_allocated"}
    else:
        out = {"peak_bytes": peak_rss_bytes() - base, "how": "peak RSS (ru_maxrss) minus RSS after imports"}
    print("MEMORY " + json.dumps(out), flush=True)


def measure_memory(which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory_child", which, "--no_memory"]
    cmd = [c for c in cmd if c != "--loop"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory subprocess for {which} failed:\n{done.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------- compare
def compare(args, device: torch.device) -> dict:
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ours = build_ours(args)
    hf = build_hf(args, ours)
    imgs, noise = make_inputs(args, ours.num_patches, device)
    runners = [Runner("ours", ours, args, device, imgs, noise), Runner("hf", hf, args, device, imgs, noise)]
    for v in args.variants:
        amp, fused = VARIANTS[v]
        if amp == "fp16" and device.type != "cuda":
            sys.exit(f"--variants {v}: fp16 needs a GPU")
        runners.append(Runner(v, build_ours(args), args, device, imgs, noise, amp=amp, fused=fused))
    flops = flops_per_image(ours, args.mask_ratio)
    print(f"{args.model} {args.input_size}px batch {args.batch_size} on {describe_device(device)}, amp {args.amp}, "
          f"compile {args.compile}, {torch.get_num_threads()} threads; {flops / 1e9:.2f} GFLOP per training image")
    for i in range(args.warmup + args.steps):
        for r in runners:  # interleaved: ours, HF, ours, HF, ...
            dt = r.step()
            if i >= args.warmup:
                r.times.append(dt)
    res: dict = {}
    for r in runners:
        med = statistics.median(r.times)
        entry = {"images_per_s": args.batch_size / med, "step_s_median": med, "step_s": r.times,
                 "first_loss": r.first_loss}
        if r.name in ("ours", "hf"):
            res[r.name] = entry
        else:
            res.setdefault("variants", {})[r.name] = entry
    for entry in res.get("variants", {}).values():
        entry["speedup_vs_hf"] = entry["images_per_s"] / res["hf"]["images_per_s"]
        entry["speedup_vs_ours"] = entry["images_per_s"] / res["ours"]["images_per_s"]
    pairs = [h / o for o, h in zip(runners[0].times, runners[1].times)]
    res["ratio"] = res["ours"]["images_per_s"] / res["hf"]["images_per_s"]
    res["ratio_pairwise_median"] = statistics.median(pairs)
    res["gflop_per_image"] = flops / 1e9
    res["hf_attn_implementation"] = hf.config._attn_implementation
    peak, peak_src = peak_tflops(args, device)
    res["peak_tflops_assumed"], res["peak_source"] = peak, peak_src
    for name in ("ours", "hf"):
        achieved = flops * res[name]["images_per_s"] / 1e12
        res[name]["achieved_tflops"] = achieved
        res[name]["mfu"] = achieved / peak if peak else None
    if not args.no_memory:
        del runners, ours, hf
        for name in ("ours", "hf"):
            res[name]["peak_memory"] = measure_memory(name)
    return res


def print_compare(res: dict) -> None:
    print(f"{'':6}{'images/s':>10}{'step s':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}  first loss")
    for name in ("ours", "hf"):
        r = res[name]
        mem = r.get("peak_memory", {}).get("peak_bytes")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mib = f"{mem / 2**20:.0f}" if mem is not None else "-"
        print(f"{name:6}{r['images_per_s']:>10.2f}{r['step_s_median']:>9.3f}{r['achieved_tflops']:>9.3f}"
              f"{mfu:>7}{mib:>10}  {r['first_loss']:.6f}")
    print(f"ratio ours/HF images/s: {res['ratio']:.3f} (median of pairwise ratios {res['ratio_pairwise_median']:.3f})")
    if "peak_memory" in res["ours"]:
        mem = {k: res[k]["peak_memory"]["peak_bytes"] for k in ("ours", "hf")}
        print(f"peak memory ours/HF: {mem['ours'] / mem['hf']:.3f} ({res['ours']['peak_memory']['how']})")
    if res["peak_tflops_assumed"]:
        print(f"MFU against {res['peak_tflops_assumed']:.0f} TFLOP/s ({res['peak_source']})")
    if res.get("variants"):
        print(f"{'variant':12}{'images/s':>10}{'step s':>9}{'x HF':>7}{'x ours':>8}  first loss")
        for name, r in res["variants"].items():
            print(f"{name:12}{r['images_per_s']:>10.2f}{r['step_s_median']:>9.3f}{r['speedup_vs_hf']:>7.2f}"
                  f"{r['speedup_vs_ours']:>8.2f}  {r['first_loss']:.6f}")


# ---------------------------------------------------------------------------------------------- loop
class _Synthetic(torch.utils.data.Dataset):
    """Pre-made normalised image tensors: no decoding, no augmentation."""

    def __init__(self, n: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


class _StepTimes:
    """Loop hook recording the time of every optimiser step."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def on_train_start(self, trainer):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_step_end(self, trainer):
        sync(self.device)
        self.stamps.append(time.perf_counter())


def time_bare(args, device: torch.device) -> list[float]:
    """The bare training step of the comparison (no loop, no DataLoader, fixed inputs) for reference."""
    model = build_ours(args)
    imgs, noise = make_inputs(args, model.num_patches, device)
    runner = Runner("ours", model, args, device, imgs, None)
    return [t for i, t in enumerate(runner.step() for _ in range(max(1, args.warmup) + args.steps))
            if i >= max(1, args.warmup)]


def write_jpegs(folder: Path, n: int, px: int) -> None:
    from PIL import Image

    from mimkit.data.sources import open_dataset

    demo = open_dataset("demo", "train")
    for i in range(n):
        img, _ = demo[i % len(demo)]
        img.resize((px, px), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def time_loop(args, device: torch.device, dataset, num_workers: int, run_dir: Path, collate=None,
              wrap_step=None) -> dict:
    """Step times of the real loop over `dataset`; `collate` / `wrap_step` swap in another data path
    (e.g. device-side augmentation: collate_device and device_step)."""
    from mimkit.data.datasets import collate_batch
    from mimkit.engine.distributed import DistInfo
    from mimkit.engine.logging import RunLogger
    from mimkit.engine.loop import LoopSettings, Trainer
    from mimkit.engine.optim import build_adamw, param_groups
    from mimkit.tasks.pretrain import pretrain_step

    model = build_ours(args).to(device)
    fwd = model
    if args.compile:
        model.compile()
    opt = build_adamw(param_groups(model, 0.05), 1.5e-4, (0.9, 0.95), device)
    total = max(1, args.warmup) + args.steps
    settings = LoopSettings(epochs=1, batch_size=args.batch_size, amp=args.amp, num_workers=num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=True, seed=args.seed,
                            max_steps=total)
    run = RunLogger(run_dir, tensorboard=False, print_freq=10**9)
    hook = _StepTimes(device)
    step_fn = pretrain_step(args.mask_ratio, "masked_only")
    trainer = Trainer(model=fwd, optimizer=opt, dataset=dataset, collate=collate or collate_batch,
                      step_fn=wrap_step(step_fn) if wrap_step else step_fn, lr_schedule=lambda o, e: None,
                      settings=settings, dist=DistInfo(device=device), run=run, ckpt=None, config={},
                      config_yaml="", hooks=[hook])
    try:
        trainer.fit()
    finally:
        run.close()
    steps = [b - a for a, b in zip(hook.stamps, hook.stamps[1:])]
    # the first interval includes DataLoader start-up (workers, first batch): the warm-up steps absorb it
    return steps[max(1, args.warmup):]


def loop_mode(args, device: torch.device) -> dict:
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import pretrain_transform

    n = args.batch_size * (max(1, args.warmup) + args.steps)
    px = args.jpeg_px or round(args.input_size * 1.75)
    res = {"jpeg_px": px, "images": n}
    with tempfile.TemporaryDirectory(prefix="mimkit_bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        write_jpegs(tmp / "jpeg", n, px)
        print(f"--loop: {n} synthetic tensors vs {n} JPEGs of {px}x{px} px (decode + RandomResizedCrop + flip + "
              f"normalise, {args.num_workers} workers) on {describe_device(device)}")
        kinds = {"synthetic": (_Synthetic(n, args.input_size, args.seed), 0),
                 "jpeg": (open_dataset(tmp / "jpeg", "train", pretrain_transform(args.input_size)), args.num_workers)}
        times: dict[str, list[float]] = {k: [] for k in ("bare", *kinds)}
        for r in range(args.rounds):  # interleaved rounds: bare, synthetic, JPEG, bare, synthetic, JPEG, ...
            times["bare"] += time_bare(args, device)
            for kind, (ds, workers) in kinds.items():
                times[kind] += time_loop(args, device, ds, workers, tmp / f"run_{kind}_{r}")
        for kind in times:
            med = statistics.median(times[kind])
            res[kind] = {"images_per_s": args.batch_size / med, "step_s_median": med, "step_s": times[kind],
                         "num_workers": kinds[kind][1] if kind in kinds else 0}
    res["jpeg_over_synthetic"] = res["jpeg"]["images_per_s"] / res["synthetic"]["images_per_s"]
    res["synthetic_over_bare"] = res["synthetic"]["images_per_s"] / res["bare"]["images_per_s"]
    for k in ("bare", "synthetic", "jpeg"):
        print(f"{k:10} {res[k]['images_per_s']:8.2f} images/s  (median step {res[k]['step_s_median']:.3f} s)")
    print(f"JPEG / synthetic throughput: {res['jpeg_over_synthetic']:.3f}; "
          f"loop on synthetic / bare step: {res['synthetic_over_bare']:.3f}")
    return res


# ---------------------------------------------------------------------------------------------- main
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        sys.exit("--amp fp16 needs a GPU (use bf16 or off on CPU)")
    import transformers

    from mimkit.engine.precision import cpu_bf16_support

    bf16_ok, bf16_why = cpu_bf16_support()
    result = {"args": {k: v for k, v in vars(args).items() if k != "memory_child"},
              "device": describe_device(device), "torch": torch.__version__,
              "cpu": {"model": describe_device(torch.device("cpu")), "bf16": bf16_ok, "bf16_why": bf16_why},
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg(),
              "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "", *sys.argv[1:]])}
    if args.loop:
        result["loop"] = loop_mode(args, device)
    else:
        result.update(compare(args, device))
        print_compare(result)
    result["load_average_after"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after {result['load_average_after']} "
          f"on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
