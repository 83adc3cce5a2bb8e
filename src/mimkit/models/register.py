"""The model table: a builder registers under its own function name; aliases map the official and seeds' names.

Builder modules import this (never registry.py), so registry.py can import every builder module without a circle.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn` under its own name."""
    _BUILDERS[fn.__name__] = fn
    return fn


def register_alias(alias: str, target: str) -> None:
    """Register another name for an existing model (e.g. the official or a seed's name)."""
    _ALIASES[alias] = target
