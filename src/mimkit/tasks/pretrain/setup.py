"""The pieces a pretraining run is built from: seeds, model, data, step function, optimiser, hooks.

`mimkit.tasks.pretrain.train` composes them top to bottom; continual, linprobe, finetune, segment and incremental
reuse the seeding and the model builder.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine.freezeout import FreezeOutHook
from mimkit.engine.logging import RunLogger
from mimkit.engine.optim import build_adamw, param_groups, set_lr, warmup_cosine
from mimkit.errors import ConfigError, UserError

if TYPE_CHECKING:
    from mimkit.tasks.visualize import ReconstructionHook


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model(cfg: DictConfig, device: str | torch.device = "cpu", recorder=None):
    """The model the config names, sized to data.input_size; bad options fail on the meta device first.

    recorder: an engine.meta_init.InitRecorder that records the build (on "meta") for --strategy fsdp."""
    from mimkit.models import create_model

    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    kwargs.update(img_size=C.input_size(cfg), norm_pix_loss=cfg.model.norm_pix_loss)
    if cfg.model.drop_path:
        kwargs["drop_path"] = cfg.model.drop_path
    size = C.input_size(cfg)
    with torch.device("meta"):
        probe = create_model(cfg.model.type, **{k: v for k, v in kwargs.items() if k != "img_size"})
        p = probe.patch_size
        if size[0] % p or size[1] % p:
            raise ConfigError(f"data.input_size {size[0]}x{size[1]} is not a multiple of the patch size {p} "
                              f"of {cfg.model.type}")
        create_model(cfg.model.type, **kwargs)
    with recorder if recorder is not None else contextlib.nullcontext(), torch.device(device):
        return create_model(cfg.model.type, **kwargs)


def pretrain_step(mask_ratio: float, loss_mode: str) -> Callable:
    """The step function the engine runs: loss = model(images)."""

    def step(model, batch):
        out = model(batch["images"], mask_ratio=mask_ratio, loss_mode=loss_mode)
        return out[0], {}

    return step


def open_train_set(cfg: DictConfig, in_chans: int):
    """The training images with the official augmentation."""
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import pretrain_transform

    aug = cfg.data.augmentation
    tf = pretrain_transform(C.input_size(cfg), in_chans=in_chans, scale=(aug.crop_scale_min, aug.crop_scale_max),
                            hflip=aug.hflip, mean=cfg.data.mean, std=cfg.data.std)
    return open_dataset(cfg.data.data_path or "demo", "train", tf)


def device_augmentation(cfg: DictConfig, in_chans: int, device: torch.device, step_fn: Callable):
    """data.augment_on=device: (dataset whose workers only read and crop-box, its collate, wrapped step_fn)."""
    from mimkit.data.sources import open_dataset
    from mimkit.data.device_augment import DeviceAugment, DeviceSamples, collate_device, device_step
    from mimkit.data.transforms import mean_std

    aug = cfg.data.augmentation
    # on CUDA, JPEG files travel as bytes and nvJPEG decodes the batch; elsewhere workers decode
    data = DeviceSamples(open_dataset(cfg.data.data_path or "demo", "train", None), (aug.crop_scale_min,
                         aug.crop_scale_max), aug.hflip, in_chans, jpeg_bytes=device.type == "cuda")
    stats = mean_std(in_chans, cfg.data.mean, cfg.data.std)
    return data, collate_device, device_step(step_fn, DeviceAugment(C.input_size(cfg), *stats))


def build_optimizer(cfg: DictConfig, model, lr: float, device: torch.device,
                    run_log: RunLogger) -> tuple[torch.optim.Optimizer, Callable, Optional[FreezeOutHook]]:
    """(AdamW over the model's parameter groups, lr schedule, FreezeOut hook or None when FreezeOut is off).

    With FreezeOut the groups and the schedule are FreezeOut's: each block's lr anneals to zero by its freeze time.
    """
    sched = cfg.schedule
    freezeout = None
    if cfg.freezeout.enabled:
        freezeout = FreezeOutHook.for_run(cfg.freezeout, model, run_log, cfg.model.mask_ratio)
        groups = freezeout.param_groups(cfg.optimization.weight_decay)
        lr_schedule = freezeout.lr_schedule(lr, cfg.optimization.min_lr, sched.warmup_epochs, sched.epochs)
    else:
        groups = param_groups(model, cfg.optimization.weight_decay)

        def lr_schedule(opt, epoch_f: float) -> None:
            set_lr(opt, warmup_cosine(epoch_f, lr, cfg.optimization.min_lr, sched.warmup_epochs, sched.epochs))

    optimizer = build_adamw(groups, lr, (cfg.optimization.adam_beta1, cfg.optimization.adam_beta2), device)
    return optimizer, lr_schedule, freezeout


def reconstruction_hook(cfg: DictConfig, model, train_set, out_dir: Path, run_log: RunLogger,
                        is_main: bool) -> Optional[ReconstructionHook]:
    """The hook drawing reconstructions of a few training images, or None (said in the log) for a non-pixel model."""
    from mimkit.tasks.visualize import ReconstructionHook

    if not hasattr(model, "decoder_pred"):  # pixel reconstructions to draw (LocalMIM predicts HOG features)
        run_log.info(f"no reconstruction picture: {cfg.model.type} predicts {type(model).__name__} targets, not pixels")
        return None
    vis_images = picture_images(train_set, min(4, len(train_set)))
    return ReconstructionHook(vis_images, out_dir, cfg.logging.vis_freq_epochs, cfg.model.mask_ratio,
                              run_log, is_main, cfg.schedule.epochs,
                              normalization=(cfg.data.mean, cfg.data.std) if cfg.data.mean else None)


def check_fresh_freeze(model, report, cfg: DictConfig) -> None:
    """Refuse a freeze mode that freezes a decoder the starting checkpoint did not hold (it stays random), or
    leaves only that fresh decoder to train (the encoder would come out unchanged): one line, before any work."""
    mode = cfg.model.freeze_mode
    if mode == "none" or report is None or not getattr(report, "decoder_fresh", False):
        return
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.apply_freeze_mode(mode)
    from mimkit.models.mae import FIXED_PARAMS

    fixed = getattr(model, "is_fixed_param", lambda n: n in FIXED_PARAMS)  # sin-cos positions never train
    decoder = [(n, p) for n, p in model.named_parameters() if not model.is_encoder_param(n) and not fixed(n)]
    frozen = sum(p.numel() for _, p in decoder if not p.requires_grad)
    trains_encoder = any(p.requires_grad for n, p in model.named_parameters() if model.is_encoder_param(n))
    for n, p in model.named_parameters():  # as it was: the run applies its freeze mode itself
        p.requires_grad_(before[n])
    src = cfg.model.init_from
    if frozen:
        what = f"freezes {frozen:,} parameters of a freshly initialised decoder (they would stay random)"
    elif not trains_encoder:
        what = "trains only the freshly initialised decoder (the encoder would come out unchanged)"
    else:
        return
    raise ConfigError(f"--freeze_mode {mode} {what}: {src} holds no decoder (an encoder-only checkpoint); use "
                      "--freeze_mode none, or start from a full pretraining checkpoint with its decoder "
                      "(a mimkit run's checkpoints/final.pt, or one written as docs/freezeout.md shows)")


def preset_line(cfg: DictConfig) -> str:
    """The start-up line naming the preset put beneath the user's flags, and why."""
    if not cfg.data.data_path and not OmegaConf.select(cfg, "continual.domains", default=None):
        why = "no data path given: the demo; --data_path replaces it"
    elif cfg.model.init_from:  # the checkpoint's architecture is above the preset: only its schedule applies
        why = (f"built-in data is demo data: a CPU-sized schedule; the model is {cfg.model.init_from}'s own "
               "architecture")
    else:
        why = "built-in data is demo data: a CPU-sized recipe; --model or a config file replaces it"
    return f"preset {cfg.misc.preset} beneath your flags ({why})"


def picture_images(ds, n: int = 4) -> torch.Tensor:
    """n readable training images, spread over the set, for the reconstruction picture: (n, C, H, W).

    Drawn with fixed seeds inside a forked RNG, so picking them never moves the training RNG.
    """
    import logging

    picked: list[torch.Tensor] = []
    step = max(1, len(ds) // n)
    data_log = logging.getLogger("mimkit.data")  # an unreadable file is warned by the epoch that meets it
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        _pick(ds, n, step, picked)
    finally:
        data_log.setLevel(level)
    if not picked:
        raise UserError("no training image could be read")
    return torch.stack(picked)


def _pick(ds, n: int, step: int, picked: list) -> None:
    for k in range(len(ds)):
        idx = (k * step + k // n) % len(ds)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(idx)
            state = random.getstate()
            random.seed(idx)
            item = ds[idx]
            random.setstate(state)
        if item is not None:
            picked.append(item[0])
        if len(picked) == n:
            break
