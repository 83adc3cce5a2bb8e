"""Launched by torchrun from test_shards.py: the images each rank reads from shards per epoch, then pretraining."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from mimkit.cli import build_parser
from mimkit.data.sources import open_dataset
from mimkit.data.datasets import collate_batch
from mimkit.engine import distributed as D
from mimkit.engine.sampling import EpochSampler, SeededSamples, build_loader
from mimkit.tasks.pretrain import config_from_args, train


class Digest:
    """PIL image -> (8,) uint8 tensor: the first bytes of its pixels' SHA-1 (identifies the sample)."""

    def __call__(self, img):
        return torch.tensor(list(hashlib.sha1(img.tobytes()).digest()[:8]), dtype=torch.uint8)


if __name__ == "__main__":
    dump, data, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    info = D.init_distributed("cpu")
    ds = open_dataset(data, "train", Digest())
    sampler = EpochSampler(ds, info.rank, info.world_size, seed=0)
    loader = build_loader(SeededSamples(ds, 0), batch, sampler, collate_batch, 2, False, False, 0)
    seen = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen[epoch] = [bytes(row.tolist()).hex() for b in loader for row in b["images"]]
    (dump / f"seen{info.rank}.json").write_text(json.dumps(seen))
    args = build_parser().parse_args(["pretrain", *sys.argv[4:], "--data_path", data])
    summary = train(config_from_args(args), print_summary=False)
    torch.save(summary["model"].state_dict(), dump / f"rank{info.rank}.pt")
