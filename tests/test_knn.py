"""Weighted k-NN: perfect on separated clusters, chance on random labels, DINO's voting rule."""

import math

import pytest
import torch

from mimkit.metrics import knn
from mimkit.metrics.knn import knn_accuracy, knn_classify


def _clusters(n_per: int, classes: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, d) * 10
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), d, generator=g), labels


def test_perfect_on_separated_clusters() -> None:
    xtr, ytr = _clusters(30, 5, 16, 0)
    xte, yte = _clusters(10, 5, 16, 1)
    acc = knn_accuracy(xtr, ytr, xte, yte, ks=(1, 10, 20))
    assert acc == {1: 1.0, 10: 1.0, 20: 1.0}


def test_near_chance_on_random_labels() -> None:
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    ytr, yte = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = knn_accuracy(xtr, ytr, xte, yte, ks=(20,))[20]
    # chance 0.1; 1000 test samples -> std ~0.0095, so +-0.04 is > 4 sigma
    assert abs(acc - 0.1) < 0.04


def test_weighted_vote_by_hand() -> None:
    # test point along x; neighbours: two class-1 points at cos 0.6, one class-0 point at cos 1.0
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[3.0, 0.0]])  # scale must not matter: features are L2-normalised
    # T=0.07: class 0 weight e^(1/0.07) beats 2 e^(0.6/0.07); T=1: e^1 = 2.718 < 2 e^0.6 = 3.644
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07) and math.exp(1) < 2 * math.exp(0.6)
    assert knn_classify(train, labels, test, ks=(3,), temperature=0.07)[3].tolist() == [0]
    assert knn_classify(train, labels, test, ks=(3,), temperature=1.0)[3].tolist() == [1]
    assert knn_classify(train, labels, test, ks=(1,))[1].tolist() == [0]


def test_chunked_equals_unchunked_and_k_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    xte = torch.randn(37, 8, generator=g)
    full = knn_classify(xtr, ytr, xte, ks=(5, 200))
    monkeypatch.setattr(knn, "MAX_SIM_ELEMENTS", 50 * 4)  # chunks of 4 test rows
    chunked = knn_classify(xtr, ytr, xte, ks=(5, 200))
    assert set(full) == {5, 200}
    for k in full:
        assert full[k].shape == (37,) and torch.equal(full[k], chunked[k])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        knn_classify(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(ValueError):
        knn_classify(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5))
    with pytest.raises(ValueError):
        knn_classify(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), ks=(0,))
