"""Regenerate every picture the docs show, from short runs on built-in data (nothing is downloaded).

    python docs/figures/make_figures.py                  # all figures -> docs/figures/*.png (runs in runs/figures/)
    python docs/figures/make_figures.py --only freezeout # one of: demo segment incremental continual freezeout

Figures and the runs behind them (every run through the Python API, i.e. the same path as the CLI):

- demo_reconstruction.png: `mimkit visualize` of the demo's final weights (`mimkit pretrain`, the full 60-epoch
  demo) on four held-out crops of the built-in photos, mask seed 0.
- demo_reconstruction_before.png: the same picture for the demo's weights after one optimiser step
  (`mimkit pretrain --max_steps 1`): essentially the random start.
- segment_overlay.png: the first val overlay of `mimkit segment --finetune <the demo>` (the demo preset on
  built-in texture mosaics, 6 epochs).
- incremental.png: `mimkit incremental incremental/digits.yaml --method kd` (5 tasks x 2 classes, 3 epochs each).
- continual_matrix.png: `mimkit continual --continual_checkpoint <the demo>` (photos -> microscopy -> textures,
  3 epochs per stage).
- freezeout_schedule.png: `mimkit.engine.freezeout.freeze_times` for a 12-block encoder (no training).

Time, measured on the 2-core AMD EPYC of the sessions (torch 2.14.1), shared with other jobs while it ran (load
average 5-8), so the wall clock is an upper bound: `/usr/bin/time -v python docs/figures/make_figures.py` took
1562 s of user CPU time (+18 s system) and 46 min wall: FreezeOut plot 11 s, demo (the full 60 epochs, the one-step
run and two `visualize` calls) 1642 s, segment 516 s, incremental 338 s, continual 251 s. The full demo alone takes
110 s on an idle machine. Needs matplotlib (the `docs` extra) for the FreezeOut plot.
Each PNG is kept under 200 KB (palette-quantised when larger).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 200_000


def _save_small(src: Path, dst: Path) -> None:
    """Copy a PNG to the docs, palette-quantised if it is over MAX_BYTES."""
    from PIL import Image

    shutil.copyfile(src, dst)
    if dst.stat().st_size > MAX_BYTES:
        Image.open(src).convert("RGB").quantize(colors=128).save(dst, optimize=True)
    print(f"wrote {dst.relative_to(HERE.parents[1])} ({dst.stat().st_size // 1000} KB)")


def _sample_images(out: Path, n: int = 4) -> list[Path]:
    """n held-out crops of the built-in photos, written as PNG files (visualize reads files)."""
    import numpy as np
    from PIL import Image

    from mimkit.data.builtin import builtin_dataset

    ds = builtin_dataset("photos", "val")
    paths = []
    for i, idx in enumerate(np.linspace(0, len(ds) - 1, n).astype(int)):
        img = ds[int(idx)][0]
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        paths.append(out / f"photo_{i}.png")
        img.save(paths[-1])
    return paths


def demo(runs: Path, epochs: int | None = None) -> Path:
    """The demo's reconstructions before and after training (`epochs`: None = the demo's 60); returns its folder."""
    import mimkit

    runs.mkdir(parents=True, exist_ok=True)
    start = mimkit.pretrain(output_dir=str(runs / "demo_start"), max_steps=1, no_auto_resume=True)
    trained = mimkit.pretrain(output_dir=str(runs / "demo"), epochs=epochs)  # resumes (or finds finished) when rerun
    images = _sample_images(runs)
    for run, name in ((start, "demo_reconstruction_before.png"), (trained, "demo_reconstruction.png")):
        pic = mimkit.visualize(str(run.checkpoint), *[str(p) for p in images], output=str(runs / name), seed=0)
        _save_small(Path(pic.output_dir), HERE / name)
    return runs / "demo"


def segment(runs: Path, demo_dir: Path, epochs: int | None = None) -> None:
    """A segmentation overlay of the demo preset, the encoder started from the demo's weights."""
    import mimkit

    run = mimkit.segment(finetune=str(demo_dir / "checkpoints" / "final.pt"), output_dir=str(runs / "segment"),
                         epochs=epochs)
    overlay = sorted((run.output_dir / "overlays").glob("*.png"))[0]
    big = runs / "segment_overlay_x4.png"  # the overlay is at the 64-px crop: enlarged (nearest) to be seen
    from PIL import Image

    img = Image.open(overlay)
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(big)
    _save_small(big, HERE / "segment_overlay.png")


def incremental(runs: Path, epochs: int | None = None) -> None:
    """The accuracy matrix + RankMe picture of a KD run on digits."""
    import mimkit

    run = mimkit.incremental("incremental/digits.yaml", method="kd", output_dir=str(runs / "incremental"),
                             epochs=epochs)
    _save_small(run.output_dir / "incremental.png", HERE / "incremental.png")


def continual(runs: Path, demo_dir: Path, epochs: int | None = None) -> None:
    """The continual demo's stage x domain matrices, from the demo's weights."""
    import mimkit

    run = mimkit.continual(continual_checkpoint=str(demo_dir / "checkpoints" / "final.pt"),
                           output_dir=str(runs / "continual"), epochs=epochs)
    _save_small(run.output_dir / "matrix.png", HERE / "continual_matrix.png")


def freezeout(runs: Path) -> None:
    """When each block of a 12-block encoder freezes, per how_scale, for t_0 = 0.8 and 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimkit.engine.freezeout import SCALES, freeze_times

    depth = 12
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True, dpi=90)
    for ax, t_0 in zip(axes, (0.8, 0.5)):
        for how in SCALES:
            ax.plot(range(depth), freeze_times(depth, t_0, how), marker="o", ms=3, label=how)
        ax.set_title(f"--t_0 {t_0}")
        ax.set_xlabel("encoder block i")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("frozen from (fraction of training)")
    axes[1].legend(title="--how_scale", loc="lower right")
    fig.tight_layout()
    runs.mkdir(parents=True, exist_ok=True)
    fig.savefig(runs / "freezeout_schedule.png")
    _save_small(runs / "freezeout_schedule.png", HERE / "freezeout_schedule.png")


def main(argv: list[str] | None = None) -> int:
    """Run the figure makers asked for (all by default), timing each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("demo", "segment", "incremental", "continual", "freezeout"),
                        help="make only these figures (segment and continual reuse the demo run when present)")
    parser.add_argument("--runs", default="runs/figures", help="folder of the runs behind the figures")
    parser.add_argument("--demo_epochs", type=int, default=None,
                        help="train the demo for N epochs instead of its 60 (a loaded machine; the caption says so)")
    parser.add_argument("--short", action="store_true",
                        help="segment 2 epochs, incremental 1 epoch per task, continual 1 epoch per stage "
                             "(instead of their presets' 6, 3, 3)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    todo = args.only or ["freezeout", "demo", "segment", "incremental", "continual"]
    demo_dir = runs / "demo"
    t0 = time.perf_counter()
    for name in todo:
        t = time.perf_counter()
        if name == "demo" or (name in ("segment", "continual") and not (demo_dir / "checkpoints/final.pt").is_file()):
            demo_dir = demo(runs, args.demo_epochs)
        if name == "segment":
            segment(runs, demo_dir, 2 if args.short else None)
        elif name == "continual":
            continual(runs, demo_dir, 1 if args.short else None)
        elif name == "incremental":
            incremental(runs, 1 if args.short else None)
        elif name == "freezeout":
            freezeout(runs)
        print(f"{name}: {time.perf_counter() - t:.0f} s")
    print(f"all: {time.perf_counter() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    sys.exit(main())
