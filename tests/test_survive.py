"""Runs that survive: signals, rollback on non-finite values, every stop resumable, damaged files, write errors."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from mimkit.cli import main
from mimkit.data.datasets import collate_batch
from mimkit.engine.checkpoint import CheckpointManager
from mimkit.engine.distributed import DistInfo
from mimkit.engine.logging import RunLogger
from mimkit.engine.loop import LoopSettings, Trainer
from mimkit.engine.optim import build_adamw, param_groups, set_lr
from mimkit.engine.signals import GracefulStop
from mimkit.errors import RunInterrupted
from mimkit.models import create_model
from mimkit.tasks.pretrain import pretrain_step
from test_pretrain import assert_bitwise_equal, weights

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("signal_worker.py")
# subprocesses import this checkout's package (not whichever one the venv installed) and the test helpers
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(Path(__file__).parent)])}
TRAIN = [*TINY_MODEL, "--batch_size", "4", "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1",
         "--print_freq", "1", "--device", "cpu", "--seed", "3"]


def pretrain(out: Path, data: Path, *extra: str) -> int:
    return main(["pretrain", *TRAIN, "--data_path", str(data), "--output_dir", str(out), *extra])


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


# ---------------------------------------------------------------------------------------------- signals
def test_first_sigint_asks_to_stop_and_the_second_quits_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)  # a later signal does not replace the first
        assert stop.signum == signal.SIGTERM
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.slow
def test_sigterm_mid_epoch_then_rerun_is_bitwise_the_straight_run(tmp_path: Path, image_folder: Path) -> None:
    # 16 images, batch 4: 4 optimiser steps per epoch; step 6 is in the middle of epoch 1
    common = [*TRAIN, "--data_path", str(image_folder), "--epochs", "3"]

    def launch(out: Path, step: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(WORKER), str(step), "0", *common, "--output_dir", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)

    straight = tmp_path / "straight"
    assert launch(straight, 0).returncode == 0
    split = tmp_path / "split"
    done = launch(split, 6)
    assert done.returncode == 75, done.stderr[-3000:]
    assert "stopped by SIGTERM after optimiser step 6 (epoch 1, iteration 2)" in done.stderr
    assert step_of(split / "checkpoints/latest.pt") == 6
    assert (split / "checkpoints/step-6/model.pt").exists()
    assert not (split / "checkpoints/final.pt").exists()
    stop = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines() if '"stop"' in x]
    assert stop and stop[0]["signal"] == "SIGTERM" and stop[0]["step"] == 6
    # the same command again resumes from latest.pt
    done = launch(split, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "latest.pt at epoch 1, batch 2, step 6" in (split / "log.txt").read_text()
    assert_bitwise_equal(weights(straight / "checkpoints/final.pt"), weights(split / "checkpoints/final.pt"))


@pytest.mark.slow
def test_sigterm_on_one_ddp_rank_stops_both_at_the_same_step_and_resumes_bitwise(tmp_path: Path,
                                                                                  image_folder: Path) -> None:
    # masking on (mask_ratio 0.75): each rank's own RNG must come back for the resumed run to match
    common = [*TRAIN, "--data_path", str(image_folder), "--epochs", "3", "--batch_size", "2"]

    def launch(out: Path, step: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(step), "1", *common, "--output_dir", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400)

    straight = tmp_path / "straight"
    r = launch(straight, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    split = tmp_path / "split"
    r = launch(split, 6)  # only rank 1 gets the signal; the all-reduced flag stops rank 0 too
    assert r.returncode != 0
    assert r.stderr.count("stopped by SIGTERM after optimiser step 6 (epoch 1, iteration 2)") == 2, r.stderr[-3000:]
    ckpt = torch.load(split / "checkpoints/latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng_per_rank"]) == 2
    r = launch(split, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bitwise_equal(weights(straight / "checkpoints/final.pt"), weights(split / "checkpoints/final.pt"))


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_latest_after_a_worker_dies(tmp_path: Path, image_folder: Path) -> None:
    # torch shares the rendezvous store with init_process_group by default, and restarted workers then read the
    # dead round's addresses (pytorch/pytorch#135712, #167288); docs/cluster.md gives this same setting
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(WORKER), "-3", "1", *TRAIN, "--data_path", str(image_folder), "--epochs", "2", "--batch_size", "2",
           "--save_freq_steps", "2", "--output_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints/.died-once").exists()  # rank 1 did die after step 3
    assert "latest.pt at epoch 0, batch 2, step 2" in (out / "log.txt").read_text()
    assert step_of(out / "checkpoints/final.pt") == 8


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_the_cli_with_a_checkpoint(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "run"
    # DataLoader workers get the Ctrl-C too (same process group) and must ignore it
    cmd = [sys.executable, "-m", "mimkit", "pretrain", *TRAIN, "--data_path", str(image_folder), "--output_dir",
           str(out), "--epochs", "1000", "--num_workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 2' in metrics.read_text():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    line = next(ln for ln in err.splitlines() if "stopped by SIGINT after optimiser step" in ln)
    stopped = int(line.split("optimiser step ")[1].split()[0])
    assert stopped >= 2 and step_of(out / "checkpoints/latest.pt") == stopped
    assert "Traceback" not in err


class _SigtermAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_signal_stop_leaves_no_dataloader_workers_behind(tmp_path: Path) -> None:
    """Workers ignore SIGTERM, so the loop stops them itself: none may be left for the interpreter's exit
    (multiprocessing would SIGTERM them there and wait forever)."""
    import multiprocessing

    t = tiny_trainer(tmp_path, poison=set(), num_workers=2)
    t.hooks.append(_SigtermAt(2))
    with pytest.raises(RunInterrupted):
        t.fit()
    t.run.close()
    assert step_of(tmp_path / "checkpoints/latest.pt") == 2
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------- every stop
@pytest.mark.slow
def test_max_steps_leaves_latest_and_more_steps_resume_bitwise(tmp_path: Path, image_folder: Path) -> None:
    straight = tmp_path / "straight"
    assert pretrain(straight, image_folder, "--epochs", "3", "--max_steps", "7") == 0
    split = tmp_path / "split"
    assert pretrain(split, image_folder, "--epochs", "3", "--max_steps", "3") == 0
    assert step_of(split / "checkpoints/latest.pt") == 3 and step_of(split / "checkpoints/final.pt") == 3
    log = (split / "log.txt").read_text()  # a stop inside an epoch is not reported as the epoch done
    assert "epoch 0 stopped after iteration 3/4" in log and "epoch 0 done" not in log
    final_before = (split / "checkpoints/final.pt").read_bytes()
    assert pretrain(split, image_folder, "--epochs", "3", "--max_steps", "3") == 0  # the same command: nothing to do
    assert (split / "checkpoints/final.pt").read_bytes() == final_before
    assert "nothing to train: step 3 already reached misc.max_steps = 3" in (split / "log.txt").read_text()
    assert pretrain(split, image_folder, "--epochs", "3", "--max_steps", "7") == 0
    assert step_of(split / "checkpoints/final.pt") == 7
    assert_bitwise_equal(weights(straight / "checkpoints/final.pt"), weights(split / "checkpoints/final.pt"))


# ---------------------------------------------------------------------------------------------- rollback
def tiny_trainer(tmp: Path, poison: set, **settings) -> Trainer:
    """A tiny MAE on 16 random images (4 steps per epoch); the loss is NaN at the (epoch, iteration) in poison."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    data = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), 0) for i in range(16)]
    opt = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))
    base = pretrain_step(0.75, "masked_only")
    holder: dict = {}

    def step(m, batch):
        loss, logs = base(m, batch)
        st = holder["trainer"].state
        return (loss * float("nan") if (st.epoch, st.batch) in poison else loss), logs

    s = LoopSettings(epochs=3, batch_size=4, on_nonfinite="rollback", save_freq_steps=2, seed=0, **settings)
    run = RunLogger(tmp, tensorboard=False, print_freq=1)
    t = Trainer(model=model, optimizer=opt, dataset=data, collate=collate_batch, step_fn=step,
                lr_schedule=lambda o, e: set_lr(o, 1e-3), settings=s, dist=DistInfo(), run=run,
                ckpt=CheckpointManager(tmp / "checkpoints", keep_last_n=0), config={}, config_yaml="")
    holder["trainer"] = t
    return t


def test_a_schedule_sized_in_iterations_ends_inside_an_epoch_as_done(tmp_path: Path) -> None:
    t = tiny_trainer(tmp_path / "ti", poison=set(), total_iters=6)  # 3 epochs of 4 iterations, the schedule 6
    st = t.fit()
    t.run.close()
    log = (tmp_path / "ti/log.txt").read_text()
    assert st.step == 6 and st.epoch == 2 and st.batch == 0  # epoch 1 is the last, 2 iterations long
    assert "epoch 1 done (2 of 4 iterations: the schedule ends here)" in log
    assert "max_steps" not in log and "rest runs on resume" not in log and "epoch 2" not in log
    assert "epoch 1 [2/2]" in log  # the progress counts the epoch's own length
    assert torch.load(tmp_path / "ti/checkpoints/final.pt", weights_only=True)["step"] == 6


def test_rollback_reloads_the_last_checkpoint_and_skips_the_position(tmp_path: Path) -> None:
    t = tiny_trainer(tmp_path / "rb", poison={(1, 2)})
    st = t.fit()
    t.run.close()
    log = (tmp_path / "rb/log.txt").read_text()
    assert "rollback 1/3: non-finite loss (nan) at epoch 1, iteration 2, optimiser step 6" in log
    assert "step-6/model.pt (step 6); skipping iteration(s) 2-2 of epoch 1" in log
    assert st.epoch == 3 and st.step == 11 and st.skipped_nonfinite == 1  # 12 windows, one skipped
    rec = [json.loads(x) for x in (tmp_path / "rb/metrics.jsonl").read_text().splitlines() if '"rollback"' in x]
    assert rec[0]["epoch"] == 1 and rec[0]["iter"] == 2 and rec[0]["step"] == 6
    final = torch.load(tmp_path / "rb/checkpoints/final.pt", weights_only=True)
    assert final["counters"]["recovery"]["skip"] == [[1, 2]] and final["counters"]["recovery"]["rollbacks"] == 1
    # the same run with that position skipped from the start: bitwise the same weights (state and RNG restored)
    ref = tiny_trainer(tmp_path / "ref", poison=set())
    ref.recovery.skip = {(1, 2)}
    ref.fit()
    ref.run.close()
    assert_bitwise_equal(t.model.state_dict(), ref.model.state_dict())


def test_rollback_falls_back_in_precision_and_scales_the_lr(tmp_path: Path) -> None:
    t = tiny_trainer(tmp_path, poison={(0, 1)}, amp="bf16", rollback_amp="off", rollback_lr_scale=0.5)
    t.fit()
    t.run.close()
    assert t.amp == "off" and t.recovery.lr_factor == 0.5
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert "amp bf16 -> off, lr x0.5" in (tmp_path / "log.txt").read_text()
    # a resumed run keeps the fallback precision
    again = tiny_trainer(tmp_path / "again", poison=set(), amp="bf16")
    again.load(torch.load(tmp_path / "checkpoints/final.pt", weights_only=True))
    again.run.close()
    assert again.amp == "off" and again.recovery.skip == {(0, 1)}


@pytest.mark.slow
def test_exhausted_rollbacks_stop_with_one_line_naming_step_and_checkpoint(tmp_path: Path, image_folder: Path,
                                                                           capsys) -> None:
    out = tmp_path / "run"
    rc = pretrain(out, image_folder, "--epochs", "2", "--lr", "1e30", "optimization.on_nonfinite=rollback",
                  "optimization.max_rollbacks=2")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "after 2 rollback(s) (optimization.max_rollbacks = 2)" in err[0]
    assert "optimiser step" in err[0] and f"last good checkpoint: {out / 'checkpoints'}" in err[0]
    log = (out / "log.txt").read_text()
    assert "rollback 1/2" in log and "rollback 2/2" in log
    assert f"error: {err[0].split('error: ', 1)[1]}" in log  # the stop's reason is in log.txt, not only on stderr
    assert (out / "checkpoints/latest.pt").exists()  # the last good checkpoint: the same command resumes


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.mark.slow
def test_truncated_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "1", "--save_freq_steps", "3", "--save_freq_epochs", "1") == 0
    ck = out / "checkpoints"
    latest = ck / "latest.pt"
    size = latest.stat().st_size
    with open(latest, "r+b") as f:  # a hard link to epoch-1/model.pt: both are damaged
        f.truncate(size // 2)
    assert pretrain(out, image_folder, "--epochs", "2") == 0
    log = (out / "log.txt").read_text()
    assert f"warning: {latest} is damaged" in log and f"{ck / 'step-3/model.pt'} (step 3)" in log
    assert "at epoch 0, batch 3, step 3" in log
    assert step_of(ck / "final.pt") == 8


@pytest.mark.slow
def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path, image_folder: Path, capsys) -> None:
    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "1", "--save_freq_epochs", "1") == 0
    (out / "checkpoints/latest.pt").write_bytes(b"")  # same inode as epoch-1/model.pt
    assert pretrain(out, image_folder, "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "--no_auto_resume" in err


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: chmod, and (as root, where chmod does not stop writes) refuse writes there."""
    folders: list[Path] = []
    real_open, real_mkdir = builtins.open, pathlib.Path.mkdir

    def inside(p) -> bool:
        p = Path(os.fspath(p)).absolute()
        return any(p == f or f in p.parents for f in folders)

    def guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    def guarded_mkdir(self, *a, **k):
        if inside(self) and not self.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    def make(path: Path) -> None:
        folders.append(path.absolute())
        path.chmod(0o555)
        if os.geteuid() == 0:
            monkeypatch.setattr(builtins, "open", guarded_open)
            monkeypatch.setattr(pathlib.Path, "mkdir", guarded_mkdir)

    yield make
    for f in folders:
        f.chmod(0o755)


@pytest.mark.slow
def test_read_only_output_folder_is_one_line_and_keeps_the_checkpoint(tmp_path: Path, image_folder: Path,
                                                                      read_only, capsys) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    read_only(fresh)
    assert pretrain(fresh, image_folder, "--epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to the output folder" in err[0] and "--output_dir" in err[0]

    out = tmp_path / "run"
    assert pretrain(out, image_folder, "--epochs", "1") == 0
    before = (out / "checkpoints/latest.pt").read_bytes()
    read_only(out / "checkpoints")
    assert pretrain(out, image_folder, "--epochs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write checkpoints to {out / 'checkpoints'}" in err[0]
    assert (out / "checkpoints/latest.pt").read_bytes() == before


@pytest.mark.slow
def test_write_error_during_save_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path: Path, image_folder: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) > 1:  # step-2 goes through (latest.pt is a hard link to it), step-4 hits a full disk
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert pretrain(out, image_folder, "--epochs", "1", "--save_freq_steps", "2") == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"cannot write checkpoint {out / 'checkpoints/step-4'}: no space left on device" in err[0]
    assert "the previous checkpoint" in err[0] and "is intact" in err[0]
    assert step_of(out / "checkpoints/latest.pt") == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step-2"]
    # and the same command resumes from it once the disk has room
    assert pretrain(out, image_folder, "--epochs", "1", "--save_freq_steps", "2") == 0
    assert step_of(out / "checkpoints/final.pt") == 4



# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("schema", ["pretrain", "continual", "linprobe", "finetune", "incremental"])
def test_every_training_command_takes_the_rollback_keys(schema: str) -> None:
    from mimkit import config as C
    from mimkit.errors import ConfigError
    from mimkit.tasks.incremental.config import IncrementalConfig
    from mimkit.tasks import continual
    from mimkit.tasks.evaluation import config as eval_config

    cls = {"pretrain": C.PretrainConfig, "continual": continual.ContinualConfig,
           "linprobe": eval_config.LinprobeConfig, "finetune": eval_config.FinetuneConfig,
           "incremental": IncrementalConfig}[schema]
    keys = {"on_nonfinite": "rollback", "max_rollbacks": 1, "rollback_lr_scale": 0.5, "rollback_amp": "bf16"}
    cfg = C.build_config(cls, [("overrides", {"optimization": keys})])
    assert {k: cfg.optimization[k] for k in keys} == keys
    with pytest.raises(ConfigError, match="optimization.rollback_amp"):
        C.build_config(cls, [("overrides", {"optimization": {"rollback_amp": "fp16"}})])
    with pytest.raises(ConfigError, match="optimization.rollback_lr_scale"):
        C.build_config(cls, [("overrides", {"optimization": {"rollback_lr_scale": 2.0}})])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_classifier_commands_stop_on_a_signal_and_resume(tmp_path: Path, monkeypatch, command: str) -> None:
    """The same engine under linprobe / finetune: SIGTERM after step 2 -> exit 75 with step-2; rerun finishes."""
    from test_evaluate import save_tiny, write_colour_set

    ckpt = save_tiny(tmp_path / "tiny.pt")
    data = write_colour_set(tmp_path / "data", size=40)
    out = tmp_path / "run"
    argv = [command, "--finetune", str(ckpt), "--data_path", str(data), "--input_size", "32", "--epochs", "2",
            "--warmup_epochs", "1", "--batch_size", "8", "--output_dir", str(out), "--device", "cpu",
            "--num_workers", "0"]
    real = Trainer._call_hooks

    def signal_at_step_2(self, name, *args):
        real(self, name, *args)
        if name == "on_step_end" and self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_call_hooks", signal_at_step_2)
    assert main(argv) == 75
    assert step_of(out / "checkpoints/latest.pt") == 2 and not (out / "results.json").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    log = (out / "log.txt").read_text()
    assert "stopped by SIGTERM after optimiser step 2" in log and "resumed at epoch 0, step 2" in log
    assert len(json.loads((out / "results.json").read_text())["history"]) == 2


def test_torch_zip_writer_error_on_a_full_disk_is_a_write_error(tmp_path: Path, monkeypatch) -> None:
    """On a full disk torch.save raises its zip writer's RuntimeError while handling the OSError: still one line."""
    from mimkit.engine.checkpoint import CheckpointManager, CheckpointWriteError

    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save({"model": {"w": torch.zeros(2)}}, "step", 2, "a: 1\n")

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        mgr.save({"model": {"w": torch.ones(2)}}, "step", 4, "a: 1\n")
    assert "no space left on device" in str(info.value) and "is intact" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.pt", "step-2"]
