"""Measure seed 000's claims: every freeze_mode x loss_mode on a built-in domain sequence from one start.

Runs `mimkit continual --sweep` (preset configs/continual/sweep.yaml unless you give data or a config) and writes
docs/continual.md: the command, the machine, and the tables (final reconstruction loss and k-NN accuracy per
domain, average forgetting, backward transfer, drop on the pretraining domain, trainable parameters, wall time).

    python benchmarks/continual_sweep.py                       # CPU, a few minutes; rewrites docs/continual.md
    python benchmarks/continual_sweep.py --out /tmp/sweep -- --device cuda schedule.epochs=10
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def machine() -> str:
    """One line describing where the numbers came from."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, {dev}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, then put its table into docs/continual.md between the sweep markers."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./continual_sweep", help="sweep output folder (resumable)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "continual.md"), help="page to (re)write the table into")
    p.add_argument("extra", nargs="*", help="more arguments for `mimkit continual --sweep` (after --)")
    args = p.parse_args(argv)
    from mimkit.api import run_command

    cli = ["continual", "--sweep", "--output_dir", args.out, *args.extra]
    t0 = time.perf_counter()
    rc = run_command(cli[0], cli[1:]).exit_code
    if rc:
        return rc
    wall = time.perf_counter() - t0
    table = (Path(args.out) / "sweep.md").read_text().strip()
    block = "\n".join([
        BEGIN,
        f"Command: `python benchmarks/continual_sweep.py{' -- ' + shlex.join(args.extra) if args.extra else ''}` "
        f"(= `mimkit {shlex.join(cli)}`)  ",
        f"Machine: {machine()}  ",
        f"Total wall time of this run: {wall:.0f} s (stages already finished in the output folder are not re-run)",
        "",
        table,
        END,
    ])
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# Continual pretraining\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"table written to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
