"""The stages of `mimkit continual`: each stage's pretraining config, the hook it trains with, and sequence.json.

Stage k is a plain pretraining run (its folder resumes with `mimkit pretrain` too) starting from stage k-1's final
weights; sequence.json records the finished stages, so a killed sequence resumes at its stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from mimkit import config as C
from mimkit.engine.logging import RunLogger
from mimkit.errors import ConfigError
from mimkit.metrics.forgetting import json_safe
from mimkit.tasks.continual.config import CPU_HINT, domain_name

STATE_FILE = "sequence.json"


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


def stage_config(cfg: DictConfig, k: int, spec: str, init_from: Optional[str], out_dir: Path) -> DictConfig:
    """Stage k's pretraining config: a plain PretrainConfig (its folder resumes with `mimkit pretrain` too)."""
    d = C.to_container(cfg)
    d.pop("continual")
    d["data"]["data_path"] = spec
    d["model"]["init_from"] = init_from
    d["misc"]["output_dir"] = str(out_dir / f"stage-{k + 1}-{domain_name(spec)}")
    if d["logging"].get("log_dir"):  # --log_dir: each stage's curves in a folder of their own under it
        d["logging"]["log_dir"] = str(Path(d["logging"]["log_dir"]) / f"stage-{k + 1}-{domain_name(spec)}")
    d["misc"]["resume"] = None  # a stage resumes from its own folder (auto_resume)
    # one wandb / MLflow run holds the whole sequence: a stage's records reach it through the sequence's logger
    d["logging"]["wandb"]["enabled"] = d["logging"]["mlflow"]["enabled"] = False
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
    tmp.write_text(json.dumps(json_safe(state), indent=2) + "\n")
    os.replace(tmp, path)
