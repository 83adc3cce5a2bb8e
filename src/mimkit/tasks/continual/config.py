"""Config of `mimkit continual`: its schema (seed 000's defaults), flags, presets and the domain sequence.

Same layers as pretraining (`mimkit.tasks.pretrain.config`): preset <- config file <- flags <- overrides, with
--continual_checkpoint, --domains and --sweep added, and the continual-only rules checked before any work.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from mimkit import config as C
from mimkit.errors import ConfigError
from mimkit.tasks.pretrain.config import FLAGS as PRETRAIN_FLAGS
from mimkit.tasks.pretrain.config import seed_freezeout_flags

CPU_HINT = ("continual/demo.yaml fits a CPU (mae_vit_nano_patch8 at 64 px, 3 epochs per stage): mimkit continual "
            "continual/demo.yaml --domains DIR1 DIR2; built-in domains get it by default")

DEMO_PRESET = "continual/demo.yaml"
SWEEP_PRESET = "continual/sweep.yaml"


@dataclass
class ContinualModelConfig(C.ModelConfig):
    type: str = "continual_mae_vit_large_patch16"  # seed 000's default model (an alias of mae_vit_large_patch16)
    loss_mode: str = "all_pixels"  # seed 000's default: dense loss on every patch


@dataclass
class ContinualOptimizationConfig(C.OptimizationConfig):
    base_lr: float = 1e-4  # seed 000's --blr default (lower than pretraining: continual steps are small)


@dataclass
class ContinualScheduleConfig(C.ScheduleConfig):
    epochs: int = 100  # per stage (seed 000's default)
    warmup_epochs: float = 5  # per stage; the seed gives none, and pretraining's 40 exceeds its 25-50 epoch presets


@dataclass
class ContinualSection:
    domains: List[str] = field(default_factory=list)  # trained in order: folders or built-in names; [] = data_path
    eval_domains: List[str] = field(default_factory=list)  # evaluated after every stage but never trained
    eval_batch_size: int = 64  # batch size of the evaluation passes
    eval_initial: bool = True  # also evaluate the starting weights (the 'initial' row: drop from the start)
    eval_seed: int = 0  # seeds the fixed evaluation masks (with each domain's name)
    knn_k: int = 20  # neighbours of the k-NN classifier
    knn_temperature: float = 0.07  # DINO's weighting temperature
    pool: str = "cls"  # encoder feature for k-NN: cls | avg
    base_data: Optional[str] = None  # --sweep without a checkpoint: pretrain the shared start on this set first
    base_epochs: int = 10  # epochs of that base pretraining (freeze none, masked_only: the standard MAE recipe)


@dataclass
class ContinualConfig(C.PretrainConfig):
    model: ContinualModelConfig = field(default_factory=ContinualModelConfig)
    optimization: ContinualOptimizationConfig = field(default_factory=ContinualOptimizationConfig)
    schedule: ContinualScheduleConfig = field(default_factory=ContinualScheduleConfig)
    continual: ContinualSection = field(default_factory=ContinualSection)


FLAGS: list[C.Flag] = [
    *PRETRAIN_FLAGS,
    C.Flag("continual_checkpoint", "model.init_from", str, "start from these weights (official MAE .pth, Hugging "
           "Face ViTMAE or mimkit); same as --init_from"),
]
DOMAINS_FLAG = C.Flag("domains", "continual.domains")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pretraining flags with continual defaults, --continual_checkpoint, --domains and --sweep."""
    C.add_arguments(p, FLAGS, ContinualConfig)
    p.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                   help="train on these in turn (folders, shards or built-in sets: photos microscopy textures space); "
                        "sets continual.domains")
    p.add_argument("--sweep", action="store_true",
                   help="run every freeze_mode x loss_mode on the domain sequence from one starting checkpoint "
                        "and write the comparison table (sweep.md, sweep.json)")


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """Flags/overrides over the schema; with no data anywhere, the demo (or sweep) preset goes underneath."""
    bad = [d for d in (getattr(args, "domains", None) or []) if "=" in d and not Path(d).exists()]
    if bad:
        raise ConfigError(f"'{bad[0]}' follows --domains, which takes every word after it; put key=value "
                          "overrides before --domains")
    flags = [*FLAGS, DOMAINS_FLAG]
    seed_freezeout_flags(args)
    # built-in domains are demo data: the demo's CPU-sized recipe unless --model or a config file says otherwise
    sweep = getattr(args, "sweep", False)
    cfg = C.config_from_args(args, flags, ContinualConfig, demo_preset=None,
                             builtin_presets={"*": SWEEP_PRESET if sweep else DEMO_PRESET})
    if not cfg.continual.domains and not cfg.data.data_path:
        preset = SWEEP_PRESET if sweep else DEMO_PRESET
        # build_config puts the preset under every layer when none sets data.data_path (true here)
        cfg = C.config_from_args(args, flags, ContinualConfig, demo_preset=preset)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Continual-only rules (the shared ones ran in build_config)."""
    c = cfg.continual
    if c.domains and cfg.data.data_path:
        raise ConfigError("give either --data_path (one domain) or --domains (a sequence), not both")
    if not c.domains and not cfg.data.data_path:
        raise ConfigError("no data: give --data_path or --domains")
    C.check_rules(cfg, [("continual.eval_batch_size", c.eval_batch_size >= 1, ">= 1"),
                        ("continual.knn_k", c.knn_k >= 1, ">= 1"),
                        ("continual.knn_temperature", c.knn_temperature > 0, "> 0"),
                        ("continual.pool", c.pool in ("cls", "avg"), "cls or avg"),
                        ("continual.base_epochs", c.base_epochs >= 1, ">= 1")])
    names = [domain_name(d) for d in sequence_domains(cfg)] + [domain_name(d) for d in c.eval_domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"domain '{dup[0]}' appears twice in continual.domains / eval_domains; each domain is "
                          "one column of the results matrix")


def sequence_domains(cfg: DictConfig) -> list[str]:
    """The trained domains in order: continual.domains, or the single data.data_path."""
    return list(cfg.continual.domains) or [cfg.data.data_path]


def domain_name(spec: str) -> str:
    """A short, file-safe name: the built-in name or the folder's last component."""
    name = Path(str(spec).rstrip("/\\")).name or str(spec)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
