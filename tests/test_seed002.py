"""Seed 002's command lines as its users launch them: torch.distributed.launch / torchrun, FreezeOut from
--how_scale / --t_0, --log_dir, every encoder-taking command on a LocalMIM checkpoint, a fresh decoder never frozen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.commands import strip_launcher_flags
from mimkit.engine.checkpoint import make_checkpoint
from mimkit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
# 32 px, patch 8 -> a 4x4 grid; 4 blocks (taps 1, 3, 1, 3); 4 HOG bins
MIM_KW = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
              decoder_num_heads=2, hog_nbins=4)
# The DDP runs' decoders are 128 wide (the x4 head's 1x1 conv reads 32 channels, as ViT-Ti's at 64 px).
MIM_FLAGS = ["--model", "localmim_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
             "model.kwargs.embed_dim=32", "model.kwargs.depth=4", "model.kwargs.num_heads=2",
             "model.kwargs.decoder_embed_dim=128", "model.kwargs.decoder_num_heads=2", "--hog_nbins", "4"]


# ---------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("words, expected", [
    (["--local-rank=1", "pretrain", "--epochs", "2"], ["pretrain", "--epochs", "2"]),
    (["--local_rank", "1", "pretrain", "--epochs", "2"], ["pretrain", "--epochs", "2"]),
    (["pretrain", "--epochs", "2", "--local-rank=1"], ["pretrain", "--epochs", "2"]),
    (["pretrain", "--local_rank=1", "x=1"], ["pretrain", "x=1"]),
])
def test_the_launchers_flag_is_taken_anywhere(words, expected, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_flags(words) == expected
    assert os.environ["LOCAL_RANK"] == "1"


def _launch(launcher: str, out: Path, data: Path, tb: Path) -> subprocess.CompletedProcess:
    seed_flags = ["--epochs", "2", "--warmup_epochs", "1", "--batch_size", "2", "--accum_iter", "2",
                  "--world_size", "2", "--blr", "2e-4", "--mask_ratio", "0.75", "--how_scale", "cubic",
                  "--t_0", "0.8", "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tb)]
    run = {"launch": ["torch.distributed.launch"], "launch_use_env": ["torch.distributed.launch", "--use-env"],
           "torchrun": ["torch.distributed.run"]}[launcher]
    # bf16 autocast (what --amp auto picks on an AVX-512 BF16 CPU, as in the trial) is the path on which DDP
    # warned "Grad strides do not match" for the x4 head's channels-last 1x1 conv gradient; fp32 did not warn
    amp = "bf16" if launcher == "launch" else "off"
    cmd = [sys.executable, "-m", *run, "--nproc_per_node=2", "--standalone",
           "-m", "mimkit", "pretrain", *MIM_FLAGS, *seed_flags, "--num_workers", "0", "--device", "cpu",
           "--amp", amp]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["launch", "launch_use_env", "torchrun"])
def test_both_launchers_run_localmim_freezeout_from_the_seed_flags(launcher, tmp_path: Path,
                                                                   image_folder: Path) -> None:
    out, tb = tmp_path / "run", tmp_path / "tb"
    r = _launch(launcher, out, image_folder, tb)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "unknown flag" not in r.stderr
    assert "Grad strides do not match" not in r.stderr  # LocalMIM's heads give DDP contiguous gradients
    cfg = (out / "config.yaml").read_text()
    assert "freezeout:\n  enabled: true\n  how_scale: cubic\n  t_0: 0.8" in cfg
    assert f"log_dir: {tb}" in cfg
    assert list(tb.glob("events.out.tfevents.*")) and not (out / "tb").exists()
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "FreezeOut on (cubic, t_0 0.8" in log
    ck = torch.load(out / "checkpoints/final.pt", weights_only=True)
    assert ck["extra"]["FreezeOutHook"]["frozen"] == 4  # every block frozen by the end (t_3 = 0.857 < 1)


@pytest.mark.parametrize("kw, size", [
    ({**MIM_KW, "decoder_embed_dim": 128}, 32),     # the tiny model the DDP runs above use
    (dict(patch_size=8, hog_nbins=9), 64),          # the trial's seed-002 line: ViT-Ti, 64 px, patch 8 (8x8 grid)
    (dict(patch_size=16, hog_nbins=9), 64),         # patch 16 at 64 px: a 4x4 grid, the x0.5 head on 2x2
    (dict(patch_size=16, hog_nbins=9), 32),         # a 2x2 grid: the x0.5 head's 1x1 map
])
@pytest.mark.parametrize("bf16", [False, True])
def test_every_gradient_has_its_parameters_strides(kw, size, bf16) -> None:
    """DDP warns "Grad strides do not match bucket view strides" and copies every step when a gradient's
    strides differ from its parameter's (contiguous) ones; is_contiguous() would let a channels-last [C, D, 1, 1]
    gradient through, so the strides are compared exactly."""
    torch.manual_seed(0)
    m = create_model("localmim_vit_tiny_patch16", img_size=size, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = m(torch.randn(2, 3, size, size), mask_ratio=0.75)[0]
    loss.backward()
    off = {n: (p.grad.stride(), p.stride()) for n, p in m.named_parameters()
           if p.grad is not None and p.grad.stride() != p.stride()}
    assert not off
    assert "decoder.0.pred.1.weight" in m.state_dict()  # the x4 head's LayerNorm keeps its checkpoint names


# ---------------------------------------------------------------------------------------------- FreezeOut flags
def _cfg(*words: str):
    from mimkit.commands import build_parser
    from mimkit.tasks.pretrain import config_from_args

    return config_from_args(build_parser().parse_args(["pretrain", *TINY_MODEL, "--data_path", "digits", *words]))


def test_how_scale_or_t_0_turn_freezeout_on_and_a_contrary_override_is_refused(capsys) -> None:
    assert not _cfg().freezeout.enabled
    assert _cfg("--how_scale", "linear").freezeout.enabled
    assert _cfg("--t_0", "0.5").freezeout.enabled
    assert _cfg("--freezeout").freezeout.enabled
    assert main(["pretrain", *TINY_MODEL, "--t_0", "0.5", "freezeout.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--t_0 0.5 turn FreezeOut on" in err and "freezeout.enabled=false" in err


def test_log_dir_sets_the_tensorboard_folder() -> None:
    assert _cfg().logging.log_dir is None
    assert _cfg("--log_dir", "/somewhere/tb").logging.log_dir == "/somewhere/tb"


# ---------------------------------------------------------------------------------------------- LocalMIM checkpoints
@pytest.fixture(scope="module")
def mim(tmp_path_factory) -> dict[str, Path]:
    """A tiny LocalMIM checkpoint in the mimkit format, labelled class folders, a flat folder, a segmentation set."""
    from test_evaluate import write_colour_set
    from test_segment import write_generic

    d = tmp_path_factory.mktemp("mim")
    torch.manual_seed(0)
    m = create_model("localmim_vit_tiny_patch16", img_size=32, **MIM_KW)
    cfg = {"model": {"type": "localmim_vit_tiny_patch16", "kwargs": MIM_KW, "norm_pix_loss": False},
           "data": {"input_size": 32}}
    ckpt = d / "mim.pt"
    torch.save(make_checkpoint(model=m.state_dict(), optimizer={}, epoch=0, step=0, config=cfg), ckpt)
    write_images(d / "flat", 16)
    seg = d / "seg"
    write_generic(seg, n=4)
    return {"ckpt": ckpt, "labelled": write_colour_set(d / "data"), "flat": d / "flat", "seg": seg}


def _command(name: str, mim: dict[str, Path], out: Path) -> list[str]:
    c, lab = str(mim["ckpt"]), str(mim["labelled"])
    short = ["--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
    return {
        "knn": ["knn", "--checkpoint", c, "--data_path", lab, "--k", "3"],
        "rankme": ["rankme", "--checkpoint", c, "--data_path", lab],
        "linprobe": ["linprobe", "--finetune", c, "--data_path", lab, *short],
        "finetune": ["finetune", "--finetune", c, "--data_path", lab, *short],
        "segment": ["segment", "--finetune", c, "--data_path", str(mim["seg"]), "--input_size", "32",
                    "--batch_size", "2", "--max_iters", "2", "--num_workers", "0", "model.channels=8",
                    "model.aux_channels=8", "logging.tensorboard=false", "test.crop_size=[32,32]",
                    "test.stride=[16,16]"],
        "continual": ["continual", "--continual_checkpoint", c, "--domains", str(mim["flat"]), "--epochs", "1",
                      "--batch_size", "8", "--num_workers", "0", "--device", "cpu"],
        "export": ["export", c, "--format", "timm", "--output", str(out / "enc.timm.safetensors")],
        "incremental": ["incremental", "--finetune", c, "--tasks", "2", "--input_size", "16", "--epochs", "1",
                        "--batch_size", "256", "--opt", "adamw", "--lr", "1e-3", "--device", "cpu",
                        "logging.tensorboard=false"],
    }[name] + ([] if name == "export" else ["--output_dir", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["knn", "rankme", "linprobe", "finetune", "segment", "continual", "export",
                                     "incremental"])
def test_every_encoder_command_takes_a_localmim_checkpoint(command, mim, tmp_path: Path, capsys) -> None:
    out = tmp_path / command
    out.mkdir()  # export writes a file into an existing folder; the others take it as their run folder
    assert main(_command(command, mim, out)) == 0, capsys.readouterr().err[-2000:]
    sd = torch.load(mim["ckpt"], weights_only=True)["model"]
    if command == "export":
        from safetensors.torch import load_file

        enc = load_file(out / "enc.timm.safetensors")
        # the encoder as a timm ViT, with the LocalMIM's last tap norm as its final norm
        assert torch.equal(enc["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
        assert torch.equal(enc["norm.weight"], sd["norm.3.weight"]) and not any(k.startswith("decoder") for k in enc)
        return
    if command == "continual":
        # the HOG reconstruction loss of the LocalMIM objective, a finite positive number
        loss = json.loads((out / "recon_loss.json").read_text())["matrix"][0][0]
        assert 0 < loss < float("inf")
        return
    res = json.loads((out / "results.json").read_text())
    assert "localmim" in json.dumps(res)  # the checkpoint's model named in the results


# ---------------------------------------------------------------------------------------------- fresh decoder
def _encoder_only(path: Path) -> Path:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=2)
    m = create_model("mae_vit_tiny_patch16", **kw)
    torch.save({"model": {k: v for k, v in m.state_dict().items() if m.is_encoder_param(k)}}, path)
    return path


@pytest.mark.parametrize("mode, fragment", [
    ("encoder_layernorms_only", "parameters of a freshly initialised decoder"),
    ("layernorm_only", "parameters of a freshly initialised decoder"),
    ("encoder_only", "trains only the freshly initialised decoder"),
])
@pytest.mark.parametrize("command", ["pretrain", "continual"])
def test_freezing_a_fresh_decoder_is_refused_in_one_line(command, mode, fragment, tmp_path: Path, image_folder,
                                                         capsys) -> None:
    enc = _encoder_only(tmp_path / "mae_pretrain_tiny.pth")
    out = tmp_path / "run"
    start = ["--init_from", str(enc)] if command == "pretrain" else ["--continual_checkpoint", str(enc)]
    data = ["--data_path", str(image_folder)] if command == "pretrain" else ["--domains", str(image_folder)]
    argv = [command, *TINY_MODEL, *start, "--freeze_mode", mode, "--epochs", "1", "--batch_size", "8",
            "--num_workers", "0", "--output_dir", str(out), *data]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert fragment in err and str(enc) in err and "holds no decoder" in err and "--freeze_mode none" in err
    assert not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- visualize
def test_visualize_takes_output_dir_and_refuses_a_localmim_checkpoint_in_one_line(tmp_path: Path, image_folder,
                                                                                  mim, capsys) -> None:
    from test_evaluate import save_tiny

    img = str(next(image_folder.iterdir()))
    assert main(["visualize", str(save_tiny(tmp_path / "mae.pt")), img, "--output_dir", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v/reconstruction.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["visualize", str(mim["ckpt"]), img, "--output_dir", str(tmp_path / "w")]) == 2
    # the command's own error is one line (a closed capture stream of an earlier test may add logging noise)
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mimkit visualize:")]
    assert len(errors) == 1 and "HOG features, not pixels" in errors[0] and "Traceback" not in errors[0]
    assert not (tmp_path / "w").exists()
