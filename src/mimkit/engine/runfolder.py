"""A run folder belongs to one run of one command: an ownership record and an advisory lock.

    check_run_dir(path, command)     read-only: refuses a file, an unwritable place, another command's folder or a
                                     folder a live process holds -- before any work, so nothing is written
    claim(path, command)             creates the folder, takes the lock (held until release / process exit) and
                                     writes the record <folder>/.mimkit-run.json on first use
    check_results_dir / check_output_file    the same checks for evaluations' results folders and --output files

The lock is `fcntl.flock` on <folder>/.mimkit.lock, which the kernel drops when the holder dies (kill -9
included); the file keeps the holder's pid and host, so a refusal names the live process and a new run that
finds a dead holder's record says it took the lock over. Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

from mimkit.errors import ConfigError, UserError

RECORD = ".mimkit-run.json"  # which command and run made the folder
LOCK = ".mimkit.lock"  # held (flock) for the run's life; holds "pid host started command"; gone once it ends
# Evaluations add to any run folder what they write and nothing else, never over a file already there, and take
# neither the folder's record nor its lock: knn / rankme and --eval of finetune / linprobe / segment a
# results-N.json (results.json itself is left to the folder's own run), segment --eval its overlays-N/ too,
# segment --predict a predictions-N/ folder.
EVALUATIONS = ("knn", "rankme", "finetune --eval", "linprobe --eval", "segment --eval", "segment --predict")
# what a training command writes into its run folder (the refusal of another command's folder names it)
TRAINING_WRITES = "config.yaml, log.txt, metrics.jsonl and checkpoints/"
_HELD: dict[str, tuple[int, str]] = {}  # resolved folder -> (lock fd, command) held by this process
_CLAIMED: list[Path] = []  # every folder this process claimed, in order (kept after release: the CLI's last word)
_CREATED: set[str] = set()  # the folders claim() itself created (a refused run takes them away again)


class FolderInUse(UserError):
    """Another live process holds the run folder's lock."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> Optional[str]:
    """None when a file can be created in `folder`, else the reason (a probe file: os.access lies to root and on
    read-only mounts it is the only honest test)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mimkit-probe-", dir=folder)
    except OSError as e:
        return e.strerror.lower() if e.strerror else str(e)
    os.close(fd)
    os.unlink(name)
    return None


def check_place(path: Path, flag: str, want_dir: bool) -> None:
    """One line when `path` cannot be written: empty, the wrong kind (file / folder), a file on the way, no rights."""
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty (an unset shell variable?): name a {'folder' if want_dir else 'file'}")
    p = Path(path).expanduser()
    if p.exists() and want_dir and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder: name a folder for the run")
    if p.exists() and not want_dir and p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: name the file to write, e.g. {p / 'out'}")
    base = _nearest_existing(p.parent if not p.exists() else p)
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so nothing can be created under it")
    if not want_dir and not p.parent.exists():
        raise ConfigError(f"{flag} {path}: the folder {p.parent} does not exist; create it first")
    target = p if p.is_dir() else base
    why = _writable(target)
    if why:
        raise ConfigError(f"{flag} {path}: cannot write to {target} ({why}); choose a writable place")


def results_path(folder: str | Path) -> Path:
    """Where an evaluation writes its results: results.json, else results-2.json, -3, ... (the first name free; a
    training run's folder keeps results.json for the run's own results, so an evaluation starts at -2)."""
    folder = Path(folder)
    n = 2 if (folder / RECORD).exists() else 1
    while (path := folder / ("results.json" if n == 1 else f"results-{n}.json")).exists():
        n += 1
    return path


def read_record(folder: Path) -> Optional[dict]:
    """The ownership record of a run folder, or None (no record, or an unreadable one)."""
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def command_of_config(cfg: dict) -> Optional[str]:
    """The training command a resolved config (config.yaml, a checkpoint's `config`) belongs to, by the sections
    and keys only that command's schema has; None when it says nothing recognisable."""
    if not isinstance(cfg, dict):
        return None
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    aug = ((cfg.get("data") or {}).get("augmentation") or {}) if isinstance(cfg.get("data"), dict) else {}
    if "continual" in cfg:
        return "continual"
    if "incremental" in cfg:
        return "incremental"
    if "test" in cfg and "mask_ratio" not in model:
        return "segment"
    if "nb_classes" in model:
        return "finetune" if "mixup" in aug else "linprobe" if "enabled" in aug else None
    if "mask_ratio" in model:
        return "pretrain"
    return None


def infer_record(folder: Path) -> Optional[dict]:
    """A run folder from before ownership records: the command that made it, read from its config.yaml, else from
    the config inside checkpoints/latest.pt (memory-mapped, weights only: nothing of it is loaded or run)."""
    folder = Path(folder)
    cfg = None
    try:
        import yaml

        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, ImportError):
        pass
    except Exception:  # a damaged config.yaml (yaml's own errors): fall back on the checkpoint
        cfg = None
    command = command_of_config(cfg) if cfg else None
    where = "its config.yaml"
    latest = folder / "checkpoints" / "latest.pt"
    if command is None and latest.is_file():
        try:
            import torch

            ckpt = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
            command = command_of_config(ckpt.get("config") if isinstance(ckpt, dict) else None)
            where = "its checkpoints/latest.pt"
        except Exception:  # not a readable checkpoint: nothing inferred
            command = None
    return {"command": command, "created": f"before ownership records; {where} says so"} if command else None


def _holder(folder: Path) -> Optional[dict]:
    try:
        words = (Path(folder) / LOCK).read_text().split()
    except OSError:
        return None
    if len(words) < 4:
        return None
    return {"pid": int(words[0]) if words[0].isdigit() else -1, "host": words[1], "started": words[2],
            "command": words[3]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_by_other(folder: Path) -> Optional[dict]:
    """The live holder of the folder's lock (another process), or None."""
    import fcntl

    key = str(Path(folder).resolve())
    if key in _HELD:
        return None
    lock = Path(folder) / LOCK
    if not lock.exists():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(folder) or {"pid": "?", "host": "?", "started": "?", "command": "?"}
    except OSError:  # no flock on this file system: fall back on the recorded pid (same host only)
        h = _holder(folder)
        if h and h["host"] == socket.gethostname() and h["pid"] != os.getpid() and _alive(h["pid"]):
            return h
        return None
    finally:
        os.close(fd)


def _in_use(folder: Path, h: dict) -> FolderInUse:
    return FolderInUse(f"{folder} is in use by mimkit {h['command']} (pid {h['pid']} on {h['host']}, started "
                       f"{h['started']}); wait for it to end or give another --output_dir")


def check_run_dir(path: str | Path, command: str, flag: str = "--output_dir") -> None:
    """Refuse (before any work, writing nothing) a run folder `command` may not use."""
    check_place(Path(path), flag, want_dir=True)
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    # a folder from before ownership records: its command inferred from its config (an unknown one is taken over
    # by whichever command first claims it, and belongs to that command from then on)
    rec = read_record(p) or (infer_record(p) if not (p / RECORD).exists() else None)
    if rec and rec.get("command") != command:
        raise ConfigError(f"{flag} {path} is the run folder of a mimkit {rec.get('command')} run (created "
                          f"{rec.get('created', '?')}): mimkit {command} would write its {TRAINING_WRITES} "
                          f"into it; give a new {flag} (evaluations -- knn, rankme, --eval, --predict -- may add "
                          "their results there)")
    if int(os.environ.get("RANK", "0")) > 0:
        return  # under torchrun rank 0 holds the lock for the whole job: the other ranks are that same run
    h = _locked_by_other(p)
    if h:
        raise _in_use(p, h)


def check_results_dir(path: Optional[str | Path], flag: str = "--output_dir") -> None:
    """An evaluation's results folder (any run folder may take what an evaluation writes, see EVALUATIONS):
    writable and a folder; no record and no lock are taken."""
    if path is not None:
        check_place(Path(path), flag, want_dir=True)


# Suffixes that say what a file holds: an --output ending in one of these that its command does not write is refused.
KNOWN_SUFFIXES = (".pt", ".pt2", ".pth", ".onnx", ".safetensors", ".torchscript", ".json", ".png", ".jpg",
                  ".jpeg", ".yaml", ".bin", ".ckpt", ".txt", ".csv")


def check_output_file(path: Optional[str | Path], flag: str = "--output",
                      suffixes: Iterable[str] = (), what: str = "", strict: bool = False) -> None:
    """A file to write: not a folder, its folder exists and is writable, and its suffix one of `suffixes` (when
    `strict`; otherwise a name without a known suffix is accepted, a known suffix of another format refused)."""
    if path is None:
        return
    check_place(Path(path), flag, want_dir=False)
    ok = tuple(suffixes)
    name = str(path).lower()
    if not ok or name.endswith(ok):
        return
    if strict or Path(name).suffix in KNOWN_SUFFIXES:
        raise ConfigError(f"{flag} {path}: {what or 'the file'} is written as {' or '.join(ok)}; name it so")


def claim(path: str | Path, command: str, log=None) -> Path:
    """Create the run folder, take its lock for this process and record the owner; returns the folder.

    Refuses as check_run_dir does. Claiming a folder this process already holds is a no-op (a resumed run in
    the same interpreter). `log(msg)` hears about a dead holder's lock taken over.
    """
    import fcntl

    check_run_dir(path, command)
    folder = Path(path).expanduser()
    new = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        return folder
    if new:
        _CREATED.add(key)
    while True:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(folder, _holder(folder) or {"pid": "?", "host": "?", "started": "?",
                                                      "command": "?"}) from None
        except OSError:
            break  # no flock here (some network file systems): the pid record alone guards the folder
        # a run that ended removes its lock file (release): the file locked here must still be the folder's,
        # else another run may hold a new one -- open that instead
        try:
            if os.stat(folder / LOCK).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    before = _holder(folder)
    host = socket.gethostname()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {host} {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode(), 0)
    _HELD[key] = (fd, command)
    _CLAIMED.append(folder)
    if before and before["pid"] != os.getpid():
        (log or logging.getLogger("mimkit").warning)(f"took over the lock of a mimkit {before['command']} run that is no longer running (pid "
            f"{before['pid']} on {before['host']})")
    if read_record(folder) is None:
        record = {"command": command, "run_id": uuid.uuid4().hex[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "host": host, "pid": os.getpid()}
        (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def claimed() -> list[Path]:
    """Every run folder this process claimed, oldest first."""
    return list(_CLAIMED)


def held() -> set[str]:
    """The folders this process holds."""
    return set(_HELD)


def release(keys: Optional[Iterable[str]] = None) -> None:
    """Drop the locks of `keys` (default: every folder this process holds)."""
    import fcntl

    for key in list(_HELD if keys is None else keys):
        fd, _ = _HELD.pop(key, (None, None))
        if fd is None:
            continue
        try:
            # an ended run leaves no lock file behind (removed while still held, so no run can take the file
            # that is going: claim() checks it locked the folder's current one); a killed run leaves its pid (stale)
            lock = Path(key) / LOCK
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                lock.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)


def undo_new_claims(keys: Iterable[str]) -> None:
    """Remove the folders among `keys` that claim() created and that hold nothing but the record and the lock: a
    run refused before any work (memory, data, a checkpoint) leaves no empty run folder behind. Call after
    release(); a folder with anything else in it stays as it is."""
    for key in keys:
        if key not in _CREATED:
            continue
        _CREATED.discard(key)
        folder = Path(key)
        try:
            if {p.name for p in folder.iterdir()} <= {RECORD, LOCK}:
                for name in (RECORD, LOCK):
                    (folder / name).unlink(missing_ok=True)
                folder.rmdir()
        except OSError:
            pass  # gone already, or not ours to empty: nothing lost either way
