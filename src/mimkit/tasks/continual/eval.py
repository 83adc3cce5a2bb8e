"""The forgetting measurement of `mimkit continual`: every domain's held-out split, evaluated the same way each time.

The starting weights and each stage's final weights are scored on every domain: reconstruction loss with fixed
masks (a generator per domain, seeded by its name, so the masks are the same at every stage and in every run) and
k-NN accuracy where the domain has labels. The stage x domain rows become the matrices of `continual_report`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from mimkit import config as C
from mimkit.engine.logging import RunLogger
from mimkit.errors import DataError
from mimkit.tasks.continual.config import domain_name, sequence_domains


@dataclass
class EvalDomain:
    """One column of the matrix: a domain's held-out images and (where labelled) its k-NN reference set."""

    spec: str
    name: str
    val: Any
    knn_train: Any = None  # None when the domain has no labels (or no held-out split)
    eval_split: str = "val"  # 'train' when the folder has no val/ (then reconstruction only)
    noise: Optional[torch.Tensor] = None  # (N_val, L) fixed masking noise


def open_domains(cfg: DictConfig, num_patches: int, in_chans: int) -> list[EvalDomain]:
    """Open every domain's train and val splits now, so a missing or empty one fails before any training."""
    from mimkit.data.sources import open_dataset
    from mimkit.data.shards import has_shard_split, is_shard_spec
    from mimkit.data.transforms import eval_transform

    tf = eval_transform(C.input_size(cfg), in_chans, cfg.data.mean, cfg.data.std)
    out = []
    trained = sequence_domains(cfg)
    for spec in trained + list(cfg.continual.eval_domains):
        train_ds = open_dataset(spec, "train", tf)  # DataError: missing, empty, not a folder
        folder = Path(spec).expanduser()
        if is_shard_spec(spec):
            no_val = not has_shard_split(spec, "val")  # val-*.tar beside the training shards, or none
        else:
            no_val = folder.exists() and not (folder / "val").is_dir()
        if no_val:
            val_ds, split = train_ds, "train"  # no held-out split: reconstruction on the training images only
        else:
            val_ds, split = open_dataset(spec, "val", tf), "val"
        labelled = len(getattr(train_ds, "classes", [])) >= 2 and split == "val"
        if labelled and list(getattr(val_ds, "classes", [])) != list(train_ds.classes):
            raise DataError(f"domain {spec}: val classes {val_ds.classes} differ from train classes "
                            f"{train_ds.classes}")
        name = domain_name(spec)
        # A dedicated generator per domain, seeded by its name: the same masks at every stage and in every run.
        g = torch.Generator().manual_seed(cfg.continual.eval_seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.rand(len(val_ds), num_patches, generator=g)
        out.append(EvalDomain(spec, name, val_ds, train_ds if labelled else None, split, noise))
    return out


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, domains: list[EvalDomain], cfg: DictConfig) -> dict[str, dict[str, float]]:
    """{domain: {recon_loss, recon_loss_all, knn_acc}}: masked / all-patch MSE with fixed masks, k-NN top-1.

    recon_loss is the MAE objective (mean over masked patches); knn_acc in %, as every command; NaN = no labels.
    """
    from torch.utils.data import DataLoader

    from mimkit.data.datasets import collate_batch
    from mimkit.metrics.knn import knn_accuracy
    from mimkit.tasks.evaluation.features import extract_features

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bs = cfg.continual.eval_batch_size
    results = {}
    for d in domains:
        sums, n = {"masked_only": 0.0, "all_pixels": 0.0}, 0
        masked_patches = 0.0
        loader = DataLoader(d.val, batch_size=bs, shuffle=False, num_workers=0, collate_fn=collate_batch)
        start = 0
        for batch in loader:
            imgs = batch["images"].to(device)
            noise = d.noise[start:start + len(imgs)].to(device)
            start += len(imgs)
            _, pred, mask = model(imgs, mask_ratio=cfg.model.mask_ratio, noise=noise)
            if isinstance(pred, (list, tuple)):  # LocalMIM: HOG at several scales; its own loss, per image
                k = float(mask.sum())
                sums["masked_only"] += float(model.forward_loss(imgs, pred, mask, "masked_only")) * k
                masked_patches += k
                sums["all_pixels"] += float(model.forward_loss(imgs, pred, mask, "all_pixels")) * len(imgs)
                n += len(imgs)
                continue
            per_patch = ((pred.float() - model.target(imgs).float()) ** 2).mean(dim=-1)  # (N, L)
            sums["masked_only"] += float((per_patch * mask).sum())
            masked_patches += float(mask.sum())
            sums["all_pixels"] += float(per_patch.sum())
            n += per_patch.numel()
        row = {"recon_loss": sums["masked_only"] / max(masked_patches, 1.0),
               "recon_loss_all": sums["all_pixels"] / max(n, 1), "knn_acc": float("nan")}
        if d.knn_train is not None:
            tr_f, tr_y = extract_features(model, d.knn_train, bs, device, cfg.continual.pool)
            va_f, va_y = extract_features(model, d.val, bs, device, cfg.continual.pool)
            row["knn_acc"] = 100.0 * knn_accuracy(tr_f, tr_y, va_f, va_y, (cfg.continual.knn_k,),
                                                  cfg.continual.knn_temperature)[cfg.continual.knn_k]
        results[d.name] = row
    model.train(was_training)
    return results


def log_eval(run: RunLogger, label: str, row: dict[str, dict[str, float]], step: int) -> None:
    """One line per domain in log.txt/console, and the values as TensorBoard scalars at x = stage."""
    for name, m in row.items():
        knn = "n/a" if math.isnan(m["knn_acc"]) else f"{m['knn_acc']:.2f}%"
        run.info(f"eval {label}: {name:<16} recon_loss {m['recon_loss']:.4f}  recon_loss_all "
                 f"{m['recon_loss_all']:.4f}  knn_acc {knn}")
    run.metrics({"kind": "eval", "label": label, "step": step,
                 **{f"{n}/{k}": v for n, m in row.items() for k, v in m.items() if not math.isnan(v)}},
                step, tb_prefix="eval")
