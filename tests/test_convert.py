"""Weight interop: HF / timm mappings, safe reading, official and encoder-only checkpoints, pos embeds."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mimkit.errors import CheckpointError
from mimkit.models import MaskedAutoencoderViT, create_model
from mimkit.models.convert import (
    detect_layout,
    extract_state_dict,
    hf_to_mae,
    interpolate_pos_embed,
    load_checkpoint_file,
    load_into_model,
    mae_to_hf,
    mae_to_timm_vit,
    save_safetensors,
)

# ViT-Ti widths (192-d, 3 heads) so the timm "vit_tiny_patch16_224" family matches; tiny grid and depth.
ARCH = dict(img_size=32, patch_size=8, depth=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)


def mae(seed: int = 0, **kw) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    model = create_model("mae_vit_tiny_patch16", **{**ARCH, **kw})
    with torch.no_grad():  # make every weight distinctive so a wrong mapping cannot pass by accident
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def timm_tiny(**kw) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, **kw)


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("legacy", [False, True])
def test_hf_round_trip_is_exact(legacy):
    sd = mae().state_dict()
    hf = mae_to_hf(sd, legacy=legacy)
    assert detect_layout(hf) == "huggingface"
    stem = "vit.encoder.layer.1.attention.attention" if legacy else "vit.layers.1.attention"
    names = ("query", "key", "value") if legacy else ("q_proj", "k_proj", "v_proj")
    q, k, v = (hf[f"{stem}.{n}.weight"] for n in names)
    assert torch.equal(torch.cat([q, k, v]), sd["blocks.1.attn.qkv.weight"])
    fc1 = "vit.encoder.layer.0.intermediate.dense.bias" if legacy else "vit.layers.0.mlp.fc1.bias"
    assert torch.equal(hf[fc1], sd["blocks.0.mlp.fc1.bias"])
    assert torch.equal(hf["decoder.decoder_pos_embed"], sd["decoder_pos_embed"])
    assert len(hf) == len(sd) + 3 * 2 * 2  # 3 blocks: each qkv weight and bias becomes three tensors
    assert_same_weights(hf_to_mae(hf), sd)


def test_hf_vitmaemodel_encoder_dict_maps_to_encoder():
    sd = mae().state_dict()
    encoder_only = {k[len("vit."):]: v for k, v in mae_to_hf(sd).items() if k.startswith("vit.")}
    back = hf_to_mae(encoder_only)
    assert_same_weights(back, mae_to_timm_vit(sd))


def test_hf_incomplete_qkv_is_named():
    hf = mae_to_hf(mae().state_dict())
    del hf["vit.layers.0.attention.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"incomplete q/k/v for 'blocks\.0\.attn\.qkv\.bias'"):
        hf_to_mae(hf)


# ---------------------------------------------------------------------------------------------- timm
def test_timm_export_loads_strictly_and_computes_the_same_features():
    model = mae().eval()
    vit = timm_tiny(num_classes=0).eval()
    vit.load_state_dict(mae_to_timm_vit(model.state_dict()), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.forward_features(imgs), model.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_timm_export_vit_b_names_load_strictly():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
        vit = timm.create_model("vit_base_patch16_224", num_classes=0)
        pooled = timm.create_model("vit_base_patch16_224", num_classes=1000, global_pool="avg")
    vit.load_state_dict(mae_to_timm_vit(model.state_dict()), strict=True, assign=True)
    pooled_sd = mae_to_timm_vit(model.state_dict(), global_pool=True)
    result = pooled.load_state_dict(pooled_sd, strict=False, assign=True)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []


def test_timm_global_pool_export_moves_norm_to_fc_norm():
    sd = mae().state_dict()
    out = mae_to_timm_vit(sd, global_pool=True)
    assert "norm.weight" not in out and torch.equal(out["fc_norm.weight"], sd["norm.weight"])
    assert not any(k.startswith(("decoder", "mask_token")) for k in out)


def test_timm_classifier_loads_into_encoder_with_head_dropped():
    vit = timm_tiny(num_classes=10)
    model = mae(seed=1)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder")}
    report = load_into_model(model, vit.state_dict())
    assert report.source == "timm_vit" and report.decoder_fresh
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    decoder_after = {k: v for k, v in model.state_dict().items() if k.startswith("decoder")}
    assert_same_weights(decoder_after, decoder_before)


# ---------------------------------------------------------------------------------------------- files
def test_official_training_checkpoint_with_namespace_loads_weights_only(tmp_path):
    src = mae(seed=1)
    path = tmp_path / "checkpoint-399.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4,
                              input_size=224, output_dir="./output_dir", resume="", device="cuda")
    optimizer = torch.optim.AdamW(src.parameters())
    torch.save({"model": src.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    obj = load_checkpoint_file(path)
    assert obj["args"].blr == 1.5e-4 and obj["epoch"] == 399
    model = mae(seed=2)
    report = load_into_model(model, path)
    assert report.source == "official_mae" and not report.decoder_fresh and report.missing == []
    assert_same_weights(model.state_dict(), src.state_dict())


def test_encoder_only_release_loads_and_decoder_starts_fresh(tmp_path, caplog):
    src = mae(seed=1)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae_to_timm_vit(src.state_dict())}, path)
    model = mae(seed=2)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not model.is_encoder_param(k)}
    with caplog.at_level("WARNING"):
        report = load_into_model(model, path, strict=True)
    assert report.decoder_fresh and "decoder starts fresh" in report.summary()
    assert "decoder starts fresh" in caplog.text
    assert set(report.missing) == set(decoder_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, decoder_before[k] if k in decoder_before else src.state_dict()[k]), k


def test_mimkit_checkpoint_with_ddp_prefix(tmp_path):
    src = mae(seed=1)
    path = tmp_path / "latest.pt"
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({"model": wrapped, "optimizer": {}, "epoch": 3, "step": 30,
                "config": {"model": {"name": "mae_vit_tiny_patch16"}}, "mimkit_version": "0.1.0"}, path)
    model = mae(seed=2)
    assert load_into_model(model, path).source == "mimkit"
    assert_same_weights(model.state_dict(), src.state_dict())


@pytest.mark.parametrize("layout", ["mae", "huggingface"])
def test_safetensors_round_trip(tmp_path, layout):
    src = mae(seed=1)
    sd = src.state_dict() if layout == "mae" else mae_to_hf(src.state_dict())
    path = save_safetensors(sd, tmp_path / "w.safetensors", metadata={"format": "pt"})
    assert set(load_checkpoint_file(path)) == set(sd)
    model = mae(seed=2)
    assert load_into_model(model, path).source == layout
    assert_same_weights(model.state_dict(), src.state_dict())


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Payload()}, path)
    _Payload.ran = False
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint_file(path)
    assert _Payload.ran is False


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True


@pytest.mark.parametrize("suffix, content", [
    (".pth", b"this is not a checkpoint"),
    (".safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
])
def test_corrupt_file_gives_one_line_naming_the_path(tmp_path, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_into_model(mae(), path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: ") and "\n" not in message


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(mae().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.pth"):
        load_checkpoint_file(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="checkpoint not found: /nonexistent/x.pth"):
        load_into_model(mae(), "/nonexistent/x.pth")


# ------------------------------------------------------------------------------------------ wrong checkpoints
def test_deeper_checkpoint_names_unexpected_keys():
    with pytest.raises(CheckpointError) as info:
        load_into_model(mae(), mae(depth=3).state_dict())
    message = str(info.value)
    assert "does not fit model mae_vit_tiny_patch16" in message and "\n" not in message
    assert "12 unexpected keys (blocks.2.norm1.weight, blocks.2.norm1.bias" in message
    assert "... (7 more)" in message and "missing" not in message


def test_shallower_checkpoint_names_missing_keys_and_strict_false_tolerates_them():
    with pytest.raises(CheckpointError, match=r"12 missing keys \(blocks\.2\.norm1\.weight"):
        load_into_model(mae(depth=3), mae().state_dict())
    model = mae(depth=3)
    report = load_into_model(model, mae().state_dict(), strict=False)
    assert len(report.missing) == 12 and "not in checkpoint: blocks.2.norm1.weight" in report.summary()


def test_shape_mismatch_names_key_and_both_shapes():
    with pytest.raises(CheckpointError) as info:
        load_into_model(mae(), mae(in_chans=1).state_dict(), strict=False)
    message = str(info.value)
    assert "3 shape mismatches" in message
    assert "patch_embed.proj.weight: checkpoint (192, 1, 8, 8) vs model (192, 3, 8, 8)" in message
    assert "decoder_pred.weight: checkpoint (64, 64) vs model (192, 64)" in message


def test_unrelated_state_dict_is_rejected():
    with pytest.raises(CheckpointError, match="not an MAE, Hugging Face ViTMAE or timm ViT state dict"):
        load_into_model(mae(), {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="non-tensor entries: epoch"):
        extract_state_dict({"model": {"epoch": 3}})


# ---------------------------------------------------------------------------------------------- pos embeds
def reference_interpolation(pos_embed: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
    """The official recipe: cls kept, grid tokens as an image (1, D, h, w), bicubic, back to tokens."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    img = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new, mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def test_interpolate_pos_embed_square_and_rectangular():
    pe = torch.randn(1, 1 + 16, 8)
    up = interpolate_pos_embed(pe, 6)
    assert up.shape == (1, 37, 8) and torch.equal(up[:, 0], pe[:, 0])
    torch.testing.assert_close(up, reference_interpolation(pe, 4, (6, 6)))
    rect = interpolate_pos_embed(pe, (3, 5))
    torch.testing.assert_close(rect, reference_interpolation(pe, 4, (3, 5)))
    assert interpolate_pos_embed(pe, 4) is pe
    # a constant grid stays constant (bicubic weights sum to one)
    const = torch.cat([torch.zeros(1, 1, 8), torch.ones(1, 16, 8)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(const, (7, 3))[:, 1:], torch.ones(1, 21, 8))


def test_interpolate_pos_embed_needs_a_known_grid():
    pe = torch.randn(1, 1 + 12, 8)
    with pytest.raises(CheckpointError, match="12 tokens"):
        interpolate_pos_embed(pe, 4)
    assert interpolate_pos_embed(pe, (4, 4), old_grid=(3, 4)).shape == (1, 17, 8)


def test_checkpoint_of_another_image_size_is_interpolated():
    src = mae(seed=1)  # 32 px -> 4x4 grid
    model = mae(seed=2, img_size=48)  # 6x6 grid
    report = load_into_model(model, src.state_dict())
    assert report.resized == ["pos_embed 4x4 -> 6x6 (bicubic)", "decoder_pos_embed 4x4 -> 6x6 (bicubic)"]
    torch.testing.assert_close(model.pos_embed.data, reference_interpolation(src.pos_embed.data, 4, (6, 6)))
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    loss, pred, _ = model(torch.randn(1, 3, 48, 48))
    assert pred.shape == (1, 36, 192) and math.isfinite(loss.item())


def test_sincos_resize_recomputes_the_fixed_embedding():
    model = mae(seed=2, img_size=(32, 48))
    expected = model.pos_embed.detach().clone()
    report = load_into_model(model, mae(seed=1).state_dict(), pos_embed="sincos")
    assert report.resized[0] == "pos_embed 4x4 -> 4x6 (sincos)"
    assert torch.equal(model.pos_embed.data, expected)
