"""Frozen-encoder features for k-NN, RankMe and linear probes: one pass over a labelled dataset."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mimkit.data.datasets import collate_batch


def pool_tokens(tokens: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """tokens (N, 1+L, D) -> (N, D): the cls token, or the mean of the patch tokens ('avg')."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"unknown pooling '{pool}' (cls or avg)")


@torch.no_grad()
def extract_features(
    model, dataset, batch_size: int = 64, device: torch.device | str = "cpu", pool: str = "cls",
    num_workers: int = 0, amp: str = "off",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) of the unmasked encoder, in dataset order.

    The model must expose `forward_features(imgs) -> (N, 1+L, D)` (every mimkit MAE-family model does).
    `amp` is a resolved precision (off | bf16 | fp16): the forward runs under that autocast; features are fp32.
    """
    from mimkit.engine.precision import autocast_dtype

    device = torch.device(device)
    dtype = autocast_dtype(amp)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_batch)
    feats, labels = [], []
    for batch in loader:
        if batch["images"].shape[0] == 0:
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            tokens = model.forward_features(batch["images"].to(device))
        feats.append(pool_tokens(tokens, pool).float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
