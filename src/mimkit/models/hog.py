"""HOG targets for LocalMIM: per-channel Sobel gradients, hard orientation bins, cell pooling, L2 per cell."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sobel kernel of the horizontal derivative, as a cross-correlation: left column minus right column.
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def check_nbins(nbins: int) -> int:
    """Return `nbins` as an int, or raise ValueError naming hog_nbins when it is not a positive integer."""
    if isinstance(nbins, bool) or not isinstance(nbins, int) or nbins < 1:
        raise ValueError(f"hog_nbins must be a positive integer (e.g. 9), got {nbins!r}")
    return nbins


class HOGLayer(nn.Module):
    """Histogram of oriented gradients over square cells, computed for every input channel separately.

    For each channel: a 3x3 Sobel pair with reflect padding gives (gx, gy) at every pixel; the pixel adds
    its magnitude sqrt(gx^2 + gy^2) to one of `nbins` orientation bins over 180 degrees
    (bin = floor(atan2(gx, gy) / pi * nbins) mod nbins, unsigned, no interpolation); the per-pixel
    histograms are averaged over `pool` x `pool` cells and each cell's histogram is L2-normalised.
    With `bias`, the gradient convolution carries a fixed random bias (nn.Conv2d's default init), as in
    the reference with --hog_bias. The kernel (and bias) are frozen parameters under `conv`, so the
    state-dict keys are `conv.weight` (and `conv.bias`) as in the reference LocalMIM code.
    """

    def __init__(self, nbins: int = 9, pool: int = 8, bias: bool = False) -> None:
        super().__init__()
        self.nbins = check_nbins(nbins)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"HOG cell size must be a positive integer, got {pool!r}")
        self.pool = pool
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=bias)
        sobel_x = torch.tensor(SOBEL_X)
        # output channel 0: horizontal derivative (gx); channel 1: its transpose, the vertical one (gy)
        self.conv.weight.data.copy_(torch.stack((sobel_x, sobel_x.t()))[:, None])
        self.conv.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"nbins={self.nbins}, pool={self.pool}, bias={self.conv.bias is not None}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> float32 (N, C*nbins, H//pool, W//pool); channel c's bins at c*nbins + b."""
        n, c, h, w = x.shape
        # Targets in float32 whatever the autocast state: atan2 and the bin edges are precision-sensitive.
        on_autocast_device = x.device.type in ("cpu", "cuda")
        no_autocast = (
            torch.autocast(x.device.type, enabled=False) if on_autocast_device else contextlib.nullcontext()
        )
        with no_autocast:
            g = self.conv(x.float().reshape(n * c, 1, h, w))  # (N*C, 2, H, W)
            mag = torch.linalg.vector_norm(g, dim=1, keepdim=True)  # (N*C, 1, H, W)
            phase = torch.atan2(g[:, 0], g[:, 1])  # (N*C, H, W) in [-pi, pi]
            # floor then modulo folds opposite directions onto the same bin (orientation over 180 degrees)
            bins = torch.floor(phase / math.pi * self.nbins).long().remainder(self.nbins)
            hist = torch.zeros(n * c, self.nbins, h, w, dtype=mag.dtype, device=mag.device)
            hist.scatter_(1, bins[:, None], mag)
            hist = F.avg_pool2d(hist, self.pool, stride=self.pool)  # (N*C, nbins, H//pool, W//pool)
            hist = F.normalize(hist, p=2.0, dim=1)
        return hist.reshape(n, c * self.nbins, h // self.pool, w // self.pool)
