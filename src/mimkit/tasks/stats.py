"""`mimkit stats`: per-channel mean and std of an image folder, for `--mean` / `--std` (data.mean / data.std).

    mimkit stats --data_path /microscopy                   # RGB: three means, three stds
    mimkit stats --data_path /xrays --in_chans 1           # grayscale: one of each
    mimkit pretrain --data_path /microscopy --mean 0.41,0.38,0.52 --std 0.21,0.19,0.24

Every image is read as the training pipeline reads it (8-bit RGB or L, 16-bit scaled, alpha on white) at its
own size, pixels scaled to [0, 1]; the statistics are over all pixels of all images (float64 sums).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mimkit.config import note_results
from mimkit.errors import DataError, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit stats`."""
    p.add_argument("--data_path", required=True, help="image folder (class folders, flat, or train/), or a "
                   "built-in set such as digits, or "
                   "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder)")
    p.add_argument("--split", default="train", help="split to measure (default: train)")
    p.add_argument("--in_chans", type=int, default=3, choices=(1, 3), help="3 = RGB, 1 = grayscale (default: 3)")
    p.add_argument("--max_images", type=int, default=0, help="measure the first N images only; 0 = all "
                   "(default: 0)")
    p.add_argument("--output", default=None, help="also write the result as JSON to this file (default: none)")


class _ToArray:
    """PIL image -> float64 (H*W, C) array in [0, 1]; a class so DataLoader workers could pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img):
        from mimkit.data.images import to_mode

        a = np.asarray(to_mode(img, self.mode), dtype=np.float64) / 255.0
        return a.reshape(-1, 1 if a.ndim == 2 else a.shape[-1])


def channel_stats(dataset, max_images: int = 0) -> tuple[list[float], list[float], int, int]:
    """(mean, std, images measured, images skipped) over every pixel of `dataset` items ((H*W, C) arrays)."""
    total = sq = None
    count = n_images = skipped = 0
    limit = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    for i in range(limit):
        item = dataset[i]
        if item is None:  # an unreadable file: FolderDataset already warned
            skipped += 1
            continue
        px = item[0]
        total = px.sum(0) if total is None else total + px.sum(0)
        sq = (px**2).sum(0) if sq is None else sq + (px**2).sum(0)
        count += px.shape[0]
        n_images += 1
    if not n_images:
        raise DataError("no readable images to measure")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    return [float(v) for v in mean], [float(v) for v in std], n_images, skipped


def run(args: argparse.Namespace) -> int:
    """Measure and print the statistics, with the flags and config keys that use them."""
    from mimkit.data.sources import open_dataset

    if args.max_images < 0:
        raise UserError(f"--max_images must be >= 0, got {args.max_images}")
    from mimkit.engine.runfolder import check_output_file

    check_output_file(args.output, "--output", (".json",), "the statistics")  # before measuring, not after
    ds = open_dataset(args.data_path, args.split, _ToArray("L" if args.in_chans == 1 else "RGB"))
    mean, std, n, skipped = channel_stats(ds, args.max_images)
    if any(s == 0 for s in std):
        raise DataError(f"a channel of {args.data_path} is constant (std {std}): it cannot be normalised")
    fmt = ",".join
    m, s = fmt(f"{v:.4f}" for v in mean), fmt(f"{v:.4f}" for v in std)
    print(f"mimkit stats: {args.data_path} ({args.split}): {n} images" + (f", {skipped} unreadable" if skipped else ""))
    print(f"mean {m}\nstd  {s}")
    print(f"use:  --mean {m} --std {s}    (or data.mean=[{m}] data.std=[{s}])")
    record = {"data_path": str(args.data_path), "split": args.split, "images": n, "mean": mean, "std": std}
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    note_results(record)  # the Python API's RunResult.results
    return 0
