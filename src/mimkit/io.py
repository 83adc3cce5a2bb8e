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
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from mimkit.errors import CheckpointError

# What a folder may hold, in the order looked for. For weights the finished run wins; for resuming the newest.
MIMKIT_FILES_FINAL = ("model.pt", "final.pt", "checkpoints/final.pt", "latest.pt", "checkpoints/latest.pt")
MIMKIT_FILES_LATEST = ("model.pt", "latest.pt", "checkpoints/latest.pt", "final.pt", "checkpoints/final.pt")
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
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
    names: Sequence[str] = (MIMKIT_FILES_LATEST if prefer == "latest" else MIMKIT_FILES_FINAL) + HF_FILES
    for name in names:
        cand = p / name
        if cand.is_file():
            return cand
    raise CheckpointError(
        f"no checkpoint in folder {path}: looked for {', '.join(names)} "
        "(a mimkit run / checkpoint folder or a Hugging Face save_pretrained folder)"
    )


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Read a ``.pt``/``.pth``/``.bin`` (weights_only), ``.safetensors`` or sharded ``*.index.json`` onto the CPU.

    A folder is first resolved with `resolve_checkpoint`. Raises CheckpointError (one line naming the path)
    when the file is missing, corrupt, or holds objects other than tensors, containers and argparse.Namespace.
    """
    path = resolve_checkpoint(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/zipfile/pickle/safetensors raise many types; the user needs one line
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, e)}") from None


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
