"""Does bf16 autocast change the demo's result? The demo pretraining, fp32 vs bf16, over several seeds.

Runs `mimkit pretrain` (the embedded demo, or whatever flags follow `--`) once per (seed, precision), interleaved
(seed 0 fp32, seed 0 bf16, seed 1 fp32, ...), each in its own fresh folder, and reports the final epoch's mean
training loss per run, mean ± sample std per precision, and the paired bf16 - fp32 difference. Losses do not
depend on the machine's load, so this can run on a busy machine (the timings it also prints cannot).

    python benchmarks/bf16_equivalence.py                       # demo, seeds 0 1 2 (about 6 demo runs)
    python benchmarks/bf16_equivalence.py --seeds 0 1 2 --json bf16_demo.json -- --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def final_loss(run_dir: Path) -> float:
    """The last epoch record's mean training loss in <run_dir>/metrics.jsonl."""
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    return float(epochs[-1]["loss"])


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bf16_equivalence.py " + " ".join(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                usage="%(prog)s [options] [-- PRETRAIN_FLAGS ...]",
                                epilog="Flags after `--` go to every `mimkit pretrain` run, e.g. `-- --epochs 4`.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="misc.seed values")
    p.add_argument("--precisions", nargs="+", default=["off", "bf16"], help="--amp values to compare")
    p.add_argument("--out", default=None, help="parent folder of the runs; None = a temporary folder")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    from mimkit.engine.precision import cpu_bf16_support

    bf16_ok, bf16_why = cpu_bf16_support()
    parent = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mimkit_bf16_"))
    losses: dict[str, dict[int, float]] = {amp: {} for amp in args.precisions}
    seconds: dict[str, dict[int, float]] = {amp: {} for amp in args.precisions}
    for seed in args.seeds:
        for amp in args.precisions:  # interleaved, so a load change hits both precisions alike
            out = parent / f"amp-{amp}-seed-{seed}"
            cmd = [sys.executable, "-m", "mimkit", "pretrain", "--seed", str(seed), "--amp", amp,
                   "--output_dir", str(out), "--no_auto_resume", *extra]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            seconds[amp][seed] = time.perf_counter() - t0
            losses[amp][seed] = final_loss(out)
            print(f"seed {seed} amp {amp:5} final loss {losses[amp][seed]:.5f}  ({seconds[amp][seed]:.0f} s)",
                  flush=True)

    print(f"\n{command}\nCPU bf16: {bf16_ok} ({bf16_why})\n")
    print("| precision | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    summary = {}
    for amp in args.precisions:
        m, sd = mean_std([losses[amp][s] for s in args.seeds])
        summary[amp] = {"mean": m, "std": sd}
        name = "fp32 (`--amp off`)" if amp == "off" else f"{amp} (`--amp {amp}`)"
        print(f"| {name} | " + " | ".join(f"{losses[amp][s]:.4f}" for s in args.seeds) + f" | {m:.4f} ± {sd:.4f} |")
    result = {"command": command, "losses": losses, "seconds": seconds, "summary": summary, "cpu_bf16": bf16_ok, "why": bf16_why,
              "extra_args": extra, "runs": str(parent), "load_average": os.getloadavg()}
    if "off" in args.precisions and len(args.precisions) > 1:
        for amp in [a for a in args.precisions if a != "off"]:
            diffs = [losses[amp][s] - losses["off"][s] for s in args.seeds]
            m, sd = mean_std(diffs)
            result.setdefault("paired_difference", {})[amp] = {"mean": m, "std": sd}
            print(f"\npaired {amp} - fp32 final loss: {m:+.4f} ± {sd:.4f} over {len(diffs)} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
