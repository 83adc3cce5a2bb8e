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
                 freeze_heads: bool = False, logger=None, mask_ratio: float = 0.75) -> None:
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
        self.how_scale, self.t_0, self.mask_ratio = how_scale, t_0, mask_ratio
        self.step_flops: tuple[float, float] | None = None  # counted FLOPs of one sample, 0 and all blocks frozen
        self.frozen_steps = [0, 0]  # (steps run, sum over them of frozen blocks): the FLOPs saved so far

    @classmethod
    def from_config(cls, fcfg, model: nn.Module, logger=None) -> "FreezeOutHook":
        """Build from the `freezeout` config section."""
        return cls(model, fcfg.t_0, fcfg.how_scale, fcfg.scale_lr, fcfg.freeze_heads, logger)

    @classmethod
    def for_run(cls, fcfg, model: nn.Module, logger, mask_ratio: float) -> "FreezeOutHook":
        """Build from the `freezeout` section for a run whose step masks `mask_ratio` of the patches."""
        return cls(model, fcfg.t_0, fcfg.how_scale, fcfg.scale_lr, fcfg.freeze_heads, logger, mask_ratio)

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
            st = trainer.state
            self.logger.info(f"freezeout: {k}/{self.depth} blocks frozen after optimiser step {st.step} "
                             f"(epoch {st.epoch}, iteration {st.batch})")

    def progress(self, trainer) -> float:
        """Fraction of training done: (epoch + batch / iterations_per_epoch) / epochs."""
        st = trainer.state
        return (st.epoch + st.batch / trainer.iters_per_epoch) / trainer.s.epochs

    def freeze_steps(self, trainer) -> list[int]:
        """The optimiser step after which each block freezes (steps counted as the trainer counts them)."""
        ipe, accum, epochs = trainer.iters_per_epoch, trainer.s.accum_iter, trainer.s.epochs
        per_epoch = ipe // accum  # a tail of iterations short of accum_iter makes no step
        out = []
        for t in self.t:
            target = t * epochs * ipe - 1e-9  # the iteration count at which progress reaches t
            e = int(target // ipe)
            k = max(1, math.ceil((target - e * ipe) / accum))  # first step of epoch e that ends at or after it
            if k > per_epoch:
                e, k = e + 1, 1
            out.append(e * per_epoch + k)
        return out

    def on_train_start(self, trainer) -> None:
        if self.logger is None:
            return
        steps = self.freeze_steps(trainer)
        per_epoch = trainer.iters_per_epoch // trainer.s.accum_iter
        sched = ", ".join(f"{i}: t={t:.3f} step {n}" for i, (t, n) in enumerate(zip(self.t, steps)))
        lr = "scaled by 1/t_i" if self.scale_lr else "unscaled"
        self.logger.info(f"FreezeOut on ({self.how_scale}, t_0 {self.t_0:g}, lr {lr}): "
                         f"block i freezes after optimiser step n ({per_epoch} steps/epoch, "
                         f"{per_epoch * trainer.s.epochs} in all): {sched}")

    def count_flops(self) -> tuple[float, float] | None:
        """Counted matmul / conv / attention FLOPs of one sample's forward + backward with no block and with every
        block frozen (torch.utils.flop_counter); None when the model cannot be counted. Run once, after training
        (never inside a timed step or epoch); the RNG, requires_grad and frozen_prefix are left as they were."""
        from torch.utils.flop_counter import FlopCounterMode

        model = self.model
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():  # the blocks as they trained before freezing
            if self.block_of(n) >= 0 and not getattr(model, "is_fixed_param", lambda _: False)(n):
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        dev = next(model.parameters()).device
        x = torch.zeros(1, model.in_chans, *model.img_size, device=dev)
        was, counts = model.frozen_prefix, []
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                for k in (0, self.depth):
                    model.frozen_prefix = k
                    with FlopCounterMode(display=False) as fc:
                        loss = model(x, mask_ratio=self.mask_ratio)[0]
                        torch.autograd.grad(loss, params, allow_unused=True)
                    counts.append(float(fc.get_total_flops()))
        except Exception:  # counting is a report only: never the reason a run fails
            return None
        finally:
            model.frozen_prefix = was
            for n, p in model.named_parameters():
                p.requires_grad_(grads[n])
        return counts[0], counts[1]

    def on_step_end(self, trainer) -> None:
        self.frozen_steps[0] += 1
        self.frozen_steps[1] += self.frozen  # the step just run had this many blocks frozen
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
        if epoch == trainer.s.epochs - 1:
            self.logger.info(self.saving_line(trainer))

    def flop_saving(self) -> float | None:
        """Fraction of the counted FLOPs the steps run so far saved against the same steps with nothing frozen
        (frozen blocks cost forward only; counted at 0 and all blocks frozen, linear in between)."""
        n, frozen = self.frozen_steps
        if self.step_flops is None and n:
            self.step_flops = self.count_flops()
        if not self.step_flops or not n:
            return None
        full, all_frozen = self.step_flops
        return (full - all_frozen) * frozen / self.depth / (full * n)

    def saving_line(self, trainer) -> str:
        """'freezeout: epoch time vs epoch 0: ..., counted FLOPs saved ...': the run's end, in one line."""
        times = [h["epoch_time_s"] for h in trainer.state.history if not h.get("partial")]
        ratio = ", ".join(f"{t / times[0]:.2f}" for t in times) if times and times[0] > 0 else "n/a"
        saved = self.flop_saving()
        flops = f"{100 * saved:.1f}% of the counted FLOPs saved" if saved is not None else "FLOPs not counted"
        mean = f"; mean epoch {sum(times) / len(times):.1f}s vs epoch 0 {times[0]:.1f}s" if times else ""
        return (f"freezeout: epoch time / epoch 0 time: {ratio}{mean}; {flops} (matmul, conv, attention; the "
                "wall-clock saving is measured by benchmarks/freezeout_speedup.py)")

    def state_dict(self) -> dict:
        return {"frozen": self.frozen}

    def load_state_dict(self, sd: dict, trainer) -> None:
        """Re-freeze the blocks a checkpoint had frozen (before the optimiser state is loaded)."""
        self._freeze_through(int(sd.get("frozen", 0)), trainer)
