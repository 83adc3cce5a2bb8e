"""Seed 004's claims on the built-in digits split (5 tasks x 2 classes), several seeds, mean ± std.

    PYTHONPATH=src python benchmarks/incremental_study.py --seeds 0 1 2 --out runs/incremental_study

Runs `mimkit incremental` (in-process, one CPU thread: on a shared 2-core machine more threads only spin) for
naive CE, KD from the frozen previous model (LwF-style), KD from an EMA teacher, masked-feature distillation and
experience replay; writes <out>/study.json (every run's metrics and per-task RankMe) and <out>/study.md (the
table docs/incremental.md quotes). Accuracy and RankMe do not depend on machine load; the wall time does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# The slim ResNet-18 at 16 px (digits are 8x8 at source), batch 16, 3 epochs per task: about a minute a run.
COMMON = ["--data_path", "digits", "--tasks", "5", "--model", "slim_resnet18", "--input_size", "16",
          "--epochs", "3", "--batch_size", "16", "--lr", "0.01", "--device", "cpu", "--no_auto_resume",
          "--print_freq", "1000", "logging.tensorboard=false"]
METHODS = {
    "naive (ce)": ["--method", "ce"],
    "kd (frozen previous model)": ["--method", "kd"],
    "kd (ema teacher, ratio 0.01)": ["--method", "kd", "--ema_mode", "ema", "--ema_ratio", "0.01"],
    "mask (ratio 0.5, s, v1)": ["--method", "mask", "--mask_ratio", "0.5", "--mask_mode", "s", "--inv_mode", "v1"],
    "er (buffer 200)": ["--method", "er", "--buffer_size", "200"],
}
KEYS = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "final_rankme")


def mean_std(values: list[float]) -> str:
    """'m ± s' (sample std) of the values."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    """Run every method for every seed, then write study.json and study.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/incremental_study")
    p.add_argument("--methods", nargs="*", default=None, help="subset of the method labels")
    p.add_argument("--extra", nargs="*", default=[], help="more flags for every run (e.g. --epochs 1)")
    args = p.parse_args(argv)
    import torch

    from mimkit.api import run_command

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    labels = args.methods or list(METHODS)
    for label in labels:
        for seed in args.seeds:
            slug = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
            run_dir = out / f"{slug}-seed{seed}"
            t0 = time.perf_counter()
            run = run_command("incremental", [*COMMON, *METHODS[label], "--seed", str(seed),
                                              "--output_dir", str(run_dir), *args.extra])
            if run.exit_code:
                return run.exit_code
            res = run.results
            runs.append({"method": label, "seed": seed, "wall_s": time.perf_counter() - t0, **res["metrics"],
                         "rankme_per_task": [r["rankme"] for r in res["per_task"]],
                         "acc_seen_per_task": [r["acc_seen"] for r in res["per_task"]]})
            print(f"{label} seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.2f}" for k in KEYS), file=sys.stderr)
    (out / "study.json").write_text(json.dumps({"command": COMMON, "methods": METHODS, "runs": runs}, indent=1))
    lines = ["| method | final avg acc (%) | avg incremental acc (%) | forgetting | BWT | final RankMe | "
             "RankMe after each task |", "|---|---|---|---|---|---|---|"]
    for label in labels:
        rs = [r for r in runs if r["method"] == label]
        curve = [statistics.mean(r["rankme_per_task"][t] for r in rs) for t in range(len(rs[0]["rankme_per_task"]))]
        lines.append(f"| {label} | " + " | ".join(mean_std([r[k] for r in rs]) for k in KEYS)
                     + " | " + " → ".join(f"{v:.1f}" for v in curve) + " |")
    table = "\n".join(lines)
    (out / "study.md").write_text(f"seeds {args.seeds}; flags {' '.join(COMMON)} {' '.join(args.extra)}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
