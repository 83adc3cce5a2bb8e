"""Shared fixtures: tiny image folders and the tiny-model flags every engine test uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A model small enough for many short CPU runs: 32 px images, patch 8, 2 blocks of 32 dims.
TINY_MODEL = [
    "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
    "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2",
    "model.kwargs.decoder_embed_dim=32", "model.kwargs.decoder_depth=1", "model.kwargs.decoder_num_heads=2",
]


def write_images(folder: Path, n: int, size: int = 40, seed: int = 0, classes: int = 0) -> list[Path]:
    """Write n random-noise JPEGs (in `classes` class folders when > 0)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / f"class{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        p = sub / f"img{i:03d}.jpg"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A flat folder of 16 small JPEGs."""
    folder = tmp_path / "images"
    write_images(folder, 16)
    return folder


@pytest.fixture(autouse=True)
def _mimkit_logger_level():
    """Restore the package logger's level after each test: an in-process study script quiets it globally."""
    import logging

    log = logging.getLogger("mimkit")
    level = log.level
    yield
    log.setLevel(level if level != logging.NOTSET else logging.INFO)
