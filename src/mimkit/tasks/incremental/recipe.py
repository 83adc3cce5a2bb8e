"""`mimkit incremental`: class-incremental learning over tasks of disjoint classes, measuring forgetting (seed 004).

    mimkit incremental                                        # built-in digits, 5 tasks x 2 classes, naive CE
    mimkit incremental --method kd --temperature 2            # LwF-style distillation from the frozen last model
    mimkit incremental --method kd --ema_mode ema --ema_ratio 0.01 --cls_only
    mimkit incremental --method mask --mask_ratio 0.5 --mask_mode sgf --inv_mode v1
    mimkit incremental --method er --buffer_size 200           # experience replay
    mimkit incremental --data_path /data/cifar100 --tasks 10 --model resnet18 --epochs 50 --device cuda
    mimkit incremental --finetune runs/demo --opt adamw --lr 1e-4   # an MAE ViT encoder as the backbone

Task t trains on its classes only (class order fixed by --seed), with a head over every class seen so far, one
Trainer fit per task (THE engine; teachers, EMA and replay are its step function and hooks); a new optimiser
per task. After each task the model (or --eval_teacher's EMA) is evaluated on every task seen so far, and
RankMe of its backbone features is measured on a fixed held-out set. Results: accuracy_matrix.csv,
per_task.csv, results.json (final / average incremental accuracy, forgetting, BWT, RankMe), incremental.png,
TensorBoard (tb/), the printed table, in a new runs/incremental/<date>_<time>/ unless --output_dir. BatchNorm
statistics are recomputed with each task's final weights before it is evaluated (PreciseBN). Checkpoints in
checkpoints/task-<t>/: a killed run resumes inside its task (bitwise on CPU) or at the next task when restarted
with the same command; other run-defining settings are refused in one line, and --no_auto_resume starts over,
moving the earlier run's files to earlier/<time>/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mimkit import config as C
from mimkit.errors import ConfigError, DataError
from mimkit.tasks.incremental import config as IC
from mimkit.models.checkpointing import apply_grad_checkpointing
from mimkit.tasks.pretrain.setup import seed_everything


STATE_FILE = "incremental.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags (seed 004's names), a config file (e.g. incremental/cifar100_10tasks.yaml) and key=value overrides."""
    C.add_arguments(p, IC.FLAGS, IC.IncrementalConfig)


def config_from_args(args: argparse.Namespace):
    """Schema <- file <- flags <- overrides, then the incremental rules; all before any data or weights load."""
    cfg = C.config_from_args(args, IC.FLAGS, IC.IncrementalConfig, demo_preset=None)
    IC.validate(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    """CLI entry."""
    train_incremental(config_from_args(args))
    return 0


def fingerprint(cfg, order: list[int], sizes: list[int]) -> dict[str, Any]:
    """What a resumed run must share with the run in its folder."""
    keep = {k: OmegaConf.select(cfg, k) for k in (
        "incremental.method", "incremental.ema_mode", "incremental.cls_only", "incremental.mask_mode",
        "data.data_path", "model.type", "model.finetune", "misc.seed")}
    return {**keep, "class_order": order, "sizes": sizes}


def load_state(path: Path, fp: dict, resume: bool) -> dict:
    """The finished tasks of the run in output_dir (none when starting over); a different run is an error."""
    if not (resume and path.exists()):
        return {"fingerprint": fp, "rows": []}
    state = json.loads(path.read_text())
    diff = [k for k in fp if state["fingerprint"].get(k) != fp[k]]
    if diff:
        raise ConfigError(f"{path.parent} holds an incremental run with a different {diff[0]} "
                          f"({state['fingerprint'].get(diff[0])!r}, now {fp[diff[0]]!r}); give a new --output_dir, "
                          "or --no_auto_resume to start over there")
    return state


def build_hooks(model, methods: frozenset[str], cfg):
    """(previous-model hook, EMA hook, replay buffer, reference getter); absent pieces are None."""
    from mimkit.tasks.incremental.methods import EMATeacher, PreviousModel, ReservoirBuffer

    i = cfg.incremental
    ema = EMATeacher(model, i.ema_mode, i.ema_ratio) if i.ema_mode != "none" else None
    needs_ref = bool(methods & {"kd", "mask"})
    prev = PreviousModel(model) if needs_ref and ema is None else None
    buffer = ReservoirBuffer(i.buffer_size, cfg.misc.seed) if "er" in methods else None

    def reference():
        return ema.model if ema is not None else (prev.model if prev is not None else None)

    return prev, ema, buffer, reference


def incremental_memory(cfg, model, methods: frozenset[str], teachers: int, device: torch.device) -> str:
    """The estimated peak memory (tasks/preflight.check_memory): a step at the batch (twice it with replay) and
    the input size, plus the teachers' copies of the weights and the replay buffer's images."""
    from mimkit.tasks.preflight import check_memory, meta_images, meta_labels

    bs, size = cfg.optimization.batch_size, int(cfg.data.input_size)
    n = bs * (2 if "er" in methods else 1)  # replay draws as many stored images as the batch has
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffered = cfg.incremental.buffer_size * 3 * size * size * 4 if "er" in methods else 0
    return check_memory(f"incremental at batch {n}, input {size}x{size}", model,
                        lambda m: torch.nn.functional.cross_entropy(m(meta_images(n, size)), meta_labels(n)),
                        device, "lower --batch_size / --input_size (incremental/digits.yaml's sizes fit a CPU)",
                        optimizer=cfg.optimization.opt, extra_bytes=teachers * weights + buffered)


def build_optimizer(model, cfg, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over decay / no-decay groups."""
    from mimkit.engine.optim import build_adamw, param_groups

    o = cfg.optimization
    groups = param_groups(model, o.weight_decay)
    if o.opt == "adamw":
        return build_adamw(groups, o.lr, (0.9, 0.999), device)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


@torch.no_grad()


def evaluate_task(model, val_tasks: list, rank_set, k: int, cfg, device: torch.device) -> dict[str, Any]:
    """Top-1 on every task seen so far, on all of them together, and RankMe on the fixed held-out set."""
    from torch.utils.data import DataLoader

    from mimkit.data.datasets import collate_batch
    from mimkit.metrics.rankme import rankme_of
    from mimkit.tasks.evaluation.common import evaluate_classifier

    bs = cfg.incremental.eval_batch_size
    stats = [evaluate_classifier(model, val_tasks[j], bs, device) for j in range(k + 1)]
    n = sum(s["num_images"] for s in stats)
    acc_seen = sum(s["acc1"] * s["num_images"] for s in stats) / max(n, 1)
    loader = DataLoader(rank_set, batch_size=bs, shuffle=False, collate_fn=collate_batch)
    value = rankme_of(model.features, (b["images"].to(device) for b in loader))
    return {"acc": [s["acc1"] for s in stats], "acc_seen": acc_seen, "rankme": value}


def train_incremental(cfg) -> dict:
    """Run (or resume) every task; returns {'metrics', 'rows', 'output_dir'}."""
    from mimkit.data.datasets import collate_batch
    from mimkit.engine import distributed as D
    from mimkit.engine.checkpoint import CheckpointManager, atomic_write_text, find_resume, load_training_checkpoint
    from mimkit.engine.logging import RunLogger
    from mimkit.engine.loop import LoopSettings, Trainer, rollback_settings
    from mimkit.engine.precision import amp_decision
    from mimkit.engine.optim import set_lr, warmup_cosine
    from mimkit.tasks.incremental import data as ID
    from mimkit.tasks.incremental import report as R
    from mimkit.tasks.incremental import resume as RS
    from mimkit.tasks.incremental.methods import _set_head_size, make_step
    from mimkit.tasks.incremental.model import build_classifier
    from mimkit.tasks.incremental.precise_bn import PreciseBN

    # 1. validate config, data and the split before any training
    i, o, sched = cfg.incremental, cfg.optimization, cfg.schedule
    methods = IC.parse_methods(i.method)
    hflip = cfg.data.augmentation.hflip
    if hflip is None:
        hflip = str(cfg.data.data_path) != "digits"
    if cfg.model.finetune and not Path(str(cfg.model.finetune)).expanduser().exists():
        from mimkit.errors import CheckpointError

        ft = cfg.model.finetune  # where such a path comes from, in the same line
        raise CheckpointError(f"checkpoint not found: {ft} (a run folder made by `mimkit pretrain --output_dir {ft}`"
                              f"{' or `make demo`' if Path(str(ft)).as_posix().rstrip('/') == 'runs/demo' else ''}"
                              ", or a checkpoint file)")
    if cfg.data.mean is None and cfg.data.std is None and cfg.model.finetune:
        from mimkit.models.loading import checkpoint_normalization

        norm = checkpoint_normalization(cfg.model.finetune)  # the encoder's own statistics travel with it
        if norm:
            OmegaConf.update(cfg, "data.mean", norm[0])
            OmegaConf.update(cfg, "data.std", norm[1])
    train_tf, val_tf = ID.transforms(cfg.data.input_size, cfg.data.augmentation.crop_padding, hflip,
                                     cfg.data.mean, cfg.data.std)
    out_dir = Path(C.resolve_output_dir(cfg, "incremental"))
    ckpt_root = Path(cfg.checkpointing.checkpoint_dir or out_dir / "checkpoints")
    changes, archived = [], None
    if cfg.misc.auto_resume:  # a resumed run keeps the settings it started with (before any data loads)
        started = RS.started_settings(out_dir)
        changes = RS.compare(started, C.to_container(cfg), out_dir) if started else []
    train_set, val_set, kind = ID.open_data(cfg.data.data_path, cfg.data.dataset, train_tf, val_tf)
    sizes = IC.task_sizes(len(train_set.classes), i.tasks, i.init_classes, i.increment)
    split = ID.TaskSplit(ID.class_order(len(train_set.classes), cfg.misc.seed), sizes)
    train_tasks, val_tasks = ID.task_subsets(train_set, split), ID.task_subsets(val_set, split)
    bn_tasks = ID.task_subsets(ID.with_transform(train_set, val_tf), split)  # PreciseBN: what evaluation sees
    for t, (tr, va) in enumerate(zip(train_tasks, val_tasks, strict=True)):
        if len(tr) < o.batch_size or len(va) == 0:
            raise DataError(f"task {t} (classes {[train_set.classes[c] for c in split.classes(t)]}) has {len(tr)} "
                            f"training / {len(va)} held-out images: fewer than one batch of {o.batch_size} or none "
                            "to evaluate; lower --batch_size or use fewer tasks")
    rank_set = ID.fixed_subset(val_set, split, i.rankme_images)
    if not cfg.misc.auto_resume and RS.is_rank0():  # starting over: the earlier run's files move aside
        archived = RS.archive_earlier_run(out_dir, ckpt_root)
    state = load_state(out_dir / STATE_FILE, fingerprint(cfg, split.order, sizes), cfg.misc.auto_resume)
    done = len(state["rows"])
    dist = D.init_distributed(cfg.misc.device)
    seed_everything(cfg.misc.seed)
    masker = (i.mask_ratio, i.mask_mode) if "mask" in methods else None
    model, desc = build_classifier(cfg.model.type, cfg.model.nf, cfg.model.finetune, cfg.data.input_size,
                                   sizes[0], masker)
    apply_grad_checkpointing(model, cfg.model.grad_checkpointing, desc)
    model.to(dist.device)
    prev, ema, buffer, reference = build_hooks(model, methods, cfg)
    hooks = [h for h in (prev, ema, buffer) if h is not None]
    memory = incremental_memory(cfg, model, methods, int(prev is not None) + int(ema is not None), dist.device)
    if 0 < done:  # between tasks: the last finished task's final weights and method state
        ckpt = load_training_checkpoint(ckpt_root / f"task-{done - 1}" / "final.pt")
        _set_head_size(model, split.offsets[done])
        model.load_state_dict(ckpt["model"])
        for h in hooks:
            h.load_state_dict(ckpt["extra"][type(h).__name__])

    # 2. set up the run folder and logging
    run_log = RunLogger(out_dir, enabled=dist.is_main, print_freq=cfg.logging.print_freq,
                        tracking=cfg.logging, config=C.to_container(cfg))
    if dist.is_main:
        C.save_config(cfg, out_dir / "config.yaml")
    amp, amp_why = amp_decision(cfg.misc.amp, dist.device)
    run_log.info(f"amp {amp} ({amp_why})")
    run_log.info(memory)
    names = [train_set.classes[c] for c in split.order]
    run_log.info(f"mimkit incremental: {desc}; {kind} data {cfg.data.data_path}: {len(train_set)} train / "
                 f"{len(val_set)} held-out images, {len(sizes)} tasks of {sizes} classes, order {names}; "
                 f"methods {sorted(methods)}, ema {i.ema_mode}, "
                 f"evaluating the {'teacher' if i.eval_teacher else 'student'}")
    if archived is not None:
        run_log.info(f"--no_auto_resume: the earlier run's files in {out_dir} were moved to {archived}")
    if changes:
        run_log.info(RS.describe_changes(changes, done, len(sizes)))
        if done < len(sizes):  # a finished run trains nothing more: no change to record
            state.setdefault("resume_changes", []).extend({"from_task": done, **c} for c in changes)
    if dist.is_main:  # the run-defining settings (as started) for the next resume to compare against
        state["settings"] = C.to_container(cfg)
        atomic_write_text(json.dumps(state, indent=1), out_dir / STATE_FILE)
    if done:
        run_log.info(f"resuming after task {done - 1} ({done} of {len(sizes)} tasks done)")

    # 3. one Trainer fit per task, then evaluation
    cfg_dict, cfg_yaml = C.to_container(cfg), OmegaConf.to_yaml(cfg, resolve=True)
    step_fn = make_step(model, methods, reference, buffer, cfg)
    try:
        for k in range(done, len(sizes)):
            seed_everything(cfg.misc.seed * 1000 + k)  # a task starts from the same RNG state straight or resumed
            if k > 0:
                if prev is not None:
                    prev.begin_task()  # swap and freeze, before the head grows
                model.expand(split.offsets[k + 1])
                if ema is not None:
                    ema.begin_task()
            optimizer = build_optimizer(model, cfg, dist.device)

            def lr_schedule(opt, epoch_f: float) -> None:
                set_lr(opt, warmup_cosine(epoch_f, o.lr, o.min_lr, sched.warmup_epochs, sched.epochs))

            start_step = state["rows"][-1]["end_step"] if state["rows"] else 0  # one step axis in TB
            settings = LoopSettings(
                epochs=sched.epochs, batch_size=o.batch_size, accum_iter=o.accum_iter,
                gradient_clip=o.gradient_clip, **rollback_settings(o), amp=amp,
                num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory,
                persistent_workers=cfg.data.persistent_workers, seed=cfg.misc.seed + k,
                save_freq_epochs=cfg.checkpointing.save_freq_epochs,
                save_freq_steps=cfg.checkpointing.save_freq_steps,
                # the step axis runs on across tasks: the cap counts from this task's first step
                max_steps=start_step + cfg.misc.max_steps if cfg.misc.max_steps else 0, max_steps_from=start_step)
            task_dir = ckpt_root / f"task-{k}"
            manager = CheckpointManager(task_dir, cfg.checkpointing.keep_last_n, run_log.log_path,
                                        cfg.checkpointing.safetensors)
            # BatchNorm statistics of the final weights, before evaluation (and before the task's checkpoints)
            precise = PreciseBN(lambda: [model] + ([ema.model] if ema is not None else []), bn_tasks[k],
                                collate_batch, sched.epochs, o.batch_size, i.precise_bn_images,
                                cfg.misc.seed * 1000 + k, dist.device,
                                extra=lambda: buffer.examples[:len(buffer)] if buffer is not None else None)
            trainer = Trainer(model=model, optimizer=optimizer, dataset=train_tasks[k], collate=collate_batch,
                              step_fn=step_fn, lr_schedule=lr_schedule, settings=settings, dist=dist, run=run_log,
                              ckpt=manager, config=cfg_dict, config_yaml=cfg_yaml, hooks=[*hooks, precise])
            trainer.state.step = start_step
            # the estimate says this task's time; the first task of this invocation also says all the tasks left
            # (later ones at this one's pace); the run ETA counts them all
            run_log.later_iters = sum(_task_iters(len(train_tasks[j]), dist.world_size, cfg)
                                      for j in range(k + 1, len(sizes)))
            run_log.scope = f"this task ({k + 1} of {len(sizes)})"
            run_log.later_label = (f"the {len(sizes) - k} tasks still to train" if k + 1 < len(sizes) else None)
            # a damaged latest.pt falls back to the task's newest intact checkpoint, with a warning
            resume, _, warning = find_resume(None, task_dir, cfg.misc.auto_resume)
            if warning:
                run_log.info(warning)
            run_log.info(f"task {k}: classes {[train_set.classes[c] for c in split.classes(k)]}, "
                         f"{len(train_tasks[k])} images, head over {model.num_classes} classes")
            if resume is not None:
                trainer.load(resume)
                run_log.info(f"task {k}: resumed at epoch {trainer.state.epoch}, batch {trainer.state.batch}")
            trainer.fit()
            eval_model = ema.model if i.eval_teacher else model
            row = {"task": k, "classes": split.classes(k), **evaluate_task(eval_model, val_tasks, rank_set, k, cfg,
                                                                          dist.device),
                   "end_step": trainer.state.step}
            state["rows"].append(row)
            if dist.is_main:
                atomic_write_text(json.dumps(state, indent=1), out_dir / STATE_FILE)
            record = {"kind": "task", "task": k, "acc_seen": row["acc_seen"], "rankme": row["rankme"],
                      **{f"acc_task_{j}": a for j, a in enumerate(row["acc"])}}
            run_log.metrics(record, k, tb_prefix="incremental")
            run_log.info(f"after task {k}: accuracy on tasks 0-{k} {[round(a, 2) for a in row['acc']]}, "
                         f"all seen {row['acc_seen']:.2f}%, RankMe {row['rankme']:.2f}")
            if dist.is_main:
                paths = _write(out_dir, state, sizes, cfg_dict, desc)
                R.track(run_log, state["rows"], len(sizes), k, paths["png"])
        table = R.format_table(state["rows"], len(sizes), sizes)
        run_log.file_only("\n" + table)
    finally:
        run_log.close()
    if dist.is_main:
        paths = _write(out_dir, state, sizes, cfg_dict, desc)
        print(table)
        print(f"results: {paths['results']}  picture: {paths['png']}")
    return {"metrics": R.metrics(state["rows"], len(sizes)), "rows": state["rows"], "output_dir": str(out_dir)}


def _task_iters(n_images: int, world_size: int, cfg) -> int:
    """Iterations a task of n_images trains: epochs x batches per epoch, or the --max_steps cap when it is less."""
    o = cfg.optimization
    iters = cfg.schedule.epochs * (-(-n_images // world_size) // o.batch_size)
    return min(iters, cfg.misc.max_steps * o.accum_iter) if cfg.misc.max_steps else iters


def _write(out_dir: Path, state: dict, sizes: list[int], cfg_dict: dict, desc: str) -> dict:
    from mimkit.tasks.incremental import report as R

    record = {"checkpoint": cfg_dict["model"]["finetune"], "data": cfg_dict["data"]["data_path"],
              "config": cfg_dict, "model": desc, "class_order": state["fingerprint"]["class_order"],
              "classes_per_task": sizes, "resume_changes": state.get("resume_changes", [])}
    return R.write(out_dir, state["rows"], len(sizes), record)

