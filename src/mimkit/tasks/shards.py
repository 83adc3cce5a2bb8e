"""`mimkit shards`: pack an image set into WebDataset tar shards (+ an index) that every --data_path reads.

    mimkit shards /imagenet shards/ --shard_size 1000     # train-000000.tar ..., val-..., train.index.json
    mimkit pretrain --data_path 'shards/train-{000000..001281}.tar'
    mimkit linprobe --data_path shards/ ...               # a shard folder: train-*.tar and val-*.tar

Each sample is `<key>.<ext>` (the image file's bytes, not re-encoded) and `<key>.cls` (its class index) when the
source has class folders; `<split>.index.json` holds the counts, class names and member offsets.
"""

from __future__ import annotations

import argparse

from mimkit.config import note_output, note_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit shards`."""
    p.add_argument("src", metavar="SRC_FOLDER", help="class folders (with or without train/ and val/), a flat "
                   "image folder, or a built-in set")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the shards (must not hold shards yet)")
    p.add_argument("--shard_size", type=int, default=1000, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Write the shards and say how to use them."""
    from mimkit.data.packing import write_shards

    result = write_shards(args.src, args.out_dir, args.shard_size, args.seed)
    note_output(args.out_dir)
    note_results(result)  # the Python API's RunResult.results
    for split, r in result.items():
        bad = f", {r['skipped']} undecodable image(s) skipped" if r.get("skipped") else ""
        print(f"mimkit shards: {split}: {r['count']} images in {r['shards']} shard(s){bad}, index {r['index']}")
    both = f"  (or --data_path {args.out_dir} for train and val)" if "val" in result else ""
    print(f"use: --data_path '{result['train']['pattern']}'{both}")
    return 0
