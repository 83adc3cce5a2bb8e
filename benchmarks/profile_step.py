"""torch.profiler view of one training step of mimkit's MAE and of HF ViTMAEForPreTraining, side by side.

Takes pretrain_throughput.py's model flags; profiles --steps steps of each (after --warmup), interleaved, and prints
the operators with the largest self CPU time for each implementation, then the per-operator difference.

    python benchmarks/profile_step.py --model mae_vit_tiny_patch16 --batch_size 16 --steps 3 --warmup 1
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_throughput as bench  # noqa: E402


def main(argv=None) -> int:
    args = bench.parse_args(argv)
    device = bench.resolve_device(args.device)
    ours = bench.build_ours(args)
    hf = bench.build_hf(args, ours)
    imgs, noise = bench.make_inputs(args, ours.num_patches, device)
    runners = [bench.Runner("ours", ours, args, device, imgs, noise), bench.Runner("hf", hf, args, device, imgs, noise)]
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profs = {}
    totals = defaultdict(dict)
    for _ in range(args.steps):
        for r in runners:  # a fresh profiler per step, interleaved ours, HF, ours, HF, ...
            profs[r.name] = profile(activities=acts)
            with profs[r.name]:
                r.step()
            for ev in profs[r.name].key_averages():
                totals[ev.key][r.name] = totals[ev.key].get(r.name, 0.0) + ev.self_cpu_time_total
    for r in runners:
        print(f"\n=== {r.name}: top operators by self CPU time (last profiled step) ===")
        print(profs[r.name].key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print("\n=== self CPU ms per step, ours vs HF (largest absolute differences) ===")
    rows = [(k, v.get("ours", 0.0) / 1e3 / args.steps, v.get("hf", 0.0) / 1e3 / args.steps) for k, v in totals.items()]
    rows.sort(key=lambda r: -abs(r[1] - r[2]))
    print(f"{'operator':<48}{'ours':>10}{'hf':>10}{'ours-hf':>10}")
    for k, o, h in rows[:20]:
        print(f"{k[:47]:<48}{o:>10.1f}{h:>10.1f}{o - h:>10.1f}")
    so, sh = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total self CPU':<48}{so:>10.1f}{sh:>10.1f}{so - sh:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
