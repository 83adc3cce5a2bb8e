"""The flags of `mimkit pretrain` (the official MAE / LocalMIM names) and its config: presets, then the layers."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig

from mimkit import config as C
from mimkit.config import TRACKING_FLAGS, TRAINING_FLAGS, Flag
from mimkit.engine.precision import AMP_HELP
from mimkit.errors import ConfigError

DEMO_PRESET = "pretrain/demo.yaml"
# Built-in sets are demo data: without --model or a config file they get a CPU-sized preset, never ViT-L at 224 px.
BUILTIN_PRESETS = {"digits": "pretrain/digits.yaml", "photos": "pretrain/photos.yaml", "*": "pretrain/demo.yaml"}

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
    C.GRAD_CKPT_FLAG,
    C.STRATEGY_FLAG,
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
    Flag("freezeout", "freezeout.enabled", None, "progressive layer freezing (--how_scale or --t_0 turn it on too)",
         const=True),
    Flag("how_scale", "freezeout.how_scale", str, "FreezeOut: linear | squared | cubic; turns FreezeOut on"),
    Flag("t_0", "freezeout.t_0", float,
         "FreezeOut: block i freezes at scale(t_0 + (1 - t_0) i / depth), t_0 in (0, 1]; turns FreezeOut on"),
    Flag("no_scale_lr", "freezeout.scale_lr", None, "FreezeOut: keep every block's base lr", const=False),
    Flag("freeze_heads", "freezeout.freeze_heads", None, "FreezeOut: freeze a tap's head with its block", const=True),
    *TRACKING_FLAGS,
]



def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register `mimkit pretrain`'s positionals and flags."""
    C.add_arguments(p, FLAGS, C.PretrainConfig)


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """The run's config: the demo preset when no data is named, a CPU preset for built-in sets, then the layers."""
    seed_freezeout_flags(args)
    return C.config_from_args(args, FLAGS, C.PretrainConfig, demo_preset=DEMO_PRESET, builtin_presets=BUILTIN_PRESETS)


def seed_freezeout_flags(args: argparse.Namespace) -> None:
    """--how_scale / --t_0 make a run a FreezeOut run, as in seed 002's scripts (there is no other switch there):
    they set --freezeout; an override `freezeout.enabled=false` beside them is a conflict, refused."""
    given = [f"--{n} {getattr(args, n)}" for n in ("how_scale", "t_0") if getattr(args, n, None) is not None]
    if not given:
        return
    off = [i for i in getattr(args, "items", None) or []
           if i.replace(" ", "").lower() in ("freezeout.enabled=false", "freezeout.enabled=0", "freezeout.enabled=no")]
    if off:
        raise ConfigError(f"{' '.join(given)} turn FreezeOut on, but {off[0]} turns it off: drop one of them")
    args.freezeout = True
