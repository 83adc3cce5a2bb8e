"""Results of `mimkit incremental`: the accuracy matrix R[i, j] (after task i, on task j; NaN for j > i), its
metrics, the printed table, accuracy_matrix.csv, per_task.csv, results.json and incremental.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mimkit.metrics import forgetting as F

CSV_DIGITS = 2  # accuracies in % and RankMe, as the printed table (the exact values are in results.json)


def matrix(rows: list[dict], num_tasks: int) -> np.ndarray:
    """(tasks done, num_tasks) accuracy matrix in %, NaN where a task was not yet seen."""
    R = np.full((len(rows), num_tasks), np.nan)
    for i, r in enumerate(rows):
        R[i, :len(r["acc"])] = r["acc"]
    return R


def metrics(rows: list[dict], num_tasks: int) -> dict[str, Any]:
    """Final average accuracy, average incremental accuracy, forgetting (Chaudhry), BWT (Lopez-Paz), RankMe."""
    if not rows:
        return {}
    R = matrix(rows, num_tasks)
    return {
        "final_average_accuracy": F.seen_averages(R)[-1],
        "average_incremental_accuracy": F.average_incremental_accuracy(R),
        "forgetting": F.average_forgetting(R),
        "bwt": F.backward_transfer(R),
        "final_accuracy_all_seen": rows[-1]["acc_seen"],
        "final_rankme": rows[-1]["rankme"],
        "tasks_done": len(rows),
    }


def format_table(rows: list[dict], num_tasks: int, sizes: list[int]) -> str:
    """R as text (after task i x on task j) with the accuracy on all seen classes and RankMe per row."""
    R = matrix(rows, num_tasks)
    head = "after \\ on  " + "".join(f"{'task ' + str(j):>9}" for j in range(num_tasks)) + "   all seen   RankMe"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        cells = "".join(f"{'-':>9}" if math.isnan(v) else f"{v:9.2f}" for v in R[i])
        lines.append(f"task {i:<6}" + cells + f"{r['acc_seen']:11.2f}{r['rankme']:9.2f}")
    m = metrics(rows, num_tasks)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"classes per task {sizes}; final average accuracy {fmt(m['final_average_accuracy'])}%, average "
                 f"incremental accuracy {fmt(m['average_incremental_accuracy'])}%, forgetting "
                 f"{fmt(m['forgetting'])}, BWT {fmt(m['bwt'])}")
    return "\n".join(lines)


def write(out_dir: Path, rows: list[dict], num_tasks: int, record: dict) -> dict[str, Path]:
    """accuracy_matrix.csv, per_task.csv, results.json (metrics, matrix, per task, config) and incremental.png."""
    from mimkit.tasks.evaluation.common import write_results

    names = [f"task_{j}" for j in range(num_tasks)]
    stages = [f"after_task_{i}" for i in range(len(rows))]
    R = matrix(rows, num_tasks)
    matrix_csv = out_dir / "accuracy_matrix.csv"
    with open(matrix_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", *names])
        for name, row in zip(stages, R.tolist(), strict=True):
            w.writerow([name, *(cell(v) for v in row)])
    per_task = out_dir / "per_task.csv"
    with open(per_task, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "classes", "acc_seen", "rankme"])
        for i, r in enumerate(rows):
            w.writerow([i, " ".join(str(c) for c in r["classes"]), cell(r["acc_seen"]), cell(r["rankme"])])
    paths = {"matrix_csv": matrix_csv, "per_task_csv": per_task}
    summary = F.summarize(R, names, metric="top-1 accuracy (%)", stages=stages)
    extra = {**record, "accuracy_matrix": F.json_safe(summary), "per_task": rows}
    paths["results"] = write_results(out_dir, "incremental", F.json_safe(metrics(rows, num_tasks)),
                                     record.get("checkpoint"), record.get("data"), record.get("config", {}), extra)
    paths["png"] = picture(out_dir / "incremental.png", R, [r["rankme"] for r in rows])
    return paths


def track(run_log: Any, rows: list[dict], num_tasks: int, step: int, png: Optional[Path] = None) -> None:
    """Into the run's trackers after a task: the metrics so far (forgetting, BWT, ...) as scalars, the accuracy
    matrix and the per-task rows as tables, and the heatmap picture."""
    R = matrix(rows, num_tasks)
    summary = {k: v for k, v in metrics(rows, num_tasks).items() if v is not None}
    run_log.metrics({"kind": "summary", **summary}, step, tb_prefix="incremental")
    run_log.table("incremental/accuracy_matrix", ["after_task", *[f"task_{j}" for j in range(num_tasks)]],
                  [[i, *(None if math.isnan(v) else round(v, CSV_DIGITS) for v in R[i])] for i in range(len(rows))],
                  step)
    run_log.table("incremental/per_task", ["task", "classes", "acc_seen", "rankme"],
                  [[i, " ".join(str(c) for c in r["classes"]), r["acc_seen"], r["rankme"]]
                   for i, r in enumerate(rows)], step)
    if png is not None and Path(png).exists():
        from PIL import Image

        run_log.image("incremental/accuracy_matrix_picture", np.asarray(Image.open(png).convert("RGB")), step)


def cell(v: Any, digits: int = CSV_DIGITS) -> str:
    """A CSV cell: the number rounded to `digits` decimals (no float noise), empty when not (yet) defined."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{float(v):.{digits}f}"


def _colour(t: float) -> tuple[int, int, int]:
    """0 -> dark blue, 1 -> yellow (a viridis-like ramp)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    k = min(int(t), len(stops) - 2)
    a, b, f = stops[k], stops[k + 1], t - k
    return tuple(int(round(a[c] + (b[c] - a[c]) * f)) for c in range(3))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (steps of 1, 2 or 5 x 10^k) inside [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]
    return [round(t, 10) for t in ticks]


def layout(n_rows: int, n_cols: int, text_width) -> dict[str, Any]:
    """Boxes (x0, y0, x1, y1) of the picture's parts, sized by `text_width(str) -> px` so no text overlaps."""
    cell = max(28, min(60, 420 // max(n_cols, 1)))
    pad, top = 12, 40
    t1 = "accuracy (%) after task i (row) on task j (column)"
    t2 = "RankMe of the backbone features (held-out set)"
    left = pad + text_width(f"after {max(n_rows - 1, 0)}") + 8
    hm_w, hm_h = cell * n_cols, cell * max(n_rows, 1)
    bar_x = left + hm_w + 16
    bar_labels = (bar_x + 18, top - 6, bar_x + 18 + text_width("100 %"), top + hm_h + 6)
    panel1_right = max(bar_labels[2], left + text_width(t1))
    plot_h = max(hm_h, 200)
    y_label_w = text_width("0000.0") + 10  # tick labels of the RankMe axis
    plot_x0 = panel1_right + 40 + y_label_w
    plot_w = max(320, text_width(t2) - y_label_w)
    return {
        "cell": cell, "top": top, "left": left, "bar_x": bar_x, "plot_x0": plot_x0, "plot_w": plot_w,
        "plot_h": plot_h, "size": (plot_x0 + plot_w + 30, top + max(hm_h, plot_h) + 56),
        "boxes": {
            "title_matrix": (left, 8, left + text_width(t1), 20), "heatmap": (left, top, left + hm_w, top + hm_h),
            "colour_bar": (bar_x, top, bar_labels[2], top + hm_h),
            "title_rankme": (plot_x0 - y_label_w, 8, plot_x0 - y_label_w + text_width(t2), 20),
            "rankme_axes": (plot_x0 - y_label_w, top - 14, plot_x0 + plot_w, top + plot_h + 36),
        },
        "titles": (t1, t2),
    }


def picture(path: Path, R: np.ndarray, rankmes: list[float]) -> Path:
    """Left: the accuracy-matrix heatmap (0-100 %) with its colour bar; right: RankMe after each task, with a
    labelled, ticked y axis. Parts are placed by measured text widths, so none overlaps another."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = layout(*R.shape, lambda t: int(math.ceil(probe.textlength(t, font=font))))
    n_rows, n_cols = R.shape
    cell, top, left, bar_x = L["cell"], L["top"], L["left"], L["bar_x"]
    hm_h = cell * max(n_rows, 1)
    img = Image.new("RGB", L["size"], "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), L["titles"][0], fill="black", font=font)
    for i in range(n_rows):
        d.text((12, top + i * cell + cell // 2 - 5), f"after {i}", fill="black", font=font)
        for j in range(n_cols):
            x, y, v = left + j * cell, top + i * cell, R[i, j]
            if math.isnan(v):
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
                continue
            t = v / 100.0
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(t))
            d.text((x + 4, y + cell // 2 - 5), f"{v:.0f}", fill="black" if t > 0.6 else "white", font=font)
    for j in range(n_cols):
        d.text((left + j * cell + cell // 2 - 3, top + hm_h + 4), f"{j}", fill="black", font=font)
    d.text((left, top + hm_h + 20), "on task j", fill="black", font=font)
    for k in range(hm_h):  # colour bar: 100 at the top, 0 at the bottom
        d.line([bar_x, top + k, bar_x + 14, top + k], fill=_colour(1 - k / max(hm_h - 1, 1)))
    for v in (0, 50, 100):
        d.text((bar_x + 18, top + int((1 - v / 100) * (hm_h - 1)) - 5), f"{v} %", fill="black", font=font)
    x0, w, h = L["plot_x0"], L["plot_w"], L["plot_h"]
    d.text((L["boxes"]["title_rankme"][0], 8), L["titles"][1], fill="black", font=font)
    y0, y1 = top, top + h
    d.rectangle([x0, y0, x0 + w, y1], outline="black")
    vals = [v for v in rankmes if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-9 else (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        lo = max(lo, 0.0)

        def y_of(v: float) -> float:
            return y1 - (v - lo) / (hi - lo) * h

        for t in nice_ticks(lo, hi):  # y axis: tick marks, values, light grid
            y = y_of(t)
            d.line([x0 - 4, y, x0, y], fill="black")
            d.line([x0 + 1, y, x0 + w - 1, y], fill=(230, 230, 230))
            label = f"{t:g}"
            d.text((x0 - 8 - probe.textlength(label, font=font), y - 5), label, fill="black", font=font)
        d.text((L["boxes"]["rankme_axes"][0], top - 14), "RankMe", fill="black", font=font)  # the y axis's name
        n = len(rankmes)
        pts = {k: (x0 + w * (k + 0.5) / n, y_of(v)) for k, v in enumerate(rankmes) if math.isfinite(v)}
        if len(pts) > 1:
            d.line(list(pts.values()), fill=(200, 30, 30), width=2)
        for k in range(n):
            x = x0 + w * (k + 0.5) / n
            d.line([x, y1, x, y1 + 4], fill="black")
            d.text((x - 3, y1 + 6), f"{k}", fill="black", font=font)
            if k in pts:
                y = pts[k][1]
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
                d.text((x - 12, y - 16), f"{rankmes[k]:.1f}", fill="black", font=font)
        d.text((x0 + w // 2 - 20, y1 + 20), "after task", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
