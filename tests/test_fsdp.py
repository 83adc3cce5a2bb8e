"""--strategy fsdp (FSDP2 on CPU / gloo, 2 processes) and resuming on another number of processes.

One torchrun launch runs every 2-process run of this file (tests/fsdp_worker.py runs them one after the other):
pretrain FSDP / DDP / stopped by SIGTERM / resumed under FSDP and under DDP / DDP stopped mid-epoch, LocalMIM
FSDP / DDP, finetune and segment FSDP / DDP / stopped / resumed. The 1-process resumes and the refusals run here,
in this process. Checked: the meta-device build never holds the model (and gives a normal build's weights); FSDP
matches DDP (LocalMIM too, the issue's 1e-5); a SIGTERM'd FSDP run resumed on 2 ranks is bitwise the straight run,
in pretrain, finetune and segment; a sharded checkpoint resumes on 1 process and under DDP; a 2-rank DDP run
stopped mid-epoch and resumed on 1 process reads each image of that epoch exactly once; FSDP's final.pt loads in
knn, linprobe and export; bad input is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, write_images

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fsdp_worker.py")
# 16 images, batch 2 x 2 ranks: 4 iterations an epoch, 8 optimiser steps in 2 epochs; fp32 so FSDP == DDP
COMMON = [*TINY_MODEL, "--epochs", "2", "--blr", "1e-2", "--warmup_epochs", "1", "--num_workers", "0",
          "--device", "cpu", "--amp", "off", "--batch_size", "2", "--print_freq", "1", "--clip_grad", "1.0"]
# LocalMIM at depth 4 taps blocks [1, 3, 1, 3]: a tap read twice (what FSDP2 used to regroup); no clipping, so
# the gradients alone decide (before the fix its parameters drifted 1.6e-5 from DDP's in these 5 steps)
LOCALMIM = ["--model", "localmim_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
            "model.kwargs.embed_dim=32", "model.kwargs.depth=4", "model.kwargs.num_heads=2", "--hog_nbins", "4",
            "--batch_size", "2", "--num_workers", "0", "--epochs", "2", "--blr", "1e-2", "--warmup_epochs", "1",
            "--device", "cpu", "--amp", "off", "--print_freq", "1", "--max_steps", "5"]
# finetune / segment from the FSDP pretraining run's final.pt: 8 steps, a step checkpoint every 2
FINETUNE = ["--input_size", "32", "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "2", "--num_workers",
            "0", "--device", "cpu", "--amp", "off", "--print_freq", "1", "--aa", "none", "--reprob", "0",
            "--mixup", "0", "--cutmix", "0", "--clip_grad", "1.0", "checkpointing.save_freq_steps=2"]
SEGMENT = ["--input_size", "32", "model.channels=16", "model.aux_channels=8", "--batch_size", "2", "--num_workers",
           "0", "--test_mode", "whole", "logging.tensorboard=false", "--max_iters", "4", "--device", "cpu",
           "--amp", "off", "--print_freq", "1", "test.num_overlays=0", "test.interval=0", "--save_freq_steps", "2"]


def env() -> dict:
    paths = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent)]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "step"]


def final(run: Path) -> dict:
    return torch.load(run / "checkpoints/final.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process run, in one torchrun launch; -> {name: run folder} plus the data folders."""
    d = tmp_path_factory.mktemp("fsdp")
    write_images(d / "data/train", 16, classes=2)  # pretraining reads train/; knn, linprobe, finetune also val/
    write_images(d / "data/val", 8, classes=2, seed=1)
    data, labelled = d / "data/train", d / "data"
    fsdp = ["--strategy", "fsdp"]

    def pre(name, *extra):
        return ["pretrain", *COMMON, "--data_path", str(data), "--output_dir", str(d / name), *extra]

    enc = str(d / "fsdp/checkpoints/final.pt")

    def ft(name, *extra):
        return ["finetune", *FINETUNE, "--finetune", enc, "--data_path", str(labelled), "--output_dir",
                str(d / name), *extra]

    def seg(name, *extra):
        return ["segment", *SEGMENT, "--finetune", enc, "--output_dir", str(d / name), *extra]

    plan = [
        {"argv": pre("fsdp", *fsdp), "watch": str(d / "build.pt")},
        {"argv": pre("ddp")},
        {"argv": pre("fsdp_stopped", *fsdp, "--save_freq_steps", "2"), "sigterm_at": 3},
        {"argv": pre("resumed", *fsdp, "--save_freq_steps", "2"), "copy": [str(d / "fsdp_stopped"),
                                                                          str(d / "resumed")]},
        {"argv": pre("as_ddp", "--strategy", "ddp"), "copy": [str(d / "fsdp_stopped"), str(d / "as_ddp")]},
        {"argv": pre("ddp_stop", "--save_freq_steps", "100"), "sigterm_at": 3, "keys": str(d / "ddp_stop/keys")},
        {"argv": ["pretrain", *LOCALMIM, *fsdp, "--data_path", str(data), "--output_dir", str(d / "lm_fsdp")]},
        {"argv": ["pretrain", *LOCALMIM, "--data_path", str(data), "--output_dir", str(d / "lm_ddp")]},
        {"argv": ft("ft_fsdp", *fsdp), "watch": str(d / "ft_build.pt")},
        {"argv": ft("ft_ddp")},
        {"argv": ft("ft_stopped", *fsdp), "sigterm_at": 3},
        {"argv": ft("ft_resumed", *fsdp), "copy": [str(d / "ft_stopped"), str(d / "ft_resumed")]},
        {"argv": seg("seg_fsdp", *fsdp)},
        {"argv": seg("seg_ddp")},
        {"argv": seg("seg_stopped", *fsdp), "sigterm_at": 3},
        {"argv": seg("seg_resumed", *fsdp), "copy": [str(d / "seg_stopped"), str(d / "seg_resumed")]},
    ]
    # a 1-process run (accum_iter 2: the effective batch 4 of 2 ranks x batch 2) stopped after step 2, mid-epoch:
    # its full checkpoint is resumed under FSDP on 2 ranks in the plan (fsdp_worker run alone: one process)
    one = [{"argv": pre("one_stop", "--accum_iter", "2", "--save_freq_steps", "100"), "sigterm_at": 2,
            "keys": str(d / "one_stop/keys")}]
    (d / "one/plan.json").parent.mkdir()
    (d / "one/plan.json").write_text(json.dumps(one))
    single = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    r = subprocess.run([sys.executable, str(WORKER), str(d / "one/plan.json")], capture_output=True, text=True,
                       env=single, timeout=300)
    assert json.loads((d / "one/rc-rank0.json").read_text()) == [75], r.stderr[-3000:]
    plan.append({"argv": pre("one_to_fsdp", *fsdp, "--accum_iter", "2", "--save_freq_steps", "100"),
                 "copy": [str(d / "one_stop"), str(d / "one_to_fsdp")], "keys": str(d / "one_to_fsdp/keys")})
    plan.append({"argv": pre("one_to_ddp", "--accum_iter", "2", "--save_freq_steps", "100"),
                 "copy": [str(d / "one_stop"), str(d / "one_to_ddp")]})
    (d / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(d / "plan.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = [json.loads((d / f"rc-rank{k}.json").read_text()) for k in (0, 1)]
    expect = [75 if s.get("sigterm_at") else 0 for s in plan]  # a stop: a step checkpoint and exit code 75
    assert codes == [expect, expect], (codes, r.stderr[-3000:])
    return {"dir": d, "data": data, "labelled": labelled, "output": r.stdout + r.stderr}


def test_meta_device_build_never_holds_the_model_and_equals_a_normal_build(runs):
    from omegaconf import OmegaConf

    from mimkit.tasks.pretrain.setup import build_model, seed_everything

    d = runs["dir"]
    log = (d / "fsdp/log.txt").read_text()
    assert "built on the meta device, materialised shard by shard" in log
    built = torch.load(d / "build.pt", weights_only=True)
    cfg = OmegaConf.load(d / "fsdp/config.yaml")
    seed_everything(cfg.misc.seed)
    normal = build_model(cfg, "cpu").state_dict()
    assert built["state"].keys() == normal.keys()
    for k, v in normal.items():  # bitwise: the build's ops replayed with the same random draws
        assert torch.equal(built["state"][k], v), k
    # no tensor the size of the model, or of a block, was ever made: the largest is one parameter's
    largest_param = max(v.numel() * v.element_size() for v in normal.values())
    block = sum(p.numel() * 4 for p in build_model(cfg, "meta").blocks[0].parameters())
    total = sum(v.numel() * v.element_size() for v in normal.values())
    assert built["largest"] <= largest_param < block < total / 4
    assert built["peak"] <= block  # the replay's own count of bytes held at once
    # finetune's build reads the encoder checkpoint and never holds its classifier either
    ft = torch.load(d / "ft_build.pt", weights_only=True)
    ft_total = sum(v.numel() * v.element_size() for v in ft["state"].values())
    assert ft["largest"] <= max(v.numel() * v.element_size() for v in ft["state"].values()) < ft_total / 4


def test_fsdp_matches_ddp(runs):
    d = runs["dir"]
    log = (d / "fsdp/log.txt").read_text()
    assert "FSDP2: 3 blocks and the root sharded over 2 ranks" in log and "per rank under fsdp over 2" in log
    fsdp, ddp = step_losses(d / "fsdp"), step_losses(d / "ddp")
    assert len(fsdp) == len(ddp) == 8
    assert max(abs(a - b) for a, b in zip(fsdp, ddp)) <= 1e-5
    assert max_diff(final(d / "fsdp")["model"], final(d / "ddp")["model"]) <= 1e-5  # final.pt: the full weights


def test_no_view_output_warning_from_fsdp(runs):
    # FSDP2 warns of a model output that is a view (MAE's pred slice, LocalMIM's transposed preds) on every rank
    assert "FSDP2-wrapped module" not in runs["output"] and "returned a view tensor" not in runs["output"]


def test_localmim_fsdp_matches_ddp_within_1e_5(runs):
    d = runs["dir"]
    fsdp, ddp = step_losses(d / "lm_fsdp"), step_losses(d / "lm_ddp")
    assert len(fsdp) == len(ddp) == 5 and max(abs(a - b) for a, b in zip(fsdp, ddp)) <= 1e-5
    assert max_diff(final(d / "lm_fsdp")["model"], final(d / "lm_ddp")["model"]) <= 1e-5


@pytest.mark.parametrize("task", ["ft", "seg"])
def test_finetune_and_segment_under_fsdp(runs, task):
    d = runs["dir"]
    log = (d / f"{task}_fsdp/log.txt").read_text()
    assert "FSDP2: 2 blocks and the root sharded over 2 ranks" in log
    fsdp, ddp = step_losses(d / f"{task}_fsdp"), step_losses(d / f"{task}_ddp")
    assert len(fsdp) == len(ddp) > 0 and max(abs(a - b) for a, b in zip(fsdp, ddp)) <= 1e-5
    a, b = final(d / f"{task}_fsdp"), final(d / f"{task}_ddp")
    assert "sharded" not in a and max_diff(a["model"], b["model"]) <= 1e-5  # final.pt: the full weights
    # stopped by SIGTERM after step 3: a sharded step checkpoint; resumed on 2 ranks: bitwise the straight run
    stopped = torch.load(d / f"{task}_stopped/checkpoints/latest.pt", weights_only=True)
    assert stopped["step"] == 3 and stopped["sharded"]["world_size"] == 2 and stopped["model"] == {}
    resumed = final(d / f"{task}_resumed")["model"]
    for k, v in a["model"].items():
        assert torch.equal(resumed[k], v), k
    assert step_losses(d / f"{task}_resumed")[-3:] == fsdp[-3:]
    if task == "ft":  # best.pt holds the weights gathered from the shards
        best = torch.load(d / "ft_fsdp/checkpoints/best.pt", weights_only=True)
        assert best["model"].keys() == a["model"].keys()
    else:
        metrics = json.loads((d / "seg_fsdp/results.json").read_text())["metrics"]
        assert metrics["mIoU"] == json.loads((d / "seg_ddp/results.json").read_text())["metrics"]["mIoU"]


def test_sharded_checkpoint_layout_and_sigterm_resume_is_bitwise(runs):
    d = runs["dir"]
    ckpt = torch.load(d / "fsdp_stopped/checkpoints/latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["sharded"]["world_size"] == 2 and ckpt["model"] == {}
    files = ckpt["sharded"]["files"]
    assert sorted(f for f in files if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    straight, resumed = final(d / "fsdp")["model"], final(d / "resumed")["model"]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert step_losses(d / "resumed")[-5:] == step_losses(d / "fsdp")[-5:]
    # the same sharded checkpoint resumed under DDP on 2 ranks
    as_ddp = final(d / "as_ddp")
    assert as_ddp["step"] == 8 and "sharded" not in as_ddp
    # the weights continue from the shards: close to the straight FSDP run
    assert max_diff(as_ddp["model"], straight) <= 1e-5


def test_full_checkpoint_of_one_process_resumes_under_fsdp_on_two_ranks(runs):
    d = runs["dir"]
    run = d / "one_to_fsdp"
    log = (run / "log.txt").read_text()
    assert "world size 1 -> 2: accum_iter 2 -> 1 keeps the effective batch 4" in log
    assert "read the full checkpoint of 1 process(es) into the model sharded over 2 FSDP rank(s)" in log
    assert "epoch 0 continues at sample 8 of its list (iteration 2 here, 4 before)" in log
    keys = [json.loads(line) for f in sorted((run / "keys").glob("keys-rank*.jsonl"))
            for line in f.read_text().splitlines()]
    seen = Counter(i for e, i in keys if e == 0)
    assert sorted(seen) == list(range(16)) and set(seen.values()) == {1}  # every image of epoch 0, once
    fin = final(run)
    assert fin["step"] == 8 and "sharded" not in fin
    # weights and AdamW moments came from the checkpoint: the same resume under DDP gives the same run (a fresh
    # build, or a lost optimiser state, would be far off)
    fsdp_losses, ddp_losses = step_losses(run), step_losses(d / "one_to_ddp")
    assert len(fsdp_losses) == len(ddp_losses) and max(abs(a - b) for a, b in zip(fsdp_losses, ddp_losses)) <= 1e-5
    assert max_diff(fin["model"], final(d / "one_to_ddp")["model"]) <= 1e-5


def pretrain(run: Path, data: Path, *extra: str) -> int:
    from mimkit.cli import main

    return main(["pretrain", *COMMON, "--data_path", str(data), "--output_dir", str(run), *extra])


def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(runs["dir"] / "fsdp_stopped", one)
    assert pretrain(one, runs["data"]) == 0
    log = (one / "log.txt").read_text()
    assert "world size 2 -> 1: accum_iter 1 -> 2 keeps the effective batch 4" in log
    assert "read the sharded checkpoint of 2 FSDP rank(s) on 1 process(es) without FSDP" in log
    assert final(one)["step"] == 8  # the same schedule of steps


def test_ddp_stopped_mid_epoch_resumed_on_one_process_sees_each_image_once(runs, tmp_path, monkeypatch):
    from mimkit.engine import sampling

    run = tmp_path / "ddp_stop"
    shutil.copytree(runs["dir"] / "ddp_stop", run)
    read = sampling.SeededSamples.__getitem__
    seen_here: list = []
    monkeypatch.setattr(sampling.SeededSamples, "__getitem__", lambda self, key: (seen_here.append(list(key)),
                                                                                  read(self, key))[1])
    assert pretrain(run, runs["data"], "--epochs", "1") == 0
    keys = [json.loads(line) for f in sorted((run / "keys").glob("keys-rank*.jsonl"))
            for line in f.read_text().splitlines()] + seen_here
    seen = Counter(i for e, i in keys if e == 0)
    assert sorted(seen) == list(range(16)) and set(seen.values()) == {1}  # every image of epoch 0, once
    assert "epoch 0 continues at sample 12 of its list (iteration 6 here, 3 before)" in (run / "log.txt").read_text()


def test_fsdp_final_pt_loads_in_knn_linprobe_export(runs, tmp_path, capsys):
    from mimkit.cli import main

    fin = runs["dir"] / "fsdp/checkpoints/final.pt"
    data = str(runs["labelled"])
    assert main(["knn", "--checkpoint", str(fin), "--data_path", data, "--k", "3", "--device", "cpu",
                 "--output_dir", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", "--finetune", str(fin), "--data_path", data, "--epochs", "1", "--warmup_epochs", "0",
                 "--batch_size", "8", "--device", "cpu", "--num_workers", "0", "--output_dir",
                 str(tmp_path / "lp")]) == 0
    assert main(["export", str(fin), "--format", "safetensors", "--output", str(tmp_path / "w.safetensors")]) == 0
    assert (tmp_path / "w.safetensors").stat().st_size > 0
    assert "Traceback" not in capsys.readouterr().err


def test_sharded_step_folder_is_read_whole_by_knn_and_export(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from mimkit.cli import main
    from mimkit.io import load_checkpoint_file

    ckpts = runs["dir"] / "resumed/checkpoints"
    fin = final(runs["dir"] / "resumed")["model"]
    # step-8/ holds its weights in sharded/ (2 ranks' files); read on one process they are final.pt's, bitwise
    assert torch.load(ckpts / "step-8/model.pt", weights_only=True)["model"] == {}
    for path in (ckpts / "step-8", ckpts / "step-8/model.pt"):
        whole = load_checkpoint_file(path)["model"]
        assert whole.keys() == fin.keys() and all(torch.equal(whole[k], fin[k]) for k in fin)
    assert main(["knn", "--checkpoint", str(ckpts / "step-8"), "--data_path", str(runs["labelled"]), "--k", "3",
                 "--device", "cpu", "--output_dir", str(tmp_path / "knn")]) == 0
    assert main(["knn", "--checkpoint", str(ckpts / "../checkpoints/final.pt"), "--data_path", str(runs["labelled"]),
                 "--k", "3", "--device", "cpu", "--output_dir", str(tmp_path / "knn_final")]) == 0
    a, b = (json.loads((tmp_path / k / "results.json").read_text())["metrics"] for k in ("knn", "knn_final"))
    assert a == b
    printed = capsys.readouterr().out  # no --amp given: said as the default, not "as asked"
    assert "amp off (fp32, the default: exact features" in printed and "as asked" not in printed
    out = tmp_path / "w.safetensors"
    assert main(["export", str(ckpts / "step-8"), "--format", "safetensors", "--output", str(out)]) == 0
    assert torch.equal(load_file(str(out))["cls_token"], fin["cls_token"])
    # a rank's file gone: one line naming it
    torn = tmp_path / "torn"
    shutil.copytree(ckpts / "step-8", torn)
    (torn / "sharded/__1_0.distcp").unlink()
    capsys.readouterr()
    assert main(["export", str(torn), "--format", "safetensors", "--output", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is missing __1_0.distcp" in err and len(err.strip().splitlines()) == 1


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    # a sharded checkpoint missing a rank's file: refused before any work, the folder untouched
    run = tmp_path / "torn"
    shutil.copytree(runs["dir"] / "fsdp_stopped", run)
    (run / "checkpoints/step-3/sharded/__1_0.distcp").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert pretrain(run, runs["data"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is missing __1_0.distcp" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # an accum_iter that cannot keep the effective batch after the world size changed
    run = tmp_path / "accum"
    shutil.copytree(runs["dir"] / "fsdp_stopped", run)
    assert pretrain(run, runs["data"], "--batch_size", "2", "--accum_iter", "3") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "not the checkpoint's effective batch 4" in err and "--batch_size 2 --accum_iter 2" in err
