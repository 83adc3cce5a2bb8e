"""Weight interop for MaskedAutoencoderViT: safe reading, official MAE / Hugging Face / timm mapping, loading.

Every state dict here is a plain ``{name: tensor}`` dict. "MAE layout" means the official
facebookresearch/mae names (``blocks.N.attn.qkv.weight``, ``decoder_blocks.N...``), which our model uses.

    from mimkit.models import create_model
    from mimkit.models.convert import load_into_model
    model = create_model("mae_vit_base_patch16")
    report = load_into_model(model, "mae_pretrain_vit_base.pth")   # official, HF, timm or mimkit file
    print(report.summary())                                       # e.g. "... decoder starts fresh"

Files (or folders) are read by mimkit.io (weights_only torch.load or safetensors): loading never runs code
from the file. ``load_checkpoint_file`` and ``save_safetensors`` are re-exported here for existing callers.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple

from mimkit.errors import CheckpointError
from mimkit.io import OPENMMLAB_DROPPED, load_checkpoint_file, save_safetensors  # noqa: F401  (re-exported)
from mimkit.models import vit
from mimkit.models.mae import ENCODER_PREFIXES, MaskedAutoencoderViT
from mimkit.models.openmmlab import SOURCES, openmmlab_kind, openmmlab_to_mae

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
# Wrapper prefixes left by DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Positional embeddings of the MAE layout, resized when a checkpoint has another patch grid.
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


# ---------------------------------------------------------------------------------------------- detection
def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the key layout of a state dict: 'huggingface', 'mae' (with decoder) or 'timm_vit' (encoder only).

    An official encoder-only release (``mae_pretrain_vit_*.pth``) has the timm VisionTransformer layout.
    """
    keys = list(sd)
    hf_prefixes = ("vit.embeddings.", "embeddings.patch_embeddings.", "decoder.decoder_")
    if any(k.startswith(hf_prefixes) for k in keys):
        return "huggingface"
    if any(k.startswith(("decoder_blocks.", "decoder_embed.", "decoder_pred.", "mask_token")) for k in keys):
        return "mae"
    if any(k.startswith("blocks.") for k in keys) and "patch_embed.proj.weight" in sd:
        return "timm_vit"
    shown = ", ".join(keys[:5]) or "no keys"
    raise CheckpointError(
        f"not an MAE, Hugging Face ViTMAE or timm ViT state dict (first keys: {shown}): it holds no ViT encoder; "
        "give a checkpoint of mimkit pretrain / continual / linprobe / finetune / segment, an official MAE .pth, "
        "a timm ViT or a Hugging Face ViTMAE / ViT folder"
    )


def extract_state_dict(obj: Any) -> tuple[StateDict, str]:
    """Unwrap a loaded checkpoint: -> (state dict in its own layout, source).

    source is 'mimkit' (dict with ``model`` and ``mimkit_version``), 'official_mae' (dict with ``model``),
    or, for a bare state dict, its layout: 'mae', 'huggingface' or 'timm_vit'.
    DDP / torch.compile prefixes (``module.``, ``_orig_mod.``) are removed.
    """
    source = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        source = "mimkit" if "mimkit_version" in obj else "official_mae"
        obj = obj["model"]
    elif is_mmengine(obj):
        obj = obj["state_dict"]
        source = SOURCES.get(openmmlab_kind(obj) or "", "mmengine")
    elif isinstance(obj, Mapping) and "meta" in obj and "state_dict" not in obj and "model" not in obj:
        raise CheckpointError(f"no weights (no 'state_dict'): an mmengine checkpoint holding only "
                              f"{', '.join(map(str, obj))}; nothing to load")
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint holds no state dict (found {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint state dict has non-tensor entries: {_preview(not_tensors)}")
    sd = {_strip_prefixes(k): v for k, v in obj.items()}
    if source is None and openmmlab_kind(sd):  # a bare OpenMMLab state dict (model.state_dict() saved alone)
        source = SOURCES[openmmlab_kind(sd)]
    return sd, source or detect_layout(sd)


def is_mmengine(obj: Any) -> bool:
    """True for an mmengine checkpoint (`{meta, state_dict, optimizer, message_hub, ...}`, as mimkit.io reads it)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and "model" not in obj


def mmengine_dropped(obj: Any) -> list[str]:
    """'mmengine entries meta, optimizer, message_hub' when `obj` is an mmengine file: what loading ignores."""
    if not is_mmengine(obj):
        return []
    rest = [str(k) for k in obj if k not in ("state_dict", OPENMMLAB_DROPPED)] + list(obj.get(OPENMMLAB_DROPPED, []))
    return [f"the mmengine file's {', '.join(rest)}"] if rest else []


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


# ---------------------------------------------------------------------------------------------- Hugging Face
# MAE name stem -> ViTMAEForPreTraining name stem (parameters outside the transformer blocks).
_HF_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}
_HF_BLOCKS = {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"}
# Inside a block: MAE -> HF (transformers >= 5 names). attn.qkv is split into q/k/v_proj.
_HF_BLOCK_PARTS = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
# transformers >= 5 name -> transformers 4.x / Hub-file name, applied in this order.
_HF_LEGACY = (
    ("vit.layers.", "vit.encoder.layer."),
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)
_BLOCK_KEY = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_KEY = re.compile(r"^(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")


def mae_to_hf(sd: Mapping[str, torch.Tensor], legacy: bool = False) -> StateDict:
    """MAE layout -> ``ViTMAEForPreTraining`` state dict (``vit.*``, ``decoder.*``).

    ``blocks.N.attn.qkv.{weight,bias}`` (3D, D) / (3D,) is split into q, k, v (D, D) / (D,) in that order.
    Names are those of transformers >= 5 (``vit.layers.N.attention.q_proj``); ``legacy=True`` gives the
    transformers 4.x / Hub-file names (``vit.encoder.layer.N.attention.attention.query``).
    """
    out: StateDict = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            group, idx, part, leaf = m.groups()
            stem = f"{_HF_BLOCKS[group]}.{idx}"
            if part == "attn.qkv":
                for name, chunk in zip(_HF_QKV, value.chunk(3, dim=0)):
                    out[f"{stem}.{name}.{leaf}"] = chunk.clone()
                continue
            if part not in _HF_BLOCK_PARTS:
                raise CheckpointError(f"no Hugging Face name for MAE key '{key}'")
            out[f"{stem}.{_HF_BLOCK_PARTS[part]}.{leaf}"] = value
            continue
        stem, _, leaf = key.rpartition(".") if key not in _HF_TOP else (key, "", "")
        if stem not in _HF_TOP:
            raise CheckpointError(f"no Hugging Face name for MAE key '{key}'")
        out[_HF_TOP[stem] + (f".{leaf}" if leaf else "")] = value
    if legacy:
        out = {_rename(k, _HF_LEGACY): v for k, v in out.items()}
    return out


# Every block prefix Hugging Face has written -> the transformers >= 5 in-memory one. 4.x: vit.encoder.layer.N,
# decoder.decoder_layers.N; 5.x in memory: vit.layers.N; 5.x save_pretrained files: vit.encoder.layer.N and
# decoder.decoder_encoder.layer.N (its reverse renaming of decoder_layers); ViTMAEModel: no "vit." prefix.
_HF_BLOCK_PREFIXES = (
    (re.compile(r"^(?:vit\.)?(?:encoder\.layers?|layers)\.(\d+)\."), r"vit.layers.\1."),
    (re.compile(r"^decoder\.decoder_(?:layers|encoder\.layers?)\.(\d+)\."), r"decoder.decoder_layers.\1."),
)
# Inside a block, 4.x names -> 5.x names (attention.output.dense before output.dense).
_HF_BLOCK_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def hf_modern_key(key: str) -> str:
    """Any Hugging Face ViTMAE key (4.x, 5.x in memory, 5.x on disk, ViTMAEModel) -> the transformers 5 name."""
    if key.startswith(("embeddings.", "layernorm.")):
        key = "vit." + key  # ViTMAEModel
    for pattern, repl in _HF_BLOCK_PREFIXES:
        if pattern.match(key):
            return _rename(pattern.sub(repl, key, count=1), _HF_BLOCK_RENAMES)
    return key


def hf_to_mae(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """``ViTMAEForPreTraining`` or ``ViTMAEModel`` state dict (any transformers version's names) -> MAE layout.

    q, k, v (D, D) are concatenated into ``attn.qkv`` (3D, D). A ViTMAEModel dict (no ``vit.`` prefix,
    no decoder) gives an encoder-only MAE state dict.
    """
    top = {v: k for k, v in _HF_TOP.items()}
    parts = {v: k for k, v in _HF_BLOCK_PARTS.items()}
    blocks = {v: k for k, v in _HF_BLOCKS.items()}
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for original, value in sd.items():
        key = hf_modern_key(original)
        m = _HF_BLOCK_KEY.match(key)
        if m:
            group, idx, part, leaf = m.groups()
            stem = f"{blocks[group]}.{idx}"
            if part in _HF_QKV:
                qkv.setdefault(f"{stem}.attn.qkv.{leaf}", {})[part] = value
                continue
            if part not in parts:
                raise CheckpointError(f"no MAE name for Hugging Face key '{original}'")
            out[f"{stem}.{parts[part]}.{leaf}"] = value
            continue
        stem, _, leaf = key.rpartition(".") if key not in top else (key, "", "")
        if stem not in top:
            raise CheckpointError(f"no MAE name for Hugging Face key '{original}'")
        out[top[stem] + (f".{leaf}" if leaf else "")] = value
    for key, pieces in qkv.items():
        if len(pieces) != 3:
            raise CheckpointError(f"incomplete q/k/v for '{key}': found only {sorted(pieces)}")
        out[key] = torch.cat([pieces[name] for name in _HF_QKV], dim=0)
    return out


def hf_config_to_kwargs(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A ViTMAE (or plain ViT: `mimkit export --format hf`) ``config.json`` (dict) -> MaskedAutoencoderViT
    arguments, the LayerNorm eps included (the inverse of hf_config_kwargs). A ViT config has no decoder: the
    decoder arguments are ViTMAE's defaults (that decoder starts fresh)."""
    if hf_config.get("model_type", "vit_mae") not in HF_MODEL_TYPES:
        raise CheckpointError(f"config.json describes a '{hf_config.get('model_type')}' model, not vit_mae or vit")
    c = {**_HF_CONFIG_DEFAULTS, **hf_config}
    if hf_config.get("model_type") == "vit":
        c["decoder_intermediate_size"] = c["intermediate_size"] * c["decoder_hidden_size"] / c["hidden_size"]
    if c["intermediate_size"] != c["decoder_intermediate_size"] * c["hidden_size"] / c["decoder_hidden_size"]:
        log.warning("config.json: the decoder's MLP ratio differs from the encoder's; using the encoder's")
    return dict(
        img_size=c["image_size"], patch_size=c["patch_size"], in_chans=c["num_channels"],
        embed_dim=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        decoder_embed_dim=c["decoder_hidden_size"], decoder_depth=c["decoder_num_hidden_layers"],
        decoder_num_heads=c["decoder_num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
        norm_pix_loss=bool(c["norm_pix_loss"]), layer_norm_eps=float(c["layer_norm_eps"]),
    )


# config.json model types whose weights map onto the MAE encoder (ViTModel: `mimkit export --format hf`).
HF_MODEL_TYPES = ("vit_mae", "vit")
# transformers' ViTMAEConfig defaults, for config.json files that leave a key out (its eps is 1e-12, not 1e-6).
_HF_CONFIG_DEFAULTS = dict(
    image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
    decoder_intermediate_size=2048, norm_pix_loss=False, layer_norm_eps=1e-12,
)


def hf_config_kwargs(model: MaskedAutoencoderViT) -> dict[str, Any]:
    """``transformers.ViTMAEConfig`` arguments describing `model` (square images only, as ViTMAE)."""
    if model.img_size[0] != model.img_size[1]:
        raise CheckpointError(f"Hugging Face ViTMAE supports square images only, model has {model.img_size}")
    return dict(
        image_size=model.img_size[0], patch_size=model.patch_size, num_channels=model.in_chans,
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        decoder_hidden_size=model.decoder_embed.out_features,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=model.decoder_blocks[0].attn.num_heads,
        decoder_intermediate_size=model.decoder_blocks[0].mlp.fc1.out_features,
        hidden_act="gelu", qkv_bias=True, layer_norm_eps=model.norm.eps, norm_pix_loss=model.norm_pix_loss,
    )


def _rename(key: str, table: Sequence[tuple[str, str]]) -> str:
    for old, new in table:
        key = key.replace(old, new)
    return key


# ---------------------------------------------------------------------------------------------- timm
def mae_to_timm_vit(sd: Mapping[str, torch.Tensor], global_pool: bool = False) -> StateDict:
    """MAE layout -> encoder-only timm ``VisionTransformer`` state dict (decoder keys dropped).

    ``timm.create_model("vit_base_patch16_224", num_classes=0)`` loads the result with strict=True.
    With ``global_pool=True`` (the official fine-tuning recipe's average pooling, timm ``global_pool="avg"``)
    the final ``norm`` becomes ``fc_norm``, so loading into a classifier leaves only ``head.*`` new.
    (The official main_finetune.py instead starts fc_norm fresh and drops norm; both are legitimate.)
    """
    out = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    if global_pool:
        out = {("fc_" + k if k.startswith("norm.") else k): v for k, v in out.items()}
    return out


def timm_vit_to_mae(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """timm ViT / official encoder-only state dict -> (MAE encoder state dict, dropped keys).

    The classifier ``head.*`` is dropped; an average-pooling ``fc_norm`` stands in for a missing ``norm``.
    """
    has_norm = "norm.weight" in sd
    out, dropped = {}, []
    for key, value in sd.items():
        if key.startswith("fc_norm.") and not has_norm:
            key = key[len("fc_"):]
        if key.startswith(("head.", "head_dist.", "fc_norm.")):
            dropped.append(key)
            continue
        out[key] = value
    return out, dropped


# Prefixes under which other mimkit commands keep a ViT encoder: linprobe's LinearProbe (`encoder.`, MAE names)
# and segment's MAESegmenter (`backbone.`, a timm ViT without final norm). Their heads are dropped.
TASK_ENCODER_PREFIXES = ("encoder.", "backbone.")


def unwrap_task_encoder(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """A linprobe / segment state dict -> (its encoder's state dict, keys dropped); other dicts unchanged.

    A segment backbone was trained without the encoder's final norm: `norm` is filled at a fresh LayerNorm's
    values (weight 1, bias 0), and the dropped list says so.
    """
    for prefix in TASK_ENCODER_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if "patch_embed.proj.weight" not in inner or not any(k.startswith("blocks.") for k in inner):
            continue
        rest = [k for k in sd if not k.startswith(prefix)]
        what = "linear-probe head" if prefix == "encoder." else "segmentation neck and heads"
        dropped = [f"the {what} ({len(rest)} tensors)"] if rest else []
        if prefix == "backbone." and "norm.weight" not in inner and "cls_token" in inner:
            width = inner["cls_token"].shape[-1]
            inner["norm.weight"], inner["norm.bias"] = torch.ones(width), torch.zeros(width)
            dropped.append("norm (a segment backbone has no final norm: it starts as a fresh LayerNorm)")
        return inner, dropped
    return dict(sd), []


def to_mae_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Any supported layout (a linprobe / segment checkpoint's encoder too) -> (MAE-layout state dict, keys
    dropped on the way)."""
    if openmmlab_kind(sd):
        return openmmlab_to_mae(sd)
    sd, task_dropped = unwrap_task_encoder(sd)
    out, dropped = _layout_to_mae(sd)
    return out, task_dropped + dropped


def _layout_to_mae(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    layout = detect_layout(sd)
    if layout == "huggingface":  # a transformers ViTModel's pooler (dense + tanh on the cls token) is no MAE part
        pooler = [k for k in sd if k.startswith(("pooler.", "vit.pooler."))]
        return hf_to_mae({k: v for k, v in sd.items() if k not in pooler}), pooler
    if layout == "timm_vit":
        return timm_vit_to_mae(sd)
    return dict(sd), []


# ---------------------------------------------------------------------------------------------- pos embeds
def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | Sequence[int],
    num_extra_tokens: int = 1,
    old_grid: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Bicubic resize of position embeddings (1, E + h*w, D) -> (1, E + H*W, D), as the official util.

    The E extra (cls) tokens are kept; the grid tokens are resized with
    ``F.interpolate(mode="bicubic", align_corners=False)``. `new_grid` / `old_grid` are (H, W) or an int;
    `old_grid` defaults to the square grid holding the checkpoint's tokens.
    """
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    n, length, dim = tokens.shape
    if old_grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise CheckpointError(
                f"cannot tell the patch grid of a position embedding with {length} tokens (not a square)"
            )
        old_grid = side
    oh, ow = to_2tuple(old_grid)
    nh, nw = to_2tuple(new_grid)
    if oh * ow != length:
        raise CheckpointError(f"position embedding has {length} tokens, not a {oh}x{ow} grid")
    if (oh, ow) == (nh, nw):
        return pos_embed
    grid = tokens.reshape(n, oh, ow, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    tokens = grid.permute(0, 2, 3, 1).reshape(n, nh * nw, dim).to(pos_embed.dtype)
    return torch.cat([extra, tokens], dim=1)


def resize_pos_embeds(sd: StateDict, model: MaskedAutoencoderViT, mode: str = "bicubic") -> list[str]:
    """Fit the checkpoint's position embeddings to the model's patch grid, in place; returns what changed.

    mode 'bicubic' interpolates (official ``interpolate_pos_embed``, applied to the decoder's too);
    'sincos' takes the model's own fixed sin-cos embeddings for its grid instead.
    """
    if mode not in ("bicubic", "sincos"):
        raise ValueError(f"unknown pos-embed resize mode '{mode}'; choose bicubic or sincos")
    changed = []
    own = model.state_dict()
    # LocalMIM's per-tap decoders (decoder.{k}.pos_embed) sit on the same patch grid as the encoder
    keys = [*POS_EMBED_KEYS, *(k for k in own if k.startswith("decoder.") and k.endswith(".pos_embed"))]
    for key in keys:
        if key not in sd or key not in own or sd[key].shape == own[key].shape:
            continue
        if sd[key].ndim != 3 or sd[key].shape[-1] != own[key].shape[-1]:
            continue  # a width mismatch is reported by the shape check, not resized
        old = _grid_text(sd[key].shape[1] - 1)
        if mode == "sincos":
            sd[key] = vit.sincos_pos_embed_2d(own[key].shape[-1], model.grid_size, cls_token=True)[None]
        else:
            sd[key] = interpolate_pos_embed(sd[key], model.grid_size)
        changed.append(f"{key} {old} -> {_grid_text(model.num_patches, model.grid_size)} ({mode})")
    return changed


def _grid_text(tokens: int, grid: Sequence[int] | None = None) -> str:
    side = math.isqrt(tokens)
    grid = grid or ((side, side) if side * side == tokens else None)
    return f"{grid[0]}x{grid[1]}" if grid else f"{tokens} tokens"


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What `load_into_model` did: where the weights came from and what did not come from them."""

    source: str                                              # mimkit|official_mae|mae|huggingface|timm_vit
    missing: list[str] = field(default_factory=list)         # model keys left at their initial values
    unexpected: list[str] = field(default_factory=list)      # checkpoint keys not used (strict=False only)
    dropped: list[str] = field(default_factory=list)         # classifier keys ignored during conversion
    resized: list[str] = field(default_factory=list)         # position embeddings fitted to the grid
    decoder_fresh: bool = False                              # the checkpoint had no decoder
    decoder_used: bool = True                                # False: the command takes only the encoder

    def summary(self) -> str:
        """One human-readable line."""
        openmmlab = self.source in SOURCES.values()
        parts = [f"loaded an {self.source} checkpoint" if openmmlab else f"loaded {self.source} weights"]
        if self.decoder_fresh and self.decoder_used:
            parts.append("the checkpoint has no decoder: the decoder starts fresh (randomly initialised)")
        elif self.decoder_fresh:
            parts.append("encoder only (the checkpoint has no decoder, and none is needed here)")
        if self.resized:
            parts.append("resized " + ", ".join(self.resized))
        if self.dropped:
            parts.append(f"ignored {_preview(self.dropped)}")
        other_missing = [k for k in self.missing if not (self.decoder_fresh and not _is_encoder_key(k))]
        if other_missing:
            parts.append(f"not in checkpoint: {_preview(other_missing)}")
        if self.unexpected:
            parts.append(f"unused: {_preview(self.unexpected)}")
        return "; ".join(parts)


def load_into_model(
    model: MaskedAutoencoderViT,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    pos_embed: str = "bicubic",
    decoder_used: bool = True,
) -> LoadReport:
    """Load an official MAE, Hugging Face ViTMAE (transformers 4.x or 5.x names), timm ViT or mimkit checkpoint:
    a file, a folder (a run / checkpoint / save_pretrained folder: mimkit.io.resolve_checkpoint) or a loaded object.

    - Position embeddings of another patch grid are resized (`pos_embed`: 'bicubic' as the official
      ``interpolate_pos_embed``, or 'sincos' to recompute the fixed embedding for the model's grid).
    - A checkpoint without decoder weights (the official ``mae_pretrain_vit_*.pth``, a timm ViT) loads into
      the encoder; the decoder keeps its fresh initialisation and the report says so.
    - A checkpoint that does not fit raises CheckpointError naming the missing / unexpected keys and the
      mismatched shapes. strict=False tolerates missing and unexpected keys, never shape mismatches.
    """
    where = f" {path_or_state}" if isinstance(path_or_state, (str, os.PathLike)) else ""
    obj = load_checkpoint_file(path_or_state) if where else path_or_state
    sd, source = extract_state_dict(obj)
    sd, dropped = to_mae_state_dict(sd)
    dropped = mmengine_dropped(obj) + dropped
    resized = resize_pos_embeds(sd, model, pos_embed)

    own = model.state_dict()
    decoder_fresh = not any(k in sd for k in own if not _is_encoder_key(k))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    problems = _fit_problems(own, sd, missing, unexpected, strict, decoder_fresh)
    if problems:
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"checkpoint{where} ({source}) does not fit model {name}: {problems}")

    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    report = LoadReport(source, missing, unexpected, dropped, resized, decoder_fresh, decoder_used)
    # a converted OpenMMLab file is always said: its origin and what of it was ignored
    warn = (decoder_fresh and decoder_used) or missing or source in SOURCES.values()
    (log.warning if warn else log.info)(report.summary())
    return report


def _fit_problems(own: StateDict, sd: StateDict, missing: list[str], unexpected: list[str],
                  strict: bool, decoder_fresh: bool) -> str:
    """'' when `sd` fits, else one line: missing / unexpected keys (a few + count), mismatched shapes."""
    problems = []
    if strict:
        fatal = [k for k in missing if not (decoder_fresh and not _is_encoder_key(k))]
        if fatal:
            problems.append(f"{len(fatal)} missing keys ({_preview(fatal)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        shown = ", ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:4])
        more = f" and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        problems.append(f"{len(mismatched)} shape mismatches ({shown}{more})")
    return "; ".join(problems)


def _is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES)


def _preview(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
