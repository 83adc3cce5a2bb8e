"""Read any image file as 8-bit 'RGB' or 'L': the one image reader every command uses.

What each PIL mode becomes (``to_mode``):
- 8-bit 'L', 'RGB': as they are. '1' (bilevel): 0 / 255.
- 16-bit grayscale ('I;16', 'I;16B', ...): scaled by the type's range, v * 255 / 65535 (never clipped to white);
  the same factor for every image, so the brightness of a data set's images stays comparable.
- 32-bit 'I': read as 8-bit when every value is in [0, 255], as 16-bit when in [0, 65535], else stretched min-max.
- float 'F': as [0, 1] when every value is in [0, 1], as [0, 255] when in [0, 255], else stretched min-max.
- 16-bit RGB PNGs: Pillow itself reads them as 8-bit 'RGB' (the high byte of each sample).
- Transparency ('RGBA', 'LA', 'PA', palette with a transparent colour): composited on a WHITE background
  (what the image shows on a white page), said once in the log. Alpha is never kept.
- 'P' (palette), 'CMYK', 'YCbCr', 'LAB', 'HSV': converted to RGB by Pillow.
- EXIF orientation (phone photos) is applied (``PIL.ImageOps.exif_transpose``) when a file is read.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
MODES = ("L", "RGB")  # what read_image / to_mode return
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_said_alpha = False


def _say_alpha_once() -> None:
    global _said_alpha
    if not _said_alpha:
        _said_alpha = True
        logger.info("images with transparency are composited on a white background (alpha is not kept)")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) array of a 16/32-bit or float image -> uint8, by the rules of the module docstring."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = a * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = a
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = a * (255.0 / 65535.0)
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """A PIL image of any mode -> 8-bit `mode` ('RGB' or 'L'), by the rules of the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in _ALPHA_MODES:
        _say_alpha_once()
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode not in MODES:
        img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV
    return img if img.mode == mode else img.convert(mode)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open `path`, apply its EXIF orientation, return a fully decoded 8-bit image of `mode` ('RGB' or 'L').

    Decoding errors (OSError, ValueError, ...) propagate: callers decide whether to skip or to stop.
    """
    with Image.open(path) as f:
        f.load()
        try:
            img = ImageOps.exif_transpose(f)
        except Exception as e:  # a malformed EXIF block must not cost the image: read it unrotated
            logger.warning("ignoring the unreadable EXIF orientation of %s (%s)", path, type(e).__name__)
            img = f
        out = to_mode(img, mode)
        return out.copy() if out is f else out
