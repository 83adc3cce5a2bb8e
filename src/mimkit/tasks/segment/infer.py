"""Inference pieces of `mimkit segment`: whole / sliding-window logits, the mIoU pass, overlays, --predict.

Inference follows MMSeg's EncoderDecoder: 'whole' runs the image at once (padded to the patch size, cropped
back), 'slide' averages the logits of crop-sized windows every `stride` pixels. Logits are resized bilinearly
to the ground truth's own size before the argmax, so scores are at the annotation's resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.metrics.segmentation import ConfusionMatrix

EVAL_BATCH = 8  # images of equal size evaluated together


@torch.no_grad()
def whole_logits(model, img: torch.Tensor) -> torch.Tensor:
    """img (N, 3, H, W) -> logits (N, K, H, W); padded on the bottom / right to a multiple of the patch."""
    p = model.patch_size
    h, w = img.shape[2:]
    ph, pw = (-h) % p, (-w) % p
    x = F.pad(img, (0, pw, 0, ph)) if (ph or pw) else img
    return model(x)[:, :, :h, :w]


@torch.no_grad()
def slide_logits(model, img: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """img (N, 3, H, W) -> logits (N, K, H, W) averaged over windows of `crop` every `stride` (MMSeg 'slide').

    Windows start at 0, stride, 2 * stride, ... and the last is moved back to end at the far edge; with
    stride <= crop every pixel lies in at least one window."""
    (ch, cw), (sh, sw) = crop, stride
    if sh > ch or sw > cw:
        raise ValueError(f"stride {list(stride)} larger than the window {list(crop)} leaves pixels uncovered")
    n, _, h, w = img.shape
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out, count = None, img.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = whole_logits(model, img[:, :, y1:y2, x1:x2])
            if out is None:
                out = img.new_zeros((n, logits.shape[1], h, w))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def infer(model, img: torch.Tensor, test_cfg, crop: Sequence[int]) -> torch.Tensor:
    """Logits (N, K, H, W) of `img` by the configured test mode (window / stride from segment_config.slide_window)."""
    from mimkit.tasks.segment.config import slide_window

    if test_cfg.mode == "whole":
        return whole_logits(model, img)
    return slide_logits(model, img, *slide_window(test_cfg, crop))


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours, fixed for a class count."""
    return np.random.default_rng(num_classes).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, ignore_index: int = 255,
            alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image blended with the colours of (H, W) labels; ignored pixels left as they are."""
    out = image.astype(np.float32).copy()
    valid = (label != ignore_index) & (label >= 0) & (label < len(colours))
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[label[valid]]
    return out.round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def evaluate(model, dataset, pipeline, test_cfg, crop: Sequence[int], device: torch.device, ignore_index: int,
             overlay_dir: Optional[Path] = None, num_overlays: int = 0) -> tuple[dict, list[np.ndarray]]:
    """(metrics of one confusion matrix over the whole set and all ranks, overlay panels drawn on rank 0).

    Each rank takes every world_size-th image; the matrices are summed, so the result is exact. Under FSDP every
    rank runs every image (each forward gathers the blocks' weights from all ranks, so the ranks' passes must
    match one for one, and the windows an image needs vary) and rank 0's matrix is the result.
    """
    import torch.distributed as dist

    from mimkit.engine.fsdp import is_sharded

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    sharded = is_sharded(model)
    was_training = model.training
    model.eval()
    if world > 1:  # BatchNorm statistics differ per rank without SyncBN (CPU): score rank 0's, the checkpoint's
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    k = model.num_classes
    cm = ConfusionMatrix(k, ignore_index, device)
    colours, panels = palette(k), []
    mine = list(range(len(dataset))) if sharded else list(range(rank, len(dataset), world))
    for start in range(0, len(mine), EVAL_BATCH):
        items = [(i, *dataset.raw(i)) for i in mine[start:start + EVAL_BATCH]]
        xs = [pipeline.image(image) for _, image, _ in items]
        if all(x.shape == xs[0].shape for x in xs):  # same size (built-in mosaics): one batched pass
            batched = infer(model, torch.stack(xs).to(device), test_cfg, crop)
            logits_list = list(batched.split(1))
        else:
            logits_list = [infer(model, x[None].to(device), test_cfg, crop)
                           for x in xs]
        for (i, image, mask), logits in zip(items, logits_list, strict=True):
            logits = F.interpolate(logits.float(), size=mask.shape, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0]
            cm.update(pred, torch.from_numpy(mask).to(device))
            if rank == 0 and len(panels) < num_overlays:
                p = pred.cpu().numpy()
                panels.append(np.concatenate([image, overlay(image, mask, colours, ignore_index),
                                              overlay(image, p, colours, ignore_index)], axis=1))
                if overlay_dir is not None:
                    overlay_dir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(panels[-1]).save(overlay_dir / f"{dataset.name(i)}.png")
    if not sharded:  # (under FSDP every rank holds the whole set's matrix already)
        cm.all_reduce()
    model.train(was_training)
    return cm.compute(), panels


def image_paths(spec: str) -> list[tuple[Path, Path]]:
    """The images to --predict as (file, path relative to the folder): one file, or every image in a folder and
    its subfolders (sorted)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from mimkit.errors import DataError

    p = Path(spec).expanduser()
    if p.is_file():
        return [(p, Path(p.name))]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        if files:
            return [(f, f.relative_to(p)) for f in files]
        raise DataError(f"no images found in {p} or its subfolders")
    raise DataError(f"--predict path not found: {spec}")


def fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when an earlier one holds files (never written over)."""
    out, n = parent / name, 2
    while out.exists() and any(out.iterdir()):
        out, n = parent / f"{name}-{n}", n + 1
    return out


def write_legend(out_dir: Path, class_names: Sequence[str], colours: np.ndarray) -> None:
    """legend.csv (index, name, r, g, b) and legend.png (a colour swatch beside each class name)."""
    from PIL import ImageDraw

    rows = ["index,name,r,g,b"] + [f"{i},\"{n}\",{c[0]},{c[1]},{c[2]}"
                                   for i, (n, c) in enumerate(zip(class_names, colours, strict=True))]
    (out_dir / "legend.csv").write_text("\n".join(rows) + "\n")
    line = 16
    img = Image.new("RGB", (260, line * len(class_names) + 4), "white")
    draw = ImageDraw.Draw(img)
    for i, (n, c) in enumerate(zip(class_names, colours, strict=True)):
        draw.rectangle([4, 2 + i * line, 4 + 28, 2 + i * line + line - 3], fill=tuple(int(v) for v in c))
        draw.text((40, 2 + i * line), f"{i} {n}", fill="black")
    img.save(out_dir / "legend.png")


@torch.no_grad()
def predict(model, paths: list[tuple[Path, Path]], pipeline, test_cfg, crop: Sequence[int], device: torch.device,
            out_dir: Path, class_names: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Per image, at its relative path under out_dir: <name.ext>_label.png (class index per pixel) and
    <name.ext>_overlay.png, plus the colour legend; returns (label paths, one warning per unreadable file).

    DataError when no file can be read (out_dir is then not created)."""
    from mimkit.data.datasets import DECODE_ERRORS
    from mimkit.data.segmentation import read_rgb
    from mimkit.errors import DataError

    model.eval()
    colours, written, skipped = palette(model.num_classes), [], []
    for path, rel in paths:
        try:
            image = read_rgb(path)
        except DECODE_ERRORS as e:
            skipped.append(f"skipped {path}: cannot read it as an image ({type(e).__name__})")
            continue
        x = pipeline.image(image)[None].to(device)
        logits = infer(model, x, test_cfg, crop)
        logits = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear", align_corners=False)
        label = logits.argmax(1)[0].cpu().numpy()
        dest = out_dir / rel.parent  # made on the first readable image: no empty folder when none is
        dest.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label.astype(np.uint8 if model.num_classes <= 256 else np.int32)).save(
            dest / f"{rel.name}_label.png")
        Image.fromarray(overlay(image, label, colours)).save(dest / f"{rel.name}_overlay.png")
        written.append(dest / f"{rel.name}_label.png")
    if not written:
        raise DataError(f"none of the {len(paths)} file(s) given to --predict could be read as an image (e.g. "
                        f"{paths[0][0]}); nothing written")
    write_legend(out_dir, class_names, colours)
    return written, skipped
