"""Build the right model for a checkpoint: mimkit (its saved config), official MAE or Hugging Face (by shape)."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from mimkit.errors import CheckpointError
from mimkit.models.convert import extract_state_dict, load_checkpoint_file, load_into_model, to_mae_state_dict
from mimkit.models.registry import create_model, list_models, same_model


def _preset_signature(name: str) -> tuple[int, int, int]:
    with torch.device("meta"):
        m = create_model(name)
    return m.embed_dim, m.depth, m.patch_size


def infer_model_name(sd: dict) -> Optional[str]:
    """The registered MAE preset whose (width, depth, patch) match an MAE-layout state dict, if any."""
    try:
        width = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
    except KeyError:
        return None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name in list_models(include_aliases=False):
        if name.startswith("mae_") and _preset_signature(name) == (width, depth, patch):
            return name
    return None


def model_from_checkpoint(
    path: str | os.PathLike, model_name: Optional[str] = None, input_size: Optional[int] = None, **overrides: Any
):
    """(model with the checkpoint's weights, one-line description) for any mimkit / official / HF MAE file.

    A mimkit checkpoint rebuilds the model its config names (type, kwargs, input size, norm_pix_loss); other
    files need `model_name` unless their shapes match a registered preset.
    """
    obj = load_checkpoint_file(path)
    cfg = obj.get("config") if isinstance(obj, dict) and "mimkit_version" in obj else None
    kwargs: dict[str, Any] = {}
    if cfg:
        mcfg = cfg.get("model", {})
        if model_name is None or same_model(model_name, mcfg.get("type")):
            # the checkpoint's kwargs belong to its own model type: another --model is built as registered
            model_name = mcfg.get("type") or model_name
            kwargs.update(mcfg.get("kwargs", {}) or {})
        size = cfg.get("data", {}).get("input_size")
        if size is not None:
            kwargs["img_size"] = tuple(size) if isinstance(size, (list, tuple)) else size
        kwargs["norm_pix_loss"] = bool(mcfg.get("norm_pix_loss", False))
    if model_name is None:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
        model_name = infer_model_name(sd)
        if model_name is None:
            raise CheckpointError(f"cannot tell which model {path} holds; pass --model (see `mimkit models`)")
    if input_size is not None:
        kwargs["img_size"] = input_size
    kwargs.update(overrides)
    model = create_model(model_name, **kwargs)
    report = load_into_model(model, obj, strict=False)
    model.eval()
    return model, f"{model_name} from {os.path.basename(str(path))} ({report.source})"


def architecture_of(path: str | os.PathLike) -> Optional[dict]:
    """Config layer {model: {type, kwargs, norm_pix_loss}, data: {input_size}} for the model a checkpoint holds.

    A mimkit checkpoint says it in its config; an official / Hugging Face file is matched to a registered preset
    by shape (input size from the position-embedding grid). None when the file is unreadable or matches nothing:
    the loader then reports the mismatch in full.
    """
    try:
        obj = load_checkpoint_file(path)
    except CheckpointError:
        return None
    cfg = obj.get("config") if isinstance(obj, dict) and "mimkit_version" in obj else None
    if cfg and cfg.get("model", {}).get("type"):
        m = cfg["model"]
        arch = {"model": {"type": m["type"], "kwargs": dict(m.get("kwargs") or {}),
                          "norm_pix_loss": bool(m.get("norm_pix_loss", False))}}
        if cfg.get("data", {}).get("input_size") is not None:
            arch["data"] = {"input_size": cfg["data"]["input_size"]}
        return arch
    try:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
    except CheckpointError:
        return None
    name = infer_model_name(sd)
    if name is None:
        return None
    arch = {"model": {"type": name}}
    tokens = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else 0
    side = int(round(tokens**0.5))
    if side * side == tokens and tokens:
        arch["data"] = {"input_size": side * sd["patch_embed.proj.weight"].shape[-1]}
    return arch
