"""One model name is one architecture; a checkpoint's architecture beats presets (issue 10, item 2)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL, write_images

from mimkit.cli import build_parser, main
from mimkit.models import create_model
from mimkit.models.registry import describe, list_models
from mimkit.tasks import pretrain as P
from mimkit.tasks.continual import config_from_args as continual_config


def _pretrain_cfg(argv: list[str]):
    return P.config_from_args(build_parser().parse_args(["pretrain", *argv]))


def test_demo_models_have_names_of_their_own(capsys) -> None:
    assert {"mae_vit_demo_patch8", "mae_vit_nano_patch8"} <= set(list_models())
    demo = create_model("mae_vit_demo_patch8")
    assert (demo.patch_size, demo.depth, demo.embed_dim, len(demo.decoder_blocks)) == (8, 6, 192, 2)
    old = create_model("mae_vit_tiny_patch16", img_size=64, patch_size=8, depth=6, decoder_depth=2)  # the old demo
    assert {k: v.shape for k, v in demo.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    assert "patch 8, 6 blocks x 192-d (3 heads), decoder 2 blocks x 128-d, 64x64 px" in describe(demo)
    assert main(["models"]) == 0
    assert "mae_vit_demo_patch8" in capsys.readouterr().out


def test_explicit_model_never_takes_the_demo_presets_kwargs() -> None:
    cfg = _pretrain_cfg(["--model", "mae_vit_tiny_patch16", "--input_size", "32"])
    assert cfg.misc.preset == "pretrain/demo.yaml" and dict(cfg.model.kwargs) == {}
    model = P.build_model(cfg, "meta")
    assert (model.patch_size, model.depth, model.embed_dim) == (16, 12, 192)  # the real ViT-Ti/16
    # kwargs given beside the user's own --model still apply
    cfg = _pretrain_cfg(["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "model.kwargs.depth=2"])
    assert dict(cfg.model.kwargs) == {"patch_size": 8, "depth": 2}


def test_a_config_file_kwargs_belong_to_its_model(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: {type: mae_vit_tiny_patch16, kwargs: {depth: 3}}\ndata: {data_path: /d}\n")
    assert dict(_pretrain_cfg([str(f)]).model.kwargs) == {"depth": 3}
    assert dict(_pretrain_cfg([str(f), "--model", "mae_vit_small_patch16"]).model.kwargs) == {}
    # an alias names the same model: its kwargs stay
    assert dict(_pretrain_cfg([str(f), "--model", "mae_vit_tiny_patch16"]).model.kwargs) == {"depth": 3}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny pretraining run: type mae_vit_tiny_patch16 with kwargs (the old demo's shape of config)."""
    tmp = tmp_path_factory.mktemp("arch")
    data = tmp / "imgs"
    write_images(data, 8)
    run = tmp / "run"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(run), "--batch_size", "4",
                 "--num_workers", "0", "--epochs", "1", "--max_steps", "1"]) == 0
    return run / "checkpoints" / "final.pt", data


@pytest.mark.parametrize("extra", [[], ["--model", "mae_vit_tiny_patch16"]])
def test_continual_builds_the_checkpoints_architecture_over_the_demo_preset(tiny_run, extra) -> None:
    from mimkit.models.convert import load_into_model

    ckpt, _ = tiny_run
    args = build_parser().parse_args(["continual", "--continual_checkpoint", str(ckpt), *extra])
    cfg = continual_config(args)
    assert cfg.misc.preset == "continual/demo.yaml" and list(cfg.continual.domains)  # the demo sequence
    assert cfg.model.type == "mae_vit_tiny_patch16"
    assert dict(cfg.model.kwargs) == {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                      "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
    assert cfg.data.input_size == 32  # the checkpoint's size beats the demo preset's 64
    model = P.build_model(cfg, "cpu")
    report = load_into_model(model, str(ckpt))
    assert not report.missing and not report.unexpected


def test_checkpoint_architecture_beats_a_preset_file_but_not_a_flag(tiny_run) -> None:
    ckpt, data = tiny_run
    cfg = continual_config(build_parser().parse_args(
        ["continual", "continual/demo.yaml", "--continual_checkpoint", str(ckpt), "--domains", "photos"]))
    assert cfg.model.type == "mae_vit_tiny_patch16" and cfg.model.kwargs.depth == 2
    cfg = continual_config(build_parser().parse_args(
        ["continual", "--continual_checkpoint", str(ckpt), "--data_path", str(data),
         "--model", "mae_vit_base_patch16"]))
    assert cfg.model.type == "mae_vit_base_patch16" and dict(cfg.model.kwargs) == {}


@pytest.mark.parametrize("model_flag", [[], ["--model", "mae_vit_tiny_patch16"]])
def test_eval_commands_take_the_checkpoints_kwargs(tiny_run, model_flag) -> None:
    from mimkit.models.loading import model_from_checkpoint

    ckpt, _ = tiny_run
    model, _ = model_from_checkpoint(ckpt, *(model_flag[1:] or [None]))
    assert (model.patch_size, model.depth, model.embed_dim) == (8, 2, 32)


def test_eval_command_with_another_model_builds_that_model(tiny_run) -> None:
    from mimkit.errors import CheckpointError
    from mimkit.models.loading import model_from_checkpoint

    ckpt, _ = tiny_run
    with pytest.raises(CheckpointError):  # a ViT-S/16 is built as registered, so the tiny weights do not fit
        model_from_checkpoint(ckpt, "mae_vit_small_patch16")


def test_startup_line_states_the_architecture(tmp_path) -> None:
    data = tmp_path / "imgs"
    write_images(data, 8)
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(tmp_path / "r"),
                 "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--max_steps", "1"]) == 0
    first = (tmp_path / "r/log.txt").read_text().splitlines()[0]
    assert "mae_vit_tiny_patch16 (patch 8, 2 blocks x 32-d (2 heads), decoder 1 blocks x 32-d, 32x32 px" in first
    assert torch.load(tmp_path / "r/checkpoints/final.pt", weights_only=True)["config"]["model"]["kwargs"]["depth"] == 2


def test_another_model_than_the_checkpoints_is_told_which_it_holds(tmp_path) -> None:
    from mimkit.errors import CheckpointError
    from mimkit.tasks.preflight import load_weights

    ckpt = tmp_path / "demo.pt"
    torch.save({"model": create_model("mae_vit_nano_patch8").state_dict(), "mimkit_version": "0",
                "config": {"model": {"type": "mae_vit_nano_patch8", "kwargs": {}}, "data": {"input_size": 64}}}, ckpt)
    with pytest.raises(CheckpointError, match="the checkpoint holds mae_vit_nano_patch8: drop --model"):
        load_weights(create_model("mae_vit_tiny_patch16", img_size=64), str(ckpt))
