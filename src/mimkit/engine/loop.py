"""THE training loop, shared by every task: accumulation, AMP, clipping, hooks, non-finite guard, checkpoints.

A task hands it a model, an optimiser, a dataset and a `step_fn(model, batch) -> (loss, logs)`; the loop
knows nothing else about the model.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mimkit.engine import distributed as D
from mimkit.engine.checkpoint import CheckpointManager, capture_rng, make_checkpoint, restore_rng
from mimkit.engine.logging import RunLogger, SmoothedValue
from mimkit.engine.sampling import EpochSampler, SeededSamples, build_loader
from mimkit.errors import CheckpointError, DataError, UserError

StepFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]
LrSchedule = Callable[[torch.optim.Optimizer, float], None]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


class Hook(Protocol):
    """Optional callbacks a task attaches to the loop; each method may be absent."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None: ...


@dataclass
class LoopSettings:
    """What the loop needs from the config, gathered in one place."""

    epochs: int
    batch_size: int
    accum_iter: int = 1
    gradient_clip: Optional[float] = None
    on_nonfinite: str = "stop"
    amp: str = "off"  # bf16 | fp16 | off (already resolved from auto)
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    seed: int = 0
    save_freq_epochs: int = 0
    save_freq_steps: int = 0
    max_steps: int = 0
    find_unused_parameters: bool = False


@dataclass
class TrainState:
    """Position of the run: the next batch to run is (epoch, batch); step counts optimiser steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    skipped_nonfinite: int = 0
    skipped_images: int = 0
    history: list = field(default_factory=list)


class Trainer:
    """Runs epochs of `step_fn` over a dataset with the optimiser, writing logs and checkpoints."""

    def __init__(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, dataset, collate: Callable, step_fn: StepFn,
        lr_schedule: LrSchedule, settings: LoopSettings, dist: D.DistInfo, run: RunLogger,
        ckpt: Optional[CheckpointManager], config: dict, config_yaml: str, hooks: list = (),
    ) -> None:
        self.model = model  # the unwrapped module: what checkpoints and hooks see
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.lr_schedule = lr_schedule
        self.s = settings
        self.dist = dist
        self.run = run
        self.ckpt = ckpt
        self.config = config
        self.config_yaml = config_yaml
        self.hooks = list(hooks)
        self.state = TrainState()
        self.device = dist.device
        self.sampler = EpochSampler(dataset, dist.rank, dist.world_size, settings.seed)
        self.iters_per_epoch = self.sampler.full_len() // settings.batch_size
        if self.iters_per_epoch < 1:
            raise DataError(
                f"the dataset has {len(dataset)} images: fewer than one batch of {settings.batch_size} "
                f"per process ({dist.world_size} process(es)); lower --batch_size"
            )
        self.loader = build_loader(
            SeededSamples(dataset, settings.seed), settings.batch_size, self.sampler, collate, settings.num_workers,
            settings.pin_memory and self.device.type == "cuda", settings.persistent_workers, settings.seed,
        )
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        self.wrapped = self._wrap(model)

    # ------------------------------------------------------------------ setup
    def current_lr(self) -> float:
        """The lr of the first parameter group still in the optimiser (0 when none is left)."""
        groups = self.optimizer.param_groups
        return groups[0]["lr"] if groups else 0.0

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled or not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.s.find_unused_parameters)

    def rewrap(self) -> None:
        """Rebuild the DDP wrapper after the set of trainable parameters changed (FreezeOut)."""
        self.wrapped = self._wrap(self.model)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """The full training state as the one checkpoint format."""
        extra = {type(h).__name__: h.state_dict() for h in self.hooks if hasattr(h, "state_dict")}
        return make_checkpoint(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            scheduler={"iters_per_epoch": self.iters_per_epoch},
            epoch=self.state.epoch, step=self.state.step,
            data_position={"epoch": self.state.epoch, "batch": self.state.batch},
            counters={"skipped_nonfinite": self.state.skipped_nonfinite, "skipped_images": self.state.skipped_images},
            config=self.config, rng=capture_rng(), extra=extra,
        )

    def load(self, ckpt: dict) -> None:
        """Restore everything a checkpoint holds; RNG last, so training continues bitwise."""
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint does not fit this model: {_short_load_error(e)}") from None
        for h in self.hooks:  # hooks first: they may change which parameters the optimiser holds
            name = type(h).__name__
            if hasattr(h, "load_state_dict") and name in ckpt.get("extra", {}):
                h.load_state_dict(ckpt["extra"][name], self)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer state does not fit this run: {e}") from None
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt.get("data_position", {"epoch": ckpt["epoch"], "batch": 0})
        self.state.epoch, self.state.batch, self.state.step = int(pos["epoch"]), int(pos["batch"]), int(ckpt["step"])
        counters = ckpt.get("counters", {})
        self.state.skipped_nonfinite = int(counters.get("skipped_nonfinite", 0))
        self.state.skipped_images = int(counters.get("skipped_images", 0))
        saved_ipe = ckpt.get("scheduler", {}).get("iters_per_epoch")
        if self.state.batch and saved_ipe and saved_ipe != self.iters_per_epoch:
            raise CheckpointError(
                f"cannot resume in the middle of epoch {self.state.epoch}: the checkpoint had {saved_ipe} "
                f"iterations per epoch, this run has {self.iters_per_epoch} (batch size, data or world size changed)"
            )
        if "rng" in ckpt:
            restore_rng(ckpt["rng"])

    def _save(self, kind: str, index: int) -> None:
        if self.ckpt is not None and self.dist.is_main:
            path = self.ckpt.save(self.checkpoint(), kind, index, self.config_yaml)
            self.run.file_only(f"saved checkpoint {path}")
        D.barrier()

    # ------------------------------------------------------------------ the loop
    def _call_hooks(self, name: str, *args) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(self, *args)

    def fit(self) -> TrainState:
        """Train from the current state to the last epoch; returns the final state."""
        s, st = self.s, self.state
        left = max(0, s.epochs * self.iters_per_epoch - (st.epoch * self.iters_per_epoch + st.batch))
        if s.max_steps:
            left = min(left, max(0, s.max_steps - st.step) * s.accum_iter)
        self.run.start_run(left, self.device.type)  # the whole run's estimate and ETA
        self._call_hooks("on_train_start")
        smooth = SmoothedValue()
        stop = False
        for epoch in range(st.epoch, s.epochs):
            st.epoch = epoch
            start_batch = st.batch
            self._skipped_before = st.skipped_images  # the epoch's own count is the difference
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start_batch * s.batch_size)
            self.wrapped.train(True)
            self.optimizer.zero_grad(set_to_none=True)
            self.run.start_epoch(epoch, self.iters_per_epoch, initial=start_batch)
            ep_loss, ep_n, t_epoch, t_last = 0.0, 0, time.perf_counter(), time.perf_counter()
            for i, batch in enumerate(self.loader, start=start_batch):
                if i >= self.iters_per_epoch:
                    break
                if i % s.accum_iter == 0:
                    self.lr_schedule(self.optimizer, epoch + i / self.iters_per_epoch)
                update = (i + 1) % s.accum_iter == 0
                st.skipped_images += int(batch.get("skipped", 0))
                # every image of the batch unreadable (on any rank): all ranks skip it together
                if not D.all_true(batch["images"].shape[0] > 0, self.device):
                    st.batch = i + 1
                    continue
                batch = _to_device(batch, self.device)
                sync_ctx = self.wrapped.no_sync() if (self.dist.enabled and not update) else contextlib.nullcontext()
                with sync_ctx:
                    with self._autocast():
                        loss, logs = self.step_fn(self.wrapped, batch)
                    loss_value = loss.item()
                    if not D.all_true(math.isfinite(loss_value), self.device):
                        self._nonfinite(loss_value, epoch, i)
                        st.batch = i + 1
                        continue
                    if loss.requires_grad:  # False once FreezeOut has frozen every trainable part
                        self.scaler.scale(loss / s.accum_iter).backward()
                st.batch = i + 1
                grad_norm = None
                if update:
                    if s.gradient_clip:
                        self.scaler.unscale_(self.optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.gradient_clip).item()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    st.step += 1
                    self._call_hooks("on_step_end")
                    if s.save_freq_steps and st.step % s.save_freq_steps == 0:
                        self._save("step", st.step)
                    if s.max_steps and st.step >= s.max_steps:
                        stop = True
                        self.run.info(f"stopping at misc.max_steps = {s.max_steps} optimiser steps")
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                ep_loss, ep_n = ep_loss + loss_value, ep_n + 1
                lr = self.current_lr()
                record = {"loss": loss_value, "loss_avg": smooth.update(loss_value), "lr": lr,
                          "samples_per_s": s.batch_size * self.dist.world_size / max(dt, 1e-9), "iter_s": dt, **logs}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self.run.progress(i, record)
                if i % self.run.print_freq == 0 or i == self.iters_per_epoch - 1:
                    self.run.metrics({"kind": "step", "epoch": epoch, "iter": i, "step": st.step, **record}, st.step)
                if stop:
                    break
            self.run.end_epoch()
            # resumed exactly at the end of this epoch: its summary was logged by the earlier run
            if not (ep_n == 0 and start_batch >= self.iters_per_epoch):
                self._epoch_summary(epoch, ep_loss, ep_n, time.perf_counter() - t_epoch)
            if stop:
                break
            st.epoch, st.batch = epoch + 1, 0
            self._call_hooks("on_epoch_end", epoch)
            last = epoch + 1 == s.epochs
            if s.save_freq_epochs and ((epoch + 1) % s.save_freq_epochs == 0 or last):
                self._save("epoch", epoch + 1)
        if self.ckpt is not None and self.dist.is_main:
            self.ckpt.save_final(self.checkpoint())
        D.barrier()
        return st

    def _epoch_summary(self, epoch: int, ep_loss: float, ep_n: int, epoch_time: float) -> None:
        """Log the epoch's mean loss (over ranks), time and skip counters."""
        st = self.state
        mean_loss = D.all_reduce_mean(ep_loss / max(ep_n, 1), self.device)
        summary = {"kind": "epoch", "epoch": epoch, "step": st.step, "loss": mean_loss,
                   "lr": self.current_lr(), "epoch_time_s": epoch_time,
                   "skipped_images": st.skipped_images, "skipped_nonfinite": st.skipped_nonfinite,
                   "skipped_images_epoch": st.skipped_images - getattr(self, "_skipped_before", 0)}
        st.history.append(summary)
        self.run.metrics(summary, st.step, tb_prefix="epoch")
        self.run.info(
            f"epoch {epoch} done: loss {mean_loss:.4f}  time {epoch_time:.1f}s"
            + (f"  skipped images {summary['skipped_images_epoch']} this epoch, {st.skipped_images} in all"
               if st.skipped_images else "")
        )

    def _nonfinite(self, value: float, epoch: int, i: int) -> None:
        self.state.skipped_nonfinite += 1
        where = f"epoch {epoch}, iteration {i}, optimiser step {self.state.step}"
        if self.s.on_nonfinite == "stop":
            latest = self.ckpt.latest() if self.ckpt else None
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at {where}; lower the learning rate, set optimization.gradient_clip, "
                f"or optimization.on_nonfinite=skip" + (f" (last checkpoint: {latest})" if latest else "")
            )
        self.run.info(f"warning: non-finite loss ({value}) at {where}: step skipped")
        self.optimizer.zero_grad(set_to_none=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _short_load_error(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
    return text[:400]


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA device that supports it, else off; fp16/bf16 on CPU fall back to off."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if device.type != "cuda" and amp == "fp16":
        return "off"
    return amp

