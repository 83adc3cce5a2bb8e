"""Image pipelines: MAE pretraining, evaluation, fine-tuning (official recipes), segmentation pairs.

Every pipeline takes a PIL image and returns a normalised float tensor (C, H, W); input_size: int or (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision import tv_tensors
from torchvision.transforms import v2

from mimkit.data.images import to_mode
from mimkit.errors import ConfigError

# The official eval recipe resizes to input_size / 0.875 (224 -> 256) before the centre crop.
EVAL_CROP_PCT = 0.875
# One-channel inputs use the mean of ImageNet's per-channel statistics (the usual grayscale convention).
GRAY_MEAN = (sum(IMAGENET_DEFAULT_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_DEFAULT_STD) / 3,)


def to_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    """int or (H, W) (or timm's (C, H, W)) -> (H, W)."""
    if isinstance(input_size, int):
        return (input_size, input_size)
    size = tuple(int(s) for s in input_size)[-2:]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


Stats = Optional[Sequence[float]]


def mean_std(in_chans: int = 3, mean: Stats = None, std: Stats = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics: `mean` / `std` when given (data.mean / data.std, one value per channel), else
    ImageNet's for 3 channels and their average for 1. A wrong count or a std <= 0 is a ConfigError."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 (images are read as grayscale or RGB), got {in_chans}")
    if (mean is None) != (std is None):
        raise ConfigError("give data.mean and data.std together (--mean and --std), or neither")
    if mean is None:
        return (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != in_chans:
            raise ConfigError(f"{key} has {len(values)} value(s) {list(values)} but the model reads {in_chans} "
                              f"channel(s): give one per channel")
    if any(not v > 0 for v in std):
        raise ConfigError(f"data.std must be > 0 for every channel, got {list(std)}")
    return mean, std


class ConvertMode:
    """PIL image of any mode -> 8-bit 'RGB' or 'L' (mimkit.data.images.to_mode: 16-bit, alpha, CMYK read right);
    a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_mode(img, self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _mode(in_chans: int) -> ConvertMode:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 (images are read as grayscale or RGB), got {in_chans}")
    return ConvertMode("L" if in_chans == 1 else "RGB")


def pretrain_transform(
    input_size: int | Sequence[int],
    in_chans: int = 3,
    scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
    mean: Stats = None,
    std: Stats = None,
) -> T.Compose:
    """Official MAE pretraining: RandomResizedCrop(0.2-1, bicubic), flip, ToTensor, normalise -> (C, H, W)."""
    mean, std = mean_std(in_chans, mean, std)
    return T.Compose([
        _mode(in_chans),
        T.RandomResizedCrop(to_hw(input_size), scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
        *([T.RandomHorizontalFlip()] if hflip else []),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(input_size: int | Sequence[int], in_chans: int = 3, mean: Stats = None,
                   std: Stats = None) -> T.Compose:
    """Official linprobe/finetune eval: resize to size/0.875 bicubic, centre crop, normalise -> (C, H, W)."""
    mean, std = mean_std(in_chans, mean, std)
    h, w = to_hw(input_size)
    # Square: resize the shorter side, as the official code; non-square: resize both sides, as timm.
    resize = int(h / EVAL_CROP_PCT) if h == w else (int(h / EVAL_CROP_PCT), int(w / EVAL_CROP_PCT))
    return T.Compose([
        _mode(in_chans),
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(
    input_size: int | Sequence[int],
    aa: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    color_jitter: float | None = None,
    in_chans: int = 3,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    mean: Stats = None,
    std: Stats = None,
) -> T.Compose:
    """Official main_finetune training transform, by timm's create_transform (defaults = official flags)."""
    mean, std = mean_std(in_chans, mean, std)
    timm_tf = create_transform(
        input_size=to_hw(input_size),
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=aa,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=mean,
        std=std,
    )
    for t in timm_tf.transforms:
        _patch_posterize(t)
    return T.Compose([_mode(in_chans), *timm_tf.transforms])


def _posterize_zero_ok(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize; keeping 0 bits gives the black image older Pillow gave (Pillow 13 raises instead)."""
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    return timm_posterize(img, bits_to_keep, **kwargs)


def _patch_posterize(t: object) -> None:
    """Swap the posterize op inside timm's RandAugment/AutoAugment: at m9 + mstd0.5 ('rand-m9-mstd0.5-inc1')
    PosterizeIncreasing sometimes keeps 0 bits, which Pillow >= 13 rejects with a ValueError mid-epoch."""
    ops = list(getattr(t, "ops", []) or [])
    for sub in getattr(t, "policy", []) or []:  # AutoAugment: a list of sub-policies, each a list of ops
        ops.extend(sub)
    for op in ops:
        if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
            op.aug_fn = _posterize_zero_ok


class SegTransform:
    """Joint (PIL image, PIL mask) -> (image (C, H, W) float, mask (H, W) long); masks resampled nearest."""

    def __init__(self, ops: list, in_chans: int = 3, mean: Stats = None, std: Stats = None) -> None:
        mean, std = mean_std(in_chans, mean, std)
        self.mode = _mode(in_chans)
        self.ops = v2.Compose([
            *ops,
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std),  # v2.Normalize touches images only, masks pass through
        ])

    def __call__(self, img: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = v2.functional.to_image(self.mode(img))
        target = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        image, target = self.ops(image, target)
        return image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ops})"


def seg_train_transform(
    input_size: int | Sequence[int], scale: tuple[float, float] = (0.5, 1.0), in_chans: int = 3,
    mean: Stats = None, std: Stats = None,
) -> SegTransform:
    """Segmentation training: the same random resized crop (bicubic image, nearest mask) and flip on both."""
    return SegTransform(
        [
            v2.RandomResizedCrop(to_hw(input_size), scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
        ],
        in_chans, mean, std,
    )


def seg_eval_transform(input_size: int | Sequence[int], in_chans: int = 3, mean: Stats = None,
                       std: Stats = None) -> SegTransform:
    """Segmentation evaluation: resize both to input_size (bicubic image, nearest mask)."""
    return SegTransform([v2.Resize(to_hw(input_size), interpolation=v2.InterpolationMode.BICUBIC)], in_chans,
                        mean, std)


def normalization_of(model) -> tuple[Stats, Stats]:
    """(mean, std) a model loaded from a checkpoint was trained with (`model.normalization`), else (None, None)."""
    norm = getattr(model, "normalization", None)
    return (norm[0], norm[1]) if norm else (None, None)
