"""The results of `mimkit continual`: stage x domain matrices, forgetting / BWT, files, heatmap and tables.

Per metric: `<metric>.csv` (initial row + one row per stage) and `<metric>.json` (forgetting, backward transfer,
drop from the starting weights), `matrix.png` (one shaded panel per metric), the summary table at the end of
log.txt, and the Markdown comparison table of a --sweep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mimkit import config as C
from mimkit.metrics import forgetting as F


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


METRICS = (  # (key, higher is better, title)
    ("recon_loss", False, "reconstruction loss (masked patches, fixed masks)"),
    ("knn_acc", True, "k-NN accuracy (%)"),
)


def matrices(state: dict, names: list[str]) -> dict[str, np.ndarray]:
    """{metric: (finished stages, domains) array} from the state's stage rows."""
    return {key: np.array([[_num(s["eval"][n][key]) for n in names] for s in state["stages"]], dtype=float)
            .reshape(len(state["stages"]), len(names)) for key, _, _ in METRICS}


DIGITS = {"recon_loss": 4, "knn_acc": 2}  # decimals shown: losses to 1e-4, accuracies (%) to 0.01


def write_results(out_dir: Path, state: dict, names: list[str], n_trained: int) -> dict[str, dict]:
    """CSV + JSON per metric (with forgetting, BWT, drop from the initial weights) and the heatmap PNG."""
    stages = [f"after_{s['name']}" for s in state["stages"]]
    summaries = {}
    for key, higher, _ in METRICS:
        R = matrices(state, names)[key]
        if R.shape[0] == 0:
            continue
        s = F.summarize(R, names, higher_is_better=higher, metric=key, stages=stages)
        s["trained_domains"] = names[:n_trained]
        s["final_average"] = _nanmean(R[-1])
        if state.get("initial"):
            init = np.array([_num(state["initial"][n][key]) for n in names])
            s["initial"] = init.tolist()
            drop = (init - R[-1]) if higher else (R[-1] - init)
            s["drop_from_initial"] = dict(zip(names, [None if math.isnan(v) else float(v) for v in drop]))
        if state.get("initial"):  # the starting weights as the first row: the drop from the start reads off it
            F.write_matrix_csv(out_dir / f"{key}.csv", np.vstack([init[None], R]), names, ["initial", *stages])
        else:
            F.write_matrix_csv(out_dir / f"{key}.csv", R, names, stages)
        F.write_matrix_json(out_dir / f"{key}.json", s)
        C.note_output(out_dir / f"{key}.json")  # the Python API returns these as the run's results
        summaries[key] = s
    heatmap(out_dir / "matrix.png", state, names)
    return summaries


def track(run: Any, out_dir: Path, summaries: dict[str, dict], step: int) -> None:
    """Into the run's trackers after a stage: average forgetting, BWT and final average per metric as scalars, each
    metric's matrix (after stage x on domain) as a table, and matrix.png."""
    scalars = {f"{key}/{name}": s[name] for key, s in summaries.items()
               for name in ("average_forgetting", "backward_transfer", "final_average")
               if s.get(name) is not None and not math.isnan(s[name])}
    run.metrics({"kind": "summary", "step": step, **scalars}, step, tb_prefix="continual")
    for key, s in summaries.items():
        rows = [[stage, *(None if v is None or math.isnan(v) else v for v in row)]
                for stage, row in zip(s["stages"], s["matrix"], strict=True)]
        run.table(f"continual/{key}_matrix", ["after", *s["domains"]], rows, step)
    png = out_dir / "matrix.png"
    if png.exists():
        from PIL import Image

        run.image("continual/matrix", np.asarray(Image.open(png).convert("RGB")), step)


def _nanmean(v: np.ndarray) -> Optional[float]:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def heatmap(path: Path, state: dict, names: list[str]) -> Path:
    """One panel per metric: rows = initial + stages, columns = domains; darker = better, values written in,
    and a colour bar beside each panel mapping shades to values (its ends: the panel's worst and best)."""
    from PIL import Image, ImageDraw

    rows = (["initial"] if state.get("initial") else []) + [f"after {s['name']}" for s in state["stages"]]
    evals = ([state["initial"]] if state.get("initial") else []) + [s["eval"] for s in state["stages"]]
    cw, ch, left, top, gap, bar_w = 92, 24, 130, 40, 30, 16
    bar_x = left + cw * len(names) + 14
    width = bar_x + bar_w + 70
    panel_h = top + max(ch * len(rows), 60)
    img = Image.new("RGB", (width, panel_h * len(METRICS) + gap), "white")
    draw = ImageDraw.Draw(img)
    for p, (key, higher, title) in enumerate(METRICS):
        y0 = p * (panel_h + gap // len(METRICS))
        vals = np.array([[_num(e[n][key]) for n in names] for e in evals], dtype=float)
        finite = vals[np.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        d = DIGITS[key]
        draw.text((4, y0 + 4), f"{title} ({'higher' if higher else 'lower'} is better)", fill="black")
        for j, n in enumerate(names):
            draw.text((left + j * cw + 4, y0 + 22), n[:14], fill="black")
        for i, r in enumerate(rows):
            y = y0 + top + i * ch
            draw.text((4, y + 6), r[:20], fill="black")
            for j in range(len(names)):
                v = vals[i, j]
                x = left + j * cw
                if math.isnan(v):
                    draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=(230, 230, 230))
                    draw.text((x + 4, y + 6), "n/a", fill="gray")
                    continue
                good = _goodness(v, lo, hi, higher)
                draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=_shade(good))
                draw.text((x + 4, y + 6), f"{v:.{d}f}", fill="white" if good > 0.6 else "black")
        # colour bar: best value at the top, worst at the bottom
        y_top, y_bot = y0 + top, y0 + panel_h - 4
        for y in range(y_top, y_bot + 1):
            good = 1.0 - (y - y_top) / max(1, y_bot - y_top)
            draw.line([bar_x, y, bar_x + bar_w, y], fill=_shade(good))
        draw.rectangle([bar_x, y_top, bar_x + bar_w, y_bot], outline="black")
        best, worst = (hi, lo) if higher else (lo, hi)
        draw.text((bar_x + bar_w + 4, y_top), f"{best:.{d}f}", fill="black")
        draw.text((bar_x + bar_w + 4, y_bot - 10), f"{worst:.{d}f}", fill="black")
        draw.text((bar_x - 2, y0 + 22), "scale", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _goodness(v: float, lo: float, hi: float, higher: bool) -> float:
    """0 = the panel's worst value, 1 = its best."""
    t = 0.5 if hi == lo else (v - lo) / (hi - lo)
    return t if higher else 1 - t


def _shade(good: float) -> tuple[int, int, int]:
    s = int(235 - 175 * good)
    return (s, s, 255)


def format_summary(state: dict, names: list[str], summaries: dict[str, dict]) -> str:
    """The table printed at the end: each metric's matrix, forgetting, drop from start, BWT."""
    lines = []
    w = max(12, *(len(n) + 2 for n in names))
    for key, higher, title in METRICS:
        s = summaries.get(key)
        if s is None:
            continue
        lines.append(f"\n{title} ({'higher' if higher else 'lower'} is better)")
        lines.append(f"{'':<24}" + "".join(f"{n:>{w}}" for n in names))
        d = DIGITS[key]
        fmt = (lambda v: f"{'n/a':>{w}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{w}.{d}f}")
        if "initial" in s:
            lines.append(f"{'initial':<24}" + "".join(fmt(v) for v in s["initial"]))
        for stage, row in zip(s["stages"], s["matrix"], strict=True):
            lines.append(f"{stage[:23]:<24}" + "".join(fmt(v) for v in row))
        lines.append(f"{'forgetting':<24}" + "".join(fmt(s['forgetting'][n]) for n in names))
        if "drop_from_initial" in s:
            lines.append(f"{'drop from initial':<24}" + "".join(fmt(s['drop_from_initial'][n]) for n in names))
        af, bwt = s["average_forgetting"], s["backward_transfer"]
        lines.append(f"average forgetting {('n/a' if af is None else f'{af:.{d}f}')}   backward transfer "
                     f"{('n/a' if bwt is None else f'{bwt:.{d}f}')}   "
                     "(positive forgetting = worse, positive BWT = better)")
    return "\n".join(lines)


def sweep_table(rows: list[dict], n_trained: int) -> str:
    """Markdown tables: final value per domain, forgetting, BWT, drop from start, trainable params, wall time."""
    names = rows[0]["domains"]
    out = []
    for key, higher, title in METRICS:
        out.append(f"\n**{title}** ({'higher' if higher else 'lower'} is better): value on each domain's val split "
                   "after the last stage; forgetting and drop from start: positive = worse; BWT: positive = better; "
                   "times: training only, all stages\n")
        head = ["freeze_mode", "loss_mode", *[f"final {n}" for n in names], "avg forgetting", "BWT",
                *[f"drop {n}" for n in names[n_trained:]], "trainable", "train wall s", "train CPU s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            s = r["summaries"].get(key, {})
            final = s.get("matrix", [[None] * len(names)])[-1]
            drop = s.get("drop_from_initial", {})
            d = DIGITS[key]
            cells = [r["freeze_mode"], r["loss_mode"], *[_f(v, d) for v in final], _f(s.get("average_forgetting"), d),
                     _f(s.get("backward_transfer"), d), *[_f(drop.get(n), d) for n in names[n_trained:]],
                     f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%)",
                     f"{r['train_s']:.1f}", f"{r['train_cpu_s']:.1f}"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _f(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
