"""Built-in segmentation set: mosaics of scikit-image's bundled textures and images, label = source image.

Each mosaic is a Voronoi partition of the canvas into 2-4 cells, each cell filled with a crop of one source
image; its mask holds the source's index. Train mosaics take their crops from the first 70% of each source
image, val mosaics from the last 30% (data.builtin's split), so held-out mosaics share no pixels with training.
Deterministic: mosaic i of a split is a pure function of (split, i). Nothing is downloaded.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from mimkit.data.builtin import SPLITS, _load_rgb, _region, available_sources
from mimkit.errors import DataError

# Sources: textures, microscopy and space images (the pretraining demo's photos are not among them)
MOSAIC_SOURCES = ("brick", "grass", "gravel", "immunohistochemistry", "retina", "cell", "moon", "hubble_deep_field")
MOSAIC_COUNT = {"train": 240, "val": 60}
MOSAIC_PX = 64
CELLS = (2, 4)  # Voronoi cells per mosaic, inclusive
CROP_SIDE = (0.25, 0.5)  # crop side as a fraction of the split region's shorter side


def mosaic_sources() -> tuple[str, ...]:
    """The mosaic classes this scikit-image install can load."""
    return available_sources(MOSAIC_SOURCES)


def _crop(source: str, split: str, rng: np.random.Generator, px: int) -> np.ndarray:
    region = _region(_load_rgb(source), split)
    rh, rw = region.shape[:2]
    s = int(rng.uniform(*CROP_SIDE) * min(rh, rw))
    y, x = int(rng.integers(0, rh - s + 1)), int(rng.integers(0, rw - s + 1))
    return np.asarray(Image.fromarray(region[y:y + s, x:x + s]).resize((px, px), Image.BICUBIC))


def make_mosaic(split: str, index: int, sources: tuple[str, ...], px: int = MOSAIC_PX) -> tuple[np.ndarray, np.ndarray]:
    """(image (px, px, 3) uint8, mask (px, px) uint8 of source indices) for mosaic `index` of `split`."""
    rng = np.random.default_rng([7, SPLITS.index(split), index])
    k = int(rng.integers(CELLS[0], CELLS[1] + 1))
    classes = rng.choice(len(sources), size=min(k, len(sources)), replace=False)
    centres = rng.uniform(0, px, size=(len(classes), 2))
    yy, xx = np.mgrid[0:px, 0:px]
    dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    cell = dist.argmin(0)
    image = np.zeros((px, px, 3), dtype=np.uint8)
    mask = np.zeros((px, px), dtype=np.uint8)
    for c, cls in enumerate(classes):
        inside = cell == c
        image[inside] = _crop(sources[cls], split, rng, px)[inside]
        mask[inside] = cls
    return image, mask


@cache
def build_mosaics(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images (N, px, px, 3) uint8, masks (N, px, px) uint8, class names) of a split; cached, read-only."""
    if split not in SPLITS:
        raise DataError(f"the built-in mosaics have no '{split}' split; use train or val")
    sources = mosaic_sources()
    if len(sources) < 2:
        raise DataError(f"the built-in mosaics need at least 2 source images; this scikit-image has {len(sources)}")
    pairs = [make_mosaic(split, i, sources) for i in range(MOSAIC_COUNT[split])]
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    images.setflags(write=False)
    masks.setflags(write=False)
    return images, masks, sources
