"""One config system: OmegaConf structured schemas, YAML/JSON files, familiar flags and dotted overrides.

Layers, later wins: schema defaults <- demo preset (only when no data path is given anywhere)
<- config file <- command-line flags <- `section.key=value` overrides. The section layout is seed 001's
(`model / optimization / schedule / data / checkpointing / logging / misc`), so its JSON files load as they are.

One model name is one architecture: `model.kwargs` belong to the `model.type` named beside them, so a layer that
names another model drops the kwargs of the layers beneath it (a preset's kwargs never apply under a user's
`--model`), and a layer taken from a checkpoint (origin starting with ARCH_ORIGIN) replaces them whole.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mimkit.errors import ConfigError, suggest

PRESET_DIR = Path(__file__).parent / "configs"
ARCH_ORIGIN = "architecture of "  # origin of a layer read from a checkpoint: a complete model.type + model.kwargs
RUNS_DIR = "runs"  # default run folders: runs/<command>/<timestamp>


@dataclass
class ModelConfig:
    type: str = "mae_vit_large_patch16"  # registered model name (`mimkit models` lists them)
    norm_pix_loss: bool = False  # predict per-patch normalised pixels (the paper's best setting)
    mask_ratio: float = 0.75  # fraction of patches removed, in [0, 1)
    loss_mode: str = "masked_only"  # masked_only (official) | all_pixels (seed 000's dense loss)
    freeze_mode: str = "none"  # none | encoder_layernorms_only | layernorm_only | encoder_only
    drop_path: float = 0.0  # stochastic depth rate of the encoder
    init_from: Optional[str] = None  # weights to start from: official MAE .pth, Hugging Face, mimkit, safetensors
    kwargs: Dict[str, Any] = field(default_factory=dict)  # other builder options (depth, patch_size, hog_nbins, ...)


@dataclass
class OptimizationConfig:
    batch_size: int = 64  # per-device batch size
    accum_iter: int = 1  # gradient accumulation steps
    base_lr: float = 1.5e-4  # blr: lr = blr * effective batch / 256
    lr: Optional[float] = None  # absolute lr; overrides base_lr when set
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # not applied to biases, norms, tokens
    optimizer: str = "adamw"  # adamw (the only choice for pretraining, as the paper)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    gradient_clip: Optional[float] = None  # max grad norm; None = no clipping (official pretraining)
    on_nonfinite: str = "stop"  # what a NaN/inf loss (or clipped grad norm) does: stop | skip (the step) | rollback
    max_rollbacks: int = 3  # rollback: reloads of the last checkpoint allowed per run, then stop
    rollback_lr_scale: float = 1.0  # rollback: multiply the lr by this after each rollback (e.g. 0.5)
    rollback_amp: Optional[str] = None  # rollback: fall back to this more precise amp (bf16 | off); null keeps it


@dataclass
class ScheduleConfig:
    epochs: int = 400  # training epochs
    warmup_epochs: float = 40  # linear warmup, per iteration
    start_epoch: int = 0  # first epoch (a resume overrides it)


@dataclass
class AugmentationConfig:
    crop_scale_min: float = 0.2  # RandomResizedCrop scale range lower bound
    crop_scale_max: float = 1.0
    hflip: bool = True  # random horizontal flip


@dataclass
class DataConfig:
    data_path: Optional[str] = None  # class folders, a flat image folder, or a built-in set; None = the demo
    input_size: Any = 224  # int or [H, W]
    mean: Optional[List[float]] = None  # per-channel normalisation mean (one per in_chans); None = ImageNet's
    std: Optional[List[float]] = None  # per-channel normalisation std; `mimkit stats DIR` computes both
    num_workers: int = 10  # data-loading worker processes
    pin_memory: bool = True
    persistent_workers: bool = True
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class PretrainDataConfig(DataConfig):
    # workers: decode + RandomResizedCrop + flip + normalise in DataLoader workers (the official recipe);
    # device: workers only read/decode, the crop-resize-flip-normalise runs batched on the training device
    augment_on: str = "workers"


@dataclass
class CheckpointingConfig:
    checkpoint_dir: Optional[str] = None  # default: <output_dir>/checkpoints
    save_freq_epochs: int = 50  # epoch-N/ every N epochs (and the last); 0 = never
    save_freq_steps: int = 0  # step-N/ every N optimiser steps; 0 = never
    keep_last_n: int = 5  # epoch-N/ and step-N/ folders kept (each kind); 0 = keep all
    safetensors: bool = False  # also write model.safetensors (weights only) beside each checkpoint


@dataclass
class LoggingConfig:
    print_freq: int = 100  # log a line every N iterations when not on a terminal
    console_clear_freq: int = 100  # kept for seed 001 configs; the progress bar redraws in place
    tensorboard: bool = True  # write TensorBoard scalars and images to <output_dir>/tb
    vis_freq_epochs: int = 1  # reconstruction PNG every N epochs; 0 = only at the end


@dataclass
class EvalConfig:
    eval_data_path: Optional[str] = None  # labelled folder or built-in set for k-NN / RankMe monitoring
    eval_every: int = 0  # epochs between evaluations; 0 = never
    knn_k: List[int] = field(default_factory=lambda: [20])


@dataclass
class FreezeOutConfig:
    enabled: bool = False  # progressive layer freezing (Brock et al. 2017)
    how_scale: str = "cubic"  # linear | squared | cubic
    t_0: float = 0.8  # fraction of training at which the first block freezes (before scaling)
    scale_lr: bool = True  # raise each block's lr by 1/t_i
    freeze_heads: bool = False  # freeze a tap's decoder head with its block (LocalMIM ablation)


@dataclass
class MiscConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: Optional[str] = None  # the run folder; None = a new runs/<command>/<timestamp>
    resume: Optional[str] = None  # checkpoint to resume from (a .pt file or a checkpoint folder)
    auto_resume: bool = True  # resume from <checkpoint_dir>/latest.pt when it exists
    amp: str = "auto"  # auto (bf16 on a GPU or a CPU with native bf16, else off) | bf16 | fp16 | off
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    compile: bool = False  # torch.compile the model
    max_steps: int = 0  # stop after N optimiser steps (smoke tests); 0 = no limit
    preset: Optional[str] = None  # recorded by the run: the preset put beneath your layers (demo, built-in data)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    freezeout: FreezeOutConfig = field(default_factory=FreezeOutConfig)
    misc: MiscConfig = field(default_factory=MiscConfig)


# Value constraints: key -> (predicate, what a valid value is). Types are checked by OmegaConf.
CONSTRAINTS: dict[str, tuple] = {
    "model.mask_ratio": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "model.loss_mode": (lambda v: v in ("masked_only", "all_pixels"), "masked_only or all_pixels"),
    "model.freeze_mode": (
        lambda v: v in ("none", "encoder_layernorms_only", "layernorm_only", "encoder_only"),
        "none, encoder_layernorms_only, layernorm_only or encoder_only",
    ),
    "model.drop_path": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "optimization.batch_size": (lambda v: v >= 1, ">= 1"),
    "optimization.accum_iter": (lambda v: v >= 1, ">= 1"),
    "optimization.base_lr": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "optimization.lr": (lambda v: v is None or (v > 0 and math.isfinite(v)), "> 0"),
    "optimization.min_lr": (lambda v: v >= 0, ">= 0"),
    "optimization.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optimization.optimizer": (lambda v: v == "adamw", "adamw"),
    "optimization.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimization.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimization.gradient_clip": (lambda v: v is None or v > 0, "> 0 (or null for no clipping)"),
    "optimization.on_nonfinite": (lambda v: v in ("stop", "skip", "rollback"), "stop, skip or rollback"),
    "optimization.max_rollbacks": (lambda v: v >= 0, ">= 0"),
    "optimization.rollback_lr_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "optimization.rollback_amp": (lambda v: v in (None, "bf16", "off"), "bf16, off or null"),
    "schedule.epochs": (lambda v: v is None or v >= 1, ">= 1"),
    "schedule.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "schedule.start_epoch": (lambda v: v >= 0, ">= 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.augment_on": (lambda v: v in ("workers", "device"), "workers or device"),
    "data.augmentation.crop_scale_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.augmentation.crop_scale_max": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "checkpointing.save_freq_epochs": (lambda v: v >= 0, ">= 0"),
    "checkpointing.save_freq_steps": (lambda v: v >= 0, ">= 0"),
    "checkpointing.keep_last_n": (lambda v: v >= 0, ">= 0"),
    "logging.print_freq": (lambda v: v >= 1, ">= 1"),
    "eval.eval_every": (lambda v: v >= 0, ">= 0"),
    "freezeout.how_scale": (lambda v: v in ("linear", "squared", "cubic"), "linear, squared or cubic"),
    "freezeout.t_0": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "misc.amp": (lambda v: v in ("auto", "bf16", "fp16", "off"), "auto, bf16, fp16 or off; off is fp32"),
    "misc.max_steps": (lambda v: v >= 0, ">= 0"),
}


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not full.endswith("kwargs"):
            keys.extend(_all_keys(node, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{origin}: unknown config key '{key}'{suggest(str(key), _all_keys(schema))}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{origin}: bad value for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]} (key '{key}')")


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a plain dict; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        preset = PRESET_DIR / path
        if preset.is_file():
            p = preset
        else:
            shipped = [str(f.relative_to(PRESET_DIR)) for f in PRESET_DIR.rglob("*") if f.suffix in (".yaml", ".json")]
            raise ConfigError(f"config file not found: {path}{suggest(str(path), shipped)}")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return _strip_seed001_extras(data)


def _strip_seed001_extras(data: dict) -> dict:
    # seed 001's JSON spells the augmentation block as "{...}" in its docs; an empty dict is fine, and
    # "misc.resume" may be "" (meaning none), as in the official repo's argparse default.
    misc = data.get("misc")
    if isinstance(misc, dict) and misc.get("resume") == "":
        misc["resume"] = None
    return data


def parse_dotlist(items: list[str]) -> dict:
    """`a.b=1` items -> nested dict, values parsed as YAML scalars/lists."""
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like section.key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def build_config(
    schema: type,
    layers: list[tuple[str, dict]],
    demo_preset: Optional[str] = None,
) -> DictConfig:
    """Merge `layers` (origin, dict) over the schema's defaults, check every key, type and value.

    When `demo_preset` is given and no layer sets data.data_path, that preset is merged first.
    """
    schema_cfg = OmegaConf.structured(schema)
    if demo_preset and not any(_get(d, "data.data_path") for _, d in layers):
        layers = [(demo_preset, load_file(demo_preset))] + layers
    cfg = schema_cfg
    for origin, data in layers:
        try:
            if _replaces_kwargs(cfg, data, origin):
                cfg.model.kwargs = {}
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _explain(e, schema_cfg, origin) from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _replaces_kwargs(cfg: DictConfig, data: dict, origin: str) -> bool:
    """True when `data` names a model other than cfg's (or is a checkpoint's architecture): kwargs start over."""
    new = _get(data, "model.type")
    if not new or "model" not in cfg or "kwargs" not in cfg.model:
        return False
    return origin.startswith(ARCH_ORIGIN) or not same_model(OmegaConf.select(cfg, "model.type"), new)


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Do two model names (aliases resolved) name the same registered builder?"""
    from mimkit.models.registry import same_model as _same

    return _same(a, b)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Check value constraints and cross-field rules; raise ConfigError naming the key."""
    for key, (ok, valid) in CONSTRAINTS.items():
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            continue  # a key of another command's schema: each command's config holds the keys it uses
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException:
            continue
        if key.startswith("freezeout.") and "freezeout" not in cfg:
            continue
        if not ok(value):
            raise ConfigError(f"bad value for '{key}': {value!r} (must be {valid})")
    if "data" in cfg:
        size = input_size(cfg)
        if any(s < 1 for s in size):
            raise ConfigError(f"bad value for 'data.input_size': {size} (must be positive)")
        aug = cfg.data.augmentation
        if "crop_scale_min" in aug and aug.crop_scale_min > aug.crop_scale_max:
            raise ConfigError("data.augmentation.crop_scale_min must not exceed crop_scale_max")


def input_size(cfg: DictConfig) -> tuple[int, int]:
    """data.input_size as an (H, W) pair."""
    v = cfg.data.input_size
    if isinstance(v, (list, tuple, ListConfig)):
        if len(v) != 2 or not all(isinstance(x, int) for x in v):
            raise ConfigError(f"bad value for 'data.input_size': {list(v)} (an int or [H, W])")
        return int(v[0]), int(v[1])
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"bad value for 'data.input_size': {v!r} (an int or [H, W])")
    return v, v


def new_run_dir(command: str, root: str | Path = RUNS_DIR) -> Path:
    """Create and return a fresh `root/<command>/<YYYY-mm-dd_HH-MM-SS>` (suffixed -2, -3, ... when taken)."""
    base = Path(root) / command
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base / stamp, 2
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            path, n = base / f"{stamp}-{n}", n + 1


def resolve_output_dir(cfg: DictConfig, command: str) -> str:
    """cfg.misc.output_dir, first set to a new runs/<command>/<timestamp> when unset (the one default scheme).

    An explicit folder is kept as it is (training commands resume from it); a default one is always new, so no
    run ever writes over an earlier one. Under torchrun rank 0 picks the folder and the other ranks receive it.
    """
    if cfg.misc.output_dir:
        return cfg.misc.output_dir
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (tdist.is_available() and tdist.is_initialized()):
        raise ConfigError(f"give --output_dir when launching mimkit {command} with torchrun: every process must "
                          "write to the same folder")
    path = [str(new_run_dir(command)) if int(os.environ.get("RANK", "0")) == 0 else None]
    if tdist.is_available() and tdist.is_initialized():
        tdist.broadcast_object_list(path, src=0)
    OmegaConf.set_struct(cfg, False)
    cfg.misc.output_dir = path[0]
    OmegaConf.set_struct(cfg, True)
    return path[0]


def take_leftovers(args: Any, rest: list[str], options: list[str]) -> Optional[str]:
    """Words argparse left over: config files / `key=value` overrides go to args.items; an unknown flag (or a
    word a command does not take) comes back as one error line, with the closest flag when one is close."""
    bad = [r for r in rest if r.startswith("-")] or ([] if hasattr(args, "items") else rest)
    if bad:
        name = bad[0].split("=")[0]
        if not name.startswith("-"):
            return f"unrecognized argument: {bad[0]}"
        longer = sorted(o for o in options if o.startswith(name) and name.startswith("--"))
        if longer:  # an abbreviation: refused (it would silently mean another flag once one is added)
            return (f"unknown flag {name} (flags are not abbreviated: did you mean "
                    f"{' or '.join(longer[:3])}?)")
        close = suggest(name, options)
        return f"unknown flag {name}" + (f"; did you mean {close.split(chr(39))[1]}?" if close else "")
    if rest:
        args.items = list(args.items) + rest
    return None


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors: 'mimkit CMD: error: MSG' and a pointer to --help, exit 2 (no usage block)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag with its default)\n")


def parse_command(module: Any, command: str, argv: list[str]) -> Any:
    """Parse `mimkit COMMAND ARGV` with the command module's own flags (for tasks that run another command)."""
    p = ArgParser(prog=f"mimkit {command}", allow_abbrev=False)
    module.add_arguments(p)
    args, rest = p.parse_known_args(argv)
    problem = take_leftovers(args, rest, [o for a in p._actions for o in a.option_strings])
    if problem:
        p.error(problem)
    args.command = command
    return args


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict:
    """Plain nested dict (for checkpoints and results files)."""
    return OmegaConf.to_container(cfg, resolve=True)


def float_list(text: str) -> list[float]:
    """'0.5,0.4,0.3' (or one number) -> [0.5, 0.4, 0.3]: the type of the --mean / --std flags."""
    import argparse

    try:
        return [float(v) for v in str(text).replace(" ", "").strip("[]").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}")
