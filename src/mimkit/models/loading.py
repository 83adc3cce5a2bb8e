"""Build the right model for a checkpoint: mimkit (its saved config), Hugging Face (its config.json), official
MAE (by shape); the checkpoint's input normalisation travels with the model as `model.normalization`.

A checkpoint may be given as a file or a folder (mimkit run / checkpoint folder, HF save_pretrained folder):
`mimkit.io.resolve_checkpoint` finds the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from mimkit.errors import CheckpointError, UserError
from mimkit.io import hf_config_beside, load_checkpoint_file, resolve_checkpoint
from mimkit.models.convert import (HF_MODEL_TYPES, extract_state_dict, hf_config_to_kwargs, load_into_model,
                                   to_mae_state_dict)
from mimkit.models.builders import MAE_OPTIONS
from mimkit.models.openmmlab import Guess, mae_sizes, openmmlab_kind, say_guess
from mimkit.models.registry import create_model, list_models, same_model

# Registered builder used for a Hugging Face config that matches no preset: every size comes from config.json.
HF_FALLBACK_NAME = "mae_vit"
# Sizes that make a preset what it is (a config naming other values is not that preset).
_PRESET_SIZES = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                 "decoder_num_heads", "mlp_ratio")


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


def preset_for_kwargs(kwargs: dict) -> str:
    """The registered MAE preset whose every size equals `kwargs` (a Hugging Face config's), else the generic
    `mae_vit`: a checkpoint is never labelled with the name of another architecture."""
    for name in list_models(include_aliases=False):
        if not name.startswith("mae_vit_"):
            continue
        with torch.device("meta"):
            m = create_model(name)
        own = dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=len(m.blocks),
                   num_heads=m.blocks[0].attn.num_heads, decoder_embed_dim=m.decoder_embed.out_features,
                   decoder_depth=len(m.decoder_blocks), decoder_num_heads=m.decoder_blocks[0].attn.num_heads,
                   mlp_ratio=m.blocks[0].mlp.fc1.out_features / m.embed_dim)
        if all(k in kwargs and float(kwargs[k]) == float(own[k]) for k in _PRESET_SIZES):
            return name
    return HF_FALLBACK_NAME


def encoder_arch_of_config(cfg: dict) -> Optional[dict]:
    """{type, kwargs, input_size, norm_pix_loss} of the ViT encoder a mimkit checkpoint's config describes, for
    every command's checkpoint: pretrain / continual / localmim (model.type + model.kwargs), linprobe
    (model.arch.probe_encoder), finetune and segment (model.arch: the timm ViT's sizes, built as `mae_vit`, or as
    the run's --model when it named one). None when the config says nothing usable."""
    m = cfg.get("model") or {}
    data = cfg.get("data") or {}
    arch = m.get("arch") or {}
    size = data.get("input_size")
    if arch.get("probe_encoder"):
        enc = arch["probe_encoder"]
        return {"type": enc["type"], "kwargs": dict(enc.get("kwargs") or {}), "input_size": size,
                "norm_pix_loss": False}
    if (arch.get("source_encoder") or {}).get("type"):  # a fine-tuned classifier: the MAE it came from
        src = arch["source_encoder"]
        return {"type": src["type"], "kwargs": dict(src.get("kwargs") or {}), "norm_pix_loss": False,
                "input_size": size}
    if arch.get("embed_dim") is not None:  # a timm ViT classifier / segmentation backbone
        # the run's own model.kwargs (segment keeps them: the decoder's sizes) beneath the encoder's actual sizes
        kwargs = {k: v for k, v in (m.get("kwargs") or {}).items() if k in MAE_OPTIONS and k != "img_size"}
        kwargs.update({k: arch[k] for k in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                            "mlp_ratio", "layer_norm_eps", "init_values") if arch.get(k) is not None})
        named = m.get("type")
        if named:
            try:
                with torch.device("meta"):
                    create_model(named, **kwargs)
            except UserError:  # a name that takes other options (not an MAE): the generic builder
                named = None
        img = arch.get("img_size") or size
        return {"type": named or HF_FALLBACK_NAME, "kwargs": kwargs, "norm_pix_loss": False,
                "input_size": list(img) if isinstance(img, (list, tuple)) else img}
    if m.get("type"):
        return {"type": m["type"], "kwargs": dict(m.get("kwargs") or {}), "input_size": size,
                "norm_pix_loss": bool(m.get("norm_pix_loss", False))}
    return None


def openmmlab_sizes(obj: Any) -> Optional[tuple[dict, Optional[Guess]]]:
    """(MaskedAutoencoderViT arguments, heads guessed from the width or None) of an mmpretrain / MMSeg checkpoint
    (its tensors' shapes, its saved config's heads), or None for any other file. Nothing is said here: the caller
    says the guess only when the user states no heads of their own."""
    if _mimkit_config(obj) is not None:
        return None
    try:
        sd, _ = extract_state_dict(obj)
    except CheckpointError:
        return None
    kind = openmmlab_kind(sd)
    if kind is None:
        return None
    mae_sd, _ = to_mae_state_dict(sd)
    return mae_sizes(mae_sd, kind, obj.get("meta") if isinstance(obj, dict) else None)


def adopt_named_heads(name: str, kw: dict, guess: Optional[Guess], path: Any) -> tuple[dict, Optional[Guess]]:
    """An explicit --model for an OpenMMLab file: its width must be the file's (one line otherwise); its heads
    replace those guessed from the width (a decoder of another width keeps its guess); heads the file's saved
    config states must agree with it. Returns (kwargs, what is still guessed)."""
    with torch.device("meta"):
        named = create_model(name)
    own = {"num_heads": named.blocks[0].attn.num_heads, "embed_dim": named.embed_dim}
    if hasattr(named, "decoder_blocks") and len(named.decoder_blocks):
        own.update(decoder_num_heads=named.decoder_blocks[0].attn.num_heads,
                   decoder_embed_dim=named.decoder_embed.out_features)
    if own["embed_dim"] != kw["embed_dim"]:
        raise CheckpointError(f"--model {name} is {own['embed_dim']} wide but {path} holds a {kw['embed_dim']}-wide "
                              "encoder: name a model of its width (`mimkit models`), or leave --model out")
    out, left = dict(kw), (Guess(guess.why, guess.widths) if guess else None)
    for key, width in (("num_heads", "embed_dim"), ("decoder_num_heads", "decoder_embed_dim")):
        if guess is not None and key in guess:
            if own.get(width) == kw.get(width):
                out[key] = own[key]
            else:  # a decoder of another width (or none) than the file's: the guess stands
                left[key] = guess[key]
        elif key in own and key in kw and own[width] == kw[width] and own[key] != kw[key]:
            part = "decoder " if key.startswith("decoder") else ""
            raise CheckpointError(f"--model {name} has {own[key]} {part}heads but {path}'s saved config says "
                                  f"{kw[key]}: leave --model out (the file states its heads)")
    return out, (left or None)


def _mimkit_config(obj: Any) -> Optional[dict]:
    return obj.get("config") if isinstance(obj, dict) and "mimkit_version" in obj else None


def checkpoint_normalization(path: str | os.PathLike, obj: Any = None) -> Optional[tuple[list, list]]:
    """(mean, std) the checkpoint's model was trained with, when it says: a mimkit config's data.mean / data.std,
    or a Hugging Face folder's preprocessor_config.json image_mean / image_std. None = the defaults."""
    p = resolve_checkpoint(path)
    obj = load_checkpoint_file(p) if obj is None else obj
    cfg = _mimkit_config(obj)
    if cfg:
        data = cfg.get("data") or {}
        if data.get("mean") is not None and data.get("std") is not None:
            return [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
        return None
    pre = p.parent / "preprocessor_config.json"
    if pre.is_file():
        try:
            d = json.loads(pre.read_text())
        except json.JSONDecodeError:
            return None
        if d.get("image_mean") is not None and d.get("image_std") is not None:
            return [float(v) for v in d["image_mean"]], [float(v) for v in d["image_std"]]
    return None


def describe_architecture(model) -> str:
    """'patch 8, encoder 6x192, decoder 2x128, 32x32 input': what a model is, beyond its name."""
    h, w = model.img_size
    return (f"patch {model.patch_size}, encoder {len(model.blocks)}x{model.embed_dim}, {_decoder_text(model)}, "
            f"{h}x{w} input, {model.in_chans} channel{'s' if model.in_chans != 1 else ''}")


def _decoder_text(model) -> str:
    """'decoder 2x128' (MAE), '4 decoders 1x128' (LocalMIM: one per tap), or 'no decoder'."""
    if getattr(model, "decoder_unused", False):
        return "no decoder"
    if hasattr(model, "decoder_blocks"):
        return f"decoder {len(model.decoder_blocks)}x{model.decoder_embed.out_features}"
    decoders = getattr(model, "decoder", None)
    if isinstance(decoders, torch.nn.ModuleList) and len(decoders):
        d = decoders[0]
        return f"{len(decoders)} decoders {len(d.blocks)}x{d.embed.out_features}"
    return "no decoder"


def name_the_file(path: str | os.PathLike, e: CheckpointError) -> CheckpointError:
    """The same error with the checkpoint's path in front (convert.py's messages describe a state dict, not a file)."""
    text = str(e)
    return e if str(path) in text else type(e)(f"{path}: {text}")


# The decoder built for a checkpoint that holds none when the command uses only the encoder (decoder='unused'):
# the smallest there is, so no memory goes to a random decoder nobody runs.
UNUSED_DECODER = dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)


def holds_decoder(obj: Any) -> bool:
    """Does a loaded checkpoint hold MAE / LocalMIM decoder weights? (True when its layout is unknown: the loader
    then says what does not fit.)"""
    try:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
    except CheckpointError:
        return True
    return any(k.startswith(("decoder", "mask_token")) for k in sd)


def model_from_checkpoint(
    path: str | os.PathLike, model_name: Optional[str] = None, input_size: Optional[int] = None,
    decoder: str = "fresh", **overrides: Any
):
    """(model with the checkpoint's weights, one-line description); any CheckpointError names the file.

    decoder: what the caller does with the decoder of a checkpoint that holds none -- 'fresh' (it is trained or
    exported: built at its full size, randomly initialised), 'unused' (an encoder-taking command: the smallest
    decoder, and the load line says only the encoder is used) or 'needed' (refused in one line before loading)."""
    try:
        return _model_from_checkpoint(path, model_name, input_size, decoder, **overrides)
    except CheckpointError as e:
        raise name_the_file(path, e) from None


def _model_from_checkpoint(
    path: str | os.PathLike, model_name: Optional[str] = None, input_size: Optional[int] = None,
    decoder: str = "fresh", **overrides: Any
):
    """(model with the checkpoint's weights, one-line description) for any mimkit / official / HF MAE checkpoint.

    A mimkit checkpoint rebuilds the model its config names (type, kwargs, input size, norm_pix_loss), a Hugging
    Face folder the one its config.json describes; other files need `model_name` unless their shapes match a
    registered preset. `model.normalization` is the checkpoint's (mean, std), or None for the defaults.
    """
    p = resolve_checkpoint(path)
    obj = load_checkpoint_file(p)
    cfg = _mimkit_config(obj)
    hf_cfg = None if cfg else hf_config_beside(p)
    kwargs: dict[str, Any] = {}
    enc = encoder_arch_of_config(cfg) if cfg else None
    if enc:
        if model_name is None or same_model(model_name, enc["type"]):
            # the checkpoint's kwargs belong to its own model type: another --model is built as registered
            model_name = enc["type"]
            kwargs.update(enc["kwargs"])
        size = enc["input_size"]
        if size is not None:
            kwargs["img_size"] = tuple(size) if isinstance(size, (list, tuple)) else size
        kwargs["norm_pix_loss"] = enc["norm_pix_loss"]
    elif hf_cfg is not None and hf_cfg.get("model_type") in HF_MODEL_TYPES:
        kwargs.update(hf_config_to_kwargs(hf_cfg))
        model_name = model_name or preset_for_kwargs(kwargs)
    elif (mm := openmmlab_sizes(obj)) is not None:  # the file's own sizes beat a preset's, as a HF config's
        mm_kw, guess = mm
        if model_name is not None:  # an explicit --model states the heads the file does not
            mm_kw, guess = adopt_named_heads(model_name, mm_kw, guess, p)
        kwargs.update(mm_kw)
        model_name = model_name or preset_for_kwargs(kwargs)
        say_guess(guess, overrides)
    if model_name is None:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
        model_name = infer_model_name(sd)
        if model_name is None:
            raise CheckpointError(f"cannot tell which model {p} holds (its sizes match no registered model): pass "
                                  "--model (see `mimkit models`), or give a Hugging Face folder with its "
                                  "config.json (save_pretrained) or a mimkit checkpoint, which state their sizes")
    if input_size is not None:
        kwargs["img_size"] = input_size
    unused = False
    if decoder != "fresh" and not holds_decoder(obj):
        if decoder == "needed":
            raise CheckpointError(f"{p} holds no MAE decoder (an encoder-only, classifier, linprobe, finetune or "
                                  "segment checkpoint): reconstructions need a pretraining checkpoint (MAE encoder + "
                                  "decoder: mimkit pretrain / continual, mmpretrain MAE, official *_full.pth)")
        unused = not any(k in overrides for k in UNUSED_DECODER)
        if unused:
            kwargs.update(UNUSED_DECODER)
    kwargs.update(overrides)
    model = create_model(model_name, **kwargs)
    report = load_into_model(model, obj, strict=False, decoder_used=not unused)
    model.decoder_unused = unused  # describe_architecture says 'no decoder'
    model.load_report = report  # e.g. decoder_fresh: a command that needs the decoder can refuse
    model.normalization = checkpoint_normalization(p, obj)
    model.eval()
    generic = p.name in ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")
    where = f"{p.parent.name}/{p.name}" if generic else p.name
    return model, f"{model_name} ({describe_architecture(model)}) from {where} ({report.source})"


def architecture_of(path: str | os.PathLike) -> Optional[dict]:
    """Config layer {model: {type, kwargs, norm_pix_loss}, data: {input_size, mean, std}} of a checkpoint's model.

    A mimkit checkpoint says it in its config, a Hugging Face folder in its config.json; an official file is
    matched to a registered preset by shape (input size from the position-embedding grid). None when the file is
    unreadable or matches nothing: the loader then reports the mismatch in full. An OpenMMLab file whose heads
    were guessed from the width also gives `heads_guess` (openmmlab.Guess), for the caller to say (say_guess).
    """
    try:
        p = resolve_checkpoint(path)
        obj = load_checkpoint_file(p)
    except CheckpointError:
        return None
    norm = checkpoint_normalization(p, obj)
    data: dict[str, Any] = {"mean": norm[0], "std": norm[1]} if norm else {}
    cfg = _mimkit_config(obj)
    enc = encoder_arch_of_config(cfg) if cfg else None
    if enc:
        arch = {"model": {"type": enc["type"], "kwargs": enc["kwargs"], "norm_pix_loss": enc["norm_pix_loss"]}}
        if enc["input_size"] is not None:
            data["input_size"] = enc["input_size"]
        return {**arch, **({"data": data} if data else {})}
    try:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
    except CheckpointError:
        return None
    hf_cfg = hf_config_beside(p)
    sized = openmmlab_sizes(obj)
    if sized is not None:  # a guess is said by whoever builds the model (the user may state the heads)
        mm = sized[0]
        name = preset_for_kwargs(mm)
        if "img_size" in mm:
            data["input_size"] = mm.pop("img_size")
        return {"model": {"type": name, "kwargs": mm, "norm_pix_loss": False}, **({"data": data} if data else {}),
                **({"heads_guess": sized[1]} if sized[1] else {})}
    if hf_cfg is not None and hf_cfg.get("model_type") in HF_MODEL_TYPES:
        kwargs = hf_config_to_kwargs(hf_cfg)
        name = preset_for_kwargs(kwargs)
        data["input_size"] = kwargs.pop("img_size")
        norm_pix = kwargs.pop("norm_pix_loss")
        return {"model": {"type": name, "kwargs": kwargs, "norm_pix_loss": norm_pix}, "data": data}
    name = infer_model_name(sd)
    if name is None:
        return None
    arch: dict[str, Any] = {"model": {"type": name}}
    tokens = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else 0
    side = int(round(tokens**0.5))
    if side * side == tokens and tokens:
        data["input_size"] = side * sd["patch_embed.proj.weight"].shape[-1]
    if data:
        arch["data"] = data
    return arch

