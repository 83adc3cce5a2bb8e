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
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mimkit import config as C
from mimkit.engine.logging import RunLogger
from mimkit.errors import ConfigError
from mimkit.metrics.forgetting import json_safe
from mimkit.tasks import pretrain as P
from mimkit.tasks.preflight import load_weights
# The config, stages, evaluation and results live in their own modules; these names stay importable from here.
from mimkit.tasks.continual.config import (  # noqa: F401
    CPU_HINT, DEMO_PRESET, DOMAINS_FLAG, FLAGS, SWEEP_PRESET, ContinualConfig, ContinualModelConfig,
    ContinualOptimizationConfig, ContinualScheduleConfig, ContinualSection, add_arguments, config_from_args,
    domain_name, sequence_domains, validate,
)
from mimkit.tasks.continual.eval import EvalDomain, evaluate, log_eval, open_domains  # noqa: F401
from mimkit.tasks.continual.report import (  # noqa: F401
    DIGITS, METRICS, format_summary, heatmap, matrices, sweep_table, track, write_results,
)
from mimkit.tasks.continual.stages import STATE_FILE, StageHook, load_state, save_state, stage_config  # noqa: F401

FREEZE_MODES = ("none", "encoder_layernorms_only", "layernorm_only", "encoder_only")
LOSS_MODES = ("all_pixels", "masked_only")


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


def resumed_sequence(cfg: DictConfig, out_dir: Path, state_path: Path) -> str | None:
    """A sequence resumed in out_dir keeps the run-defining settings it started with (its config.yaml): preflight's
    rule, before any work; the line naming the settings that may change and did, or None."""
    from mimkit.tasks.preflight import check_resume_settings

    if not (cfg.misc.auto_resume and state_path.is_file() and (out_dir / "config.yaml").is_file()):
        return None
    started = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"), resolve=True)
    return check_resume_settings(started, C.to_container(cfg), "continual", out_dir, None)


def run_sequence(cfg: DictConfig, print_summary: bool = True) -> dict:
    """Train every stage in turn (resuming where an earlier run stopped), evaluate, write the results."""
    from mimkit.engine import distributed as D

    out_dir = Path(C.resolve_output_dir(cfg, "continual"))
    domains = sequence_domains(cfg)
    # 1. validate before any work: options, data of every domain, the starting checkpoint
    P.seed_everything(cfg.misc.seed)
    model = P.build_model(cfg, "cpu")  # also checks the input size against the patch size
    model.apply_freeze_mode(cfg.model.freeze_mode)  # unknown freeze_mode: a clear error here
    # every stage trains this model at this batch and size: a sequence that cannot fit is refused before any work
    memory = P.pretrain_memory(cfg, model, D.resolve_device(cfg.misc.device), int(os.environ.get("WORLD_SIZE", "1")),
                               "continual", CPU_HINT)
    eval_domains = open_domains(cfg, model.num_patches, model.in_chans)
    names = [d.name for d in eval_domains]
    state_path = out_dir / STATE_FILE
    state = load_state(state_path, domains, cfg)
    resume_note = resumed_sequence(cfg, out_dir, state_path)  # run-defining settings changed: refused here
    if cfg.model.init_from and not state["stages"]:
        report = load_weights(model, cfg.model.init_from)  # CheckpointError: another architecture/patch size
        P.check_fresh_freeze(model, report, cfg)  # a fresh decoder frozen: refused before any work
    else:
        report = None
    is_main = int(os.environ.get("RANK", "0")) == 0

    run = RunLogger(out_dir, enabled=is_main, print_freq=cfg.logging.print_freq,
                    tracking=cfg.logging, config=C.to_container(cfg))
    try:
        run.info(f"mimkit continual: {len(domains)} stage(s) {' -> '.join(domain_name(d) for d in domains)}; "
                 f"evaluated on {', '.join(f'{d.name} ({len(d.val)} {d.eval_split})' for d in eval_domains)}; "
                 f"freeze_mode {cfg.model.freeze_mode}, loss_mode {cfg.model.loss_mode}")
        run.info(memory)
        if resume_note:
            run.info(resume_note)
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
            summary = P.train(scfg, extra_hooks=[hook], print_summary=False, parent_log=run,
                              parent_prefix=f"stage{k + 1}")
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
                track(run, out_dir, write_results(out_dir, state, names, len(domains)), k + 1)
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
    (out_dir / "sweep.json").write_text(json.dumps(json_safe({"start_checkpoint": start, "rows": rows,
                                                               "config": C.to_container(cfg)}), indent=2) + "\n")
    md = sweep_table(rows, len(sequence_domains(cfg)))
    (out_dir / "sweep.md").write_text(md + "\n")
    print(md)
    return {"rows": rows, "markdown": md, "start_checkpoint": start}


def run(args: argparse.Namespace) -> int:
    """CLI entry: build and check the config, then run the sequence (or the sweep)."""
    cfg = config_from_args(args)
    if args.sweep:
        run_sweep(cfg)
    else:
        run_sequence(cfg)
    return 0
