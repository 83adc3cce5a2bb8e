"""Segmentation metrics from ONE confusion matrix accumulated over the whole set (and over ranks).

    cm = ConfusionMatrix(num_classes, ignore_index=255)
    for pred, target in batches: cm.update(pred, target)       # (N, H, W) long each
    cm.all_reduce()                                            # sum over DDP ranks
    m = cm.compute()                                           # {"mIoU", "aAcc", "mAcc", "mDice", "IoU": [...]}

As MMSeg's IoUMetric: per-class IoU = TP / (TP + FP + FN) is NaN for a class absent from both prediction and
target, and the means skip NaN; pixel accuracy (aAcc) = TP sum / labelled pixels. Never a mean of per-image
scores. Values are fractions in [0, 1].
"""

from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """(K, K) int64 counts, rows = target class, columns = predicted class; ignored pixels never counted."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape; target == ignore_index is left out."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long().to(self.mat.device), pred[keep].long().to(self.mat.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(f"target labels must be in [0, {self.num_classes}) or {self.ignore_index}")
        k = self.num_classes
        self.mat += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks (no-op in a single process)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self) -> dict:
        """mIoU, aAcc, mAcc, mDice (fractions) and the per-class lists IoU, Acc, Dice (NaN where undefined)."""
        return metrics_from_confusion(self.mat)


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """Scores of a (K, K) confusion matrix (rows target, columns prediction)."""
    m = mat.double().cpu()
    tp = m.diag()
    area_target, area_pred = m.sum(1), m.sum(0)
    union = area_target + area_pred - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(area_target > 0, tp / area_target.clamp(min=1), nan)
    dice = torch.where(area_target + area_pred > 0, 2 * tp / (area_target + area_pred).clamp(min=1), nan)
    total = m.sum()
    return {
        "mIoU": _nanmean(iou),
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mAcc": _nanmean(acc),
        "mDice": _nanmean(dice),
        "IoU": iou.tolist(), "Acc": acc.tolist(), "Dice": dice.tolist(),
        "pixels": int(total),
    }


def format_class_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class IoU / Acc / Dice (in %) and the summary line, as MMSeg prints it."""
    width = max([len(c) for c in class_names] + [5])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'Dice':>6}", "-" * (width + 26)]

    def pct(v: float) -> str:
        return "   n/a" if math.isnan(v) else f"{100 * v:6.2f}"  # a class absent from prediction and target

    for name, i, a, d in zip(class_names, metrics["IoU"], metrics["Acc"], metrics["Dice"], strict=True):
        lines.append(f"{name:<{width}}  {pct(i)}  {pct(a)}  {pct(d)}")
    lines.append("-" * (width + 26))
    lines.append(f"mIoU {pct(metrics['mIoU']).strip()}  aAcc {pct(metrics['aAcc']).strip()}  "
                 f"mAcc {pct(metrics['mAcc']).strip()}  mDice {pct(metrics['mDice']).strip()}")
    return "\n".join(lines)
