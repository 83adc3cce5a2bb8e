"""RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", arXiv 2210.02885): the effective rank of an embedding matrix."""

from __future__ import annotations

import torch

EPS = 1e-7  # the paper's epsilon, added to every normalised singular value


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = EPS) -> float:
    """exp(entropy of the L1-normalised singular values) of features (N, D); between ~1 and min(N, D)."""
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    # float64: the entropy of many tiny singular values is sensitive to float32 round-off
    s = torch.linalg.svdvals(features.detach().to(torch.float64))
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


@torch.no_grad()
def rankme_of(feature_fn, batches, eps: float = EPS) -> float:
    """RankMe of `feature_fn(images (N, C, H, W)) -> (N, D)` over an iterable of image batches (a fixed set)."""
    feats = [feature_fn(x).float().cpu() for x in batches if len(x)]
    if not feats:
        raise ValueError("no images to compute RankMe on")
    return rankme(torch.cat(feats), eps)
