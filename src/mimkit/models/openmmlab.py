"""OpenMMLab layouts: mmpretrain MAE / ViT classifiers and MMSegmentation UperNet-on-MAE, to and from mimkit's.

    kind = openmmlab_kind(sd)                 # 'mmpretrain_mae' | 'mmpretrain_vit' | 'mmseg_upernet' | 'mmseg_mae'
    mae_sd, dropped = openmmlab_to_mae(sd)    # MAE layout (official names), for every command that takes an encoder
    seg_sd, arch = mmseg_to_segmenter(sd, meta)   # an MMSeg UperNet -> mimkit MAESegmenter state dict + arch
    mm_sd = segmenter_to_mmseg(seg_sd, arch)      # and back (`mimkit export --format mmseg`)

Names inside a transformer layer (mmpretrain `TransformerEncoderLayer`, MMSeg `BEiTTransformerEncoderLayer`):
``ln1 / ln2 -> norm1 / norm2``, ``ffn.layers.0.0 / ffn.layers.1 -> mlp.fc1 / mlp.fc2``, ``attn.qkv / attn.proj``
as they are, MMSeg's layer scale ``gamma_1 / gamma_2 -> ls1.gamma / ls2.gamma`` (mimkit's opt-in `init_values`),
BEiT's ``q_bias / v_bias -> attn.qkv.bias`` with a zero k part (a k bias adds the same number to every logit of a
query, so softmax ignores it: the attention is unchanged). MMSeg's MAE backbone always holds a relative position
bias table (initialised to zeros); an all-zero table is dropped (no effect), a trained one is refused in one line:
mimkit's ViT has no relative position bias.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import logging

import torch

from mimkit.errors import CheckpointError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# What each layout is called in load lines ("loaded an mmpretrain MAE (backbone + neck) checkpoint").
SOURCES = {
    "mmpretrain_mae": "mmpretrain MAE (backbone + neck)",
    "mmpretrain_vit": "mmpretrain ViT classifier (backbone + head)",
    "mmpretrain_backbone": "mmpretrain ViT backbone",
    "mmseg_upernet": "MMSegmentation UperNet on an MAE backbone",
    "mmseg_mae": "MMSegmentation MAE backbone",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_DEC_LAYER = re.compile(r"^decoder_blocks\.(\d+)\.(.+)$")
# inside a layer: OpenMMLab name -> timm Block name (mimkit's blocks)
_LAYER_PARTS = (("ln1.", "norm1."), ("ln2.", "norm2."), ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2."),
                ("attn.qkv.", "attn.qkv."), ("attn.proj.", "attn.proj."), ("gamma_1", "ls1.gamma"),
                ("gamma_2", "ls2.gamma"))
_TOP = {"cls_token": "cls_token", "pos_embed": "pos_embed", "patch_embed.projection.weight": "patch_embed.proj.weight",
        "patch_embed.projection.bias": "patch_embed.proj.bias", "ln1.weight": "norm.weight", "ln1.bias": "norm.bias"}
_NECK = {"mask_token": "mask_token", "decoder_pos_embed": "decoder_pos_embed", "ln1.weight": "decoder_norm.weight",
         "ln1.bias": "decoder_norm.bias", "decoder_embed.weight": "decoder_embed.weight",
         "decoder_embed.bias": "decoder_embed.bias", "decoder_pred.weight": "decoder_pred.weight",
         "decoder_pred.bias": "decoder_pred.bias"}
# MMSeg segmentor parts whose names mimkit's MAESegmenter already shares
SEG_HEADS = ("neck.", "decode_head.", "auxiliary_head.")
# mmengine's LayerNorm default (nn.LayerNorm's), which MMSeg's MAE backbone uses; mmpretrain's configs say 1e-6
MMSEG_LN_EPS = 1e-5
MMPRETRAIN_LN_EPS = 1e-6


def openmmlab_kind(sd: Mapping[str, Any]) -> Optional[str]:
    """The OpenMMLab layout of a state dict (see SOURCES), or None for any other layout."""
    keys = list(sd)
    if not any(k.startswith("backbone.layers.") for k in keys) or "backbone.patch_embed.projection.weight" not in sd:
        return None
    beit = any(k.endswith((".gamma_1", ".relative_position_bias_table", ".q_bias")) for k in keys)
    if any(k.startswith("decode_head.") for k in keys):
        return "mmseg_upernet"
    if beit:
        return "mmseg_mae"
    if any(k.startswith("neck.decoder_blocks.") for k in keys):
        return "mmpretrain_mae"
    if any(k.startswith("head.") for k in keys):
        return "mmpretrain_vit"
    return "mmpretrain_backbone"


def _layer_key(prefix: str, idx: str, part: str, sd: Mapping[str, torch.Tensor], key: str,
               out: StateDict, dropped: list[str]) -> bool:
    """Map one layer entry into `out` (True) or note it dropped; False for a name this layout does not have."""
    if part.startswith("attn.relative_position_bias_table"):
        if torch.count_nonzero(sd[key]):
            raise CheckpointError(
                f"{key}: this checkpoint has a trained relative position bias, which mimkit's ViT does not support "
                "(an MMSeg BEiT / MAE model fine-tuned with it); only absolute position embeddings load")
        dropped.append(f"{key} (all zeros: no effect)")
        return True
    if part == "attn.relative_position_index":
        dropped.append(key)
        return True
    if part in ("attn.q_bias", "attn.v_bias"):
        q, v = sd[key.rsplit(".", 1)[0] + ".q_bias"], sd[key.rsplit(".", 1)[0] + ".v_bias"]
        out[f"{prefix}.{idx}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        return True
    for old, new in _LAYER_PARTS:
        if part.startswith(old):
            out[f"{prefix}.{idx}.{new}{part[len(old):]}"] = sd[key]
            return True
    return False


def openmmlab_to_mae(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Any OpenMMLab layout above -> (MAE-layout state dict, dropped keys); names it cannot map are kept as they
    are, so a strict load lists them as unexpected. A segmentor's neck and heads, a classifier's head are dropped.

    mmpretrain's average-pooling classifier has no final `ln1` but an `ln2` after pooling: it stands in as `norm`.
    """
    out: StateDict = {}
    dropped: list[str] = []
    decoder = openmmlab_kind(sd) == "mmpretrain_mae"  # otherwise `neck.` is a segmentor's Feature2Pyramid
    has_ln1 = "backbone.ln1.weight" in sd
    for key, value in sd.items():
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            m = _LAYER.match(name)
            if m and _layer_key("blocks", m.group(1), m.group(2), sd, key, out, dropped):
                continue
            if name in _TOP:
                out[_TOP[name]] = value
                continue
            if name in ("ln2.weight", "ln2.bias") and not has_ln1:
                out["norm." + name.split(".")[1]] = value
                continue
        elif key.startswith("neck.") and decoder:
            name = key[len("neck."):]
            m = _DEC_LAYER.match(name)
            if m and _layer_key("decoder_blocks", m.group(1), m.group(2), sd, key, out, dropped):
                continue
            if name in _NECK:
                out[_NECK[name]] = value
                continue
        elif key.startswith(("head.", "data_preprocessor.") + SEG_HEADS):
            dropped.append(key)
            continue
        out[key] = value  # no mimkit name: kept as it is, so the load lists it (strict loading refuses it)
    return out, _summarise(dropped)


def _summarise(dropped: list[str]) -> list[str]:
    """Group dropped keys by what they are (one line for a whole head, not its 30 tensors)."""
    groups: dict[str, int] = {}
    other = []
    for k in dropped:
        head = next((p for p in ("head.",) + SEG_HEADS + ("data_preprocessor.",) if k.startswith(p)), None)
        if head:
            groups[head.rstrip(".")] = groups.get(head.rstrip("."), 0) + 1
        else:
            other.append(k)
    zero = [k for k in other if k.endswith("(all zeros: no effect)")]
    index = [k for k in other if k.endswith("relative_position_index")]
    rest = [k for k in other if k not in zero and k not in index]
    lines = [f"{name} ({n} tensors)" for name, n in groups.items()]
    if zero:
        lines.append(f"{len(zero)} relative position bias tables (all zeros: no effect)")
    if index:
        lines.append(f"{len(index)} relative position index buffers")
    return lines + rest


# ---------------------------------------------------------------------------------------------- sizes
# mmpretrain VisionTransformer's arch names -> (embed_dims, num_heads) (its arch_zoo; MAEViT inherits it). Widths
# and depths come from the tensors; a name only tells the heads (its 's' is 768 wide with 8 heads, not 12).
ARCH_HEADS = {**dict.fromkeys(("s", "small"), (768, 8)), **dict.fromkeys(("b", "base", "deit-b", "deit-base"),
              (768, 12)), **dict.fromkeys(("l", "large"), (1024, 16)), **dict.fromkeys(("h", "huge"), (1280, 16)),
              **dict.fromkeys(("eva-g", "eva-giant"), (1408, 16)), **dict.fromkeys(("deit-t", "deit-tiny"), (192, 3)),
              **dict.fromkeys(("deit-s", "deit-small", "dinov2-s", "dinov2-small"), (384, 6)),
              **dict.fromkeys(("dinov2-g", "dinov2-giant"), (1536, 24))}
# Heads of the standard widths (ViT-Ti/S/B/L/H); other widths: guess_heads
_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def saved_model_config(meta: Optional[Mapping]) -> dict:
    """The `model = dict(...)` of an mmengine file's saved config (meta['cfg'], mmseg 0.x's meta['config']: the
    config's Python text) as plain values, read with `ast` only: nothing in it is executed, and what is not a
    literal (a name, a call other than dict()) reads as None. {} when there is no readable config."""
    import ast

    text = (meta or {}).get("cfg") or (meta or {}).get("config")
    if not isinstance(text, str):
        return {}
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "model" for t in node.targets):
            value = _literal(node.value)
            return value if isinstance(value, dict) else {}
    return {}


def _literal(node: Any) -> Any:
    """A config expression's value: dict(k=v) / {k: v} / lists / tuples walked, everything else literal_eval'd."""
    import ast

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Dict):
        keys = [_literal(k) if k is not None else None for k in node.keys]
        return {k: _literal(v) for k, v in zip(keys, node.values) if isinstance(k, (str, int, float))}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def saved_architecture(meta: Optional[Mapping]) -> dict[str, Any]:
    """What the saved config says of the sizes: embed_dim, depth, num_heads (an mmpretrain `arch` name or dict, or
    MMSeg's backbone keywords), layer_norm_eps, the MAE neck's decoder_embed_dim / decoder_depth /
    decoder_num_heads, MMSeg's out_indices and pool_scales. Only the keys the config states."""
    model = saved_model_config(meta)
    bb = _dict(model.get("backbone"))
    arch = bb.get("arch")
    out: dict[str, Any] = {}
    if isinstance(arch, str) and arch.lower() in ARCH_HEADS:
        out["embed_dim"], out["num_heads"] = ARCH_HEADS[arch.lower()]
    else:
        src = _dict(arch) or bb
        for ours, theirs in (("embed_dim", "embed_dims"), ("depth", "num_layers"), ("num_heads", "num_heads")):
            if isinstance(src.get(theirs), int):
                out[ours] = src[theirs]
    eps = _dict(bb.get("norm_cfg")).get("eps")
    if isinstance(eps, float):
        out["layer_norm_eps"] = eps
    neck = _dict(model.get("neck"))
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if isinstance(neck.get(key), int):
            out[key] = neck[key]
    for key, part in (("out_indices", bb), ("pool_scales", _dict(model.get("decode_head")))):
        value = part.get(key)
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            out[key] = value
        elif isinstance(value, int):
            out[key] = [value]
    return out


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def guess_heads(width: int, decoder: bool = False) -> int:
    """Heads of a width the file does not state: the standard ViT-Ti/S/B/L/H counts, MAE's 16 for a 512 decoder,
    else the widest of 64 / 32 / 16-d heads (decoders 32 / 16-d) that divides the width, else 1."""
    if not decoder and width in _HEADS:
        return _HEADS[width]
    if decoder and width == 512:
        return 16
    return next((width // d for d in ((32, 16) if decoder else (64, 32, 16)) if width % d == 0), 1)


class Guess(dict):
    """Sizes taken from the width alone ({'num_heads': 3, 'decoder_num_heads': 2}), with why and the widths."""

    def __init__(self, why: str, widths: dict[str, int]) -> None:
        super().__init__()
        self.why, self.widths = why, widths

    def line(self, way: Optional[str] = None) -> str:
        """The one line that says the guess and the way to state the heads (`way`: the command's own)."""
        parts = []
        for key, n in self.items():
            width = self.widths[key]
            parts.append(f"{'decoder ' if key.startswith('decoder') else ''}{_n_heads(n)} for width {width} "
                         f"({width // n}-d heads)")
        width = self.widths["embed_dim"]  # --model names the encoder's width
        way = (way or HEADS_WAY.get() or ("set " + " / ".join(f"model.kwargs.{k}=N" for k in self))).format(
            width=width)
        return (f"the checkpoint does not say its number of heads ({self.why}): assuming {', '.join(parts)}; "
                f"if wrong, {way}")


# How the command at hand lets a user state the heads (set by the command layer: a model knows no flags).
HEADS_WAY: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("heads_way", default=None)


@contextlib.contextmanager
def heads_way(way: Optional[str]):
    """Within: a guessed head count names `way` as its fix, and each guess is said afresh once (one run)."""
    token = HEADS_WAY.set(way)
    said = set(_SAID)
    _SAID.clear()
    try:
        yield
    finally:
        HEADS_WAY.reset(token)
        _SAID.clear()
        _SAID.update(said)


def mae_sizes(mae_sd: Mapping[str, torch.Tensor], kind: str, meta: Optional[Mapping] = None
              ) -> tuple[dict[str, Any], Optional[Guess]]:
    """(MaskedAutoencoderViT arguments, the guess or None) for a converted OpenMMLab state dict: sizes from the
    tensors' shapes, heads (and LayerNorm eps, decoder heads) from the mmengine file's saved config
    (saved_architecture) when it has one; otherwise guessed from the width (guess_heads), which the caller says
    (say_guess) once it knows the user stated no heads."""
    saved = saved_architecture(meta)
    width = mae_sd["cls_token"].shape[-1]
    why = ("its saved config describes other sizes than its weights" if saved.get("embed_dim", width) != width
           else "no saved config in meta['cfg'] states them")
    guess = Guess(why, {"embed_dim": width})
    heads = saved.get("num_heads") if saved.get("embed_dim", width) == width else None
    if heads is None:
        heads = guess["num_heads"] = guess_heads(width)
        guess.widths["num_heads"] = width
    patch = mae_sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in mae_sd if k.startswith("blocks."))
    tokens = mae_sd["pos_embed"].shape[1] - 1
    side = math.isqrt(tokens)
    kw: dict[str, Any] = dict(
        patch_size=patch, in_chans=mae_sd["patch_embed.proj.weight"].shape[1], embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=mae_sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        layer_norm_eps=saved.get("layer_norm_eps") or (MMSEG_LN_EPS if kind.startswith("mmseg")
                                                       else MMPRETRAIN_LN_EPS),
    )
    if side * side == tokens:
        kw["img_size"] = side * patch
    if "blocks.0.ls1.gamma" in mae_sd:
        kw["init_values"] = 1.0  # the start value; the checkpoint's gammas replace it
    if "decoder_embed.weight" in mae_sd:
        dec = mae_sd["decoder_embed.weight"].shape[0]
        dec_heads = saved.get("decoder_num_heads") if saved.get("decoder_embed_dim", dec) == dec else None
        if dec_heads is None:
            dec_heads = guess["decoder_num_heads"] = guess_heads(dec, decoder=True)
            guess.widths["decoder_num_heads"] = dec
        kw.update(decoder_embed_dim=dec,
                  decoder_depth=1 + max(int(k.split(".")[1]) for k in mae_sd if k.startswith("decoder_blocks.")),
                  decoder_num_heads=dec_heads)
    return kw, (guess or None)


def say_guess(guess: Optional[Guess], stated: Mapping[str, Any] = {}) -> None:
    """Say (once per run, as a warning: console and the run's log.txt) the heads guessed that `stated` (the
    user's own keys) does not replace."""
    if guess is None:
        return
    left = Guess(guess.why, guess.widths)
    left.update({k: v for k, v in guess.items() if stated.get(k) is None})
    if left:
        _say_once(left.line())


def mae_kwargs(mae_sd: Mapping[str, torch.Tensor], kind: str, meta: Optional[Mapping] = None) -> dict[str, Any]:
    """mae_sizes' arguments, the guess said at once (for a caller with no way of its own to state heads)."""
    kw, guess = mae_sizes(mae_sd, kind, meta)
    say_guess(guess)
    return kw


def _n_heads(n: int) -> str:
    return f"{n} head{'s' if n != 1 else ''}"


_SAID: set[str] = set()  # guesses said already: a command reads a checkpoint's sizes more than once


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        log.warning(line)


# ---------------------------------------------------------------------------------------------- segmentation
def mmseg_to_segmenter(sd: Mapping[str, torch.Tensor], meta: Optional[Mapping] = None
                       ) -> tuple[StateDict, dict, list[str]]:
    """An MMSeg EncoderDecoder (MAE backbone, Feature2Pyramid, UPerHead, FCNHead) state dict -> (mimkit
    MAESegmenter state dict, its arch, notes). Taps (`out_indices`) and pool scales come from the file's saved
    config when it has one; taps are None otherwise (the caller takes MMSeg's defaults for the depth:
    models.segmentation.default_taps, which imports this module's importer)."""
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    enc, notes = openmmlab_to_mae(backbone)
    kw = mae_kwargs(enc, "mmseg_upernet", meta)
    saved = saved_architecture(meta)
    if "norm.weight" in enc:  # final_norm=True: a norm mimkit's segmentation backbone does not have
        raise CheckpointError("this MMSeg MAE backbone has final_norm=True (backbone.ln1), which mimkit's "
                              "segmenter does not have")
    out: StateDict = {f"backbone.{k}": v for k, v in enc.items()}
    out.update({k: v for k, v in sd.items() if k.startswith(SEG_HEADS)})
    missing = [p for p in ("decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight") if p not in sd]
    if missing:
        raise CheckpointError(f"not an MMSeg UperNet with an auxiliary FCN head: no {', '.join(missing)}")
    n_pool = len({k.split(".")[2] for k in sd if k.startswith("decode_head.psp_modules.")})
    pools = saved.get("pool_scales") or [1, 2, 3, 6][:n_pool]
    taps = saved.get("out_indices")
    arch = dict(img_size=[kw["img_size"]] * 2, patch_size=kw["patch_size"], in_chans=kw["in_chans"],
                embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                taps=taps, num_classes=int(sd["decode_head.conv_seg.weight"].shape[0]),
                channels=int(sd["decode_head.conv_seg.weight"].shape[1]),
                aux_channels=int(sd["auxiliary_head.conv_seg.weight"].shape[1]), pool_scales=pools, dropout=0.1,
                layer_norm_eps=kw["layer_norm_eps"], **({"init_values": 1.0} if "init_values" in kw else {}))
    return out, arch, notes


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """MMSeg BEiTAttention's `relative_position_index` buffer for a (Wh, Ww) patch grid: (Wh*Ww+1, Wh*Ww+1)."""
    wh, ww = grid
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = torch.zeros((wh * ww + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def segmenter_to_mmseg(sd: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> StateDict:
    """A mimkit MAESegmenter state dict -> MMSeg's (MAE backbone names; neck and heads unchanged).

    MMSeg's MAE layer always has layer scale and a relative position bias table: a mimkit backbone without layer
    scale gets gammas of 1 and every table is zeros, which leaves the function unchanged."""
    inv = [(new, old) for old, new in _LAYER_PARTS]
    top = {v: k for k, v in _TOP.items()}
    out: StateDict = {}
    grid = (arch["img_size"][0] // arch["patch_size"], arch["img_size"][1] // arch["patch_size"])
    heads, width = int(arch["num_heads"]), int(arch["embed_dim"])
    for key, value in sd.items():
        if not key.startswith("backbone."):
            out[key] = value
            continue
        name = key[len("backbone."):]
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if m:
            part = next((old + m.group(2)[len(new):] for new, old in inv if m.group(2).startswith(new)), None)
            if part is None:
                raise CheckpointError(f"no MMSeg name for segmenter key '{key}'")
            out[f"backbone.layers.{m.group(1)}.{part}"] = value
        elif name in top:
            out[f"backbone.{top[name]}"] = value
        else:
            raise CheckpointError(f"no MMSeg name for segmenter key '{key}'")
    for i in range(int(arch["depth"])):
        stem = f"backbone.layers.{i}"
        out.setdefault(f"{stem}.gamma_1", torch.ones(width))
        out.setdefault(f"{stem}.gamma_2", torch.ones(width))
        out[f"{stem}.attn.relative_position_bias_table"] = torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3,
                                                                       heads)
        out[f"{stem}.attn.relative_position_index"] = relative_position_index(grid)
    return out
