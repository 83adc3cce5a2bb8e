"""Classification on top of an MAE encoder: the official linear probe and the fine-tuning ViT classifier.

    probe = LinearProbe(mae, num_classes, global_pool=False)       # frozen encoder, BN(affine=False) + Linear
    clf = vit_classifier(mae, num_classes, global_pool=True, drop_path=0.1)   # timm VisionTransformer

Both follow facebookresearch/mae (`main_linprobe.py`, `main_finetune.py`, `models_vit.py`): global pooling
is the mean of the patch tokens after the last block, then `fc_norm`; the cls token is taken after `norm`.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from mimkit.models.convert import mae_to_timm_vit


def pooled_features(encoder: nn.Module, imgs: torch.Tensor, global_pool: bool) -> torch.Tensor:
    """imgs (N, C, H, W) -> (N, D) as the official linear probe: cls after norm, or fc_norm(mean of patches).

    The probe's fc_norm is frozen at its initial value (weight 1, bias 0), so it is a plain layer norm here.
    """
    if not global_pool:
        return encoder.forward_features(imgs)[:, 0]
    (last,) = encoder.forward_features(imgs, layers=(encoder.depth - 1,))
    pooled = last[:, 1:].mean(dim=1)
    return F.layer_norm(pooled, pooled.shape[-1:], eps=encoder.blocks[0].norm1.eps)  # the encoder's eps


class LinearProbe(nn.Module):
    """Frozen MAE encoder + BatchNorm1d(affine=False, eps=1e-6) + Linear: the official linear probe."""

    def __init__(self, encoder: nn.Module, num_classes: int, global_pool: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.global_pool = global_pool
        dim = encoder.embed_dim
        linear = nn.Linear(dim, num_classes)
        trunc_normal_(linear.weight, std=0.01)  # MoCo v3's init, as the official probe
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        # The decoder takes no part in the probe: its checkpoints leave it out (a loader of encoders then finds
        # the encoder alone), and loading one fills it from the model as built.
        self._register_state_dict_hook(_drop_unused_encoder_keys)
        self.register_load_state_dict_pre_hook(_keep_unused_encoder_keys)

    def train(self, mode: bool = True) -> "LinearProbe":
        """Only the head changes mode: the frozen encoder stays in eval (no drop path, bitwise unchanged)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def patch_embed(self) -> nn.Module:
        """The encoder's patch embedding (its img_size and channels, as a timm ViT classifier exposes them)."""
        return self.encoder.patch_embed

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) -> pooled frozen features (N, D)."""
        with torch.no_grad():
            return pooled_features(self.encoder, imgs, self.global_pool)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W), or already pooled features (N, D) from a cache -> logits (N, num_classes)."""
        return self.head(imgs if imgs.ndim == 2 else self.features(imgs))


def _unused(module: LinearProbe, key: str) -> bool:
    """Is `key` (a LinearProbe state-dict key) an encoder parameter the probe never uses (the MAE decoder)?"""
    is_enc = getattr(module.encoder, "is_encoder_param", None)
    return key.startswith("encoder.") and is_enc is not None and not is_enc(key[len("encoder."):])


def _drop_unused_encoder_keys(module: LinearProbe, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix) and _unused(module, k[len(prefix):])]:
        del state[key]


def _keep_unused_encoder_keys(module: LinearProbe, state: dict, prefix: str, *args) -> None:
    own = module.encoder.state_dict(prefix="encoder.")
    for key, value in own.items():
        if _unused(module, key) and prefix + key not in state:
            state[prefix + key] = value


def probe_as_vit(probe: LinearProbe) -> VisionTransformer:
    """The probe as a plain timm VisionTransformer classifier (eval): the frozen encoder's weights, and the
    eval-mode BatchNorm (affine=False) folded into the Linear head, so ONNX / timm / torch.export take it.

    (x - mean) / sqrt(var + eps) then W x + b  ==  (W / s) x + (b - (W / s) mean), s = sqrt(var + eps).
    """
    enc = probe.encoder
    bn, linear = probe.head[0], probe.head[1]
    vit = vit_classifier_like(enc, linear.out_features, probe.global_pool)
    sd = mae_to_timm_vit(_encoder_state_dict(enc))
    if probe.global_pool:  # the probe pools the last block's patch tokens, then a fresh (identity) layer norm
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        sd.update({"fc_norm.weight": torch.ones(enc.embed_dim), "fc_norm.bias": torch.zeros(enc.embed_dim)})
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    weight = linear.weight.double() * scale[None]
    sd["head.weight"] = weight.float()
    sd["head.bias"] = (linear.bias.double() - weight @ bn.running_mean.double()).float()
    vit.load_state_dict(sd, strict=True)
    return vit.eval()


def vit_arch(encoder: nn.Module, num_classes: int, global_pool: bool = True,
             img_size: Optional[tuple[int, int]] = None) -> dict:
    """timm VisionTransformer arguments (plain values, saved in fine-tuning configs) for the encoder's shape."""
    blk = encoder.blocks[0]
    return dict(
        img_size=list(img_size or encoder.img_size), patch_size=encoder.patch_size, in_chans=encoder.in_chans,
        num_classes=num_classes, global_pool="avg" if global_pool else "token", embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim,
        **_eps_arg(getattr(blk, "norm1", None)),
    )


def _eps_arg(norm: Optional[nn.Module]) -> dict:
    """{'layer_norm_eps': eps} when the encoder's LayerNorms use another eps than the official 1e-6, else {}."""
    eps = getattr(norm, "eps", 1e-6)
    return {} if eps == 1e-6 else {"layer_norm_eps": float(eps)}


def vit_from_arch(arch: dict, drop_path: float = 0.0) -> VisionTransformer:
    """An untrained timm VisionTransformer (qkv bias, LayerNorm eps 1e-6 unless arch says layer_norm_eps: the
    official models_vit layout)."""
    arch = {**arch, "img_size": tuple(arch["img_size"])}
    arch.pop("source_encoder", None)  # the MAE the encoder came from: a record, not a timm argument
    eps = arch.pop("layer_norm_eps", 1e-6)
    return VisionTransformer(**arch, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=eps),
                             drop_path_rate=drop_path)


def vit_classifier_like(encoder: nn.Module, num_classes: int, global_pool: bool = True, drop_path: float = 0.0,
                        img_size: Optional[tuple[int, int]] = None) -> VisionTransformer:
    """An untrained timm VisionTransformer with the encoder's architecture."""
    return vit_from_arch(vit_arch(encoder, num_classes, global_pool, img_size), drop_path)


def vit_classifier(encoder: nn.Module, num_classes: int, global_pool: bool = True,
                   drop_path: float = 0.0) -> VisionTransformer:
    """timm ViT classifier holding the encoder's weights, as main_finetune.py builds it.

    Global pool: the encoder's final norm is dropped and fc_norm starts fresh (weight 1, bias 0); cls token:
    norm is kept. The head starts at trunc_normal(std=2e-5), zero bias. Position embeddings become trainable.
    """
    model = vit_classifier_like(encoder, num_classes, global_pool, drop_path)
    sd = mae_to_timm_vit(_encoder_state_dict(encoder))
    if global_pool:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    expected = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    if set(missing) != expected or unexpected:  # same guard as the official assert, as an error that says why
        raise RuntimeError(f"encoder weights do not fit the classifier: missing {missing}, unexpected {unexpected}")
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def _encoder_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    # LocalMIM keeps its final norm as norm.3; its encoder_state_dict gives MAE names.
    if hasattr(encoder, "encoder_state_dict"):
        return encoder.encoder_state_dict()
    return encoder.state_dict()
