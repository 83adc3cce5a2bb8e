"""`mimkit continual` and `mimkit examples`: seed defaults, freeze modes, fixed-mask evaluation, the stage x domain
matrix with forgetting/BWT, sequence resume, bad input before any training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.tasks import continual as CT
from mimkit.tasks import examples as EX


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    CT.add_arguments(p)
    return p.parse_args(list(argv))


def make_domain(root: Path, name: str, seed: int) -> Path:
    """A labelled domain with train/ (12 images) and val/ (6 images), 2 classes."""
    write_images(root / name / "train", 12, size=36, seed=seed, classes=2)
    write_images(root / name / "val", 6, size=36, seed=seed + 100, classes=2)
    return root / name


def continual(out: Path, *extra: str) -> int:
    return main(["continual", *TINY_MODEL, "--output_dir", str(out), "--batch_size", "4", "--num_workers", "0",
                 "--blr", "1e-2", "--warmup_epochs", "0", "--epochs", "2", "--print_freq", "100",
                 "logging.vis_freq_epochs=0", "logging.tensorboard=false", "continual.eval_batch_size=64",
                 "continual.knn_k=3", *extra])


# ---------------------------------------------------------------------------------------------- config
def test_seed_defaults_and_checkpoint_flag() -> None:
    cfg = CT.config_from_args(parse("--data_path", "/x", "--continual_checkpoint", "mae.pth"))
    assert cfg.model.type == "continual_mae_vit_large_patch16"
    assert (cfg.model.loss_mode, cfg.model.freeze_mode, cfg.model.mask_ratio) == ("all_pixels", "none", 0.75)
    assert (cfg.optimization.base_lr, cfg.schedule.epochs, cfg.optimization.batch_size) == (1e-4, 100, 64)
    assert cfg.misc.output_dir is None and cfg.model.init_from == "mae.pth"  # None: a new runs/continual/<time>
    assert CT.sequence_domains(cfg) == ["/x"]


def test_no_data_runs_the_demo_and_flags_override_it() -> None:
    cfg = CT.config_from_args(parse("--freeze_mode", "layernorm_only"))
    assert list(cfg.continual.domains) == ["photos", "microscopy", "textures"]
    assert cfg.model.type == "mae_vit_nano_patch8" and cfg.model.freeze_mode == "layernorm_only"
    sweep = CT.config_from_args(parse("--sweep"))
    assert list(sweep.continual.eval_domains) == ["photos"] and sweep.continual.base_data == "photos"


def test_preset_over_demo_keeps_the_presets_values() -> None:
    cfg = CT.config_from_args(parse("continual/all_layernorms.yaml"))
    assert (cfg.schedule.epochs, cfg.model.freeze_mode, cfg.optimization.base_lr) == (25, "layernorm_only", 3e-4)
    assert cfg.model.type == "mae_vit_nano_patch8"  # no data given: the demo model underneath


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "/x", "--domains", "a", "b"], "either --data_path"),
    (["--domains", "a", "a"], "appears twice"),
    (["--domains", "a", "schedule.epochs=2"], "put key=value overrides before --domains"),
    (["--data_path", "/x", "continual.knn_k=0"], "continual.knn_k"),
])
def test_bad_continual_options(argv: list[str], message: str) -> None:
    with pytest.raises(CT.ConfigError, match=message):
        CT.config_from_args(parse(*argv))


# ---------------------------------------------------------------------------------------------- freeze modes
VIT_B_TRAINABLE = {  # hand counts for ViT-B/16 at 224 px (fixed sin-cos position embeddings never train)
    "encoder_layernorms_only": 12 * 2 * 2 * 768,  # norm1 + norm2 (weight + bias) of 12 blocks = 36,864
    "layernorm_only": 12 * 2 * 2 * 768 + 2 * 768 + 8 * 2 * 2 * 512 + 2 * 512,  # + encoder norm, decoder LNs
    "encoder_only": 8 * (12 * 512**2 + 13 * 512) + 2 * 512 + (512 * 768 + 768) + (768 * 512 + 512) + 512,
}


@pytest.mark.parametrize("mode", list(VIT_B_TRAINABLE))
def test_freeze_mode_trainable_set_vit_b(mode: str) -> None:
    cfg = CT.config_from_args(parse("--data_path", "/x", "--model", "continual_mae_vit_base_patch16",
                                    "--freeze_mode", mode))
    with torch.device("meta"):
        model = CT.P.build_model(cfg, "meta")
    model.apply_freeze_mode(cfg.model.freeze_mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == VIT_B_TRAINABLE[mode]
    assert model.param_status()["total"]["trainable"] == VIT_B_TRAINABLE[mode]
    if mode == "encoder_layernorms_only":
        assert trainable == {f"blocks.{i}.norm{j}.{w}" for i in range(12) for j in (1, 2) for w in ("weight", "bias")}
    elif mode == "layernorm_only":
        assert all(".norm" in n or n.startswith(("norm.", "decoder_norm.")) for n in trainable)
        assert {"norm.weight", "decoder_norm.bias", "decoder_blocks.7.norm2.weight"} <= trainable
    else:
        assert all(not n.startswith(("blocks.", "patch_embed.", "cls_token", "norm.")) for n in trainable)
        assert {"mask_token", "decoder_pred.weight", "decoder_embed.bias"} <= trainable
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


# ---------------------------------------------------------------------------------------------- results
def _state(rows: list[list[tuple[float, float]]], initial: list[tuple[float, float]] | None) -> dict:
    names = ["a", "b", "c"]
    ev = lambda r: {n: {"recon_loss": v[0], "recon_loss_all": v[0], "knn_acc": v[1]} for n, v in zip(names, r)}
    return {"initial": ev(initial) if initial else None,
            "stages": [{"name": names[i], "eval": ev(r)} for i, r in enumerate(rows)]}


def test_matrices_forgetting_bwt_and_files_from_a_hand_made_sequence(tmp_path: Path) -> None:
    # recon (lower better), knn (higher better); stage i trained domain i
    rows = [[(0.5, 0.9), (0.9, 0.5), (1.0, float("nan"))],
            [(0.6, 0.8), (0.4, 0.7), (0.9, float("nan"))],
            [(0.7, 0.6), (0.5, 0.6), (0.3, float("nan"))]]
    state = _state(rows, initial=[(1.0, 0.5), (1.0, 0.4), (1.0, float("nan"))])
    s = CT.write_results(tmp_path, state, ["a", "b", "c"], n_trained=3)
    r = s["recon_loss"]
    assert r["forgetting"]["a"] == pytest.approx(0.7 - 0.5) and r["forgetting"]["b"] == pytest.approx(0.5 - 0.4)
    assert r["forgetting"]["c"] is None
    assert r["backward_transfer"] == pytest.approx(-((0.7 - 0.5) + (0.5 - 0.4)) / 2)
    assert r["drop_from_initial"]["c"] == pytest.approx(0.3 - 1.0)
    k = s["knn_acc"]
    assert k["forgetting"]["a"] == pytest.approx(0.9 - 0.6) and k["forgetting"]["b"] == pytest.approx(0.7 - 0.6)
    assert k["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.6 - 0.7)) / 2)
    assert k["final_average"] == pytest.approx(0.6)  # the unlabelled domain is left out, not NaN
    csv = (tmp_path / "recon_loss.csv").read_text().splitlines()
    assert csv[0] == "stage,a,b,c" and csv[1] == "initial,1.0,1.0,1.0" and csv[4] == "after_c,0.7,0.5,0.3"
    saved = json.loads((tmp_path / "knn_acc.json").read_text())
    assert saved["matrix"][2] == [0.6, 0.6, None] and saved["stages"] == ["after_a", "after_b", "after_c"]
    from PIL import Image

    with Image.open(tmp_path / "matrix.png") as im:
        assert im.size[0] > 300 and im.size[1] > 4 * 24 * 2  # 2 panels of initial + 3 stage rows
    table = CT.format_summary(state, ["a", "b", "c"], s)
    assert "after_b" in table and "average forgetting 0.1500" in table


def test_partial_sequence_matrix_has_one_row_per_finished_stage(tmp_path: Path) -> None:
    state = _state([[(0.5, 0.9), (0.9, 0.5), (1.0, 0.2)]], initial=None)
    s = CT.write_results(tmp_path, state, ["a", "b", "c"], n_trained=3)
    assert np.array(s["recon_loss"]["matrix"]).shape == (1, 3)
    assert s["recon_loss"]["backward_transfer"] is None and "drop_from_initial" not in s["recon_loss"]


# ---------------------------------------------------------------------------------------------- bad input
def _tiny_checkpoint(path: Path, **kwargs) -> Path:
    from mimkit.models import create_model

    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": create_model("mae_vit_tiny_patch16", **{**base, **kwargs}).state_dict()}, path)
    return path


@pytest.mark.parametrize("case", ["freeze_mode", "loss_mode", "missing", "empty", "architecture", "patch_size"])
def test_bad_input_is_one_line_before_any_training(tmp_path: Path, case: str, capsys) -> None:
    a = make_domain(tmp_path, "a", 0)
    domains = ["--domains", str(a)]
    extra: list[str] = []
    if case == "freeze_mode":
        extra, message = ["--freeze_mode", "layernorms"], "freeze_mode"
    elif case == "loss_mode":
        extra, message = ["--loss_mode", "all"], "loss_mode"
    elif case == "missing":
        domains, message = ["--domains", str(a), str(tmp_path / "nope")], "data path not found"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        domains, message = ["--domains", str(a), str(tmp_path / "empty")], "no images found"
    elif case == "architecture":
        ck = _tiny_checkpoint(tmp_path / "deep.pt", depth=3)
        extra, message = ["--continual_checkpoint", str(ck)], "does not fit model"
    else:
        ck = _tiny_checkpoint(tmp_path / "p4.pt", patch_size=4)
        extra, message = ["--continual_checkpoint", str(ck)], "shape mismatch"
    out = tmp_path / "run"
    assert continual(out, *extra, *domains) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit continual: error:") and message in err and "\n" not in err
    assert not list(out.glob("stage-*"))  # nothing trained


# ---------------------------------------------------------------------------------------------- examples
def test_examples_list_dry_run_and_unknown(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    assert main(["examples"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {k} " in listing for k in ("1", "2", "2b", "3", "4", "5"))
    assert main(["examples", "--dry_run", "2b", "--data_path", "/d", "schedule.epochs=1"]) == 0
    assert capsys.readouterr().out.strip() == "$ mimkit continual continual/all_layernorms.yaml --data_path /d " \
                                              "schedule.epochs=1"
    assert main(["examples", "2c"]) == 2 and "unknown example '2c'" in capsys.readouterr().err
    answers = iter(["7", "2b"])
    assert EX.menu(lambda _: next(answers)) == "2b"


def test_every_example_preset_is_a_valid_config_with_the_seeds_values() -> None:
    want = {"1": (50, "none", "all_pixels", 1e-4), "2": (30, "encoder_layernorms_only", "all_pixels", 5e-4),
            "2b": (25, "layernorm_only", "all_pixels", 3e-4), "3": (40, "encoder_only", "all_pixels", 2e-4),
            "4": (20, "none", "masked_only", 1e-4), "5": (5, "none", "all_pixels", 1e-4)}
    for key, (preset, _) in EX.EXAMPLES.items():
        cfg = CT.config_from_args(parse(preset, "--data_path", "/x"))
        got = (cfg.schedule.epochs, cfg.model.freeze_mode, cfg.model.loss_mode, cfg.optimization.base_lr)
        assert got == want[key], key
        assert cfg.model.type == "continual_mae_vit_large_patch16"  # with data: the seed's default model


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sequence_freezes_evaluates_and_resumes_mid_stage(tmp_path: Path, monkeypatch) -> None:
    a, b = make_domain(tmp_path, "a", 0), make_domain(tmp_path, "b", 1)
    start = _tiny_checkpoint(tmp_path / "start.pt")
    args = ["--freeze_mode", "encoder_layernorms_only", "--continual_checkpoint", str(start), "--save_freq_steps",
            "1", "--domains", str(a), str(b)]
    straight = tmp_path / "straight"
    assert continual(straight, *args) == 0

    # frozen weights bitwise unchanged after each stage, the trained LayerNorms moved
    init = torch.load(start, weights_only=True)["model"]
    for k, stage in enumerate(["stage-1-a", "stage-2-b"]):
        ck = torch.load(straight / stage / "checkpoints/final.pt", weights_only=True)
        trained = {n for n in init if n.startswith("blocks.") and ".norm" in n}
        for n, v in ck["model"].items():
            if n in trained:
                assert not torch.equal(v, init[n]), n
            else:
                assert torch.equal(v, init[n]), n
        # the optimiser holds state for the 8 LayerNorm tensors only (frozen params get none)
        assert len(ck["optimizer"]["state"]) == len(trained) == 8
        assert sum(len(g["params"]) for g in ck["optimizer"]["param_groups"]) == 8

    state = json.loads((straight / "sequence.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["a", "b"] and state["trainable_params"] == 2 * 2 * 2 * 32
    assert (straight / "recon_loss.csv").read_text().splitlines()[1].startswith("initial,")
    R = np.loadtxt(straight / "recon_loss.csv", delimiter=",", skiprows=2, usecols=(1, 2))
    assert R.shape == (2, 2) and np.all(R > 0)
    assert json.loads((straight / "knn_acc.json").read_text())["forgetting"]["b"] is None
    assert (straight / "matrix.png").exists() and (straight / "log.txt").exists()

    # the last row is the final weights re-evaluated with the same fixed masks
    cfg = CT.config_from_args(parse(*TINY_MODEL, "continual.knn_k=3", "--domains", str(a), str(b)))
    model = CT.P.build_model(cfg)
    model.load_state_dict(torch.load(straight / "stage-2-b/checkpoints/final.pt", weights_only=True)["model"])
    doms = CT.open_domains(cfg, model.num_patches, model.in_chans)
    again = CT.evaluate(model, doms, cfg)
    assert [again[n]["recon_loss"] for n in ("a", "b")] == pytest.approx(R[1].tolist(), rel=1e-6)
    # ... and recon_loss / recon_loss_all are the model's own masked_only / all_pixels losses on those masks
    imgs = torch.stack([doms[0].val[i][0] for i in range(len(doms[0].val))])
    with torch.no_grad():
        model.eval()
        masked = model(imgs, 0.75, doms[0].noise, "masked_only")[0].item()
        dense = model(imgs, 0.75, doms[0].noise, "all_pixels")[0].item()
    assert again["a"]["recon_loss"] == pytest.approx(masked, rel=1e-5)
    assert again["a"]["recon_loss_all"] == pytest.approx(dense, rel=1e-5) and masked != pytest.approx(dense)

    # killed one step into stage 2: the rerun skips stage 1 and continues stage 2 at its step, bitwise
    split = tmp_path / "split"
    real_train = CT.P.train

    def killed_in_stage_2(cfg, *a_, **kw):
        if cfg.data.data_path == str(b):
            cfg.misc.max_steps = 1
            real_train(cfg, *a_, **kw)
            raise KeyboardInterrupt
        return real_train(cfg, *a_, **kw)

    monkeypatch.setattr(CT.P, "train", killed_in_stage_2)
    assert continual(split, *args) == 130
    assert len(json.loads((split / "sequence.json").read_text())["stages"]) == 1
    monkeypatch.setattr(CT.P, "train", real_train)
    assert continual(split, *args) == 0
    log = (split / "log.txt").read_text()
    assert "stage 1/2 (a) already finished" in log and "at epoch 0, batch 1, step 1" in log
    for stage in ("stage-1-a", "stage-2-b"):
        w1 = torch.load(straight / stage / "checkpoints/final.pt", weights_only=True)["model"]
        w2 = torch.load(split / stage / "checkpoints/final.pt", weights_only=True)["model"]
        assert all(torch.equal(w1[n], w2[n]) for n in w1), stage
    assert (split / "recon_loss.csv").read_text() == (straight / "recon_loss.csv").read_text()


@pytest.mark.slow
def test_encoder_only_trains_the_decoder_without_encoder_autograd(tmp_path: Path) -> None:
    a = make_domain(tmp_path, "a", 0)
    start = _tiny_checkpoint(tmp_path / "start.pt")
    out = tmp_path / "run"
    assert continual(out, "--freeze_mode", "encoder_only", "--loss_mode", "masked_only", "--continual_checkpoint",
                     str(start), "--data_path", str(a), "continual.eval_initial=false") == 0
    init = torch.load(start, weights_only=True)["model"]
    final = torch.load(out / "stage-1-a/checkpoints/final.pt", weights_only=True)
    for n, v in final["model"].items():
        encoder = n.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed", "norm."))
        assert torch.equal(v, init[n]) == (encoder or n == "decoder_pos_embed"), n
    assert "encoder.blocks.attn" in (out / "stage-1-a/log.txt").read_text()  # the parameter table was logged
    state = json.loads((out / "sequence.json").read_text())
    assert state["initial"] is None and len(state["stages"]) == 1
