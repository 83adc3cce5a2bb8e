"""Config schemas and flags of `mimkit linprobe` and `mimkit finetune` (defaults = the official scripts').

Same layers as pretraining (schema <- config file <- flags <- `section.key=value`), same section names,
validated by mimkit.config before any weights load. Flag names are main_linprobe.py / main_finetune.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mimkit import config as C
from mimkit.engine.precision import AMP_HELP
from mimkit.errors import ConfigError
from mimkit.config import TRACKING_FLAGS, TRAINING_FLAGS, Flag


# ---------------------------------------------------------------------------------------------- shared
@dataclass
class ClassifierModelConfig:
    type: Optional[str] = None  # registered model name; None = the one the checkpoint names
    finetune: Optional[str] = None  # pretrained checkpoint: mimkit, official MAE .pth or Hugging Face
    nb_classes: Optional[int] = None  # number of classes; None = the number of class folders
    global_pool: bool = True  # mean of patch tokens + fc_norm (False: the cls token after norm)
    drop_path: float = 0.1  # stochastic depth of the encoder (fine-tuning only)
    grad_checkpointing: Any = False  # recompute block activations in backward: false | true (every block) | N (the first N blocks)
    random_init: bool = False  # the checkpoint's architecture with random weights (a baseline)
    arch: Dict[str, Any] = field(default_factory=dict)  # filled in by the run: the classifier's timm ViT arguments


@dataclass
class EvalMiscConfig(C.MiscConfig):
    eval: bool = False  # evaluate the checkpoint (misc.resume or model.finetune) on val/ and stop


@dataclass
class KeepCheckpointing(C.CheckpointingConfig):
    save_freq_epochs: int = 1  # the official scripts save every epoch; keep_last_n prunes
    keep_last_n: int = 1


COMMON_FLAGS: list[Flag] = [
    Flag("model", "model.type", str, "model name (`mimkit models`); default: the checkpoint's"),
    Flag("finetune", "model.finetune", str, "pretrained checkpoint (mimkit / official MAE / Hugging Face / OpenMMLab)"),
    Flag("nb_classes", "model.nb_classes", int, "number of classes (default: from the data)"),
    Flag("global_pool", "model.global_pool", None, "average-pool the patch tokens (+ fc_norm)", const=True),
    Flag("cls_token", "model.global_pool", None, "classify the cls token instead of global pooling", const=False),
    Flag("random_init", "model.random_init", None, "random weights of the checkpoint's architecture", const=True),
    Flag("data_path", "data.data_path", str, "labelled set: train/ and val/ class folders, digits, or "
         "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder) with .cls labels"),
    Flag("input_size", "data.input_size", int, "image size (position embeddings interpolated)"),
    Flag("mean", "data.mean", C.float_list, "per-channel normalisation mean, e.g. 0.5,0.5,0.5; None = the "
         "checkpoint's, else ImageNet's"),
    Flag("std", "data.std", C.float_list, "per-channel normalisation std; None = the checkpoint's, else ImageNet's"),
    Flag("dist_eval", "data.dist_eval", None, "split the val set over processes", const=True),
    Flag("num_workers", "data.num_workers", int),
    Flag("pin_mem", "data.pin_memory", None, "pin host memory", const=True),
    Flag("no_pin_mem", "data.pin_memory", None, "do not pin host memory", const=False),
    *TRAINING_FLAGS,
    Flag("seed", "misc.seed", int),
    Flag("device", "misc.device", str, "auto | cpu | cuda | cuda:N"),
    Flag("resume", "misc.resume", str, "checkpoint (file or folder) to resume, or to evaluate with --eval"),
    Flag("no_auto_resume", "misc.auto_resume", None, "do not resume from <output_dir>/checkpoints/latest.pt",
         const=False),
    Flag("eval", "misc.eval", None, "evaluation only", const=True),
    Flag("amp", "misc.amp", str, AMP_HELP),
    Flag("max_steps", "misc.max_steps", int, "stop after N optimiser steps"),
    Flag("save_freq_epochs", "checkpointing.save_freq_epochs", int),
    Flag("keep_last_n", "checkpointing.keep_last_n", int),
    Flag("print_freq", "logging.print_freq", int),
]


# ---------------------------------------------------------------------------------------------- linprobe
@dataclass
class ProbeModelConfig(ClassifierModelConfig):
    global_pool: bool = False  # main_linprobe.py probes the cls token unless --global_pool
    drop_path: float = 0.0  # the frozen encoder runs in eval mode: unused


@dataclass
class ProbeOptimizationConfig:
    batch_size: int = 512  # per-device batch size
    accum_iter: int = 1  # gradient accumulation steps
    base_lr: float = 0.1  # blr: lr = blr * effective batch / 256
    lr: Optional[float] = None  # absolute lr; overrides base_lr when set
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.0  # 0 for linear probing, following MoCo v1
    opt: str = "lars"  # lars (official) | sgd (momentum, as MoCo / DINO probes)
    momentum: float = 0.9  # momentum of LARS / SGD
    gradient_clip: Optional[float] = None  # max grad norm; None = no clipping (official)
    on_nonfinite: str = "stop"  # stop | skip | rollback (see the pretraining config)
    max_rollbacks: int = 3  # rollback: reloads of the last checkpoint allowed per run
    rollback_lr_scale: float = 1.0  # rollback: lr factor after each rollback
    rollback_amp: Optional[str] = None  # rollback: fall back to this amp (bf16 | off)


@dataclass
class ProbeAugmentationConfig(C.AugmentationConfig):
    enabled: bool = True  # official weak augmentation; False = centre crops, features computed once and cached
    crop_scale_min: float = 0.08  # RandomResizedCrop's default range, as main_linprobe.py


@dataclass
class EvalDataConfig(C.DataConfig):
    dist_eval: bool = False  # evaluate on a shard of val/ per process (and average)


@dataclass
class ProbeDataConfig(EvalDataConfig):
    augmentation: ProbeAugmentationConfig = field(default_factory=ProbeAugmentationConfig)


@dataclass
class ProbeScheduleConfig(C.ScheduleConfig):
    epochs: int = 90
    warmup_epochs: float = 10


@dataclass
class LinprobeConfig:
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    optimization: ProbeOptimizationConfig = field(default_factory=ProbeOptimizationConfig)
    schedule: ProbeScheduleConfig = field(default_factory=ProbeScheduleConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    checkpointing: KeepCheckpointing = field(default_factory=KeepCheckpointing)
    logging: C.LoggingConfig = field(default_factory=C.LoggingConfig)
    misc: EvalMiscConfig = field(default_factory=EvalMiscConfig)


LINPROBE_FLAGS: list[Flag] = COMMON_FLAGS + [
    Flag("opt", "optimization.opt", str, "lars | sgd"),
    Flag("no_aug", "data.augmentation.enabled", None, "centre crops only; features cached once", const=False),
    *TRACKING_FLAGS,
]


# ---------------------------------------------------------------------------------------------- finetune
@dataclass
class FinetuneOptimizationConfig(C.OptimizationConfig):
    batch_size: int = 64
    base_lr: float = 1e-3
    min_lr: float = 1e-6
    adam_beta2: float = 0.999  # torch's AdamW default, as main_finetune.py
    layer_decay: float = 0.75  # lr of layer i scaled by layer_decay ** (depth + 1 - i) (ELECTRA / BEiT)


@dataclass
class FinetuneAugmentationConfig(C.AugmentationConfig):
    crop_scale_min: float = 0.08  # timm create_transform's RandomResizedCrop range, as the official recipe
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"  # RandAugment policy (timm name); null = none
    color_jitter: Optional[float] = None  # only used without aa
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"  # random erasing mode
    recount: int = 1  # random erasing count
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.0  # mixup alpha, on when > 0
    cutmix: float = 0.0  # cutmix alpha, on when > 0
    cutmix_minmax: Optional[List[float]] = None  # cutmix min/max ratio (overrides alpha)
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem


@dataclass
class FinetuneDataConfig(EvalDataConfig):
    augmentation: FinetuneAugmentationConfig = field(default_factory=FinetuneAugmentationConfig)


@dataclass
class FinetuneScheduleConfig(C.ScheduleConfig):
    epochs: int = 50
    warmup_epochs: float = 5


@dataclass
class FinetuneConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optimization: FinetuneOptimizationConfig = field(default_factory=FinetuneOptimizationConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    checkpointing: KeepCheckpointing = field(default_factory=KeepCheckpointing)
    logging: C.LoggingConfig = field(default_factory=C.LoggingConfig)
    misc: EvalMiscConfig = field(default_factory=EvalMiscConfig)
    distributed: C.DistributedConfig = field(default_factory=C.DistributedConfig)


FINETUNE_FLAGS: list[Flag] = COMMON_FLAGS + [
    Flag("drop_path", "model.drop_path", float, "drop path rate"),
    C.GRAD_CKPT_FLAG,
    C.STRATEGY_FLAG,
    Flag("layer_decay", "optimization.layer_decay", float, "layer-wise lr decay"),
    Flag("clip_grad", "optimization.gradient_clip", float, "max gradient norm"),
    Flag("aa", "data.augmentation.aa", str, "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 ('none' = off)"),
    Flag("color_jitter", "data.augmentation.color_jitter", float),
    Flag("reprob", "data.augmentation.reprob", float, "random erasing probability"),
    Flag("remode", "data.augmentation.remode", str),
    Flag("recount", "data.augmentation.recount", int),
    Flag("smoothing", "data.augmentation.smoothing", float, "label smoothing"),
    Flag("mixup", "data.augmentation.mixup", float, "mixup alpha (on when > 0)"),
    Flag("cutmix", "data.augmentation.cutmix", float, "cutmix alpha (on when > 0)"),
    Flag("mixup_prob", "data.augmentation.mixup_prob", float),
    Flag("mixup_switch_prob", "data.augmentation.mixup_switch_prob", float),
    Flag("mixup_mode", "data.augmentation.mixup_mode", str, "batch | pair | elem"),
    *TRACKING_FLAGS,
]


# Built-in data -> the CPU-sized preset put beneath the flags when no config file is given (stated at start-up).
LINPROBE_PRESETS = {"digits": "linprobe/digits.yaml"}
FINETUNE_PRESETS = {"digits": "finetune/digits.yaml"}


def check_classifier_config(cfg, command: str) -> None:
    """Cross-field rules C.validate does not know: the checkpoint, class count, probe / finetune values."""
    m = cfg.model
    if not cfg.data.data_path:
        raise ConfigError("give --data_path (class folders under train/ and val/, or digits)")
    if not (m.finetune or cfg.misc.resume or (m.random_init and m.type)):
        raise ConfigError("give --finetune CHECKPOINT (or --model NAME --random_init)")
    if m.nb_classes is not None and m.nb_classes < 2:
        raise ConfigError(f"bad value for 'model.nb_classes': {m.nb_classes} (must be >= 2)")
    o = cfg.optimization
    if "opt" in o and o.opt not in ("lars", "sgd"):
        raise ConfigError(f"bad value for 'optimization.opt': {o.opt!r} (must be lars or sgd)")
    if "layer_decay" in o and not 0 < o.layer_decay <= 1:
        raise ConfigError(f"bad value for 'optimization.layer_decay': {o.layer_decay} (must be in (0, 1])")
    a = cfg.data.augmentation
    if "mixup_mode" in a and a.mixup_mode not in ("batch", "pair", "elem"):
        raise ConfigError(f"bad value for 'data.augmentation.mixup_mode': {a.mixup_mode!r} (batch, pair or elem)")
    if "reprob" in a and not 0 <= a.reprob <= 1:
        raise ConfigError(f"bad value for 'data.augmentation.reprob': {a.reprob} (must be in [0, 1])")
    if "smoothing" in a and not 0 <= a.smoothing < 1:
        raise ConfigError(f"bad value for 'data.augmentation.smoothing': {a.smoothing} (must be in [0, 1))")
