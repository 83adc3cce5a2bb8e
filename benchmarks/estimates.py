"""The whole-run time estimate vs the measured time: the README demo and a 60-image cpu_small run.

    python benchmarks/estimates.py                      # the demo (`mimkit pretrain`, ~5 min idle) + cpu_small on 60
    python benchmarks/estimates.py --short              # seconds: cpu_small on 20 images for 4 epochs (a smoke run)
    python benchmarks/estimates.py --output_dir /tmp/est --runs demo

Each run is the real CLI in a fresh process (`python -m mimkit pretrain ...`, its own run folder under
--output_dir). The run logs two estimates (engine/logging.py; their seconds in log.txt's "timing record:" lines): `iterations` (after iterations
2-4, the first the user sees) and `epochs` (after the second epoch: the steady time per iteration plus each
epoch's start-up, evaluation and checkpoints as measured on that epoch), and its measured time (`run_time`: from
the loop's start to the run's close, the span both estimates speak for). Printed: estimate, measured and
estimate / measured for each; the process's wall time (imports, data and model set-up too) beside them.

Timings need an idle machine: on a loaded one the pace changes under the run and no estimate can hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_folder(folder: Path, n: int, size: int = 96, seed: int = 0) -> Path:
    """n smooth random RGB JPEGs (blobs over a gradient) in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.stack([yy * rng.uniform(50, 200) + xx * rng.uniform(0, 55)] * 3, -1)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.jpg", quality=92)
    return folder


def runs(root: Path, short: bool) -> dict[str, list[str]]:
    """name -> the mimkit arguments of each benchmarked run."""
    if short:
        data = write_folder(root / "images20", 20)
        return {"cpu_small_20x4": ["pretrain", "pretrain/cpu_small.yaml", "--data_path", str(data), "--epochs", "4"]}
    data = write_folder(root / "images60", 60)
    return {"demo": ["pretrain"],  # the README's first command: no arguments
            "cpu_small_60": ["pretrain", "pretrain/cpu_small.yaml", "--data_path", str(data)]}


def read_records(run_dir: Path) -> tuple[dict[str, float], float | None]:
    """({basis: estimated total seconds}, measured seconds) from the timing records of the run's log.txt."""
    est, measured = {}, None
    mark = "timing record: "  # engine.logging.RunLogger.TIMING
    for line in (run_dir / "log.txt").read_text().splitlines():
        if mark not in line:
            continue
        rec = json.loads(line.split(mark, 1)[1])
        if rec.get("kind") == "estimate":
            est.setdefault(rec["basis"], rec["total_s"])
        elif rec.get("kind") == "run_time":
            measured = rec["seconds"]
    return est, measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="one tiny run (seconds), to check the script works")
    p.add_argument("--output_dir", default="runs/estimates", help="run folders and images go here (made anew)")
    p.add_argument("--runs", default=None, help="comma-separated names to run (default: all)")
    args = p.parse_args()
    root = Path(args.output_dir) / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    todo = runs(root, args.short)
    if args.runs:
        todo = {k: v for k, v in todo.items() if k in args.runs.split(",")}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print("| run | estimate | from | measured (loop) | estimate / measured | process wall |")
    print("|---|---|---|---|---|---|")
    for name, argv in todo.items():
        out = root / name
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mimkit", *argv, "--output_dir", str(out)], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            print(f"| {name} | failed (exit {proc.returncode}, see {root / name}.log) | | | | {wall:.0f} s |")
            continue
        est, measured = read_records(out)
        for basis in ("iterations", "epochs"):
            if basis in est and measured:
                print(f"| {name} | {est[basis]:.0f} s | {basis} | {measured:.0f} s | {est[basis] / measured:.2f} | "
                      f"{wall:.0f} s |")
    print(f"\nmachine: {os.cpu_count()} CPU cores; command lines and logs under {root}")


if __name__ == "__main__":
    main()
