"""The fault suite (issue 23): bad input to every command is one line, exit 2, before any work, and a victim run
folder keeps every byte; a run folder belongs to one run of one command (ownership record + lock); data walks
end; temporary files of dead processes go; final.pt costs no second copy."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.engine.signals import FIRST_CTRL_C

pytestmark = pytest.mark.slow


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    """A finished tiny pretraining run: the folder every fault below must leave byte-identical."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "good"
    assert main(["pretrain", "--data_path", "digits", *TINY_MODEL, "--max_steps", "1", "--batch_size", "8",
                 "--num_workers", "0", "--output_dir", str(out), "logging.tensorboard=false"]) == 0
    return out


def _cases(v: str, root: str) -> list[tuple[list[str], str]]:
    """(argv, a piece of the one-line message) for each fault; `v` the victim run folder."""
    img = f"{root}/img.png"
    return [
        # another command into a pretraining run's folder
        (["finetune", "finetune/digits.yaml", "--finetune", v, "--output_dir", v, "--max_steps", "1"],
         "is the run folder of a mimkit pretrain run"),
        (["linprobe", "linprobe/digits.yaml", "--finetune", v, "--output_dir", v, "--max_steps", "1"],
         "is the run folder of a mimkit pretrain run"),
        (["incremental", "--data_path", "digits", "--tasks", "2", "--output_dir", v], "run folder of a mimkit pretrain"),
        (["continual", "--domains", "digits", "--output_dir", v], "run folder of a mimkit pretrain"),
        # outputs that cannot be written
        (["knn", "--checkpoint", v, "--data_path", "digits", "--output_dir", f"{v}/config.yaml"], "is a file"),
        (["rankme", "--checkpoint", v, "--data_path", "digits", "--output_dir", f"{v}/log.txt"], "is a file"),
        (["stats", "--data_path", "digits", "--output", v], "is a folder"),
        (["visualize", v, img, "--output", v], "is a folder"),
        (["visualize", v, img, "--output", f"{root}/r.jpg"], "written as .png"),
        (["export", v, "--format", "safetensors", "--output", f"{root}/missing/enc.safetensors"], "does not exist"),
        (["export", v, "--format", "onnx", "--output", f"{root}/enc.safetensors"], "written as .onnx"),
        (["pretrain", "--data_path", "digits", "--output_dir", f"{v}/config.yaml/x"], "is a file"),
        # values checked once, where they are parsed
        (["pretrain", "--in_chans", "2", "--data_path", "digits", "--output_dir", v], "--in_chans"),
        (["pretrain", "--mask_ratio", "0", "--data_path", "digits", "--output_dir", v], "--loss_mode all_pixels"),
        (["knn", "--checkpoint", v, "--data_path", "digits", "--batch_size", "0"], "--batch_size"),
        (["rankme", "--checkpoint", v, "--data_path", "digits", "--batch_size", "0"], "--batch_size"),
        (["export", v, "--format", "safetensors", "--batch_size", "0"], "--batch_size"),
        (["export", v, "--format", "safetensors", "--atol", "-1"], "--atol"),
        (["finetune", "--mixup", "-1", "--data_path", "digits", "--finetune", v], "--mixup"),
        (["linprobe", "--global_pool", "--cls_token", "--data_path", "digits", "--finetune", v],
         "--global_pool and --cls_token conflict"),
        (["pretrain", "--data_path", "", "--output_dir", v], "--data_path is empty"),
        (["pretrain", "--output_dir", ""], "--output_dir is empty"),
        (["pretrain", f"{root}/empty.yaml", "--output_dir", v], "is empty"),
        (["examples", "--dry_run", "2b", "--epocs", "1"], "did you mean --epochs"),
        (["pretrain", f"{root}/model5.yaml", "--output_dir", v], "'model' must be a section"),
    ]


_N_CASES = 25


def _run(argv: list[str]) -> int:
    """`mimkit ARGV`'s exit code (argparse's refusals exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("i", range(_N_CASES))
def test_fault_is_one_line_exit_2_and_the_run_folder_untouched(i, victim, capsys) -> None:
    root = victim.parent
    (root / "empty.yaml").write_text("")
    (root / "model5.yaml").write_text("model: 5\n")
    if not (root / "img.png").exists():
        write_images(root / "imgs", 1)
        (root / "img.png").write_bytes((root / "imgs" / "img000.jpg").read_bytes())
    before = _tree(victim)
    argv, message = _cases(str(victim), str(root))[i]
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[0], err
    assert len(err) == 1 or (len(err) == 2 and "--help" in err[1])  # the parser's pointer to --help at most
    assert "Traceback" not in "\n".join(err)
    assert _tree(victim) == before
    assert not (root / "missing").exists()


def test_case_count_matches() -> None:
    assert len(_cases("v", "r")) == _N_CASES


def test_run_folder_records_its_command_and_final_pt_is_a_link(victim) -> None:
    import json

    rec = json.loads((victim / ".mimkit-run.json").read_text())
    assert rec["command"] == "pretrain" and rec["run_id"]
    final, latest = victim / "checkpoints/final.pt", victim / "checkpoints/latest.pt"
    assert os.stat(final).st_ino == os.stat(latest).st_ino  # one copy on disk
    assert not (victim / ".mimkit.lock").exists()  # released and removed: the run ended


_HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} 2026-01-01T00:00:00 pretrain\\n".encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(victim, tmp_path, capsys, caplog) -> None:
    from mimkit.engine import runfolder

    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder / runfolder.LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["pretrain", "--data_path", "digits", *TINY_MODEL, "--output_dir", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by mimkit pretrain (pid {holder.pid}" in err
        assert sorted(p.name for p in folder.iterdir()) == [runfolder.LOCK]  # nothing written
    finally:
        holder.kill()  # kill -9: the kernel drops the flock, the pid stays in the file
        holder.wait()
    with caplog.at_level("WARNING", logger="mimkit"):
        runfolder.claim(folder, "pretrain")
    try:
        assert f"no longer running (pid {holder.pid}" in caplog.text
        assert (folder / runfolder.LOCK).read_text().split()[0] == str(os.getpid())
    finally:
        runfolder.release()
    assert not (folder / runfolder.LOCK).exists()  # an ended run leaves no lock file
    runfolder.claim(folder, "pretrain")  # and the next run takes a fresh one
    try:
        assert (folder / runfolder.LOCK).read_text().split()[0] == str(os.getpid())
    finally:
        runfolder.release()


def test_stale_temporary_checkpoints_are_removed(tmp_path) -> None:
    from mimkit.engine.checkpoint import CheckpointManager

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".step-1.tmp-{dead.pid}").mkdir()
    (tmp_path / f".latest.pt.tmp-{dead.pid}").write_bytes(b"x")
    mine = tmp_path / f".step-2.tmp-{os.getpid()}"
    mine.mkdir()
    removed = CheckpointManager(tmp_path).remove_stale_temps()
    assert removed == sorted([f".latest.pt.tmp-{dead.pid}", f".step-1.tmp-{dead.pid}"])
    assert mine.exists()


def test_symlink_loops_end_and_duplicates_count_once(tmp_path, caplog) -> None:
    from mimkit.data.datasets import image_folder

    write_images(tmp_path / "flat", 5)
    (tmp_path / "flat" / "loop").symlink_to("..")
    write_images(tmp_path / "cls", 6, classes=3)
    (tmp_path / "cls" / "class0" / "to1").symlink_to("../class1")  # into another class: not followed
    (tmp_path / "cls" / "class2" / "self").symlink_to(".")  # a loop
    with caplog.at_level("WARNING"):
        flat = image_folder(tmp_path / "flat")
        cls = image_folder(tmp_path / "cls")
    assert len(flat) == 5 and flat.classes == [] and "looping back skipped (loop)" in flat.link_note
    assert len(cls) == 6 and [s[1] for s in cls.samples] == [0, 0, 1, 1, 2, 2]
    assert "a loop: " in cls.link_note and "class2/self" in cls.link_note


def test_precise_bn_drops_a_last_batch_of_one() -> None:
    import torch

    from mimkit.data.datasets import collate_batch
    from mimkit.tasks.incremental.precise_bn import PreciseBN

    data = [(torch.randn(3, 4, 4), 0) for _ in range(9)]  # 9 = 2 x 4 + 1
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    hook = PreciseBN(lambda: [net], data, collate_batch, epochs=1, batch_size=4, num_images=9, seed=0,
                     device=torch.device("cpu"), extra=lambda: torch.randn(5, 3, 4, 4))
    sizes = [len(b) for b in hook.batches()]
    assert sizes == [4, 4, 4]  # the image left over and the buffer's last one are dropped
    hook.recompute()  # BatchNorm in training mode never sees a batch of one
    assert torch.isfinite(net[1].running_var).all()


def test_segment_on_a_cpu_that_cannot_fit_names_the_demo_preset(monkeypatch) -> None:
    """The ADE20K recipe (ViT-B, 512 px, batch 2, sliding window) on a machine with 2 GB free: one line naming the
    CPU preset; the demo's sizes fit. The models are built on the meta device (nothing allocated)."""
    import torch
    from omegaconf import OmegaConf

    from mimkit.engine import memory
    from mimkit.errors import ConfigError
    from mimkit.models import create_model
    from mimkit.models.segmentation import segmenter_arch, segmenter_from_encoder
    from mimkit.tasks.segment.recipe import seg_loss
    from mimkit.tasks.segment.setup import check_memory

    def segmenter(name: str, crop: int, channels: int):
        with torch.device("meta"):
            enc = create_model(name, img_size=crop)
            arch = segmenter_arch(enc, (crop, crop), 150, None, channels, channels // 3, [1, 2, 3, 6], 0.1)
            return segmenter_from_encoder(enc, arch, 0.1), arch

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2 * 10**9)
    cfg = OmegaConf.create({"optimization": {"batch_size": 2}, "misc": {"preset": None},
                            "test": {"mode": "slide", "crop_size": None, "stride": None}})
    model, arch = segmenter("mae_vit_base_patch16", 512, 768)
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, model, arch, (512, 512), "cpu", seg_loss)
    msg = str(e.value)
    assert "segment/demo.yaml" in msg and "\n" not in msg and "more than this machine has" in msg
    # the estimate itself: ViT-B's 12 blocks at 1025 tokens and UperNet at 128x128 keep gigabytes for backward
    peak = float(msg.split("estimated peak memory ")[1].split(" GiB")[0])
    assert 3 < peak < 30
    cfg.optimization.batch_size = 16  # the demo's sizes (64 px, a 192-d encoder, 32 channels) fit: a note
    cfg.test.mode = "whole"
    model, arch = segmenter("mae_vit_demo_patch8", 64, 32)
    assert check_memory(cfg, model, arch, (64, 64), "cpu", seg_loss).startswith("estimated peak memory")


@pytest.mark.parametrize("argv", [
    ["pretrain", "--data_path", "digits", *TINY_MODEL, "--max_steps", "1"],
    ["continual", "--domains", "digits", *TINY_MODEL, "--max_steps", "1"],
    ["finetune", "finetune/digits.yaml", "--finetune", "{v}", "--max_steps", "1"],
    ["linprobe", "linprobe/digits.yaml", "--finetune", "{v}", "--max_steps", "1"],
    ["segment", "--finetune", "{v}", "--max_iters", "1"],
    ["incremental", "incremental/digits.yaml", "--epochs", "1"],
], ids=lambda a: a[0])
def test_every_training_command_refuses_a_run_that_cannot_fit(argv, victim, tmp_path, monkeypatch, capsys) -> None:
    """Each training command estimates its peak before any work; on a machine with 1 MiB available it refuses in
    one line naming the estimate, exit 2, and writes nothing (no run folder)."""
    from mimkit.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**20)
    out = tmp_path / "run"
    assert _run([a.replace("{v}", str(victim)) for a in argv] + ["--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "estimated peak memory" in err[0] and "more than this machine has" in err[0], err
    assert f"{argv[0]} at batch " in err[0] and "of 1.0 MiB free" in err[0]
    assert not out.exists()


def test_a_folder_from_before_ownership_records_belongs_to_the_command_its_config_names(victim, tmp_path,
                                                                                         capsys) -> None:
    """No .mimkit-run.json (a run of an older mimkit): the command is read from config.yaml, else from the config
    inside checkpoints/latest.pt; another command is refused with every byte kept, the same command resumes (and
    records the folder as its own); a folder with nothing recognisable is taken by the first command."""
    import shutil

    from mimkit.engine import runfolder

    old = tmp_path / "old"
    shutil.copytree(victim, old, ignore=shutil.ignore_patterns(runfolder.RECORD, runfolder.LOCK))
    assert runfolder.infer_record(old)["command"] == "pretrain"
    before = _tree(old)
    argv = ["finetune", "finetune/digits.yaml", "--finetune", str(victim), "--output_dir", str(old), "--max_steps", "1"]
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the run folder of a mimkit pretrain run" in err[0], err
    assert "before ownership records; its config.yaml says so" in err[0]
    assert _tree(old) == before
    (old / "config.yaml").unlink()  # the checkpoint's own config still says pretrain
    assert runfolder.infer_record(old) == {"command": "pretrain",
                                          "created": "before ownership records; its checkpoints/latest.pt says so"}
    assert _run(["segment", "--output_dir", str(old), "--max_iters", "1"]) == 2
    assert "is the run folder of a mimkit pretrain run" in capsys.readouterr().err
    # the same command: accepted (nothing to train: the victim's one step is done) and recorded as its own
    assert main(["pretrain", "--data_path", "digits", *TINY_MODEL, "--max_steps", "1", "--batch_size", "8",
                 "--num_workers", "0", "--output_dir", str(old), "logging.tensorboard=false"]) == 0
    assert runfolder.read_record(old)["command"] == "pretrain"
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert runfolder.infer_record(stranger) is None
    runfolder.check_run_dir(stranger, "finetune")  # nothing says whose: accepted


@pytest.mark.parametrize("save_every,says", [
    (0, "no checkpoint was written (run folder {out}), so a rerun starts over"),
    (1, "the same command resumes from the last checkpoint in {out} (auto_resume)"),
])
def test_a_second_ctrl_c_cleans_the_temporary_checkpoint_and_says_resumable_only_with_one(save_every, says,
                                                                                        tmp_path) -> None:
    """A real CLI process: the first Ctrl-C after optimiser step 2 asks to stop, the second lands while the stop's
    checkpoint is half written. Exit 130 at once, no .step-2.tmp-PID folder left, and 'resumes' only when an
    earlier checkpoint (--save_freq_steps 1: step-1) exists."""
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(Path(__file__).parent)])}
    cmd = [sys.executable, str(Path(__file__).parent / "second_sigint_worker.py"), "2", "pretrain", "--data_path",
           "digits", *TINY_MODEL, "--batch_size", "8", "--num_workers", "0", "--epochs", "5", "--output_dir",
           str(out), "--save_freq_steps", str(save_every), "logging.tensorboard=false"]
    env["SECOND_CTRL_C_STAMP"] = str(tmp_path / "pressed")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    gone = time.time()
    assert proc.returncode == 130, stderr[-2000:]
    # at once: without the interpreter's teardown (3-5 s for torch and its modules) the process is gone well under
    # a second after the second Ctrl-C (measured 0.1-0.3 s here; 1 s leaves room for a loaded machine)
    took = gone - float((tmp_path / "pressed").read_text())
    assert took < 1.0, took
    # the first Ctrl-C answered at once, before the step finished and the stop was logged
    first = stderr.index(FIRST_CTRL_C)
    assert first < stderr.index("interrupted;")
    last = stderr.strip().splitlines()[-1]
    assert last == f"mimkit pretrain: interrupted; {says.format(out=out)}", stderr[-2000:]
    assert "Traceback" not in stderr
    ckpts = out / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if ".tmp-" in p.name] if ckpts.exists() else True
    assert not (ckpts / "step-2").exists()  # the interrupted checkpoint never became one
    assert (ckpts / "latest.pt").exists() == bool(save_every)
