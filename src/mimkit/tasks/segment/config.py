"""Config schema and flags of `mimkit segment` (defaults = MMSeg's `mae-base_upernet_8xb2-amp-160k_ade20k-512x512`).

Same layers as every command: schema <- preset / config file <- flags <- `section.key=value` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mimkit import config as C
from mimkit.engine.precision import AMP_HELP
from mimkit.errors import ConfigError
from mimkit.tasks.evaluation.config import EvalMiscConfig
from mimkit.config import TRACKING_FLAGS, Flag

DEMO_PRESET = "segment/demo.yaml"


@dataclass
class SegModelConfig:
    type: Optional[str] = None  # encoder name; a --finetune checkpoint's own architecture beats a preset's
    finetune: Optional[str] = None  # pretrained encoder: mimkit, official MAE .pth or Hugging Face
    random_init: bool = False  # random encoder weights (the checkpoint's architecture, or type + kwargs)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # encoder builder options with random_init (patch_size, depth)
    num_classes: Optional[int] = None  # classes of a generic layout without classes.txt; else from the data
    taps: Optional[List[int]] = None  # blocks whose outputs feed the neck; None = [3, 5, 7, 11] scaled to the depth
    drop_path: float = 0.1  # stochastic depth of the encoder, rising linearly to this
    grad_checkpointing: Any = False  # recompute block activations in backward: false | true (every block) | N (the first N blocks)
    channels: int = 768  # UPerHead channels
    aux_channels: int = 256  # FCNHead channels
    aux_weight: float = 0.4  # weight of the auxiliary loss
    pool_scales: List[int] = field(default_factory=lambda: [1, 2, 3, 6])  # pyramid pooling bins
    dropout: float = 0.1  # dropout before each head's classifier
    avg_non_ignore: bool = False  # False: loss sum / all pixels (MMSeg's default); True: / labelled pixels
    arch: Dict[str, Any] = field(default_factory=dict)  # filled in by the run: what --eval / --predict rebuild
    class_names: List[str] = field(default_factory=list)  # filled in by the run


@dataclass
class SegOptimizationConfig:
    batch_size: int = 2  # per-device batch size (MMSeg: 2 per GPU x 8 GPUs = 16)
    accum_iter: int = 1  # gradient accumulation steps
    lr: float = 1.0e-4  # absolute AdamW lr (no batch scaling, as MMSeg)
    min_lr: float = 0.0  # eta_min of the poly schedule
    weight_decay: float = 0.05  # none on biases, norms, cls token, position embeddings
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    layer_decay: float = 0.65  # lr of layer i scaled by layer_decay ** (depth + 1 - i), MMSeg's layer ids
    gradient_clip: Optional[float] = None  # max grad norm; None = no clipping (as MMSeg)
    on_nonfinite: str = "stop"  # stop | skip


@dataclass
class SegScheduleConfig:
    max_iters: Optional[int] = 160000  # optimiser steps; --epochs instead sets this to null
    epochs: Optional[int] = None  # train for whole epochs instead of max_iters
    warmup_iters: int = 1500  # linear warmup from warmup_ratio * lr
    warmup_ratio: float = 1.0e-6  # MMSeg LinearLR start_factor
    power: float = 1.0  # poly decay power after the warmup


@dataclass
class SegAugmentationConfig:
    scale: Optional[List[int]] = None  # [long, short] resize scale; None = [4 * crop, crop] (2048, 512 at 512)
    ratio_range: List[float] = field(default_factory=lambda: [0.5, 2.0])  # RandomResize ratio
    cat_max_ratio: float = 0.75  # RandomCrop: no class may cover this much of a crop (10 tries)
    hflip: bool = True  # random horizontal flip, p 0.5
    photometric: bool = True  # MMSeg PhotoMetricDistortion


@dataclass
class SegDataConfig:
    data_path: Optional[str] = None  # ADEChallengeData2016 (or its parent), a generic layout; None = mosaics
    input_size: Any = 512  # training crop, int or [H, W]
    mean: Optional[List[float]] = None  # per-channel normalisation mean (0-1 scale); None = the encoder's, else ImageNet's
    std: Optional[List[float]] = None  # per-channel normalisation std; None = the encoder's, else ImageNet's
    reduce_zero_label: Optional[bool] = None  # None: True for ADE20K, False otherwise
    ignore_index: int = 255  # label left out of loss and metrics
    check_masks: bool = True  # read every mask before training (sizes, label range)
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    augmentation: SegAugmentationConfig = field(default_factory=SegAugmentationConfig)


@dataclass
class SegTestConfig:
    mode: str = "slide"  # whole | slide
    crop_size: Optional[List[int]] = None  # slide window [H, W]; None = the training crop (512 -> [512, 512])
    stride: Optional[List[int]] = None  # slide stride [H, W]; None = 2/3 of the window, floored (512 -> 341, MMSeg)
    interval: int = 0  # evaluate every N optimiser steps during training; 0 = only at the end
    num_overlays: int = 4  # val images drawn as image | ground truth | prediction


@dataclass
class SegCheckpointing(C.CheckpointingConfig):
    save_freq_epochs: int = 0
    save_freq_steps: int = 16000  # MMSeg's checkpoint interval
    keep_last_n: int = 2


@dataclass
class SegMiscConfig(EvalMiscConfig):
    predict: Optional[str] = None  # image or folder to segment with the --resume checkpoint


@dataclass
class SegmentConfig:
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optimization: SegOptimizationConfig = field(default_factory=SegOptimizationConfig)
    schedule: SegScheduleConfig = field(default_factory=SegScheduleConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    test: SegTestConfig = field(default_factory=SegTestConfig)
    checkpointing: SegCheckpointing = field(default_factory=SegCheckpointing)
    logging: C.LoggingConfig = field(default_factory=C.LoggingConfig)
    misc: SegMiscConfig = field(default_factory=SegMiscConfig)
    distributed: C.DistributedConfig = field(default_factory=C.DistributedConfig)


SEGMENT_FLAGS: list[Flag] = [
    Flag("finetune", "model.finetune", str, "pretrained encoder (mimkit / official MAE / Hugging Face / OpenMMLab)"),
    Flag("random_init", "model.random_init", None, "random encoder weights (a baseline)", const=True),
    Flag("model", "model.type", str, "encoder name (`mimkit models`); beats the --finetune checkpoint's "
         "architecture; default: the checkpoint's, else the preset's"),
    Flag("patch_size", "model.kwargs.patch_size", int, "encoder patch size (with --random_init)"),
    Flag("out_indices", "model.taps", lambda t: [int(v) for v in C.float_list(t)],
         "blocks tapped for the neck, e.g. 3,5,7,11 (MMSeg out_indices); unset = [3, 5, 7, 11] scaled evenly to "
         "the encoder's depth"),
    Flag("num_classes", "model.num_classes", int, "classes of a generic layout without classes.txt (refused "
         "for ADE20K / the mosaics unless it matches)"),
    Flag("drop_path", "model.drop_path", float, "drop path rate"),
    C.GRAD_CKPT_FLAG,
    C.STRATEGY_FLAG,
    Flag("data_path", "data.data_path", str, "ADEChallengeData2016 (or its parent) or a generic layout; "
         "unset = built-in mosaics"),
    Flag("input_size", "data.input_size", int, "training crop"),
    Flag("num_workers", "data.num_workers", int),
    Flag("output_dir", "misc.output_dir", str, "run folder"),
    Flag("epochs", "schedule.epochs", int, "train whole epochs; replaces the preset's max_iters (give one of "
         "--epochs / --max_iters)"),
    Flag("max_iters", "schedule.max_iters", int, "optimiser steps; replaces the preset's epochs (give one of "
         "--epochs / --max_iters)"),
    Flag("warmup_iters", "schedule.warmup_iters", int),
    Flag("batch_size", "optimization.batch_size", int, "per-device batch size"),
    Flag("accum_iter", "optimization.accum_iter", int, "gradient accumulation steps"),
    Flag("lr", "optimization.lr", float, "AdamW lr"),
    Flag("weight_decay", "optimization.weight_decay", float),
    Flag("layer_decay", "optimization.layer_decay", float, "layer-wise lr decay"),
    Flag("clip_grad", "optimization.gradient_clip", float, "max gradient norm"),
    Flag("test_mode", "test.mode", str, "whole | slide inference"),
    Flag("eval_interval", "test.interval", int, "evaluate every N steps (0 = at the end)"),
    Flag("seed", "misc.seed", int),
    Flag("device", "misc.device", str, "auto | cpu | cuda | cuda:N"),
    Flag("resume", "misc.resume", str, "checkpoint to resume, or to use with --eval / --predict"),
    Flag("no_auto_resume", "misc.auto_resume", None, "do not resume from <output_dir>/checkpoints/latest.pt",
         const=False),
    Flag("eval", "misc.eval", None, "evaluate the --resume checkpoint on val (its run's data, crop and test "
         "settings unless you give them) and stop", const=True),
    Flag("predict", "misc.predict", str, "segment this image or folder (subfolders too) with the --resume "
         "checkpoint"),
    Flag("amp", "misc.amp", str, AMP_HELP),
    Flag("max_steps", "misc.max_steps", int, "stop after N optimiser steps (the schedule keeps its length)"),
    Flag("save_freq_steps", "checkpointing.save_freq_steps", int),
    Flag("keep_last_n", "checkpointing.keep_last_n", int),
    Flag("print_freq", "logging.print_freq", int),
    *TRACKING_FLAGS,
]


def slide_window(test_cfg, crop) -> tuple[list[int], list[int]]:
    """(window [H, W], stride [H, W]) of sliding-window inference: test.crop_size else the training crop; test.stride
    else 2/3 of the window, floored (MMSeg's ADE20K ratio, 341 at 512). A stride above the window would leave
    pixels no window covers: refused when test.mode is slide."""
    window = [int(v) for v in (test_cfg.crop_size or crop)]
    stride = [int(v) for v in test_cfg.stride] if test_cfg.stride else [max(1, 2 * w // 3) for w in window]
    if test_cfg.mode == "slide" and any(s > w for s, w in zip(stride, window, strict=True)):
        raise ConfigError(f"test.stride {stride} is larger than the sliding window {window}: pixels between windows "
                          f"would get no prediction; give test.stride=[{2 * window[0] // 3},{2 * window[1] // 3}] "
                          f"(2/3 of the window, the default when unset) or any stride <= the window")
    return window, stride


def check_segment_config(cfg) -> None:
    """Rules C.validate does not know, checked before any weights or data load."""
    m, o, s, t = cfg.model, cfg.optimization, cfg.schedule, cfg.test
    if (s.max_iters is None) == (s.epochs is None):
        raise ConfigError("give exactly one of --max_iters and --epochs (schedule.max_iters / schedule.epochs)")
    if (s.max_iters or 1) < 1 or (s.epochs or 1) < 1:
        raise ConfigError("schedule.max_iters / schedule.epochs must be >= 1")
    if s.warmup_iters < 0 or not 0 < s.warmup_ratio <= 1 or s.power <= 0:
        raise ConfigError("bad schedule: warmup_iters >= 0, warmup_ratio in (0, 1], power > 0")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"bad value for 'optimization.layer_decay': {o.layer_decay} (must be in (0, 1])")
    if o.batch_size < 2 and not (cfg.misc.eval or cfg.misc.predict):
        raise ConfigError("bad value for 'optimization.batch_size': BatchNorm in the heads needs >= 2 per device")
    if o.lr <= 0 or o.weight_decay < 0 or o.accum_iter < 1:
        raise ConfigError("bad optimisation values: lr > 0, weight_decay >= 0, accum_iter >= 1")
    if not 0 <= m.drop_path < 1 or not 0 <= m.dropout < 1 or m.aux_weight < 0:
        raise ConfigError("bad model values: drop_path and dropout in [0, 1), aux_weight >= 0")
    if m.num_classes is not None and m.num_classes < 2:
        raise ConfigError(f"bad value for 'model.num_classes': {m.num_classes} (must be >= 2)")
    if t.mode not in ("whole", "slide"):
        raise ConfigError(f"bad value for 'test.mode': {t.mode!r} (whole or slide)")
    if t.stride is not None and (len(t.stride) != 2 or min(t.stride) < 1):
        raise ConfigError(f"bad value for 'test.stride': {list(t.stride)} ([H, W], positive)")
    if t.crop_size is not None and (len(t.crop_size) != 2 or min(t.crop_size) < 1):
        raise ConfigError(f"bad value for 'test.crop_size': {list(t.crop_size)} ([H, W], positive)")
    if not (cfg.misc.eval or cfg.misc.predict):  # those take the window from the checkpoint's run: checked there
        slide_window(t, C.input_size(cfg))
    a = cfg.data.augmentation
    if len(a.ratio_range) != 2 or not 0 < a.ratio_range[0] <= a.ratio_range[1]:
        raise ConfigError(f"bad value for 'data.augmentation.ratio_range': {list(a.ratio_range)}")
    if not 0 < a.cat_max_ratio <= 1:
        raise ConfigError(f"bad value for 'data.augmentation.cat_max_ratio': {a.cat_max_ratio} (in (0, 1])")
    if cfg.misc.eval and cfg.misc.predict:
        raise ConfigError("--eval and --predict are two runs: give one (--eval scores the val split, --predict "
                          "segments your images), then the other")
    if cfg.misc.predict and not cfg.misc.resume:
        raise ConfigError("--predict needs --resume CHECKPOINT (a trained `mimkit segment` checkpoint)")
    if cfg.misc.eval and not cfg.misc.resume:
        raise ConfigError("--eval needs --resume CHECKPOINT (a trained `mimkit segment` checkpoint)")
