"""THE training loop, shared by every task: accumulation, AMP, clipping, hooks, non-finite guard / rollback,
graceful stops on signals, checkpoints.

A task hands it a model, an optimiser, a dataset and a `step_fn(model, batch) -> (loss, logs)`; the loop
knows nothing else about the model. Every way a run ends leaves a checkpoint that latest.pt points to:
the last epoch, misc.max_steps, a signal (SIGTERM / SIGUSR1 / Ctrl-C: the current optimiser step finishes,
a step checkpoint is written, RunInterrupted is raised, exit code 75) and exhausted rollbacks (latest.pt is the
last good checkpoint). Rerunning the same command resumes from it, bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mimkit.engine import distributed as D
from mimkit.engine.checkpoint import (
    CKPT_NAME, CheckpointManager, CheckpointWriteError, capture_rng, make_checkpoint, restore_rng,
)
from mimkit.engine import fsdp as F
from mimkit.engine.logging import RunLogger, SmoothedValue
from mimkit.engine.memory import fmt_bytes, is_oom, memory_line, oom_advice, peak_bytes
from mimkit.engine.optim import optimizer_kind
from mimkit.engine.precision import (  # noqa: F401  (tasks import these)
    amp_decision, autocast_dtype, describe_amp, resolve_amp,
)
from mimkit.engine.rollback import NonFiniteLossError, RecoveryState, Rollback, handle_nonfinite  # noqa: F401
from mimkit.engine.sampling import EpochSampler, SeededSamples, build_loader, shutdown_workers
from mimkit.engine.signals import GracefulStop, signal_name
from mimkit.errors import CheckpointError, DataError, RunInterrupted, UserError

StepFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]
LrSchedule = Callable[[torch.optim.Optimizer, float], None]


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
    on_nonfinite: str = "stop"  # stop | skip | rollback
    max_rollbacks: int = 3  # rollback: at most this many per run, then stop
    rollback_lr_scale: float = 1.0  # rollback: multiply the lr by this after each rollback
    rollback_amp: Optional[str] = None  # rollback: switch to this more precise amp (bf16 | off); None keeps it
    amp: str = "off"  # bf16 | fp16 | off (already resolved from auto)
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    seed: int = 0
    save_freq_epochs: int = 0
    save_freq_steps: int = 0
    max_steps: int = 0
    # the step max_steps counts from when the step axis runs on from an earlier fit (incremental's tasks): messages
    # name the user's --max_steps, max_steps_from + it is the step the loop stops at
    max_steps_from: int = 0
    # the schedule's length in iterations when it ends inside an epoch (a run sized in iterations, e.g. segment
    # --max_iters): the last epoch is that much shorter by design; 0 = epochs x iterations per epoch
    total_iters: int = 0
    find_unused_parameters: bool = False
    strategy: str = "ddp"  # ddp | fsdp: how the model's state is laid out over the ranks (the memory line)
    grad_checkpointing: object = False  # the model's setting, named by the out-of-memory advice


def rollback_settings(opt) -> dict:
    """LoopSettings keyword arguments of an `optimization` config section (on_nonfinite and its rollback keys)."""
    return {"on_nonfinite": opt.on_nonfinite, "max_rollbacks": opt.max_rollbacks,
            "rollback_lr_scale": opt.rollback_lr_scale, "rollback_amp": opt.rollback_amp}


@dataclass
class TrainState:
    """Position of the run: the next batch to run is (epoch, batch); step counts optimiser steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    skipped_nonfinite: int = 0
    skipped_images: int = 0
    history: list = field(default_factory=list)

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.batch, self.step


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
        self.recovery = RecoveryState()
        self.device = dist.device
        self.sampler = EpochSampler(dataset, dist.rank, dist.world_size, settings.seed)
        self.iters_per_epoch = self.sampler.full_len() // settings.batch_size
        if self.iters_per_epoch < 1:
            raise DataError(
                f"the dataset has {len(dataset)} images: fewer than one batch of {settings.batch_size} "
                f"per process ({dist.world_size} process(es)); lower --batch_size"
            )
        if settings.on_nonfinite == "rollback" and ckpt is None:
            raise UserError("optimization.on_nonfinite=rollback needs checkpoints to roll back to")
        self.fsdp = F.is_sharded(model)  # FSDP2: sharded parameters, sharded checkpoints
        if self.fsdp and settings.on_nonfinite == "rollback":
            raise UserError("optimization.on_nonfinite=rollback is not available under --strategy fsdp; use stop or "
                            "skip (a stopped run resumes from its last sharded checkpoint)")
        self._check_writable()
        self.loader = build_loader(
            SeededSamples(dataset, settings.seed), settings.batch_size, self.sampler, collate, settings.num_workers,
            settings.pin_memory and self.device.type == "cuda", settings.persistent_workers, settings.seed,
        )
        self._set_precision(settings.amp)
        self.wrapped = self._wrap(model)
        self._saved_at: Optional[tuple] = None  # position of the newest checkpoint this run wrote
        self._restore_point: Optional[Path] = None  # that checkpoint's model.pt (what a rollback reloads)
        self._stopper: Optional[GracefulStop] = None
        self._stop_signum = 0  # the stop signal agreed on by every rank (0 = none)
        self._epoch_end: Optional[int] = None  # the end of the running (or resumed) epoch's sample list
        self._steps_here = 0  # optimiser steps this process ran (the first is followed by the measured peak)

    # ------------------------------------------------------------------ setup
    def current_lr(self) -> float:
        """The lr of the first parameter group still in the optimiser (0 when none is left)."""
        groups = self.optimizer.param_groups
        return groups[0]["lr"] if groups else 0.0

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.fsdp:  # fully_shard already made it its own wrapper
            return model
        if not self.dist.enabled or not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.s.find_unused_parameters)

    def rewrap(self) -> None:
        """Rebuild the DDP wrapper after the set of trainable parameters changed (FreezeOut)."""
        self.wrapped = self._wrap(self.model)

    def _set_precision(self, amp: str) -> None:
        self.amp = amp
        self.amp_dtype = autocast_dtype(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _check_writable(self) -> None:
        """A checkpoint folder that cannot be written stops the run now, on every rank, with one line."""
        if self.ckpt is None:
            return
        err = None
        if self.dist.is_main:
            try:
                self.ckpt.check_writable()
                removed = self.ckpt.remove_stale_temps()
                if removed:
                    self.run.info(f"removed temporary checkpoint files left by stopped processes in "
                                  f"{self.ckpt.dir}: {', '.join(removed)}")
            except CheckpointWriteError as e:
                err = e
        if not D.all_true(err is None, self.device):
            raise err or CheckpointWriteError(f"rank 0 cannot write checkpoints to {self.ckpt.dir}")

    # ------------------------------------------------------------------ checkpoints
    def weights_checkpoint(self) -> dict:
        """checkpoint() with the full weights in it also under FSDP (best.pt): call it on every rank (under FSDP a
        collective gathers the weights to rank 0; there the other ranks' copy is empty)."""
        return self.checkpoint(model_state=F.full_model_state(self.model) if self.fsdp else None)

    def checkpoint(self, rng_per_rank: Optional[list] = None, model_state: Optional[dict] = None) -> dict:
        """The full training state as the one checkpoint format (`rng_per_rank`: every rank's RNG, DDP).

        Under FSDP the weights and optimiser state live in the shards beside it: `model` is empty, or
        `model_state` (final.pt: the full weights gathered to rank 0).
        """
        extra = {type(h).__name__: h.state_dict() for h in self.hooks if hasattr(h, "state_dict")}
        if self.fsdp:
            model_sd, optim_sd = (model_state or {}), {}
        else:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        ckpt = make_checkpoint(
            model=model_sd, optimizer=optim_sd,
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            scheduler={"iters_per_epoch": self.iters_per_epoch},
            epoch=self.state.epoch, step=self.state.step,
            data_position=self.data_position(),
            counters={"skipped_nonfinite": self.state.skipped_nonfinite, "skipped_images": self.state.skipped_images,
                      "recovery": self.recovery.to_dict()},
            config=self.config, rng=capture_rng(), extra=extra,
        )
        if rng_per_rank is not None and len(rng_per_rank) > 1:
            ckpt["rng_per_rank"] = rng_per_rank
        return ckpt

    def data_position(self) -> dict:
        """Where the data stands: the next batch, and the global sample of the epoch's list (any world size)."""
        st, world = self.state, self.dist.world_size
        return {"epoch": st.epoch, "batch": st.batch, "samples": st.batch * self.s.batch_size * world,
                "world_size": world, "batch_size": self.s.batch_size,
                "epoch_end": self._epoch_end if st.batch else None}

    def _resume_position(self, pos: dict, ckpt: dict) -> int:
        """The batch index to resume at: the checkpoint's own, or its global sample offset in this run's geometry
        (another world size or batch size) -> batch; CheckpointError when the offset falls inside a batch."""
        batch = int(pos["batch"])
        old_world = int(pos.get("world_size", len(ckpt.get("rng_per_rank") or [None])))
        old_bs = int(pos.get("batch_size", (ckpt.get("config") or {}).get("optimization", {}).get("batch_size")
                              or self.s.batch_size))
        world, bs = self.dist.world_size, self.s.batch_size
        self._epoch_end = pos.get("epoch_end") if batch else None
        if (old_world, old_bs) == (world, bs) or not batch:
            if (old_world, old_bs) != (world, bs):
                self.run.info(f"resuming with {world} process(es) x batch {bs} (the checkpoint: {old_world} x "
                              f"{old_bs}) at the start of epoch {pos['epoch']}")
            return batch
        samples = int(pos.get("samples", batch * old_bs * old_world))
        if samples % (bs * world):
            raise CheckpointError(
                f"cannot continue epoch {pos['epoch']} at sample {samples} with {world} process(es) x batch {bs}: "
                f"it is not a whole number of batches; use a --batch_size that divides {samples // world}"
                if samples % world == 0 else
                f"cannot continue epoch {pos['epoch']} at sample {samples} on {world} process(es): not a whole "
                f"number of batches; resume on a number of processes that divides {samples}")
        if self._epoch_end is None:  # an older checkpoint: the epoch's list as its world size cut it
            self._epoch_end = len(self.sampler.order()) // old_world * old_world
        new_batch = samples // (bs * world)
        self.run.info(f"world size {old_world} -> {world}, batch {old_bs} -> {bs}: epoch {pos['epoch']} continues at "
                      f"sample {samples} of its list (iteration {new_batch} here, {batch} before); every image of "
                      "the epoch is still seen exactly once")
        return new_batch

    def load(self, ckpt: dict, path: Optional[str | Path] = None) -> None:
        """Restore everything a checkpoint holds; RNG last, so training continues bitwise.

        A sharded (FSDP) checkpoint's shards are read from beside `path` (its latest.pt or model.pt), on any
        number of processes.
        """
        sharded = ckpt.get("sharded")
        if not sharded and not self.fsdp:  # (a full checkpoint under FSDP: F.load_full below, weights too)
            try:
                self.model.load_state_dict(ckpt["model"], strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint does not fit this model: {_short_load_error(e)}") from None
        for h in self.hooks:  # hooks first: they may change which parameters the optimiser holds
            name = type(h).__name__
            if hasattr(h, "load_state_dict") and name in ckpt.get("extra", {}):
                h.load_state_dict(ckpt["extra"][name], self)
        counters = ckpt.get("counters", {})
        self.recovery = RecoveryState.from_dict(counters.get("recovery"))
        if self.recovery.amp and self.recovery.amp != self.amp:
            self.run.info(f"amp {self.recovery.amp}: the precision an earlier rollback fell back to")
            self._set_precision(self.recovery.amp)
        if sharded:
            F.load_shards(self.model, self.optimizer,
                          F.shard_folder(ckpt, path, self.ckpt.dir if self.ckpt is not None else None))
            if sharded.get("world_size") != self.dist.world_size or not self.fsdp:
                self.run.info(f"read the sharded checkpoint of {sharded.get('world_size')} FSDP rank(s) on "
                              f"{self.dist.world_size} process(es)" + ("" if self.fsdp else " without FSDP"))
        elif self.fsdp:
            F.load_full(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
            self.run.info(f"read the full checkpoint of {ckpt.get('data_position', {}).get('world_size', 1)} "
                          f"process(es) into the model sharded over {self.dist.world_size} FSDP rank(s)")
        else:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"optimizer state does not fit this run: {e}") from None
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt.get("data_position", {"epoch": ckpt["epoch"], "batch": 0})
        self.state.epoch, self.state.step = int(pos["epoch"]), int(ckpt["step"])
        self.state.batch = self._resume_position(pos, ckpt)
        self.state.skipped_nonfinite = int(counters.get("skipped_nonfinite", 0))
        self.state.skipped_images = int(counters.get("skipped_images", 0))
        saved_ipe = ckpt.get("scheduler", {}).get("iters_per_epoch")
        same_geometry = (pos.get("world_size", self.dist.world_size), pos.get("batch_size", self.s.batch_size)) == (
            self.dist.world_size, self.s.batch_size)
        if self.state.batch and saved_ipe and saved_ipe != self.iters_per_epoch and same_geometry:
            raise CheckpointError(
                f"cannot resume in the middle of epoch {self.state.epoch}: the checkpoint had {saved_ipe} "
                f"iterations per epoch, this run has {self.iters_per_epoch} (the data changed)"
            )
        per_rank = ckpt.get("rng_per_rank")
        if per_rank and len(per_rank) == self.dist.world_size:
            restore_rng(per_rank[self.dist.rank])  # each rank's own masks and drop-path continue
        elif "rng" in ckpt:
            restore_rng(ckpt["rng"])

    def _save(self, kind: str, index: int) -> Optional[Path]:
        """Write <kind>-<index>/ (rank 0) with every rank's RNG; a write error stops every rank with one line."""
        if self.ckpt is None:
            return None
        if self.fsdp:
            return self._save_sharded(kind, index)
        rngs = D.gather_objects(capture_rng())  # a collective: every rank calls _save at the same point
        err = None
        folder = self.ckpt.dir / f"{kind}-{index}"
        if self.dist.is_main:
            try:
                self.ckpt.save(self.checkpoint(rng_per_rank=rngs), kind, index, self.config_yaml)
                self.run.file_only(f"saved checkpoint {folder}")
                self.run.checkpoint_saved(folder, f"{kind}-{index}")
            except CheckpointWriteError as e:
                err = e
        if not D.all_true(err is None, self.device):
            raise err or CheckpointWriteError(f"rank 0 could not write checkpoint {folder}")
        self._saved_at, self._restore_point = self.state.position(), folder / CKPT_NAME
        return folder

    def _save_sharded(self, kind: str, index: int) -> Path:
        """FSDP: every rank writes its shard into one temp folder, then rank 0 adds model.pt (the rest of the
        state) and renames it into place, so latest.pt only ever points to a complete checkpoint."""
        rngs = D.gather_objects(capture_rng())
        name = f"{kind}-{index}"
        tmp = self.ckpt.dir / f".{name}.tmp-shards"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / F.SHARD_DIR).mkdir(parents=True)
        D.barrier()
        F.broadcast_buffers(self.model)  # the checkpoint holds one copy of each buffer: rank 0's, on every rank
        F.save_shards(self.model, self.optimizer, tmp / F.SHARD_DIR)
        D.barrier()
        err = None
        if self.dist.is_main:
            ckpt = self.checkpoint(rng_per_rank=rngs)
            ckpt["sharded"] = {"folder": name, "world_size": self.dist.world_size,
                               "format": "torch.distributed.checkpoint",
                               "files": sorted(p.name for p in (tmp / F.SHARD_DIR).iterdir())}
            try:
                self.ckpt.save(ckpt, kind, index, self.config_yaml, tmp=tmp)
                self.run.file_only(f"saved sharded checkpoint {self.ckpt.dir / name}")
            except CheckpointWriteError as e:
                err = e
        if not D.all_true(err is None, self.device):
            raise err or CheckpointWriteError(f"rank 0 could not write checkpoint {self.ckpt.dir / name}")
        self._saved_at, self._restore_point = self.state.position(), self.ckpt.dir / name / CKPT_NAME
        return self.ckpt.dir / name

    # ------------------------------------------------------------------ the loop
    def _call_hooks(self, name: str, *args) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(self, *args)

    def fit(self) -> TrainState:
        """Train from the current state to the last epoch (or misc.max_steps); returns the final state.

        Raises RunInterrupted after a signal (checkpoint written) and NonFiniteLossError when the non-finite
        policy gives up.
        """
        s, st = self.s, self.state
        if s.max_steps and st.step >= s.max_steps:
            self.run.info(f"nothing to train: step {st.step} already reached misc.max_steps = {s.max_steps} "
                          "(raise --max_steps to continue)")
            return st
        left = max(0, self.run_iters() - (st.epoch * self.iters_per_epoch + st.batch))
        if s.max_steps:
            left = min(left, max(0, s.max_steps - st.step) * s.accum_iter)
        self.run.info(memory_line(self.model, optimizer_kind(self.optimizer), s.strategy, self.dist.world_size))
        self.run.start_run(left, self.device.type)  # the whole run's estimate and ETA
        start = st.position()
        self._call_hooks("on_train_start")
        try:
            self._fit(start)
        except NonFiniteLossError as e:  # the CLI prints it to stderr; the run's own record keeps it too
            self.run.file_only(f"error: {e}")
            raise
        finally:
            shutdown_workers(self.loader)
        return st

    def run_iters(self) -> int:
        """Iterations of the whole schedule: epochs x iterations per epoch, or settings.total_iters when it is less."""
        full = self.s.epochs * self.iters_per_epoch
        return min(full, self.s.total_iters) if self.s.total_iters else full

    def epoch_iters(self, epoch: int) -> int:
        """Iterations of `epoch`: a full epoch, except the last of a schedule that ends inside it."""
        return max(0, min(self.iters_per_epoch, self.run_iters() - epoch * self.iters_per_epoch))

    def _fit(self, start: tuple[int, int, int]) -> None:
        s, st = self.s, self.state
        with GracefulStop() as stopper:
            self._stopper = stopper
            if s.on_nonfinite == "rollback":
                self._save("step", st.step)  # the restore point a rollback before the first save returns to
            ending = "epoch"
            while st.epoch < s.epochs and self.epoch_iters(st.epoch) > 0 and ending in ("epoch", "rollback"):
                try:
                    ending = self._run_epoch()
                except Rollback:
                    ending = "rollback"
            if ending == "signal":
                self._stop_on_signal()
            if st.position() != start and self._saved_at != st.position():
                # every stop is a resume point: latest.pt at the position the run ended
                self._save("step", st.step) if ending == "max_steps" else self._save("epoch", st.epoch)
        self._stopper = None
        if self.ckpt is not None and (st.position() != start or not (self.ckpt.dir / "final.pt").exists()):
            err = None
            # FSDP: the full weights gathered to rank 0 (a collective), so final.pt reads as any checkpoint
            full = F.full_model_state(self.model) if self.fsdp else None
            if self.dist.is_main:
                try:
                    # the save at this very position already holds this state (not under FSDP: its model.pt
                    # holds no weights)
                    same = self._restore_point if self._saved_at == st.position() and not self.fsdp else None
                    final = self.ckpt.save_final(self.checkpoint(model_state=full), same_as=same)
                    self.run.checkpoint_saved(final, "final")
                except CheckpointWriteError as e:
                    err = e
            if not D.all_true(err is None, self.device):
                raise err or CheckpointWriteError("rank 0 could not write final.pt")

    def _run_epoch(self) -> str:
        """One epoch from the current position; returns how it ended: epoch | max_steps | signal."""
        s, st = self.s, self.state
        epoch, start_batch = st.epoch, st.batch
        self._skipped_before = st.skipped_images  # the epoch's own count is the difference
        self.sampler.set_epoch(epoch)
        # the global sample offset: the same list on any number of processes; a resumed epoch keeps its list's end
        self.sampler.set_start(start_batch * s.batch_size * self.dist.world_size,
                               self._epoch_end if start_batch else None)
        self._epoch_end = self.sampler.epoch_end()
        self.wrapped.train(True)
        self.optimizer.zero_grad(set_to_none=True)
        n_iters = self.epoch_iters(epoch)
        self.run.start_epoch(epoch, n_iters, initial=start_batch)
        smooth = SmoothedValue()
        ep_loss, ep_n, t_epoch, t_last = 0.0, 0, time.perf_counter(), time.perf_counter()
        ending = "epoch"
        batches = iter(self.loader)
        try:
            for i, batch in enumerate(batches, start=start_batch):
                if i >= n_iters:
                    break
                if i % s.accum_iter == 0:
                    self._set_lr(epoch + i / self.iters_per_epoch)
                update = (i + 1) % s.accum_iter == 0
                st.skipped_images += int(batch.get("skipped", 0))
                # a window that diverged before a rollback, or every image of the batch unreadable (on any
                # rank): all ranks skip it together
                if self.recovery.skips(epoch, i // s.accum_iter) or not D.all_true(
                        batch["images"].shape[0] > 0, self.device):
                    st.batch = i + 1
                    continue
                batch = _to_device(batch, self.device)
                with self._oom_guard():
                    loss_value, logs = self._forward_backward(batch, update, epoch, i)
                    if loss_value is None:  # non-finite, dropped by the skip policy
                        st.batch = i + 1
                        continue
                    st.batch = i + 1
                    grad_norm = None
                    if update:
                        grad_norm, stepped = self._optimizer_step(epoch, i)
                if update and stepped:
                    self._after_first_step()
                    ending = self._after_step()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                ep_loss, ep_n = ep_loss + loss_value, ep_n + 1
                record = {"loss": loss_value, "loss_avg": smooth.update(loss_value), "lr": self.current_lr(),
                          "samples_per_s": s.batch_size * self.dist.world_size / max(dt, 1e-9), "iter_s": dt,
                          **logs}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self.run.progress(i, record)
                if i % self.run.print_freq == 0 or i == n_iters - 1:
                    self.run.metrics({"kind": "step", "epoch": epoch, "iter": i, "step": st.step, **record}, st.step)
                if ending != "epoch":
                    break
        except BaseException:
            shutdown_workers(self.loader, batches)  # a traceback would keep the workers alive until exit
            raise
        finally:
            self.run.end_epoch()
        # resumed exactly at the end of this epoch: its summary was logged by the earlier run
        if not (ep_n == 0 and start_batch >= n_iters):
            self._epoch_summary(epoch, ep_loss, ep_n, time.perf_counter() - t_epoch, n_iters)
        if ending != "epoch":
            return ending
        st.epoch, st.batch = epoch + 1, 0
        self._call_hooks("on_epoch_end", epoch)
        last = st.epoch == s.epochs
        if s.save_freq_epochs and (st.epoch % s.save_freq_epochs == 0 or last):
            self._save("epoch", st.epoch)
        return "signal" if self._stop_requested() else "epoch"

    def _forward_backward(self, batch: dict, update: bool, epoch: int, i: int) -> tuple[Optional[float], dict]:
        """step_fn and backward (gradients accumulate unless `update`) -> (loss value or None when non-finite, logs)."""
        s = self.s
        sync_ctx = self._no_sync() if (self.dist.enabled and not update) else contextlib.nullcontext()
        if self.fsdp and self.dist.enabled:
            F.broadcast_buffers(self.model)  # as DDP does before every forward: rank 0's BatchNorm statistics
        with sync_ctx:
            with self._autocast():
                loss, logs = self.step_fn(self.wrapped, batch)
            loss = loss.float()  # the loss value and its backward start in fp32 under any autocast
            loss_value = loss.item()
            if not D.all_true(math.isfinite(loss_value), self.device):
                self._nonfinite("loss", loss_value, epoch, i)
                return None, logs
            if loss.requires_grad:  # False once FreezeOut has frozen every trainable part
                self.scaler.scale(loss / s.accum_iter).backward()
        return loss_value, logs

    def _no_sync(self):
        """Accumulate without communication: DDP's no_sync, FSDP2's set_requires_gradient_sync(False)."""
        return F.no_gradient_sync(self.model) if self.fsdp else self.wrapped.no_sync()

    @contextlib.contextmanager
    def _oom_guard(self):
        """An out-of-memory error in the first steps becomes one line naming the switches that fit the run."""
        try:
            yield
        except Exception as e:
            if self._steps_here >= 3 or not is_oom(e):
                raise
            s = self.s
            raise UserError(
                f"out of memory in the first steps (batch {s.batch_size} per process, accum_iter {s.accum_iter}, "
                f"{self.dist.world_size} process(es), strategy {s.strategy}): try "
                + oom_advice(s.batch_size, s.accum_iter, self.dist.world_size, s.strategy, s.grad_checkpointing)
            ) from None

    def _after_first_step(self) -> None:
        """After this process's first optimiser step: the measured peak memory, next to the estimate."""
        self._steps_here += 1
        if self._steps_here != 1:
            return
        peak = peak_bytes(self.device)
        if peak is not None:
            how = "CUDA max_memory_allocated" if self.device.type == "cuda" else "peak RSS of the process"
            self.run.info(f"memory after the first step: {fmt_bytes(peak)} on rank {self.dist.rank} ({how})")

    def _set_lr(self, epoch_f: float) -> None:
        self.lr_schedule(self.optimizer, epoch_f)
        if self.recovery.lr_factor != 1.0:
            for g in self.optimizer.param_groups:
                g["lr"] *= self.recovery.lr_factor

    def _optimizer_step(self, epoch: int, i: int) -> tuple[Optional[float], bool]:
        """Clip, step, update the scaler -> (gradient norm or None, whether the optimiser stepped)."""
        grad_norm = None
        if self.s.gradient_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = F.clip_grad_norm(self.model.parameters(), self.s.gradient_clip)  # DDP == FSDP
            # under fp16 an inf norm is the scaler calibrating (it skips the step itself); otherwise divergence.
            # Gradients are all-reduced, so every rank sees the same norm.
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                self._nonfinite("gradient norm", grad_norm, epoch, i)
                return grad_norm, False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm, True

    def _after_step(self) -> str:
        """Hooks, step checkpoints and the stop checks after an optimiser step -> epoch | max_steps | signal."""
        s, st = self.s, self.state
        self._call_hooks("on_step_end")
        if s.save_freq_steps and st.step % s.save_freq_steps == 0:
            self._save("step", st.step)
        if s.max_steps and st.step >= s.max_steps:
            since = f" (step {s.max_steps})" if s.max_steps_from else ""
            self.run.info(f"stopping at misc.max_steps = {s.max_steps - s.max_steps_from} optimiser steps{since}")
            return "max_steps"
        return "signal" if self._stop_requested() else "epoch"

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (an all-reduce, so every rank stops at the same step)."""
        local = self._stopper.signum if self._stopper is not None else 0
        self._stop_signum = D.max_int(local, self.device)
        return self._stop_signum != 0

    def _stop_on_signal(self) -> None:
        st = self.state
        name = signal_name(self._stop_signum)
        folder = self._save("step", st.step) if self._saved_at != st.position() else self._restore_point.parent
        msg = (f"stopped by {name} after optimiser step {st.step} (epoch {st.epoch}, iteration {st.batch}): "
               f"checkpoint {folder}; rerun the same command to resume")
        self.run.info(msg)
        self.run.metrics({"kind": "stop", "signal": name, "epoch": st.epoch, "iter": st.batch, "step": st.step},
                         st.step)
        raise RunInterrupted(msg)

    def _epoch_summary(self, epoch: int, ep_loss: float, ep_n: int, epoch_time: float, n_iters: int) -> None:
        """Log the epoch's mean loss (over ranks), time and skip counters; n_iters: the epoch's own length."""
        st = self.state
        mean_loss = D.all_reduce_mean(ep_loss / max(ep_n, 1), self.device)
        partial = 0 < st.batch < n_iters  # a stop inside the epoch (max_steps, signal)
        summary = {"kind": "epoch", "epoch": epoch, "step": st.step, "loss": mean_loss,
                   "lr": self.current_lr(), "epoch_time_s": epoch_time, "partial": partial,
                   "skipped_images": st.skipped_images, "skipped_nonfinite": st.skipped_nonfinite,
                   "skipped_images_epoch": st.skipped_images - getattr(self, "_skipped_before", 0)}
        st.history.append(summary)
        self.run.metrics(summary, st.step, tb_prefix="epoch")
        self.run.info(
            (f"epoch {epoch} stopped after iteration {st.batch}/{n_iters} (the rest runs on resume):"
             if partial else f"epoch {epoch} done" + (f" ({n_iters} of {self.iters_per_epoch} iterations: the "
                                                        f"schedule ends here)" if n_iters < self.iters_per_epoch
                                                        else "") + ":")
            + f" loss {mean_loss:.4f}  time {epoch_time:.1f}s"
            + (f"  skipped images {summary['skipped_images_epoch']} this epoch, {st.skipped_images} in all"
               if st.skipped_images else "")
        )

    # ------------------------------------------------------------------ non-finite values
    def _nonfinite(self, what: str, value: float, epoch: int, i: int) -> None:
        """Apply optimization.on_nonfinite: raise (stop), drop the step (skip) or reload (rollback)."""
        handle_nonfinite(self, what, value, epoch, i)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _short_load_error(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
    return text[:400]
