"""Read any image file as 8-bit 'RGB' or 'L': the one image reader every command uses.

What each PIL mode becomes (``to_mode``):
- 8-bit 'L', 'RGB': as they are. '1' (bilevel): 0 / 255.
- 16-bit grayscale ('I;16', 'I;16B', ...): scaled by the bit depth the values use, never clipped to white and
  never stretched per image: 12-bit data stored in 16-bit files (every value <= 4095, as microscopy and medical
  cameras write them) by v * 255 / 4095, anything else by v * 255 / 65535. One factor per bit depth, so the
  brightness of a data set's images stays comparable (a per-image min-max stretch would erase it). The catch: a
  true 16-bit image that is dark enough to stay <= 4095 reads 16x brighter; the run's log says how many files
  were read as 12-bit (``scan_images``).
- 32-bit 'I': read as 8-bit when every value is in [0, 255], as 12/16-bit (the rule above) when in [0, 65535],
  else stretched min-max.
- float 'F': as [0, 1] when every value is in [0, 1], as [0, 255] when in [0, 255], else stretched min-max.
- 16-bit RGB PNGs: Pillow itself reads them as 8-bit 'RGB' (the high byte of each sample).
- Transparency ('RGBA', 'LA', 'PA', palette with a transparent colour): composited on a WHITE background
  (what the image shows on a white page); each run's log says it once, with the count and the first file
  (``scan_images``). Alpha is never kept.
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
MAX_12BIT = 4095  # a 16-bit image whose values all fit in 12 bits is read as 12-bit data


def has_alpha(img: Image.Image) -> bool:
    """True when reading `img` composites it on the white background (an alpha band or a transparent colour)."""
    return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def is_16bit(img: Image.Image) -> bool:
    """True for 16-bit grayscale (Pillow's 'I;16*' modes, and 'I' as some 16-bit files open)."""
    return img.mode.startswith("I;16") or img.mode == "I"


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) array of a 16/32-bit or float image -> uint8, by the rules of the module docstring."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scaled = a * (255.0 / (MAX_12BIT if hi <= MAX_12BIT else 65535.0))
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = a
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


def scan_images(paths: list, limit: int = 1000, decode_limit: int = 200) -> list[str]:
    """The one-per-run notes on how files will be read: transparency composited, 16-bit files read as 12-bit.

    Reads headers of up to `limit` files spread over `paths` (and decodes up to `decode_limit` 16-bit ones to see
    their bit depth); each note names the count and the first file. [] when there is nothing to say.
    """
    step = max(1, len(paths) // limit)
    checked = paths[::step][:limit]
    alpha: list = []
    deep: list = []  # (path, read as 12-bit?)
    for path in checked:
        try:
            with Image.open(path) as im:
                if has_alpha(im):
                    alpha.append(path)
                elif is_16bit(im) and len(deep) < decode_limit:
                    top = int(np.asarray(im).max(initial=0))
                    if im.mode.startswith("I;16") or top > 255:  # an 'I' image within [0, 255] reads as 8-bit
                        deep.append((path, top <= MAX_12BIT))
        except (OSError, ValueError):
            continue  # unreadable files are warned (and skipped) when training meets them
    of = "" if len(checked) == len(paths) else f" (of {len(checked)} checked)"
    notes = []
    if alpha:
        notes.append(f"{len(alpha)} image(s){of} have transparency (first: {alpha[0]}): composited on a white "
                     "background, alpha is not kept")
    twelve = [p for p, is12 in deep if is12]
    if twelve:
        sixteen = len(deep) - len(twelve)
        notes.append(f"{len(twelve)} 16-bit image(s){of} use only 12 bits (every value <= {MAX_12BIT}; first: "
                     f"{twelve[0]}): read as 12-bit data, v * 255 / {MAX_12BIT}"
                     + (f"; {sixteen} other 16-bit image(s) by v * 255 / 65535" if sixteen else ""))
    elif deep:
        notes.append(f"{len(deep)} 16-bit image(s){of} (first: {deep[0][0]}): read as v * 255 / 65535")
    return notes
