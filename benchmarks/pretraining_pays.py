"""Does MAE pretraining pay? Pretrained vs random init of the same encoder, on held-out data of the same domain.

For each built-in labelled set (digits; photos: crops of scikit-image's photos labelled by source image, val
crops from a held-out region of every image) and each seed:
  1. pretrain a tiny MAE on the set's own train images, labels unused (configs/pretrain/<set>.yaml);
  2. held-out reconstruction loss of the pretrained encoder vs its random-init twin (a sanity row);
  3. k-NN on the frozen features (all labels);
  4. linear probe (configs/linprobe/<set>.yaml) and fine-tuning (configs/finetune/<set>.yaml) with all labels,
     10 % of the labels and 5 labels per class (the labelled subset drawn by the seed; val always whole),
     from the pretrained weights and from random weights of the same architecture (`--random_init`).
Writes <out>/pretraining_pays.md (mean ± std over seeds, paired difference) and <out>/pretraining_pays.json.

    python benchmarks/pretraining_pays.py                         # the whole study on CPU (docs/evaluation.md)
    python benchmarks/pretraining_pays.py --sets digits --seeds 0 # one set, one seed
    python benchmarks/pretraining_pays.py --checkpoint runs/demo --sets photos --evals knn,probe --label_sets 5pc
                                                                  # what a given encoder (the demo's) bought
    python benchmarks/pretraining_pays.py --amp bf16 --evals recon,knn,probe
                                                                  # bf16 autocast vs the fp32 runs above

Every run's results are kept under <out>; a rerun reuses finished runs (delete <out> to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pays_lib as L  # noqa: E402
from machine_info import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVALS = ("recon", "knn", "probe", "finetune")
LABEL_SETS = ("all", "10pct", "5pc")
# A tiny setting for the tests: a few epochs of everything.
TINY = {
    "pretrain": {"schedule.epochs": 2, "schedule.warmup_epochs": 1},
    "probe": {"schedule.epochs": 2, "schedule.warmup_epochs": 0},
    "finetune": {"schedule.epochs": 1, "schedule.warmup_epochs": 0},
}


def machine() -> str:
    """One line: CPU model, cores, GPU, torch."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


class NotRun(Exception):
    """--collect: a run that has not finished."""


COLLECT_ONLY = False


def cached(path: Path, fn) -> dict:
    """fn() once: its result is kept in `path` (JSON) and read back on a rerun (--collect: never run)."""
    if path.exists():
        return json.loads(path.read_text())
    if COLLECT_ONLY:
        raise NotRun(str(path))
    out = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def maybe(path: Path, fn) -> Optional[dict]:
    """cached(), or None for a run --collect finds unfinished."""
    try:
        return cached(path, fn)
    except NotRun:
        return None


def run_seed(data: str, seed: int, out: Path, evals: list[str], label_sets: list[str], checkpoint: Optional[str],
             extra: dict) -> list[dict]:
    """Every evaluation of one set and seed: one record per (eval, labels, init); --collect: the finished ones."""
    rows: list[dict] = []
    try:
        _run_seed(rows, data, seed, out, evals, label_sets, checkpoint, extra)
    except NotRun:
        pass
    for r in rows:
        r.update(data=data, seed=seed)
    return rows


def _run_seed(rows: list[dict], data: str, seed: int, out: Path, evals: list[str], label_sets: list[str],
              checkpoint: Optional[str], extra: dict) -> None:
    amp = extra.get("amp", "off")
    # fp32 runs keep the plain folder names; another precision gets its own, never mixed with fp32 results
    run = out / data / (f"seed{seed}" if amp == "off" else f"seed{seed}_amp-{amp}")
    if checkpoint is None:
        def do_pretrain() -> dict:
            r = L.pretrain(f"pretrain/{data}.yaml", data, run / "pretrain", seed, **extra.get("pretrain", {}))
            rec = {"checkpoint": r["checkpoint"], "loss": r["loss"], "cpu_s": r["cpu_s"]}
            if "recon" in evals:
                rand = L.random_twin(r["checkpoint"], seed)
                rec["recon"] = {"pretrained": L.heldout_loss(r["model"], data), "random": L.heldout_loss(rand, data)}
            return rec

        pre = cached(run / "pretrain.json", do_pretrain)
        checkpoint = pre["checkpoint"]
        rows.append({"eval": "pretraining", "labels": "none", "init": "pretrained", "cpu_s": pre["cpu_s"],
                     "value": pre["loss"]})
        if "recon" in evals and "recon" in pre:
            for init, key in (("pretrained", "pretrained"), ("random", "random")):
                rows.append({"eval": "recon", "labels": "none", "init": init, "value": pre["recon"][key]})
    for init, rnd in (("pretrained", False), ("random", True)):
        if "knn" in evals and (m := maybe(run / f"knn_{init}.json", lambda: L.knn(
                checkpoint, data, rnd, seed, ks=(20,), pool="avg", amp=amp))):
            rows.append({"eval": "knn", "labels": "all", "init": init, "value": m["knn_k20"]})
        for labels in label_sets:
            # few-label rows: several labelled subsets per seed (draw 0 is the seed's first), averaged per seed
            n_probe, n_ft = (1, 1) if labels == "all" else (extra["draws"], extra["finetune_draws"])
            for draw in range(max(n_probe, n_ft)):
                d = L.labelled(data, labels, out / "subsets", seed, draw=draw)
                name = labels + (f"_draw{draw}" if draw else "")
                if "probe" in evals and draw < n_probe and (m := maybe(run / f"probe_{name}_{init}.json", lambda: L.linprobe(
                        f"linprobe/{data}.yaml", checkpoint, d, run / f"probe_{name}_{init}", rnd, seed,
                        **extra.get("probe", {})))):
                    rows.append({"eval": "probe", "labels": labels, "draw": draw, "init": init, "value": m["acc1"],
                                 "cpu_s": m["cpu_s"]})
                if "finetune" in evals and draw < n_ft and (m := maybe(run / f"finetune_{name}_{init}.json", lambda: L.finetune(
                        f"finetune/{data}.yaml", checkpoint, d, run / f"finetune_{name}_{init}", rnd, seed,
                        **extra.get("finetune", {})))):
                    rows.append({"eval": "finetune", "labels": labels, "draw": draw, "init": init, "value": m["acc1"],
                                 "cpu_s": m["cpu_s"], "train_loss_first": m.get("train_loss_first"),
                                 "train_loss_last": m.get("train_loss_last")})


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _job(job: tuple) -> list[dict]:
    data, seed = job[:2]
    print(f"{data}, seed {seed} ...", flush=True)
    t = time.time()
    with L.quiet_logs():
        rows = run_seed(*job)
    print(f"{data}, seed {seed} done in {time.time() - t:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (data, eval, labels), pretrained and random, and the paired difference."""
    out = []
    keys = sorted({(r["data"], r["eval"], r["labels"]) for r in rows if r["eval"] != "pretraining"},
                  key=lambda k: (k[0], list(EVALS).index(k[1]), list(LABEL_SETS + ("none",)).index(k[2])))
    for data, ev, labels in keys:
        by: dict[str, dict[int, float]] = {}
        draws: dict[str, dict[int, list[float]]] = {}
        for init in ("pretrained", "random"):
            per_seed: dict[int, list[float]] = {}
            for r in rows:
                if (r["data"], r["eval"], r["labels"], r["init"]) == (data, ev, labels, init):
                    per_seed.setdefault(r["seed"], []).append(r["value"])
            draws[init] = per_seed
            by[init] = {s: float(np.mean(v)) for s, v in per_seed.items()}  # a seed's value: mean over its draws
        seeds = sorted(set(by["pretrained"]) & set(by["random"]))
        if not seeds:
            continue
        pre = np.array([by["pretrained"][s] for s in seeds])
        rnd = np.array([by["random"][s] for s in seeds])
        diff = pre - rnd
        sd = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)
        better = (diff < 0) if ev == "recon" else (diff > 0)
        n_draws = sorted({len(draws[i][s]) for i in draws for s in seeds})
        out.append({"data": data, "eval": ev, "labels": labels, "seeds": seeds, "draws": n_draws,
                    "pretrained": pre.tolist(), "random": rnd.tolist(),
                    "pretrained_mean": float(pre.mean()), "pretrained_std": sd(pre),
                    "random_mean": float(rnd.mean()), "random_std": sd(rnd),
                    "diff_mean": float(diff.mean()), "diff_std": sd(diff), "pretrained_better": int(better.sum())})
    return out


def _order(key: tuple) -> tuple:
    return key[0], list(EVALS).index(key[1]), list(LABEL_SETS + ("none",)).index(key[2])


def _pm(values: np.ndarray, fmt: str, sign: bool = False) -> str:
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    mean = float(values.mean())
    return f"{'+' if sign and mean >= 0 else ''}{fmt.format(mean)} ± {fmt.format(sd)}"


def per_seed(rows: list[dict]) -> list[dict]:
    """Rows with a few-label evaluation's draws collapsed: one row per (set, eval, labels, init, seed), their mean."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["eval"], r["labels"], r["init"], r["seed"]), []).append(r)
    return [{**g[0], "value": float(np.mean([r["value"] for r in g])), "draws": len(g)} for g in groups.values()]


def versus_fp32(rows: list[dict], fp32_rows: list[dict]) -> str:
    """Markdown: each (set, eval, labels, init) of `rows` beside the fp32 runs of the same seeds, paired."""
    def key(r: dict) -> tuple:
        return r["data"], r["eval"], r["labels"], r["init"]

    rows, fp32_rows = per_seed(rows), per_seed(fp32_rows)

    fp = {(*key(r), r["seed"]): r["value"] for r in fp32_rows}
    lines = ["| set | evaluation | labels | init | fp32 | this precision | difference (paired) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted({key(r) for r in rows if r["eval"] != "pretraining"}, key=_order):
        pairs = sorted((r["seed"], fp[(*k, r["seed"])], r["value"]) for r in rows
                       if key(r) == k and (*k, r["seed"]) in fp)
        if not pairs:
            continue
        a, b = np.array([x[1] for x in pairs]), np.array([x[2] for x in pairs])
        fmt = "{:.3f}" if k[1] == "recon" else "{:.1f}"
        lines.append(f"| {k[0]} | {EVAL_NAMES[k[1]]} | {LABEL_NAMES[k[2]]} | {k[3]} | {_pm(a, fmt)} | {_pm(b, fmt)} "
                     f"| {_pm(b - a, fmt, sign=True)} | {len(pairs)} |")
    return "\n".join(lines)


LABEL_NAMES = {"all": "all labels", "10pct": "10 % of labels", "5pc": "5 per class", "none": "-"}
EVAL_NAMES = {"recon": "held-out reconstruction loss (lower is better)", "knn": "k-NN top-1 %, k = 20",
              "probe": "linear probe top-1 %", "finetune": "fine-tuning top-1 %"}


def caption(checkpoint: Optional[str], n_seeds: int) -> str:
    """What the table's columns mean, printed under it."""
    spread = "mean ± std over the seeds" if n_seeds > 1 else "one seed, so no spread"
    lines = [f"Val top-1 % (k-NN, probe, fine-tuning) and masked reconstruction loss on val images; {spread}; "
             "'pretrained - random' is the paired difference, seed by seed; 'pretrained better': seeds where "
             "pretrained beats random init. A '(mean of N draws)' row is, per seed, the mean over N labelled "
             "subsets of that size (--draws)."]
    if checkpoint is not None:
        lines.append(f"'pretrained' is the encoder of --checkpoint {checkpoint} (the same for every seed; 'random' "
                     "is its architecture with random weights); no reconstruction row: it compares a pretraining "
                     "run with its random twin.")
    return "\n".join(lines)


def markdown(summary: list[dict]) -> str:
    """The study's table."""
    lines = ["| set | evaluation | labels | random init | pretrained | pretrained - random | pretrained better |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        fmt = "{:.3f}" if s["eval"] == "recon" else "{:.1f}"
        one = len(s["seeds"]) == 1  # one seed: a value, no spread to show
        pm = lambda m, d: fmt.format(m) if one else f"{fmt.format(m)} ± {fmt.format(d)}"  # noqa: E731
        n = s.get("draws", [1])
        labels = LABEL_NAMES[s["labels"]] + (f" (mean of {n[0]} draws)" if n != [1] and len(n) == 1 else
                                             f" (draws {'/'.join(map(str, n))})" if n != [1] else "")
        lines.append(f"| {s['data']} | {EVAL_NAMES[s['eval']]} | {labels} | "
                     f"{pm(s['random_mean'], s['random_std'])} | {pm(s['pretrained_mean'], s['pretrained_std'])} | "
                     f"{'+' if s['diff_mean'] >= 0 else ''}{pm(s['diff_mean'], s['diff_std'])} | "
                     f"{s['pretrained_better']}/{len(s['seeds'])} |")
    return "\n".join(lines)


SETS = ("digits", "photos")  # the built-in labelled sets with study presets (configs/{pretrain,linprobe,finetune})


def check_arguments(a: argparse.Namespace, label_sets: list[str]) -> Optional[str]:
    """One line naming the first bad argument (set, label set, checkpoint, jobs), or None: checked before any work."""
    from mimkit.errors import UserError, suggest
    from mimkit.io import resolve_checkpoint

    for name in a.sets:
        if name not in SETS:
            hint = " (--sets takes names separated by spaces)" if "," in name else suggest(name, SETS)
            return f"unknown set '{name}'{hint}; the study's sets: {', '.join(SETS)}"
    for labels in label_sets:
        if not (labels == "all" or (labels.endswith("pct") and labels[:-3].isdigit() and 0 < int(labels[:-3]) <= 100)
                or (labels.endswith("pc") and labels[:-2].isdigit() and int(labels[:-2]) > 0)):
            return (f"label set '{labels}': use all, <n>pc (n labels per class, e.g. 5pc) or <p>pct (p % of each "
                    f"class, e.g. 10pct)")
    if a.jobs < 1:
        return "--jobs must be at least 1 (1 = in this process)"
    if a.checkpoint is not None:
        try:
            resolve_checkpoint(a.checkpoint)
        except UserError as e:
            return str(e)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    """Run the study (or the part asked for) and write its table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./runs/pretraining_pays", help="study folder (default: %(default)s)")
    p.add_argument("--sets", nargs="+", default=["digits", "photos"], help="built-in sets (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)")
    p.add_argument("--evals", default=",".join(EVALS), help="comma list of %s (default: %%(default)s)"
                   % ", ".join(EVALS))
    p.add_argument("--label_sets", default=",".join(LABEL_SETS),
                   help="comma list of all, <p>pct, <n>pc (default: %(default)s)")
    p.add_argument("--draws", type=int, default=8, help="labelled subsets drawn per seed for each few-label probe; "
                   "a seed's value is the mean over its draws, so the spread over seeds is not one subset's luck "
                   "(default: %(default)s)")
    p.add_argument("--finetune_draws", type=int, default=1, help="the same for each few-label fine-tune (each draw "
                   "is a whole fine-tuning run) (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="evaluate this encoder instead of pretraining one per seed "
                   "(default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-threaded processes, one per core "
                   "(1 = in this process) (default: %(default)s)")
    p.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="precision of every training run: off = fp32, the same numbers on any CPU; bf16 = autocast "
                   "(its runs go to seed<N>_amp-bf16 folders, its table to pretraining_pays_amp-bf16.md, with the "
                   "fp32 runs of the same --out beside it, seed by seed) (default: %(default)s)")
    p.add_argument("--collect", action="store_true", help="only assemble the table from finished runs in --out "
                   "(default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="a few epochs of everything: checks the pipeline, "
                   "not the claim (default: %(default)s)")
    a = p.parse_args(argv)
    out = Path(a.out)
    evals = [e for e in a.evals.split(",") if e]
    unknown = set(evals) - set(EVALS)
    if unknown:
        p.error(f"unknown evals {sorted(unknown)}; choose from {', '.join(EVALS)}")
    label_sets = [x for x in a.label_sets.split(",") if x]
    problem = check_arguments(a, label_sets)
    if problem:
        p.error(problem)
    extra: dict[str, Any] = {stage: {**(TINY[stage] if a.tiny else {}), "misc.amp": a.amp} for stage in TINY}
    extra["amp"] = a.amp
    if a.draws < 1 or a.finetune_draws < 1:
        p.error("--draws and --finetune_draws must be at least 1")
    extra["draws"], extra["finetune_draws"] = a.draws, a.finetune_draws
    global COLLECT_ONLY
    COLLECT_ONLY = a.collect
    t0, c0 = time.time(), time.process_time()
    jobs = [(data, seed, out, evals, label_sets, a.checkpoint, extra) for seed in a.seeds for data in a.sets]
    rows: list[dict] = []
    if a.jobs <= 1:
        for job in jobs:
            rows += _job(job)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # one single-threaded process per core: tiny models use a core far better than two threads do
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("fork"), initializer=_one_thread) as pool:
            for r in pool.map(_job, jobs):
                rows += r
    summary = summarise(rows)
    cpu = sum(r.get("cpu_s") or 0.0 for r in rows)
    table = markdown(summary) + "\n\n" + caption(a.checkpoint, len(a.seeds))
    name = "pretraining_pays" if a.amp == "off" else f"pretraining_pays_amp-{a.amp}"
    if a.amp != "off":  # the same runs in fp32, where this --out has them: the precision's effect, seed by seed
        COLLECT_ONLY = True
        fp32 = [r for job in jobs for r in run_seed(*job[:-1], {**extra, "amp": "off"})]
        table += ("\n\nThe same runs, fp32 (`--amp off`, finished in this --out) vs " + a.amp + ":\n\n"
                  + versus_fp32(rows, fp32))
    cmd = "python benchmarks/pretraining_pays.py" + "".join(
        " " + shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    precision = "fp32" if a.amp == "off" else a.amp
    header = (f"Command: `{cmd}`  \nMachine: {machine()}; precision: {precision}  \n"
              f"CPU time of the training runs: {cpu:.0f} s "
              f"(process time, all threads); wall time of this invocation: {time.time() - t0:.0f} s "
              f"(runs reused from {out} are not re-timed)\n")
    (out / f"{name}.md").write_text(header + "\n" + table + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"command": cmd, "machine": machine(), "amp": a.amp, "cpu_s": cpu, "process_cpu_s": time.process_time() - c0,
         "summary": summary, "runs": rows}, indent=1))
    print("\n" + table)
    print(f"\ntable: {out / (name + '.md')}  data: {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
