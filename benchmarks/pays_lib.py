"""The pieces of the "pretraining pays" study: pretrain, held-out reconstruction loss, k-NN, probe, fine-tune.

Each piece calls the existing task functions in-process (`mimkit.tasks.pretrain.train`, `linprobe.probe`,
`finetune.finetune`, the k-NN metric) with a config built the way the CLI builds it: schema <- preset <- the
study's overrides. No second training loop lives here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mimkit import config as C
from mimkit.tasks.evaluation import config as EC


def _quiet():
    """Silence a task's console output (its log.txt / results.json still hold everything)."""
    return contextlib.redirect_stdout(io.StringIO())


def _cfg(schema: type, preset: Optional[str], overrides: dict) -> Any:
    layers = ([(preset, C.load_file(preset))] if preset else []) + [("study", overrides)]
    return C.build_config(schema, layers)


def _deep(d: dict, dotted: dict) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} merged into d."""
    for key, v in dotted.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return d


def _run_overrides(data: str, out: Path, seed: int, overrides: dict, **fields: Any) -> dict:
    """The overrides every study run shares (data, run folder, seed, CPU, no resume, no TensorBoard) + its own."""
    return _deep({}, {"data.data_path": data, "misc.output_dir": str(out), "misc.seed": seed,
                      "misc.auto_resume": False, "misc.device": "cpu", "logging.tensorboard": False,
                      **fields, **overrides})


def pretrain(preset: str, data: str, out: Path, seed: int, **overrides: Any) -> dict:
    """Unlabelled MAE pretraining on `data`'s train split; returns {checkpoint, loss, cpu_s, model}."""
    from mimkit.tasks.pretrain import train

    cfg = _cfg(C.PretrainConfig, preset, _run_overrides(data, out, seed, overrides))
    t0 = time.process_time()
    with _quiet():
        summary = train(cfg, print_summary=False)
    return {"checkpoint": summary["final_checkpoint"], "loss": summary["final_loss"],
            "cpu_s": time.process_time() - t0, "model": summary["model"]}


def random_twin(checkpoint: str, seed: int):
    """The checkpoint's architecture with fresh random weights (what `--random_init` evaluates)."""
    from mimkit.tasks.evaluation.common import load_encoder

    return load_encoder(checkpoint, random_init=True, seed=seed)[0]


@torch.no_grad()
def heldout_loss(model, data: str, seed: int = 0, mask_ratio: Optional[float] = None, batch_size: int = 256) -> float:
    """Masked reconstruction loss of `model` on `data`'s val split (eval transform, masks fixed by `seed`)."""
    from torch.utils.data import DataLoader

    from mimkit.data.sources import open_dataset
    from mimkit.data.datasets import collate_batch
    from mimkit.data.transforms import eval_transform, normalization_of

    model.eval()
    ds = open_dataset(data, "val", eval_transform(model.img_size, model.in_chans, *normalization_of(model)))
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_batch):
        x = batch["images"]
        noise = torch.rand(len(x), model.num_patches, generator=g)
        loss, _, _ = model(x, mask_ratio=0.75 if mask_ratio is None else mask_ratio, noise=noise)
        total += float(loss) * len(x)
        n += len(x)
    return total / n


def knn(checkpoint: str, data: str, random_init: bool, seed: int, ks=(10, 20), pool: str = "cls",
        input_size: Optional[int] = None, amp: str = "off") -> dict:
    """Weighted k-NN top-1 (%) of the frozen encoder, as `mimkit knn` (features under `amp`: off = fp32)."""
    from mimkit.metrics.knn import knn_accuracy
    from mimkit.tasks.knn import features

    args = Namespace(checkpoint=checkpoint, model=None, input_size=input_size, random_init=random_init, seed=seed,
                     data_path=data, batch_size=256, pool=pool, num_workers=0, device="cpu", amp=amp)
    _, _, (xtr, ytr), (xva, yva), classes = features(args)
    acc = knn_accuracy(xtr, ytr, xva, yva, ks=list(ks), temperature=0.07, num_classes=len(classes))
    return {f"knn_k{k}": 100.0 * a for k, a in acc.items()}


def _classifier(task, schema: type, preset: str, checkpoint: str, data: str, out: Path, random_init: bool,
                seed: int, overrides: dict) -> dict:
    """Run a classifier task (probe / fine-tune) from `checkpoint` (or its random twin): its metrics + cpu_s."""
    ov = _run_overrides(data, out, seed, overrides, **{"model.finetune": checkpoint, "model.random_init": random_init})
    cfg = _cfg(schema, preset, ov)
    t0 = time.process_time()
    with _quiet():
        m = task(cfg)
    return {**m, "cpu_s": time.process_time() - t0}


def linprobe(preset: str, checkpoint: str, data: str, out: Path, random_init: bool, seed: int,
             **overrides: Any) -> dict:
    """`mimkit linprobe` metrics (acc1 = final epoch, best_acc1)."""
    from mimkit.tasks.linprobe import probe

    return _classifier(probe, EC.LinprobeConfig, preset, checkpoint, data, out, random_init, seed, overrides)


def finetune(preset: str, checkpoint: str, data: str, out: Path, random_init: bool, seed: int,
             **overrides: Any) -> dict:
    """`mimkit finetune` metrics plus the first and last epochs' mean train loss."""
    from mimkit.tasks.finetune import finetune as ft

    m = _classifier(ft, EC.FinetuneConfig, preset, checkpoint, data, out, random_init, seed, overrides)
    return {**m, **train_loss_curve(out)}


def train_loss_curve(out: Path) -> dict:
    """First and last epochs' mean train loss from a run's metrics.jsonl."""
    per_epoch: dict[int, list[float]] = {}
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "epoch" and "loss" in r:
            per_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    if not per_epoch:
        return {}
    first, last = min(per_epoch), max(per_epoch)
    return {"train_loss_first": float(np.mean(per_epoch[first])), "train_loss_last": float(np.mean(per_epoch[last]))}


# A few-label train set is written repeated up to this many files: the presets' epochs then hold enough steps.
MIN_TRAIN = 256


def labelled(data: str, labels: str, root: Path, seed: int, min_train: int = MIN_TRAIN, draw: int = 0) -> str:
    """The labelled set for `labels` (all | <n>pc | <p>pct), drawn by (`seed`, `draw`) under `root`, repeated up
    to `min_train` files; 'all' is `data` itself. Draw 0 is the seed's first draw (the subset a single-draw run
    used); each further draw is another subset of the same size."""
    if labels == "all":
        return data
    where = Path(root) / (f"{data}_{labels}_seed{seed}" + (f"_draw{draw}" if draw else ""))
    rng_seed: Any = seed if draw == 0 else [seed, draw]
    if labels.endswith("pct"):
        return labelled_subset(data, where, fraction=int(labels[:-3]) / 100, seed=rng_seed, min_train=min_train)
    if labels.endswith("pc"):
        return labelled_subset(data, where, per_class=int(labels[:-2]), seed=rng_seed, min_train=min_train)
    raise ValueError(f"label set {labels!r}: use all, <n>pc (n per class) or <p>pct (p % of each class)")


def labelled_subset(data: str, out: Path, per_class: Optional[int] = None, fraction: Optional[float] = None,
                    seed: Any = 0, min_train: int = 0) -> str:
    """Write a class-folder copy of `data` whose train/ keeps `per_class` images per class (or `fraction` of
    each class), val/ whole; returns the folder. The labelled subset is drawn by `seed`.

    With `min_train`, each kept image is written ceil(min_train / kept) times (distinct file names, so each copy
    gets its own random crop): an "epoch" then holds enough steps, and the per-epoch evaluation on val/ is paid
    once per ~min_train training images rather than once per handful. The labelled images are the same.
    `seed`: an int or a list of ints (numpy's SeedSequence entropy).
    """
    from mimkit.data.sources import open_dataset

    out = Path(out)
    if (out / ".done").exists():
        return str(out)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        ds = open_dataset(data, split, None, require_labels=True)
        targets = np.asarray(ds.targets)
        keep = np.arange(len(ds))
        if split == "train":
            keep = []
            for c in range(len(ds.classes)):
                idx = np.flatnonzero(targets == c)
                k = per_class if per_class is not None else max(1, int(round(fraction * len(idx))))
                keep.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
            keep = np.sort(np.asarray(keep))
        copies = -(-min_train // len(keep)) if split == "train" and min_train else 1
        for i in keep:
            img, label = ds[int(i)]
            d = out / split / ds.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            for c in range(copies):
                img.save(d / f"{int(i):05d}_{c:02d}.png")
    (out / ".done").write_text("")
    return str(out)


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, mimkit's console lines below `level` are dropped (the study's console keeps to its own
    lines); the logger itself is untouched, so every run's log.txt keeps all its lines; restored on exit."""
    from mimkit.engine.logging import get_logger

    # the console handler binds the real stdout when created, so redirect_stdout does not reach it
    consoles = [h for h in get_logger().handlers if type(h) is logging.StreamHandler]
    before = [h.level for h in consoles]
    for h in consoles:
        h.setLevel(level)
    try:
        yield
    finally:
        for h, was in zip(consoles, before):
            h.setLevel(was)
