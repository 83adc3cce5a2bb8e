"""What a restarted `mimkit incremental` does with the run already in its output folder.

Resumed (auto_resume): the run-defining settings must be the ones the run started with (else one ConfigError
naming every differing key, old -> new, before any work); the keys below may change, as `mimkit pretrain`
lets them (where and how the run executes, and the schedule: a note in the log and in results.json).
Started over (--no_auto_resume): the earlier run's files are moved to <output_dir>/earlier/<time>/, never mixed
with the new run's and never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from mimkit.errors import ConfigError
from mimkit.tasks.preflight import changed_settings, describe_settings, flatten  # noqa: F401 (flatten: importable)

# where and how the run executes: free to change on resume
PLACEMENT = ("data.num_workers", "data.pin_memory", "data.persistent_workers", "misc.device", "misc.amp",
             "misc.output_dir", "misc.auto_resume", "logging.", "checkpointing.", "incremental.eval_batch_size")
# the schedule, as `mimkit pretrain` (preflight.note_schedule_change): allowed, said in the log and recorded
SCHEDULE = ("schedule.epochs", "schedule.warmup_epochs", "optimization.lr", "optimization.min_lr", "misc.max_steps")
# files of one run in its folder (moved together by --no_auto_resume)
RUN_FILES = ("incremental.json", "results.json", "accuracy_matrix.csv", "per_task.csv", "incremental.png",
             "config.yaml", "log.txt", "metrics.jsonl", "tb", "checkpoints")


def _may_change(key: str) -> bool:
    return key.startswith(PLACEMENT) or key in SCHEDULE


def started_settings(out_dir: Path) -> Optional[dict]:
    """The config the run in out_dir started with: incremental.json's `settings` (older runs: config.yaml)."""
    state = out_dir / "incremental.json"
    if state.is_file():
        settings = json.loads(state.read_text()).get("settings")
        if settings:
            return settings
    if (out_dir / "config.yaml").is_file() and (state.is_file() or (out_dir / "checkpoints").is_dir()):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"), resolve=True)
    return None


def compare(started: dict, now: dict, out_dir: Path) -> list[dict[str, Any]]:
    """The allowed changes [{key, old, new}]; a ConfigError naming every run-defining one (old -> new)."""
    changed = changed_settings(effective(flatten(started)), effective(flatten(now)))
    refused = [c for c in changed if not _may_change(c["key"])]
    if refused:
        raise ConfigError(f"{out_dir} holds an incremental run started with other settings "
                          f"({describe_settings(refused)}); resume it with its own settings, give a new --output_dir, "
                          "or pass --no_auto_resume to start over there (the earlier run's files are moved to "
                          "earlier/)")
    return [c for c in changed if c["key"] != "misc.output_dir"]


def effective(flat: dict[str, Any]) -> dict[str, Any]:
    """The settings as the run uses them: an unset task count is its default 5 (without --init_classes) and an
    unset model.nf the backbone's own width, so `--tasks 5` or `--nf 20` (slim_resnet18) repeat, not change, them."""
    from mimkit.models.resnet import BACKBONES

    out = dict(flat)
    if out.get("incremental.tasks") is None and out.get("incremental.init_classes") is None:
        out["incremental.tasks"] = 5
    if out.get("model.nf") is None and out.get("model.type") in BACKBONES:
        out["model.nf"] = BACKBONES[out["model.type"]]
    return out


def describe_changes(changes: list[dict[str, Any]], task: int, tasks: Optional[int] = None) -> str:
    """One log line for the allowed changes of a resume at `task` (of `tasks`)."""
    what = describe_settings(changes)
    note = ""
    if tasks is not None and task >= tasks and any(c["key"] in SCHEDULE for c in changes):
        note = (f"; the run is finished (all {tasks} tasks done): nothing to train, the schedule change applies "
                "to nothing; a longer schedule needs a new --output_dir")
    elif any(c["key"] in SCHEDULE for c in changes):
        note = (f"; the schedule applies from task {task} on (finished tasks keep theirs; "
                "results.json lists the change under resume_changes)")
    return f"resuming with changed settings that may change on resume: {what}{note}"


def archive_earlier_run(out_dir: Path, ckpt_root: Path) -> Optional[Path]:
    """Move the files of an earlier run in out_dir (and its task checkpoints) to out_dir/earlier/<time>/;
    the destination, or None when there was nothing to move."""
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    outside = [] if ckpt_root == out_dir / "checkpoints" else sorted(ckpt_root.glob("task-*"))
    if not found and not outside:
        return None
    dest = out_dir / "earlier" / time.strftime("%Y-%m-%d_%H-%M-%S")
    n = 2
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.split('+')[0]}+{n}"), n + 1
    dest.mkdir(parents=True)
    for p in found:
        shutil.move(str(p), str(dest / p.name))
    if outside:
        (dest / "checkpoints").mkdir(exist_ok=True)
        for p in outside:
            shutil.move(str(p), str(dest / "checkpoints" / p.name))
    return dest


def is_rank0() -> bool:
    """Rank 0 of a torchrun launch (or a single process): the one that moves files."""
    return int(os.environ.get("RANK", "0")) == 0
