"""What `optimization.on_nonfinite=rollback` remembers: rollbacks used, windows to skip, lr factor, precision.

On a NaN/inf loss (or gradient norm, with clipping on and no fp16 scaler) the loop reloads the last checkpoint,
marks the optimiser step's window of batches (accum_iter batches) as skipped, optionally falls back to a more
precise autocast dtype and scales the lr, and continues. The state rides in every checkpoint (`counters`), so
a resumed run keeps skipping the same windows and keeps the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mimkit.engine.precision import PRECISION_ORDER


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
