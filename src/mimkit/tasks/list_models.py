"""`mimkit models`: every registered model with its encoder / decoder / total parameter counts."""

from __future__ import annotations

import argparse

import torch

from mimkit.models.registry import _ALIASES, create_model, list_models


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit models`."""
    p.add_argument("--aliases", action="store_true", help="also list alias names (official and seed names)")


def count_params(name: str) -> tuple[int, int]:
    """(encoder, total) parameter counts of a model, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        m = create_model(name)
    enc = sum(p.numel() for n, p in m.named_parameters() if m.is_encoder_param(n))
    return enc, sum(p.numel() for p in m.parameters())


def run(args: argparse.Namespace) -> int:
    """Print the table."""
    print(f"{'model':<34}{'encoder':>15}{'decoder/heads':>15}{'total':>15}")
    for name in list_models(include_aliases=False):
        enc, tot = count_params(name)
        print(f"{name:<34}{enc:>15,}{tot - enc:>15,}{tot:>15,}")
    if args.aliases:
        print("\naliases:")
        for alias, target in sorted(_ALIASES.items()):
            print(f"  {alias:<36}-> {target}")
    return 0
