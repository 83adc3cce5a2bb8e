"""Issue 23's new-user trial (an OpenMMLab user trying "nothing lost" from the docs alone): evaluations add their
results to any run folder under one rule; a resume with changed settings says so (or refuses run-defining ones);
Ctrl-C answers at once; a finished run leaves no lock file; the summary's picture is the trained one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_segment_cli import TINY as SEG_TINY

from conftest import TINY_MODEL
from mimkit.cli import main

pytestmark = pytest.mark.slow  # end-to-end CLI runs


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", "--data_path", "digits", *TINY_MODEL, "--batch_size", "8", "--num_workers", "0",
                 "--output_dir", str(out), "logging.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished 2-step tiny pretraining run."""
    out = tmp_path_factory.mktemp("trial") / "good"
    assert _pretrain(out, "--max_steps", "2") == 0
    return out


def test_evaluations_add_their_results_to_a_training_run_folder_and_nothing_else(pretrained, tmp_path,
                                                                                 capsys) -> None:
    """segment --eval / --predict and knn into a pretraining run's folder: each adds what it writes (results-N.json,
    overlays-N/, predictions-N/), never results.json (the folder's own run's), no record or lock taken; every file
    of the run keeps its bytes. A training command is still refused, naming what it would write."""
    seg = tmp_path / "seg"
    assert main(["segment", *SEG_TINY, "--max_iters", "1", "--warmup_iters", "0", "test.num_overlays=1",
                 "--output_dir", str(seg)]) == 0
    ckpt = str(seg / "checkpoints" / "final.pt")
    before = _tree(pretrained)
    record = (pretrained / ".mimkit-run.json").read_text()
    capsys.readouterr()
    assert main(["segment", "--eval", "--resume", ckpt, "test.num_overlays=1", "--output_dir",
                 str(pretrained)]) == 0
    assert main(["knn", "--checkpoint", str(pretrained), "--data_path", "digits", "--k", "3", "--batch_size", "64",
                 "--num_workers", "0", "--output_dir", str(pretrained)]) == 0
    photo = next((seg / "overlays").iterdir())
    assert main(["segment", "--predict", str(photo), "--resume", ckpt, "--output_dir", str(pretrained)]) == 0
    after = _tree(pretrained)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the run changed
    added = sorted({k.split("/")[0] for k in after if k not in before})
    assert added == ["overlays", "predictions", "results-2.json", "results-3.json"], added
    assert json.loads((pretrained / "results-2.json").read_text())["command"] == "segment"
    assert json.loads((pretrained / "results-3.json").read_text())["command"] == "knn"
    assert (pretrained / ".mimkit-run.json").read_text() == record
    assert not (pretrained / ".mimkit.lock").exists()  # the finished run left no lock file
    fresh = tmp_path / "pred"  # a --predict folder of its own holds the predictions and nothing else
    assert main(["segment", "--predict", str(photo), "--resume", ckpt, "--output_dir", str(fresh)]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["predictions"]
    # a training command into the same folder: refused, naming what it would write
    capsys.readouterr()
    assert main(["segment", *SEG_TINY, "--max_iters", "1", "--output_dir", str(pretrained)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the run folder of a mimkit pretrain run" in err and "config.yaml, log.txt, metrics.jsonl" in err, err
    assert _tree(pretrained) == after


def test_a_resume_with_run_defining_changes_is_refused_naming_each_and_schedule_changes_are_said(tmp_path,
                                                                                                 capsys) -> None:
    """The trial: a 2-step run rerun with --mask_ratio 0.5 resumed silently (config.yaml said 0.5 after). Now one
    line names model.mask_ratio 0.75 -> 0.5 and nothing in the folder changes; raising the schedule goes on and
    says so in one line; --resume CHECKPOINT continues with new settings deliberately, said too."""
    out = tmp_path / "run"
    assert _pretrain(out, "--max_steps", "2") == 0
    before = _tree(out)
    capsys.readouterr()
    assert _pretrain(out, "--max_steps", "3", "--mask_ratio", "0.5", "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started with other settings (model.mask_ratio 0.75 -> 0.5, misc.seed 0 -> 1)" in err[0]
    assert f"--resume {out}/checkpoints/latest.pt" in err[0] and "--no_auto_resume" in err[0], err
    assert _tree(out) == before  # config.yaml, checkpoints and log untouched
    assert _pretrain(out, "--max_steps", "3", "--save_freq_steps", "1", "--epochs", "3") == 0
    log = (out / "log.txt").read_text()
    assert ("resuming with changed settings (settings that may change on resume): schedule.epochs 400 -> 3, "
            "checkpointing.save_freq_steps 0 -> 1, misc.max_steps 2 -> 3") in log, log[-2000:]
    assert "mask_ratio: 0.75" in (out / "config.yaml").read_text()
    latest = out / "checkpoints" / "latest.pt"
    assert _pretrain(out, "--max_steps", "4", "--epochs", "3", "--save_freq_steps", "1", "--mask_ratio", "0.5",
                     "--resume", str(latest)) == 0
    assert (f"resuming with changed settings (with --resume {latest}: continued with the settings given): "
            "model.mask_ratio 0.75 -> 0.5, misc.max_steps 3 -> 4") in (out / "log.txt").read_text()


def test_the_resume_rule_is_one_mechanism() -> None:
    """preflight's comparison (incremental's, shared): derived keys unset again are no change, 1 == 1.0, a prefix
    of may_change covers its section, and an explicit --resume only says what changed."""
    from mimkit.errors import ConfigError
    from mimkit.tasks import preflight as PF
    from mimkit.tasks.incremental import resume as RS

    assert RS.flatten is PF.flatten
    old = {"model": {"mask_ratio": 0.75, "arch": {"depth": 2}}, "optimization": {"lr": 1e-3, "batch_size": 8},
           "logging": {"print_freq": 10}, "schedule": {"epochs": 5}}
    same = {"model": {"mask_ratio": 0.75, "arch": {}}, "optimization": {"lr": None, "batch_size": 8.0},
            "logging": {"print_freq": 10}, "schedule": {"epochs": 5}}
    assert PF.check_resume_settings(old, same, "finetune", "runs/x", "runs/x/latest.pt",
                                    derived=("optimization.lr", "model.arch")) is None
    more = {**same, "logging": {"print_freq": 3}, "schedule": {"epochs": 9}}
    assert PF.check_resume_settings(old, more, "pretrain", "runs/x", "l.pt") == (
        "resuming with changed settings (settings that may change on resume): logging.print_freq 10 -> 3, "
        "schedule.epochs 5 -> 9")
    changed = {**same, "model": {"mask_ratio": 0.5}}
    with pytest.raises(ConfigError, match=r"runs/x holds a mimkit pretrain run .*\(model.mask_ratio 0.75 -> 0.5\)"):
        PF.check_resume_settings(old, changed, "pretrain", "runs/x", "l.pt")
    assert "model.mask_ratio 0.75 -> 0.5" in PF.check_resume_settings(old, changed, "pretrain", "runs/x", "l.pt",
                                                                     explicit="l.pt")


def test_the_summary_reconstruction_is_the_trained_one(tmp_path, capsys) -> None:
    """The trial: after --max_steps 5 the summary's reconstruction line named recon_init.png (before training)."""
    out = tmp_path / "run"
    assert _pretrain(out, "--max_steps", "2") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("reconstruction"))
    assert line.split()[-1] == str(out / "recon_step-2.png")
    assert (out / "recon_step-2.png").stat().st_size > 0 and (out / "recon_init.png").exists()
    assert _pretrain(out, "--max_steps", "2") == 0  # a rerun with nothing to train draws nothing new
    assert sorted(p.name for p in out.glob("recon_*.png")) == ["recon_init.png", "recon_step-2.png"]
