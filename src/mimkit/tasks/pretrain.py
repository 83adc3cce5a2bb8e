r"""`mimkit pretrain`: MAE-family pretraining (also LocalMIM, FreezeOut), one recipe read top to bottom.

    mimkit pretrain                                   # the embedded demo (mae_vit_demo_patch8, bundled photos, CPU)
    mimkit pretrain pretrain/cpu_small.yaml --data_path /my/images          # your images on a CPU
    mimkit pretrain --data_path /imagenet --model mae_vit_base_patch16 --norm_pix_loss --batch_size 64   # GPUs
    mimkit pretrain configs/pretrain/mae_vit_base.yaml data.data_path=/imagenet                          # GPUs
    torchrun --nproc_per_node 8 -m mimkit pretrain configs/pretrain/mae_vit_base.yaml --data_path /imagenet \
        --output_dir runs/vitb

Results go to --output_dir (resumed when it holds a run), else a new runs/pretrain/<timestamp>/.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine import distributed as D
from mimkit.engine.checkpoint import CheckpointManager, find_resume
from mimkit.engine.logging import RunLogger
from mimkit.engine.loop import LoopSettings, Trainer, rollback_settings
from mimkit.engine.precision import AMP_HELP, amp_decision
from mimkit.engine.optim import build_adamw, optimizer_kind, param_groups, scaled_lr, set_lr, warmup_cosine
from mimkit.errors import ConfigError, UserError
from mimkit.tasks.preflight import CPU_HINT, cap_workers, check_one_batch, load_weights, note_schedule_change
from mimkit.tasks.preflight import image_notes

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


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model(cfg: DictConfig, device: str | torch.device = "cpu"):
    """The model the config names, sized to data.input_size; bad options fail on the meta device first."""
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
    with torch.device(device):
        return create_model(cfg.model.type, **kwargs)


def pretrain_step(mask_ratio: float, loss_mode: str) -> Callable:
    """The step function the engine runs: loss = model(images)."""

    def step(model, batch):
        out = model(batch["images"], mask_ratio=mask_ratio, loss_mode=loss_mode)
        return out[0], {}

    return step


def open_train_set(cfg: DictConfig, in_chans: int):
    """The training images with the official augmentation."""
    from mimkit.data.builtin import open_dataset
    from mimkit.data.transforms import pretrain_transform

    aug = cfg.data.augmentation
    tf = pretrain_transform(C.input_size(cfg), in_chans=in_chans, scale=(aug.crop_scale_min, aug.crop_scale_max),
                            hflip=aug.hflip, mean=cfg.data.mean, std=cfg.data.std)
    return open_dataset(cfg.data.data_path or "demo", "train", tf)


def device_augmentation(cfg: DictConfig, in_chans: int, device: torch.device, step_fn: Callable):
    """data.augment_on=device: (dataset whose workers only read and crop-box, its collate, wrapped step_fn)."""
    from mimkit.data.builtin import open_dataset
    from mimkit.data.device_augment import DeviceAugment, DeviceSamples, collate_device, device_step
    from mimkit.data.transforms import mean_std

    aug = cfg.data.augmentation
    # on CUDA, JPEG files travel as bytes and nvJPEG decodes the batch; elsewhere workers decode
    data = DeviceSamples(open_dataset(cfg.data.data_path or "demo", "train", None), (aug.crop_scale_min,
                         aug.crop_scale_max), aug.hflip, in_chans, jpeg_bytes=device.type == "cuda")
    stats = mean_std(in_chans, cfg.data.mean, cfg.data.std)
    return data, collate_device, device_step(step_fn, DeviceAugment(C.input_size(cfg), *stats))


def run(args: argparse.Namespace) -> int:
    """CLI entry: build the config, then train."""
    cfg = config_from_args(args, builtin_presets=BUILTIN_PRESETS)
    train(cfg)
    return 0


def train(cfg: DictConfig, extra_hooks: list = (), print_summary: bool = True) -> dict:
    """Pretrain as `cfg` says; returns a summary (run folder, paths, final loss, the trained `model`)."""
    from mimkit.data.datasets import collate_batch
    from mimkit.tasks.visualize import ReconstructionHook

    # 1. validate everything that can be checked before any work
    dist = D.init_distributed(cfg.misc.device)
    seed_everything(cfg.misc.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg, "cpu")
    train_set = open_train_set(cfg, model.in_chans)
    big = sum(p.numel() for p in model.parameters()) > 50e6  # the official GPU recipe: the CPU preset may fit better
    check_one_batch(len(train_set), cfg.optimization.batch_size, dist.world_size, CPU_HINT if big else None)
    notes = image_notes(train_set, C.input_size(cfg))
    out_dir = Path(C.resolve_output_dir(cfg, "pretrain"))
    ckpt_dir = Path(cfg.checkpointing.checkpoint_dir or out_dir / "checkpoints")
    # a damaged latest.pt falls back to the newest intact checkpoint (warning logged below)
    resume_ckpt, resume_path, resume_warning = find_resume(cfg.misc.resume, ckpt_dir, cfg.misc.auto_resume)
    if cfg.model.init_from and resume_ckpt is None:
        report = load_weights(model, cfg.model.init_from)
    else:
        report = None
    eff_batch = cfg.optimization.batch_size * cfg.optimization.accum_iter * dist.world_size
    lr = cfg.optimization.lr or scaled_lr(cfg.optimization.base_lr, cfg.optimization.batch_size,
                                          cfg.optimization.accum_iter, dist.world_size)
    OmegaConf.set_struct(cfg, False)
    cfg.optimization.lr = lr  # the derived value is written into the saved config
    OmegaConf.set_struct(cfg, True)

    # 2. set up: run folder, logging, seeds, model on device, optimiser
    run_log = RunLogger(out_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard,
                        print_freq=cfg.logging.print_freq)
    seed_everything(cfg.misc.seed + dist.rank)  # masks and drop-path differ across ranks
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if dist.is_main:
        C.save_config(cfg, out_dir / "config.yaml")
    from mimkit.models.registry import describe

    run_log.info(f"mimkit pretrain: model {cfg.model.type} ({describe(model)}); {len(train_set)} training images "
                 f"({cfg.data.data_path or 'built-in demo'}), device {dist.device}, {dist.world_size} process(es)")
    if cfg.misc.preset:
        run_log.info(preset_line(cfg))
    run_log.info(f"run folder {out_dir}")
    n_params = sum(p.numel() for p in model.parameters())
    if dist.device.type == "cpu" and n_params > 50e6:  # the official defaults are GPU recipes
        run_log.info(f"note: a {n_params / 1e6:.0f}M-parameter model on a CPU is slow; {CPU_HINT}")
    for note in notes:
        run_log.info(note)
    if report is not None:
        run_log.info(report.summary())
    if resume_warning:
        run_log.info(resume_warning)
    model.apply_freeze_mode(cfg.model.freeze_mode)
    if cfg.model.freeze_mode != "none":
        run_log.info(model.format_param_status())
        if not cfg.model.init_from and resume_ckpt is None:
            run_log.info(f"warning: freeze_mode {cfg.model.freeze_mode} on a randomly initialised model (no "
                         "--init_from / --continual_checkpoint): the frozen weights stay random, so little can be "
                         "learned; start from a pretrained checkpoint")
    if dist.device.type == "cuda" and cfg.misc.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(dist.device)
    if cfg.misc.compile:
        model.compile()
    sched = cfg.schedule
    hooks = list(extra_hooks)
    if cfg.freezeout.enabled:
        from mimkit.engine.freezeout import FreezeOutHook

        freezeout = FreezeOutHook.from_config(cfg.freezeout, model, run_log)
        hooks.append(freezeout)
        groups = freezeout.param_groups(cfg.optimization.weight_decay)
        lr_schedule = freezeout.lr_schedule(lr, cfg.optimization.min_lr, sched.warmup_epochs, sched.epochs)
    else:
        groups = param_groups(model, cfg.optimization.weight_decay)

        def lr_schedule(opt, epoch_f: float) -> None:
            set_lr(opt, warmup_cosine(epoch_f, lr, cfg.optimization.min_lr, sched.warmup_epochs, sched.epochs))

    optimizer = build_adamw(groups, lr, (cfg.optimization.adam_beta1, cfg.optimization.adam_beta2), dist.device)

    if sched.warmup_epochs >= sched.epochs:
        run_log.info(f"warning: schedule.warmup_epochs ({sched.warmup_epochs:g}) >= schedule.epochs ({sched.epochs}): "
                     "the lr never leaves its linear warmup; lower --warmup_epochs")
    num_workers = cap_workers(cfg.data.num_workers, run_log)
    run_log.slow_hint = CPU_HINT
    amp, amp_why = amp_decision(cfg.misc.amp, dist.device)
    run_log.info(f"effective batch {eff_batch} (batch {cfg.optimization.batch_size} x accum "
                 f"{cfg.optimization.accum_iter} x {dist.world_size} process(es)), lr {lr:.3e}, "
                 f"amp {amp} ({amp_why}), {optimizer_kind(optimizer)}")
    recon = None
    if hasattr(model, "decoder_pred"):  # pixel reconstructions to draw (LocalMIM predicts HOG features)
        vis_images = picture_images(train_set, min(4, len(train_set)))
        recon = ReconstructionHook(vis_images, out_dir, cfg.logging.vis_freq_epochs, cfg.model.mask_ratio,
                                   run_log, dist.is_main, sched.epochs,
                                   normalization=(cfg.data.mean, cfg.data.std) if cfg.data.mean else None)
        hooks.append(recon)
    else:
        run_log.info(f"no reconstruction picture: {cfg.model.type} predicts {type(model).__name__} targets, not pixels")
    if cfg.eval.eval_data_path and cfg.eval.eval_every:
        from mimkit.tasks.monitor import MonitorHook

        hooks.append(MonitorHook.from_config(cfg, run_log))
    settings = LoopSettings(
        epochs=sched.epochs, batch_size=cfg.optimization.batch_size, accum_iter=cfg.optimization.accum_iter,
        gradient_clip=cfg.optimization.gradient_clip, **rollback_settings(cfg.optimization), amp=amp,
        num_workers=num_workers, pin_memory=cfg.data.pin_memory,
        persistent_workers=cfg.data.persistent_workers, seed=cfg.misc.seed,
        save_freq_epochs=cfg.checkpointing.save_freq_epochs, save_freq_steps=cfg.checkpointing.save_freq_steps,
        max_steps=cfg.misc.max_steps,
    )
    ckpt = CheckpointManager(ckpt_dir, cfg.checkpointing.keep_last_n, run_log.log_path, cfg.checkpointing.safetensors)
    data, collate, step_fn = train_set, collate_batch, pretrain_step(cfg.model.mask_ratio, cfg.model.loss_mode)
    if cfg.data.augment_on == "device":
        data, collate, step_fn = device_augmentation(cfg, model.in_chans, dist.device, step_fn)
        run_log.info(f"augmentation on {dist.device}: workers only read"
                     + (" JPEG bytes (nvJPEG decodes them)" if dist.device.type == "cuda" else " and decode"))
    trainer = Trainer(model=model, optimizer=optimizer, dataset=data, collate=collate, step_fn=step_fn,
                      lr_schedule=lr_schedule,
                      settings=settings, dist=dist, run=run_log, ckpt=ckpt, config=C.to_container(cfg),
                      config_yaml=cfg_yaml, hooks=hooks)
    if resume_ckpt is not None:
        trainer.load(resume_ckpt)
        run_log.info(f"resumed from {resume_path} at epoch {trainer.state.epoch}, batch {trainer.state.batch}, "
                     f"step {trainer.state.step}")
        note_schedule_change(run_log, resume_ckpt.get("config") or {}, cfg, lr,
                             trainer.state.epoch + trainer.state.batch / trainer.iters_per_epoch)
        if trainer.state.epoch >= sched.epochs:
            run_log.info(f"nothing to train: this run already finished its {sched.epochs} epochs "
                         "(raise --epochs to continue, or --no_auto_resume / a new --output_dir to start over)")
    elif sched.start_epoch:
        trainer.state.epoch = sched.start_epoch

    # 3. train, 4. report
    try:
        state = trainer.fit()
    finally:
        run_log.close()
    summary = {
        "output_dir": str(out_dir), "checkpoints": str(ckpt_dir), "final_checkpoint": str(ckpt_dir / "final.pt"),
        "log": str(out_dir / "log.txt"), "metrics": str(out_dir / "metrics.jsonl"),
        "tensorboard": str(out_dir / "tb"),
        "reconstruction": str(recon.last_path) if recon and recon.last_path else None,
        "final_loss": state.history[-1]["loss"] if state.history else None, "steps": state.step,
        "skipped_images": state.skipped_images, "model": model,
    }
    if print_summary and dist.is_main:
        print("\nDone. Everything is in " + str(out_dir) + ":")
        for k in ("final_checkpoint", "log", "metrics", "tensorboard", "reconstruction"):
            if summary[k]:
                print(f"  {k:<17}{summary[k]}")
        if summary["final_loss"] is not None:
            print(f"  {'final loss':<17}{summary['final_loss']:.4f}")
        print(f"  view the curves: tensorboard --logdir {out_dir / 'tb'}")
    return summary


def preset_line(cfg: DictConfig) -> str:
    """The start-up line naming the preset put beneath the user's flags, and why."""
    if not cfg.data.data_path and not OmegaConf.select(cfg, "continual.domains", default=None):
        why = "no data path given: the demo"
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
