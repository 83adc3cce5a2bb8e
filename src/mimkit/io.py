"""Safe checkpoint files: find the file a path means, read it without running code, write safetensors.

Shared by the models (weight conversion) and the engine (resume), so neither imports the other.

    from mimkit.io import resolve_checkpoint, load_checkpoint_file
    path = resolve_checkpoint("runs/demo")          # -> runs/demo/checkpoints/final.pt
    obj = load_checkpoint_file(path)                # weights_only torch.load, or safetensors

A path may name a file, or a folder: a mimkit run folder (checkpoints/final.pt, then latest.pt), its
checkpoints/ folder, an epoch-N/ or step-N/ folder (model.pt), or a Hugging Face ``save_pretrained`` folder
(model.safetensors, pytorch_model.bin, or their sharded ``*.index.json``). Files are read with
``torch.load(weights_only=True)`` (only ``argparse.Namespace`` is allowed besides tensors and containers, for
the official training checkpoints' ``args``) or safetensors: loading never runs code from the file.

A file weights_only refuses (an mmengine checkpoint: ``meta``, ``message_hub``, ``optimizer`` holding objects of
OpenMMLab classes) is read once more by a restricted unpickler: the globals torch's weights_only reader allows
(tensor rebuilding, containers, dtypes) resolve as usual, every other class or function the file names becomes
an inert placeholder that records its name and runs nothing. Only its ``state_dict`` (tensors only) and the plain
values of its ``meta`` are kept; the rest is dropped and named under ``OPENMMLAB_DROPPED``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from mimkit.errors import CheckpointError

# What a folder may hold, in the order looked for. For weights the finished run wins; for resuming the newest.
MIMKIT_FILES_FINAL = ("model.pt", "final.pt", "checkpoints/final.pt", "latest.pt", "checkpoints/latest.pt")
MIMKIT_FILES_LATEST = ("model.pt", "latest.pt", "checkpoints/latest.pt", "final.pt", "checkpoints/final.pt")
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# An MMSegmentation model folder (`mimkit export --format mmseg`: model.pth beside config.py)
OPENMMLAB_FILES = ("model.pth",)
# A mimkit checkpoint folder may hold model.safetensors beside model.pt: model.pt (with its config) comes first.


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "final") -> Path:
    """The checkpoint file `path` means: the file itself, or the file a run / checkpoint / HF folder holds.

    prefer: 'final' (weights for evaluation or export: final.pt before latest.pt) or 'latest' (resuming).
    Raises CheckpointError naming the path, or for a folder every file name looked for.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint is neither a file nor a folder: {path}")
    names: Sequence[str] = ((MIMKIT_FILES_LATEST if prefer == "latest" else MIMKIT_FILES_FINAL) + HF_FILES
                            + OPENMMLAB_FILES)
    for name in names:
        cand = p / name
        if cand.is_file():
            return cand
    raise CheckpointError(
        f"no checkpoint in folder {path}: looked for {', '.join(names)} "
        "(a mimkit run / checkpoint folder, a Hugging Face save_pretrained folder or an MMSegmentation model "
        "folder written by `mimkit export --format mmseg`)"
    )


def load_checkpoint_file(path: str | os.PathLike, gather_shards: bool = True) -> Any:
    """Read a ``.pt``/``.pth``/``.bin`` (weights_only), ``.safetensors`` or sharded ``*.index.json`` onto the CPU.

    A folder is first resolved with `resolve_checkpoint`. Raises CheckpointError (one line naming the path)
    when the file is missing, corrupt, or holds objects other than tensors, containers and argparse.Namespace.
    A step-N / epoch-N checkpoint of an FSDP run keeps its weights in `sharded/` (torch.distributed.checkpoint):
    with gather_shards they are read whole into `model` on this one process (resuming reads them itself).
    """
    path = resolve_checkpoint(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = _config_beside(path, torch.load(path, map_location="cpu", weights_only=True))
        if gather_shards and isinstance(obj, dict) and isinstance(obj.get("sharded"), dict) and not obj.get("model"):
            obj = {**obj, "model": read_dcp_weights(dcp_folder(obj, path))}
        return obj
    except CheckpointError:
        raise
    except Exception as e:  # torch/zipfile/pickle/safetensors raise many types; the user needs one line
        if "GLOBAL" not in str(e):  # not a class / function weights_only refused: garbage, truncation, ...
            raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, e)}") from None
    return _config_beside(path, load_restricted(path))


def _config_beside(path: Path, obj: Any) -> Any:
    """An mmengine-layout file whose meta holds no config text gets the `config.py` beside it (an MMSeg model
    folder: `mimkit export --format mmseg`) as meta['cfg']: text only, read later with `ast`, never executed."""
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
        return obj
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    beside = path.parent / "config.py"
    if meta.get("cfg") or meta.get("config") or not beside.is_file() or beside.stat().st_size > 2**20:
        return obj
    try:
        text = beside.read_text()
    except (OSError, UnicodeDecodeError):
        return obj
    return {**obj, "meta": {**meta, "cfg": text}}


# ---------------------------------------------------------------------------------------------- FSDP shards
def dcp_folder(ckpt: dict, path: Path) -> Path:
    """The `sharded/` folder of an FSDP checkpoint read from `path` (its step-N/model.pt or latest.pt)."""
    name = ckpt["sharded"].get("folder", "")
    for cand in (path.parent / "sharded", path.parent / name / "sharded", path.parent.parent / name / "sharded"):
        if cand.is_dir():
            missing = [f for f in ckpt["sharded"].get("files", []) if not (cand / f).exists()]
            if missing:
                raise CheckpointError(f"sharded checkpoint {cand} is missing {', '.join(missing)} (one file per "
                                      "rank); copy the whole folder, or use the run's checkpoints/final.pt")
            return cand
    raise CheckpointError(f"{path} is a sharded (FSDP) checkpoint but its {name}/sharded/ folder is not beside it; "
                          "copy the whole checkpoint folder, or use the run's checkpoints/final.pt")


class _DCPMetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only its own dataclasses and torch's sizes / dtypes may load (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                         ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                                         ("collections", "OrderedDict")}
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise CheckpointError(f"the sharded checkpoint's .metadata names {module}.{name}: not a "
                                  "torch.distributed.checkpoint file mimkit reads")
        return super().find_class(module, name)


def read_dcp_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model of a torch.distributed.checkpoint folder, on this one process (no process group): the
    shards of every rank put back together -> {name: tensor} on CPU."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):  # FileSystemReader's, through the safe unpickler
            import torch.distributed.checkpoint.filesystem as fs

            real = fs.pickle.load
            fs.pickle.load = lambda f: _DCPMetadataUnpickler(f).load()
            try:
                return super().read_metadata(*args, **kwargs)
            finally:
                fs.pickle.load = real

    if not (folder / ".metadata").exists():
        raise CheckpointError(f"sharded checkpoint {folder} has no .metadata; copy the whole folder, or use the "
                              "run's checkpoints/final.pt")
    sd: dict = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            _load_state_dict(sd, storage_reader=Reader(str(folder)),
                             planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # a torn folder: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the sharded checkpoint {folder}: {first[:300]}") from None
    model = sd.get("model", {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- restricted
# Key under which load_restricted names the top-level entries it dropped (an mmengine file's optimizer, ...).
OPENMMLAB_DROPPED = "_mimkit_dropped"


class InertObject:
    """Stands for an object of a class the file names but mimkit does not allow: holds nothing, runs nothing."""

    origin = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE / NEWOBJ arguments are ignored
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD: the state is dropped, no attribute is set
        pass

    def append(self, item: Any) -> None:  # APPEND(S) on a pickled list subclass
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a pickled dict subclass
        pass

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """find_class: torch's weights_only allow-list resolves; anything else is a fresh InertObject subclass."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if f"{module}.{name}" in allowed:
            return allowed[f"{module}.{name}"]
        placeholder = type(f"Inert_{name}", (InertObject,), {"origin": f"{module}.{name}"})
        _RestrictedUnpickler.seen.add(f"{module}.{name}")
        return placeholder

    seen: set[str] = set()


def _allowed_globals() -> dict[str, Any]:
    """'module.name' -> object for what torch.load(weights_only=True) itself allows (tensors, dtypes, containers)."""
    from torch import _weights_only_unpickler as w

    return {**w._get_allowed_globals(), "argparse.Namespace": argparse.Namespace}


# torch.load takes a pickle module: ours has only the restricted Unpickler (torch subclasses it for storages).
_restricted_pickle = types.ModuleType("mimkit_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_restricted_pickle.__name__ = "mimkit_restricted_pickle"


def load_restricted(path: str | os.PathLike) -> dict:
    """Read a checkpoint weights_only refuses without running code from it: -> {'state_dict': tensors,
    'meta': plain values, OPENMMLAB_DROPPED: [names of what was dropped]}.

    Raises CheckpointError when the file has no tensor ``state_dict`` at its top level (mmengine's layout):
    a file holding only pickled objects is refused, and nothing it names has run.
    """
    path = Path(path)
    _RestrictedUnpickler.seen = set()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as e:  # a malformed stream; nothing it named has been called
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]}") from None
    objects = sorted(_RestrictedUnpickler.seen)
    named = f" (it names {', '.join(objects[:4])}{' ...' if len(objects) > 4 else ''}, which mimkit does not load)"
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        keys = f"top-level keys: {', '.join(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no weights (no 'state_dict' of tensors; {keys}): mimkit reads tensors only "
                              "(a mimkit, official MAE, Hugging Face, timm or mmengine checkpoint); it holds pickled "
                              f"Python objects{named}")
    sd = obj["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the 'state_dict' holds non-tensor entries ({', '.join(map(str, bad[:4]))})")
    meta = obj.get("meta")
    meta = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list, tuple, dict))} \
        if isinstance(meta, dict) else {}
    dropped = [str(k) for k in obj if k not in ("state_dict", "meta")]
    return {"state_dict": dict(sd), "meta": _plain(meta), OPENMMLAB_DROPPED: dropped}


def _plain(value: Any) -> Any:
    """`value` with every placeholder object removed (meta's nested dicts and lists keep plain values only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, InertObject)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if not isinstance(v, InertObject)]
    return value


def _why_unreadable(path: Path, e: Exception) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0]
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head[:2] != b"PK" and head[:1] != b"\x80" and path.suffix != ".safetensors":
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    if "Weights only load failed" in first_line:
        return "it holds pickled Python objects that mimkit will not unpickle (only tensors are loaded)"
    return f"{type(e).__name__}: {first_line[:200] or 'truncated or corrupt file'}"


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Merge the shards a Hugging Face ``*.index.json`` lists (its ``weight_map``) into one state dict."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read shard index {index}: {type(e).__name__}: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_checkpoint_file(index.parent / shard)
        out.update(part)
    return out


def hf_config_beside(path: str | os.PathLike) -> dict | None:
    """The Hugging Face ``config.json`` beside a weights file (a save_pretrained folder), or None."""
    cfg = Path(path).parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot parse {cfg}: {e}") from None
    return data if isinstance(data, dict) else None


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a weights-only safetensors file atomically (temporary file, then rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items() if torch.is_tensor(v)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; give the usual permissions
    os.replace(tmp, path)
    return path
