"""What `optimization.on_nonfinite=rollback` remembers: rollbacks used, windows to skip, lr factor, precision.

On a NaN/inf loss (or gradient norm, with clipping on and no fp16 scaler) the loop reloads the last checkpoint,
marks the optimiser step's window of batches (accum_iter batches) as skipped, optionally falls back to a more
precise autocast dtype and scales the lr, and continues. The state rides in every checkpoint (`counters`), so
a resumed run keeps skipping the same windows and keeps the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from mimkit.engine.checkpoint import load_training_checkpoint
from mimkit.engine.precision import PRECISION_ORDER
from mimkit.errors import UserError


class NonFiniteLossError(UserError):
    """The loss (or gradient norm) became NaN or infinite and the run stopped."""


class Rollback(Exception):
    """Internal to the loop: leave the epoch, the state has been reloaded from the last checkpoint."""


@dataclass
class RecoveryState:
    """Rollback bookkeeping: count, skipped (epoch, window) pairs, cumulative lr factor, precision fallback."""

    rollbacks: int = 0
    skip: set = field(default_factory=set)  # {(epoch, window)} with window = batch index // accum_iter
    lr_factor: float = 1.0
    amp: Optional[str] = None  # the precision a rollback switched to (None: as configured)

    def skips(self, epoch: int, window: int) -> bool:
        """True when this window produced a non-finite value before and is skipped."""
        return (epoch, window) in self.skip

    def to_dict(self) -> dict:
        """For the checkpoint's `counters` (weights_only-loadable)."""
        return {"rollbacks": self.rollbacks, "skip": sorted([list(p) for p in self.skip]),
                "lr_factor": self.lr_factor, "amp": self.amp}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RecoveryState":
        """Inverse of to_dict (an absent entry is a fresh state)."""
        if not d:
            return cls()
        return cls(rollbacks=int(d.get("rollbacks", 0)), skip={(int(e), int(w)) for e, w in d.get("skip", [])},
                   lr_factor=float(d.get("lr_factor", 1.0)), amp=d.get("amp"))


def fallback_precision(current: str, target: Optional[str]) -> Optional[str]:
    """The precision to switch to after a rollback: `target` when it is more precise than `current`, else None."""
    if not target or target not in PRECISION_ORDER or current not in PRECISION_ORDER:
        return None
    return target if PRECISION_ORDER.index(target) > PRECISION_ORDER.index(current) else None


def handle_nonfinite(trainer, what: str, value: float, epoch: int, i: int) -> None:
    """Apply optimization.on_nonfinite to `trainer`: raise (stop), drop the step (skip) or reload (rollback)."""
    trainer.state.skipped_nonfinite += 1
    where = f"epoch {epoch}, iteration {i}, optimiser step {trainer.state.step}"
    if trainer.s.on_nonfinite == "rollback":
        rollback(trainer, what, value, epoch, i, where)
    if trainer.s.on_nonfinite == "stop":
        latest = trainer.ckpt.latest() if trainer.ckpt else None
        raise NonFiniteLossError(
            f"non-finite {what} ({value}) at {where}; lower the learning rate, set optimization.gradient_clip, "
            f"or optimization.on_nonfinite=skip / rollback" + (f" (last checkpoint: {latest})" if latest else "")
        )
    trainer.run.info(f"warning: non-finite {what} ({value}) at {where}: step skipped")
    trainer.optimizer.zero_grad(set_to_none=True)


def rollback(t, what: str, value: float, epoch: int, i: int, where: str) -> None:
    """Reload t's last checkpoint, skip this optimiser step's window from now on, then raise Rollback.

    Past optimization.max_rollbacks: NonFiniteLossError naming the step and the last good checkpoint.
    """
    s, r = t.s, t.recovery
    if r.rollbacks >= s.max_rollbacks:
        raise NonFiniteLossError(
            f"non-finite {what} ({value}) at {where}, after {r.rollbacks} rollback(s) "
            f"(optimization.max_rollbacks = {s.max_rollbacks}); last good checkpoint: {t._restore_point}"
        )
    window = i // s.accum_iter
    kept = replace(r, rollbacks=r.rollbacks + 1, skip=r.skip | {(epoch, window)},
                   lr_factor=r.lr_factor * s.rollback_lr_scale)
    changes = []
    new_amp = fallback_precision(t.amp, s.rollback_amp)
    if new_amp:
        changes.append(f"amp {t.amp} -> {new_amp}")
        kept.amp = new_amp
        t._set_precision(new_amp)
    if s.rollback_lr_scale != 1.0:
        changes.append(f"lr x{kept.lr_factor:g}")
    t.optimizer.zero_grad(set_to_none=True)
    nonfinite = t.state.skipped_nonfinite
    t.load(load_training_checkpoint(t._restore_point))
    t.recovery, t.state.skipped_nonfinite = kept, nonfinite  # the checkpoint predates this rollback
    t._saved_at = t.state.position()
    first, last = window * s.accum_iter, min((window + 1) * s.accum_iter, t.iters_per_epoch) - 1
    t.run.info(
        f"rollback {kept.rollbacks}/{s.max_rollbacks}: non-finite {what} ({value}) at {where}; reloaded "
        f"{t._restore_point} (step {t.state.step}); skipping iteration(s) {first}-{last} of epoch {epoch}"
        + (f"; {', '.join(changes)}" if changes else "")
    )
    t.run.metrics({"kind": "rollback", "rollback": kept.rollbacks, "what": what, "value": value,
                   "epoch": epoch, "iter": i, "step": t.state.step, "skip_first": first,
                   "skip_last": last, "amp": t.amp, "lr_factor": kept.lr_factor}, t.state.step)
    raise Rollback
