"""Built-in datasets from data shipped inside dependencies: nothing downloaded, every set deterministic.

    demo        unlabelled crops of scikit-image's photos and textures (the embedded pretraining demo)
    photos, microscopy, textures, space
                continual-learning domains: crops labelled by their source image
    digits      scikit-learn's 8x8 handwritten digits, upsampled to 32 px RGB

Crops of one source image come from disjoint regions for train and val (the val crops from the last 30% of the
image along its longer side), so the held-out split never shares pixels with the training split.
`open_dataset(spec, split, transform)` takes a built-in name or a folder path: the entry point tasks call.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mimkit.errors import DataError, suggest

logger = logging.getLogger(__name__)

SEED = 0
VAL_FRACTION = 0.3  # share of each source image (along its longer side) reserved for val crops
SPLITS = ("train", "val")


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[index] if index is not None else out

    return load


# Source images bundled in the scikit-image wheel (those needing pooch downloads are left out on purpose).
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle", 0),  # left view of the stereo pair
    "camera": _skimage("camera"),
    "brick": _skimage("brick"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "cell": _skimage("cell"),
    "microaneurysms": _skimage("microaneurysms"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "moon": _skimage("moon"),
}

# domain name -> (source images, what they are); each source image is one class
DOMAINS: dict[str, tuple[tuple[str, ...], str]] = {
    "photos": (("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera"), "everyday photos"),
    "microscopy": (
        ("immunohistochemistry", "retina", "cell", "microaneurysms"), "microscopy / medical images"
    ),
    "textures": (("brick", "grass", "gravel"), "textures"),
    "space": (("hubble_deep_field", "moon"), "space images"),
}
DOMAIN_CROPS = {"train": 80, "val": 20}
DOMAIN_PX = 96
DOMAIN_SIDE = (0.2, 0.3)  # of min(H, W), the same for both splits so that train and val crops share a scale

DEMO_SOURCES = DOMAINS["photos"][0] + DOMAINS["textures"][0]
DEMO_CROPS = {"train": 36, "val": 4}
DEMO_PX = 128
DEMO_SIDE = (0.3, 0.7)  # of the split's region: larger crops, more content per demo image

DIGITS_PX = 32
DIGITS_VAL = 0.2


@cache
def _load_rgb(source: str) -> np.ndarray:
    """(H, W, 3) uint8 of a bundled source image; grayscale converted to RGB."""
    img = np.asarray(SOURCES[source]())
    if img.dtype != np.uint8:
        raise TypeError(f"source {source} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def available_sources(sources: tuple[str, ...]) -> tuple[str, ...]:
    """The sources this scikit-image install can load without a download (older/newer wheels differ)."""
    ok = []
    for s in sources:
        try:
            _load_rgb(s)
            ok.append(s)
        except (AttributeError, ImportError, OSError, ValueError) as e:  # ImportError: needs pooch
            logger.warning("built-in source image '%s' is not available here (%s); leaving it out", s, e)
    return tuple(ok)


def _region(img: np.ndarray, split: str) -> np.ndarray:
    """The split's part of an image: first 70% (train) or last 30% (val) along the longer side."""
    h, w = img.shape[:2]
    axis = 1 if w >= h else 0
    cut = int(round(img.shape[axis] * (1 - VAL_FRACTION)))
    idx = slice(0, cut) if split == "train" else slice(cut, None)
    return img[:, idx] if axis == 1 else img[idx]


def make_crops(
    source: str, split: str, n: int, out_px: int, side: tuple[float, float], relative_to_region: bool
) -> np.ndarray:
    """n square crops (n, out_px, out_px, 3) uint8 from the split's region of `source`, always the same."""
    img = _load_rgb(source)
    region = _region(img, split)
    rh, rw = region.shape[:2]
    ref = min(rh, rw) if relative_to_region else min(img.shape[:2])
    # Seeded by (SEED, source, split) only, so adding a source or a domain never changes another's crops.
    rng = np.random.default_rng([SEED, zlib.crc32(source.encode()), SPLITS.index(split)])
    out = np.empty((n, out_px, out_px, 3), dtype=np.uint8)
    for i in range(n):
        s = int(min(rng.uniform(*side) * ref, rh, rw))
        y, x = int(rng.integers(0, rh - s + 1)), int(rng.integers(0, rw - s + 1))
        crop = Image.fromarray(region[y:y + s, x:x + s]).resize((out_px, out_px), Image.BICUBIC)
        out[i] = np.asarray(crop)
    return out


class ArrayImageDataset(Dataset):
    """In-memory images (N, H, W, 3) uint8 + labels; items (transform(PIL image), label) as image_folder's."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform: Callable | None,
        root: str, names: list[str],
    ) -> None:
        self.images, self.transform, self.classes, self.root = images, transform, classes, root
        self.targets = [int(t) for t in labels]
        # (pseudo-path, label), like ImageFolder's samples
        self.samples = list(zip(names, self.targets, strict=True))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


@cache
def _build(name: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """(images, labels, classes, sample names) of a built-in set; cached, arrays read-only."""
    if name == "digits":
        images, labels, classes, names = _build_digits(split)
    else:
        if name == "demo":
            sources, counts, px, side, rel = DEMO_SOURCES, DEMO_CROPS, DEMO_PX, DEMO_SIDE, True
        else:
            sources, counts, px, side, rel = DOMAINS[name][0], DOMAIN_CROPS, DOMAIN_PX, DOMAIN_SIDE, False
        sources = available_sources(sources)
        if len(sources) < 2:
            raise DataError(f"built-in set '{name}' needs at least 2 of its source images; this install has "
                            f"{len(sources)} (scikit-image version?)")
        n = counts[split]
        images = np.concatenate([make_crops(s, split, n, px, side, rel) for s in sources])
        labels = np.repeat(np.arange(len(sources)), n)
        names = tuple(f"{name}/{split}/{s}_{i:03d}" for s in sources for i in range(n))
        classes = () if name == "demo" else sources  # the demo is unlabelled, like a flat folder
        if name == "demo":
            labels = np.zeros_like(labels)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, tuple(classes), names


def _build_digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """scikit-learn digits (8x8, values 0-16) -> (N, 32, 32, 3) uint8, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_val = train_test_split(
        np.arange(len(digits.target)), test_size=DIGITS_VAL, stratify=digits.target, random_state=SEED
    )
    idx = np.sort(idx_train if split == "train" else idx_val)
    small = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(im).resize((DIGITS_PX, DIGITS_PX), Image.BICUBIC).convert("RGB"))
        for im in small
    ])
    names = tuple(f"digits/{split}/{i:04d}" for i in idx)
    return images, digits.target[idx].astype(np.int64), tuple(str(c) for c in range(10)), names


def list_builtin() -> dict[str, str]:
    """Built-in set name -> one-line description."""
    out = {
        "demo": f"unlabelled {DEMO_PX} px crops of {len(DEMO_SOURCES)} scikit-image photos and textures "
                f"({DEMO_CROPS['train']} per image for train, {DEMO_CROPS['val']} for val)",
        "digits": f"scikit-learn handwritten digits, 10 classes, {DIGITS_PX} px RGB, 1437 train / 360 val",
    }
    for name, (sources, what) in DOMAINS.items():
        out[name] = (f"{what}: {DOMAIN_PX} px crops labelled by source image ({', '.join(sources)}); "
                     f"{DOMAIN_CROPS['train']} train / {DOMAIN_CROPS['val']} val per image")
    return out


def is_builtin(name: str) -> bool:
    """True when `name` is a built-in set."""
    return name in ("demo", "digits") or name in DOMAINS


def builtin_dataset(name: str, split: str = "train", transform: Callable | None = None) -> ArrayImageDataset:
    """A built-in set's split ('train' or 'val') yielding (transform(PIL image), label), with `.classes`."""
    if not is_builtin(name):
        raise DataError(f"unknown built-in dataset '{name}'{suggest(name, list_builtin())}; "
                        f"built-in sets: {', '.join(list_builtin())}")
    if split not in SPLITS:
        raise DataError(f"built-in dataset '{name}' has no '{split}' split; use train or val")
    images, labels, classes, names = _build(name, split)
    return ArrayImageDataset(images, labels, list(classes), transform, f"builtin:{name}/{split}", list(names))
