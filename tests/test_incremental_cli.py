"""`mimkit incremental` end to end: forgetting shows in the printed table, resume is bitwise, bad input is one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from test_incremental import write_fake_cifar

TINY = ["incremental", "--data_path", "digits", "--tasks", "2", "--nf", "4", "--input_size", "8", "--epochs", "2",
        "--batch_size", "64", "--device", "cpu", "--print_freq", "1000", "logging.tensorboard=false"]


def _run(args: list[str], out: Path) -> int:
    return main([*args, "--output_dir", str(out)])


@pytest.mark.slow
def test_ce_forgets_and_printed_table_matches_results(tmp_path, capsys):
    out = tmp_path / "ce"
    assert _run(TINY + ["--method", "ce", "logging.tensorboard=true"], out) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    rows = res["per_task"]
    assert len(rows) == 2 and res["classes_per_task"] == [5, 5]
    assert rows[1]["acc"][0] < rows[0]["acc"][0]  # naive CE forgets the first task's classes
    assert res["metrics"]["forgetting"] == pytest.approx(rows[0]["acc"][0] - rows[1]["acc"][0])
    assert res["metrics"]["bwt"] == pytest.approx(-res["metrics"]["forgetting"])
    table = {int(m.group(1)): [float(v) for v in m.group(2).split()]
             for m in re.finditer(r"^task (\d+)\s+([\d.\s-]+?)\s*$", printed.replace(" -", ""), re.M)}
    for i, r in enumerate(rows):  # the printed numbers are the saved ones
        assert table[i][:len(r["acc"])] == pytest.approx([round(a, 2) for a in r["acc"]], abs=0.006)
        assert table[i][-1] == pytest.approx(r["rankme"], abs=0.006)
    assert f"final average accuracy {res['metrics']['final_average_accuracy']:.2f}%" in printed
    for name in ("accuracy_matrix.csv", "per_task.csv", "incremental.png", "incremental.json", "config.yaml"):
        assert (out / name).is_file()
    assert any((out / "tb").iterdir())
    csv_rows = (out / "accuracy_matrix.csv").read_text().splitlines()
    assert csv_rows[0] == "stage,task_0,task_1" and csv_rows[2].startswith("after_task_1,")


def _same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert ca["extra"].keys() == cb["extra"].keys()

    def flat(x, prefix=""):
        if torch.is_tensor(x):
            yield prefix, x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}.{k}")

    ea, eb = dict(flat(ca["extra"])), dict(flat(cb["extra"]))
    assert ea.keys() == eb.keys() and ea
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--method", "kd,er", "--buffer_size", "50"],
                                    ["--method", "mask,er", "--ema_mode", "ema", "--buffer_size", "50"]])
def test_resume_between_tasks_and_mid_task_is_bitwise(tmp_path, method):
    args = TINY + method + ["--save_freq_steps", "3", "--keep_last_n", "0"]
    straight = tmp_path / "straight"
    assert _run(args, straight) == 0
    final = straight / "checkpoints" / "task-1" / "final.pt"
    rows = json.loads((straight / "incremental.json").read_text())["rows"]

    def killed_copy(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(straight, run)
        state = json.loads((run / "incremental.json").read_text())
        state["rows"] = state["rows"][:1]  # task 1 never finished
        (run / "incremental.json").write_text(json.dumps(state))
        (run / "results.json").unlink()
        return run

    # killed between tasks: task 1 restarts from task 0's final weights, teacher and buffer
    between = killed_copy("between")
    shutil.rmtree(between / "checkpoints" / "task-1")
    assert _run(args, between) == 0
    _same_checkpoint(final, between / "checkpoints" / "task-1" / "final.pt")
    assert json.loads((between / "incremental.json").read_text())["rows"] == rows

    # killed in the middle of an epoch of task 1: resume from that step checkpoint
    mid = killed_copy("mid")
    task_dir = mid / "checkpoints" / "task-1"
    steps = sorted((int(p.name.split("-")[1]), p) for p in task_dir.glob("step-*"))
    inside = [p for _, p in steps if torch.load(p / "model.pt", weights_only=True)["data_position"]["batch"] > 0]
    assert inside, "no mid-epoch checkpoint to resume from"
    ckpt = inside[0] / "model.pt"
    assert "ReservoirBuffer" in torch.load(ckpt, weights_only=True)["extra"]
    (task_dir / "final.pt").unlink()
    (task_dir / "latest.pt").unlink()
    shutil.copyfile(ckpt, task_dir / "latest.pt")
    assert _run(args, mid) == 0
    log = (mid / "log.txt").read_text()  # the task is announced first, then where in it the run resumes
    assert -1 < log.rfind("task 1: classes") < log.rfind("task 1: resumed at epoch")
    _same_checkpoint(final, task_dir / "final.pt")
    assert json.loads((mid / "incremental.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_fake_cifar10_folder_runs(tmp_path):
    root = write_fake_cifar(tmp_path / "cifar")
    out = tmp_path / "run"
    args = ["incremental", "--data_path", str(root), "--tasks", "2", "--nf", "4", "--input_size", "8", "--epochs",
            "1", "--batch_size", "16", "--method", "er", "--buffer_size", "20", "--device", "cpu",
            "logging.tensorboard=false"]
    assert _run(args, out) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["classes_per_task"] == [5, 5] and len(res["accuracy_matrix"]["matrix"]) == 2


@pytest.mark.parametrize("extra,fragment", [
    (["--tasks", "11"], "more than the 10 classes"),
    (["--method", "lwf"], "unknown method 'lwf'"),
    (["--ema_mode", "swa"], "incremental.ema_mode"),
    (["--mask_mode", "x"], "incremental.mask_mode"),
    (["--inv_mode", "v3"], "incremental.inv_mode"),
    (["--mask_ratio", "1.0"], "mask_ratio"),
    (["--eval_teacher"], "--ema_mode"),
    (["--dataset", "cifar10"], "not a complete CIFAR-10 folder"),
    (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "data.mean has 2 value(s)"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, fragment):
    args = list(TINY)
    if "--dataset" in extra:
        (tmp_path / "empty").mkdir()
        args[args.index("digits")] = str(tmp_path / "empty")
    try:
        rc = _run(args + extra, tmp_path / "out")
    except SystemExit as e:  # refused while parsing (a flag's value): argparse exits 2
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("(`mimkit incremental --help`")]
    assert fragment in err and len(lines) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing started


def test_help_shows_defaults_and_ema_convention(capsys):
    with pytest.raises(SystemExit):
        main(["incremental", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "weighting the NEW value (mmengine's convention)" in text
    assert "(default: ce)" in text and "(default: 0.1)" in text and "(default: slim_resnet18)" in text


def write_tiny_mae(path: Path) -> Path:
    """A mimkit-format checkpoint of a 2-block, 32-dim MAE at 32 px (patch 8)."""
    from mimkit import __version__
    from mimkit.models import create_model

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
              "decoder_depth": 1, "decoder_num_heads": 2}
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, **kwargs)
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 1, "mimkit_version": __version__,
                "config": {"model": {"type": "mae_vit_tiny_patch16", "kwargs": kwargs},
                           "data": {"input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}},
               path)
    return path


@pytest.mark.slow
def test_mae_vit_encoder_backbone(tmp_path):
    from mimkit.tasks.incremental.model import build_classifier

    ckpt = write_tiny_mae(tmp_path / "mae.pt")
    net, desc = build_classifier("slim_resnet18", None, str(ckpt), 32, 2)
    assert net.feat_dim == 32 and "mae_vit_tiny_patch16" in desc
    assert not any(n.startswith("backbone.encoder.decoder") for n, _ in net.named_parameters())
    sd = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(net.backbone.encoder.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 2)
    out = tmp_path / "run"
    args = ["incremental", "--finetune", str(ckpt), "--tasks", "2", "--input_size", "32", "--epochs", "1",
            "--batch_size", "64", "--opt", "adamw", "--lr", "1e-3", "--device", "cpu", "logging.tensorboard=false"]
    assert _run(args, out) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["per_task"]) == 2 and "mae_vit_tiny_patch16" in res["model"]
    assert res["config"]["data"]["mean"] == [0.5, 0.5, 0.5]  # the encoder's own normalisation is adopted
    assert res["config"]["data"]["std"] == [0.25, 0.25, 0.25]


@pytest.mark.slow
def test_short_run_eval_accuracy_matches_the_trained_weights(tmp_path):
    """1 epoch (18 steps) on task 0: BatchNorm running averages alone read chance (50 %) in eval mode; with the
    statistics recomputed (PreciseBN) the reported accuracy is what the trained weights give."""
    from mimkit.data.datasets import collate_batch
    from mimkit.tasks.incremental import data as ID
    from mimkit.tasks.incremental.model import build_classifier

    out = tmp_path / "short"
    args = ["incremental", "--data_path", "digits", "--init_classes", "2", "--increment", "8", "--nf", "8",
            "--input_size", "16", "--epochs", "1", "--batch_size", "16", "--device", "cpu", "--print_freq", "1000",
            "logging.tensorboard=false"]
    assert _run(args, out) == 0
    reported = json.loads((out / "results.json").read_text())["per_task"][0]["acc"][0]
    _, val_tf = ID.transforms(16, 4, False)
    _, val, _ = ID.open_data("digits", "auto", val_tf, val_tf)
    task0 = ID.task_subsets(val, ID.TaskSplit(ID.class_order(10, 0), [2, 8]))[0]
    net, _ = build_classifier("slim_resnet18", 8, None, 16, 2)
    net.load_state_dict(torch.load(out / "checkpoints" / "task-0" / "final.pt", weights_only=True)["model"])
    batch = collate_batch([task0[i] for i in range(len(task0))])
    with torch.no_grad():  # eval mode first: a train-mode forward moves the running statistics
        evaluated = (net.eval()(batch["images"]).argmax(1) == batch["labels"]).float().mean().item() * 100
        # what the weights give with the held-out images' own batch statistics
        own = (net.train()(batch["images"]).argmax(1) == batch["labels"]).float().mean().item() * 100
    assert reported == pytest.approx(evaluated, abs=1e-4)  # the saved statistics are the evaluated ones
    assert own > 70 and reported > 70 and abs(reported - own) <= 10


@pytest.mark.slow
def test_resume_refuses_other_settings_and_no_auto_resume_moves_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--epochs", "1"]
    assert _run(args, out) == 0
    results = (out / "results.json").read_text()
    capsys.readouterr()

    # run-defining settings changed: one line naming each (old -> new) and the ways on, before any work
    assert _run(args + ["--batch_size", "32", "--momentum", "0.5", "--input_size", "16"], out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for part in ("optimization.batch_size 64 -> 32", "optimization.momentum 0.9 -> 0.5", "data.input_size 8 -> 16",
                 "--output_dir", "--no_auto_resume"):
        assert part in err, part
    assert (out / "results.json").read_text() == results  # nothing written

    # where it runs and the schedule may change (as pretrain): a log line
    assert _run(TINY + ["--epochs", "2", "--print_freq", "7"], out) == 0
    log = (out / "log.txt").read_text()
    assert "schedule.epochs 1 -> 2" in log and "logging.print_freq 1000 -> 7" in log
    res = json.loads((out / "results.json").read_text())
    # the run is finished: said plainly, nothing trained, nothing recorded as applied
    assert "the run is finished (all 2 tasks done): nothing to train" in log and "new --output_dir" in log
    assert "from task 2" not in log and res["resume_changes"] == []
    assert res["per_task"] == json.loads(results)["per_task"]  # the finished tasks are the earlier ones

    # --no_auto_resume: the earlier run's files are moved aside (nothing mixed, nothing lost), said in the log
    assert _run(args + ["--batch_size", "32", "--no_auto_resume"], out) == 0
    earlier = list((out / "earlier").iterdir())
    assert len(earlier) == 1 and json.loads((earlier[0] / "results.json").read_text())["per_task"] == res["per_task"]
    assert (earlier[0] / "checkpoints" / "task-1" / "final.pt").is_file() and (earlier[0] / "log.txt").is_file()
    new = json.loads((out / "results.json").read_text())
    assert new["config"]["optimization"]["batch_size"] == 32 and new["resume_changes"] == []
    log = (out / "log.txt").read_text()
    assert f"were moved to {earlier[0]}" in log and log.count("after task 0:") == 1
    assert len(json.loads((out / "incremental.json").read_text())["rows"]) == 2


def test_every_flag_shows_its_default_and_no_auto_resume_reads_plainly():
    import argparse

    from mimkit.commands import build_parser, with_default
    from mimkit.commands import subparser as _subparser

    sp = _subparser(build_parser(), "incremental")
    for action in sp._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS and "-h" not in action.option_strings:
            assert "default" in with_default(action), action.option_strings  # --world_size, --log_dir too
    helps = {a.option_strings[0]: with_default(a) for a in sp._actions if a.option_strings}
    assert "(default: resume)" in helps["--no_auto_resume"] and "True" not in helps["--no_auto_resume"]
    assert "runs/incremental/" in helps["--output_dir"]


def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import mimkit.cli as cli
    from mimkit.tasks.incremental import data as ID

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ID, "open_data", interrupted)  # Ctrl-C while the data loads
    assert _run(TINY, tmp_path / "out") == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    monkeypatch.setattr(cli, "build_parser", interrupted)  # Ctrl-C while the command modules import
    assert cli.main(["incremental", "--help"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "mimkit: interrupted while starting; nothing was written"


@pytest.mark.slow
def test_two_process_gloo_smoke(tmp_path):
    """torchrun, 2 CPU processes (gloo), kd + er: both tasks train, rank 0 alone writes one run folder."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimkit",
           *TINY, "--epochs", "1", "--batch_size", "32", "--method", "kd,er", "--buffer_size", "50", "--amp", "off",
           "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [len(row["acc"]) for row in res["per_task"]] == [1, 2]
    assert all(0 <= a <= 100 for row in res["per_task"] for a in row["acc"])
    assert (out / "checkpoints" / "task-1" / "final.pt").is_file()
    assert r.stdout.count("final average accuracy") == 1  # printed once (rank 0), not per rank


@pytest.mark.parametrize("path,demo", [("runs/demo", True), ("elsewhere/run", False)])
def test_finetune_not_found_says_where_such_a_path_comes_from(tmp_path, monkeypatch, capsys, path, demo):
    monkeypatch.chdir(tmp_path)
    assert _run(TINY + ["--finetune", path], tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint not found: {path}" in err
    assert f"mimkit pretrain --output_dir {path}" in err and ("make demo" in err) == demo
    assert not (tmp_path / "out").exists()  # refused before any work


def test_max_steps_caps_each_task_and_the_estimate_says_this_task_then_all_once(tmp_path):
    out = tmp_path / "capped"
    assert _run(TINY + ["--method", "ce", "--max_steps", "3"], out) == 0
    rows = json.loads((out / "incremental.json").read_text())["rows"]
    assert [r["end_step"] for r in rows] == [3, 6]  # 3 optimiser steps per task on one step axis (22 uncapped)
    for k in range(2):
        assert torch.load(out / "checkpoints" / f"task-{k}" / "final.pt", weights_only=True)["step"] == 3 * (k + 1)
    log = (out / "log.txt").read_text()
    assert "estimated time of this task (1 of 2):" in log and "estimated time of this task (2 of 2):" in log
    assert log.count("estimated time of the 2 tasks still to train") == 1
    assert "(6 iterations at" in log  # 3 capped iterations of each of the two tasks
    assert "estimated time of the whole run" not in log
    assert "stopping at misc.max_steps = 3 optimiser steps (step 6)" in log  # the cap the user typed, per task
