"""What photos' val split measures: a logistic-regression check of frozen features, in-region vs held-out region.

For each seed's study encoder and its random twin: L2-regularised logistic regression (scikit-learn, C = 1) on
standardised frozen features (each block's mean patch token and cls token, and the final norm's), trained on the
even train crops and read on the odd ones (the train region: overlapping crops, so optimistic), and trained on
all train crops and read on the val crops (the held-out last 30 % of each source image).
docs/evaluation_log.md ("Photos: what the held-out region measures") has its output.

    python benchmarks/pays_region_check.py --study runs/pretraining_pays --data photos
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def block_features(model, images: torch.Tensor) -> dict[str, np.ndarray]:
    """{'b<i>_avg' | 'b<i>_cls' | 'norm_avg' | 'norm_cls': (N, D)} of the unmasked encoder, images (N, C, H, W)."""
    with torch.no_grad():
        x = model.patch_embed(images) + model.pos_embed[:, 1:]
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1)
        out = {}
        for i, block in enumerate(model.blocks):
            x = block(x)
            out[f"b{i}_avg"], out[f"b{i}_cls"] = x[:, 1:].mean(1).numpy(), x[:, 0].numpy()
        x = model.norm(x)
        out["norm_avg"], out["norm_cls"] = x[:, 1:].mean(1).numpy(), x[:, 0].numpy()
    return out


def accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Top-1 % of a logistic regression (C = 1) on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scale = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(scale.transform(xtr), ytr)
    return 100.0 * clf.score(scale.transform(xte), yte)


def main(argv: list[str] | None = None) -> int:
    """Print, per seed and init, 'feature: held-out region % / train region %'."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="a pretraining_pays.py --out folder (default: none)")
    p.add_argument("--data", default="photos", help="built-in set (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)")
    a = p.parse_args(argv)
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import eval_transform, normalization_of
    from mimkit.tasks.evaluation.common import load_encoder

    for seed in a.seeds:
        ckpt = Path(a.study) / a.data / f"seed{seed}" / "pretrain" / "checkpoints" / "final.pt"
        for init, rnd in (("pretrained", False), ("random", True)):
            model = load_encoder(str(ckpt), random_init=rnd, seed=seed)[0].eval()
            tf = eval_transform(model.img_size, model.in_chans, *normalization_of(model))
            split = {}
            for name in ("train", "val"):
                ds = open_dataset(a.data, name, tf)
                split[name] = (block_features(model, torch.stack([ds[i][0] for i in range(len(ds))])),
                               np.asarray(ds.targets))
            (ftr, ytr), (fva, yva) = split["train"], split["val"]
            even = np.arange(len(ytr)) % 2 == 0
            cells = [f"{k} {accuracy(ftr[k], ytr, fva[k], yva):.0f}/"
                     f"{accuracy(ftr[k][even], ytr[even], ftr[k][~even], ytr[~even]):.0f}" for k in ftr]
            print(f"seed {seed} {init:10s} " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
