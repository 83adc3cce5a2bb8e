"""Does MAE pretraining help UperNet segmentation from few masks? mIoU on held-out built-in mosaics, 3 seeds each:

    random      the tiny encoder with random weights
    demo        the encoder of `mimkit pretrain` (the embedded demo: photos + textures)
    sources     the same pretraining recipe on crops of the mosaics' own source images (train regions only)

    python benchmarks/segmentation_study.py --out ./seg_study            # CPU; resumable (finished runs are kept)
    python benchmarks/segmentation_study.py --out ./seg_study --epochs 10 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/segmentation_study.py --parallel 6     # a shared, loaded machine

Writes <out>/study.json and <out>/study.md (the table, the commands, the machine) for docs/segmentation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MIMKIT = [sys.executable, "-m", "mimkit"]


def machine() -> str:
    """One line describing where the numbers came from."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, {dev}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def sh_all(cmds: list[list[str]], log: list[str], parallel: int, out: Path) -> None:
    """Run mimkit commands (printed and recorded), `parallel` at a time, each logging to <out>/<n>.log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            text = " ".join(shlex.quote(c) for c in ["mimkit"] + cmd[3:])
            print(f"$ {text}", flush=True)
            log.append(text)
            f = open(out / f"cmd{len(log):02d}_{Path(cmd[cmd.index('--output_dir') + 1]).name}.log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), text, f))
        proc, text, f = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"failed ({proc.returncode}): {text} (see {f.name})")
        f.close()


def write_source_crops(folder: Path) -> int:
    """The mosaics' source images as a flat folder of 128 px crops (train regions only, the demo's recipe)."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "src"))
    from mimkit.data.builtin import DEMO_CROPS, DEMO_PX, DEMO_SIDE, make_crops
    from mimkit.data.mosaics import mosaic_sources

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in mosaic_sources():
        for i, crop in enumerate(make_crops(s, "train", DEMO_CROPS["train"], DEMO_PX, DEMO_SIDE, True)):
            Image.fromarray(crop).save(folder / f"{s}_{i:03d}.png")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """Pretrain the two encoders, fine-tune 3 inits x seeds, tabulate mIoU mean +- std."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./seg_study", help="output folder (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="segmentation epochs (15 steps each)")
    p.add_argument("--pretrain_epochs", type=int, default=5, help="pretraining epochs (the demo preset has 60)")
    p.add_argument("--warmup_iters", type=int, default=5, help="segmentation warmup steps")
    p.add_argument("--parallel", type=int, default=4, help="runs at a time")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []

    demo, src = out / "pretrain_demo", out / "pretrain_sources"
    ckpts = {"random": None, "demo": demo / "checkpoints" / "final.pt", "sources": src / "checkpoints" / "final.pt"}
    pre = []
    if not ckpts["demo"].exists():
        pre.append(MIMKIT + ["pretrain", "--output_dir", str(demo), "--epochs", str(args.pretrain_epochs),
                             "--no_auto_resume"])
    else:
        log.append(f"mimkit pretrain --output_dir {demo} --epochs {args.pretrain_epochs} --no_auto_resume")
    if not ckpts["sources"].exists():
        n = write_source_crops(out / "source_crops")
        print(f"wrote {n} source crops to {out / 'source_crops'}")
        pre.append(MIMKIT + ["pretrain", "pretrain/demo.yaml", "--data_path", str(out / "source_crops"),
                             "--output_dir", str(src), "--epochs", str(args.pretrain_epochs), "--no_auto_resume"])
    else:
        log.append(f"mimkit pretrain pretrain/demo.yaml --data_path {out / 'source_crops'} --output_dir {src} "
                   f"--epochs {args.pretrain_epochs} --no_auto_resume   # source_crops: write_source_crops()")

    def run_dir(init: str, seed: int) -> Path:
        return out / f"segment_{init}_seed{seed}"

    def seg_cmds(inits: list[str]) -> list[list[str]]:
        cmds = []
        for seed in args.seeds:
            for init in inits:
                if not (run_dir(init, seed) / "results.json").exists():
                    cmds.append(MIMKIT + ["segment", "--seed", str(seed), "--epochs", str(args.epochs),
                                          "--output_dir", str(run_dir(init, seed)), "--no_auto_resume",
                                          "--num_workers", "0", "--warmup_iters", str(args.warmup_iters),
                                          "logging.tensorboard=false"]
                                + (["--finetune", str(ckpts[init])] if ckpts[init] is not None else []))
        return cmds

    if pre:
        sh_all(pre + seg_cmds(["random"]), log, args.parallel, out)  # random init needs no pretraining
        sh_all(seg_cmds(["demo", "sources"]), log, args.parallel, out)
    else:
        sh_all(seg_cmds(["random", "demo", "sources"]), log, args.parallel, out)
    rows = {}
    for init in ckpts:
        for seed in args.seeds:
            m = json.loads((run_dir(init, seed) / "results.json").read_text())["metrics"]
            rows.setdefault(init, []).append({"seed": seed, "mIoU": m["mIoU"], "aAcc": m["aAcc"], "mDice": m["mDice"]})

    def ms(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.2f} ± {sd:.2f}"

    lines = ["| encoder | mIoU (%) | pixel acc. (%) | mDice (%) | per seed mIoU |", "|---|---|---|---|---|"]
    for init, rs in rows.items():
        per_seed = ", ".join(f"{r['mIoU']:.2f}" for r in rs)
        lines.append(f"| {init} | {ms([r['mIoU'] for r in rs])} | {ms([r['aAcc'] for r in rs])} | "
                     f"{ms([r['mDice'] for r in rs])} | {per_seed} |")
    table = "\n".join(lines)
    md = (f"{table}\n\nMachine: {machine()}.\n\nCommands (in `{out}`):\n\n```\n"
          + "\n".join(log or ["(all runs were already there)"]) + "\n```\n")
    (out / "study.md").write_text(md)
    (out / "study.json").write_text(json.dumps({"rows": rows, "machine": machine(), "commands": log}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
