"""Checks and notes of the training commands before and as they start: batch fit, memory, workers, image sizes,
the schedule of a resumed run, the weights report."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from mimkit.errors import ConfigError, DataError

CPU_HINT = ("pretrain/cpu_small.yaml fits a CPU (a 3.2M-parameter model at 64 px): mimkit pretrain "
            "pretrain/cpu_small.yaml --data_path DIR; or no --data_path for the built-in demo")


def check_one_batch(n_images: int, batch_size: int, world_size: int, hint: Optional[str] = None) -> None:
    """DataError before any work when the data cannot fill one batch per process, naming the numbers that fix it:
    the largest --batch_size that fits and the images missing for this one (and `hint`, when a caller has one)."""
    if n_images // world_size >= batch_size:
        return
    fit = n_images // world_size
    missing = batch_size * world_size - n_images
    fix = (f"use --batch_size {fit} or smaller" if fit else f"use fewer than {world_size} processes")
    raise DataError(f"the dataset has {n_images} image(s): fewer than one batch of {batch_size} per process "
                    f"({world_size} process(es)); {fix}, or add at least {missing} image(s)"
                    + (f"; {hint}" if hint else ""))


def cap_workers(requested: int, run_log) -> int:
    """data.num_workers, capped at the CPU core count (said in the log when it is)."""
    n = min(requested, os.cpu_count() or 1)
    if n < requested:
        run_log.info(f"data.num_workers {requested} > {n} CPU cores: using {n}")
    return n


def note_schedule_change(run_log, saved: dict, cfg: DictConfig, lr: float, epoch_f: float) -> None:
    """Say so when a resumed run's schedule (epochs, warmup, lr, min_lr) differs from the checkpoint's run."""
    from mimkit.engine.optim import warmup_cosine

    old_s, old_o = saved.get("schedule") or {}, saved.get("optimization") or {}
    new = {"epochs": cfg.schedule.epochs, "warmup_epochs": cfg.schedule.warmup_epochs, "lr": lr,
           "min_lr": cfg.optimization.min_lr}
    old = {"epochs": old_s.get("epochs"), "warmup_epochs": old_s.get("warmup_epochs"), "lr": old_o.get("lr"),
           "min_lr": old_o.get("min_lr")}
    changed = [k for k in new if old[k] is not None and float(old[k]) != float(new[k])]
    if not changed:
        return
    was = warmup_cosine(epoch_f, float(old["lr"] or lr), float(old["min_lr"] or 0.0),
                        float(old["warmup_epochs"] or 0.0), int(old["epochs"] or cfg.schedule.epochs))
    now = warmup_cosine(epoch_f, lr, cfg.optimization.min_lr, cfg.schedule.warmup_epochs, cfg.schedule.epochs)
    what = ", ".join(f"{k} {old[k]:g} -> {new[k]:g}" for k in changed)
    run_log.info(f"the schedule changed since the checkpoint ({what}): the lr schedule is recomputed over "
                 f"{cfg.schedule.epochs} epochs; at epoch {epoch_f:g} the lr goes from {was:.3e} (the old "
                 f"schedule) to {now:.3e}")


def load_weights(model, path: str):
    """load_into_model without its own log line: the run logs the report once, in its log.txt too."""

    from mimkit.models.convert import load_into_model

    from mimkit.errors import CheckpointError

    quiet = logging.getLogger("mimkit.models.convert")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return load_into_model(model, path)
    except CheckpointError as e:
        from mimkit.models.loading import architecture_of
        from mimkit.models.registry import same_model

        held = ((architecture_of(path) or {}).get("model") or {}).get("type")
        built = getattr(model, "model_name", None)
        if held and built and not same_model(held, built):
            raise CheckpointError(f"{e}; the checkpoint holds {held}: drop --model (the checkpoint's architecture "
                                  f"is then built) or pass --model {held}") from None
        raise
    finally:
        quiet.setLevel(level)


def warn_small_images(ds, size: tuple[int, int], limit: int = 1000) -> Optional[str]:
    """One warning line when images are smaller than the input size (they get upscaled), with the count.

    In-memory sets are checked whole; folders on up to `limit` files spread over the set (header reads only).
    None when every checked image is large enough or the sizes cannot be read cheaply.
    """
    from PIL import Image

    h, w = size
    images = getattr(ds, "images", None)
    if images is not None and hasattr(images, "shape") and len(images.shape) >= 3:
        n_small, n_checked = (len(images) if images.shape[1] < h or images.shape[2] < w else 0), len(images)
    else:
        samples = getattr(ds, "samples", None)
        if not samples:
            return None
        step = max(1, len(samples) // limit)
        n_small = n_checked = 0
        for path, *_ in samples[::step][:limit]:
            try:
                with Image.open(path) as im:
                    iw, ih = im.size
            except (OSError, ValueError):
                continue  # unreadable files are warned (and skipped) when training meets them
            n_checked += 1
            n_small += ih < h or iw < w
    if not n_small:
        return None
    checked = "" if n_checked == len(ds) else f" (of {n_checked} checked)"
    return (f"warning: {n_small} image(s){checked} are smaller than the {h}x{w} input and are upscaled; a smaller "
            "--input_size keeps them sharp")


def image_notes(ds, size: tuple[int, int], limit: int = 1000) -> list[str]:
    """Every once-per-run note on the training images: upscaled small ones, transparency, 12-bit data."""
    from mimkit.data.images import scan_images

    notes = [n for n in [warn_small_images(ds, size, limit)] if n]
    inner = getattr(ds, "dataset", ds)  # a Subset / wrapper: the folder underneath says what its walk skipped
    if getattr(inner, "link_note", ""):
        notes.append(f"note: {inner.link_note}")
    samples = getattr(ds, "samples", None)
    if samples:
        notes += [f"note: {n}" for n in scan_images([s[0] for s in samples], limit)]
    return notes


def check_memory(what: str, model, train_run: Callable, device, fix: str, optimizer: str = "adamw",
                 eval_run: Optional[Callable] = None, extra_bytes: int = 0, strategy: str = "ddp",
                 world_size: int = 1) -> str:
    """The estimated peak memory of a run (engine/memory.py: weights, gradients, optimiser state, and the larger
    of a training step's and an evaluation pass's activations, traced on the meta device) as a start-up line.
    A run that cannot fit the machine is refused now, in one line (`what`: the command and its sizes) naming
    `fix`: the kernel would kill it later without a word. `train_run(model)` / `eval_run(model)` make meta
    inputs at the run's batch and size and return the loss / output; `extra_bytes`: more resident tensors (a
    teacher's copy of the weights, a replay buffer)."""
    from mimkit.engine.memory import estimate, traced_peak

    try:
        act = traced_peak(model, train_run)
        if eval_run is not None:  # in eval mode, as evaluation runs it
            was = model.training
            model.eval()
            try:
                act = max(act, traced_peak(model, eval_run, backward=False))
            finally:
                model.train(was)
    except Exception as e:  # an op the meta device cannot run: the run goes on, said (never a silent pass)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"estimated peak memory: activations not traced ({type(e).__name__}: {first})"
    fp = estimate(model, optimizer, act, str(device), strategy, world_size)
    fp.weights += int(extra_bytes)
    if fp.fits:
        return fp.line()
    where = "the GPU" if str(device).startswith("cuda") else "this machine"
    raise ConfigError(f"{what}: {fp.line()}, more than {where} has; {fix}")


def meta_images(batch: int, size, in_chans: int = 3):
    """(batch, in_chans, H, W) on the meta device: the input of a traced step (nothing allocated)."""
    import torch

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.empty(batch, in_chans, h, w, device="meta")


def meta_labels(batch: int, *shape: int):
    """Integer class labels (batch, *shape) on the meta device."""
    import torch

    return torch.empty(batch, *shape, dtype=torch.long, device="meta")


# ------------------------------------------------------------------------------------- a resumed run's settings
# One rule for every training command (incremental/resume.py brings its own lists): on an auto-resume the keys that
# define the run must be the ones it started with, else one line names each (old -> new) and refuses; the keys of
# where and how it runs, and of the schedule a user legitimately raises, may change: one line says which did.
RUN_PLACEMENT = ("data.num_workers", "data.pin_memory", "data.persistent_workers", "data.augment_on", "data.dist_eval",
                 "misc.device", "misc.amp", "misc.tf32", "misc.compile", "misc.output_dir", "misc.auto_resume",
                 "misc.resume", "misc.max_steps", "misc.preset", "logging.", "checkpointing.", "eval.",
                 "distributed.", "model.grad_checkpointing", "optimization.on_nonfinite", "optimization.max_rollbacks",
                 "optimization.rollback_", "optimization.batch_size", "optimization.accum_iter", "test.interval",
                 "test.num_overlays", "continual.eval_initial")
RUN_SCHEDULE = ("schedule.epochs", "schedule.warmup_epochs", "schedule.max_iters", "schedule.warmup_iters",
                "optimization.lr", "optimization.base_lr", "optimization.min_lr")
UNSAID = ("misc.output_dir", "misc.auto_resume", "misc.resume", "misc.preset")  # changes no one needs told


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def show(v: Any) -> str:
    """A config value as the user typed it: none, true / false, 0.75."""
    return "none" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))


def same_value(a: Any, b: Any) -> bool:
    """Equal settings; 1 and 1.0 (a YAML int against a float) are the same."""
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def changed_settings(started: dict, now: dict, derived: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """[{key, old, new}] of the keys both configs hold with different values. A `derived` key the run fills in
    when unset (the scaled lr, the classes of the data) is left out while unset now: it is derived as before."""
    old, new = flatten(started), flatten(now)

    def unset_derived(k: str) -> bool:
        return bool(derived) and k.startswith(derived) and new[k] in (None, [], {})

    return [{"key": k, "old": old[k], "new": new[k]} for k in new
            if k in old and not same_value(old[k], new[k]) and not unset_derived(k)]


def describe_settings(changes: list[dict[str, Any]]) -> str:
    """'model.mask_ratio 0.75 -> 0.5, schedule.epochs 5 -> 10'."""
    return ", ".join(f"{c['key']} {show(c['old'])} -> {show(c['new'])}" for c in changes)


def check_resume_settings(started: Optional[dict], now: dict, command: str, folder, latest,
                          explicit: Optional[str] = None, derived: tuple[str, ...] = ("optimization.lr",),
                          may_change: tuple[str, ...] = RUN_PLACEMENT + RUN_SCHEDULE) -> Optional[str]:
    """Compare the config a run in `folder` started with (`started`, its checkpoint `latest`'s) with this run's
    (`latest` None: a run that resumes from its folder alone, as continual's sequence).

    Auto-resumed (`explicit` None): a changed key outside `may_change` (the model, its sizes, the data, the input
    size, the mask ratio, the loss ...) is a ConfigError naming every one, old -> new, before any work. Resumed from
    an explicit --resume: the user asked to continue with new settings, so they are only said. Returns the one line
    naming the changes that go on (None when nothing a user needs told changed)."""
    if not started:
        return None
    changes = changed_settings(started, now, derived)
    refused = [c for c in changes if not c["key"].startswith(may_change)]
    if refused and explicit is None:
        raise ConfigError(
            f"{folder} holds a mimkit {command} run started with other settings ({describe_settings(refused)}), which "
            "define the run: it is not resumed with them. Rerun without them to resume it, "
            + (f"pass --resume {latest} to continue from its checkpoint with them deliberately, or give a new "
               "--output_dir (--no_auto_resume starts over in this folder, writing over its checkpoints)" if latest
               else "or give a new --output_dir"))
    said = [c for c in changes if c["key"] not in UNSAID]
    if not said:
        return None
    how = (f"with --resume {explicit}: continued with the settings given" if explicit is not None
           else "settings that may change on resume")
    return f"resuming with changed settings ({how}): {describe_settings(said)}"


def started_config(ckpt_dir, auto_resume: bool, explicit: Optional[str]) -> Optional[dict]:
    """The config saved in the checkpoint a run will resume from (<ckpt_dir>/latest.pt on an auto-resume, else the
    explicit --resume file), read memory-mapped and weights only: cheap, before any work. None when there is none
    or it cannot be read (the resume itself then names the problem)."""
    from pathlib import Path

    import torch

    path = Path(explicit) if explicit else (Path(ckpt_dir) / "latest.pt" if auto_resume and ckpt_dir else None)
    if path is None or not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a checkpoint: find_resume falls back or refuses, naming it
        return None
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    return cfg if isinstance(cfg, dict) else None


# keys these runs fill in when unset (from the data, the encoder or the checkpoint): unset again on a resume,
# they are derived as before, not changed
DERIVED = ("optimization.lr", "model.nb_classes", "model.num_classes", "model.arch", "model.class_names",
           "model.taps", "model.type", "data.mean", "data.std", "data.reduce_zero_label")


def check_resumed_settings(cfg, command: str, resume: Optional[dict]) -> None:
    """Before any work: a resumed finetune / linprobe / segment run keeps its run-defining settings (preflight's
    rule: else one line naming each, old -> new); the line naming the allowed changes rides under `resume_note`
    until train_classifier / the segment recipe logs it."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from mimkit import config as C

    if resume is None or cfg.misc.eval or OmegaConf.select(cfg, "misc.predict", default=None):
        return
    ckpt_dir = Path(cfg.checkpointing.checkpoint_dir or Path(cfg.misc.output_dir or ".") / "checkpoints")
    note = check_resume_settings(resume.get("config"), C.to_container(cfg), command, cfg.misc.output_dir or ckpt_dir,
                                 cfg.misc.resume or ckpt_dir / "latest.pt", cfg.misc.resume, DERIVED)
    if note:
        resume["resume_note"] = note
