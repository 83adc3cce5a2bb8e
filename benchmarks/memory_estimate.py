"""Calibration of the memory estimate told before the work: traced activations (engine.memory.traced_peak, the
meta-device trace every training command runs) vs the measured peak of the same step on a CPU.

    python benchmarks/memory_estimate.py                 # the table in docs/benchmarks.md (a few minutes, < 3 GB)
    python benchmarks/memory_estimate.py --tiny          # seconds: one small row per command (a smoke run)

Each row runs in a fresh process: build the command's model (fp32, CPU), trace its step on the meta device as the
command does (tasks/preflight.check_memory's closures: the same loss, batch and input size), then run the step for
real -- forward + backward (or the no-grad evaluation pass) -- and measure the process's peak RSS above its RSS
just before the step, less the gradients the first backward allocates (counted apart, in state_bytes). The peak
RSS cannot be reset, hence one process per row. The ratio measured / traced is what engine.memory.CALIBRATION
must cover (the largest ratio). Memory, unlike time, does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

import torch

# (command, model, input size, batch, what): the commands' own models and closures; sizes a 2-core CPU runs
ROWS = [
    ("pretrain", "mae_vit_demo_patch8", 64, 32, "train"),
    ("pretrain", "mae_vit_demo_patch8", 128, 32, "train"),
    ("pretrain", "mae_vit_small_patch16", 224, 8, "train"),
    ("finetune", "mae_vit_demo_patch8", 64, 32, "train"),
    ("finetune", "mae_vit_demo_patch8", 128, 16, "train"),
    ("linprobe", "mae_vit_demo_patch8", 128, 32, "train"),
    ("segment", "mae_vit_demo_patch8", 128, 2, "train"),
    ("segment", "mae_vit_demo_patch8", 256, 2, "train"),
    ("segment", "mae_vit_demo_patch8", 256, 8, "eval"),
    ("incremental", "resnet18", 32, 32, "train"),
    ("incremental", "resnet18", 64, 32, "train"),
]
TINY = [("pretrain", "mae_vit_demo_patch8", 64, 8, "train"), ("finetune", "mae_vit_demo_patch8", 32, 8, "train"),
        ("linprobe", "mae_vit_demo_patch8", 32, 8, "train"), ("segment", "mae_vit_demo_patch8", 64, 2, "train"),
        ("incremental", "resnet18", 32, 8, "train")]


def rss() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def build(command: str, name: str, size: int):
    """(model, run(model, images, labels) -> loss or output, labels shape after the batch) for one command."""
    import torch.nn.functional as F

    from mimkit.models import create_model

    if command == "pretrain":
        from mimkit.tasks.pretrain.setup import pretrain_step

        step = pretrain_step(0.75, "masked_only")
        return create_model(name, img_size=size), lambda m, x, y: step(m, {"images": x})[0], ()
    if command in ("finetune", "linprobe"):
        enc = create_model(name, img_size=size)
        if command == "finetune":
            from mimkit.models.heads import vit_classifier

            return vit_classifier(enc, 10, False, 0.1), lambda m, x, y: F.cross_entropy(m(x), y), ()
        from mimkit.models.heads import LinearProbe
        from mimkit.tasks.linprobe import probe_step

        return LinearProbe(enc, 10), lambda m, x, y: probe_step(m, {"images": x, "labels": y})[0], ()
    if command == "segment":
        from mimkit.models.segmentation import segmenter_arch, segmenter_from_encoder
        from mimkit.tasks.segment.infer import whole_logits
        from mimkit.tasks.segment.recipe import seg_loss

        enc = create_model(name, img_size=size)
        arch = segmenter_arch(enc, (size, size), 4, None, 768, 256, [1, 2, 3, 6], 0.1)  # the ADE20K recipe's heads

        def run(m, x, y):
            if not m.training:
                return whole_logits(m, x)
            main, aux = m(x)
            return seg_loss(main, y, 255, False) + 0.4 * seg_loss(aux, y, 255, False)

        return segmenter_from_encoder(enc, arch, 0.1), run, (size, size)
    from mimkit.tasks.incremental.model import build_classifier

    model, _ = build_classifier(name, None, None, size, 10)
    return model, lambda m, x, y: F.cross_entropy(m(x), y), ()


def one_row(command: str, name: str, size: int, batch: int, what: str) -> dict:
    """Trace, then measure, one configuration (in this process)."""
    from mimkit.engine.memory import traced_peak

    torch.manual_seed(0)
    model, run, lshape = build(command, name, size)
    train = what == "train"
    model.train(train)
    traced = traced_peak(model, lambda m: run(m, torch.empty(batch, 3, size, size, device="meta"),
                                              torch.empty(batch, *lshape, dtype=torch.long, device="meta")),
                         backward=train)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch, *lshape))
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) if train else 0
    before = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.enable_grad() if train else torch.no_grad():
        out = run(model, x, y)
        if train:
            out.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = max(0, peak - max(before, 0) - grads)
    return {"command": command, "model": name, "size": size, "batch": batch, "pass": what, "traced": traced,
            "measured": measured, "ratio": measured / max(traced, 1), "hidden": peak <= peak_before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="one small row per command (seconds)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row as JSON, print its record
    args = p.parse_args()
    if args.row:
        print(json.dumps(one_row(*json.loads(args.row))))
        return
    torch.set_num_threads(2)
    rows = []
    print("| command | model | input | batch | pass | traced | measured | measured / traced |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in TINY if args.tiny else ROWS:
        out = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {' | '.join(map(str, spec))} | failed: {out.stderr.strip().splitlines()[-1][:120]} |||")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        mb = 2**20
        hidden = " (a lower bound: the model's build peaked higher)" if r["hidden"] else ""
        print(f"| {r['command']} | {r['model']} | {r['size']} | {r['batch']} | {r['pass']} | "
              f"{r['traced'] / mb:.0f} MiB | {r['measured'] / mb:.0f} MiB{hidden} | {r['ratio']:.2f} |")
    from mimkit.engine.memory import CALIBRATION

    worst = max((r["ratio"] for r in rows), default=float("nan"))
    print(f"\nlargest measured / traced: {worst:.2f}; engine.memory.CALIBRATION = {CALIBRATION} "
          f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
