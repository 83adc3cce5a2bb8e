"""Config schema, flags and checks of `mimkit incremental` (seed 004's names: cls_only, mask_ratio, inv_mode,
mask_mode, ema_mode, ema_ratio). Same layers as every command: schema <- config file <- flags <- key=value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from mimkit import config as C
from mimkit.engine.precision import AMP_HELP
from mimkit.errors import ConfigError, suggest
from mimkit.config import TRACKING_FLAGS, Flag

METHODS = ("ce", "kd", "mask", "er")
EMA_MODES = ("none", "ema", "anne", "sto")
MASK_MODES = ("s", "a", "sgf", "agf")
INV_MODES = ("v1", "v2")
DATASETS = ("auto", "folder", "cifar10", "cifar100")


@dataclass
class IncModelConfig:
    type: str = "slim_resnet18"  # resnet18 (nf 64, Mammoth) | slim_resnet18 (nf 20, GEM / Avalanche)
    nf: Optional[int] = None  # ResNet width override; None = the model's (64 or 20)
    finetune: Optional[str] = None  # an MAE checkpoint: its ViT encoder becomes the backbone (type ignored, unless it names an MAE model: that model's heads for a file that does not state them)
    grad_checkpointing: Any = False  # recompute block activations in backward: false | true (every ViT block) | N (the first N); needs --finetune


@dataclass
class IncrementalSection:
    method: str = "ce"  # ce | kd | mask | er, combinable with commas (kd,er); ce is always part of the loss
    tasks: Optional[int] = None  # tasks of equal class count; None = 5, or with init_classes as many as it makes
    init_classes: Optional[int] = None  # classes of the first task (PyCIL's B); the rest in steps of increment
    increment: Optional[int] = None  # classes per later task (PyCIL's Inc); default = init_classes
    kd_weight: float = 1.0  # weight of the distillation loss (kd)
    temperature: float = 2.0  # distillation temperature (kd and mask)
    cls_only: bool = False  # reference = only the reference's classifier head on the current features
    mask_ratio: float = 0.5  # fraction of the hidden feature's channels masked (mask), in [0, 1)
    mask_mode: str = "s"  # fill token: s (learnable scalar) | a (learnable vector) | sgf | agf (zero, no gradient)
    inv_mode: str = "v1"  # v1: inverse-mask logits added to the masked output; v2: subtracted from the target
    mask_weight: float = 1.0  # weight of the masked-feature distillation loss
    ema_mode: str = "none"  # reference = an EMA of the student: none | ema | anne | sto (mmengine's rules)
    ema_ratio: float = 0.1  # EMA momentum m, the weight of the NEW value: avg <- (1 - m) avg + m model
    eval_teacher: bool = False  # evaluate the EMA teacher instead of the student
    buffer_size: int = 200  # er: reservoir replay buffer size (images)
    eval_batch_size: int = 256  # batch size of the per-task evaluation
    rankme_images: int = 2000  # RankMe on at most this many held-out images (fixed, all classes)
    precise_bn_images: int = 8192  # PreciseBN after each task: BatchNorm statistics recomputed on this many
    # training images with the final weights (mmpretrain PreciseBNHook's num_samples); 0 = keep running averages


@dataclass
class IncOptimizationConfig:
    batch_size: int = 16  # per-device batch size (the CIFAR presets use Mammoth's 32)
    accum_iter: int = 1  # gradient accumulation steps
    opt: str = "sgd"  # sgd | adamw; a new optimiser every task (Mammoth)
    lr: float = 0.01  # absolute learning rate (the CIFAR presets use Mammoth's 0.1)
    min_lr: float = 0.0  # floor of the per-task cosine schedule
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # not applied to biases and norms
    gradient_clip: Optional[float] = None  # max grad norm; None = no clipping
    on_nonfinite: str = "stop"  # stop | skip | rollback (docs/cluster.md)
    max_rollbacks: int = 3  # rollback: reloads of the last checkpoint allowed per task's run
    rollback_lr_scale: float = 1.0  # rollback: lr factor after each rollback
    rollback_amp: Optional[str] = None  # rollback: fall back to this amp (bf16 | off)


@dataclass
class IncScheduleConfig:
    epochs: int = 3  # epochs PER TASK
    warmup_epochs: float = 0  # linear warmup at the start of every task


@dataclass
class IncAugmentationConfig(C.AugmentationConfig):
    """RandomCrop with padding + flip; the inherited crop_scale_min/max (RandomResizedCrop) are not used here."""

    crop_padding: int = 4  # RandomCrop(input_size, padding) (the CIFAR recipe); 0 = no crop
    hflip: Optional[bool] = None  # random horizontal flip; None = on, except for digits (not flip-symmetric)


@dataclass
class IncDataConfig:
    data_path: str = "digits"  # digits (built-in), class folders under train/ and val/, or a CIFAR folder
    dataset: str = "auto"  # auto | folder | cifar10 | cifar100 (python layout, from a local folder)
    input_size: int = 32  # image side (CIFAR and digits are 32)
    mean: Optional[List[float]] = None  # normalisation mean; None = the --finetune checkpoint's, else ImageNet's
    std: Optional[List[float]] = None  # normalisation std (with mean; `mimkit stats DIR` computes both)
    num_workers: int = 0  # data-loading worker processes
    pin_memory: bool = False
    persistent_workers: bool = True
    augmentation: IncAugmentationConfig = field(default_factory=IncAugmentationConfig)


@dataclass
class IncCheckpointing(C.CheckpointingConfig):
    save_freq_epochs: int = 1  # a resume point every epoch of every task
    keep_last_n: int = 1


@dataclass
class IncMiscConfig:
    seed: int = 0  # also fixes the class order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: Optional[str] = None  # the run folder; None = a new runs/incremental/<timestamp>
    auto_resume: bool = True  # continue the run in output_dir (between tasks or inside one)
    amp: str = "auto"  # auto (bf16 on a GPU or a CPU with native bf16, else off) | bf16 | fp16 | off
    max_steps: int = 0  # a smoke-test cap: each task stops after this many optimiser steps (0 = its schedule)


@dataclass
class IncrementalConfig:
    model: IncModelConfig = field(default_factory=IncModelConfig)
    incremental: IncrementalSection = field(default_factory=IncrementalSection)
    optimization: IncOptimizationConfig = field(default_factory=IncOptimizationConfig)
    schedule: IncScheduleConfig = field(default_factory=IncScheduleConfig)
    data: IncDataConfig = field(default_factory=IncDataConfig)
    checkpointing: IncCheckpointing = field(default_factory=IncCheckpointing)
    logging: C.LoggingConfig = field(default_factory=C.LoggingConfig)
    misc: IncMiscConfig = field(default_factory=IncMiscConfig)
    distributed: C.DistributedConfig = field(default_factory=C.DistributedConfig)


FLAGS: list[Flag] = [
    Flag("model", "model.type", str, "resnet18 (nf 64) | slim_resnet18 (nf 20)"),
    Flag("nf", "model.nf", int, "ResNet width"),
    Flag("finetune", "model.finetune", str, "MAE checkpoint whose ViT encoder is the backbone"),
    C.GRAD_CKPT_FLAG,
    C.Flag("strategy", "distributed.strategy", str, "ddp only here: fsdp is not available in incremental yet (its "
           "classifier head grows at every task and its teachers copy the model)"),
    Flag("data_path", "data.data_path", str, "digits, class folders under train/ and val/, or a CIFAR folder"),
    Flag("dataset", "data.dataset", str, "auto | folder | cifar10 | cifar100"),
    Flag("input_size", "data.input_size", int),
    Flag("mean", "data.mean", C.float_list, "per-channel normalisation mean, e.g. 0.5,0.5,0.5"),
    Flag("std", "data.std", C.float_list, "per-channel normalisation std"),
    Flag("num_workers", "data.num_workers", int),
    Flag("method", "incremental.method", str, "ce | kd | mask | er, or a comma list (kd,er)"),
    Flag("tasks", "incremental.tasks", int, "number of tasks of equal class count (default: 5; with "
         "--init_classes, the count init_classes + k x increment makes: give both only when they agree)"),
    Flag("init_classes", "incremental.init_classes", int, "classes of the first task (PyCIL B)"),
    Flag("increment", "incremental.increment", int, "classes per later task (PyCIL Inc)"),
    Flag("kd_weight", "incremental.kd_weight", float),
    Flag("temperature", "incremental.temperature", float, "distillation temperature"),
    Flag("cls_only", "incremental.cls_only", None, "reference = its classifier head on the current features",
         const=True),
    Flag("mask_ratio", "incremental.mask_ratio", float, "masked share of the feature's channels, in [0, 1)"),
    Flag("mask_mode", "incremental.mask_mode", str, "s | a | sgf | agf"),
    Flag("inv_mode", "incremental.inv_mode", str, "v1 (add to masked output) | v2 (subtract from target)"),
    Flag("mask_weight", "incremental.mask_weight", float),
    Flag("ema_mode", "incremental.ema_mode", str, "EMA reference: none | ema | anne | sto"),
    Flag("ema_ratio", "incremental.ema_ratio", float, "EMA momentum m weighting the NEW value (mmengine's "
         "convention): avg = (1-m)*avg + m*model; anne uses max(m, 100/(100+step))"),
    Flag("eval_teacher", "incremental.eval_teacher", None, "evaluate the EMA teacher, not the student", const=True),
    Flag("buffer_size", "incremental.buffer_size", int, "er: replay buffer size"),
    Flag("precise_bn_images", "incremental.precise_bn_images", int, "BatchNorm statistics recomputed on this "
         "many training images after each task (PreciseBN); 0 = keep the running averages"),
    Flag("output_dir", "misc.output_dir", str, "run folder; a folder holding a run resumes it (default: a new "
         "runs/incremental/<date>_<time>)"),
    Flag("epochs", "schedule.epochs", int, "epochs per task"),
    Flag("warmup_epochs", "schedule.warmup_epochs", float),
    Flag("batch_size", "optimization.batch_size", int),
    Flag("opt", "optimization.opt", str, "sgd | adamw"),
    Flag("lr", "optimization.lr", float),
    Flag("min_lr", "optimization.min_lr", float),
    Flag("momentum", "optimization.momentum", float),
    Flag("weight_decay", "optimization.weight_decay", float),
    Flag("clip_grad", "optimization.gradient_clip", float, "max gradient norm"),
    Flag("seed", "misc.seed", int, "seeds training and the class order"),
    Flag("device", "misc.device", str, "auto | cpu | cuda | cuda:N"),
    Flag("no_auto_resume", "misc.auto_resume", None, "start over in --output_dir instead of resuming the run in "
         "it; its earlier files move to earlier/<time>/ (default: resume)", const=False),
    Flag("amp", "misc.amp", str, AMP_HELP),
    Flag("max_steps", "misc.max_steps", int, "stop each task after N optimiser steps (a smoke-test cap: the "
         "task's schedule keeps its length; 0 = the whole schedule)"),
    Flag("save_freq_epochs", "checkpointing.save_freq_epochs", int),
    Flag("save_freq_steps", "checkpointing.save_freq_steps", int),
    Flag("keep_last_n", "checkpointing.keep_last_n", int),
    Flag("print_freq", "logging.print_freq", int),
    *TRACKING_FLAGS,
]


def parse_methods(spec: str) -> frozenset[str]:
    """'kd,er' -> {'ce', 'kd', 'er'}; ConfigError naming an unknown method."""
    names = [s.strip() for s in str(spec).replace("+", ",").split(",") if s.strip()]
    if not names:
        raise ConfigError("incremental.method is empty; give ce, kd, mask, er or a comma list such as kd,er")
    for n in names:
        if n not in METHODS:
            raise ConfigError(f"unknown method '{n}' in incremental.method{suggest(n, METHODS)} "
                              f"(choose from {', '.join(METHODS)}, combinable: kd,er)")
    return frozenset(names) | {"ce"}


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"bad value for '{key}': {value!r}{suggest(str(value), choices)} "
                          f"(must be one of {', '.join(choices)})")


# the incremental knobs read by some methods only: name -> the methods that use it
METHOD_FLAGS = {"mask_ratio": {"mask"}, "mask_mode": {"mask"}, "inv_mode": {"mask"}, "mask_weight": {"mask"},
                "kd_weight": {"kd"}, "temperature": {"kd", "mask"}, "buffer_size": {"er"}}


def validate(cfg) -> None:
    """Every incremental rule the shared validator does not know, before any data or weights load."""
    i, o = cfg.incremental, cfg.optimization
    parse_methods(i.method)
    _choice("incremental.ema_mode", i.ema_mode, EMA_MODES)
    _choice("incremental.mask_mode", i.mask_mode, MASK_MODES)
    _choice("incremental.inv_mode", i.inv_mode, INV_MODES)
    _choice("data.dataset", cfg.data.dataset, DATASETS)
    _choice("optimization.opt", o.opt, ("sgd", "adamw"))
    if cfg.model.finetune is None:
        from mimkit.models.resnet import BACKBONES

        if cfg.model.grad_checkpointing not in (False, 0):
            raise ConfigError(f"--grad_checkpointing recomputes ViT blocks; {cfg.model.type} is a ResNet without "
                              "them: leave the flag out, or give --finetune CKPT (a ViT encoder)")

        _choice("model.type", cfg.model.type, tuple(BACKBONES))
    checks = [
        ("incremental.mask_ratio", 0.0 <= i.mask_ratio < 1.0, "in [0, 1)"),
        ("incremental.ema_ratio", 0.0 < i.ema_ratio <= 1.0, "in (0, 1]"),
        ("incremental.temperature", i.temperature > 0, "> 0"),
        ("incremental.kd_weight", i.kd_weight >= 0, ">= 0"),
        ("incremental.mask_weight", i.mask_weight >= 0, ">= 0"),
        ("incremental.tasks", i.tasks is None or i.tasks >= 1, ">= 1"),
        ("incremental.init_classes", i.init_classes is None or i.init_classes >= 1, ">= 1"),
        ("incremental.increment", i.increment is None or i.increment >= 1, ">= 1"),
        ("incremental.buffer_size", i.buffer_size >= 1, ">= 1"),
        ("incremental.eval_batch_size", i.eval_batch_size >= 1, ">= 1"),
        ("incremental.rankme_images", i.rankme_images >= 2, ">= 2"),
        ("incremental.precise_bn_images", i.precise_bn_images >= 0, ">= 0"),
        ("optimization.lr", o.lr > 0 and math.isfinite(o.lr), "> 0"),
        ("optimization.momentum", 0 <= o.momentum < 1, "in [0, 1)"),
        ("model.nf", cfg.model.nf is None or cfg.model.nf >= 1, ">= 1"),
        ("data.augmentation.crop_padding", cfg.data.augmentation.crop_padding >= 0, ">= 0"),
    ]
    C.check_rules(cfg, checks)
    if cfg.distributed.strategy == "fsdp":
        raise ConfigError("--strategy fsdp is not available in incremental yet: its classifier head grows at every "
                          "task and its teachers are copies of the model, which FSDP2's fixed shards cannot follow; "
                          "use --strategy ddp (and --grad_checkpointing to save activation memory)")
    if i.eval_teacher and i.ema_mode == "none":
        raise ConfigError("--eval_teacher evaluates the EMA teacher: also give --ema_mode ema|anne|sto")
    if i.increment is not None and i.init_classes is None:
        raise ConfigError("--increment needs --init_classes (the first task's classes)")
    # flags that would change nothing under the chosen method: an error, as the other flag dependencies here
    methods = parse_methods(i.method)
    if i.ema_mode != "none" and not methods & {"kd", "mask"} and not i.eval_teacher:
        raise ConfigError(f"--ema_mode {i.ema_mode} has no effect with --method {i.method}: the EMA teacher is the "
                          "reference of kd / mask; add --method kd (or mask), or --eval_teacher to evaluate the EMA")
    if i.cls_only and not methods & {"kd", "mask"}:
        raise ConfigError(f"--cls_only has no effect with --method {i.method}: it changes the reference of kd / "
                          "mask; add --method kd (or mask), or drop --cls_only")
    # method-specific knobs set away from the schema default (by a flag, file or override) under a method that
    # never reads them: one line naming the flag and the method(s) that use it
    default = IncrementalSection()
    for name, users in METHOD_FLAGS.items():
        value = getattr(i, name)
        if value != getattr(default, name) and not methods & users:
            uses = " / ".join(sorted(users))
            raise ConfigError(f"--{name} {value} has no effect with --method {i.method}: only --method {uses} uses "
                              f"it; add --method {sorted(users)[0]}, or drop --{name}")
    if i.ema_ratio != default.ema_ratio and i.ema_mode == "none":
        raise ConfigError(f"--ema_ratio {i.ema_ratio} has no effect without an EMA teacher: add --ema_mode "
                          "ema|anne|sto, or drop --ema_ratio")


def task_sizes(num_classes: int, tasks: Optional[int], init_classes: Optional[int],
               increment: Optional[int]) -> list[int]:
    """Classes per task: `tasks` (default 5) equal parts, or init_classes then equal steps of increment (a split
    that does not come out even is an error naming the numbers, never silently adjusted)."""
    if init_classes is None:
        tasks = 5 if tasks is None else tasks
        if tasks > num_classes:
            raise ConfigError(f"--tasks {tasks} is more than the {num_classes} classes of the data; every task "
                              f"needs at least one class (use --tasks <= {num_classes})")
        if num_classes % tasks:
            raise ConfigError(f"{num_classes} classes do not split into {tasks} equal tasks; give a divisor of "
                              f"{num_classes}, or --init_classes B --increment I")
        return [num_classes // tasks] * tasks
    if init_classes > num_classes:
        raise ConfigError(f"--init_classes {init_classes} is more than the {num_classes} classes of the data")
    inc = increment or init_classes
    rest = num_classes - init_classes
    n = 1 + rest // inc
    if rest % inc:
        raise ConfigError(f"{num_classes} classes cannot split into tasks of increment {inc} after {init_classes} "
                          f"initial ({rest} classes left, not a multiple of {inc}); give an --increment that "
                          f"divides {rest}, or another --init_classes")
    if tasks is not None and tasks != n:
        raise ConfigError(f"{num_classes} classes cannot split into {tasks} tasks of increment {inc} after "
                          f"{init_classes} initial ({init_classes} + {tasks - 1} x {inc} = "
                          f"{init_classes + (tasks - 1) * inc}); drop --tasks (they make {n}), or change "
                          "--init_classes / --increment")
    return [init_classes] + [inc] * (n - 1)
