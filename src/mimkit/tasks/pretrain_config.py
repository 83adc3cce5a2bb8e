"""Command line -> config of `mimkit pretrain`, and of every command built on its flags.

The Flag table (the official MAE names and the config keys they set), their argparse registration with each
default shown, and the layers under a run's config: preset <- config file <- flags <- dotted overrides, with a
starting checkpoint's architecture and a classifier's --resume settings placed where DESIGN.md's precedence says.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine.precision import AMP_HELP
from mimkit.errors import ConfigError

DEMO_PRESET = "pretrain/demo.yaml"
# Built-in sets are demo data: without --model or a config file they get a CPU-sized preset, never ViT-L at 224 px.
BUILTIN_PRESETS = {"digits": "pretrain/digits.yaml", "photos": "pretrain/photos.yaml", "*": "pretrain/demo.yaml"}


@dataclass
class Flag:
    """A familiar command-line flag and the config key it sets."""

    name: str
    key: str
    type: Any = str
    help: str = ""
    const: Any = None  # for store_const flags (value set when the flag is present)


# Run folder, schedule and optimiser flags every training command shares (official names).
TRAINING_FLAGS: list[Flag] = [
    Flag("output_dir", "misc.output_dir", str, "run folder (resumed when it holds a run); unset = a new "
         "runs/<command>/<timestamp>"),
    Flag("epochs", "schedule.epochs", int),
    Flag("warmup_epochs", "schedule.warmup_epochs", float),
    Flag("start_epoch", "schedule.start_epoch", int),
    Flag("batch_size", "optimization.batch_size", int, "per-device batch size"),
    Flag("accum_iter", "optimization.accum_iter", int, "gradient accumulation steps"),
    Flag("blr", "optimization.base_lr", float, "base lr: lr = blr * effective batch / 256"),
    Flag("lr", "optimization.lr", float, "absolute lr (overrides --blr)"),
    Flag("min_lr", "optimization.min_lr", float, "floor of the cosine schedule"),
    Flag("weight_decay", "optimization.weight_decay", float),
]

# The official MAE / seeds' flag names, mapped onto config keys.
FLAGS: list[Flag] = [
    Flag("model", "model.type", str, "model name (`mimkit models`)"),
    Flag("data_path", "data.data_path", str, "class folders, a flat image folder, a built-in set or "
         "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder); unset = demo"),
    *TRAINING_FLAGS,
    Flag("clip_grad", "optimization.gradient_clip", float, "max gradient norm"),
    Flag("mask_ratio", "model.mask_ratio", float),
    Flag("norm_pix_loss", "model.norm_pix_loss", None, "normalised-pixel targets", const=True),
    Flag("loss_mode", "model.loss_mode", str, "masked_only | all_pixels"),
    Flag("freeze_mode", "model.freeze_mode", str, "none | encoder_layernorms_only | layernorm_only | encoder_only"),
    Flag("init_from", "model.init_from", str, "start from these weights (official / HF / mimkit)"),
    Flag("drop_path", "model.drop_path", float),
    Flag("patch_size", "model.kwargs.patch_size", int, "override the model's patch size"),
    Flag("in_chans", "model.kwargs.in_chans", int, "input channels (1 = grayscale)"),
    Flag("hog_nbins", "model.kwargs.hog_nbins", int, "LocalMIM: HOG orientation bins"),
    Flag("hog_bias", "model.kwargs.hog_bias", None, "LocalMIM: fixed random bias on the HOG gradients", const=True),
    Flag("input_size", "data.input_size", int, "image size"),
    Flag("mean", "data.mean", C.float_list, "per-channel normalisation mean, e.g. 0.5,0.5,0.5 (`mimkit stats`)"),
    Flag("std", "data.std", C.float_list, "per-channel normalisation std, e.g. 0.25,0.25,0.25"),
    Flag("num_workers", "data.num_workers", int),
    Flag("augment_on", "data.augment_on", str, "workers | device: where crop, flip and normalise run"),
    Flag("pin_mem", "data.pin_memory", None, "pin host memory (GPU runs)", const=True),
    Flag("no_pin_mem", "data.pin_memory", None, "do not pin host memory", const=False),
    Flag("seed", "misc.seed", int),
    Flag("device", "misc.device", str, "auto | cpu | cuda | cuda:N"),
    Flag("resume", "misc.resume", str, "checkpoint (file or folder) to resume"),
    Flag("no_auto_resume", "misc.auto_resume", None, "do not resume from <output_dir>/checkpoints/latest.pt",
         const=False),
    Flag("amp", "misc.amp", str, AMP_HELP),
    Flag("no_tf32", "misc.tf32", None, "disable TF32 matmuls", const=False),
    Flag("compile", "misc.compile", None, "torch.compile the model", const=True),
    Flag("max_steps", "misc.max_steps", int, "stop after N optimiser steps"),
    Flag("save_freq_epochs", "checkpointing.save_freq_epochs", int),
    Flag("save_freq_steps", "checkpointing.save_freq_steps", int),
    Flag("keep_last_n", "checkpointing.keep_last_n", int),
    Flag("save_safetensors", "checkpointing.safetensors", None, "also write weights as safetensors", const=True),
    Flag("print_freq", "logging.print_freq", int),
    Flag("eval_data_path", "eval.eval_data_path", str, "labelled data for k-NN / RankMe monitoring"),
    Flag("eval_every", "eval.eval_every", int, "epochs between monitoring evaluations"),
    Flag("freezeout", "freezeout.enabled", None, "progressive layer freezing", const=True),
    Flag("how_scale", "freezeout.how_scale", str, "FreezeOut: linear | squared | cubic"),
    Flag("t_0", "freezeout.t_0", float,
         "FreezeOut: block i freezes at scale(t_0 + (1 - t_0) i / depth), t_0 in (0, 1]"),
    Flag("no_scale_lr", "freezeout.scale_lr", None, "FreezeOut: keep every block's base lr", const=False),
    Flag("freeze_heads", "freezeout.freeze_heads", None, "FreezeOut: freeze a tap's head with its block", const=True),
]


def add_arguments(p: argparse.ArgumentParser, flags: list[Flag] = FLAGS, schema: type = C.PretrainConfig) -> None:
    """Register the config-file / override positionals and every flag, its help showing the default."""
    p.add_argument("items", nargs="*", metavar="CONFIG_OR_KEY=VALUE",
                   help="a YAML/JSON config file (or a preset under configs/, e.g. pretrain/mae_vit_base.yaml) "
                        "and dotted overrides such as optimization.base_lr=1.5e-4")
    p.add_argument("--config", default=None, help="config file (same as the positional)")
    defaults = OmegaConf.structured(schema)
    for f in flags:
        # every flag says the key it sets and that key's default, one way: 'sets KEY [to VALUE] (default: VALUE)'
        value = OmegaConf.select(defaults, f.key, default=None)
        default = "the model's own" if value is None and ".kwargs." in f.key else _show(value)
        text = f.help + "; " if f.help else ""
        if "default" in f.help:
            help_text = f"{text}sets {f.key}"
        elif f.const is not None:
            help_text = f"{text}sets {f.key} to {_show(f.const)} (default: {default})"
        else:
            help_text = f"{text}sets {f.key} (default: {default})"
        if f.const is not None:
            p.add_argument(f"--{f.name}", dest=f.name, action="store_const", const=f.const, default=None,
                           help=help_text)
        else:
            p.add_argument(f"--{f.name}", dest=f.name, type=f.type, default=None, help=help_text)
    p.add_argument("--world_size", type=int, default=None, help="accepted for the official launch commands; "
                   "must equal the number of processes torchrun started")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log_dir", default=None, help="accepted for the official commands; TensorBoard always "
                   "writes to <output_dir>/tb")


def _show(value: Any) -> str:
    """A default as the user would type it (None -> none, True -> true)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_from_args(args: argparse.Namespace, flags: list[Flag] = FLAGS, schema: type = C.PretrainConfig,
                     demo_preset: Optional[str] = DEMO_PRESET,
                     data_presets: Optional[dict[str, str]] = None,
                     builtin_presets: Optional[dict[str, str]] = None) -> DictConfig:
    """Layers: preset <- config file <- flags <- dotted overrides; validated before any work.

    The preset underneath: `demo_preset` when no layer names any data, else `data_presets[data_path]` (CPU-sized
    presets of the built-in sets) when no config file is given; `builtin_presets` (name -> preset, '*' for any
    other built-in set) when every data path given is a built-in set and neither a config file nor --model is
    given (built-in sets are demo data: the official ViT-L recipe is never built for them by default);
    cfg.misc.preset records which one applied. A
    starting checkpoint (model.init_from) gives its architecture above presets and the config file (its input size
    beneath the file), unless a flag names another model; a classifier's --resume gives its input size and pooling.
    """
    files = [i for i in args.items if "=" not in i] + ([args.config] if args.config else [])
    overrides = [i for i in args.items if "=" in i]
    numbers = [f for f in files if _is_number(f)]
    if numbers:  # `--mean 0.5 0.4 0.3`: the values after the first land here
        raise ConfigError(f"stray value(s) {', '.join(numbers)}: a per-channel flag takes one comma-separated "
                          f"value, e.g. --mean 0.5,0.4,0.3 --std 0.2,0.2,0.2")
    if len(files) > 1:
        raise ConfigError(f"give at most one config file, got {', '.join(files)}")
    file_layers = [(files[0], C.load_file(files[0]))] if files else []
    from_flags: dict = {}
    for f in flags:
        v = getattr(args, f.name, None)
        if v is not None:
            _set_dotted(from_flags, f.key, v)
    user = [("command-line flags", from_flags)] + ([("overrides", C.parse_dotlist(overrides))] if overrides else [])
    preset = None
    if demo_preset and not any(C._get(d, "data.data_path") for _, d in file_layers + user):
        preset = demo_preset
    elif not files:
        data = next((C._get(d, "data.data_path") for _, d in reversed(user) if C._get(d, "data.data_path")), None)
        preset = (data_presets or {}).get(str(data)) if data else None
        if preset is None and builtin_presets and _all_builtin(user) and not _named_model(user):
            preset = builtin_presets.get(str(data), builtin_presets.get("*"))
    below = [(preset, _preset_layer(preset, user))] if preset else []
    cfg = C.build_config(schema, below + file_layers + user)
    resume = OmegaConf.select(cfg, "misc.resume", default=None)
    if resume and OmegaConf.select(cfg, "model.finetune", default=_NO) is not _NO:
        below += _resume_layer(resume)
    above: list = []
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    if init_from:
        arch_below, above = _architecture_layers(init_from, user)
        below += arch_below
    if len(below) > (1 if preset else 0) or above:
        cfg = C.build_config(schema, below + file_layers + above + user)
    if "preset" in cfg.misc:
        OmegaConf.set_struct(cfg, False)
        cfg.misc.preset = preset
        OmegaConf.set_struct(cfg, True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "world_size", None) not in (None, world):
        raise ConfigError(f"--world_size {args.world_size} but {world} process(es) were launched")
    return cfg


_NO = object()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _data_specs(user: list[tuple[str, dict]]) -> list[str]:
    """Every data path the user's layers name: data.data_path and continual.domains."""
    specs: list[str] = []
    for _, d in user:
        if C._get(d, "data.data_path"):
            specs.append(str(C._get(d, "data.data_path")))
        specs += [str(x) for x in (C._get(d, "continual.domains") or [])]
    return specs


def _all_builtin(user: list[tuple[str, dict]]) -> bool:
    """True when the user names data and every data path is a built-in set (an existing folder wins)."""
    from mimkit.data.builtin import is_builtin

    specs = _data_specs(user)
    return bool(specs) and all(is_builtin(s) and not Path(s).expanduser().exists() for s in specs)


def _named_model(user: list[tuple[str, dict]]) -> Optional[str]:
    """The model a flag or override names, if any."""
    return next((C._get(d, "model.type") for _, d in reversed(user) if C._get(d, "model.type")), None)


def _preset_layer(preset: str, user: list[tuple[str, dict]]) -> dict:
    """The preset's dict; its data (path or domain list) gives way to the data the user names."""
    data = C.load_file(preset)
    specs = _data_specs(user)
    if specs:
        (data.get("data") or {}).pop("data_path", None)
        cont = data.get("continual") or {}
        cont.pop("domains", None)
        if cont.get("eval_domains"):  # a domain the user trains on is no longer a held-out one
            cont["eval_domains"] = [d for d in cont["eval_domains"] if d not in specs]
    return data


def _architecture_layers(init_from: str, user: list[tuple[str, dict]]) -> tuple[list, list]:
    """(input-size layer for beneath the config file, model layer for above it) of a starting checkpoint.

    Empty when the checkpoint says nothing readable. When a flag / override names another model, the user's
    model is built with its own kwargs and input size, but the checkpoint's mean / std still lie beneath: the
    weights were trained on inputs normalised so (a config file or --mean / --std still win).
    """
    from mimkit.models.loading import architecture_of

    arch = architecture_of(init_from)
    if not arch:
        return [], []
    data = dict(arch.get("data") or {})
    named = next((C._get(d, "model.type") for _, d in reversed(user) if C._get(d, "model.type")), None)
    if named and not C.same_model(named, arch["model"]["type"]):
        norm = {k: data[k] for k in ("mean", "std") if data.get(k) is not None}
        return ([(f"normalisation of {init_from}", {"data": norm})] if norm else []), []
    below = [(f"input size of {init_from}", {"data": data})] if data else []
    return below, [(C.ARCH_ORIGIN + str(init_from), {"model": arch["model"]})]


def _resume_layer(resume: str) -> list[tuple[str, dict]]:
    """The input size and pooling a classifier checkpoint was trained with (for --eval / resuming at its size)."""
    from mimkit.engine.checkpoint import load_training_checkpoint

    saved = load_training_checkpoint(resume).get("config") or {}
    layer: dict = {}
    if (saved.get("data") or {}).get("input_size") is not None:
        layer["data"] = {"input_size": saved["data"]["input_size"]}
    if (saved.get("model") or {}).get("global_pool") is not None:
        layer["model"] = {"global_pool": saved["model"]["global_pool"]}
    return [(f"training config of {resume}", layer)] if layer else []


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value
