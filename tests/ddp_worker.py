"""Launched by torchrun from test_distributed.py: pretrain, then save this rank's final weights."""

import sys
from pathlib import Path

import torch

from mimkit.cli import build_parser
from mimkit.tasks.pretrain import config_from_args, train

if __name__ == "__main__":
    dump = Path(sys.argv[1])
    args = build_parser().parse_args(["pretrain", *sys.argv[2:]])
    summary = train(config_from_args(args), print_summary=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(summary["model"].state_dict(), dump / f"rank{rank}.pt")
