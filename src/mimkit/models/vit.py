"""Shared ViT pieces: fixed 2-D sin-cos position embeddings, patchify, random masking, block stacks."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models.vision_transformer import Block


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: (M,) positions -> (M, embed_dim) [sin | cos] features, as the official MAE code."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding over an (H, W) patch grid: (H*W [+1], embed_dim), float32.

    Equal to the official ``get_2d_sincos_pos_embed`` for square grids; for a rectangular grid the
    first half of the channels encodes the column and the second half the row, as there.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = to_2tuple(grid_size)
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels (p, q, c) inside a patch."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Sequence[int], in_chans: int) -> torch.Tensor:
    """x: (N, L, p*p*C) -> imgs: (N, C, H, W) with L = gh * gw."""
    gh, gw = grid_size
    p, c = patch_size, in_chans
    if x.shape[1] != gh * gw or x.shape[2] != p * p * c:
        raise ValueError(f"expected patches of shape (N, {gh * gw}, {p * p * c}), got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, gh * p, gw * p)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (small noise is kept), as the official MAE.

    x: (N, L, D); noise: (N, L) or None (uniform noise is drawn).
    Returns x_kept (N, L_keep, D), mask (N, L) with 0 keep / 1 remove, ids_restore (N, L).
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape (N, L) = ({n}, {length}), got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)  # float32 as the official code, whatever x.dtype
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore


def make_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, norm_layer: type[nn.Module], drop_path: float = 0.0,
    init_values: float | None = None,
) -> nn.ModuleList:
    """timm transformer blocks (fused scaled-dot-product attention), drop path rising linearly to `drop_path`.

    init_values: None (the official MAE block: no layer scale, no `ls1` / `ls2` keys) or the starting value of a
    BEiT-style per-channel layer scale (`ls1.gamma`, `ls2.gamma`; MMSegmentation's MAE backbone `gamma_1/2`).
    """
    rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, drop_path=r, init_values=init_values)
        for r in rates
    )


def init_vit_weights_(module: nn.Module) -> None:
    """Official MAE init: xavier-uniform Linear with zero bias, LayerNorm to identity."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
