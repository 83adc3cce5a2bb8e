"""`mimkit knn`: weighted k-NN accuracy of a frozen encoder (DINO's evaluation) on a labelled set.

    mimkit knn --checkpoint runs/demo --data_path digits --k 10 20 100
    mimkit knn --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet --pool avg --batch_size 256

Features of train/ and val/ (no augmentation, the official eval resize + centre crop) are L2-normalised;
each val image takes the temperature-weighted vote of its k most cosine-similar training images.
"""

from __future__ import annotations

import argparse

from mimkit import config as C
from mimkit.tasks.evaluation import common as E


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit knn`."""
    E.add_encoder_arguments(p)
    p.add_argument("--data_path", required=True, help="labelled set: class folders under train/ and val/, digits, or "
                   "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder) with .cls labels")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts (several at once)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cosine / T)")
    p.add_argument("--pool", choices=("cls", "avg"), default="cls", help="cls token or mean of the patch tokens")
    add_common_arguments(p, "knn")


def add_common_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """--batch_size, --num_workers, --device, --seed, --output_dir of the feature commands (knn, rankme)."""
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="off", choices=("auto", "bf16", "fp16", "off"),
                   help="precision of the feature pass: off (fp32, the default: exact, comparable features) | "
                   "auto (bf16 on a GPU with bf16 or a CPU with AVX-512 BF16 / AMX-BF16, else fp32) | bf16 | "
                   "fp16 (GPU only: fp32 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed (of --random_init weights)")
    p.add_argument("--output_dir", default=None, help=f"folder of results.json (kept: a rerun writes results-2.json); "
                   f"default: a new runs/{command}/<timestamp>")


def feature_amp(flag: str | None, device) -> tuple[str, str]:
    """--amp of a feature pass -> (bf16 | fp16 | off, why); off (the default) is said as fp32, whether given or not
    (amp_decision's "as asked" read as if the user had typed it)."""
    from mimkit.engine.precision import amp_decision

    if flag == "off":
        return "off", "fp32, the default: exact features; --amp auto for bf16"
    return amp_decision(flag, device)


def features(args: argparse.Namespace):
    """(model, description, train (feats, labels), val (feats, labels), classes) for knn / rankme."""
    import torch

    from mimkit.data.transforms import eval_transform, normalization_of
    from mimkit.tasks.evaluation.features import extract_features

    torch.manual_seed(args.seed)
    model, desc = E.load_encoder(args.checkpoint, args.model, args.input_size, args.random_init, args.seed)
    tf = eval_transform(model.img_size, model.in_chans, *normalization_of(model))  # the checkpoint's mean/std
    train, val = E.open_labelled(args.data_path, tf, tf)
    device = E.pick_device(args.device)
    model.to(device)
    amp, why = feature_amp(args.amp, device)
    tr = extract_features(model, train, args.batch_size, device, args.pool, args.num_workers, amp)
    va = extract_features(model, val, args.batch_size, device, args.pool, args.num_workers, amp)
    return model, f"{desc}; amp {amp} ({why})", tr, va, list(train.classes)


def run(args: argparse.Namespace) -> int:
    """Extract features, classify val by k-NN for every k, report."""
    from mimkit.engine.runfolder import check_results_dir
    from mimkit.errors import UserError
    from mimkit.metrics.knn import knn_accuracy

    if min(args.k) < 1 or args.temperature <= 0:
        raise UserError("--k must be >= 1 and --temperature > 0")
    check_results_dir(args.output_dir)  # before the feature pass: a file or read-only folder is refused now
    _, desc, (xtr, ytr), (xva, yva), classes = features(args)
    print(f"mimkit knn: {desc}; {len(xtr)} train / {len(xva)} val images, {len(classes)} classes")
    acc = knn_accuracy(xtr, ytr, xva, yva, ks=args.k, temperature=args.temperature, num_classes=len(classes))
    metrics = {f"knn_top1_k{k}": 100.0 * a for k, a in acc.items()}
    E.report(args.output_dir or C.new_run_dir("knn"), "knn", metrics, args.checkpoint, args.data_path, _config(args),
             {"model": desc, "num_train": len(xtr), "num_val": len(xva), "classes": classes}, keep_earlier=True)
    return 0


def _config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "items")}
