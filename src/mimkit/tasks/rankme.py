"""`mimkit rankme`: RankMe (Garrido et al., arXiv 2210.02885) of a frozen encoder's features on a set.

    mimkit rankme --checkpoint runs/demo --data_path digits
    mimkit rankme --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet --split val --pool avg

RankMe = exp(entropy of the L1-normalised singular values of the (N, D) feature matrix): the effective
rank, between 1 and min(N, D); higher means less collapsed features. No labels are used (unlabelled folders
work too).
"""

from __future__ import annotations

import argparse

from mimkit.tasks.evaluation import common as E
from mimkit import config as C
from mimkit.tasks.knn import _config, add_common_arguments, feature_amp


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit rankme`."""
    E.add_encoder_arguments(p)
    p.add_argument("--data_path", required=True, help="image folder (labels not needed), a built-in set, or "
                   "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="which split")
    p.add_argument("--pool", choices=("cls", "avg"), default="cls", help="cls token or mean of the patch tokens")
    p.add_argument("--max_images", type=int, default=25600, help="use at most this many images (the paper: 25600)")
    add_common_arguments(p, "rankme")


def run(args: argparse.Namespace) -> int:
    """Extract features of one split and report RankMe."""
    import torch
    from torch.utils.data import Subset

    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import eval_transform, normalization_of
    from mimkit.errors import DataError
    from mimkit.metrics import rankme
    from mimkit.tasks.evaluation.features import extract_features

    from mimkit.engine.runfolder import check_results_dir

    check_results_dir(args.output_dir)  # before the feature pass: a file or read-only folder is refused now
    if args.max_images < 2:
        raise DataError(f"bad value for --max_images: {args.max_images} (RankMe needs at least 2 images)")
    torch.manual_seed(args.seed)
    model, desc = E.load_encoder(args.checkpoint, args.model, args.input_size, args.random_init, args.seed)
    ds = open_dataset(args.data_path, args.split, eval_transform(model.img_size, model.in_chans,
                                                                   *normalization_of(model)))
    if len(ds) < 2:
        raise DataError(f"{args.data_path} ({args.split}) has {len(ds)} image(s); RankMe needs at least 2")
    if len(ds) > args.max_images:  # a fixed, evenly spread subset: the same images every run
        ds = Subset(ds, torch.linspace(0, len(ds) - 1, args.max_images).long().tolist())
    device = E.pick_device(args.device)
    amp, why = feature_amp(args.amp, device)
    feats, _ = extract_features(model.to(device), ds, args.batch_size, device, args.pool, args.num_workers, amp)
    value = rankme(feats)
    print(f"mimkit rankme: {desc}; {len(feats)} images, feature dim {feats.shape[1]}; amp {amp} ({why})")
    metrics = {"rankme": value, "max_rank": min(feats.shape), "num_images": len(feats)}
    E.report(args.output_dir or C.new_run_dir("rankme"), "rankme", metrics, args.checkpoint, args.data_path,
             _config(args), {"model": desc}, keep_earlier=True)
    return 0
