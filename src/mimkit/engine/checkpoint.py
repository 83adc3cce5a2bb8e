"""One checkpoint format, written atomically: epoch-N/ and step-N/ folders, latest.pt, final.pt, keep_last_n.

A checkpoint is a dict with `model`, `optimizer`, `scaler`, `scheduler`, `epoch`, `step`, `config`, `rng`,
`mimkit_version` (and `data_position`, `counters`, `extra`, `rng_per_rank` under DDP), readable with
`torch.load(weights_only=True)`. A failed write (read-only folder, full disk) leaves the previous checkpoint and
latest.pt as they were and raises CheckpointWriteError; a damaged latest.pt on auto-resume falls back to the
newest intact step-N / epoch-N checkpoint (`find_resume`).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mimkit import __version__
from mimkit.errors import CheckpointError
from mimkit.io import load_checkpoint_file, resolve_checkpoint, save_safetensors

CKPT_NAME = "model.pt"


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (permissions, full disk); the previous one is intact."""
_KIND_RE = re.compile(r"^(epoch|step)-(\d+)$")
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")  # what save / atomic_save / _link write before the rename


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def capture_rng() -> dict:
    """RNG states of torch (CPU + CUDA), Python and NumPy, as weights_only-loadable objects."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer hides the OSError (full disk) behind a RuntimeError
                cause = e.__cause__ or e.__context__
                if isinstance(cause, OSError):
                    raise cause from None
                raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0]}") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text atomically (tmp + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_checkpoint(**fields: Any) -> dict:
    """The checkpoint dict with the version stamped in."""
    return {**fields, "mimkit_version": __version__}


class CheckpointManager:
    """Writes epoch-N/ and step-N/ folders (model.pt + config.yaml + log.txt), latest.pt, final.pt; prunes."""

    def __init__(self, ckpt_dir: str | Path, keep_last_n: int = 5, log_file: Path | None = None,
                 safetensors: bool = False) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last_n = keep_last_n
        self.log_file = log_file
        self.safetensors = safetensors

    def remove_stale_temps(self) -> list[str]:
        """Delete the temporary folders / files (.step-N.tmp-PID, .latest.pt.tmp-PID, ...) that processes which
        are no longer running left behind (a kill -9 mid-write); returns their names."""
        removed: list[str] = []
        if not self.dir.is_dir():
            return removed
        for p in self.dir.iterdir():
            m = _TEMP_RE.match(p.name)
            if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        return sorted(removed)

    def check_writable(self) -> None:
        """Create the folder and write a probe file; a read-only or missing location is one clear line now."""
        probe = self.dir / f".write-test-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.dir}: {_os_reason(e)}; choose a writable --output_dir "
                "(or checkpointing.checkpoint_dir)"
            ) from None

    def save(self, ckpt: dict, kind: str, index: int, config_yaml: str, tmp: Optional[Path] = None) -> Path:
        """Write <kind>-<index>/ atomically (a temp folder renamed into place) and point latest.pt at it.

        Any OS error (permissions, full disk) removes the partial folder, leaves latest.pt and the previous
        checkpoints untouched and raises CheckpointWriteError.
        """
        prepared = tmp is not None  # a folder the ranks already wrote their shards into (FSDP)
        tmp = tmp or self.dir / f".{kind}-{index}.tmp-{os.getpid()}"
        try:
            return self._save(ckpt, kind, index, config_yaml, tmp, prepared)
        except KeyboardInterrupt:  # a second Ctrl-C mid-write: leave no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest()
            kept = f"; the previous checkpoint {prev} is intact" if prev else ""
            raise CheckpointWriteError(
                f"cannot write checkpoint {self.dir / f'{kind}-{index}'}: {_os_reason(e)}{kept}"
            ) from None

    def _save(self, ckpt: dict, kind: str, index: int, config_yaml: str, tmp: Path, prepared: bool = False) -> Path:
        final = self.dir / f"{kind}-{index}"
        if not prepared:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        atomic_save(ckpt, tmp / CKPT_NAME)
        atomic_write_text(config_yaml, tmp / "config.yaml")
        if self.log_file is not None and self.log_file.exists():
            shutil.copyfile(self.log_file, tmp / "log.txt")
        if self.safetensors and ckpt["model"]:  # a sharded checkpoint's weights are in its shards
            save_weights_safetensors(ckpt["model"], tmp / "model.safetensors")
        if final.exists():  # the same position written again (a rerun at the same step): swap it in
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._link(final / CKPT_NAME, self.dir / "latest.pt")
        self.prune(kind)
        return final

    def save_final(self, ckpt: dict, same_as: Optional[Path] = None) -> Path:
        """Write final.pt (and final.safetensors when asked); an OS error is a CheckpointWriteError.

        `same_as`: a checkpoint file already holding this very state (the save at the run's last position):
        final.pt becomes a hard link to it, so it costs no second copy on disk (a copy where links fail).
        """
        path = self.dir / "final.pt"
        try:
            if same_as is not None and Path(same_as).is_file():
                self._link(Path(same_as), path)
            else:
                atomic_save(ckpt, path)
            if self.safetensors:
                save_weights_safetensors(ckpt["model"], self.dir / "final.safetensors")
        except OSError as e:
            raise CheckpointWriteError(f"cannot write {path}: {_os_reason(e)}; latest.pt is intact") from None
        return path

    def _link(self, src: Path, dst: Path) -> None:
        # A hard link costs no second write; the rename makes the switch atomic.
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def list(self, kind: str) -> list[tuple[int, Path]]:
        """Existing <kind>-N folders, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _KIND_RE.match(p.name)
            if m and m.group(1) == kind and (p / CKPT_NAME).exists():
                found.append((int(m.group(2)), p))
        return sorted(found)

    def prune(self, kind: str) -> None:
        """Keep the newest keep_last_n folders of this kind (0 keeps all)."""
        if self.keep_last_n <= 0:
            return
        for _, p in self.list(kind)[: -self.keep_last_n]:
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        """latest.pt when present."""
        p = self.dir / "latest.pt"
        return p if p.exists() else None

    def candidates(self) -> list[Path]:
        """Every step-N / epoch-N model.pt, newest first (by modification time, then step/epoch number)."""
        found = [p / CKPT_NAME for _, p in self.list("step") + self.list("epoch")]
        return sorted(found, key=lambda f: (f.stat().st_mtime_ns, _index(f.parent.name)), reverse=True)


def _index(name: str) -> int:
    m = _KIND_RE.match(name)
    return int(m.group(2)) if m else -1


def _os_reason(e: OSError) -> str:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    return reason


def find_resume(explicit: Optional[str], ckpt_dir: str | Path, auto_resume: bool
                ) -> tuple[Optional[dict], Optional[str], Optional[str]]:
    """The checkpoint a run resumes from -> (checkpoint, its path, a warning or None).

    An explicit `misc.resume` must load (else CheckpointError). With auto_resume, <ckpt_dir>/latest.pt; when
    it is truncated or corrupt, the newest intact step-N / epoch-N checkpoint with a warning naming both
    files; when none is intact, a CheckpointError (never a silent start from scratch).
    """
    if explicit:
        return load_training_checkpoint(explicit), str(explicit), None
    latest = Path(ckpt_dir) / "latest.pt"
    if not auto_resume or not latest.exists():
        return None, None, None
    try:
        return load_training_checkpoint(latest), str(latest), None
    except CheckpointError as e:
        damage = str(e)
    for cand in CheckpointManager(ckpt_dir).candidates():
        try:
            ckpt = load_training_checkpoint(cand)
        except CheckpointError:
            continue
        return ckpt, str(cand), (f"warning: {latest} is damaged ({damage}); resuming from the newest intact "
                                 f"checkpoint {cand} (step {ckpt['step']}) instead")
    raise CheckpointError(f"{latest} is damaged ({damage}) and no intact step-N / epoch-N checkpoint is left in "
                          f"{ckpt_dir}; move the folder away or pass --no_auto_resume to start over")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A .pt file, or a checkpoint folder holding model.pt (or a run folder's latest.pt): mimkit.io's resolver."""
    return resolve_checkpoint(path, prefer="latest")


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a mimkit training checkpoint safely (weights_only); a foreign or corrupt file is a CheckpointError."""
    p = resolve_checkpoint_path(path)
    ckpt = load_checkpoint_file(p, gather_shards=False)  # resuming reads the shards itself (each rank its own)
    missing = [k for k in ("model", "optimizer", "epoch", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{p} is not a mimkit training checkpoint (missing {', '.join(missing)}); "
            "to start from its weights use model.init_from instead of --resume"
        )
    return ckpt


def save_weights_safetensors(state_dict: dict, path: str | Path) -> None:
    """Weights only, as safetensors (contiguous, unshared tensors)."""
    save_safetensors(state_dict, path)
