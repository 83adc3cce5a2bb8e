"""Results of `mimkit incremental`: the accuracy matrix R[i, j] (after task i, on task j; NaN for j > i), its
metrics, the printed table, accuracy_matrix.csv, per_task.csv, results.json and incremental.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from mimkit.metrics import forgetting as F


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
    from mimkit.tasks.evaluate import write_results

    names = [f"task_{j}" for j in range(num_tasks)]
    stages = [f"after_task_{i}" for i in range(len(rows))]
    R = matrix(rows, num_tasks)
    paths = {"matrix_csv": F.write_matrix_csv(out_dir / "accuracy_matrix.csv", R, names, stages)}
    per_task = out_dir / "per_task.csv"
    with open(per_task, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "classes", "acc_seen", "rankme"])
        for i, r in enumerate(rows):
            w.writerow([i, " ".join(str(c) for c in r["classes"]), repr(r["acc_seen"]), repr(r["rankme"])])
    paths["per_task_csv"] = per_task
    summary = F.summarize(R, names, metric="top-1 accuracy (%)", stages=stages)
    extra = {**record, "accuracy_matrix": _clean(summary), "per_task": rows}
    paths["results"] = write_results(out_dir, "incremental", _clean(metrics(rows, num_tasks)),
                                     record.get("checkpoint"), record.get("data"), record.get("config", {}), extra)
    paths["png"] = picture(out_dir / "incremental.png", R, [r["rankme"] for r in rows])
    return paths


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _colour(t: float) -> tuple[int, int, int]:
    """0 -> dark blue, 1 -> yellow (a viridis-like ramp)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    k = min(int(t), len(stops) - 2)
    a, b, f = stops[k], stops[k + 1], t - k
    return tuple(int(round(a[c] + (b[c] - a[c]) * f)) for c in range(3))


def picture(path: Path, R: np.ndarray, rankmes: list[float]) -> Path:
    """Left: the accuracy-matrix heatmap (0-100 %) with its colour bar; right: RankMe after each task."""
    from PIL import Image, ImageDraw

    n_rows, n_cols = R.shape
    cell = max(28, min(60, 420 // max(n_cols, 1)))
    left, top = 70, 40
    hm_w, hm_h = cell * n_cols, cell * n_rows
    bar_x = left + hm_w + 16
    plot_x0, plot_w, plot_h = bar_x + 90, 320, max(hm_h, 200)
    img = Image.new("RGB", (plot_x0 + plot_w + 30, top + max(hm_h, plot_h) + 50), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), "accuracy (%) after task i (row) on task j (column)", fill="black")
    for i in range(n_rows):
        d.text((8, top + i * cell + cell // 2 - 5), f"after {i}", fill="black")
        for j in range(n_cols):
            x, y, v = left + j * cell, top + i * cell, R[i, j]
            if math.isnan(v):
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
                continue
            t = v / 100.0
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(t))
            d.text((x + 4, y + cell // 2 - 5), f"{v:.0f}", fill="black" if t > 0.6 else "white")
    for j in range(n_cols):
        d.text((left + j * cell + 4, top + hm_h + 4), f"{j}", fill="black")
    for k in range(hm_h):  # colour bar: 100 at the top, 0 at the bottom
        d.line([bar_x, top + k, bar_x + 14, top + k], fill=_colour(1 - k / max(hm_h - 1, 1)))
    for v in (0, 50, 100):
        d.text((bar_x + 18, top + int((1 - v / 100) * (hm_h - 1)) - 5), f"{v}", fill="black")
    d.text((plot_x0, 8), "RankMe of the backbone features (held-out set)", fill="black")
    y0, y1 = top, top + plot_h
    d.rectangle([plot_x0, y0, plot_x0 + plot_w, y1], outline="black")
    vals = [v for v in rankmes if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        n = len(rankmes)
        pts = [(plot_x0 + (plot_w * (k + 0.5) / n), y1 - (v - lo) / (hi - lo) * plot_h) for k, v in enumerate(rankmes)]
        if len(pts) > 1:
            d.line(pts, fill=(200, 30, 30), width=2)
        for k, (x, y) in enumerate(pts):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
            d.text((x - 14, y - 16), f"{rankmes[k]:.1f}", fill="black")
            d.text((x - 4, y1 + 4), f"{k}", fill="black")
        d.text((plot_x0 + plot_w // 2 - 20, y1 + 18), "after task", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
