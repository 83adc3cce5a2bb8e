"""Shared pieces of the evaluation commands: encoder from a checkpoint, labelled splits, results.json, tables.

`mimkit knn`, `mimkit rankme`, `mimkit linprobe` and `mimkit finetune` all read a checkpoint and a labelled
set with train/ and val/ the same way, check them before any work, and end with a summary table and a
`results.json` in their output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mimkit import __version__
from mimkit import config as C
from mimkit.errors import CheckpointError, DataError, UserError


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint / --model / --input_size / --random_init: which frozen encoder to evaluate."""
    p.add_argument("--checkpoint", "--finetune", dest="checkpoint", default=None,
                   help="mimkit, official MAE (.pth), Hugging Face or OpenMMLab (mmpretrain / MMSeg) checkpoint of the encoder")
    p.add_argument("--model", default=None, help="registered model name (default: the checkpoint's; needed only "
                   "when the checkpoint does not say, e.g. an official file of a non-standard size)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size (default: the checkpoint's); position embeddings are interpolated")
    p.add_argument("--random_init", action="store_true",
                   help="the checkpoint's architecture with fresh random weights (a baseline)")


def load_encoder(checkpoint: Optional[str], model_name: Optional[str] = None, input_size: Optional[int] = None,
                 random_init: bool = False, seed: int = 0, decoder: str = "unused"):
    """(MAE-family model in eval mode, description); CheckpointError when the file does not fit the model.
    `decoder`: see models.loading.model_from_checkpoint (only the encoder is used here, unless 'fresh')."""
    from mimkit.models import create_model
    from mimkit.models.loading import model_from_checkpoint

    if checkpoint is None:
        if not (random_init and model_name):
            raise UserError("give --checkpoint (or --model NAME --random_init for a random-weight baseline)")
        torch.manual_seed(seed)
        kwargs = {"img_size": input_size} if input_size else {}
        model = create_model(model_name, **kwargs)
        from mimkit.models.registry import describe

        return model.eval(), f"{model_name} (random init, seed {seed}) [{describe(model)}]"
    path = _resolve(checkpoint)
    model, desc = model_from_checkpoint(path, model_name=model_name, input_size=input_size, decoder=decoder)
    if getattr(model, "load_report", None) is not None and model.load_report.resized and not random_init:
        gh, gw = model.grid_size  # said, never silent: the checkpoint's positions interpolated to this grid
        px = input_size if isinstance(input_size, int) else "x".join(str(v) for v in input_size)
        desc += (f"; its position embedding resized (bicubic) to the {gh}x{gw} patch grid of {px} px "
                 "(--input_size; without it the checkpoint's own size applies)")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.initialize_weights()
        desc += f", weights re-initialised (random init, seed {seed})"
    from mimkit.models.registry import describe

    return model.eval(), f"{desc} [{describe(model)}]"  # the architecture built, in every start-up line


def encoder_arch(checkpoint: Optional[str], encoder) -> dict:
    """{type, kwargs} that rebuild `encoder` (the kwargs its checkpoint's config names for that type)."""
    from mimkit.models.loading import architecture_of
    from mimkit.models.registry import same_model

    arch = architecture_of(_resolve(checkpoint)) if checkpoint else None
    m = (arch or {}).get("model") or {}
    kwargs = dict(m.get("kwargs") or {}) if same_model(m.get("type"), encoder.model_name) else {}
    return {"type": encoder.model_name, "kwargs": kwargs}


def _resolve(checkpoint: str) -> Path:
    """A file, or a run / checkpoint / Hugging Face folder: mimkit.io.resolve_checkpoint (final.pt first)."""
    from mimkit.io import resolve_checkpoint

    return resolve_checkpoint(checkpoint)


def adopt_normalization(cfg, encoder) -> tuple:
    """(mean, std) for a classifier run: data.mean / data.std when set, else the encoder checkpoint's (written into
    cfg, so the run's checkpoints carry them to --eval and export), else (None, None) = ImageNet's."""
    from omegaconf import OmegaConf

    if cfg.data.mean is None and cfg.data.std is None and getattr(encoder, "normalization", None):
        OmegaConf.update(cfg, "data.mean", list(encoder.normalization[0]))
        OmegaConf.update(cfg, "data.std", list(encoder.normalization[1]))
    return cfg.data.mean, cfg.data.std


def open_labelled(data_path: str, train_tf: Callable, val_tf: Callable):
    """(train, val) of a labelled set (class folders under train/ and val/, or a built-in such as digits).

    One clear DataError before any work: missing split, no images, fewer than 2 classes, val classes that differ.
    """
    from mimkit.data.sources import open_dataset
    from mimkit.data.datasets import check_same_classes

    train = open_dataset(data_path, "train", train_tf, require_labels=True)
    val = open_dataset(data_path, "val", val_tf, require_labels=True)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{data_path}: the {'train' if len(train) == 0 else 'val'} split is empty")
    check_same_classes(train, val)
    return train, val


def check_nb_classes(nb_classes: Optional[int], classes: list[str]) -> int:
    """--nb_classes when given (must cover the data's classes), else the number of class folders."""
    if nb_classes is None:
        return len(classes)
    if nb_classes < len(classes):
        raise DataError(f"--nb_classes {nb_classes} but the data has {len(classes)} classes")
    return nb_classes


def format_table(metrics: dict[str, Any], title: str) -> str:
    """Two-column text table of metric name and value."""
    width = max([len(k) for k in metrics] + [6])
    lines = [title, f"{'metric':<{width}}  value", "-" * (width + 10)]
    for k, v in metrics.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def write_results(out_dir: str | Path, command: str, metrics: dict[str, Any], checkpoint: Optional[str],
                  data: str, config: dict, extra: Optional[dict] = None, keep_earlier: bool = False) -> Path:
    """Write <out_dir>/results.json. A training run rewrites its own as it goes; with `keep_earlier` (one-shot
    evaluations, which may share a folder) nothing is written over: results-2.json, ... (runfolder.results_path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "metrics": metrics, "checkpoint": checkpoint, "data": data,
              "config": config, "mimkit_version": __version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    text = json.dumps(record, indent=2, default=str) + "\n"
    if not keep_earlier:
        path = out / "results.json"
        path.write_text(text)
    else:  # an evaluation: the first free name, created exclusively (two at once never share one)
        from mimkit.engine.runfolder import results_path

        while True:
            path = results_path(out)
            try:
                with open(path, "x") as f:
                    f.write(text)
                break
            except FileExistsError:
                continue
    C.note_output(path)  # the Python API hands this run's own results back
    return path


def report(out_dir: str | Path, command: str, metrics: dict[str, Any], checkpoint: Optional[str], data: str,
           config: dict, extra: Optional[dict] = None, keep_earlier: bool = False) -> Path:
    """Print the summary table and write results.json (see write_results); returns its path."""
    path = write_results(out_dir, command, metrics, checkpoint, data, config, extra, keep_earlier)
    model = config.get("model")  # a config section for training commands, a model name for knn / rankme
    random_init = bool((model.get("random_init") if isinstance(model, dict) else False) or config.get("random_init"))
    # a --random_init baseline is told apart from the pretrained run of the same checkpoint
    source = (f"random weights, architecture of {checkpoint}" if random_init and checkpoint
              else checkpoint or "random init")
    print(format_table(metrics, f"mimkit {command}: {source} on {data}"))
    print(f"results: {path}")
    return path


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    from mimkit.engine.distributed import resolve_device

    return resolve_device(name)


# ---------------------------------------------------------------------------------------------- classifiers
@torch.no_grad()
def evaluate_classifier(forward: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int,
                        device: torch.device, dist_eval: bool = False, num_workers: int = 0) -> dict[str, float]:
    """{'acc1', 'acc5' (in %), 'loss' (cross-entropy), 'num_images'} of `forward(images) -> logits` on dataset.

    With dist_eval each process takes every world_size-th image and the sums are all-reduced, so the numbers
    are exact (no padding duplicates); otherwise every process evaluates the whole set, as the official default.
    Runs inside a forked RNG: evaluation never moves the training run's random streams.
    """
    import torch.distributed as tdist
    import torch.nn.functional as F
    from timm.utils import accuracy
    from torch.utils.data import DataLoader, Subset

    from mimkit.data.datasets import collate_batch

    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    if dist_eval and world > 1:
        dataset = Subset(dataset, list(range(tdist.get_rank(), len(dataset), world)))
    if isinstance(forward, torch.nn.Module):
        forward.eval()  # BatchNorm statistics, no dropout / drop path; the hook restores the mode
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_batch)
        for batch in loader:
            x, y = batch["images"].to(device), batch["labels"].to(device)
            if len(x) == 0:
                continue
            logits = forward(x).float()
            acc1, acc5 = accuracy(logits, y, topk=(1, min(5, logits.shape[1])))
            n = len(y)
            sums += torch.tensor([acc1.item() * n / 100, acc5.item() * n / 100,
                                  F.cross_entropy(logits, y, reduction="sum").item(), n], dtype=torch.float64)
    if dist_eval and world > 1:
        sums = sums.to(device)
        tdist.all_reduce(sums)
        sums = sums.cpu()
    n = max(sums[3].item(), 1.0)
    return {"acc1": 100.0 * sums[0].item() / n, "acc5": 100.0 * sums[1].item() / n, "loss": sums[2].item() / n,
            "num_images": int(sums[3].item())}


class EvalEveryEpoch:
    """Trainer hook: evaluate after every epoch, log it, and keep the best checkpoint as <ckpt_dir>/best.pt."""

    def __init__(self, evaluate: Callable[[], dict], run_log, best_path: Optional[Path], is_main: bool) -> None:
        self.evaluate, self.run_log, self.best_path, self.is_main = evaluate, run_log, best_path, is_main
        self.best_acc1, self.best_epoch = -1.0, -1
        self.history: list[dict] = []

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """Evaluate, log (console, metrics.jsonl kind 'eval', TensorBoard eval/), save best.pt on improvement."""
        from mimkit.engine.checkpoint import atomic_save
        from mimkit.engine.distributed import barrier

        was_training = trainer.model.training
        stats = self.evaluate()
        trainer.model.train(was_training)
        record = {"kind": "eval", "epoch": epoch, "step": trainer.state.step, **stats}
        self.history.append(record)
        improved = stats["acc1"] > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch = stats["acc1"], epoch
        self.run_log.metrics(record, trainer.state.step, tb_prefix="eval")
        self.run_log.info(f"eval epoch {epoch}: acc1 {stats['acc1']:.2f}%  acc5 {stats['acc5']:.2f}%  "
                          f"loss {stats['loss']:.4f}  (best acc1 {self.best_acc1:.2f}% at epoch {self.best_epoch})")
        if improved and self.best_path is not None:
            ckpt = trainer.weights_checkpoint()  # every rank: under FSDP the weights are gathered to rank 0
            if self.is_main:
                atomic_save(ckpt, self.best_path)
            barrier()

    def state_dict(self) -> dict:
        """Best so far and the per-epoch history (rides in checkpoints, so a resume keeps the best)."""
        return {"best_acc1": self.best_acc1, "best_epoch": self.best_epoch, "history": self.history}

    def load_state_dict(self, sd: dict, trainer) -> None:
        """Inverse of state_dict."""
        self.best_acc1, self.best_epoch = float(sd["best_acc1"]), int(sd["best_epoch"])
        self.history = list(sd.get("history", []))


def classifier_metrics(hook: EvalEveryEpoch, final: dict) -> dict[str, Any]:
    """The results.json metrics of a probe / fine-tuning run: final and best top-1 / top-5."""
    out = {"acc1": final["acc1"], "acc5": final["acc5"], "loss": final["loss"]}
    if hook.history:
        best = max(hook.history, key=lambda r: r["acc1"])
        out.update(best_acc1=best["acc1"], best_acc5=best["acc5"], best_epoch=best["epoch"])
    return out


# What to try when a linprobe / finetune run's estimate is hours on a CPU.
SLOW_HINTS = {
    "linprobe": "CPU-sized settings as in linprobe/digits.yaml: --no_aug (frozen features computed once), "
                "--input_size 32-64, --opt sgd, fewer --epochs",
    "finetune": "CPU-sized settings as in finetune/digits.yaml: --input_size 32-64, --aa none --reprob 0, "
                "--epochs 5, or a smaller model",
}


def train_classifier(cfg, command: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_set,
                     val_set, step_fn: Callable, eval_forward: Callable, lr: float, dist, run_log,
                     num_workers: int, resume_ckpt: Optional[dict], describe: str) -> dict:
    """The shared tail of linprobe / finetune: THE engine loop with per-epoch eval and best.pt, then report.

    Returns the results.json record's metrics.
    """
    from omegaconf import OmegaConf

    from mimkit import config as C
    from mimkit.engine.checkpoint import CheckpointManager
    from mimkit.engine.loop import LoopSettings, Trainer, rollback_settings
    from mimkit.engine.precision import amp_decision
    from mimkit.engine.optim import set_lr, warmup_cosine
    from mimkit.data.datasets import collate_batch

    out_dir = Path(cfg.misc.output_dir)
    ckpt_dir = Path(cfg.checkpointing.checkpoint_dir or out_dir / "checkpoints")
    sched, opt = cfg.schedule, cfg.optimization

    def lr_schedule(optim: torch.optim.Optimizer, epoch_f: float) -> None:
        set_lr(optim, warmup_cosine(epoch_f, lr, opt.min_lr, sched.warmup_epochs, sched.epochs))

    from mimkit.tasks.preflight import cap_workers, check_one_batch, note_schedule_change, image_notes

    amp, amp_why = amp_decision(cfg.misc.amp, dist.device)
    check_one_batch(len(train_set), opt.batch_size, dist.world_size)
    for note in image_notes(train_set, C.input_size(cfg)):
        run_log.info(note)
    num_workers = cap_workers(num_workers, run_log)
    run_log.slow_hint = SLOW_HINTS[command]
    hook = EvalEveryEpoch(
        lambda: evaluate_classifier(eval_forward, val_set, opt.batch_size, dist.device, cfg.data.dist_eval),
        run_log, ckpt_dir / "best.pt", dist.is_main)
    settings = LoopSettings(
        epochs=sched.epochs, batch_size=opt.batch_size, accum_iter=opt.accum_iter,
        gradient_clip=opt.gradient_clip, **rollback_settings(opt), amp=amp, num_workers=num_workers,
        pin_memory=cfg.data.pin_memory, persistent_workers=cfg.data.persistent_workers, seed=cfg.misc.seed,
        save_freq_epochs=cfg.checkpointing.save_freq_epochs, save_freq_steps=cfg.checkpointing.save_freq_steps,
        max_steps=cfg.misc.max_steps, strategy=OmegaConf.select(cfg, "distributed.strategy", default="ddp"),
        grad_checkpointing=OmegaConf.select(cfg, "model.grad_checkpointing", default=False),
    )
    ckpt = CheckpointManager(ckpt_dir, cfg.checkpointing.keep_last_n, run_log.log_path, cfg.checkpointing.safetensors)
    trainer = Trainer(model=model, optimizer=optimizer, dataset=train_set, collate=collate_batch, step_fn=step_fn,
                      lr_schedule=lr_schedule, settings=settings, dist=dist, run=run_log, ckpt=ckpt,
                      config=C.to_container(cfg), config_yaml=OmegaConf.to_yaml(cfg, resolve=True), hooks=[hook])
    if resume_ckpt is not None:
        if resume_ckpt.get("resume_warning"):
            run_log.info(resume_ckpt["resume_warning"])
        trainer.load(resume_ckpt)
        run_log.info(f"resumed at epoch {trainer.state.epoch}, step {trainer.state.step}")
        if resume_ckpt.get("resume_note"):
            run_log.info(resume_ckpt["resume_note"])
        note_schedule_change(run_log, resume_ckpt.get("config") or {}, cfg, lr,
                             trainer.state.epoch + trainer.state.batch / trainer.iters_per_epoch)
    elif sched.start_epoch:
        trainer.state.epoch = sched.start_epoch
    eff = opt.batch_size * opt.accum_iter * dist.world_size
    run_log.info(f"mimkit {command}: {describe}; {len(train_set)} train / {len(val_set)} val images; effective "
                 f"batch {eff}, lr {lr:.3e}, {sched.epochs} epochs, input {cfg.data.input_size}, amp {amp} "
                 f"({amp_why}); run folder {out_dir}")
    if cfg.misc.preset:
        run_log.info(f"preset {cfg.misc.preset} beneath your flags (CPU-sized, for the built-in "
                     f"{cfg.data.data_path}); a config file or flags override it")
    try:
        trainer.fit()
        if not hook.history or hook.history[-1]["step"] != trainer.state.step:
            # stopped inside an epoch (--max_steps): the final evaluation goes through the hook too, so it is
            # logged and best.pt is kept as after an epoch (on every rank: under FSDP the weights are gathered)
            hook.on_epoch_end(trainer, trainer.state.epoch)
    finally:
        run_log.close()
    final = hook.history[-1]
    metrics = classifier_metrics(hook, final)
    if dist.is_main:
        report(out_dir, command, metrics, cfg.model.finetune, cfg.data.data_path, C.to_container(cfg),
               {"model": describe, "best_checkpoint": str(ckpt_dir / "best.pt"),
                "final_checkpoint": str(ckpt_dir / "final.pt"), "history": hook.history})
    return metrics


def read_resume(cfg) -> Optional[dict]:
    """The training checkpoint to resume from: misc.resume, or <output_dir>/checkpoints/latest.pt.

    A damaged latest.pt falls back to the newest intact checkpoint; the warning rides under `resume_warning`
    until train_classifier logs it.
    """
    from mimkit.engine.checkpoint import find_resume

    run_dir = cfg.checkpointing.checkpoint_dir or (cfg.misc.output_dir and Path(cfg.misc.output_dir) / "checkpoints")
    if not run_dir and not cfg.misc.resume:  # a default run folder is always new: nothing to resume
        return None
    ckpt, _, warning = find_resume(cfg.misc.resume, Path(run_dir or "."), cfg.misc.auto_resume and bool(run_dir))
    if ckpt is not None and warning:
        ckpt["resume_warning"] = warning
    return ckpt


def load_model_state(model: torch.nn.Module, ckpt: dict, what: str) -> None:
    """Strictly load a training checkpoint's model into `model`; a mismatch is one CheckpointError line."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:200]]
        raise CheckpointError(f"{what} does not fit this model: {first[0][:300]}") from None


def evaluate_only(cfg, task: str, model, val_set, resume, dist, desc: str) -> dict:
    """`--eval`: a trained checkpoint (misc.resume) of `task` on val/, reported as a run's results."""
    from mimkit.errors import ConfigError

    if resume is None:
        raise ConfigError("--eval needs --resume CHECKPOINT (e.g. checkpoints/best.pt)")
    load_model_state(model, resume, f"checkpoint {cfg.misc.resume}")
    stats = evaluate_classifier(model, val_set, cfg.optimization.batch_size, dist.device, cfg.data.dist_eval)
    metrics = {"acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"]}
    if dist.is_main:
        report(cfg.misc.output_dir, task, metrics, cfg.misc.resume, cfg.data.data_path,
               C.to_container(cfg), {"model": desc, "eval_only": True}, keep_earlier=True)
    return metrics
