"""Model registry: the builder function's name is the model name; aliases map the seeds' names.

Every builder module is imported here, so every registered model is known once this module is.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch.nn as nn

from mimkit.errors import UserError, suggest
from mimkit.models import builders, localmim  # noqa: F401  (importing them fills the table)
from mimkit.models.register import _ALIASES, _BUILDERS, register_alias, register_model  # noqa: F401

def list_models(include_aliases: bool = True) -> list[str]:
    """Every registered model name (sorted), aliases included unless asked otherwise."""
    names = set(_BUILDERS) | (set(_ALIASES) if include_aliases else set())
    return sorted(names)


def resolve_name(name: str) -> str:
    """Alias -> canonical model name; unknown names raise UserError with the closest match."""
    if name in _BUILDERS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise UserError(f"unknown model '{name}'{suggest(name, list_models())}; `mimkit models` lists them")


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Do two model names (aliases resolved) name the same registered builder? Unknown names: only if equal."""
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return resolve_name(a) == resolve_name(b)
    except UserError:
        return False


def describe(model: nn.Module) -> str:
    """The architecture in one line: 'patch 8, 6 blocks x 192-d (3 heads), decoder 2 blocks x 128-d, 64x64 px'."""
    parts = []
    if hasattr(model, "patch_size"):
        parts.append(f"patch {model.patch_size}")
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "embed_dim"):
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if len(blocks) else None
        parts.append(f"{len(blocks)} blocks x {model.embed_dim}-d" + (f" ({heads} heads)" if heads else ""))
    dec = getattr(model, "decoder_blocks", None)
    unused = getattr(model, "decoder_unused", False)  # an encoder taken from a file with no decoder
    if unused:
        parts.append("no decoder")
    elif dec is not None and hasattr(model, "decoder_embed"):
        parts.append(f"decoder {len(dec)} blocks x {model.decoder_embed.out_features}-d")
    size = getattr(model, "img_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        parts.append(f"{h}x{w} px, {getattr(model, 'in_chans', 3)} channel(s)")
    skip = ("decoder", "mask_token") if unused else ()
    parts.append(f"{sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip)):,} params")
    return ", ".join(parts)


def model_kwargs(name: str) -> set[str]:
    """The override names a model accepts."""
    fn = _BUILDERS[resolve_name(name)]
    return set(getattr(fn, "accepts", ())) or set(inspect.signature(fn).parameters) - {"kwargs"}


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model, applying overrides such as img_size, patch_size, in_chans, norm_pix_loss."""
    canonical = resolve_name(name)
    fn = _BUILDERS[canonical]
    allowed = model_kwargs(canonical)
    for key in overrides:
        if allowed and key not in allowed:
            raise UserError(
                f"model '{name}' has no option '{key}'{suggest(key, allowed)}; options: {', '.join(sorted(allowed))}"
            )
    try:
        model = fn(**overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model '{name}': {e}") from None
    model.model_name = canonical
    return model
