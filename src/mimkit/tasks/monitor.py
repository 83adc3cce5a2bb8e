"""Monitoring during pretraining: k-NN accuracy and RankMe of the encoder on a labelled set every N epochs.

    mimkit pretrain --data_path /my/images --eval_data_path /my/labelled --eval_every 5

The official code gives no sign of whether pretraining on one's own data works; these two numbers, logged
beside the loss (console, metrics.jsonl with "kind": "eval", TensorBoard under eval/), do.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from mimkit import config as C
from mimkit.engine.logging import RunLogger


class MonitorHook:
    """Trainer hook: every `every` epochs (and after the last), k-NN top-1 for each k and RankMe on train/val."""

    def __init__(self, train_set, val_set, every: int, ks: Sequence[int], run_log: RunLogger, epochs: int,
                 batch_size: int = 128, pool: str = "cls") -> None:
        self.train_set, self.val_set = train_set, val_set
        self.every, self.ks, self.run_log, self.epochs = every, list(ks), run_log, epochs
        self.batch_size, self.pool = batch_size, pool
        self.num_classes = len(train_set.classes)
        self.history: list[dict] = []

    @classmethod
    def from_config(cls, cfg: DictConfig, run_log: RunLogger) -> "MonitorHook":
        """Open the labelled set of cfg.eval (its problems raise DataError before training starts)."""
        from mimkit.data.transforms import eval_transform
        from mimkit.tasks.evaluation.common import open_labelled

        in_chans = int(cfg.model.kwargs.get("in_chans", 3))
        tf = eval_transform(C.input_size(cfg), in_chans, cfg.data.mean, cfg.data.std)
        train, val = open_labelled(cfg.eval.eval_data_path, tf, tf)
        return cls(train, val, cfg.eval.eval_every, list(cfg.eval.knn_k), run_log, cfg.schedule.epochs,
                   batch_size=cfg.optimization.batch_size)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """Evaluate on the main process when due; never moves any RNG the training run depends on."""
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        if trainer.dist.is_main:
            record = self.evaluate(trainer.model, trainer.device)
            record = {"kind": "eval", "epoch": epoch, "step": trainer.state.step, **record}
            self.history.append(record)
            text = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("kind", "epoch", "step"))
            self.run_log.info(f"eval epoch {epoch}: {text}")
            self.run_log.metrics(record, trainer.state.step, tb_prefix="eval")
        from mimkit.engine.distributed import barrier

        barrier()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """{'knn_top1_k<k>': % for each k, 'rankme_train': ..., 'rankme_val': ...} of model's unmasked encoder."""
        from mimkit.metrics import rankme
        from mimkit.metrics.knn import knn_accuracy
        from mimkit.tasks.evaluation.features import extract_features

        # The DataLoader draws a base seed from the global torch RNG even without workers: fork every RNG
        # so that a run with monitoring continues bitwise as one without (and resumes bitwise).
        devices = [device] if device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                xtr, ytr = extract_features(model, self.train_set, self.batch_size, device, self.pool)
                xva, yva = extract_features(model, self.val_set, self.batch_size, device, self.pool)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        acc = knn_accuracy(xtr, ytr, xva, yva, ks=self.ks, num_classes=self.num_classes)
        out = {f"knn_top1_k{k}": 100.0 * a for k, a in acc.items()}
        out["rankme_train"] = rankme(xtr)
        out["rankme_val"] = rankme(xva)
        return out
