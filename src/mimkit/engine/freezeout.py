"""FreezeOut (Brock et al., 2017) as an engine schedule: encoder blocks freeze one after another.

Block i of L freezes at t_i = scale(t_0 + (1 - t_0) * i / L) of training (scale: linear, squared, cubic).
Until then its lr follows its own warmup + cosine that reaches zero at t_i, times 1/t_i when scale_lr.
Progress is counted in real iterations (epoch + iteration / iterations_per_epoch), not the reference's
assumed 1000 iterations per epoch. A frozen block leaves the optimiser, and the frozen prefix of the encoder
(patch embedding + cls token + blocks 0..k-1) runs under no_grad, so backward stops at the first active block:
frozen layers cost no backward compute and keep no activations. The patch embedding and cls token freeze
with block 0, since training them would need a backward pass through it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from mimkit.engine.optim import no_weight_decay_names, warmup_cosine
from mimkit.errors import UserError

SCALES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x, "squared": lambda x: x**2, "cubic": lambda x: x**3,
}
STEM_PREFIXES = ("patch_embed.", "cls_token")


def freeze_times(depth: int, t_0: float, how_scale: str) -> list[float]:
    """t_i for blocks 0..depth-1, as fractions of training."""
    if how_scale not in SCALES:
        raise UserError(f"unknown how_scale '{how_scale}' (linear, squared or cubic)")
    if not 0 < t_0 <= 1:
        raise UserError(f"t_0 must be in (0, 1], got {t_0}")
    return [SCALES[how_scale](t_0 + (1 - t_0) * i / depth) for i in range(depth)]


class FreezeOutHook:
    """Engine hook owning the per-block parameter groups, their lr schedule and the freezing events."""

    def __init__(self, model: nn.Module, t_0: float, how_scale: str, scale_lr: bool = True,
                 freeze_heads: bool = False, logger=None) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or not hasattr(model, "frozen_prefix"):
            raise UserError(f"FreezeOut needs a model with encoder blocks; {type(model).__name__} has none")
        self.model = model
        self.depth = len(blocks)
        self.t = freeze_times(self.depth, t_0, how_scale)
        self.scale_lr = scale_lr
        self.freeze_heads = freeze_heads
        self.logger = logger
        self.frozen = 0  # blocks 0..frozen-1 are frozen

    @classmethod
    def from_config(cls, fcfg, model: nn.Module, logger=None) -> "FreezeOutHook":
        """Build from the `freezeout` config section."""
        return cls(model, fcfg.t_0, fcfg.how_scale, fcfg.scale_lr, fcfg.freeze_heads, logger)

    # ------------------------------------------------------------------ parameters
    def block_of(self, name: str) -> int:
        """Block index a parameter freezes with, or -1 (trains to the end)."""
        if name.startswith(STEM_PREFIXES):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1])
        if self.freeze_heads:
            for k, tap in enumerate(getattr(self.model, "taps", ())):
                if name.startswith((f"norm.{k}.", f"decoder.{k}.")):
                    return tap
        return -1

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups split by block (decay / no-decay each), trainable parameters only."""
        skip = no_weight_decay_names(self.model)
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
            block = self.block_of(name)
            label = f"{'block' + str(block) if block >= 0 else 'rest'}.{'decay' if decay else 'no_decay'}"
            g = groups.setdefault((block, decay), {
                "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": 1.0,
                "block": block, "group": label,
            })
            g["params"].append(p)
            g["names"].append(name)
        return [groups[k] for k in sorted(groups, key=lambda k: (k[0] < 0, k[0], k[1]))]

    def lr_schedule(self, lr: float, min_lr: float, warmup_epochs: float, epochs: float):
        """(optimizer, fractional epoch) -> None: per-block warmup + cosine to zero at t_i, the rest as usual."""

        def apply(opt: torch.optim.Optimizer, epoch_f: float) -> None:
            for g in opt.param_groups:
                b = g.get("block", -1)
                if b < 0:
                    g["lr"] = warmup_cosine(epoch_f, lr, min_lr, warmup_epochs, epochs)
                    continue
                end = self.t[b] * epochs
                peak = lr / self.t[b] if self.scale_lr else lr
                g["lr"] = 0.0 if epoch_f >= end else warmup_cosine(epoch_f, peak, 0.0, min(warmup_epochs, end), end)

        return apply

    # ------------------------------------------------------------------ freezing
    def _freeze_through(self, k: int, trainer) -> None:
        """Freeze blocks 0..k-1 (and what goes with them); drop their groups and state from the optimiser."""
        if k <= self.frozen:
            return
        newly = set(range(self.frozen, k))
        for name, p in self.model.named_parameters():
            if self.block_of(name) in newly:
                p.requires_grad_(False)
                p.grad = None
        opt = trainer.optimizer
        keep = []
        for g in opt.param_groups:
            if g.get("block", -1) in newly:
                for p in g["params"]:
                    opt.state.pop(p, None)
            else:
                keep.append(g)
        opt.param_groups[:] = keep
        self.frozen = k
        self.model.frozen_prefix = k
        trainer.rewrap()
        if self.logger is not None:
            self.logger.info(f"freezeout: {k}/{self.depth} blocks frozen at step {trainer.state.step}")

    def progress(self, trainer) -> float:
        """Fraction of training done: (epoch + batch / iterations_per_epoch) / epochs."""
        st = trainer.state
        return (st.epoch + st.batch / trainer.iters_per_epoch) / trainer.s.epochs

    def on_train_start(self, trainer) -> None:
        if self.logger is not None:
            ipe, ep = trainer.iters_per_epoch, trainer.s.epochs
            sched = ", ".join(f"{i}:{t:.3f} (iter {math.ceil(t * ep * ipe)})" for i, t in enumerate(self.t))
            self.logger.info(f"freezeout schedule, block: t_i (iteration), {ipe} iterations/epoch: {sched}")

    def on_step_end(self, trainer) -> None:
        t = self.progress(trainer)
        k = self.frozen
        while k < self.depth and t >= self.t[k] - 1e-12:
            k += 1
        self._freeze_through(k, trainer)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        if self.logger is None:
            return
        lrs = {f"lr_{g['group']}": g["lr"] for g in trainer.optimizer.param_groups}
        self.logger.metrics({"kind": "freezeout", "epoch": epoch, "frozen_blocks": self.frozen, **lrs},
                            trainer.state.step, tb_prefix="freezeout")

    def state_dict(self) -> dict:
        return {"frozen": self.frozen}

    def load_state_dict(self, sd: dict, trainer) -> None:
        """Re-freeze the blocks a checkpoint had frozen (before the optimiser state is loaded)."""
        self._freeze_through(int(sd.get("frozen", 0)), trainer)
