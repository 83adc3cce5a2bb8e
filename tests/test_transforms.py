"""Pretrain / eval / fine-tune / segmentation pipelines: shapes, normalisation, recipe parameters, modes."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mimkit.data.transforms import (
    ConvertMode,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    seg_eval_transform,
    seg_train_transform,
)

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _img(h: int = 80, w: int = 100, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def test_pretrain_recipe_parameters() -> None:
    tf = pretrain_transform(224)
    rrc = next(t for t in tf.transforms if isinstance(t, T.RandomResizedCrop))
    assert rrc.size == (224, 224) and rrc.scale == (0.2, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms)
    custom = pretrain_transform(32, scale=(0.5, 0.9), hflip=False)
    assert next(t for t in custom.transforms if isinstance(t, T.RandomResizedCrop)).scale == (0.5, 0.9)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in custom.transforms)


@pytest.mark.parametrize("size,hw", [(32, (32, 32)), ((24, 40), (24, 40))])
@pytest.mark.parametrize("make", [pretrain_transform, eval_transform, finetune_transform])
def test_shapes_rgb_and_gray(make, size, hw) -> None:
    for src_mode in ("RGB", "L", "RGBA"):
        x = make(size)(_img(mode=src_mode))
        assert x.shape == (3, *hw) and x.dtype == torch.float32
        g = make(size, in_chans=1)(_img(mode=src_mode))
        assert g.shape == (1, *hw)


def test_eval_is_deterministic_and_normalised() -> None:
    # a constant image stays constant through resize + crop, so the output is exactly (v/255 - mean) / std
    img = Image.new("RGB", (50, 70), (128, 64, 255))
    x = eval_transform(32)(img)
    expected = (torch.tensor([128, 64, 255]) / 255 - MEAN) / STD
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
    a = _img()
    assert torch.equal(eval_transform(32)(a), eval_transform(32)(a))


def test_eval_resize_is_official_crop_pct() -> None:
    tf = eval_transform(224)
    resize = next(t for t in tf.transforms if isinstance(t, T.Resize))
    assert resize.size == 256 and resize.interpolation == T.InterpolationMode.BICUBIC  # int(224 / 0.875)
    # the centre crop keeps the middle: a white centre square survives, black borders do not
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[16:240, 16:240] = 255
    x = tf(Image.fromarray(arr))
    assert torch.allclose(x, ((1 - MEAN) / STD)[:, None, None].expand_as(x), atol=1e-4)


def test_finetune_uses_timm_recipe() -> None:
    tf = finetune_transform(32)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[0] == "ConvertMode" and "RandAugment" in names and "RandomErasing" in names
    assert "RandomErasing" not in [type(t).__name__ for t in finetune_transform(32, reprob=0.0).transforms]
    torch.manual_seed(0)
    for seed in range(20):  # RandAugment ops on one-channel images must not fail
        assert finetune_transform(16, in_chans=1)(_img(seed=seed)).shape == (1, 16, 16)


def test_convert_mode_and_bad_channels() -> None:
    assert ConvertMode("L")(_img()).mode == "L"
    with pytest.raises(ValueError):
        pretrain_transform(32, in_chans=2)


def test_segmentation_joint_crop_keeps_pairs_aligned() -> None:
    # the image's red channel encodes the mask's label; after the joint crop/flip they must still agree
    h, w = 60, 90
    labels = (np.arange(w)[None, :] // 10).repeat(h, 0).astype(np.uint8)  # vertical stripes 0..8
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = labels * 25
    torch.manual_seed(0)
    for _ in range(10):
        x, m = seg_train_transform(32)(Image.fromarray(rgb), Image.fromarray(labels))
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.long
        assert set(m.unique().tolist()) <= set(range(9))  # nearest: no interpolated labels
        red = (x[0] * STD[0] + MEAN[0]) * 255 / 25  # back to label units
        inner = m[:, 1:-1] == m[:, :-2]  # away from stripe edges bicubic matches the label
        inner &= m[:, 1:-1] == m[:, 2:]
        assert (red[:, 1:-1][inner].round() == m[:, 1:-1][inner]).float().mean() > 0.95
    x, m = seg_eval_transform((16, 24))(Image.fromarray(rgb), Image.fromarray(labels))
    assert x.shape == (3, 16, 24) and m.shape == (16, 24)


def test_posterize_zero_bits_does_not_crash() -> None:
    # timm's 'inc1' posterize at magnitude >= 10 keeps 0 bits; Pillow >= 13 raises on that, we return black
    tf = finetune_transform(16, aa="rand-m10-n1-mstd0-inc1", reprob=0.0)
    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert np.asarray(out).max() == 0
    # every timm policy that has a posterize op builds and runs
    for aa in ("rand-m9-mstd0.5-inc1", "original", "augmix-m5"):
        finetune_transform(16, aa=aa)(_img())


def test_finetune_transform_honours_crop_scale_and_flip() -> None:
    from torchvision import transforms as T

    from mimkit.data.transforms import finetune_transform

    tf = finetune_transform(32, aa=None, reprob=0.0, scale=(0.5, 1.0), hflip=0.0)
    crops = [t for t in tf.transforms if hasattr(t, "scale") and "ResizedCrop" in type(t).__name__]
    assert crops and tuple(crops[0].scale) == (0.5, 1.0)
    assert not [t for t in tf.transforms if isinstance(t, T.RandomHorizontalFlip)]
