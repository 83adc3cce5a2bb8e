"""`mimkit segment`: semantic segmentation with UperNet on an MAE encoder (MMSeg's recipe) on THE loop.

    mimkit segment --output_dir runs/segment_demo    # built-in demo: tiny encoder on texture mosaics, CPU
    mimkit segment --finetune runs/demo/checkpoints/final.pt        # the same from the pretraining demo
    mimkit segment segment/ade20k_vit_base.yaml --finetune mae_pretrain_vit_base.pth --data_path ADE/
    torchrun --nproc_per_node 8 -m mimkit segment segment/ade20k_vit_base.yaml --finetune ... --data_path ...
    mimkit segment --eval --resume runs/segment_demo/checkpoints/final.pt
    mimkit segment --predict photos/ --resume runs/segment_demo/checkpoints/final.pt

Taps [3, 5, 7, 11] of the encoder (ViT-B's 12 blocks; scaled to the encoder's depth) -> Feature2Pyramid ->
UPerHead + auxiliary FCNHead (0.4); AdamW with layer-wise lr decay (MMSeg layer ids), linear warmup then poly;
cross-entropy ignoring 255; whole or sliding-window inference; mIoU / aAcc / mAcc / mDice from one confusion matrix into results.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mimkit import config as C
from mimkit.errors import CheckpointError, DataError
from mimkit.tasks.segment import config as SC
from mimkit.tasks.segment.eval import evaluate_checkpoint, pct, percent_metrics, report  # noqa: F401
from mimkit.config import add_arguments as _add_arguments
from mimkit.config import config_from_args
from mimkit.engine.fsdp import building, deferred_init, is_sharded, place_model, shard_folder, shardable_blocks
from mimkit.engine.precision import amp_decision
from mimkit.models.checkpointing import apply_grad_checkpointing, grad_checkpointing_line
from mimkit.tasks.pretrain.setup import seed_everything
from mimkit.tasks.preflight import check_resumed_settings


HELP_EPILOG = (
    "Which defaults apply: the defaults shown above are the schema's, MMSeg's ADE20K recipe; the ones shown as None "
    "follow the crop (--input_size): augmentation scale [4 x crop, crop], test window = the crop, test stride = 2/3 "
    "of the window, so at crop 512 they are MMSeg's ADE20K values (segment/ade20k_vit_base.yaml leaves them unset "
    "too). When no --data_path is given (and no config file names one), the demo preset segment/demo.yaml goes "
    "beneath your flags instead: built-in mosaics, mae_vit_demo_patch8, 64 px crops, 6 epochs (90 steps), lr 1e-3, "
    "whole-image inference. The start-up line names the preset in use. --eval / --predict use "
    "the checkpoint's own run settings (data, crop, normalisation, test mode, window) unless you set them. "
    "--epochs and --max_iters: give one; either replaces the preset's schedule length (both at once is an error)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the family (--finetune, --data_path, --max_iters, ...), a config file and dotted overrides."""
    _add_arguments(p, SC.SEGMENT_FLAGS, SC.SegmentConfig)
    import textwrap

    p.epilog = textwrap.fill(HELP_EPILOG, 100)  # the CLI's formatter keeps the epilog's own line breaks


def run(args: argparse.Namespace) -> int:
    """CLI entry: config (--epochs or --max_iters replaces the preset's other), then segment."""
    from mimkit.tasks.segment.setup import given_keys

    given = given_keys(args, SC.SEGMENT_FLAGS)
    if getattr(args, "epochs", None) is not None and getattr(args, "max_iters", None) is None:
        args.items = list(args.items) + ["schedule.max_iters=null"]
    elif getattr(args, "max_iters", None) is not None and getattr(args, "epochs", None) is None:
        args.items = list(args.items) + ["schedule.epochs=null"]
    cfg = config_from_args(args, SC.SEGMENT_FLAGS, SC.SegmentConfig, demo_preset=SC.DEMO_PRESET)
    segment(cfg, given)
    return 0


# ---------------------------------------------------------------------------------------------- pieces
def layer_id(name: str, depth: int) -> int:
    """MMSeg get_layer_id_for_vit: cls token, position embedding, patch embedding 0; block i -> i + 1;
    neck and heads depth + 1."""
    from mimkit.tasks.finetune import layer_id as vit_layer_id

    if name.startswith("backbone."):
        return vit_layer_id(name[len("backbone."):], depth)
    return depth + 1


def param_groups(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: lr_scale = layer_decay ** (depth + 1 - layer_id); no weight decay on 1-D parameters
    (biases, LayerNorm, BatchNorm), the cls token and the position embedding."""
    depth, skip = model.depth, model.no_weight_decay()
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name, depth)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "names": [], "lr_scale": layer_decay ** (depth + 1 - lid),
                                    "weight_decay": 0.0 if no_decay else weight_decay, "group": key})
        g["params"].append(p)
        g["names"].append(name)
    # the heads' groups (scale 1) first: the loop logs the first group's lr, which is then the base lr (as MMSeg)
    return sorted(groups.values(), key=lambda g: -g["lr_scale"])


def warmup_poly(step: float, lr: float, min_lr: float, warmup: int, warmup_ratio: float, total: int,
                power: float) -> float:
    """MMSeg LinearLR (start factor warmup_ratio) for `warmup` steps, then PolyLR to min_lr at `total`."""
    if step < warmup:
        return lr * (warmup_ratio + (1 - warmup_ratio) * step / warmup)
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (lr - min_lr) * (1 - progress) ** power


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, avg_non_ignore: bool) -> torch.Tensor:
    """Cross-entropy of logits (N, K, h, w) resized bilinearly to target (N, H, W); ignored pixels count 0 and
    the sum is divided by all pixels (MMSeg's default) or only the labelled ones (avg_non_ignore)."""
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False).float()
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    denom = (target != ignore_index).sum() if avg_non_ignore else torch.tensor(target.numel())
    return total / denom.clamp(min=1)


def segment_step(aux_weight: float, ignore_index: int, avg_non_ignore: bool) -> Callable:
    """step_fn for the engine: images -> (main, aux) logits -> decode loss + aux_weight * aux loss."""

    def step(model, batch):
        main, aux = model(batch["images"])
        y = batch["labels"]
        loss_seg = seg_loss(main, y, ignore_index, avg_non_ignore)
        loss_aux = seg_loss(aux, y, ignore_index, avg_non_ignore)
        return loss_seg + aux_weight * loss_aux, {"loss_seg": loss_seg.item(), "loss_aux": loss_aux.item()}

    return step


def open_splits(cfg, num_classes: Optional[int]):
    """(train source, val source) with equal class lists, every mask checked when data.check_masks."""
    from mimkit.data.segmentation import check_pairs, open_segmentation

    d = cfg.data
    train = open_segmentation(d.data_path, "train", num_classes, d.reduce_zero_label)
    val = open_segmentation(d.data_path, "val", num_classes, d.reduce_zero_label)
    if d.check_masks:
        check_pairs(train)
        check_pairs(val)
    elif len(train) == 0 or len(val) == 0:
        raise DataError(f"{d.data_path}: an empty split")
    return train, val


class SegEvalHook:
    """Trainer hook: evaluate every `interval` optimiser steps (0 = never during training), log mIoU in %.

    An evaluation at the last step draws the overlays and is kept, so the run's final report reuses it.
    """

    def __init__(self, evaluate: Callable[[int], tuple[dict, list]], interval: int, run_log, last_step: int,
                 num_overlays: int, class_names: Optional[list[str]] = None) -> None:
        self.evaluate, self.interval, self.run_log = evaluate, interval, run_log
        self.class_names = class_names
        self.last_step, self.num_overlays = last_step, num_overlays
        self.history: list[dict] = []
        self.last: Optional[tuple[int, dict, list]] = None  # (step, metrics, panels) of the latest evaluation

    def log(self, metrics: dict, panels: list, step: int) -> None:
        """Console line, metrics.jsonl ('eval'), tracker scalars, overlay images and the per-class table; in %."""
        record = {"kind": "eval", "step": step, **{k: pct(metrics[k]) for k in ("mIoU", "aAcc", "mAcc", "mDice")}}
        self.history.append(record)
        self.last = (step, metrics, panels)
        self.run_log.metrics(record, step, tb_prefix="eval")
        for i, panel in enumerate(panels):
            self.run_log.image(f"eval/overlay_{i}", panel, step)
        if self.class_names and len(self.class_names) == len(metrics.get("IoU", [])):
            rows = [[name] + [pct(metrics[k][c]) for k in ("IoU", "Acc", "Dice")]
                    for c, name in enumerate(self.class_names)]
            self.run_log.table("eval/per_class", ["class", "IoU", "Acc", "Dice"], rows, step)
        self.run_log.info(f"eval step {step}: " + "  ".join(
            f"{k} {'n/a' if record[k] is None else format(record[k], '.2f') + '%'}"
            for k in ("mIoU", "aAcc", "mAcc", "mDice")))

    def on_step_end(self, trainer) -> None:
        """Evaluate when the step count reaches a multiple of the interval."""
        step = trainer.state.step
        if self.interval and step % self.interval == 0:
            metrics, panels = self.evaluate(self.num_overlays if step >= self.last_step else 0)
            self.log(metrics, panels, step)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, sd: dict, trainer) -> None:
        self.history = list(sd.get("history", []))


# ---------------------------------------------------------------------------------------------- the recipe
def segment(cfg, given: Optional[dict] = None) -> dict:
    """Train then evaluate (or with misc.eval only evaluate, with misc.predict only predict); returns metrics.

    `given`: the dotted keys the user set ({'command': flags and overrides, 'file': a config file}); they beat
    a checkpoint's run settings (--eval / --predict) and, for model.type, the checkpoint's architecture.
    """
    from mimkit.data.segmentation import SegEvalPipeline, SegmentationDataset
    from mimkit.engine import distributed as D
    from mimkit.models.segmentation import segmenter_arch, segmenter_from_encoder
    from mimkit.tasks.evaluation import common as E
    from mimkit.tasks.segment import infer as I
    from mimkit.tasks.segment import setup as U

    given = given or {"command": set(), "file": set(), "file_name": None}
    # 1. validate config, checkpoint and data before any training
    SC.check_segment_config(cfg)
    dist = D.init_distributed(cfg.misc.device)
    seed_everything(cfg.misc.seed)
    resume = U.read_resume(cfg)  # an MMSegmentation file too (--eval / --predict)
    if cfg.misc.eval or cfg.misc.predict:
        return evaluate_checkpoint(cfg, resume, given, dist)
    check_resumed_settings(cfg, "segment", resume)  # a resume keeps its run-defining settings, before any work
    crop = C.input_size(cfg)
    saved = (resume or {}).get("config") or {}
    if resume is None and cfg.model.finetune and U.read_segment_checkpoint(cfg.model.finetune) is None:
        U.check_has_encoder(cfg.model.finetune)  # a wrong file fails before the masks are read
    train_src, val_src = open_splits(cfg, cfg.model.num_classes)
    classes = train_src.classes
    if list(val_src.classes) != list(classes):
        raise DataError("the val split's classes differ from the training split's")
    # --strategy fsdp over several ranks: built on meta (recorded), materialised shard by shard below
    recorder = deferred_init(cfg.distributed.strategy, dist.world_size)
    if (resume or {}).get("sharded"):
        shard_folder(resume, cfg.misc.resume, ckpt_dir(cfg))  # every rank's file present, before any work
    if resume is not None:
        from mimkit.models.segmentation import MAESegmenter

        arch = dict(saved.get("model", {}).get("arch") or {})
        if not arch:
            raise U.not_a_segment_checkpoint(cfg.misc.resume or "latest.pt", resume)
        if arch["num_classes"] != len(classes):
            raise CheckpointError(f"the checkpoint has {arch['num_classes']} classes, the data {len(classes)}")
        with building(recorder):
            model = MAESegmenter(arch, cfg.model.drop_path)
        desc = f"UperNet from {cfg.misc.resume or 'latest.pt'}"
        if cfg.data.mean is None and cfg.data.std is None:  # keep the statistics the run started with
            OmegaConf.update(cfg, "data.mean", saved.get("data", {}).get("mean"))
            OmegaConf.update(cfg, "data.std", saved.get("data", {}).get("std"))
    else:
        with building(recorder):
            encoder, desc = U.build_encoder(cfg, crop, given)
            m = cfg.model
            arch = segmenter_arch(encoder, crop, len(classes), m.taps, m.channels, m.aux_channels, m.pool_scales,
                                  m.dropout)
            model = segmenter_from_encoder(encoder, arch, m.drop_path)
        E.adopt_normalization(cfg, encoder)  # the encoder's pretraining statistics, unless data.mean/std say
        del encoder
    pipeline = SegEvalPipeline(crop, cfg.data.augmentation.scale, cfg.data.mean, cfg.data.std)
    memory = U.check_memory(cfg, model, arch, crop, dist.device, seg_loss)  # a run that cannot fit: refused here
    desc += f"; {U.describe_taps(arch['taps'], arch['depth'])}; {memory}"
    OmegaConf.set_struct(cfg, False)
    cfg.model.arch, cfg.model.class_names = arch, list(classes)  # --eval / --predict rebuild from these
    OmegaConf.set_struct(cfg, True)
    val_set = SegmentationDataset(val_src)
    n_ckpt = apply_grad_checkpointing(model, cfg.model.grad_checkpointing, "the segmenter")
    if cfg.distributed.strategy == "fsdp":
        shardable_blocks(model, "the segmenter")
    placed: list[str] = []  # logged once the run's log is open
    if n_ckpt:
        placed.append(grad_checkpointing_line(model, cfg.model.grad_checkpointing, n_ckpt))
    place_model(model, recorder, dist.device, amp_decision(cfg.misc.amp, dist.device)[0], cfg.distributed.strategy,
                dist.world_size, placed.append, "the segmenter", weights_needed=not (resume or {}).get("sharded"))
    out_dir = Path(C.resolve_output_dir(cfg, "segment"))  # default: a new runs/segment/<timestamp>

    def run_eval(overlays: int = 0):
        return I.evaluate(model, val_set, pipeline, cfg.test, crop, dist.device, cfg.data.ignore_index,
                          out_dir / "overlays" if dist.is_main and overlays else None, overlays)

    train_set = SegmentationDataset(train_src, train_pipeline(cfg, crop))
    state, hook, trained = fit(cfg, model, train_set, run_eval, resume, desc, dist, given.get("file_name"), placed)
    results = out_dir / "results.json"
    if not trained and results.exists():
        import json

        earlier = json.loads(results.read_text())
        if earlier.get("steps") == state.step:  # a rerun of a finished run: its results stand
            hook.run_log.close()
            if dist.is_main:
                print(f"results: {results} (unchanged: step {state.step} was evaluated already)")
            return earlier["metrics"]
    if hook.last is not None and hook.last[0] == state.step:  # the hook evaluated the last step already
        _, metrics, _ = hook.last
    else:
        metrics, panels = run_eval(cfg.test.num_overlays)
        hook.log(metrics, panels, state.step)
    hook.run_log.close()
    return report(cfg, metrics, classes, desc, dist, {"history": hook.history, "steps": state.step,
                                                      "final_checkpoint": str(ckpt_dir(cfg) / "final.pt")})


def train_pipeline(cfg, crop: tuple[int, int]):
    """MMSeg's ADE20K training pipeline with the config's values."""
    from mimkit.data.segmentation import SegTrainPipeline

    a = cfg.data.augmentation
    return SegTrainPipeline(crop, a.scale, tuple(a.ratio_range), a.cat_max_ratio, a.hflip, a.photometric,
                            cfg.data.ignore_index, cfg.data.mean, cfg.data.std)


def ckpt_dir(cfg) -> Path:
    """<output_dir>/checkpoints unless checkpointing.checkpoint_dir says otherwise."""
    return Path(cfg.checkpointing.checkpoint_dir or Path(cfg.misc.output_dir) / "checkpoints")


def fit(cfg, model, train_set, run_eval: Callable, resume: Optional[dict], desc: str, dist,
        config_file: Optional[str] = None, notes: Sequence[str] = ()):
    """Set up the optimiser, schedule and THE engine loop, and train; returns (state, eval hook, trained?)."""
    import os

    from mimkit.data.datasets import collate_batch
    from mimkit.engine.checkpoint import CheckpointManager
    from mimkit.engine.logging import RunLogger
    from mimkit.engine.loop import LoopSettings, Trainer, amp_decision
    from mimkit.engine.optim import build_adamw, set_lr
    from mimkit.engine.sampling import EpochSampler

    o, s = cfg.optimization, cfg.schedule
    if dist.enabled and dist.device.type == "cuda" and not is_sharded(model):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over all GPUs
    run_log = RunLogger(Path(cfg.misc.output_dir), enabled=dist.is_main, print_freq=cfg.logging.print_freq,
                        tracking=cfg.logging, config=C.to_container(cfg))
    if dist.is_main:
        C.save_config(cfg, Path(cfg.misc.output_dir) / "config.yaml")
    for line in notes:
        run_log.info(line)
    seed_everything(cfg.misc.seed + dist.rank)  # augmentation and drop path differ across ranks
    groups = param_groups(model, o.weight_decay, o.layer_decay)
    optimizer = build_adamw(groups, o.lr, (o.adam_beta1, o.adam_beta2), dist.device)
    ipe = EpochSampler(train_set, dist.rank, dist.world_size, cfg.misc.seed).full_len() // o.batch_size
    if ipe < 1:
        raise DataError(f"the training split has {len(train_set)} images: fewer than one batch of {o.batch_size}")
    total = s.max_iters or (s.epochs * ipe) // o.accum_iter
    epochs = s.epochs or math.ceil(total * o.accum_iter / ipe)

    def lr_schedule(optim, epoch_f: float) -> None:
        step = epoch_f * ipe / o.accum_iter
        set_lr(optim, warmup_poly(step, o.lr, o.min_lr, s.warmup_iters, s.warmup_ratio, total, s.power))

    stop = min(total, cfg.misc.max_steps or total)
    # --max_iters IS the schedule: the loop ends there (no misc.max_steps stop); --max_steps cuts a run short
    max_steps = stop if stop < total else 0
    hook = SegEvalHook(run_eval, cfg.test.interval, run_log, stop, cfg.test.num_overlays,
                       list(cfg.model.class_names or []))
    amp, amp_why = amp_decision(cfg.misc.amp, dist.device)
    settings = LoopSettings(
        epochs=epochs, batch_size=o.batch_size, accum_iter=o.accum_iter, gradient_clip=o.gradient_clip,
        on_nonfinite=o.on_nonfinite, amp=amp, num_workers=min(cfg.data.num_workers, os.cpu_count() or 1),
        pin_memory=cfg.data.pin_memory, persistent_workers=cfg.data.persistent_workers, seed=cfg.misc.seed,
        save_freq_epochs=cfg.checkpointing.save_freq_epochs, save_freq_steps=cfg.checkpointing.save_freq_steps,
        max_steps=max_steps, total_iters=total * o.accum_iter if s.max_iters else 0,
        find_unused_parameters=max(model.taps) < model.depth - 1, strategy=cfg.distributed.strategy,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    ckpt = CheckpointManager(ckpt_dir(cfg), cfg.checkpointing.keep_last_n, run_log.log_path,
                             cfg.checkpointing.safetensors)
    m = cfg.model
    trainer = Trainer(model=model, optimizer=optimizer, dataset=train_set, collate=collate_batch,
                      step_fn=segment_step(m.aux_weight, cfg.data.ignore_index, m.avg_non_ignore),
                      lr_schedule=lr_schedule, settings=settings, dist=dist, run=run_log, ckpt=ckpt,
                      config=C.to_container(cfg), config_yaml=OmegaConf.to_yaml(cfg, resolve=True), hooks=[hook])
    if resume is not None:
        trainer.load(resume)
    if cfg.misc.preset:
        preset = f"preset {cfg.misc.preset} beneath your flags (no --data_path: the demo)"
    else:
        preset = f"config {config_file} over" if config_file else "your flags over"
        preset += " the schema's defaults (MMSeg's ADE20K recipe)"
    short = epochs * ipe - total * o.accum_iter if s.max_iters else 0  # iterations the last epoch leaves out
    epoch_desc = f"{epochs} epoch{'s' if epochs > 1 else ''} of {ipe} iterations" + (
        f", the last one {ipe - short} long: the schedule ends there" if short else "")
    test_desc = cfg.test.mode
    if cfg.test.mode == "slide":
        window, stride = SC.slide_window(cfg.test, C.input_size(cfg))
        test_desc += f" (window {window}, stride {stride})"
    run_log.info(f"mimkit segment: {preset}; {desc}; UperNet, {model.num_classes} classes; "
                 f"{len(train_set)} train images, {total} steps ({epoch_desc}), effective batch "
                 f"{o.batch_size * o.accum_iter * dist.world_size}, lr {o.lr:.2e} (heads; layer decay "
                 f"{o.layer_decay} below), warmup {s.warmup_iters}, test {test_desc}, amp {amp} ({amp_why}), "
                 f"device {dist.device}")
    if resume is not None:  # after the start-up line, which says what runs
        run_log.info(f"resumed at epoch {trainer.state.epoch}, step {trainer.state.step}"
                     + (f"; {resume['resume_note']}" if resume.get("resume_note") else ""))
    if s.warmup_iters > total:
        run_log.info(f"warning: the run is {total} steps but the warmup is {s.warmup_iters} (the lr never reaches "
                     f"{o.lr:.2e}); lower --warmup_iters")
    if trainer.state.step >= total:
        run_log.info(f"nothing to train: this run already made its {total} steps (a new --output_dir starts over)")
        return trainer.state, hook, False
    start = trainer.state.step
    try:
        trainer.fit()
    except BaseException:
        run_log.close()
        raise
    return trainer.state, hook, trainer.state.step > start
