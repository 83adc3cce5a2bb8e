"""Where a FreezeOut step's time goes: forward, backward and optimiser step with k = 0 and k = L frozen blocks.

The wall-clock saving of FreezeOut is only a part of its counted-FLOP saving on a CPU; this script says why, per
phase. One model, one process; the two settings alternate step by step (interleaved, so a loaded machine slows
both alike), after one warm-up step each. Each phase is timed on its own (forward: the loss; backward:
loss.backward(); step: AdamW over the trainable groups + zero_grad), and its matmul / conv / attention FLOPs
are counted by torch.utils.flop_counter. The top operators of each setting (torch.profiler, self CPU time)
follow.

    # the figures in docs/freezeout.md (ViT-B LocalMIM, seed 002's model)
    python benchmarks/freezeout_profile.py --model MIM_vit_base_patch16 --input_size 64 --batch_size 8 --steps 3
    python benchmarks/freezeout_profile.py --model MIM_vit_base_patch16 --input_size 224 --batch_size 4 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="MIM_vit_base_patch16")
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--model_kw", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=8, help="operators listed per setting")
    p.add_argument("--output", default=None, help="JSON file for the figures")
    return p.parse_args(argv)


def build(args):
    """(model, AdamW over weight-decay groups as the pretrain recipe builds them) -- FreezeOut's own groups."""
    from mimkit.engine.freezeout import FreezeOutHook
    from mimkit.models import create_model

    kw = {k: (float(v) if "." in v else int(v)) for k, v in (x.split("=", 1) for x in args.model_kw)}
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.input_size, **kw)
    hook = FreezeOutHook(model, 0.8, "cubic")
    return model, hook


def optimizer_for(model, hook, k: int) -> torch.optim.Optimizer:
    """AdamW over the groups FreezeOut keeps with k blocks frozen (their parameters no longer require grad)."""
    for name, p in model.named_parameters():
        fixed = getattr(model, "is_fixed_param", lambda n: n in ("pos_embed", "decoder_pos_embed"))(name)
        p.requires_grad_(not fixed and not (0 <= hook.block_of(name) < k))
    model.frozen_prefix = k
    groups = hook.param_groups(0.05)
    return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-4)


def phases(model, opt, imgs, mask_ratio: float) -> dict[str, float]:
    """Seconds of forward, backward and the optimiser step of one training step: wall clock, and this process's
    CPU time (`*_cpu`: all its threads; on a shared machine it moves far less than the wall clock)."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(imgs, mask_ratio=mask_ratio)[0]
    t1, c1 = time.perf_counter(), time.process_time()
    loss.backward()
    t2, c2 = time.perf_counter(), time.process_time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3, c3 = time.perf_counter(), time.process_time()
    return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0,
            "forward_cpu": c1 - c0, "backward_cpu": c2 - c1, "step_cpu": c3 - c2, "total_cpu": c3 - c0}


def counted(model, imgs, mask_ratio: float) -> dict[str, float]:
    """Counted FLOPs of forward and backward (matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        loss = model(imgs, mask_ratio=mask_ratio)[0]
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": float(fwd.get_total_flops()), "backward": float(bwd.get_total_flops())}


def top_ops(model, opt, imgs, mask_ratio: float, n: int) -> list[tuple[str, float]]:
    """The n operators with the most self CPU time in one step: (name, ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phases(model, opt, imgs, mask_ratio)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key, e.self_cpu_time_total / 1e3) for e in rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, hook = build(args)
    model.train()
    depth = len(model.blocks)
    imgs = torch.randn(args.batch_size, model.in_chans, args.input_size, args.input_size)
    settings = {0: None, depth: None}
    times: dict[int, list[dict]] = {k: [] for k in settings}
    flops, ops = {}, {}
    for k in settings:  # warm-up, FLOPs and the profile of each setting
        settings[k] = optimizer_for(model, hook, k)
        flops[k] = counted(model, imgs, args.mask_ratio)
        phases(model, settings[k], imgs, args.mask_ratio)
        ops[k] = top_ops(model, settings[k], imgs, args.mask_ratio, args.top)
    for _ in range(args.steps):  # interleaved: k = 0, k = L, k = 0, ...
        for k in settings:
            optimizer_for(model, hook, k)  # requires_grad and frozen_prefix of this setting
            times[k].append(phases(model, settings[k], imgs, args.mask_ratio))
    med = {k: {ph: statistics.median(t[ph] for t in times[k]) for ph in times[k][0]} for k in settings}
    print(f"{args.model} at {args.input_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}; median of {args.steps} interleaved steps")
    print(f"{'phase':<9} {'k=0 s':>8} {f'k={depth} s':>8} {'saved':>7}   {'k=0 cpu s':>9} {f'k={depth} cpu s':>10} "
          f"{'saved':>7}   {'k=0 GFLOP':>10} {f'k={depth} GFLOP':>10} {'saved':>7}")
    for ph in ("forward", "backward", "step", "total"):
        a, b = med[0][ph], med[depth][ph]
        ca, cb = med[0][ph + "_cpu"], med[depth][ph + "_cpu"]
        if ph in ("forward", "backward"):
            fa, fb = flops[0][ph] / 1e9, flops[depth][ph] / 1e9
        elif ph == "total":
            fa, fb = sum(flops[0].values()) / 1e9, sum(flops[depth].values()) / 1e9
        else:
            fa = fb = float("nan")
        fs = f"{100 * (1 - fb / fa):6.1f}%" if fa == fa and fa else "    n/a"
        print(f"{ph:<9} {a:8.3f} {b:8.3f} {100 * (1 - b / a):6.1f}%   {ca:9.3f} {cb:10.3f} {100 * (1 - cb / ca):6.1f}%   "
              f"{fa:10.2f} {fb:10.2f} {fs}")
    for k in settings:
        print(f"\ntop operators, k={k} (self CPU ms, one step):")
        for name, ms in ops[k]:
            print(f"  {ms:9.1f}  {name}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "flops": flops, "top_ops": ops,
                       "threads": torch.get_num_threads(), "load": os.getloadavg()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
