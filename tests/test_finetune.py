"""Fine-tuning: layer decay = the official scales, classifier = encoder maths, pos-embed interpolation, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import TINY_KW, save_tiny, write_colour_set

from mimkit.cli import main
from mimkit.models import create_model
from mimkit.models.heads import vit_classifier
from mimkit.tasks.finetune import layer_decay_groups


def _official_layer_id(name: str, num_layers: int) -> int:
    # util/lr_decay.py get_layer_id_for_vit, restated
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


@pytest.mark.parametrize("global_pool,depth,decay", [(True, 3, 0.75), (False, 2, 0.65)])
def test_layer_decay_scales_equal_official(global_pool, depth, decay) -> None:
    enc = create_model("mae_vit_tiny_patch16", img_size=32, **{**TINY_KW, "depth": depth})
    model = vit_classifier(enc, 7, global_pool=global_pool)
    groups = layer_decay_groups(model, 0.05, decay)
    by_param = {id(p): g for g in groups for p in g["params"]}
    num_layers = depth + 1
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == pytest.approx(decay ** (num_layers - _official_layer_id(name, num_layers))), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_classifier_keeps_encoder_maths() -> None:
    torch.manual_seed(0)
    enc = create_model("mae_vit_tiny_patch16", img_size=32, **TINY_KW).eval()
    x = torch.randn(2, 3, 32, 32)
    cls = vit_classifier(enc, 4, global_pool=False).eval()
    assert torch.allclose(cls.forward_features(x), enc.forward_features(x), atol=1e-5)
    assert cls.pos_embed.requires_grad  # learnable in fine-tuning, as the official timm model
    avg = vit_classifier(enc, 4, global_pool=True).eval()
    (raw,) = enc.forward_features(x, layers=(1,))
    want = torch.nn.functional.layer_norm(raw[:, 1:].mean(1), (32,), eps=1e-6)  # fresh fc_norm
    assert torch.allclose(avg.forward_head(avg.forward_features(x), pre_logits=True), want, atol=1e-5)
    assert avg.head.weight.std() < 1e-4 and torch.all(avg.head.bias == 0)  # trunc_normal(2e-5), zero bias


@pytest.mark.slow
def test_finetune_cli_interpolates_and_evaluates(tmp_path) -> None:
    from mimkit.models.convert import interpolate_pos_embed

    ckpt = save_tiny(tmp_path / "tiny.pt")
    data = write_colour_set(tmp_path / "data", size=40)
    out = tmp_path / "run"
    argv = ["finetune", "--finetune", str(ckpt), "--data_path", str(data), "--input_size", "48", "--epochs", "2",
            "--warmup_epochs", "1", "--batch_size", "8", "--output_dir", str(out), "--device", "cpu",
            "--num_workers", "0", "--mixup", "0.8", "--cutmix", "1.0", "--clip_grad", "1.0", "--drop_path", "0.1"]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert len(r["history"]) == 2 and {"acc1", "acc5", "best_acc1"} <= set(r["metrics"])
    assert r["config"]["model"]["nb_classes"] == 3 and r["config"]["model"]["arch"]["img_size"] == [48, 48]
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    # 32 px / patch 8 (4x4) pretrained -> 48 px (6x6): the starting pos embed was the bicubic interpolation
    src = torch.load(ckpt, weights_only=True)["model"]["pos_embed"]
    assert best["model"]["pos_embed"].shape == interpolate_pos_embed(src, (6, 6)).shape == (1, 37, 32)
    assert best["extra"]["EvalEveryEpoch"]["best_acc1"] == r["metrics"]["best_acc1"]
    ev = tmp_path / "eval"
    assert main(["finetune", "--data_path", str(data), "--input_size", "48", "--eval", "--resume",
                 str(out / "checkpoints" / "best.pt"), "--output_dir", str(ev), "--device", "cpu"]) == 0
    assert json.loads((ev / "results.json").read_text())["metrics"]["acc1"] == pytest.approx(r["metrics"]["best_acc1"])
