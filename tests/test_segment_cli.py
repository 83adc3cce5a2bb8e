"""`mimkit segment` from the CLI: bad input stops before training, bitwise resume, a tiny run that learns,
--eval and --predict from its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import write_ade, write_generic

from mimkit.cli import main

TINY = [
    "--random_init", "--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32",
    "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2",
    "model.kwargs.decoder_embed_dim=32", "model.kwargs.decoder_depth=1", "model.kwargs.decoder_num_heads=2",
    "model.channels=16", "model.aux_channels=8", "--batch_size", "8", "--num_workers", "0",
    "--test_mode", "whole", "logging.tensorboard=false", "--no_auto_resume",
]


def _fails(args, capsys, match: str, out) -> None:
    assert main(["segment", *args, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (out / "checkpoints").exists() and not (out / "log.txt").exists()  # nothing started


def test_bad_inputs_fail_with_one_line_before_training(tmp_path, capsys) -> None:
    common = [*TINY, "--max_iters", "2"]
    lonely = write_generic(tmp_path / "lonely")
    (lonely / "val" / "masks" / "2.png").unlink()
    _fails([*common, "--data_path", str(lonely)], capsys, "has no mask", tmp_path / "o1")
    sized = write_generic(tmp_path / "sized", sizes={("train", 2): (31, 24)})
    _fails([*common, "--data_path", str(sized)], capsys, "is 31x24 but its image", tmp_path / "o2")
    labels = write_generic(tmp_path / "labels", label_max=9)
    _fails([*common, "--data_path", str(labels)], capsys, "but there are 3 classes", tmp_path / "o3")
    ade = write_ade(tmp_path / "ade" / "ADEChallengeData2016", label_max=151)
    _fails([*common, "--data_path", str(tmp_path / "ade")], capsys,
           "has label 151 but there are 150 classes: the values allowed in a mask file are 0-150", tmp_path / "o4")
    empty = write_generic(tmp_path / "empty")
    for f in (empty / "val" / "images").iterdir():
        f.unlink()
    _fails([*common, "--data_path", str(empty)], capsys, "split is empty", tmp_path / "o5")
    torch.save({"model": {"head.weight": torch.zeros(3, 4)}}, tmp_path / "noenc.pt")
    _fails(["--finetune", str(tmp_path / "noenc.pt"), "--max_iters", "2", "--data_path", str(lonely.parent / "sized")],
           capsys, "holds no ViT encoder", tmp_path / "o6")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "flat.pt")  # a flat dict of no known layout: the line names it
    _fails(["--finetune", str(tmp_path / "flat.pt"), "--max_iters", "2"], capsys,
           f"{tmp_path / 'flat.pt'}: not an MAE, Hugging Face ViTMAE or timm ViT state dict (first keys: foo)",
           tmp_path / "o6b")
    _fails([*common, "--epochs", "1"], capsys, "exactly one of --max_iters and --epochs", tmp_path / "o7")
    _fails(["--eval"], capsys, "--eval needs --resume", tmp_path / "o8")
    _fails([*common, "--num_classes", "5"], capsys, "the built-in mosaics have 8 classes", tmp_path / "o9")
    _fails([*common, "--out_indices", "0,1,1,5"], capsys, "bad value for --out_indices (model.taps): [0, 1, 1, 5]",
           tmp_path / "o10")


def test_generic_layout_trains_with_a_pretrained_encoder(tmp_path) -> None:
    from test_evaluate import save_tiny

    ckpt = save_tiny(tmp_path / "enc.pt")
    data = write_generic(tmp_path / "data", n=4)
    out = tmp_path / "run"
    args = ["segment", "--finetune", str(ckpt), "--data_path", str(data), "--input_size", "16", "--batch_size", "2",
            "--max_iters", "2", "--num_workers", "0", "model.channels=8", "model.aux_channels=8",
            "--output_dir", str(out), "logging.tensorboard=false", "test.crop_size=[16,16]", "test.stride=[8,8]"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["metrics"]["per_class"]) == {"sky", "road", "car"}
    assert res["config"]["model"]["arch"]["img_size"] == [16, 16] and res["test_mode"] == "slide"
    assert 0 <= res["metrics"]["mIoU"] <= 100 and res["metrics"]["pixels"] == 4 * 24 * 32
    first = (out / "log.txt").read_text().splitlines()[0]  # the encoder once, without the pretraining decoder
    assert f"encoder from {ckpt} [patch " in first and "decoder" not in first and first.count("patch ") == 1, first


@pytest.mark.slow
def test_resume_mid_run_is_bitwise(tmp_path) -> None:
    args = [*TINY, "--max_iters", "4", "--save_freq_steps", "2", "--keep_last_n", "0", "test.num_overlays=0"]
    a = tmp_path / "straight"
    assert main(["segment", *args, "--output_dir", str(a)]) == 0
    b = tmp_path / "resumed"
    assert main(["segment", *args, "--output_dir", str(b), "--resume", str(a / "checkpoints" / "step-2")]) == 0
    sa = torch.load(a / "checkpoints" / "final.pt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "final.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    ra = json.loads((a / "results.json").read_text())["metrics"]
    rb = json.loads((b / "results.json").read_text())["metrics"]
    assert ra["mIoU"] == rb["mIoU"]


@pytest.mark.slow
def test_tiny_run_beats_the_majority_class_then_eval_and_predict(tmp_path) -> None:
    from mimkit.data.mosaics import build_mosaics

    out = tmp_path / "run"
    assert main(["segment", *TINY, "--max_iters", "60", "--lr", "2e-3", "--layer_decay", "0.9",
                 "--warmup_iters", "5", "--output_dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["metrics"]
    _, train_masks, classes = build_mosaics("train")
    _, val_masks, _ = build_mosaics("val")
    majority = np.bincount(train_masks.ravel(), minlength=len(classes)).argmax()
    majority_acc = 100 * float((val_masks == majority).mean())
    majority_miou = majority_acc / len(np.unique(val_masks))  # its IoU = its share; the others 0
    assert res["aAcc"] > majority_acc + 10, (res["aAcc"], majority_acc)
    assert res["mIoU"] > 2 * majority_miou, (res["mIoU"], majority_miou)
    assert len(list((out / "overlays").glob("*.png"))) == 8  # the demo preset draws 8
    panel = np.array(Image.open(next((out / "overlays").glob("*.png"))))
    assert panel.shape == (64, 3 * 64, 3)  # image | ground truth | prediction

    ckpt = out / "checkpoints" / "final.pt"
    ev = tmp_path / "eval"
    assert main(["segment", "--eval", "--resume", str(ckpt), "--output_dir", str(ev), "--test_mode", "whole",
                 "logging.tensorboard=false"]) == 0
    res_eval = json.loads((ev / "results.json").read_text())
    assert res_eval["metrics"]["mIoU"] == pytest.approx(res["mIoU"]) and res_eval["eval_only"]
    # into the run's own folder: its results.json and overlays/ stay, the evaluation goes beside them
    assert main(["segment", "--eval", "--resume", str(ckpt), "--output_dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["metrics"] == res
    assert json.loads((out / "results-2.json").read_text())["metrics"]["mIoU"] == pytest.approx(res["mIoU"])
    assert len(list((out / "overlays-2").glob("*.png"))) == 8

    images = tmp_path / "photos"
    images.mkdir()
    for i, size in enumerate([(40, 30), (64, 64)]):
        arr = (np.random.default_rng(i).random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(images / f"p{i}.png")
    pr = tmp_path / "pred"
    assert main(["segment", "--predict", str(images), "--resume", str(ckpt), "--output_dir", str(pr)]) == 0
    label = np.array(Image.open(pr / "predictions" / "p0.png_label.png"))
    assert label.shape == (30, 40) and label.max() < len(classes)
    assert np.array(Image.open(pr / "predictions" / "p0.png_overlay.png")).shape == (30, 40, 3)
    assert (pr / "predictions" / "p1.png_overlay.png").exists()


def test_help_shows_every_default(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["segment", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sets optimization.layer_decay (default: 0.65)" in out and "sets data.input_size (default: 512)" in out
    assert "sets schedule.max_iters (default: 160000)" in out and "sets test.mode (default: slide)" in out
    assert "Taps [3, 5, 7, 11] of the encoder (ViT-B's 12 blocks; scaled to the encoder's depth)" in out
    assert "the demo preset segment/demo.yaml goes beneath your flags" in out  # which defaults apply when
    assert "--eval / --predict use the checkpoint's own run settings" in out


def _tiny_mae(path, depth: int):
    """A mimkit MAE checkpoint of `depth` blocks, 16 wide, patch 8 (not the ADE20K preset's ViT-B)."""
    from mimkit.engine.checkpoint import make_checkpoint
    from mimkit.models import create_model

    kw = dict(patch_size=8, depth=depth, embed_dim=16, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
              decoder_num_heads=2)
    m = create_model("mae_vit_tiny_patch16", img_size=16, **kw)
    cfg = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": kw}, "data": {"input_size": 16}}
    torch.save(make_checkpoint(model=m.state_dict(), optimizer={}, epoch=0, step=0, config=cfg), path)
    return path


@pytest.mark.slow
def test_checkpoint_architecture_beats_the_ade20k_preset_and_taps_scale(tmp_path) -> None:
    ckpt = _tiny_mae(tmp_path / "enc.pt", depth=6)
    data = write_generic(tmp_path / "data", n=2)
    cpu = ["--data_path", str(data), "--input_size", "16", "--max_iters", "1", "--num_workers", "0", "--amp", "off",
           "model.channels=8", "model.aux_channels=8", "data.augmentation.scale=null", "test.crop_size=[16,16]",
           "logging.tensorboard=false"]
    out = tmp_path / "ade"
    assert main(["segment", "segment/ade20k_vit_base.yaml", "--finetune", str(ckpt), *cpu, "--output_dir",
                 str(out)]) == 0
    arch = json.loads((out / "results.json").read_text())["config"]["model"]["arch"]
    assert arch["depth"] == 6 and arch["embed_dim"] == 16 and arch["taps"] == [1, 2, 3, 5]
    log = (out / "log.txt").read_text()
    assert "taps [1, 2, 3, 5] (MMSeg's [3, 5, 7, 11] scaled to 6 blocks)" in log
    assert "config segment/ade20k_vit_base.yaml over the schema's defaults" in log
    out2 = tmp_path / "mine"
    assert main(["segment", "segment/ade20k_vit_base.yaml", "--finetune", str(ckpt), *cpu, "--out_indices",
                 "0,2,4,5", "--output_dir", str(out2)]) == 0
    assert json.loads((out2 / "results.json").read_text())["config"]["model"]["arch"]["taps"] == [0, 2, 4, 5]
    assert "taps [0, 2, 4, 5] (yours, of 6 blocks)" in (out2 / "log.txt").read_text()


@pytest.mark.slow
def test_max_steps_rerun_resumes_and_a_finished_run_stays_finished(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["segment", *TINY, "--max_iters", "4", "--eval_interval", "4", "test.num_overlays=1", "--output_dir",
            str(out)]
    args.remove("--no_auto_resume")
    assert main([*args, "--max_steps", "2"]) == 0
    log = (out / "log.txt").read_text()
    assert "warning: the run is 4 steps but the warmup is 15" in log  # the demo preset's warmup
    assert main([*args, "--max_steps", "2"]) == 0  # the same command: nothing to train, no restart
    log = (out / "log.txt").read_text()
    assert "nothing to train: step 2 already reached misc.max_steps = 2" in log and log.count("epoch 0 [1/") == 1
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2
    assert main(args) == 0  # more steps: resumes at step 2
    assert torch.load(out / "checkpoints" / "final.pt", weights_only=True)["step"] == 4
    log = (out / "log.txt").read_text()
    assert "resumed at epoch 0, step 2" in log and log.count("eval step 4:") == 1  # the last eval runs once
    assert log.rindex("resumed at epoch 0, step 2") > log.rindex("mimkit segment: ")  # after the start-up line
    # the start-up line shows the encoder --random_init built from --patch_size and model.kwargs
    assert "mae_vit_tiny_patch16 (random init, seed 0) [patch 8, 2 blocks x 32-d (2 heads), 32x32 px]" in log
    # --max_iters is the schedule: it ends there as done, not as a max_steps stop with a rest to resume
    assert "misc.max_steps = 4" not in log and "epoch 0 stopped after iteration 4" not in log
    assert "epoch 0 done (4 of 30 iterations: the schedule ends here)" in log
    res = json.loads((out / "results.json").read_text())
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert evals[-1]["step"] == 4 and evals[-1]["mIoU"] == res["metrics"]["mIoU"]  # one unit (%) everywhere
    assert res["units"] == "percent" and res["history"][-1]["mIoU"] == res["metrics"]["mIoU"]
    assert len(list((out / "overlays").glob("*.png"))) == 1
    assert main(args) == 0  # finished: results stand, nothing evaluated again
    assert (out / "log.txt").read_text().count("eval step 4:") == 1


@pytest.mark.slow
def test_two_rank_gloo_ddp_run_sums_one_confusion_matrix(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimkit",
           "segment", *TINY, "--max_iters", "2", "--batch_size", "4", "--device", "cpu", "test.num_overlays=0",
           "--output_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and "effective batch 8" in (out / "log.txt").read_text()
    assert res["metrics"]["pixels"] == 60 * 64 * 64  # both ranks' halves of the 60 val mosaics, counted once
    ev = tmp_path / "ev"  # the same checkpoint on one process scores the same
    assert main(["segment", "--eval", "--resume", str(out / "checkpoints" / "final.pt"), "--output_dir",
                 str(ev)]) == 0
    assert json.loads((ev / "results.json").read_text())["metrics"] == res["metrics"]
