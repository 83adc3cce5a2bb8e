"""Weighted k-NN classification on frozen features, as DINO's eval_knn.py: L2-normalised features,
cosine similarity, each of the k nearest training samples votes for its label with weight exp(sim / T)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Test features go in chunks so the (chunk, N_train) similarity matrix stays about this many floats.
MAX_SIM_ELEMENTS = 1 << 24


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted labels {k: (N_test,) long} for train (N, D) / labels (N,) and test (M, D) features.

    k larger than the training set is clipped to its size (the key stays the k asked for).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if len(train_labels) != len(train_feats) or len(train_feats) == 0:
        raise ValueError(f"{len(train_feats)} training features but {len(train_labels)} labels")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(train.device).long()
    num_classes = int(num_classes if num_classes is not None else labels.max().item() + 1)
    k_max = min(max(ks), len(train))
    chunk = max(1, MAX_SIM_ELEMENTS // len(train))
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, most similar first
        weights = (top_sim / temperature).exp()
        neighbours = labels[top_idx]  # (m, k_max)
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(sim), num_classes, device=sim.device)
            votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(dim=1))
    empty = torch.empty(0, dtype=torch.long, device=train.device)
    return {k: torch.cat(v) if v else empty for k, v in preds.items()}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, float]:
    """Top-1 accuracy as a fraction in [0, 1] for each k (see knn_classify)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    preds = knn_classify(train_feats, train_labels, test_feats, ks, temperature, num_classes)
    target = test_labels.to(train_feats.device).long()
    return {k: float((p == target).float().mean()) if len(p) else float("nan") for k, p in preds.items()}
