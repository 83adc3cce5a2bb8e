"""`mimkit continual`: continue MAE pretraining on new domains, one after another, and measure forgetting.

    mimkit continual                                 # demo: mae_vit_nano_patch8, photos -> microscopy -> textures
    mimkit continual --data_path /new_domain --continual_checkpoint mae_pretrain_vit_large.pth
        --freeze_mode encoder_layernorms_only --blr 5e-4 --epochs 30     (one command)
    mimkit continual continual/demo.yaml --domains photos space --freeze_mode layernorm_only
    mimkit continual continual/all_layernorms.yaml --domains /data/a /data/b
    mimkit continual --sweep                                 # every freeze_mode x loss_mode, table in sweep.md

Stage k trains on domain k with the pretraining recipe (`mimkit.tasks.pretrain.train`, the one engine), starting
from stage k-1's final weights, in its own folder `<output_dir>/stage-k-<name>/` (so it auto-resumes from its
latest checkpoint: set --save_freq_steps for step-level resume points). After the starting weights and after
every stage the model is evaluated on EVERY domain's held-out split: reconstruction loss with fixed masks (a
dedicated generator per domain, the same masks at every stage) and k-NN accuracy where the domain has labels. `sequence.json` records finished stages, so a killed sequence resumes
at its stage. Results: `recon_loss.{csv,json}`, `knn_acc.{csv,json}` (stage x domain, forgetting, backward
transfer), `matrix.png`, and the summary table at the end of `log.txt`.
Put `key=value` overrides before `--domains` (its list takes every word after it). Results go to --output_dir
(a sequence there resumes), else a new runs/continual/<timestamp>/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine.logging import RunLogger
from mimkit.errors import ConfigError, DataError
from mimkit.metrics import forgetting as F
from mimkit.tasks import pretrain as P
from mimkit.tasks.preflight import load_weights

CPU_HINT = ("continual/demo.yaml fits a CPU (mae_vit_nano_patch8 at 64 px, 3 epochs per stage): mimkit continual "
            "continual/demo.yaml --domains DIR1 DIR2; built-in domains get it by default")

DEMO_PRESET = "continual/demo.yaml"
SWEEP_PRESET = "continual/sweep.yaml"
STATE_FILE = "sequence.json"
FREEZE_MODES = ("none", "encoder_layernorms_only", "layernorm_only", "encoder_only")
LOSS_MODES = ("all_pixels", "masked_only")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ContinualModelConfig(C.ModelConfig):
    type: str = "continual_mae_vit_large_patch16"  # seed 000's default model (an alias of mae_vit_large_patch16)
    loss_mode: str = "all_pixels"  # seed 000's default: dense loss on every patch


@dataclass
class ContinualOptimizationConfig(C.OptimizationConfig):
    base_lr: float = 1e-4  # seed 000's --blr default (lower than pretraining: continual steps are small)


@dataclass
class ContinualScheduleConfig(C.ScheduleConfig):
    epochs: int = 100  # per stage (seed 000's default)
    warmup_epochs: float = 5  # per stage; the seed gives none, and pretraining's 40 exceeds its 25-50 epoch presets


@dataclass
class ContinualSection:
    domains: List[str] = field(default_factory=list)  # trained in order: folders or built-in names; [] = data_path
    eval_domains: List[str] = field(default_factory=list)  # evaluated after every stage but never trained
    eval_batch_size: int = 64  # batch size of the evaluation passes
    eval_initial: bool = True  # also evaluate the starting weights (the 'initial' row: drop from the start)
    eval_seed: int = 0  # seeds the fixed evaluation masks (with each domain's name)
    knn_k: int = 20  # neighbours of the k-NN classifier
    knn_temperature: float = 0.07  # DINO's weighting temperature
    pool: str = "cls"  # encoder feature for k-NN: cls | avg
    base_data: Optional[str] = None  # --sweep without a checkpoint: pretrain the shared start on this set first
    base_epochs: int = 10  # epochs of that base pretraining (freeze none, masked_only: the standard MAE recipe)


@dataclass
class ContinualConfig(C.PretrainConfig):
    model: ContinualModelConfig = field(default_factory=ContinualModelConfig)
    optimization: ContinualOptimizationConfig = field(default_factory=ContinualOptimizationConfig)
    schedule: ContinualScheduleConfig = field(default_factory=ContinualScheduleConfig)
    continual: ContinualSection = field(default_factory=ContinualSection)


FLAGS: list[P.Flag] = [
    *P.FLAGS,
    P.Flag("continual_checkpoint", "model.init_from", str, "start from these weights (official MAE .pth, Hugging "
           "Face ViTMAE or mimkit); same as --init_from"),
]
DOMAINS_FLAG = P.Flag("domains", "continual.domains")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The pretraining flags with continual defaults, --continual_checkpoint, --domains and --sweep."""
    P.add_arguments(p, FLAGS, ContinualConfig)
    p.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                   help="train on these in turn (folders, shards or built-in sets: photos microscopy textures space); "
                        "sets continual.domains")
    p.add_argument("--sweep", action="store_true",
                   help="run every freeze_mode x loss_mode on the domain sequence from one starting checkpoint "
                        "and write the comparison table (sweep.md, sweep.json)")


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """Flags/overrides over the schema; with no data anywhere, the demo (or sweep) preset goes underneath."""
    bad = [d for d in (getattr(args, "domains", None) or []) if "=" in d and not Path(d).exists()]
    if bad:
        raise ConfigError(f"'{bad[0]}' follows --domains, which takes every word after it; put key=value "
                          "overrides before --domains")
    flags = [*FLAGS, DOMAINS_FLAG]
    # built-in domains are demo data: the demo's CPU-sized recipe unless --model or a config file says otherwise
    sweep = getattr(args, "sweep", False)
    cfg = P.config_from_args(args, flags, ContinualConfig, demo_preset=None,
                             builtin_presets={"*": SWEEP_PRESET if sweep else DEMO_PRESET})
    if not cfg.continual.domains and not cfg.data.data_path:
        preset = SWEEP_PRESET if sweep else DEMO_PRESET
        # build_config puts the preset under every layer when none sets data.data_path (true here)
        cfg = P.config_from_args(args, flags, ContinualConfig, demo_preset=preset)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Continual-only rules (the shared ones ran in build_config)."""
    c = cfg.continual
    if c.domains and cfg.data.data_path:
        raise ConfigError("give either --data_path (one domain) or --domains (a sequence), not both")
    if not c.domains and not cfg.data.data_path:
        raise ConfigError("no data: give --data_path or --domains")
    for key, ok, valid in (("eval_batch_size", c.eval_batch_size >= 1, ">= 1"), ("knn_k", c.knn_k >= 1, ">= 1"),
                           ("knn_temperature", c.knn_temperature > 0, "> 0"),
                           ("pool", c.pool in ("cls", "avg"), "cls or avg"),
                           ("base_epochs", c.base_epochs >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"bad value for 'continual.{key}': {c[key]!r} (must be {valid})")
    names = [domain_name(d) for d in sequence_domains(cfg)] + [domain_name(d) for d in c.eval_domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"domain '{dup[0]}' appears twice in continual.domains / eval_domains; each domain is "
                          "one column of the results matrix")


def sequence_domains(cfg: DictConfig) -> list[str]:
    """The trained domains in order: continual.domains, or the single data.data_path."""
    return list(cfg.continual.domains) or [cfg.data.data_path]


def domain_name(spec: str) -> str:
    """A short, file-safe name: the built-in name or the folder's last component."""
    name = Path(str(spec).rstrip("/\\")).name or str(spec)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class EvalDomain:
    """One column of the matrix: a domain's held-out images and (where labelled) its k-NN reference set."""

    spec: str
    name: str
    val: Any
    knn_train: Any = None  # None when the domain has no labels (or no held-out split)
    eval_split: str = "val"  # 'train' when the folder has no val/ (then reconstruction only)
    noise: Optional[torch.Tensor] = None  # (N_val, L) fixed masking noise


def open_domains(cfg: DictConfig, num_patches: int, in_chans: int) -> list[EvalDomain]:
    """Open every domain's train and val splits now, so a missing or empty one fails before any training."""
    from mimkit.data.builtin import open_dataset
    from mimkit.data.shards import has_shard_split, is_shard_spec
    from mimkit.data.transforms import eval_transform

    tf = eval_transform(C.input_size(cfg), in_chans, cfg.data.mean, cfg.data.std)
    out = []
    trained = sequence_domains(cfg)
    for spec in trained + list(cfg.continual.eval_domains):
        train_ds = open_dataset(spec, "train", tf)  # DataError: missing, empty, not a folder
        folder = Path(spec).expanduser()
        if is_shard_spec(spec):
            no_val = not has_shard_split(spec, "val")  # val-*.tar beside the training shards, or none
        else:
            no_val = folder.exists() and not (folder / "val").is_dir()
        if no_val:
            val_ds, split = train_ds, "train"  # no held-out split: reconstruction on the training images only
        else:
            val_ds, split = open_dataset(spec, "val", tf), "val"
        labelled = len(getattr(train_ds, "classes", [])) >= 2 and split == "val"
        if labelled and list(getattr(val_ds, "classes", [])) != list(train_ds.classes):
            raise DataError(f"domain {spec}: val classes {val_ds.classes} differ from train classes "
                            f"{train_ds.classes}")
        name = domain_name(spec)
        # A dedicated generator per domain, seeded by its name: the same masks at every stage and in every run.
        g = torch.Generator().manual_seed(cfg.continual.eval_seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.rand(len(val_ds), num_patches, generator=g)
        out.append(EvalDomain(spec, name, val_ds, train_ds if labelled else None, split, noise))
    return out


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, domains: list[EvalDomain], cfg: DictConfig) -> dict[str, dict[str, float]]:
    """{domain: {recon_loss, recon_loss_all, knn_acc}}: masked / all-patch MSE with fixed masks, k-NN top-1.

    recon_loss is the MAE objective (mean over masked patches); knn_acc in %, as every command; NaN = no labels.
    """
    from torch.utils.data import DataLoader

    from mimkit.data.datasets import collate_batch
    from mimkit.metrics.knn import knn_accuracy
    from mimkit.tasks.features import extract_features

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bs = cfg.continual.eval_batch_size
    results = {}
    for d in domains:
        sums, n = {"masked_only": 0.0, "all_pixels": 0.0}, 0
        masked_patches = 0.0
        loader = DataLoader(d.val, batch_size=bs, shuffle=False, num_workers=0, collate_fn=collate_batch)
        start = 0
        for batch in loader:
            imgs = batch["images"].to(device)
            noise = d.noise[start:start + len(imgs)].to(device)
            start += len(imgs)
            _, pred, mask = model(imgs, mask_ratio=cfg.model.mask_ratio, noise=noise)
            per_patch = ((pred.float() - model.target(imgs).float()) ** 2).mean(dim=-1)  # (N, L)
            sums["masked_only"] += float((per_patch * mask).sum())
            masked_patches += float(mask.sum())
            sums["all_pixels"] += float(per_patch.sum())
            n += per_patch.numel()
        row = {"recon_loss": sums["masked_only"] / max(masked_patches, 1.0),
               "recon_loss_all": sums["all_pixels"] / max(n, 1), "knn_acc": float("nan")}
        if d.knn_train is not None:
            tr_f, tr_y = extract_features(model, d.knn_train, bs, device, cfg.continual.pool)
            va_f, va_y = extract_features(model, d.val, bs, device, cfg.continual.pool)
            row["knn_acc"] = 100.0 * knn_accuracy(tr_f, tr_y, va_f, va_y, (cfg.continual.knn_k,),
                                                  cfg.continual.knn_temperature)[cfg.continual.knn_k]
        results[d.name] = row
    model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------- stages
class StageHook:
    """Loop hook: prints the parameter-status table when train() does not, and skips encoder autograd."""

    def __init__(self, freeze_mode: str, run: RunLogger, stages_left: int = 1) -> None:
        self.freeze_mode, self.run, self.stages_left = freeze_mode, run, stages_left

    def on_train_start(self, trainer) -> None:
        model = trainer.model
        # the stage's estimate also speaks for the stages still to come (each about as long) and names the demo
        trainer.run.also_estimate = (self.stages_left, "stage(s) left in the sequence, this one included")
        trainer.run.slow_hint = CPU_HINT
        if self.freeze_mode == "none":  # train() logs the table only for a frozen mode
            trainer.run.info(model.format_param_status())
        if self.freeze_mode == "encoder_only" and hasattr(model, "frozen_prefix"):
            # the whole encoder is frozen: run it under no_grad (no activations kept for backward)
            model.frozen_prefix = len(model.blocks)


def startup_lines(cfg: DictConfig, model) -> list[str]:
    """What the sequence says before any work: the architecture, the preset beneath the flags, a CPU note."""
    from mimkit.engine import distributed as D
    from mimkit.models.registry import describe

    lines = [f"model {cfg.model.type} ({describe(model)}), "
             f"{cfg.schedule.epochs} epoch(s) per stage, batch {cfg.optimization.batch_size}"]
    if cfg.misc.preset:
        lines.append(P.preset_line(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    if D.resolve_device(cfg.misc.device).type == "cpu" and n_params > 50e6:
        lines.append(f"note: a {n_params / 1e6:.0f}M-parameter model on a CPU is slow; {CPU_HINT}")
    lines.append("the time estimate comes after the first iterations of stage 1 (for every stage left)")
    return lines


def stage_config(cfg: DictConfig, k: int, spec: str, init_from: Optional[str], out_dir: Path) -> DictConfig:
    """Stage k's pretraining config: a plain PretrainConfig (its folder resumes with `mimkit pretrain` too)."""
    d = C.to_container(cfg)
    d.pop("continual")
    d["data"]["data_path"] = spec
    d["model"]["init_from"] = init_from
    d["misc"]["output_dir"] = str(out_dir / f"stage-{k + 1}-{domain_name(spec)}")
    d["misc"]["resume"] = None  # a stage resumes from its own folder (auto_resume)
    return C.build_config(C.PretrainConfig, [("continual stage", d)])


def load_state(path: Path, domains: list[str], cfg: DictConfig) -> dict:
    """sequence.json of an earlier run in this folder (checked to be the same sequence), or a fresh state."""
    fresh = {"domains": domains, "freeze_mode": cfg.model.freeze_mode, "loss_mode": cfg.model.loss_mode,
             "initial": None, "stages": []}
    if not path.exists():
        return fresh
    state = json.loads(path.read_text())
    done = [s["domain"] for s in state.get("stages", [])]
    if done != domains[:len(done)]:
        raise ConfigError(f"{path} records finished stages {done}, which do not start the sequence {domains}; "
                          "use another --output_dir")
    for key in ("freeze_mode", "loss_mode"):
        if state.get(key) not in (None, cfg.model[key]):
            raise ConfigError(f"{path} was written with {key} {state[key]}, this run has {cfg.model[key]}; "
                              "use another --output_dir")
    state["domains"] = domains
    return state


def save_state(path: Path, state: dict) -> None:
    """Write sequence.json atomically (a kill never leaves half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(state), indent=2) + "\n")
    os.replace(tmp, path)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


METRICS = (  # (key, higher is better, title)
    ("recon_loss", False, "reconstruction loss (masked patches, fixed masks)"),
    ("knn_acc", True, "k-NN accuracy (%)"),
)


def matrices(state: dict, names: list[str]) -> dict[str, np.ndarray]:
    """{metric: (finished stages, domains) array} from the state's stage rows."""
    return {key: np.array([[_num(s["eval"][n][key]) for n in names] for s in state["stages"]], dtype=float)
            .reshape(len(state["stages"]), len(names)) for key, _, _ in METRICS}


DIGITS = {"recon_loss": 4, "knn_acc": 2}  # decimals shown: losses to 1e-4, accuracies (%) to 0.01


def write_results(out_dir: Path, state: dict, names: list[str], n_trained: int) -> dict[str, dict]:
    """CSV + JSON per metric (with forgetting, BWT, drop from the initial weights) and the heatmap PNG."""
    stages = [f"after_{s['name']}" for s in state["stages"]]
    summaries = {}
    for key, higher, _ in METRICS:
        R = matrices(state, names)[key]
        if R.shape[0] == 0:
            continue
        s = F.summarize(R, names, higher_is_better=higher, metric=key, stages=stages)
        s["trained_domains"] = names[:n_trained]
        s["final_average"] = _nanmean(R[-1])
        if state.get("initial"):
            init = np.array([_num(state["initial"][n][key]) for n in names])
            s["initial"] = init.tolist()
            drop = (init - R[-1]) if higher else (R[-1] - init)
            s["drop_from_initial"] = dict(zip(names, [None if math.isnan(v) else float(v) for v in drop]))
        if state.get("initial"):  # the starting weights as the first row: the drop from the start reads off it
            F.write_matrix_csv(out_dir / f"{key}.csv", np.vstack([init[None], R]), names, ["initial", *stages])
        else:
            F.write_matrix_csv(out_dir / f"{key}.csv", R, names, stages)
        F.write_matrix_json(out_dir / f"{key}.json", s)
        summaries[key] = s
    heatmap(out_dir / "matrix.png", state, names)
    return summaries


def _nanmean(v: np.ndarray) -> Optional[float]:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def heatmap(path: Path, state: dict, names: list[str]) -> Path:
    """One panel per metric: rows = initial + stages, columns = domains; darker = better, values written in,
    and a colour bar beside each panel mapping shades to values (its ends: the panel's worst and best)."""
    from PIL import Image, ImageDraw

    rows = (["initial"] if state.get("initial") else []) + [f"after {s['name']}" for s in state["stages"]]
    evals = ([state["initial"]] if state.get("initial") else []) + [s["eval"] for s in state["stages"]]
    cw, ch, left, top, gap, bar_w = 92, 24, 130, 40, 30, 16
    bar_x = left + cw * len(names) + 14
    width = bar_x + bar_w + 70
    panel_h = top + max(ch * len(rows), 60)
    img = Image.new("RGB", (width, panel_h * len(METRICS) + gap), "white")
    draw = ImageDraw.Draw(img)
    for p, (key, higher, title) in enumerate(METRICS):
        y0 = p * (panel_h + gap // len(METRICS))
        vals = np.array([[_num(e[n][key]) for n in names] for e in evals], dtype=float)
        finite = vals[np.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        d = DIGITS[key]
        draw.text((4, y0 + 4), f"{title} ({'higher' if higher else 'lower'} is better)", fill="black")
        for j, n in enumerate(names):
            draw.text((left + j * cw + 4, y0 + 22), n[:14], fill="black")
        for i, r in enumerate(rows):
            y = y0 + top + i * ch
            draw.text((4, y + 6), r[:20], fill="black")
            for j in range(len(names)):
                v = vals[i, j]
                x = left + j * cw
                if math.isnan(v):
                    draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=(230, 230, 230))
                    draw.text((x + 4, y + 6), "n/a", fill="gray")
                    continue
                good = _goodness(v, lo, hi, higher)
                draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=_shade(good))
                draw.text((x + 4, y + 6), f"{v:.{d}f}", fill="white" if good > 0.6 else "black")
        # colour bar: best value at the top, worst at the bottom
        y_top, y_bot = y0 + top, y0 + panel_h - 4
        for y in range(y_top, y_bot + 1):
            good = 1.0 - (y - y_top) / max(1, y_bot - y_top)
            draw.line([bar_x, y, bar_x + bar_w, y], fill=_shade(good))
        draw.rectangle([bar_x, y_top, bar_x + bar_w, y_bot], outline="black")
        best, worst = (hi, lo) if higher else (lo, hi)
        draw.text((bar_x + bar_w + 4, y_top), f"{best:.{d}f}", fill="black")
        draw.text((bar_x + bar_w + 4, y_bot - 10), f"{worst:.{d}f}", fill="black")
        draw.text((bar_x - 2, y0 + 22), "scale", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _goodness(v: float, lo: float, hi: float, higher: bool) -> float:
    """0 = the panel's worst value, 1 = its best."""
    t = 0.5 if hi == lo else (v - lo) / (hi - lo)
    return t if higher else 1 - t


def _shade(good: float) -> tuple[int, int, int]:
    s = int(235 - 175 * good)
    return (s, s, 255)


def format_summary(state: dict, names: list[str], summaries: dict[str, dict]) -> str:
    """The table printed at the end: each metric's matrix, forgetting, drop from start, BWT."""
    lines = []
    w = max(12, *(len(n) + 2 for n in names))
    for key, higher, title in METRICS:
        s = summaries.get(key)
        if s is None:
            continue
        lines.append(f"\n{title} ({'higher' if higher else 'lower'} is better)")
        lines.append(f"{'':<24}" + "".join(f"{n:>{w}}" for n in names))
        d = DIGITS[key]
        fmt = (lambda v: f"{'n/a':>{w}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{w}.{d}f}")
        if "initial" in s:
            lines.append(f"{'initial':<24}" + "".join(fmt(v) for v in s["initial"]))
        for stage, row in zip(s["stages"], s["matrix"], strict=True):
            lines.append(f"{stage[:23]:<24}" + "".join(fmt(v) for v in row))
        lines.append(f"{'forgetting':<24}" + "".join(fmt(s['forgetting'][n]) for n in names))
        if "drop_from_initial" in s:
            lines.append(f"{'drop from initial':<24}" + "".join(fmt(s['drop_from_initial'][n]) for n in names))
        af, bwt = s["average_forgetting"], s["backward_transfer"]
        lines.append(f"average forgetting {('n/a' if af is None else f'{af:.{d}f}')}   backward transfer "
                     f"{('n/a' if bwt is None else f'{bwt:.{d}f}')}   "
                     "(positive forgetting = worse, positive BWT = better)")
    return "\n".join(lines)


def run_sequence(cfg: DictConfig, print_summary: bool = True) -> dict:
    """Train every stage in turn (resuming where an earlier run stopped), evaluate, write the results."""
    from mimkit.engine import distributed as D

    out_dir = Path(C.resolve_output_dir(cfg, "continual"))
    domains = sequence_domains(cfg)
    # 1. validate before any work: options, data of every domain, the starting checkpoint
    P.seed_everything(cfg.misc.seed)
    model = P.build_model(cfg, "cpu")  # also checks the input size against the patch size
    model.apply_freeze_mode(cfg.model.freeze_mode)  # unknown freeze_mode: a clear error here
    eval_domains = open_domains(cfg, model.num_patches, model.in_chans)
    names = [d.name for d in eval_domains]
    state_path = out_dir / STATE_FILE
    state = load_state(state_path, domains, cfg)
    if cfg.model.init_from and not state["stages"]:
        report = load_weights(model, cfg.model.init_from)  # CheckpointError: another architecture/patch size
    else:
        report = None
    is_main = int(os.environ.get("RANK", "0")) == 0

    run = RunLogger(out_dir, enabled=is_main, tensorboard=cfg.logging.tensorboard, print_freq=cfg.logging.print_freq)
    try:
        run.info(f"mimkit continual: {len(domains)} stage(s) {' -> '.join(domain_name(d) for d in domains)}; "
                 f"evaluated on {', '.join(f'{d.name} ({len(d.val)} {d.eval_split})' for d in eval_domains)}; "
                 f"freeze_mode {cfg.model.freeze_mode}, loss_mode {cfg.model.loss_mode}")
        for line in startup_lines(cfg, model):
            run.info(line)
        for d in eval_domains:
            if d.eval_split == "train":
                run.info(f"warning: {d.spec} has no val/ folder: its reconstruction loss is measured on its "
                         "training images and it gets no k-NN accuracy")
        if report is not None:
            run.info(report.summary())
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            C.save_config(cfg, out_dir / "config.yaml")
        counts = model.param_status()["total"]
        state["trainable_params"], state["total_params"] = counts["trainable"], counts["trainable"] + counts["frozen"]
        if cfg.continual.eval_initial and state["initial"] is None:
            model.to(D.resolve_device(cfg.misc.device))
            run.info(f"evaluating the starting weights on {len(eval_domains)} domain(s) "
                     f"({sum(len(d.val) for d in eval_domains)} images) before stage 1")
            t0 = time.perf_counter()
            state["initial"] = evaluate(model, eval_domains, cfg)
            state["initial_eval_s"] = time.perf_counter() - t0
            log_eval(run, "initial", state["initial"], 0)
            if is_main:
                save_state(state_path, state)
        del model

        # 2. the stages, each a full pretraining run in its own folder
        for k, spec in enumerate(domains):
            if k < len(state["stages"]):
                run.info(f"stage {k + 1}/{len(domains)} ({domain_name(spec)}) already finished "
                         f"(recorded in {state_path})")
                continue
            prev = state["stages"][k - 1]["final_checkpoint"] if k else cfg.model.init_from
            scfg = stage_config(cfg, k, spec, prev, out_dir)
            run.info(f"\n== stage {k + 1}/{len(domains)}: {domain_name(spec)} -> {scfg.misc.output_dir} "
                     f"(from {prev or 'fresh initialisation'})")
            t0, c0 = time.perf_counter(), time.process_time()
            hook = StageHook(cfg.model.freeze_mode, run, stages_left=len(domains) - k)
            summary = P.train(scfg, extra_hooks=[hook], print_summary=False)
            # CPU seconds as well as wall: on a shared machine the wall time mostly measures the neighbours
            train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            t0 = time.perf_counter()
            row = evaluate(summary["model"], eval_domains, cfg)
            state["stages"].append({
                "domain": spec, "name": domain_name(spec), "output_dir": summary["output_dir"],
                "final_checkpoint": summary["final_checkpoint"], "final_train_loss": summary["final_loss"],
                "steps": summary["steps"], "train_s": train_s, "train_cpu_s": train_cpu_s,
                "eval_s": time.perf_counter() - t0, "eval": row,
            })
            log_eval(run, f"after stage {k + 1} ({domain_name(spec)})", row, k + 1)
            if is_main:
                save_state(state_path, state)
                write_results(out_dir, state, names, len(domains))
            del summary

        # 3. report
        summaries = write_results(out_dir, state, names, len(domains)) if is_main else {}
        table = format_summary(state, names, summaries)
        run.file_only(table)
    finally:
        run.close()
    if print_summary and is_main:
        print(table)
        print(f"\nDone. Everything is in {out_dir}: recon_loss.csv/json, knn_acc.csv/json, matrix.png, "
              f"{STATE_FILE}, log.txt, stage-*/ (checkpoints, logs)")
    return {"output_dir": str(out_dir), "state": state, "summaries": summaries, "domains": names}


def log_eval(run: RunLogger, label: str, row: dict[str, dict[str, float]], step: int) -> None:
    """One line per domain in log.txt/console, and the values as TensorBoard scalars at x = stage."""
    for name, m in row.items():
        knn = "n/a" if math.isnan(m["knn_acc"]) else f"{m['knn_acc']:.2f}%"
        run.info(f"eval {label}: {name:<16} recon_loss {m['recon_loss']:.4f}  recon_loss_all "
                 f"{m['recon_loss_all']:.4f}  knn_acc {knn}")
    run.metrics({"kind": "eval", "label": label, "step": step,
                 **{f"{n}/{k}": v for n, m in row.items() for k, v in m.items() if not math.isnan(v)}},
                step, tb_prefix="eval")


# ---------------------------------------------------------------------------------------------- sweep
def run_sweep(cfg: DictConfig) -> dict:
    """Every freeze_mode x loss_mode on the same sequence from one starting checkpoint; writes sweep.md/json."""
    out_dir = Path(C.resolve_output_dir(cfg, "continual"))
    start = cfg.model.init_from
    if not start:
        if not cfg.continual.base_data:
            raise ConfigError("--sweep needs a starting checkpoint (--continual_checkpoint) or continual.base_data "
                              "to pretrain one on")
        base = C.to_container(cfg)
        base.pop("continual")
        base["data"]["data_path"] = cfg.continual.base_data
        base["model"].update(freeze_mode="none", loss_mode="masked_only", init_from=None)
        base["schedule"]["epochs"] = cfg.continual.base_epochs
        base["misc"]["output_dir"] = str(out_dir / "base")
        bcfg = C.build_config(C.PretrainConfig, [("sweep base", base)])
        t0 = time.perf_counter()
        start = P.train(bcfg, print_summary=False)["final_checkpoint"]
        print(f"sweep: base checkpoint {start} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for freeze in FREEZE_MODES:
        for loss in LOSS_MODES:
            c = copy.deepcopy(cfg)
            OmegaConf.set_struct(c, False)
            c.model.freeze_mode, c.model.loss_mode, c.model.init_from = freeze, loss, start
            c.misc.output_dir = str(out_dir / f"{freeze}-{loss}")
            OmegaConf.set_struct(c, True)
            res = run_sequence(c, print_summary=False)
            st = res["state"]
            wall = st.get("initial_eval_s", 0) + sum(s["train_s"] + s["eval_s"] for s in st["stages"])
            rows.append({"freeze_mode": freeze, "loss_mode": loss, "trainable_params": st["trainable_params"],
                         "total_params": st["total_params"], "wall_s": wall,
                         "train_s": sum(s["train_s"] for s in st["stages"]),
                         "train_cpu_s": sum(s.get("train_cpu_s", float("nan")) for s in st["stages"]),
                         "domains": res["domains"],
                         "summaries": res["summaries"]})
    (out_dir / "sweep.json").write_text(json.dumps(_clean({"start_checkpoint": start, "rows": rows,
                                                            "config": C.to_container(cfg)}), indent=2) + "\n")
    md = sweep_table(rows, len(sequence_domains(cfg)))
    (out_dir / "sweep.md").write_text(md + "\n")
    print(md)
    return {"rows": rows, "markdown": md, "start_checkpoint": start}


def sweep_table(rows: list[dict], n_trained: int) -> str:
    """Markdown tables: final value per domain, forgetting, BWT, drop from start, trainable params, wall time."""
    names = rows[0]["domains"]
    out = []
    for key, higher, title in METRICS:
        out.append(f"\n**{title}** ({'higher' if higher else 'lower'} is better): value on each domain's val split "
                   "after the last stage; forgetting and drop from start: positive = worse; BWT: positive = better; "
                   "times: training only, all stages\n")
        head = ["freeze_mode", "loss_mode", *[f"final {n}" for n in names], "avg forgetting", "BWT",
                *[f"drop {n}" for n in names[n_trained:]], "trainable", "train wall s", "train CPU s"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            s = r["summaries"].get(key, {})
            final = s.get("matrix", [[None] * len(names)])[-1]
            drop = s.get("drop_from_initial", {})
            d = DIGITS[key]
            cells = [r["freeze_mode"], r["loss_mode"], *[_f(v, d) for v in final], _f(s.get("average_forgetting"), d),
                     _f(s.get("backward_transfer"), d), *[_f(drop.get(n), d) for n in names[n_trained:]],
                     f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%)",
                     f"{r['train_s']:.1f}", f"{r['train_cpu_s']:.1f}"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _f(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    """CLI entry: build and check the config, then run the sequence (or the sweep)."""
    cfg = config_from_args(args)
    if args.sweep:
        run_sweep(cfg)
    else:
        run_sequence(cfg)
    return 0
