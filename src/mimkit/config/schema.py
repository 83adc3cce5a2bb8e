"""Config schemas: the sections every command's config is made of, their defaults and value constraints.

The section layout is seed 001's (`model / optimization / schedule / data / checkpointing / logging / misc`),
so its JSON files load as they are. Each key's comment gives its meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

def _grad_ckpt_ok(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, int) and v >= 0)


# model.grad_checkpointing in every command that trains transformer blocks
GRAD_CKPT_RULE = (_grad_ckpt_ok, "false, true (every block) or a number of encoder blocks >= 0")


@dataclass
class ModelConfig:
    type: str = "mae_vit_large_patch16"  # registered model name (`mimkit models` lists them)
    norm_pix_loss: bool = False  # predict per-patch normalised pixels (the paper's best setting)
    mask_ratio: float = 0.75  # fraction of patches removed, in [0, 1)
    loss_mode: str = "masked_only"  # masked_only (official) | all_pixels (seed 000's dense loss)
    freeze_mode: str = "none"  # none | encoder_layernorms_only | layernorm_only | encoder_only
    drop_path: float = 0.0  # stochastic depth rate of the encoder
    grad_checkpointing: Any = False  # recompute block activations in backward: false | true (every block) | N (first N encoder blocks)
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
class WandbConfig:
    enabled: bool = False  # log to Weights & Biases (pip install 'mimkit[wandb]')
    project: Optional[str] = None  # wandb project (seed 003's --experiment_name); None = $WANDB_PROJECT or mimkit
    run_name: Optional[str] = None  # the run's display name; None = the run folder's name
    entity: Optional[str] = None  # team or user; None = your default entity
    tags: List[str] = field(default_factory=list)  # tags on the run
    mode: Optional[str] = None  # online | offline | disabled; None = $WANDB_MODE, else online with a login
    log_checkpoints: bool = False  # upload checkpoints as wandb artifacts (off: artifacts fill cluster storage)


@dataclass
class MlflowConfig:
    enabled: bool = False  # log to MLflow (pip install 'mimkit[mlflow]')
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI, else a sqlite store <output_dir>/mlflow.db
    experiment_name: Optional[str] = None  # None = logging.wandb.project, else $MLFLOW_EXPERIMENT_NAME or mimkit
    run_name: Optional[str] = None  # None = logging.wandb.run_name, else the run folder's name


@dataclass
class LoggingConfig:
    print_freq: int = 100  # log a line every N iterations when not on a terminal
    console_clear_freq: int = 100  # kept for seed 001 configs; the progress bar redraws in place
    tensorboard: bool = True  # write TensorBoard scalars and images to log_dir
    log_dir: Optional[str] = None  # TensorBoard's folder (--log_dir, as the official scripts); None = <output_dir>/tb
    vis_freq_epochs: int = 1  # reconstruction PNG every N epochs; 0 = only at the end
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases (offline without a login)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # MLflow


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
class DistributedConfig:
    strategy: str = "ddp"  # ddp (whole model on every rank) | fsdp (FSDP2 fully_shard per block: sharded state)


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
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
    "model.grad_checkpointing": GRAD_CKPT_RULE,
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
    "logging.wandb.mode": (lambda v: v in (None, "online", "offline", "disabled"), "online, offline or disabled"),
    "eval.eval_every": (lambda v: v >= 0, ">= 0"),
    "freezeout.how_scale": (lambda v: v in ("linear", "squared", "cubic"), "linear, squared or cubic"),
    "freezeout.t_0": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "misc.amp": (lambda v: v in ("auto", "bf16", "fp16", "off"), "auto, bf16, fp16 or off; off is fp32"),
    "distributed.strategy": (lambda v: v in ("ddp", "fsdp"), "ddp or fsdp"),
    "misc.max_steps": (lambda v: v >= 0, ">= 0"),
    # images are read as grayscale or RGB (data/images.py), so a model takes 1 or 3 channels
    "model.kwargs.in_chans": (lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB): images are read as one or the other"),
    "data.augmentation.mixup": (lambda v: 0 <= v and math.isfinite(v), ">= 0 (0 = off)"),
    "data.augmentation.cutmix": (lambda v: 0 <= v and math.isfinite(v), ">= 0 (0 = off)"),
    "data.augmentation.mixup_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.augmentation.mixup_switch_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}

# Flags of commands without a config schema (knn, rankme, export, stats, visualize, ...): checked by name where
# the words are parsed (config.flags.check_arg_values), so no command has its own gap.
ARG_CONSTRAINTS: dict[str, tuple] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "atol": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "input_size": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v >= 0, ">= 0"),
    "mask_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "mixup": (lambda v: 0 <= v and math.isfinite(v), ">= 0 (0 = off)"),
    "cutmix": (lambda v: 0 <= v and math.isfinite(v), ">= 0 (0 = off)"),
    "smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "in_chans": (lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)"),
}
