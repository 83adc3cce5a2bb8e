"""LocalMIM for ViT (Wang et al., CVPR 2023): multi-scale local HOG reconstruction from four encoder taps.

The state-dict layout is the reference LocalMIM code's (github.com/Haoqing-Wang/LocalMIM, ViT/models_mim.py),
so its released pretraining checkpoints load strictly:
    patch_embed.*, cls_token, pos_embed, blocks.*   the ViT encoder, as in MAE
    norm.{k}.*                                      one LayerNorm per tap (norm.3 is the encoder's final norm)
    decoder.{k}.{embed,mask_token,pos_embed,blocks,norm,pred}.*   one light decoder + scale head per tap
    hog_enc.{k}.conv.weight [, .bias]               the fixed HOG gradient kernels (frozen)
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from mimkit.models import vit
from mimkit.models.hog import HOGLayer, check_nbins
from mimkit.models.mae import FIXED_PARAMS, LOSS_MODES, MaskedAutoencoderViT
from mimkit.models.register import register_alias, register_model

SCALES = (4.0, 2.0, 1.0, 0.5)
# The MAE pixel decoder the parent constructor builds; LocalMIM replaces it with one decoder per tap.
_MAE_DECODER_ATTRS = (
    "decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred",
)


def default_taps(depth: int) -> list[int]:
    """Blocks (0-based) whose outputs feed the decoders: [1, 3, depth-3, depth-1] (ViT-B: 1, 3, 9, 11)."""
    return [1, 3, depth - 3, depth - 1]


class ContiguousLayerNorm2d(LayerNorm2d):
    """timm's LayerNorm2d (same `weight`, `bias`) whose output (N, C, H, W) is contiguous, not channels-last.

    timm's normalises over a permuted view and permutes back, so its output has channels-last strides; the
    ConvTranspose2d and 1x1 Conv2d after it follow that memory format and their weight gradients come out
    channels-last, which DDP's contiguous gradient buckets copy every step ("Grad strides do not match").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> normalised over C, (N, C, H, W) contiguous."""
        return super().forward(x).contiguous()


def scale_head(dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """(N, dim, h, w) token grid -> (N, out_dim, h*scale, w*scale); module indices as the reference `pred`."""
    if scale == 4.0:
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            ContiguousLayerNorm2d(dim // 2, eps=1e-6),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        ]
        hidden = dim // 4
    elif scale == 2.0:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
    elif scale == 1.0:
        layers, hidden = [], dim
    elif scale == 0.5:
        layers, hidden = [nn.AvgPool2d(kernel_size=2, stride=2)], dim
    else:
        raise ValueError(f"unsupported LocalMIM scale {scale}; choose from {SCALES}")
    layers.append(nn.Conv2d(hidden, out_dim, kernel_size=1))
    return nn.Sequential(*layers)


def mask_at_scale(mask: torch.Tensor, grid_size: Sequence[int], scale: float) -> torch.Tensor:
    """Patch mask (N, gh*gw), 1 = removed -> loss weights (N, gh*s * gw*s) for the cells of scale s.

    s >= 1: every patch's value is copied to its s x s sub-cells (nearest upsampling);
    s < 1: each cell averages its (1/s) x (1/s) patches, giving fractional weights in [0, 1].
    """
    n = mask.shape[0]
    gh, gw = grid_size
    grid = mask.reshape(n, 1, gh, gw)
    if scale >= 1:
        s = int(scale)
        grid = grid.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    else:
        k = int(round(1 / scale))
        grid = F.avg_pool2d(grid, k, stride=k)
    return grid.reshape(n, -1)


def localmim_to_mae_encoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LocalMIM state dict (this model's or a reference checkpoint's 'model') -> MAE / timm encoder keys.

    norm.3, the LayerNorm after the last block, becomes `norm`; norm.0-2, decoder.* and hog_enc.* are dropped.
    """
    last = len(SCALES) - 1
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("patch_embed.", "blocks.")) or k in ("cls_token", "pos_embed"):
            out[k] = v
        elif k.startswith(f"norm.{last}."):
            out["norm." + k.rsplit(".", 1)[1]] = v
    return out


class LocalMIMDecoder(nn.Module):
    """A light MAE-style decoder (linear, mask tokens, sin-cos pos, blocks, LayerNorm) and a scale head."""

    def __init__(
        self,
        in_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        scale: float,
        embed_dim: int = 256,
        depth: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.scale = scale
        num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(in_dim, embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = vit.make_blocks(embed_dim, depth, num_heads, mlp_ratio, norm_layer)
        self.norm = norm_layer(embed_dim)
        self.pred = scale_head(embed_dim, out_dim, scale)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Fixed sin-cos positions, N(0, .02) mask token, xavier Linear; convs keep PyTorch's init."""
        pos = vit.sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, cls_token=True)
        self.pos_embed.data.copy_(pos[None])
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(vit.init_vit_weights_)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: visible tokens (N, 1+L_keep, D), ids_restore (N, L) -> pred (N, gh*s * gw*s, out_dim)."""
        x = self.embed(x)
        n, d = x.shape[0], x.shape[2]
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        gh, gw = self.grid_size
        # drop cls, tokens -> (N, D, gh, gw); contiguous: a channels-last view would give the 1x1 conv's weight a
        # channels-last gradient, which DDP's gradient buckets copy every step ("Grad strides do not match")
        x = x[:, 1:].transpose(1, 2).reshape(n, d, gh, gw).contiguous()
        return self.pred(x).flatten(2).transpose(1, 2)


class LocalMIMViT(MaskedAutoencoderViT):
    """LocalMIM: a ViT whose outputs after blocks [1, 3, depth-3, depth-1] each reconstruct HOG at one scale.

    Tap k (own LayerNorm) feeds decoder k, which predicts HOG over cells of patch_size / scale_k pixels for
    scales [4, 2, 1, 0.5] (ViT-B/16 at 224: 56^2, 28^2, 14^2, 7^2 cells of 3*hog_nbins values). One random
    patch mask per image is shared by all scales; the loss is the plain sum over scales of the masked MSE.
    The encoder (patch_embed, cls_token, pos_embed, blocks, norm.3 as the final norm) is an MAE encoder.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 1,
        decoder_num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        hog_nbins: int = 9,
        hog_bias: bool = False,
        drop_path: float = 0.0,
        norm_pix_loss: bool = False,
    ) -> None:
        check_nbins(hog_nbins)
        # accepted so that one pretrain recipe builds MAE and LocalMIM alike; only False makes sense here
        if norm_pix_loss:
            raise ValueError("norm_pix_loss does not apply to LocalMIM: its targets are HOG features")
        if depth < 4:
            raise ValueError(f"LocalMIM taps [1, 3, depth-3, depth-1]; depth must be >= 4, got {depth}")
        if patch_size % 4:
            raise ValueError(f"LocalMIM's x4 scale needs patch_size divisible by 4, got {patch_size}")
        # The parent builds and initialises the encoder with the reference's init rules (its random stream
        # differs: the parent also draws for its own decoder); that MAE pixel decoder is dropped right after
        # (decoder_depth=0 keeps it cheap).
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=0,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer,
            norm_pix_loss=False, drop_path=drop_path,
        )
        for name in _MAE_DECODER_ATTRS:
            delattr(self, name)
        if self.grid_size[0] % 2 or self.grid_size[1] % 2:
            raise ValueError(f"LocalMIM's x0.5 scale needs an even patch grid, got {self.grid_size}")
        self.hog_nbins = hog_nbins
        self.hog_bias = bool(hog_bias)
        self.taps = default_taps(depth)
        self.scales = list(SCALES)
        self.norm = nn.ModuleList(norm_layer(embed_dim) for _ in self.taps)
        target_dim = in_chans * hog_nbins
        self.decoder = nn.ModuleList(
            LocalMIMDecoder(embed_dim, self.grid_size, target_dim, s, decoder_embed_dim, decoder_depth,
                            decoder_num_heads, mlp_ratio, norm_layer)
            for s in self.scales
        )
        # HOG cell of scale s covers patch_size / s pixels: 4, 8, 16, 32 for patch 16 (the reference's pools).
        self.hog_enc = nn.ModuleList(
            HOGLayer(hog_nbins, int(self.patch_size / s), bias=self.hog_bias) for s in self.scales
        )

    def decoder_blocks_list(self) -> list[nn.Module]:
        """Every tap's decoder blocks."""
        return [blk for dec in self.decoder for blk in dec.blocks]

    # ------------------------------------------------------------------ encoder
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> latents [4 x (N, 1+L_keep, D)], mask (N, L), ids_restore (N, L)."""
        x, mask, ids_restore = self.embed(imgs, mask_ratio, noise)
        distinct = sorted(set(self.taps))  # taps repeat for depth < 7; each block output is kept once
        _, outs = self.run_blocks(x, taps=distinct)
        # A tapped block output has two readers (the next block through a view: run_blocks; the taps through one
        # view here), a repeated tap a chain of views: no tensor has more than two readers, so its gradient is
        # the same sum in any order (a + b == b + a; three terms are not). FSDP2 puts a node of its own before
        # every block's input, which regrouped the three terms of a tap read twice at depth < 7 (the next block's
        # residual and attention, and the tap): the gradients (and through Adam the zero-gradient key biases)
        # drifted from DDP's by 1e-5 in five steps; now they are bitwise DDP's.
        by_block = {t: o.view_as(o) for t, o in zip(distinct, outs)}
        latents = []
        for norm, t in zip(self.norm, self.taps):
            x = by_block[t]
            by_block[t] = x.view_as(x)
            latents.append(norm(x))
        return latents, mask, ids_restore

    def forward_features(
        self, imgs: torch.Tensor, layers: Sequence[int] = ()
    ) -> torch.Tensor | list[torch.Tensor]:
        """Unmasked encoder as MAE's: imgs (N, C, H, W) -> tokens (N, 1+L, D) after the last block and norm.3.

        With `layers`, returns the raw outputs (N, 1+L, D) after those blocks instead (for dense heads).
        """
        if layers:
            return super().forward_features(imgs, layers)
        (last,) = super().forward_features(imgs, layers=(self.depth - 1,))
        return self.norm[-1](last)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder alone in MAE / timm ViT naming (patch_embed, cls_token, pos_embed, blocks, norm).

        norm.3 (the LayerNorm after the last block) becomes `norm`; the other tap norms, the decoders and
        the HOG layers are dropped. Loads strictly into a timm VisionTransformer(num_classes=0) of the
        same size, or into the encoder keys of MaskedAutoencoderViT. Tensors share storage with the model.
        """
        return localmim_to_mae_encoder(self.state_dict())

    # ------------------------------------------------------------------ decoders, targets, loss
    def forward_decoder(
        self, latents: Sequence[torch.Tensor], ids_restore: torch.Tensor
    ) -> list[torch.Tensor]:
        """latents [4 x (N, 1+L_keep, D)], ids_restore (N, L) -> preds [(N, L_k, C*nbins)], L_k = L*s_k^2."""
        return [dec(z, ids_restore) for dec, z in zip(self.decoder, latents)]

    def target(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """HOG targets per scale: imgs (N, C, H, W) -> float32 [(N, L_k, C*nbins)], cells row-major."""
        return [hog(imgs).flatten(2).transpose(1, 2) for hog in self.hog_enc]

    def loss_weights(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Patch mask (N, L), 1 = removed -> per-scale cell weights [(N, L_k)] (see mask_at_scale)."""
        return [mask_at_scale(mask, self.grid_size, s) for s in self.scales]

    def forward_loss(
        self,
        imgs: torch.Tensor,
        preds: Sequence[torch.Tensor],
        mask: torch.Tensor,
        loss_mode: str = "masked_only",
    ) -> torch.Tensor:
        """Sum over scales of the per-cell MSE, weighted by each cell's masked share or plain."""
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        loss = torch.zeros((), device=imgs.device)
        for pred, tgt, w in zip(preds, self.target(imgs), self.loss_weights(mask)):
            per_cell = ((pred.float() - tgt) ** 2).mean(dim=-1)  # (N, L_k)
            if loss_mode == "all_pixels":
                loss = loss + per_cell.mean()
            else:
                # a mask ratio of 0 gives weight 0 everywhere: loss 0 rather than 0/0
                loss = loss + (per_cell * w).sum() / w.sum().clamp_min(1e-12)
        return loss

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        loss_mode: str = "masked_only",
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """imgs (N, C, H, W) -> (loss, preds, mask (N, L) with 1 = removed).

        preds is a list over scales [4, 2, 1, 0.5] of HOG predictions (N, L_k, C*hog_nbins), L_k = L * s_k^2
        cells in row-major order (ViT-B/16 at 224: 3136, 784, 196, 49), comparable with `target(imgs)`.
        """
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode '{loss_mode}'; choose one of {', '.join(LOSS_MODES)}")
        latents, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        preds = self.forward_decoder(latents, ids_restore)
        loss = self.forward_loss(imgs, preds, mask, loss_mode)
        # each pred is a transposed view: copies, as MAE's forward (FSDP2 warns of a model output that is a view)
        return loss, [p.clone() for p in preds], mask

    # ------------------------------------------------------------------ freezing API
    def is_fixed_param(self, name: str) -> bool:
        """True for parameters that never train: the sin-cos position embeddings and the HOG kernels."""
        return name in FIXED_PARAMS or name.endswith(".pos_embed") or name.startswith("hog_enc.")

    def _set_trainable(self, predicate: Callable[[str, nn.Parameter], bool]) -> None:
        # The parent knows only its own two fixed names; here each decoder's pos_embed and the HOG stay fixed.
        for name, p in self.named_parameters():
            p.requires_grad_(not self.is_fixed_param(name) and predicate(name, p))

    def param_group_of(self, name: str) -> str:
        """Reporting group, e.g. 'encoder.blocks.attn', 'decoder.pred', 'fixed.hog'; decoders pooled."""
        if name.startswith("hog_enc."):
            return "fixed.hog"
        if name.startswith("decoder."):
            # decoder.{k}.blocks.0.norm1.weight -> the parent's decoder_blocks.0.norm1.weight naming
            return super().param_group_of("decoder_" + name.split(".", 2)[2])
        return super().param_group_of(name)


# ---------------------------------------------------------------------- registered builders
LOCALMIM_OPTIONS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
    "decoder_depth", "decoder_num_heads", "mlp_ratio", "drop_path", "hog_nbins", "hog_bias", "norm_pix_loss",
)


def _localmim(defaults: dict, overrides: dict) -> LocalMIMViT:
    return LocalMIMViT(**{**defaults, **overrides})


def _preset(fn):
    fn.accepts = LOCALMIM_OPTIONS
    return register_model(fn)


@_preset
def localmim_vit_tiny_patch16(**kw) -> LocalMIMViT:
    """ViT-Ti/16 encoder (192-d, 12 blocks, 3 heads); four 128-d, 1-block, 4-head decoders: fits a CPU."""
    return _localmim(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                          decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4), kw)


@_preset
def localmim_vit_small_patch16(**kw) -> LocalMIMViT:
    """ViT-S/16 encoder (384-d, 12 blocks, 6 heads); four 256-d, 1-block, 8-head decoders."""
    return _localmim(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kw)


@_preset
def localmim_vit_base_patch16(**kw) -> LocalMIMViT:
    """ViT-B/16 encoder; four 256-d, 1-block, 8-head decoders (LocalMIM paper)."""
    return _localmim(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kw)


@_preset
def localmim_vit_large_patch16(**kw) -> LocalMIMViT:
    """ViT-L/16 encoder; four 256-d, 1-block, 8-head decoders (LocalMIM paper)."""
    return _localmim(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kw)


# the reference repository's names (seed 002 trains MIM_vit_base_patch16)
register_alias("MIM_vit_base_patch16", "localmim_vit_base_patch16")
register_alias("MIM_vit_large_patch16", "localmim_vit_large_patch16")
