"""LocalMIM ViT: reference layout, per-scale shapes, mask weights, loss, MAE-encoder export, freezing."""

from __future__ import annotations

import pytest
import timm
import torch

from mimkit.errors import UserError
from mimkit.models import MaskedAutoencoderViT, create_model
from mimkit.models.localmim import LocalMIMViT, default_taps, localmim_to_mae_encoder, mask_at_scale
from mimkit.models.registry import model_kwargs, resolve_name

# 32 px, patch 4 -> an 8x8 grid; HOG cells of 1, 2, 4, 8 px -> 32^2, 16^2, 8^2, 4^2 cells.
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**kw) -> LocalMIMViT:
    torch.manual_seed(0)
    return create_model("localmim_vit_tiny_patch16", **{**TINY, **kw})


def reference_keys(depth: int, hog_bias: bool) -> set[str]:
    """Keys of LocalMIM's ViT/models_mim.py MaskedAutoencoderViT.state_dict(), written out from reading it."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"norm.{t}.{w}" for t in range(4) for w in ("weight", "bias")}  # one LayerNorm per tap
    # MAE_Decoder per scale; `pred` is an nn.Sequential whose indices skip parameter-free layers
    # (x4: ConvT, LayerNorm2d, GELU, ConvT, Conv; x2: ConvT, Conv; x1: Conv; x0.5: AvgPool, Conv)
    pred_layers = {0: (0, 1, 3, 4), 1: (0, 1), 2: (0,), 3: (1,)}
    for d, layers in pred_layers.items():
        keys |= {f"decoder.{d}.{k}" for k in ("embed.weight", "embed.bias", "mask_token", "pos_embed",
                                              "norm.weight", "norm.bias")}
        keys |= {f"decoder.{d}.blocks.0.{k}" for k in block}
        keys |= {f"decoder.{d}.pred.{j}.{w}" for j in layers for w in ("weight", "bias")}
    keys |= {f"hog_enc.{k}.conv.weight" for k in range(4)}
    if hog_bias:
        keys |= {f"hog_enc.{k}.conv.bias" for k in range(4)}
    return keys


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("hog_bias", [False, True])
def test_reference_state_dict_layout(hog_bias: bool) -> None:
    model = tiny(hog_bias=hog_bias)
    sd = model.state_dict()
    assert set(sd) == reference_keys(4, hog_bias)
    assert sd["decoder.0.pred.0.weight"].shape == (16, 8, 2, 2)  # ConvTranspose2d(16 -> 8)
    assert sd["decoder.0.pred.4.weight"].shape == (27, 4, 1, 1)  # 1x1 conv to 3 channels x 9 bins
    assert sd["decoder.3.pred.1.weight"].shape == (27, 16, 1, 1)
    assert sd["decoder.2.pos_embed"].shape == (1, 65, 16)
    assert sd["hog_enc.0.conv.weight"].shape == (2, 1, 3, 3)


def test_vit_b_layout_and_sizes_on_meta() -> None:
    with torch.device("meta"):
        model = create_model("MIM_vit_base_patch16", hog_nbins=18)
    assert set(model.state_dict()) == reference_keys(12, False)
    assert model.taps == [1, 3, 9, 11] and model.scales == [4.0, 2.0, 1.0, 0.5]
    assert [h.pool for h in model.hog_enc] == [4, 8, 16, 32]  # the reference's cell sizes
    assert model.decoder[0].embed.out_features == 256 and model.decoder[0].blocks[0].attn.num_heads == 8
    assert model.state_dict()["decoder.1.pred.1.weight"].shape == (54, 128, 1, 1)


def test_taps() -> None:
    assert default_taps(12) == [1, 3, 9, 11] and default_taps(24) == [1, 3, 21, 23]
    with pytest.raises(UserError, match="depth must be >= 4"):
        create_model("localmim_vit_tiny_patch16", depth=3)


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("nbins", [9, 18])
def test_vit_b_per_scale_shapes_at_224_on_meta(nbins: int) -> None:
    with torch.device("meta"):
        model = create_model("MIM_vit_base_patch16", hog_nbins=nbins)
        imgs = torch.empty(2, 3, 224, 224)
        loss, preds, mask = model(imgs)
        targets = model.target(imgs)
    cells = [56 * 56, 28 * 28, 14 * 14, 7 * 7]
    assert [tuple(p.shape) for p in preds] == [(2, c, 3 * nbins) for c in cells]
    assert [tuple(t.shape) for t in targets] == [(2, c, 3 * nbins) for c in cells]
    assert [tuple(w.shape) for w in model.loss_weights(mask)] == [(2, c) for c in cells]
    assert mask.shape == (2, 196) and loss.shape == ()


def test_tiny_shapes_and_channels() -> None:
    model = tiny(in_chans=1, hog_nbins=4)
    loss, preds, mask = model(torch.randn(3, 1, 32, 32))
    assert [tuple(p.shape) for p in preds] == [(3, 1024, 4), (3, 256, 4), (3, 64, 4), (3, 16, 4)]
    assert mask.shape == (3, 64) and mask.sum() == 3 * 48 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- mask weights
def test_mask_upsampling_and_pooling_weights() -> None:
    mask = torch.tensor([[1.0, 0, 0, 1],
                         [1, 1, 0, 0],
                         [0, 0, 1, 0],
                         [0, 1, 1, 1]]).reshape(1, 16)
    up2 = mask_at_scale(mask, (4, 4), 2.0).reshape(8, 8)
    assert torch.equal(up2[0:2, 0:2], torch.ones(2, 2)) and torch.equal(up2[0:2, 2:4], torch.zeros(2, 2))
    assert torch.equal(up2, mask.reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1))
    up4 = mask_at_scale(mask, (4, 4), 4.0).reshape(16, 16)
    assert torch.equal(up4[12:16, 4:8], torch.ones(4, 4)) and up4.sum() == 16 * mask.sum()
    assert torch.equal(mask_at_scale(mask, (4, 4), 1.0), mask)
    # each coarse cell averages its 2x2 patches: fractional weights
    down = mask_at_scale(mask, (4, 4), 0.5)
    assert torch.equal(down, torch.tensor([[0.75, 0.25, 0.25, 0.75]]))


def test_rectangular_grid_weights() -> None:
    mask = torch.arange(6.0).reshape(1, 6) % 2  # 2 x 3 grid: [[0, 1, 0], [1, 0, 1]]
    up = mask_at_scale(mask, (2, 3), 2.0).reshape(4, 6)
    assert torch.equal(up[0], torch.tensor([0.0, 0, 1, 1, 0, 0]))
    assert torch.equal(up[3], torch.tensor([1.0, 1, 0, 0, 1, 1]))


# ---------------------------------------------------------------------------------------------- loss
def hand_weights(mask_grid: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-cell weights by explicit loops over cells: (g, g) patch mask -> (g*s * g*s,)."""
    g = mask_grid.shape[0]
    n = int(g * scale)
    w = torch.zeros(n, n)
    for r in range(n):
        for c in range(n):
            if scale >= 1:
                w[r, c] = mask_grid[int(r // scale), int(c // scale)]
            else:
                w[r, c] = mask_grid[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean()
    return w.reshape(-1)


def test_loss_equals_hand_sum_over_scales() -> None:
    model = tiny().eval().requires_grad_(False)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, preds, mask = model(imgs, mask_ratio=0.75, noise=noise)
    targets = model.target(imgs)
    expected = 0.0
    for pred, tgt, s in zip(preds, targets, [4.0, 2.0, 1.0, 0.5]):
        num = den = 0.0
        for n in range(2):
            w = hand_weights(mask[n].reshape(8, 8), s)
            err = ((pred[n] - tgt[n]) ** 2).mean(dim=1)  # (cells,)
            num += float((err * w).sum())
            den += float(w.sum())
        expected += num / den
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # all_pixels: the plain sum of per-scale means
    loss_all, _, _ = model(imgs, mask_ratio=0.75, noise=noise, loss_mode="all_pixels")
    plain = sum(float(((p - t) ** 2).mean()) for p, t in zip(preds, targets))
    assert loss_all.item() == pytest.approx(plain, rel=1e-5) and loss_all.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="loss_mode"):
        model(imgs, loss_mode="pixels")


def test_targets_are_the_hog_of_the_input_per_scale() -> None:
    model = tiny(hog_nbins=9)
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[0, 0, :, 16:] = 1.0  # vertical step in the red channel only
    t1 = model.target(imgs)[2].reshape(8, 8, 27)  # 4 px cells
    assert torch.all(t1[:, 3:5, 4] == 1.0) and t1.sum() == 16  # cells next to the edge: bin 4 of red
    assert t1[..., 9:].abs().sum() == 0


def test_same_noise_same_loss_and_mask_shared_by_scales() -> None:
    model = tiny().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    # every scale's weights come from the one patch mask: the same masked share at every scale
    shares = [w.mean(dim=1) for w in model.loss_weights(a[2])]
    for s in shares:
        torch.testing.assert_close(s, torch.full((2,), 0.75))


def test_training_steps_reduce_the_loss() -> None:
    model = tiny()
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _, _ = model(imgs, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(model.hog_enc[0].conv.weight[0, 0, :, 0], torch.tensor([1.0, 2.0, 1.0]))  # untouched


# ---------------------------------------------------------------------------------------------- encoder
def timm_vit(**kw) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0, qkv_bias=True, **kw
    )


def test_encoder_export_loads_strictly_into_timm_and_mae() -> None:
    model = tiny().eval()
    enc = model.encoder_state_dict()
    assert set(enc) == {k for k in reference_keys(4, False)
                        if k.startswith(("patch_embed.", "blocks.")) or k in ("cls_token", "pos_embed")} | {
        "norm.weight", "norm.bias"}
    assert torch.equal(enc["norm.weight"], model.norm[3].weight)  # the LayerNorm after the last block
    # the same mapping on a raw reference-layout checkpoint dict (no model instantiated)
    assert set(localmim_to_mae_encoder(dict(model.state_dict()))) == set(enc)
    imgs = torch.randn(2, 3, 32, 32)
    ours = model.forward_features(imgs)
    assert ours.shape == (2, 65, 32)

    vit = timm_vit().eval()
    vit.load_state_dict(enc, strict=True)
    torch.testing.assert_close(vit.forward_features(imgs), ours, rtol=1e-5, atol=1e-5)

    mae = create_model("mae_vit_tiny_patch16", **TINY).eval()
    mae_encoder_keys = {k for k in mae.state_dict() if mae.is_encoder_param(k)}
    assert mae_encoder_keys == set(enc)
    missing, unexpected = mae.load_state_dict(enc, strict=False)
    assert not unexpected and not (set(missing) & mae_encoder_keys)
    torch.testing.assert_close(mae.forward_features(imgs), ours)


def test_forward_features_layers_are_raw_block_outputs() -> None:
    model = tiny().eval()
    for norm in model.norm:  # tell the four tap norms apart (they start as identities)
        torch.nn.init.normal_(norm.weight)
    imgs = torch.randn(1, 3, 32, 32)
    b1, b3 = model.forward_features(imgs, layers=[1, 3])
    torch.testing.assert_close(model.norm[3](b3), model.forward_features(imgs))
    # the masked encoder's first tap is norm.0 of block 1's output (mask ratio 0: every patch, in order)
    latents, _, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(64.0)[None])
    torch.testing.assert_close(latents[0], model.norm[0](b1))
    torch.testing.assert_close(latents[2], model.norm[2](b1))  # depth 4: taps [1, 3, 1, 3]


def test_frozen_prefix_stops_backward_but_keeps_the_loss() -> None:
    model = tiny()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    ref, _, _ = model(imgs, noise=noise)
    model.frozen_prefix = 2
    loss, _, _ = model(imgs, noise=noise)
    assert torch.equal(loss, ref)
    loss.backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("patch_embed.", "cls_token", "blocks.0.", "blocks.1."))
        if frozen or not p.requires_grad:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name  # incl. norm.0 and decoder.0 at the frozen tap (block 1)


# ---------------------------------------------------------------------------------------------- freezing API
def test_fixed_params_never_train() -> None:
    model = tiny(hog_bias=True)
    fixed = {n for n, _ in model.named_parameters() if n.endswith("pos_embed") or n.startswith("hog_enc.")}
    assert len(fixed) == 1 + 4 + 8
    for mode in ("none", "layernorm_only", "encoder_only", "encoder_layernorms_only"):
        model.apply_freeze_mode(mode)
        assert not any(p.requires_grad for n, p in model.named_parameters() if n in fixed), mode
    model.unfreeze_all()
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in fixed)


def test_freeze_modes_and_param_status() -> None:
    model = tiny()
    model.freeze_encoder()
    for name, p in model.named_parameters():
        if name.startswith(("blocks.", "norm.", "patch_embed.", "cls_token")):
            assert not p.requires_grad, name
    assert model.decoder[3].embed.weight.requires_grad and model.decoder[0].mask_token.requires_grad
    model.freeze_everything_except_all_layernorms()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "decoder.0.pred.1.weight" in trainable  # the x4 head's LayerNorm2d
    assert "norm.2.weight" in trainable and "decoder.1.blocks.0.norm1.bias" in trainable
    assert "decoder.1.embed.weight" not in trainable and "blocks.0.attn.qkv.weight" not in trainable

    model.unfreeze_all()
    status = model.param_status()
    assert status["fixed.hog"] == {"trainable": 0, "frozen": 4 * 18}
    assert status["fixed.pos_embed"] == {"trainable": 0, "frozen": 65 * 32 + 4 * 65 * 16}
    n_pred = sum(p.numel() for d in model.decoder for p in d.pred.parameters())
    assert status["decoder.pred"] == {"trainable": n_pred, "frozen": 0}
    total = sum(p.numel() for p in model.parameters())
    assert status["total"]["trainable"] + status["total"]["frozen"] == total
    assert "norm" in model.format_param_status()


# ---------------------------------------------------------------------------------------------- registry
def test_names_aliases_and_options() -> None:
    for size in ("tiny", "small", "base", "large"):
        assert resolve_name(f"localmim_vit_{size}_patch16") == f"localmim_vit_{size}_patch16"
    assert resolve_name("MIM_vit_base_patch16") == "localmim_vit_base_patch16"
    assert resolve_name("MIM_vit_large_patch16") == "localmim_vit_large_patch16"
    assert {"hog_nbins", "hog_bias", "img_size", "patch_size", "in_chans", "depth"} <= model_kwargs(
        "MIM_vit_base_patch16")
    with pytest.raises(UserError, match="norm_pix_loss does not apply to LocalMIM"):
        create_model("MIM_vit_base_patch16", norm_pix_loss=True)
    with pytest.raises(UserError, match="no option 'hog_nbin'.*did you mean 'hog_nbins'"):
        create_model("MIM_vit_base_patch16", hog_nbin=9)
    with pytest.raises(UserError, match="patch_size divisible by 4"):
        create_model("localmim_vit_tiny_patch16", img_size=30, patch_size=6)
    with pytest.raises(UserError, match="even patch grid"):
        create_model("localmim_vit_tiny_patch16", img_size=24, patch_size=8)
    with torch.device("meta"):
        large = create_model("MIM_vit_large_patch16")
        small = create_model("localmim_vit_small_patch16")
    assert large.taps == [1, 3, 21, 23] and large.embed_dim == 1024
    assert small.embed_dim == 384 and small.decoder[0].embed.out_features == 256
    assert isinstance(large, MaskedAutoencoderViT)
