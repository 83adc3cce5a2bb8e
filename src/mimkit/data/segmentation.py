"""Segmentation data: ADE20K and generic layouts, the built-in mosaics, MMSeg's ADE20K joint pipeline.

Layouts `open_segmentation(path, split)` reads:
    ADEChallengeData2016/images/{training,validation}/X.jpg + annotations/{...}/X.png   (or its parent folder)
        150 classes, reduce_zero_label: 0 ("other") -> 255 (ignored), 1..150 -> 0..149
    root/{train,val}/images/X.(jpg|png) + root/{train,val}/masks/X.png + root/classes.txt (one name a line)
        mask values are class indices 0..K-1, 255 = ignore; without classes.txt give --num_classes
    None or "mosaics": the built-in mosaics (data.mosaics)
Every pair is checked before training (`check_pairs`): a missing mask, a size mismatch, a label beyond the
class count is one DataError naming the file.

Pipelines (MMSeg `configs/_base_/datasets/ade20k.py`, scale (2048, 512) for a 512 crop = (4 crop, crop)):
    train: RandomResize(ratio 0.5-2.0, keep ratio) -> RandomCrop(cat_max_ratio 0.75) -> flip 0.5
           -> PhotoMetricDistortion -> normalise -> pad to the crop (image 0, mask 255)
    eval:  Resize(scale, keep ratio) of the image only; the mask stays at its own size (scored there)
Normalisation: data.mean / data.std, else the encoder checkpoint's, else ImageNet's (MMSeg's ADE20K values).
Random draws use torch's RNG, which the engine seeds per sample (bitwise resume).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mimkit.data.datasets import DECODE_ERRORS, IGNORE_INDEX, ADE20KFolder, _image_files
from mimkit.data.images import read_image
from mimkit.data.transforms import mean_std
from mimkit.errors import DataError

logger = logging.getLogger(__name__)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
GENERIC_SPLITS = {"train": "train", "val": "val"}


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """MMSeg's reduce_zero_label: 0 -> 255 (ignored), v -> v - 1, 255 stays 255."""
    out = mask.astype(np.int64) - 1
    out[mask == 0] = IGNORE_INDEX
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    return out


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) int64 of a mask PNG's stored values (palette indices for mode P, no colour conversion)."""
    with Image.open(path) as f:
        if f.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"mask {path} is a {f.mode} image; masks hold one class index per pixel (mode L or P)")
        return np.array(f, dtype=np.int64)


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB by mimkit's one image reader (16-bit, alpha, CMYK, EXIF orientation handled)."""
    return np.array(read_image(path, "RGB"))


# ---------------------------------------------------------------------------------------------- layouts
@dataclass
class SegSource:
    """One split of a segmentation set: (image, mask) file pairs or in-memory arrays, and its classes."""

    name: str
    classes: list[str]
    reduce_zero_label: bool
    pairs: list[tuple[str, str]]
    arrays: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.arrays[0]) if self.arrays is not None else len(self.pairs)


def find_ade20k_root(path: Path) -> Optional[Path]:
    """The ADEChallengeData2016 folder at or directly under `path`, if it is one."""
    for cand in (path, path / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    return None


def _generic_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    img_dir, mask_dir = root / GENERIC_SPLITS[split] / "images", root / GENERIC_SPLITS[split] / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"no {d}: a segmentation set needs {split}/images/ and {split}/masks/ (or the ADE20K "
                            "layout images/{training,validation} + annotations/{training,validation})")
    images = {Path(p).stem: p for p in _image_files(img_dir)}
    masks = {Path(p).stem: p for p in _image_files(mask_dir) if p.lower().endswith(".png")}
    if not images:
        raise DataError(f"the '{split}' split is empty: no images in {img_dir}")
    lonely = sorted(set(images) - set(masks))
    if lonely:
        raise DataError(f"image {images[lonely[0]]} has no mask (expected {mask_dir / (lonely[0] + '.png')})"
                        + (f"; {len(lonely) - 1} more without one" if len(lonely) > 1 else ""))
    extra = sorted(set(masks) - set(images))
    if extra:
        raise DataError(f"mask {masks[extra[0]]} has no image in {img_dir}")
    return [(images[k], masks[k]) for k in sorted(images)]


def read_class_names(path: Path) -> list[str]:
    """Non-empty lines of a class-names file."""
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(names) < 2:
        raise DataError(f"{path} names {len(names)} class(es); a segmentation set needs at least 2")
    return names


def open_segmentation(spec: Optional[str], split: str, num_classes: Optional[int] = None,
                      reduce_zero: Optional[bool] = None, names: Optional[Sequence[str]] = None) -> SegSource:
    """The split of the set at `spec` (module docstring); DataError for any layout problem.

    `names`: class names for a generic layout without classes.txt (a checkpoint's), instead of class_0, ...
    """
    if split not in ("train", "val"):
        raise DataError(f"unknown split '{split}'; use train or val")
    if spec in (None, "mosaics"):
        from mimkit.data.mosaics import build_mosaics

        images, masks, classes = build_mosaics(split)
        if num_classes not in (None, len(classes)):
            raise DataError(f"--num_classes {num_classes}, but the built-in mosaics have {len(classes)} classes "
                            "(--num_classes is for a generic layout without classes.txt); drop it")
        return SegSource(f"builtin:mosaics/{split}", list(classes), False, [], (images, masks))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DataError(f"data path not found: {spec} (an ADEChallengeData2016 folder, a folder with "
                        "train/images + train/masks, or leave --data_path out for the built-in mosaics)")
    ade = find_ade20k_root(path)
    if ade is not None:
        ds = ADE20KFolder(ade, split, None, reduce_zero_label=False)
        if num_classes not in (None, len(ADE20K_CLASSES)):
            raise DataError(f"--num_classes {num_classes}, but ADE20K has {len(ADE20K_CLASSES)} classes")
        rz = True if reduce_zero is None else reduce_zero
        return SegSource(str(ade), list(ADE20K_CLASSES), rz, [(str(i), str(m)) for i, m in ds.samples])
    pairs = _generic_pairs(path, split)
    names_file = path / "classes.txt"
    if names_file.is_file():
        classes = read_class_names(names_file)
        if num_classes not in (None, len(classes)):
            raise DataError(f"--num_classes {num_classes}, but {names_file} names {len(classes)} classes")
    elif names and num_classes in (None, len(names)):
        classes = list(names)
    elif num_classes:
        classes = [f"class_{i}" for i in range(num_classes)]
    else:
        raise DataError(f"{path} has no classes.txt (one class name a line); add it or give --num_classes")
    return SegSource(str(path), classes, bool(reduce_zero), pairs)


def _check_pair(pair: tuple[str, str], num_classes: int, reduce_zero: bool) -> Optional[str]:
    img_path, mask_path = pair
    try:
        with Image.open(img_path) as f:
            size = f.size
        mask = read_mask(mask_path)
    except DECODE_ERRORS as e:
        return f"cannot read {img_path} / {mask_path} ({type(e).__name__}: {e})"
    if (mask.shape[1], mask.shape[0]) != size:
        return (f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                f"{size[0]}x{size[1]}")
    values = np.unique(reduce_zero_label(mask) if reduce_zero else mask)
    bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))]
    if bad.size:
        raw = int(bad[0]) + (1 if reduce_zero else 0)
        allowed = (f"0-{num_classes} (0 = unlabelled, 1-{num_classes} the classes: reduce_zero_label)" if reduce_zero
                   else f"0-{num_classes - 1}")
        return (f"mask {mask_path} has label {raw} but there are {num_classes} classes: the values allowed in a mask "
                f"file are {allowed} and {IGNORE_INDEX} (ignored)")
    return None


def check_pairs(source: SegSource, workers: int = 0) -> None:
    """Read every mask once: sizes match their images, labels < class count or ignore; else one DataError."""
    if len(source) == 0:
        raise DataError(f"the split {source.name} is empty")
    k = len(source.classes)
    if source.arrays is not None:
        masks = source.arrays[1]
        if masks.max() >= k:
            raise DataError(f"{source.name}: label {int(masks.max())} but there are {k} classes")
        return
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        for problem in pool.map(lambda p: _check_pair(p, k, source.reduce_zero_label), source.pairs):
            if problem:
                raise DataError(problem)


class SegmentationDataset(Dataset):
    """Items: transform(image (H, W, 3) uint8, mask (H, W) int64 with 255 = ignore), None when unreadable."""

    def __init__(self, source: SegSource, transform: Optional[Callable] = None) -> None:
        self.source, self.transform = source, transform
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        """A short name of item `index` (file stem, or mosaic number)."""
        if self.source.arrays is not None:
            return f"mosaic_{index:04d}"
        return Path(self.source.pairs[index][0]).stem

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) before any transform, labels already reduced."""
        if self.source.arrays is not None:
            images, masks = self.source.arrays
            return np.array(images[index]), np.array(masks[index], dtype=np.int64)
        img_path, mask_path = self.source.pairs[index]
        mask = read_mask(mask_path)
        return read_rgb(img_path), (reduce_zero_label(mask) if self.source.reduce_zero_label else mask)

    def __getitem__(self, index: int):
        try:
            image, mask = self.raw(index)
        except DECODE_ERRORS as e:
            logger.warning("skipping unreadable pair %s (%s: %s)", self.name(index), type(e).__name__, e)
            return None
        return self.transform(image, mask) if self.transform is not None else (image, mask)


# ---------------------------------------------------------------------------------------------- pipelines
def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """MMCV rescale with keep_ratio: the largest size with long side <= scale[0] and short side <= scale[1]."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float -> (3, h, w), bilinear without antialias (cv2 INTER_LINEAR, MMCV's default)."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) long -> (h, w), nearest."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.randint(2, ()))


def photometric_distortion(img: torch.Tensor, brightness: float = 32, contrast: tuple = (0.5, 1.5),
                           saturation: tuple = (0.5, 1.5), hue: float = 18) -> torch.Tensor:
    """MMSeg PhotoMetricDistortion on (3, H, W) float in [0, 255]: each op with probability 0.5, contrast
    before or after the HSV ops at random; hue shift in OpenCV degrees (0-180 scale)."""
    from skimage.color import hsv2rgb, rgb2hsv

    if _coin():
        img = (img + _uniform(-brightness, brightness)).clamp(0, 255)
    contrast_first = _coin()
    if contrast_first and _coin():
        img = (img * _uniform(*contrast)).clamp(0, 255)
    do_sat, do_hue = _coin(), _coin()
    sat, shift = _uniform(*saturation), _uniform(-hue, hue) / 180.0
    if do_sat or do_hue:
        hsv = rgb2hsv(img.permute(1, 2, 0).numpy() / 255.0)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        img = torch.from_numpy(hsv2rgb(hsv) * 255.0).float().permute(2, 0, 1)
    if not contrast_first and _coin():
        img = (img * _uniform(*contrast)).clamp(0, 255)
    return img


def random_crop(img: torch.Tensor, mask: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float,
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """MMSeg RandomCrop: up to 10 draws until no single class covers >= cat_max_ratio of the crop."""
    h, w = mask.shape
    ch, cw = min(crop[0], h), min(crop[1], w)

    def draw() -> tuple[int, int]:
        return int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            _, counts = torch.unique(mask[y:y + ch, x:x + cw][mask[y:y + ch, x:x + cw] != ignore_index],
                                     return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            y, x = draw()
    return img[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]


class SegTrainPipeline:
    """MMSeg's ADE20K training pipeline on (image (H, W, 3) uint8, mask (H, W)) -> ((3, h, w), (h, w)) tensors."""

    def __init__(self, crop: tuple[int, int], scale: Optional[Sequence[int]] = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, hflip: bool = True,
                 photometric: bool = True, ignore_index: int = IGNORE_INDEX, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        self.crop = tuple(crop)
        self.scale = tuple(scale) if scale else (4 * max(crop), min(crop))
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.hflip, self.photometric, self.ignore_index = hflip, photometric, ignore_index
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) * 255 for v in mean_std(3, mean, std))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        seg = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        r = _uniform(*self.ratio_range)
        size = rescale_size(*seg.shape, (self.scale[0] * r, self.scale[1] * r))
        img, seg = resize_image(img, size), resize_mask(seg, size)
        img, seg = random_crop(img, seg, self.crop, self.cat_max_ratio, self.ignore_index)
        if self.hflip and _coin():
            img, seg = img.flip(-1), seg.flip(-1)
        if self.photometric:
            img = photometric_distortion(img)
        img = (img - self.mean) / self.std
        ph, pw = self.crop[0] - img.shape[1], self.crop[1] - img.shape[2]
        if ph > 0 or pw > 0:  # bottom / right, as MMSeg's Pad
            img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            seg = F.pad(seg, (0, max(pw, 0), 0, max(ph, 0)), value=self.ignore_index)
        return img.contiguous(), seg.contiguous()


class SegEvalPipeline:
    """MMSeg's test pipeline: the image resized (keep ratio) to the scale, normalised; the mask untouched."""

    def __init__(self, crop: tuple[int, int], scale: Optional[Sequence[int]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        self.scale = tuple(scale) if scale else (4 * max(crop), min(crop))
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) * 255 for v in mean_std(3, mean, std))

    def image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) normalised at the test scale."""
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        img = resize_image(img, rescale_size(img.shape[1], img.shape[2], self.scale))
        return (img - self.mean) / self.std

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(image), torch.from_numpy(np.asarray(mask, dtype=np.int64))
