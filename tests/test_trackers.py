"""Experiment trackers with the real libraries and no network: wandb offline (its run-<id>.wandb records read back
with wandb's protobuf definitions), MLflow on a sqlite store in tmp_path (read back with MlflowClient)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_MODEL
from mimkit.cli import main
from mimkit.engine.logging import RunLogger
from mimkit.engine.trackers import _flatten, _param
from wandb_records import read_run, records

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No login, no network, nothing outside tmp_path: a home without netrc, wandb's folders in tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "NETRC",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == "step"]


PRETRAIN = ["pretrain", *TINY_MODEL, "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--amp", "off",
            "--print_freq", "1", "--warmup_epochs", "0", "--save_freq_epochs", "1"]


@pytest.mark.slow
def test_pretrain_wandb_offline_and_mlflow_record_the_run_and_a_resume_continues_it(tmp_path, image_folder):
    out = tmp_path / "run"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*PRETRAIN, "--data_path", str(image_folder), "--output_dir", str(out), "--log_wandb", "--wandb_mode",
            "offline", "--experiment_name", "MAEPretraining", "--wandb_run_name", "pretrain_mae", "--wandb_tags",
            "mae,tiny", "--log_mlflow", db]
    assert main([*args, "--epochs", "1"]) == 0
    ids = json.loads((out / "trackers.json").read_text())
    first = _offline_runs(out)
    assert len(first) == 1
    rec = read_run(first[0])
    steps = _steps(out)
    assert len(steps) == 4  # 16 images / batch 4, a line each (print_freq 1)
    # wandb: the run, the resolved config, the history of the logged steps, the final loss equal to metrics.jsonl's
    assert rec["run"].run_id == ids["wandb"]["id"] and rec["run"].project == "MAEPretraining"
    assert rec["run"].display_name == "pretrain_mae" and list(rec["run"].tags) == ["mae", "tiny"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: v for k, v in rec["config"].items() if k != "_wandb"} == json.loads(json.dumps(resolved))
    hist = [h for h in rec["history"] if "train/loss" in h]
    assert [h["train/step"] for h in hist] == [r["step"] for r in steps]
    np.testing.assert_allclose([h["train/loss"] for h in hist], [r["loss"] for r in steps], rtol=1e-6)
    assert hist[-1]["train/loss"] == pytest.approx(steps[-1]["loss"], rel=1e-6)
    assert any(k.startswith("media/reconstruction") or k.startswith("reconstruction") for h in rec["history"]
               for k in h), "the reconstruction picture"
    # no --wandb_log_checkpoints: checkpoints were written (save_freq_epochs 1) but no artifact is recorded
    assert (out / "checkpoints/final.pt").exists()
    assert not [r for r in records(first[0]) if r.WhichOneof("record_type") in ("artifact", "use_artifact")]
    # MLflow: metric history equal to metrics.jsonl, params equal to the resolved config, pictures as artifacts
    client = _client(db)
    run_id = ids["mlflow"]["run_id"]
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [r["step"] for r in steps]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    params = client.get_run(run_id).data.params
    assert params == {k: _param(v) for k, v in _flatten(resolved).items()}
    pictures = [f.path for f in client.list_artifacts(run_id, "reconstruction")]
    assert pictures and all(p.endswith(".png") for p in pictures)

    # resume with one more epoch: the same wandb id and MLflow run, steps continuing
    assert main([*args, "--epochs", "2"]) == 0
    runs = _offline_runs(out)
    assert len(runs) == 2
    again = read_run(runs[1] if runs[0] == first[0] else runs[0])
    assert again["run"].run_id == rec["run"].run_id
    steps2 = _steps(out)[len(steps):]
    hist2 = [h for h in again["history"] if "train/loss" in h]
    assert [h["train/step"] for h in hist2] == [r["step"] for r in steps2] and hist2[0]["train/step"] > steps[-1]["step"]
    # wandb's own row counter continues too (a synced run drops rows whose _step is not past the last one)
    assert min(h["_step"] for h in again["history"]) > max(h["_step"] for h in rec["history"])
    assert json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    assert len(client.search_runs([client.get_experiment_by_name("MAEPretraining").experiment_id])) == 1
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [r["step"] for r in steps + steps2]
    assert client.get_run(run_id).info.status == "FINISHED"
    # the changed epochs stays the first value (params are immutable) and the new one is noted as a tag
    assert client.get_run(run_id).data.tags["resumed.schedule.epochs"] == "2"
    # the start-up lines: both trackers say "(resumed)" on the second run only
    lines = [x for x in (out / "log.txt").read_text().splitlines() if "wandb: " in x and "logging offline" in x]
    assert len(lines) == 2 and "(resumed)" not in lines[0] and f"/{ids['wandb']['id']}) (resumed)" in lines[1]
    # the store's Default experiment keeps its artifacts beside the database, not in ./mlruns of the cwd
    default = client.get_experiment("0")
    assert default.artifact_location == (tmp_path / "mlartifacts/0").resolve().as_uri()


def test_missing_package_is_one_line_naming_the_extra_before_any_work(tmp_path, image_folder, capsys, monkeypatch):
    for package in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, package, None)  # importlib finds no such package
        out = tmp_path / package
        flag = "--log_wandb" if package == "wandb" else "--log_mlflow"
        assert main([*PRETRAIN, "--data_path", str(image_folder), "--output_dir", str(out), flag]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pip install 'mimkit[{package}]'" in err, err
        assert not out.exists()
        monkeypatch.delitem(sys.modules, package)


def _logger(run_dir: Path, **tracking) -> RunLogger:
    return RunLogger(run_dir, print_freq=1, tracking={"tensorboard": False, **tracking}, config={"a": {"b": 1}})


def test_online_without_login_or_network_logs_offline_in_one_line(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    run = _logger(tmp_path / "nologin", wandb={"enabled": True, "mode": "online"})
    run.metrics({"loss": 0.5}, 3)
    run.close()
    log = (tmp_path / "nologin/log.txt").read_text()
    assert "no wandb login" in log and "logging offline" in log and "wandb sync" in log
    assert read_run(_offline_runs(tmp_path / "nologin")[0])["history"][0]["train/loss"] == 0.5
    # a login but the server unreachable (a closed local port): offline too, without waiting on the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    run = _logger(tmp_path / "nonet", wandb={"enabled": True, "mode": "online"})
    run.metrics({"loss": 0.25}, 4)
    run.close()
    log = (tmp_path / "nonet/log.txt").read_text()
    assert "unreachable" in log and "logging offline" in log
    assert read_run(_offline_runs(tmp_path / "nonet")[0])["history"][0]["train/loss"] == 0.25
    assert time.perf_counter() - t0 < 120


def test_wandb_mode_from_environment_and_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = _logger(tmp_path / "off", wandb={"enabled": True})
    run.metrics({"loss": 0.5}, 1)
    run.close()
    assert not (tmp_path / "off/wandb").exists() and "wandb: disabled" in (tmp_path / "off/log.txt").read_text()
    # the flag beats the environment
    run = _logger(tmp_path / "on", wandb={"enabled": True, "mode": "offline"})
    run.close()
    assert len(_offline_runs(tmp_path / "on")) == 1


def test_unwritable_tracking_uri_is_one_line_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = _logger(tmp_path / "run", mlflow={"enabled": True, "tracking_uri": f"sqlite:///{blocker}/sub/mlflow.db"})
    run.metrics({"loss": 0.5}, 1)
    run.close()
    log = (tmp_path / "run/log.txt").read_text().splitlines()
    lines = [x for x in log if "mlflow:" in x]
    assert len(lines) == 1 and "cannot start" in lines[0] and "training goes on" in lines[0], log
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text())["loss"] == 0.5


def test_tables_reach_wandb_and_mlflow(tmp_path):
    """incremental's accuracy matrix and segment's per-class IoU go through RunLogger.table to every backend."""
    from mimkit.tasks.incremental import report as IR

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunLogger(tmp_path / "run", tracking={"tensorboard": True, "wandb": {"enabled": True, "mode": "offline"},
                                                "mlflow": {"enabled": True, "tracking_uri": db}}, config={})
    rows = [{"classes": [0, 1], "acc": [90.0], "acc_seen": 90.0, "rankme": 3.0},
            {"classes": [2, 3], "acc": [60.0, 80.0], "acc_seen": 70.0, "rankme": 3.5}]
    IR.track(run, rows, 2, 1)
    run.close()
    client = _client(db)
    run_id = json.loads((tmp_path / "run/trackers.json").read_text())["mlflow"]["run_id"]
    table = client.download_artifacts(run_id, "tables/incremental/accuracy_matrix/step_00000001.json",
                                      str(tmp_path / "dl"))
    data = json.loads(Path(table).read_text())["data"]
    assert data == {"after_task": [0, 1], "task_0": [90.0, 60.0], "task_1": [None, 80.0]}
    assert client.get_metric_history(run_id, "incremental/forgetting")[0].value == pytest.approx(30.0)
    wb = read_run(_offline_runs(tmp_path / "run")[0])
    entry = next(h for h in wb["history"] if "incremental/accuracy_matrix/_type" in h)
    assert entry["incremental/accuracy_matrix/_type"] == "table-file" and entry["incremental/step"] == 1
    assert entry["incremental/accuracy_matrix/nrows"] == 2 and entry["incremental/accuracy_matrix/ncols"] == 3


@pytest.mark.slow
def test_segment_logs_per_class_iou_table_equal_to_results(tmp_path):
    from test_segment_cli import TINY as SEG_TINY

    out = tmp_path / "seg"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["segment", *SEG_TINY, "--max_iters", "2", "test.num_overlays=1", "--output_dir", str(out),
                 "--log_mlflow", db]) == 0
    res = json.loads((out / "results.json").read_text())
    client = _client(db)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    files = [f.path for f in client.list_artifacts(run_id, "tables/eval/per_class")]
    got = json.loads(Path(client.download_artifacts(run_id, files[-1], str(tmp_path / "dl"))).read_text())["data"]
    per_class = res["metrics"]["per_class"]
    assert got["class"] == list(per_class)
    for k in ("IoU", "Acc", "Dice"):
        assert got[k] == [per_class[c][k] for c in got["class"]]
    assert client.get_metric_history(run_id, "eval/mIoU")[-1].value == pytest.approx(res["metrics"]["mIoU"])
    assert [f.path for f in client.list_artifacts(run_id, "eval")], "the overlay pictures"


@pytest.mark.slow
def test_two_gloo_ranks_create_exactly_one_run(tmp_path, image_folder):
    worker = Path(__file__).with_name("ddp_worker.py")
    out = tmp_path / "ddp"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), *PRETRAIN[1:], "--data_path", str(image_folder), "--output_dir", str(out), "--epochs", "1",
           "--batch_size", "2", "--log_wandb", "--wandb_mode", "offline", "--log_mlflow", db]
    paths = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_offline_runs(out)) == 1 and not list(Path.cwd().glob("wandb/offline-run-*"))
    client = _client(db)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    steps = _steps(out)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [s["step"] for s in steps]


@pytest.mark.slow
def test_continual_stages_share_the_sequence_run(tmp_path):
    from test_continual import continual, make_domain

    a, b = make_domain(tmp_path / "d", "a", 0), make_domain(tmp_path / "d", "b", 1)
    out = tmp_path / "seq"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert continual(out, "--domains", str(a), str(b), "--epochs", "1", "--print_freq", "1", "--log_wandb",
                     "--wandb_mode", "offline", "--log_mlflow", db) == 0
    stages = sorted(out.glob("stage-*"))
    assert len(stages) == 2 and not any((s / "wandb").exists() or (s / "trackers.json").exists() for s in stages)
    client = _client(db)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the whole sequence is one run
    run_id = runs[0].info.run_id
    for k, stage in enumerate(stages, 1):
        hist = client.get_metric_history(run_id, f"stage{k}/train/loss")
        assert [(m.step, m.value) for m in hist] == [(r["step"], pytest.approx(r["loss"])) for r in _steps(stage)]
    tables = [f.path for f in client.list_artifacts(run_id, "tables/continual")]
    assert "tables/continual/recon_loss_matrix" in tables
    assert [f.path for f in client.list_artifacts(run_id, "continual/matrix")], "matrix.png"
    wb = read_run(_offline_runs(out)[0])
    assert any("stage2/train/loss" in h for h in wb["history"])
    assert any("continual/recon_loss/average_forgetting" in h for h in wb["history"])


def test_python_api_turns_log_mlflow_true_into_the_bare_flag():
    from mimkit.api import to_words

    assert to_words("pretrain", (), {"log_mlflow": True})[0] == ["--log_mlflow"]
    assert to_words("pretrain", (), {"log_mlflow": "sqlite:///x.db"})[0] == ["--log_mlflow", "sqlite:///x.db"]
    assert to_words("pretrain", (), {"log_mlflow": False, "log_wandb": True})[0] == ["--log_wandb"]


def test_flags_set_the_logging_keys():
    import argparse

    from mimkit.tasks.pretrain import config as PC

    def cfg(*argv):
        p = argparse.ArgumentParser()
        PC.add_arguments(p)
        return PC.config_from_args(p.parse_args(["--data_path", "digits", *argv])).logging

    bare = cfg("--log_mlflow", "--log_wandb", "--experiment_name", "MAEPretraining", "--wandb_tags", "a,b")
    assert bare.mlflow.enabled and bare.mlflow.tracking_uri is None
    assert bare.wandb.enabled and bare.wandb.project == "MAEPretraining" and list(bare.wandb.tags) == ["a", "b"]
    given = cfg("--log_mlflow", "sqlite:///m.db", "--wandb_project", "p", "--wandb_mode", "offline")
    assert given.mlflow.enabled and given.mlflow.tracking_uri == "sqlite:///m.db" and not given.wandb.enabled
    assert given.wandb.project == "p" and given.wandb.mode == "offline"
    assert not cfg().mlflow.enabled and not cfg().wandb.enabled
    from mimkit.errors import ConfigError

    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        cfg("--wandb_mode", "sometimes")
