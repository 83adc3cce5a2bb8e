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
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine import distributed as D
from mimkit.engine.checkpoint import CheckpointManager, find_resume
from mimkit.engine.fsdp import building, deferred_init, place_model, shard_folder, shardable_blocks
from mimkit.engine.logging import RunLogger
from mimkit.engine.loop import LoopSettings, Trainer, TrainState, rollback_settings
from mimkit.engine.optim import optimizer_kind, scaled_lr
from mimkit.engine.precision import amp_decision
from mimkit.models.checkpointing import apply_grad_checkpointing, grad_checkpointing_line
from mimkit.tasks.preflight import CPU_HINT, cap_workers, check_memory, check_one_batch, load_weights
from mimkit.tasks.preflight import meta_images
from mimkit.tasks.preflight import note_schedule_change
from mimkit.tasks.preflight import image_notes
# The flags, config builder and run pieces live in their own modules; these names stay importable from here.
from mimkit.tasks.pretrain.config import BUILTIN_PRESETS, DEMO_PRESET, FLAGS, add_arguments, config_from_args  # noqa: F401
from mimkit.tasks.pretrain.setup import (  # noqa: F401
    build_model, build_optimizer, check_fresh_freeze, device_augmentation, open_train_set, picture_images, preset_line,
    pretrain_step,
    reconstruction_hook, seed_everything,
)

if TYPE_CHECKING:
    from mimkit.tasks.visualize import ReconstructionHook


def run(args: argparse.Namespace) -> int:
    """CLI entry: build the config, then train."""
    cfg = config_from_args(args)
    summary = train(cfg)
    C.note_results({k: v for k, v in summary.items() if k != "model"})  # the Python API's RunResult.results
    return 0


def train(cfg: DictConfig, extra_hooks: list = (), print_summary: bool = True, parent_log: Optional[RunLogger] = None,
          parent_prefix: str = "") -> dict:
    """Pretrain as `cfg` says; returns a summary (run folder, paths, final loss, the trained `model`).

    `parent_log`: the run this one is a stage of; its wandb / MLflow runs receive this run's records too, named
    under `parent_prefix` (continual stages)."""
    from mimkit.data.datasets import collate_batch

    # 1. validate everything that can be checked before any work
    dist = D.init_distributed(cfg.misc.device)
    resume_note = resume_settings(cfg, "continual" if parent_log is not None else "pretrain")
    seed_everything(cfg.misc.seed)  # the same initial weights on every rank and every run
    fsdp = cfg.distributed.strategy == "fsdp"
    # FSDP over several ranks: built on meta and recorded, materialised shard by shard once sharded
    recorder = deferred_init(cfg.distributed.strategy, dist.world_size)
    model = build_model(cfg, "meta" if recorder else "cpu", recorder)
    n_ckpt = apply_grad_checkpointing(model, cfg.model.grad_checkpointing, cfg.model.type)
    if fsdp:
        shardable_blocks(model, cfg.model.type)  # a model FSDP cannot wrap: one line before any work
    train_set = open_train_set(cfg, model.in_chans)
    big = sum(p.numel() for p in model.parameters()) > 50e6  # the official GPU recipe: the CPU preset may fit better
    check_one_batch(len(train_set), cfg.optimization.batch_size, dist.world_size, CPU_HINT if big else None)
    notes = image_notes(train_set, C.input_size(cfg))
    stage = parent_log is not None  # a continual stage: the continual preset is the one that fits
    notes.insert(0, pretrain_memory(cfg, model, dist.device, dist.world_size, "continual" if stage else "pretrain",
                                    STAGE_HINT if stage else CPU_HINT))
    out_dir = Path(C.resolve_output_dir(cfg, "pretrain"))
    ckpt_dir = Path(cfg.checkpointing.checkpoint_dir or out_dir / "checkpoints")
    # a damaged latest.pt falls back to the newest intact checkpoint (warning logged below)
    resume_ckpt, resume_path, resume_warning = find_resume(cfg.misc.resume, ckpt_dir, cfg.misc.auto_resume)
    if resume_ckpt is not None and resume_ckpt.get("sharded"):
        shard_folder(resume_ckpt, resume_path, ckpt_dir)  # every rank's file present, before any work
    if cfg.model.init_from and resume_ckpt is None:
        with building(recorder):  # on meta: the copies are recorded, replayed into the shards
            report = load_weights(model, cfg.model.init_from)
        check_fresh_freeze(model, report, cfg)
    else:
        report = None
    world_note = None
    if resume_ckpt is not None:  # another number of processes: keep the checkpoint's effective batch
        old = checkpoint_geometry(resume_ckpt, cfg)
        accum, world_note = D.keep_effective_batch(old, cfg.optimization.batch_size, cfg.optimization.accum_iter,
                                                   dist.world_size, accum_given=cfg.optimization.accum_iter != old[1])
        OmegaConf.update(cfg, "optimization.accum_iter", accum)
    eff_batch = cfg.optimization.batch_size * cfg.optimization.accum_iter * dist.world_size
    lr = cfg.optimization.lr or scaled_lr(cfg.optimization.base_lr, cfg.optimization.batch_size,
                                          cfg.optimization.accum_iter, dist.world_size)
    OmegaConf.set_struct(cfg, False)
    cfg.optimization.lr = lr  # the derived value is written into the saved config
    OmegaConf.set_struct(cfg, True)

    # 2. set up: run folder, logging, seeds, model on device, optimiser
    run_log = RunLogger(out_dir, enabled=dist.is_main, print_freq=cfg.logging.print_freq,
                        tracking=cfg.logging, config=C.to_container(cfg), parent=parent_log,
                        parent_prefix=parent_prefix)
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
    if world_note:
        run_log.info(world_note)
    model.apply_freeze_mode(cfg.model.freeze_mode)
    if cfg.model.freeze_mode != "none":
        run_log.info(model.format_param_status())
        if not cfg.model.init_from and resume_ckpt is None:
            run_log.info(f"warning: freeze_mode {cfg.model.freeze_mode} on a randomly initialised model (no "
                         "--init_from / --continual_checkpoint): the frozen weights stay random, so little can be "
                         "learned; start from a pretrained checkpoint")
    if n_ckpt:
        run_log.info(grad_checkpointing_line(model, cfg.model.grad_checkpointing, n_ckpt))
    if dist.device.type == "cuda" and cfg.misc.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp, amp_why = amp_decision(cfg.misc.amp, dist.device)
    # a sharded checkpoint fills weights and optimiser next: no random init needed, only buffers
    place_model(model, recorder, dist.device, amp, cfg.distributed.strategy, dist.world_size, run_log.info,
                cfg.model.type, weights_needed=not (resume_ckpt or {}).get("sharded"))
    if cfg.misc.compile:
        model.compile()
    sched = cfg.schedule
    hooks = list(extra_hooks)
    optimizer, lr_schedule, freezeout = build_optimizer(cfg, model, lr, dist.device, run_log)
    if freezeout is not None:
        hooks.append(freezeout)

    if sched.warmup_epochs >= sched.epochs:
        run_log.info(f"warning: schedule.warmup_epochs ({sched.warmup_epochs:g}) >= schedule.epochs ({sched.epochs}): "
                     "the lr never leaves its linear warmup; lower --warmup_epochs")
    num_workers = cap_workers(cfg.data.num_workers, run_log)
    run_log.slow_hint = CPU_HINT
    run_log.info(f"effective batch {eff_batch} (batch {cfg.optimization.batch_size} x accum "
                 f"{cfg.optimization.accum_iter} x {dist.world_size} process(es)), lr {lr:.3e}, "
                 f"amp {amp} ({amp_why}), {optimizer_kind(optimizer)}")
    sharded = fsdp and dist.world_size > 1
    # a picture or a monitoring pass runs the model on rank 0 alone: under FSDP every rank must take part
    recon = None if sharded else reconstruction_hook(cfg, model, train_set, out_dir, run_log, dist.is_main)
    if sharded:
        run_log.info("reconstruction pictures and k-NN monitoring are off under --strategy fsdp over several "
                     "processes; run `mimkit visualize` / `mimkit knn` on final.pt")
    if recon is not None:
        hooks.append(recon)
    if cfg.eval.eval_data_path and cfg.eval.eval_every and not sharded:
        from mimkit.tasks.monitor import MonitorHook

        hooks.append(MonitorHook.from_config(cfg, run_log))
    settings = LoopSettings(
        epochs=sched.epochs, batch_size=cfg.optimization.batch_size, accum_iter=cfg.optimization.accum_iter,
        gradient_clip=cfg.optimization.gradient_clip, **rollback_settings(cfg.optimization), amp=amp,
        num_workers=num_workers, pin_memory=cfg.data.pin_memory,
        persistent_workers=cfg.data.persistent_workers, seed=cfg.misc.seed,
        save_freq_epochs=cfg.checkpointing.save_freq_epochs, save_freq_steps=cfg.checkpointing.save_freq_steps,
        max_steps=cfg.misc.max_steps, strategy=cfg.distributed.strategy,
        grad_checkpointing=cfg.model.grad_checkpointing,
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
        trainer.load(resume_ckpt, resume_path)
        run_log.info(f"resumed from {resume_path} at epoch {trainer.state.epoch}, batch {trainer.state.batch}, "
                     f"step {trainer.state.step}")
        if resume_note:
            run_log.info(resume_note)
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
        if recon is not None:
            recon.finish(trainer)  # a run stopped inside an epoch (--max_steps): its own last picture
    finally:
        run_log.close()
    summary = run_summary(out_dir, ckpt_dir, state, recon, model, run_log.tb_dir)
    if print_summary and dist.is_main:
        print_done(summary, out_dir)
    return summary


def resume_settings(cfg: DictConfig, command: str) -> Optional[str]:
    """Before any work: the run this one resumes must have started with the same run-defining settings (else one
    line naming each, old -> new); the line naming the settings that may change and did, or None."""
    from mimkit.tasks.preflight import check_resume_settings, started_config

    ckpt_dir = cfg.checkpointing.checkpoint_dir or (cfg.misc.output_dir and Path(cfg.misc.output_dir) / "checkpoints")
    started = started_config(ckpt_dir, cfg.misc.auto_resume, cfg.misc.resume)
    latest = cfg.misc.resume or (Path(ckpt_dir) / "latest.pt" if ckpt_dir else None)
    return check_resume_settings(started, C.to_container(cfg), command, cfg.misc.output_dir or ckpt_dir, latest,
                                 cfg.misc.resume)


# a continual stage's refusal (the sequence checked the same sizes before its first stage, with its own preset)
STAGE_HINT = "lower --batch_size / --input_size (continual/demo.yaml's sizes fit a CPU)"


def pretrain_memory(cfg: DictConfig, model: torch.nn.Module, device: torch.device, world_size: int, command: str,
                    cpu_hint: str) -> str:
    """The estimated peak memory of a training step at the batch and input size (one line), or a refusal naming
    the CPU preset on a CPU, the switches that cut memory on a GPU."""
    bs, size, in_chans = cfg.optimization.batch_size, C.input_size(cfg), model.in_chans
    step = pretrain_step(cfg.model.mask_ratio, cfg.model.loss_mode)
    fix = (cpu_hint if device.type == "cpu" else "lower --batch_size and raise --accum_iter (the same "
           "effective batch), --grad_checkpointing, or --strategy fsdp over several GPUs")
    return check_memory(f"{command} at batch {bs}, input {size[0]}x{size[1]}", model,
                        lambda m: step(m, {"images": meta_images(bs, size, in_chans)})[0], device, fix,
                        strategy=cfg.distributed.strategy, world_size=world_size)


def checkpoint_geometry(ckpt: dict, cfg: DictConfig) -> tuple[int, int, int]:
    """(batch, accum_iter, world size) a training checkpoint was written with."""
    pos = ckpt.get("data_position") or {}
    opt = (ckpt.get("config") or {}).get("optimization") or {}
    batch = int(pos.get("batch_size") or opt.get("batch_size") or cfg.optimization.batch_size)
    accum = int(opt.get("accum_iter") or 1)
    world = int(pos.get("world_size") or len(ckpt.get("rng_per_rank") or [None]))
    return batch, accum, world


def run_summary(out_dir: Path, ckpt_dir: Path, state: TrainState, recon: Optional[ReconstructionHook],
                model: torch.nn.Module, tb_dir: Optional[Path] = None) -> dict:
    """What train() returns: the run's files, final loss, steps, skipped images and the trained model."""
    return {
        "output_dir": str(out_dir), "checkpoints": str(ckpt_dir), "final_checkpoint": str(ckpt_dir / "final.pt"),
        "log": str(out_dir / "log.txt"), "metrics": str(out_dir / "metrics.jsonl"),
        "tensorboard": str(tb_dir or out_dir / "tb"),
        "reconstruction": str(recon.last_path) if recon and recon.last_path else None,
        "final_loss": state.history[-1]["loss"] if state.history else None, "steps": state.step,
        "skipped_images": state.skipped_images, "model": model,
    }


def print_done(summary: dict, out_dir: Path) -> None:
    """The closing lines on the console: where every file is, the final loss, how to view the curves."""
    print("\nDone. Everything is in " + str(out_dir) + ":")
    for k in ("final_checkpoint", "log", "metrics", "tensorboard", "reconstruction"):
        if summary[k]:
            print(f"  {k:<17}{summary[k]}")
    if summary["final_loss"] is not None:
        print(f"  {'final loss':<17}{summary['final_loss']:.4f}")
    print(f"  view the curves: tensorboard --logdir {summary['tensorboard']}")
