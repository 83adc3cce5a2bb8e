"""Continual-learning measures from a stage x domain matrix R: R[i][j] = metric on domain j after stage i,
stage i having trained on domain i.

    forgetting (Chaudhry et al. 2018): for each domain j trained before the last stage, the drop from its
        best value at any earlier stage to its final value, max_{l < T-1} R[l][j] - R[T-1][j]
        (for a loss: the rise).
    backward transfer (Lopez-Paz & Ranzato 2017): mean_{j < T-1} R[T-1][j] - R[j][j], negated for a loss.
    average incremental accuracy (Rebuffi et al. 2017, iCaRL): the mean over stages i of the average over the
        tasks seen so far, mean_i mean_{j <= i} R[i][j] (class-incremental: R[i][j] is NaN for j > i).
Signed so that positive forgetting is bad and positive backward transfer good, whatever the metric.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def _as_matrix(R: Matrix) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"R must be a non-empty (stages, domains) matrix, got shape {m.shape}")
    return m


def _stage_names(n: int, domains: Sequence[str]) -> list[str]:
    """Default stage names: after_<domain trained at that stage>."""
    return [f"after_{domains[i]}" if i < len(domains) else f"stage_{i}" for i in range(n)]


def forgetting(R: Matrix, higher_is_better: bool = True) -> list[float | None]:
    """Per-domain forgetting; None for a domain not trained before the last stage, or not measured."""
    m = _as_matrix(R)
    T, D = m.shape
    out: list[float | None] = []
    for j in range(D):
        if j >= T - 1:  # trained at the last stage (or never): nothing to forget yet
            out.append(None)
            continue
        earlier = m[: T - 1, j][~np.isnan(m[: T - 1, j])]  # NaN = not measured (e.g. k-NN on unlabelled data)
        if earlier.size == 0 or np.isnan(m[-1, j]):
            out.append(None)
            continue
        drop = earlier.max() - m[-1, j] if higher_is_better else m[-1, j] - earlier.min()
        out.append(float(drop))
    return out


def average_forgetting(R: Matrix, higher_is_better: bool = True) -> float | None:
    """Mean forgetting over the domains trained before the last stage; None with a single stage."""
    values = [f for f in forgetting(R, higher_is_better) if f is not None]
    return float(np.mean(values)) if values else None


def backward_transfer(R: Matrix, higher_is_better: bool = True) -> float | None:
    """Lopez-Paz & Ranzato BWT: mean_{j<T-1} R[T-1][j] - R[j][j], NaN terms left out; positive = better."""
    m = _as_matrix(R)
    T, D = m.shape
    if D < T:
        raise ValueError(f"backward transfer needs a column per stage: {T} stages, {D} domains")
    if T < 2:
        return None
    terms = [m[-1, j] - m[j, j] for j in range(T - 1) if not np.isnan(m[-1, j] - m[j, j])]
    if not terms:
        return None
    diff = np.mean(terms)
    return float(diff if higher_is_better else -diff)


def seen_averages(R: Matrix) -> list[float]:
    """Average over the tasks seen so far after each stage: mean_{j <= i} R[i][j], NaN entries left out."""
    m = _as_matrix(R)
    return [float(np.nanmean(m[i, : i + 1])) for i in range(m.shape[0])]


def average_incremental_accuracy(R: Matrix) -> float:
    """iCaRL's average incremental accuracy: the mean of seen_averages(R) over all stages."""
    return float(np.mean(seen_averages(R)))


def summarize(
    R: Matrix, domains: Sequence[str], higher_is_better: bool = True, metric: str = "metric",
    stages: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Matrix, per-domain and average forgetting, BWT and the final average, as JSON-ready plain values."""
    m = _as_matrix(R)
    if len(domains) != m.shape[1]:
        raise ValueError(f"{len(domains)} domain names for {m.shape[1]} columns")
    stages = list(stages) if stages is not None else _stage_names(m.shape[0], domains)
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "stages": stages,
        "domains": list(domains),
        "matrix": m.tolist(),
        "forgetting": dict(zip(domains, forgetting(m, higher_is_better), strict=True)),
        "average_forgetting": average_forgetting(m, higher_is_better),
        "backward_transfer": backward_transfer(m, higher_is_better) if m.shape[1] >= m.shape[0] else None,
        "final_average": float(m[-1].mean()),
    }


def write_matrix_csv(
    path: str | Path, R: Matrix, domains: Sequence[str], stages: Sequence[str] | None = None
) -> Path:
    """CSV with a header `stage,<domain>...` and one row per stage."""
    m = _as_matrix(R)
    stages = list(stages) if stages is not None else _stage_names(m.shape[0], domains)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", *domains])
        for name, row in zip(stages, m.tolist(), strict=True):
            w.writerow([name, *(repr(v) for v in row)])  # repr: round-trips floats exactly
    return path


def json_safe(x: Any) -> Any:
    """`x` with every NaN / inf float (in nested dicts and lists) replaced by None, so JSON writes it as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def write_matrix_json(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write `summarize(...)`'s dict as JSON (NaN written as null so the file stays valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return path
