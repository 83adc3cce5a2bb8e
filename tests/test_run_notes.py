"""What a run tells its user (issue 10, items 5 and 8): estimates, warnings, notes, percentages, exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_images
from test_evaluate import save_tiny, write_colour_set

from mimkit.cli import main
from mimkit.engine import logging as L


def _pretrain(out: Path, data: Path, *extra: str) -> int:
    return main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(out), "--batch_size", "4",
                 "--num_workers", "0", "--epochs", "1", "--max_steps", "1", "logging.tensorboard=false", *extra])


# ---------------------------------------------------------------------------------------------- estimates
def test_whole_run_estimate_and_run_eta(tmp_path: Path, monkeypatch) -> None:
    clock = iter(np.arange(0.0, 1000.0, 2.0))  # every perf_counter call advances 2 s
    monkeypatch.setattr(L.time, "perf_counter", lambda: float(next(clock)))
    run = L.RunLogger(tmp_path, tensorboard=False, print_freq=1)
    run.slow_hint = "pretrain/cpu_small.yaml fits"
    run.tty = False
    run.start_run(10_000, "cpu")
    run.start_epoch(0, 10_000)
    for i in range(6):
        run.progress(i, {"loss": 1.0})
    run.close()
    log = (tmp_path / "log.txt").read_text()
    m = re.search(r"estimated time of the whole run: (\d+) h (\d+) min \(10,000 iterations at ([\d.]+) s each", log)
    assert m and float(m.group(3)) > 0
    assert "that is hours on a CPU: pretrain/cpu_small.yaml fits" in log
    assert re.search(r"epoch eta [\w ]+  run eta \d+ h \d+ min", log)


def test_refined_estimate_counts_each_epochs_start_up_and_evaluation(tmp_path: Path, monkeypatch) -> None:
    """Three epochs of 10 iterations, each 1 s an iteration plus 1 s of loader start-up and 3 s of evaluation after
    its last iteration (14 s an epoch): after the second epoch the estimate is the true 42 s, where iterations
    alone (1 s each) would say about 30; the measured time is recorded beside it (log.txt's timing records)."""
    now = [0.0]
    monkeypatch.setattr(L.time, "perf_counter", lambda: now[0])
    run = L.RunLogger(tmp_path, tensorboard=False, print_freq=100)
    run.tty = False
    run.start_run(30, "cpu")
    for epoch in range(3):
        run.start_epoch(epoch, 10)
        now[0] += 1.0  # the data loader's first batch
        for i in range(10):
            now[0] += 1.0
            run.progress(i, {"loss": 1.0})
        run.end_epoch()
        now[0] += 3.0  # evaluation, pictures, a checkpoint
    run.close()
    log = (tmp_path / "log.txt").read_text()
    records = [json.loads(x.split(L.RunLogger.TIMING)[1]) for x in log.splitlines() if L.RunLogger.TIMING in x]
    assert not any('"kind": "estimate"' in x for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    est = {r["basis"]: r for r in records if r["kind"] == "estimate"}
    assert est["epochs"]["total_s"] == pytest.approx(42.0) and est["epochs"]["left_s"] == pytest.approx(14.0)
    assert est["iterations"]["total_s"] == pytest.approx(30.0)  # the early one: iterations 2-4 only
    assert [r["seconds"] for r in records if r["kind"] == "run_time"] == [pytest.approx(42.0)]
    assert "refined after epoch 2 with each epoch's start-up and evaluation" in log
    assert ("estimated time of the whole run, refined after epoch 2: under a minute (14 s left: 10 iterations at "
            "1 s and 1 epoch start(s) at 4 s for the data loader, evaluation and checkpoints)") in log


def test_no_hint_for_a_short_run(tmp_path: Path) -> None:
    run = L.RunLogger(tmp_path, tensorboard=False)
    run.slow_hint, run.tty = "never shown", False
    run.start_run(6, "cpu")
    run.start_epoch(0, 6)
    for i in range(6):
        run.progress(i, {"loss": 1.0})
    run.close()
    log = (tmp_path / "log.txt").read_text()
    assert "estimated time of the whole run" in log and "never shown" not in log


def test_too_few_images_names_the_cpu_preset(tmp_path: Path, capsys) -> None:
    data = tmp_path / "imgs"
    write_images(data, 18)
    assert main(["pretrain", "--data_path", str(data), "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "fewer than one batch of 64" in err and "pretrain/cpu_small.yaml" in err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_cpu_small_preset_builds_the_demo_model() -> None:
    from mimkit.cli import build_parser
    from mimkit.tasks.pretrain import config_from_args

    cfg = config_from_args(build_parser().parse_args(["pretrain", "pretrain/cpu_small.yaml", "--data_path", "/d"]))
    assert cfg.model.type == "mae_vit_demo_patch8" and cfg.data.input_size == 64 and cfg.misc.preset is None


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_builtin_digits_take_their_cpu_preset_unless_a_file_is_given(command: str) -> None:
    from mimkit.cli import build_parser
    from mimkit.config import config_from_args
    from mimkit.tasks.evaluation import config as EC

    flags, schema, presets = {"linprobe": (EC.LINPROBE_FLAGS, EC.LinprobeConfig, EC.LINPROBE_PRESETS),
                              "finetune": (EC.FINETUNE_FLAGS, EC.FinetuneConfig, EC.FINETUNE_PRESETS)}[command]

    def cfg_of(*argv):
        args = build_parser().parse_args([command, *argv])
        return config_from_args(args, flags, schema, demo_preset=None, data_presets=presets)

    cfg = cfg_of("--finetune", "x.pt", "--data_path", "digits", "--epochs", "3")
    assert cfg.misc.preset == f"{command}/digits.yaml" and cfg.data.input_size == 32 and cfg.schedule.epochs == 3
    assert cfg_of("--finetune", "x.pt", "--data_path", "/imagenet").data.input_size == 224  # official recipe
    assert cfg_of("--finetune", "x.pt", "--data_path", "/imagenet").misc.preset is None


# ---------------------------------------------------------------------------------------------- warnings
def test_freezing_a_random_model_warns(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    write_images(data, 8)
    assert _pretrain(tmp_path / "r", data, "--freeze_mode", "layernorm_only") == 0
    assert "freeze_mode layernorm_only on a randomly initialised model" in (tmp_path / "r/log.txt").read_text()
    assert _pretrain(tmp_path / "r2", data) == 0
    assert "randomly initialised" not in (tmp_path / "r2/log.txt").read_text()


def test_small_images_warned_once_with_the_count(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    write_images(data, 6, size=24, classes=2)
    write_images(data / "class2", 2, size=48, seed=1)
    assert _pretrain(tmp_path / "r", data, "--input_size", "32") == 0
    log = (tmp_path / "r/log.txt").read_text()
    assert log.count("smaller than the 32x32 input") == 1 and "warning: 6 image(s) are smaller" in log


def test_examples_that_freeze_start_from_the_demo_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["examples", "--dry_run", "2b"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "$ mimkit pretrain --output_dir runs/demo" in lines
    assert lines[-1] == ("$ mimkit continual continual/all_layernorms.yaml --continual_checkpoint "
                         "runs/demo/checkpoints/final.pt")
    assert main(["examples", "--dry_run", "2b", "--data_path", "/mine"]) == 0  # the user's data: as written
    assert capsys.readouterr().out.strip() == "$ mimkit continual continual/all_layernorms.yaml --data_path /mine"
    assert main(["examples", "--dry_run", "1"]) == 0  # nothing frozen: the demo as before
    assert capsys.readouterr().out.strip() == "$ mimkit continual continual/basic.yaml"


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.fixture
def probe_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    ckpt = save_tiny(tmp_path / "tiny.pt")
    data = write_colour_set(tmp_path / "data")
    out = tmp_path / "probe"
    assert main(["linprobe", "--finetune", str(ckpt), "--data_path", str(data), "--epochs", "1", "--batch_size", "8",
                 "--output_dir", str(out), "--device", "cpu", "--num_workers", "999", "--opt", "sgd",
                 "--input_size", "32", "logging.tensorboard=false"]) == 0
    return ckpt, data, out


def test_linprobe_caps_workers_and_exports(probe_run, tmp_path: Path) -> None:
    import os

    _, _, out = probe_run
    log = (out / "log.txt").read_text()
    assert f"data.num_workers 999 > {os.cpu_count()} CPU cores: using {os.cpu_count()}" in log
    for fmt in ("torchscript", "safetensors"):
        target = tmp_path / f"probe.{fmt}"
        assert main(["export", str(out / "checkpoints/final.pt"), "--format", fmt, "--output", str(target)]) == 0
        record = json.loads(Path(str(target) + ".export.json").read_text())
        assert record["kind"] == "classifier" and record["ok"] and record["output_shape"][1] == 3  # 3 classes


@pytest.mark.slow
def test_finetune_eval_resume_takes_the_runs_input_size(tmp_path: Path) -> None:
    ckpt = save_tiny(tmp_path / "tiny.pt", size=32)
    data = write_colour_set(tmp_path / "data", size=48)
    out = tmp_path / "ft"
    assert main(["finetune", "--finetune", str(ckpt), "--data_path", str(data), "--epochs", "1", "--batch_size", "8",
                 "--input_size", "32", "--output_dir", str(out), "--num_workers", "0", "--aa", "none",
                 "--reprob", "0", "--cls_token", "logging.tensorboard=false"]) == 0
    ev = tmp_path / "ev"
    assert main(["finetune", "--eval", "--resume", str(out / "checkpoints/best.pt"), "--data_path", str(data),
                 "--output_dir", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["config"]["data"]["input_size"] == 32 and res["config"]["model"]["global_pool"] is False
    trained = json.loads((out / "results.json").read_text())
    assert res["metrics"]["acc1"] == pytest.approx(trained["metrics"]["acc1"])
    assert 0 <= res["metrics"]["acc1"] <= 100


def test_hf_export_prints_no_progress_bars(tmp_path: Path, capfd) -> None:
    pytest.importorskip("transformers")
    ckpt = save_tiny(tmp_path / "tiny.pt")
    assert main(["export", str(ckpt), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    captured = capfd.readouterr()
    assert "it/s" not in captured.err and "Loading" not in captured.err and "%|" not in captured.err


# ---------------------------------------------------------------------------------------------- continual
def test_continual_reports_once_per_stage_and_in_percent(tmp_path: Path) -> None:
    ckpt = save_tiny(tmp_path / "tiny.pt")
    a = write_colour_set(tmp_path / "a", classes=2)
    b = write_colour_set(tmp_path / "b", classes=2)
    out = tmp_path / "seq"
    assert main(["continual", "--continual_checkpoint", str(ckpt), "--domains", str(a), str(b)][:3] +
                ["--output_dir", str(out), "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
                 "--warmup_epochs", "0", "logging.tensorboard=false", "logging.vis_freq_epochs=0",
                 "continual.knn_k=3", "--domains", str(a), str(b)]) == 0
    log = (out / "log.txt").read_text()
    assert log.count("loaded mimkit weights") == 3  # the starting weights, then once per stage
    accs = [float(x) for x in re.findall(r"knn_acc ([\d.]+)%", log)]
    assert accs and all(0 <= v <= 100 for v in accs) and max(accs) > 1  # percentages, as every command
    rows = (out / "knn_acc.csv").read_text().splitlines()
    assert rows[1].startswith("initial,") and len(rows) == 4
    assert "k-NN accuracy (%)" in log


def test_matrix_png_has_a_colour_bar(tmp_path: Path) -> None:
    from PIL import Image

    from mimkit.tasks import continual as CT

    names = ["a", "b"]
    ev = lambda r: {n: {"recon_loss": v, "recon_loss_all": v, "knn_acc": 100 * v} for n, v in zip(names, r)}
    state = {"initial": ev([1.0, 0.9]), "stages": [{"name": "a", "eval": ev([0.5, 0.8])},
                                                   {"name": "b", "eval": ev([0.6, 0.4])}]}
    path = CT.heatmap(tmp_path / "m.png", state, names)
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    bar_x = 130 + 92 * len(names) + 14 + 8
    top = 40  # first panel: best at the top (darkest), worst at the bottom (lightest)
    column = px[top + 2: top + 58, bar_x, 0]
    assert column[0] < column[-1] and np.all(np.diff(column) >= 0)
    assert torch.tensor(column).unique().numel() > 10  # a gradient, not a flat box


def test_the_console_log_follows_sys_stdout_after_the_old_one_is_closed(monkeypatch) -> None:
    """A stdout swapped and closed after the logger was made (pytest's capture, wandb's console capture) must not
    turn every later line into a '--- Logging error ---' traceback: the handler writes to the stdout of now."""
    import io
    import sys

    from mimkit.engine.logging import get_logger

    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    log = get_logger()
    log.info("to the first")
    first.close()
    second, errors = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    monkeypatch.setattr(sys, "stderr", errors)
    log.info("to the second")
    assert "to the second" in second.getvalue() and errors.getvalue() == ""


def test_early_notes_reach_log_txt_even_with_a_stray_file_handler(tmp_path) -> None:
    """A FileHandler some earlier run left on the package logger must not swallow this command's early notes."""
    import logging

    from mimkit.engine.logging import RunLogger, early_notes, get_logger

    log = get_logger()
    stray = logging.FileHandler(tmp_path / "stray.txt")
    log.addHandler(stray)
    try:
        with early_notes():
            log.warning("a note said before the run folder exists")
            run = RunLogger(tmp_path / "run", tensorboard=False)
            run.close()
    finally:
        log.removeHandler(stray)
        stray.close()
    assert "a note said before the run folder exists" in (tmp_path / "run" / "log.txt").read_text()
