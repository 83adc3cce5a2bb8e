"""HOG target layer: against a direct NumPy computation, known orientations, channel layout, bad nbins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimkit.errors import UserError
from mimkit.models import create_model
from mimkit.models.hog import HOGLayer


def numpy_hog(img: np.ndarray, nbins: int, pool: int, bias: np.ndarray | None = None) -> np.ndarray:
    """Direct per-pixel HOG of one (H, W) channel: reflect-padded Sobel, hard unsigned bins, cell mean, L2."""
    h, w = img.shape
    p = np.pad(img.astype(np.float64), 1, mode="reflect")
    hist = np.zeros((nbins, h, w))
    for i in range(h):
        for j in range(w):
            win = p[i : i + 3, j : j + 3]  # centred on pixel (i, j)
            gx = (win[:, 0] - win[:, 2]) @ np.array([1.0, 2.0, 1.0])  # left minus right
            gy = (win[0, :] - win[2, :]) @ np.array([1.0, 2.0, 1.0])  # top minus bottom
            if bias is not None:
                gx, gy = gx + bias[0], gy + bias[1]
            b = int(np.floor(np.arctan2(gx, gy) / np.pi * nbins)) % nbins
            hist[b, i, j] += np.hypot(gx, gy)
    cells = hist.reshape(nbins, h // pool, pool, w // pool, pool).mean(axis=(2, 4))
    norm = np.sqrt((cells**2).sum(axis=0, keepdims=True))
    return cells / np.maximum(norm, 1e-12)


# nbins chosen so that no integer gradient pair lies exactly on a bin edge except the axes, which both
# sides place alike (with 4 bins, gx == gy sits on an edge and float64 vs float32 may split it).
@pytest.mark.parametrize("nbins,pool,bias", [(9, 2, False), (6, 4, False), (9, 1, True), (18, 8, False)])
def test_matches_direct_numpy_computation(nbins: int, pool: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = HOGLayer(nbins, pool, bias=bias)
    # Integer pixels keep the Sobel sums exact in float32 and float64 alike: with reflect padding the
    # derivative across the border is exactly 0 there, and a rounding residue of either sign would put
    # that pixel on the other side of a bin edge (in the reference too).
    imgs = torch.randint(-128, 128, (2, 3, 8, 8)).float()
    out = layer(imgs)
    assert out.shape == (2, 3 * nbins, 8 // pool, 8 // pool)
    b = layer.conv.bias.numpy().astype(np.float64) if bias else None
    for n in range(2):
        for c in range(3):
            expected = numpy_hog(imgs[n, c].numpy(), nbins, pool, b)
            np.testing.assert_allclose(out[n, c * nbins : (c + 1) * nbins].numpy(), expected, atol=2e-6)


# Integer ramps I(i, j): Sobel gives the same (gx, gy) at every interior pixel, hence one expected bin.
# bin = floor(atan2(gx, gy) / pi * nbins) mod nbins, e.g. I = j: gx = -8, gy = 0 -> -pi/2 -> bin 4 of 9.
RAMPS = {
    "vertical_edges": (lambda i, j: j, {9: 4, 5: 2}),
    "horizontal_edges": (lambda i, j: i, {9: 0, 5: 0}),
    "diagonal_down": (lambda i, j: i + j, {9: 2, 5: 1}),
    "diagonal_up": (lambda i, j: j - i, {9: 6, 5: 3}),
}


@pytest.mark.parametrize("name", list(RAMPS))
@pytest.mark.parametrize("nbins", [9, 5])  # odd: no ramp sits on a bin edge
def test_known_orientations_land_in_expected_bin(name: str, nbins: int) -> None:
    fn, bins = RAMPS[name]
    i, j = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    for sign in (1.0, -1.0):  # unsigned orientation: the opposite gradient falls in the same bin
        img = (sign * fn(i, j))[None, None]
        hist = HOGLayer(nbins, pool=1)(img)[0, :, 1:-1, 1:-1]  # interior pixels: no padding effects
        expected = torch.zeros(nbins, 8, 8)
        expected[bins[nbins]] = 1.0  # per-pixel histogram, L2-normalised: one-hot
        torch.testing.assert_close(hist, expected)


def test_cells_of_a_step_edge() -> None:
    img = torch.zeros(1, 1, 16, 16)
    img[..., 8:] = 1.0  # vertical step between columns 7 and 8
    hog = HOGLayer(9, pool=4)(img)[0]  # (9, 4, 4)
    # only the cells holding columns 7 and 8 see a gradient, all of it in bin 4 (vertical edge)
    expected = torch.zeros(9, 4, 4)
    expected[4, :, 1:3] = 1.0
    torch.testing.assert_close(hog, expected)


def test_channels_are_independent_and_ordered() -> None:
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    img = torch.stack([j, i, torch.zeros_like(i)])[None]  # R: vertical edges, G: horizontal, B: flat
    hog = HOGLayer(9, pool=4)(img)[0]
    assert torch.all(hog[4] == 1.0) and hog[:9].sum() == 16  # R cells one-hot in bin 4
    assert torch.all(hog[9 + 0] == 1.0) and hog[9:18].sum() == 16  # G cells one-hot in bin 0
    assert torch.all(hog[18:] == 0)  # flat B: zero gradient, zero histogram (no NaN from 0/0)


def test_kernel_and_bias_are_fixed() -> None:
    torch.manual_seed(0)
    layer = HOGLayer(9, 4, bias=True)
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    torch.testing.assert_close(layer.conv.weight[:, 0], torch.stack([sobel, sobel.t()]))
    assert layer.conv.bias.abs().min() > 0  # random, as nn.Conv2d's default init
    imgs = torch.randn(2, 3, 8, 8)
    assert torch.equal(layer(imgs), layer(imgs))
    assert not torch.equal(layer(imgs), HOGLayer(9, 4, bias=False)(imgs))
    assert set(HOGLayer(9, 4).state_dict()) == {"conv.weight"}


def test_target_is_float32_under_low_precision_input() -> None:
    imgs = torch.randn(1, 3, 8, 8)
    layer = HOGLayer(9, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(imgs.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(imgs.bfloat16().float()))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_nbins_is_a_clear_error(bad) -> None:
    with pytest.raises(ValueError, match="hog_nbins"):
        HOGLayer(bad, 4)
    with pytest.raises(UserError, match="hog_nbins"):
        create_model("MIM_vit_base_patch16", hog_nbins=bad)
