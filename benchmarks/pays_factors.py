"""One factor run of the "pretraining pays" investigation: pretrain (or reuse) an encoder, evaluate it and its
random-init twin on a labelled set, append one JSON line to a results file. docs/evaluation_log.md lists the runs.

    python benchmarks/pays_factors.py --tag digits_p4 --data digits \
        --pre model.kwargs.patch_size=4 schedule.epochs=40 --ft schedule.epochs=10
    python benchmarks/pays_factors.py --tag probe_cls_s0 --data photos --seed 0 --evals probe --few 10pct,5pc \
        --draws 4 --checkpoint <study>/photos/seed0/pretrain/checkpoints/final.pt \
        --probe_preset linprobe/photos.yaml --probe model.global_pool=false optimization.weight_decay=0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pays_lib as L  # noqa: E402


def kv(items: list[str]) -> dict:
    """['a.b=1', ...] -> {'a.b': 1} with YAML-parsed values."""
    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--data", default="digits", help="labelled set to evaluate on")
    p.add_argument("--pretrain_data", default=None, help="unlabelled set to pretrain on (default: --data)")
    p.add_argument("--pretrain_preset", default="pretrain/demo.yaml")
    p.add_argument("--checkpoint", default=None, help="reuse this encoder instead of pretraining")
    p.add_argument("--pre", nargs="*", default=[], help="pretraining overrides key=value")
    p.add_argument("--probe_preset", default="linprobe/digits.yaml")
    p.add_argument("--ft_preset", default="finetune/digits.yaml")
    p.add_argument("--probe", nargs="*", default=[], help="probe overrides")
    p.add_argument("--ft", nargs="*", default=[], help="fine-tuning overrides")
    p.add_argument("--evals", default="knn,probe,ft", help="comma list of knn, probe, ft, recon")
    p.add_argument("--few", default="", help="comma list of few-label settings for probe/ft: 5pc,10pct")
    p.add_argument("--draws", type=int, default=1, help="labelled subsets per few-label setting (draw 0 is the "
                   "study's; as pretraining_pays.py --draws)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_random", action="store_true", help="skip the random-init twin")
    p.add_argument("--amp", default="off", help="misc.amp of every training run (off = fp32, as the study)")
    p.add_argument("--out", default="/tmp/pays")
    p.add_argument("--results", default="/tmp/pays/results.jsonl")
    a = p.parse_args()
    with L.quiet_logs():
        return run(a)


def run(a: argparse.Namespace) -> int:
    """Pretrain (or reuse) one encoder, evaluate it and its random twin, append the record."""
    out = Path(a.out) / a.tag
    amp = {"misc.amp": a.amp}
    rec: dict = {"tag": a.tag, "amp": a.amp, "data": a.data, "pre": a.pre, "probe": a.probe, "ft": a.ft,
                 "seed": a.seed, "argv": sys.argv[1:]}
    evals = a.evals.split(",")
    t0 = time.time()
    if a.checkpoint:
        ckpt = a.checkpoint
    else:
        r = L.pretrain(a.pretrain_preset, a.pretrain_data or a.data, out / "pretrain", a.seed, **amp, **kv(a.pre))
        ckpt = r["checkpoint"]
        rec.update(pretrain_loss=r["loss"], pretrain_cpu_s=r["cpu_s"])
        if "recon" in evals:
            rec["heldout_recon"] = L.heldout_loss(r["model"], a.pretrain_data or a.data)
        print(f"[{a.tag}] pretrained: loss {r['loss']:.4f} cpu {r['cpu_s']:.0f}s", flush=True)
    rec["checkpoint"] = ckpt
    inits = [("pre", False)] + ([] if a.no_random else [("rand", True)])
    # the study's labelled subsets (same draw, same repetition), so a factor run's rows compare with its table
    sets = [("all", a.data)] + [
        (f + (f"_draw{d}" if d else ""), L.labelled(a.data, f, Path(a.out) / "subsets", a.seed, draw=d))
        for f in filter(None, a.few.split(",")) for d in range(a.draws)]
    for name, rnd in inits:
        if "knn" in evals:
            for pool in ("cls", "avg"):
                rec[f"{name}.knn.{pool}"] = L.knn(ckpt, a.data, rnd, a.seed, pool=pool, amp=a.amp)
                print(f"[{a.tag}] {name} knn {pool} {rec[f'{name}.knn.{pool}']}", flush=True)
        for sname, sdata in sets:
            if "probe" in evals:
                m = L.linprobe(a.probe_preset, ckpt, sdata, out / f"probe_{name}_{sname}", rnd, a.seed, **amp,
                               **kv(a.probe))
                rec[f"{name}.probe.{sname}"] = {k: m[k] for k in ("acc1", "best_acc1", "cpu_s") if k in m}
                print(f"[{a.tag}] {name} probe {sname} {rec[f'{name}.probe.{sname}']}", flush=True)
            if "ft" in evals:
                m = L.finetune(a.ft_preset, ckpt, sdata, out / f"ft_{name}_{sname}", rnd, a.seed, **amp, **kv(a.ft))
                rec[f"{name}.ft.{sname}"] = {k: m[k] for k in ("acc1", "best_acc1", "cpu_s", "train_loss_first",
                                                               "train_loss_last") if k in m}
                print(f"[{a.tag}] {name} ft {sname} {rec[f'{name}.ft.{sname}']}", flush=True)
    rec["wall_s"] = time.time() - t0
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
