"""Precision: `--amp auto` on CPU follows the CPU's bf16 units; bf16 keeps losses, state and checkpoints in fp32;
fused AdamW gives the unfused update."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from mimkit.cli import main
from mimkit.engine import precision as P
from mimkit.engine.optim import build_adamw, fused_supported, param_groups
from mimkit.models import create_model

CPU = torch.device("cpu")
NO_BF16 = {"avx512_bf16": False, "amx_bf16": False, "avx2": True}


def tiny_mae(norm_pix: bool = True):
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix)


@pytest.mark.parametrize("caps, expected, feature", [
    ({**NO_BF16, "avx512_bf16": True}, "bf16", "AVX-512 BF16"),
    ({**NO_BF16, "amx_bf16": True}, "bf16", "AMX-BF16"),
    (NO_BF16, "off", "neither"),
])
def test_auto_on_cpu_follows_the_reported_capability(monkeypatch, caps, expected, feature) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    amp, why = P.amp_decision("auto", CPU)
    assert amp == expected and why.startswith("auto: ") and feature in why
    # an explicit choice always wins
    assert P.resolve_amp("off", CPU) == "off"
    assert P.resolve_amp("bf16", CPU) == "bf16"
    assert P.amp_decision("fp16", CPU)[0] == "off"


def test_auto_without_get_capabilities_asks_the_older_probes(monkeypatch) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert P.amp_decision("auto", CPU)[0] == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert P.amp_decision("auto", CPU)[0] == "off"


def test_bf16_step_loss_is_within_tolerance_of_fp32() -> None:
    """Same weights, images and masks: the bf16-autocast loss is within 2% of fp32, and fp32 itself."""
    model = tiny_mae()
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(imgs, mask_ratio=0.75, noise=noise)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, pred, _ = model(imgs, mask_ratio=0.75, noise=noise)
    assert pred.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    assert low.dtype == torch.float32  # the loss (and the norm_pix targets) in fp32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.slow
def test_bf16_resume_is_bitwise_and_state_stays_fp32(tmp_path: Path, image_folder: Path) -> None:
    def pretrain(out: Path, *extra: str) -> int:
        return main(["pretrain", *TINY_MODEL, "--data_path", str(image_folder), "--output_dir", str(out),
                     "--batch_size", "4", "--num_workers", "0", "--blr", "1e-2", "--warmup_epochs", "1",
                     "--epochs", "2", "--amp", "bf16", "--device", "cpu", "--norm_pix_loss", *extra])

    assert pretrain(tmp_path / "straight") == 0
    assert pretrain(tmp_path / "split", "--max_steps", "5") == 0
    assert pretrain(tmp_path / "split") == 0
    a = torch.load(tmp_path / "straight/checkpoints/final.pt", weights_only=True)
    b = torch.load(tmp_path / "split/checkpoints/final.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert a["model"][k].dtype == torch.float32, k  # checkpoints hold fp32 weights
    for st in a["optimizer"]["state"].values():  # AdamW moments in fp32
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    log = (tmp_path / "straight/log.txt").read_text()
    assert "amp bf16 (--amp bf16 as asked)" in log


def test_fused_adamw_gives_the_unfused_update_with_the_same_groups() -> None:
    if not fused_supported(CPU):
        pytest.skip("this torch has no fused AdamW kernel on CPU")
    model = tiny_mae()
    twin, init = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    fused = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95), CPU)
    plain = build_adamw(param_groups(twin, 0.05), 1e-3, (0.9, 0.95), CPU, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [(g["group"], g["weight_decay"], len(g["params"])) for g in fused.param_groups] == \
        [(g["group"], g["weight_decay"], len(g["params"])) for g in plain.param_groups]
    # the same gradients into both (a real backward first, then random ones): only the update rule differs
    model(torch.randn(4, 3, 32, 32), mask_ratio=0.75)[0].backward()
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        for p, q in zip(model.parameters(), twin.parameters()):
            if i or p.grad is None:
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    moved = 0
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
        moved += int(not torch.equal(p, init[n]))
    assert moved > 0  # the comparison is not vacuous


def test_feature_pass_under_bf16_is_close_to_fp32_and_returns_fp32() -> None:
    from mimkit.data.sources import open_dataset
    from mimkit.data.transforms import eval_transform
    from mimkit.tasks.evaluation.features import extract_features

    model = tiny_mae()
    ds = open_dataset("digits", "val", eval_transform(32, 3, (0.5,) * 3, (0.5,) * 3))
    ds = torch.utils.data.Subset(ds, range(16))
    f32, y32 = extract_features(model, ds, 8, CPU, "avg", amp="off")
    f16, y16 = extract_features(model, ds, 8, CPU, "avg", amp="bf16")
    assert f16.dtype == torch.float32 and torch.equal(y32, y16)
    assert not torch.equal(f32, f16)  # the bf16 pass really ran in bf16
    cos = torch.nn.functional.cosine_similarity(f32, f16, dim=1)
    assert cos.min() > 0.99


def test_knn_takes_amp_and_says_which_precision(tmp_path: Path, capsys) -> None:
    args = ["knn", "--model", "mae_vit_nano_patch8", "--random_init", "--input_size", "32", "--data_path", "digits",
            "--k", "5", "--output_dir", str(tmp_path / "k")]
    assert main(args + ["--amp", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "amp bf16 (--amp bf16 as asked)" in out
    assert main(args) == 0
    assert "amp off (fp32, the default: exact features" in capsys.readouterr().out  # fp32 features unless asked


def test_an_unknown_amp_value_says_off_is_fp32(tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "--amp", "fp32", "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "must be auto, bf16, fp16 or off; off is fp32" in err and len(err.strip().splitlines()) == 1
