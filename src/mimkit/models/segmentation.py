"""UperNet on an MAE encoder, parameter for parameter as MMSegmentation's `mae-base_upernet` ADE20K model.

    seg = MAESegmenter(arch)      # arch: plain values (saved in configs), see `segmenter_arch`
    logits = seg(imgs)            # eval: (N, num_classes, H, W); train: (main, aux) at stride 4 and 16

Backbone: a timm VisionTransformer holding the MAE encoder (no final norm), taps after blocks `taps`
(MMSeg `out_indices`, [3, 5, 7, 11] for ViT-B), cls token dropped, tokens reshaped to (N, D, h, w); position
embeddings resized bicubically (no antialias, as MMSeg's `resize_pos_embed`) to any input, non-square too.
Neck: MMSeg `Feature2Pyramid` (x4, x2, x1, x0.5). Heads: MMSeg `UPerHead` (PPM 1-2-3-6 on the last level,
FPN, fused 3x3) and `FCNHead` (one 3x3 conv, no concat) on level 2; both end in dropout + 1x1 `conv_seg`.
Module names (`lateral_convs.0.conv`, `psp_modules.0.1.bn`, `conv_seg`) are MMSeg's.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mimkit.models.convert import interpolate_pos_embed

# MMSeg's ViT-B taps; other depths take the same fractions of the depth
VIT_B_TAPS = (3, 5, 7, 11)


def default_taps(depth: int) -> list[int]:
    """Blocks to tap for a `depth`-block encoder: [3, 5, 7, 11] at 12, [7, 11, 15, 23] at 24, scaled otherwise."""
    return [max(0, min(depth - 1, round((t + 1) * depth / 12) - 1)) for t in VIT_B_TAPS]


class ConvModule(nn.Sequential):
    """MMCV ConvModule: conv (no bias, a norm follows) + BatchNorm + ReLU, kaiming(fan_out) init."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class Feature2Pyramid(nn.Module):
    """ViT maps at stride p (4 of them) -> strides p/4, p/2, p, 2p (MMSeg rescales [4, 2, 1, 0.5])."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2), nn.BatchNorm2d(embed_dim), nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """4 x (N, D, h, w) -> [(N, D, 4h, 4w), (N, D, 2h, 2w), (N, D, h, w), (N, D, h/2, w/2)]."""
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(x) for op, x in zip(ops, inputs, strict=True)]


class DecodeHead(nn.Module):
    """MMSeg BaseDecodeHead's classifier: dropout, then a 1x1 conv_seg at normal(std 0.01) init."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, channels, h, w) -> logits (N, num_classes, h, w)."""
        return self.conv_seg(self.dropout(feat))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(DecodeHead):
    """MMSeg UPerHead: pyramid pooling on the last level, FPN top-down, all levels fused at stride 4."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last level (N, C, h, w) -> (N, channels, h, w): itself + pooled contexts, fused by a 3x3 conv."""
        outs = [x] + [_resize(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pyramid levels (fine to coarse) -> logits (N, num_classes, h0, w0) at the finest level."""
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """MMSeg FCNHead (num_convs 1, kernel 3, concat_input False): the auxiliary head."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> logits (N, num_classes, h, w)."""
        return self.cls_seg(self.convs(x))


def build_backbone(arch: dict, drop_path: float = 0.0) -> VisionTransformer:
    """timm ViT of the MAE encoder's shape: cls token, learnable positions, no final norm, no head."""
    return VisionTransformer(
        img_size=tuple(arch["img_size"]), patch_size=arch["patch_size"], in_chans=arch["in_chans"],
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"], qkv_bias=True, num_classes=0, global_pool="", final_norm=False,
        dynamic_img_size=True, norm_layer=partial(nn.LayerNorm, eps=arch.get("layer_norm_eps", 1e-6)),
        drop_path_rate=drop_path, init_values=arch.get("init_values"),  # layer scale: MMSeg's MAE backbone
    )


class MAESegmenter(nn.Module):
    """MMSeg EncoderDecoder: backbone taps -> Feature2Pyramid -> UPerHead (+ FCNHead on level 2 in training)."""

    def __init__(self, arch: dict, drop_path: float = 0.0) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.taps = list(arch["taps"])
        self.patch_size = int(arch["patch_size"])
        self.num_classes = int(arch["num_classes"])
        dim = int(arch["embed_dim"])
        self.backbone = build_backbone(arch, drop_path)
        self.neck = Feature2Pyramid(dim)
        self.decode_head = UPerHead([dim] * 4, arch["channels"], self.num_classes, arch["pool_scales"],
                                    arch["dropout"])
        self.auxiliary_head = FCNHead(dim, arch["aux_channels"], self.num_classes, arch["dropout"])

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings (biases and norms are caught by their 1-D shape)."""
        return {"backbone.cls_token", "backbone.pos_embed"}

    def extract_feat(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """imgs (N, C, H, W), H and W multiples of the patch -> 4 pyramid levels at strides p/4, p/2, p, 2p."""
        b = self.backbone
        x = b.patch_embed(imgs)  # (N, h, w, D): dynamic_img_size keeps the grid
        n, h, w, d = x.shape
        pos = interpolate_pos_embed(b.pos_embed, (h, w), 1, b.patch_embed.grid_size)
        x = torch.cat([b.cls_token.expand(n, -1, -1), x.reshape(n, h * w, d)], dim=1) + pos
        outs = {}
        for i, blk in enumerate(b.blocks[: max(self.taps) + 1]):
            x = blk(x)
            if i in self.taps:
                outs[i] = x[:, 1:].transpose(1, 2).reshape(n, d, h, w)
        return self.neck([outs[t] for t in self.taps])

    def forward(self, imgs: torch.Tensor):
        """Training: (main, aux) logits at strides p/4 and p; eval: main logits resized to (N, K, H, W)."""
        feats = self.extract_feat(imgs)
        main = self.decode_head(feats)
        if self.training:
            return main, self.auxiliary_head(feats[2])
        return _resize(main, imgs.shape[2:])


def segmenter_arch(encoder: nn.Module, img_size: Sequence[int], num_classes: int, taps: Sequence[int] | None,
                   channels: int, aux_channels: int, pool_scales: Sequence[int], dropout: float) -> dict:
    """Plain-value architecture of a segmenter on `encoder` (an MAE model); what checkpoints rebuild from."""
    depth = len(encoder.blocks)
    taps = list(taps) if taps else default_taps(depth)
    if any(not 0 <= t < depth for t in taps) or len(taps) != 4:
        from mimkit.errors import ConfigError

        raise ConfigError(f"bad value for --out_indices (model.taps): {taps}; give 4 block indices in "
                          f"[0, {depth - 1}] (the encoder has {depth} blocks)")
    blk = encoder.blocks[0]
    return dict(img_size=[int(s) for s in img_size], patch_size=int(encoder.patch_size),
                in_chans=int(encoder.in_chans), embed_dim=int(encoder.embed_dim), depth=depth,
                num_heads=int(blk.attn.num_heads), mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim,
                taps=taps, num_classes=int(num_classes), channels=int(channels), aux_channels=int(aux_channels),
                pool_scales=[int(s) for s in pool_scales], dropout=float(dropout),
                **({} if blk.norm1.eps == 1e-6 else {"layer_norm_eps": float(blk.norm1.eps)}),  # e.g. HF's 1e-12
                **({"init_values": float(getattr(encoder, "init_values", None) or 1.0)}
                   if hasattr(blk.ls1, "gamma") else {}))  # layer scale (MMSeg's MAE): its start value


def segmenter_from_encoder(encoder: nn.Module, arch: dict, drop_path: float = 0.0) -> MAESegmenter:
    """A segmenter whose backbone holds `encoder`'s weights (positions resized bicubically to arch img_size)."""
    model = MAESegmenter(arch, drop_path)
    src = encoder.encoder_state_dict() if hasattr(encoder, "encoder_state_dict") else encoder.state_dict()
    own = model.backbone.state_dict()
    sd = {k: v for k, v in src.items() if k in own}
    grid = model.backbone.patch_embed.grid_size
    old = getattr(encoder, "grid_size", None)
    sd["pos_embed"] = interpolate_pos_embed(src["pos_embed"], grid, 1, old)
    missing, _ = model.backbone.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"encoder weights do not fit the segmentation backbone: missing {missing[:5]}")
    return model
