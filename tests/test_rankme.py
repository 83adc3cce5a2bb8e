"""RankMe against hand-computed values on matrices of known rank."""

import math

import pytest
import torch

from mimkit.metrics import rankme
from mimkit.metrics.rankme import EPS


def _orthogonal_rank(n: int, d: int, r: int, scales: list[float] | None = None) -> torch.Tensor:
    """(n, d) matrix with exactly r nonzero singular values (given, or all 1)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    s = torch.tensor(scales if scales is not None else [1.0] * r, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


def _hand(sigmas: list[float], zeros: int) -> float:
    """exp(-sum p log p) with p = sigma/||sigma||_1 + eps over the nonzero and the zero singular values."""
    total = sum(sigmas)
    p = [s / total + EPS for s in sigmas] + [EPS] * zeros
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("r", [1, 3, 8])
def test_equal_singular_values_give_the_rank(r: int) -> None:
    x = _orthogonal_rank(64, 16, r)
    value = rankme(x)
    assert value == pytest.approx(_hand([1.0] * r, 16 - r), rel=1e-6)
    assert value == pytest.approx(r, rel=1e-4)


def test_unequal_singular_values_hand_computed() -> None:
    sig = [4.0, 2.0, 1.0, 1.0]
    x = _orthogonal_rank(50, 10, 4, sig)
    # p = (0.5, 0.25, 0.125, 0.125): entropy = 1.75 ln 2 -> exp = 2^1.75 ~= 3.364
    assert rankme(x) == pytest.approx(2 ** 1.75, rel=1e-4)
    assert rankme(x) == pytest.approx(_hand(sig, 6), rel=1e-6)


def test_scale_invariant_float32_and_bounds() -> None:
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    v = rankme(x)
    assert rankme(7.5 * x) == pytest.approx(v, rel=1e-6)
    assert rankme(x.float()) == pytest.approx(rankme(x.double()), rel=1e-5)
    assert 1.0 <= v <= 32.0 and v > 25  # a random Gaussian matrix is near full rank


def test_rejects_non_matrix() -> None:
    with pytest.raises(ValueError, match="N, D"):
        rankme(torch.zeros(3, 4, 5))
