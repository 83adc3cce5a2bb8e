"""Trackers under the other commands and the other ways a run ends: linprobe / finetune feed wandb (offline) and
MLflow (sqlite) exactly the records of metrics.jsonl with the resolved config as parameters; a SIGTERM'd run is
KILLED / pre-empted (not finished) and its rerun continues the same runs to FINISHED; checkpoints become wandb
artifacts only with --wandb_log_checkpoints. Real libraries, no network (test_trackers' `_offline` fixture)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from test_trackers import PRETRAIN, _client, _offline, _offline_runs, _steps  # noqa: F401  (_offline: autouse)
from wandb_records import read_run, records

from mimkit.cli import main
from mimkit.engine.loop import Trainer
from mimkit.engine.trackers import _flatten, _param

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

PREFIX = {"step": "train", "epoch": "epoch", "eval": "eval"}  # metrics.jsonl kind -> the trackers' name prefix


def expected_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers must hold it: '<prefix>/<field>' -> [(step, value)] of every numeric field."""
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix = PREFIX.get(r.get("kind"))
        if prefix is None:
            continue
        for k, v in r.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{prefix}/{k}", []).append((r["step"], float(v)))
    return out


def wandb_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The offline run's history rows as '<prefix>/<field>' -> [(our step, value)] (the step rides as
    '<prefix>/step')."""
    out: dict[str, list] = {}
    for row in history:
        for k, v in row.items():
            prefix = k.split("/")[0]
            if "/" in k and not k.endswith("/step") and f"{prefix}/step" in row and isinstance(v, (int, float)):
                out.setdefault(k, []).append((row[f"{prefix}/step"], float(v)))
    return out


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert [s for s, _ in got[k]] == [s for s, _ in want[k]], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]], rel=1e-6), k


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path]:
    from test_evaluate import save_tiny, write_colour_set

    d = tmp_path_factory.mktemp("classify")
    return save_tiny(d / "tiny.pt"), write_colour_set(d / "data", size=32)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_classifier_commands_feed_trackers_the_records_of_metrics_jsonl(tmp_path, colour_data, command) -> None:
    ckpt, data = colour_data
    out = tmp_path / command
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([command, "--finetune", str(ckpt), "--data_path", str(data), "--input_size", "32", "--epochs", "2",
                 "--warmup_epochs", "1", "--batch_size", "8", "--output_dir", str(out), "--device", "cpu",
                 "--num_workers", "0", "--print_freq", "1", "--log_wandb", "--wandb_mode", "offline",
                 "--log_mlflow", db]) == 0
    want = expected_series(out)
    assert {"train/loss", "train/lr", "epoch/loss", "eval/acc1", "eval/loss"} <= set(want)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    # MLflow: every metric's history equals metrics.jsonl; params are the resolved config
    client = _client(db)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    got = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    _same(got, want)
    assert run.data.params == {k: _param(v) for k, v in _flatten(resolved).items()}
    assert run.info.status == "FINISHED"
    # wandb: the same series in the offline run's history, the resolved config as its config
    wb = read_run(_offline_runs(out)[0])
    _same(wandb_series(wb["history"]), want)
    assert {k: v for k, v in wb["config"].items() if k != "_wandb"} == json.loads(json.dumps(resolved))


def _kinds(path: Path) -> list[str]:
    return [r.WhichOneof("record_type") for r in records(path)]


def _exit_code(path: Path) -> int:
    return next(r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit")


@pytest.mark.slow
def test_sigterm_is_killed_and_preempted_and_the_rerun_continues_to_finished(tmp_path, image_folder,
                                                                             monkeypatch) -> None:
    """Pre-emption: MLflow KILLED and wandb told (preempting record, exit code 75); the rerun puts the same MLflow
    run back to RUNNING, continues both records' steps and ends FINISHED. --wandb_log_checkpoints: each
    checkpoint written is an artifact of the run."""
    out = tmp_path / "run"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [*PRETRAIN, "--data_path", str(image_folder), "--output_dir", str(out), "--epochs", "1",
            "--save_freq_steps", "2", "--log_wandb", "--wandb_mode", "offline", "--wandb_log_checkpoints",
            "--log_mlflow", db]
    real = Trainer._call_hooks
    seen: list[str] = []

    def sigterm_at_step_2(self, name, *args):
        real(self, name, *args)
        if name == "on_step_end" and self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_call_hooks", sigterm_at_step_2)
    assert main(argv) == 75
    ids = json.loads((out / "trackers.json").read_text())
    client = _client(db)
    run_id = ids["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    first = _offline_runs(out)
    assert len(first) == 1
    kinds = _kinds(first[0])
    assert "preempting" in kinds and _exit_code(first[0]) == 75
    arts = [r.artifact for r in records(first[0]) if r.WhichOneof("record_type") == "artifact"]
    assert arts and all(a.type == "model" for a in arts)
    assert any("step-2" in a.aliases for a in arts), [list(a.aliases) for a in arts]
    steps1 = _steps(out)
    assert [s["step"] for s in steps1] == [1, 2]

    def status_while_running(self, name, *args):
        real(self, name, *args)
        if name == "on_step_end" and not seen:
            seen.append(client.get_run(run_id).info.status)

    monkeypatch.setattr(Trainer, "_call_hooks", status_while_running)
    assert main(argv) == 0
    assert seen == ["RUNNING"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = _steps(out)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [s["step"] for s in steps] \
        == [1, 2, 3, 4]
    second = [p for p in _offline_runs(out) if p != first[0]]
    assert len(second) == 1
    rec = read_run(second[0])
    assert rec["run"].run_id == ids["wandb"]["id"] and "preempting" not in _kinds(second[0])
    assert _exit_code(second[0]) == 0
    assert [h["train/step"] for h in rec["history"] if "train/loss" in h] == [3, 4]
    aliases = {al for r in records(second[0]) if r.WhichOneof("record_type") == "artifact" for al in r.artifact.aliases}
    assert {"step-4", "final"} <= aliases, aliases
