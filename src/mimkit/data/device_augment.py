"""MAE augmentation as batched tensor ops on the training device (`data.augment_on: device`).

Workers only read (and, unless the GPU decodes JPEG, decode) images and draw each sample's crop box with
`draw_crop_params`: torchvision's RandomResizedCrop.get_params then RandomHorizontalFlip's draw, the very calls
the worker pipeline (`transforms.pretrain_transform`) makes, from the same per-sample RNG that `SeededSamples`
seeds with (seed, epoch, index). So crops and flips are identical to the worker path, and resume stays bitwise.

On the device, bicubic resizing of every crop to input_size is two batched matmuls with per-sample weight
matrices built like Pillow's antialiased resampling (separable, horizontal pass first, a = -0.5, support scaled
on downsampling), then flip (reversed weight rows) and normalisation. Outputs agree with the worker path within
Pillow's 8-bit rounding.

    ds = DeviceSamples(open_dataset(path, "train", None), scale=(0.2, 1.0), hflip=True)   # workers
    loader(..., collate=collate_device)
    aug = DeviceAugment((224, 224), mean, std); batch = aug(batch)   # batch["images"]: (N, C, H, W) float
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from mimkit.data.datasets import DECODE_ERRORS
from mimkit.data.images import read_image, to_mode

logger = logging.getLogger(__name__)

# RandomResizedCrop's default aspect-ratio range (the official recipe leaves it at the default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BICUBIC_A = -0.5  # Pillow's (and antialiased torch's) bicubic coefficient
BICUBIC_SUPPORT = 2.0
EXIF_ORIENTATION = 0x0112  # the EXIF tag read_image applies (phone photos)


def draw_crop_params(
    img: Image.Image | torch.Tensor, scale: Sequence[float], hflip: bool, ratio: Sequence[float] = CROP_RATIO
) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) from the global torch RNG, as RandomResizedCrop + RandomHorizontalFlip.

    Only `img`'s size is read (a lazily opened PIL image is not decoded).
    """
    top, left, height, width = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
    flip = bool(torch.rand(1) < 0.5) if hflip else False  # RandomHorizontalFlip(p=0.5); no draw when off
    return int(top), int(left), int(height), int(width), flip


def _raw_bytes(base: Dataset, index: int) -> tuple[bytes, int] | None:
    """(file bytes, label) when `base` can hand them out without decoding, else None."""
    reader = getattr(base, "read_bytes", None)
    if reader is not None:
        return reader(index)
    samples = getattr(base, "samples", None)
    if samples is not None and isinstance(samples[index][0], str) and hasattr(base, "loader"):
        path, label = samples[index]
        with open(path, "rb") as f:
            return f.read(), label
    return None


class DeviceSamples(Dataset):
    """The worker half: item i -> ((source uint8 tensor, crop (5,) long), label), or None when unreadable.

    `base` yields (PIL image, label) (a dataset opened with transform=None). The source is the crop box's pixels
    (C, h, w), or with `jpeg_bytes` a JPEG file's bytes (L,) for the device to decode (crop box in the full image).
    Crop: (top, left, height, width, flip). Wrap in SeededSamples as any dataset.
    """

    def __init__(self, base: Dataset, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True, in_chans: int = 3,
                 jpeg_bytes: bool = False) -> None:
        self.base = base
        self.scale = tuple(scale)
        self.hflip = hflip
        self.mode = "L" if in_chans == 1 else "RGB"
        self.jpeg_bytes = jpeg_bytes
        self.classes = getattr(base, "classes", [])

    def __len__(self) -> int:
        return len(self.base)

    def _from_bytes(self, index: int):
        """(source, crop, label) read from the file's bytes; False when unreadable; None when `base` has no bytes."""
        raw = _raw_bytes(self.base, index)
        if raw is None:
            return None
        data, label = raw
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                # nvJPEG decodes plain JPEGs of the wanted mode; EXIF-rotated ones, PNG, CMYK, ... the worker does
                if im.format == "JPEG" and im.mode == self.mode and im.getexif().get(EXIF_ORIENTATION, 1) == 1:
                    crop = draw_crop_params(im, self.scale, self.hflip)
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), crop, label
            img = read_image(io.BytesIO(data), self.mode)
        except DECODE_ERRORS as e:
            logger.warning("skipping unreadable image %d (%s: %s)", index, type(e).__name__, e)
            return False
        return self._cropped(img, label)

    def _cropped(self, img: Image.Image, label: int):
        """(the crop box's pixels (C, h, w) uint8, crop, label): the worker cuts, the device resizes."""
        img = to_mode(img, self.mode)
        top, left, h, w, flip = draw_crop_params(img, self.scale, self.hflip)
        arr = np.asarray(img)[top:top + h, left:left + w]
        src = torch.from_numpy(arr.reshape(h, w, -1).copy()).permute(2, 0, 1)  # PIL's array is read-only
        return src, (top, left, h, w, flip), label

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int] | None:
        """((source, crop), label) or None."""
        out = self._from_bytes(index) if self.jpeg_bytes else None
        if out is False:
            return None
        if out is None:
            item = self.base[index]
            if item is None:
                return None
            out = self._cropped(*item)
        src, crop, label = out
        return (src, torch.tensor(crop[:4] + (int(crop[4]),), dtype=torch.long)), label


def collate_device(samples: Sequence[Any]) -> dict[str, Any]:
    """Drop None samples, keep crop boxes and labels, and pack the pixel crops into one flat buffer.

    Returns {"images": (N, 5) long crop boxes (DeviceAugment replaces them by the images), "pixels": the crops'
    (C, h, w) pixels concatenated into one flat uint8 tensor (one host-to-device copy, no padding) or None,
    "sources": the N uint8 tensors as they are when any is JPEG bytes (else None), "labels": (N,), "skipped"}.
    """
    kept = [s for s in samples if s is not None]
    out: dict[str, Any] = {"skipped": len(samples) - len(kept), "pixels": None, "sources": None}
    if not kept:
        out.update(images=torch.empty(0, 5, dtype=torch.long), labels=torch.empty(0, dtype=torch.long))
        return out
    sources = [s[0][0] for s in kept]
    out["images"] = torch.stack([s[0][1] for s in kept])
    out["labels"] = torch.tensor([int(s[1]) for s in kept], dtype=torch.long)
    if all(s.dim() == 3 for s in sources):
        out["pixels"] = torch.cat([s.reshape(-1) for s in sources])
        out["channels"] = sources[0].shape[0]
    else:
        out["sources"] = sources
    return out


def pad_stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, h_i, w_i) tensors -> (N, C, max h, max w), zero-padded at the bottom and right."""
    c = images[0].shape[0]
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    out = images[0].new_zeros((len(images), c, h, w))
    for k, x in enumerate(images):
        out[k, :, :x.shape[1], :x.shape[2]] = x
    return out


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5), zero for |x| >= 2."""
    x = x.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < BICUBIC_SUPPORT, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample matrices (N, out_size, in_size) resampling [start, start + length) to out_size, bicubic.

    As Pillow's precompute_coeffs: output pixel o centres at (o + 0.5) * length / out_size in the crop; on
    downsampling the kernel is stretched by the scale (antialiasing); taps outside the crop get no weight and
    each row is normalised. `flip` (N,) bool reverses the output order (a horizontal flip for free).
    """
    dev, f32 = start.device, torch.float32  # float32 is exact enough: coordinates stay far below 2**24
    scale = (length.to(f32) / out_size)[:, None, None]  # (N, 1, 1)
    filterscale = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=dev, dtype=f32)[None, :, None] + 0.5) * scale
    u = torch.arange(in_size, device=dev, dtype=f32)[None, None, :] - start.to(f32)[:, None, None]
    w = _bicubic((u - centre + 0.5) / filterscale)
    w = w * ((u >= 0) & (u < length.to(f32)[:, None, None]))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    if flip is not None:
        w = torch.where(flip.bool()[:, None, None], w.flip(1), w)
    return w


class DeviceAugment:
    """The device half: crop, bicubic resize to `size`, flip and normalise a `collate_device` batch.

    `__call__(batch)` returns the batch with "images" (N, C, H, W) float32 on the batch's device; it runs in
    float32 whatever autocast is active (8-bit-exact inputs, no low-precision resampling). Crops are resized in
    chunks of `chunk` samples of similar size, each padded to its own largest crop, which bounds memory and the
    padding's wasted work when one large image shares a batch with small ones.
    """

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], chunk: int = 32) -> None:
        self.size = tuple(int(s) for s in size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.chunk = chunk
        self.decode_failed = 0  # JPEGs the device could not decode (dropped from their batch)

    def _pieces(self, batch: dict, device: torch.device) -> tuple[list[torch.Tensor], list[int] | None]:
        """Each sample's crop (C, h, w) uint8 on `device`, and the kept rows (None: all) when JPEGs failed."""
        boxes = batch["images"].cpu()
        if batch.get("pixels") is not None:
            c = int(batch["channels"])
            flat = batch["pixels"].to(device, non_blocking=True)
            sizes = [c * int(h) * int(w) for h, w in boxes[:, 2:4].tolist()]
            return [p.view(c, int(h), int(w)) for p, (h, w) in zip(flat.split(sizes), boxes[:, 2:4].tolist())], None
        sources = batch["sources"]
        decoded = iter(self._decode([s for s in sources if s.dim() == 1], device, self.mean.shape[1]))
        keep, pieces = [], []
        for k, s in enumerate(sources):
            if s.dim() == 1:  # a whole decoded JPEG: crop it here (workers cropped the others)
                img = next(decoded)
                if img is None:
                    continue
                top, left, h, w = (int(v) for v in boxes[k, :4])
                img = img[:, top:top + h, left:left + w]
            else:
                img = s.to(device, non_blocking=True)
            keep.append(k)
            pieces.append(img)
        return pieces, (None if len(keep) == len(sources) else keep)

    def _decode(self, data: list[torch.Tensor], device: torch.device, channels: int) -> list[torch.Tensor | None]:
        """Batched torchvision.io.decode_jpeg on `device` (nvJPEG on CUDA); one by one when a file is bad."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data:
            return []
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            return list(decode_jpeg(data, mode=mode, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=mode, device=device))
                except RuntimeError as e:
                    self.decode_failed += 1
                    logger.warning("skipping a JPEG the device cannot decode (%s)", str(e).splitlines()[0])
                    out.append(None)
            return out

    def __call__(self, batch: dict) -> dict:
        """Batch from collate_device (already moved by the loop) -> batch with augmented float images."""
        crops = batch["images"]
        with torch.autocast(device_type=crops.device.type, enabled=False):
            pieces, keep = self._pieces(batch, crops.device)
            out = dict(batch)
            if keep is not None:  # undecodable JPEGs dropped
                crops = crops[torch.tensor(keep, dtype=torch.long, device=crops.device)]
                out["labels"] = batch["labels"][torch.tensor(keep, dtype=torch.long, device=batch["labels"].device)]
            out["images"] = self.resize(pieces, crops)
        return out

    def resize(self, pieces: list[torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
        """Crops [(C, h_i, w_i) uint8] + boxes (N, 5) (height, width, flip read) -> (N, C, H, W) normalised float."""
        oh, ow = self.size
        device = crops.device
        channels = pieces[0].shape[0] if pieces else self.mean.shape[1]
        out = torch.empty(len(pieces), channels, oh, ow, device=device)
        order = sorted(range(len(pieces)), key=lambda k: pieces[k].shape[1] * pieces[k].shape[2])
        mean, std = self.mean.to(device), self.std.to(device)
        for i in range(0, len(order), self.chunk):
            rows = order[i:i + self.chunk]
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            x = pad_stack([pieces[k] for k in rows]).float()  # (n, C, h, w)
            box = crops[idx]
            zero = torch.zeros_like(box[:, 0])
            wx = resize_weights(zero, box[:, 3], x.shape[3], ow, box[:, 4])  # (n, ow, w)
            wy = resize_weights(zero, box[:, 2], x.shape[2], oh)  # (n, oh, h)
            # horizontal pass first, clamped to the 8-bit range in between, as Pillow does
            x = torch.matmul(x, wx.transpose(1, 2)[:, None]).clamp_(0, 255)  # (n, C, h, ow)
            x = torch.matmul(wy[:, None], x).clamp_(0, 255)  # (n, C, oh, ow)
            out[idx] = (x / 255.0 - mean) / std
        return out


def device_step(step_fn: Callable, augment: DeviceAugment) -> Callable:
    """Wrap a task's step function so the batch is augmented on the device first."""

    def step(model, batch):
        return step_fn(model, augment(batch))

    return step
