"""MaskedAutoencoderViT: official layout and counts, sin-cos, masking, losses, shapes, freezing, registry."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mimkit.errors import UserError
from mimkit.models import MaskedAutoencoderViT, create_model, list_models
from mimkit.models.registry import model_kwargs, resolve_name

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_model("mae_vit_base_patch16", **{**TINY, **kw})


def official_layout(img, p, c, dim, depth, ddim, ddepth, mlp=4) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of facebookresearch/mae MaskedAutoencoderViT.state_dict(), in its order."""
    n_tok = (img[0] // p) * (img[1] // p) + 1

    def block(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (mlp * d, d), f"{prefix}.mlp.fc1.bias": (mlp * d,),
            f"{prefix}.mlp.fc2.weight": (d, mlp * d), f"{prefix}.mlp.fc2.bias": (d,),
        }

    out = {"cls_token": (1, 1, dim), "pos_embed": (1, n_tok, dim),
           "mask_token": (1, 1, ddim), "decoder_pos_embed": (1, n_tok, ddim),
           "patch_embed.proj.weight": (dim, c, p, p), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        out.update(block(f"blocks.{i}", dim))
    out.update({"norm.weight": (dim,), "norm.bias": (dim,),
                "decoder_embed.weight": (ddim, dim), "decoder_embed.bias": (ddim,)})
    for i in range(ddepth):
        out.update(block(f"decoder_blocks.{i}", ddim))
    out.update({"decoder_norm.weight": (ddim,), "decoder_norm.bias": (ddim,),
                "decoder_pred.weight": (p * p * c, ddim), "decoder_pred.bias": (p * p * c,)})
    return out


def meta_model(name: str, **kw) -> MaskedAutoencoderViT:
    with torch.device("meta"):
        return create_model(name, **kw)


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("name, arch, count", [
    ("mae_vit_base_patch16", (224, 16, 3, 768, 12, 512, 8), 111_907_840),
    ("mae_vit_large_patch16", (224, 16, 3, 1024, 24, 512, 8), 329_541_888),
    ("mae_vit_huge_patch14", (224, 14, 3, 1280, 32, 512, 8), 657_074_508),
])
def test_official_layout_and_param_counts(name, arch, count):
    model = meta_model(name)
    img, p, c, dim, depth, ddim, ddepth = arch
    expected = official_layout((img, img), p, c, dim, depth, ddim, ddepth)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(int(np.prod(s)) for s in expected.values()) == count


def test_tiny_layout_rectangular_and_channels():
    model = tiny(img_size=(32, 48), in_chans=5)
    expected = official_layout((32, 48), 8, 5, 32, 2, 16, 1)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_pos_embeds_are_fixed_parameters():
    model = tiny()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------- sin-cos
def numpy_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """The MAE paper's 2-D sin-cos embedding, re-derived: first half encodes the column, second the row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.divmod(np.arange(gh * gw), gw)  # row-major patch order
    emb = np.concatenate([one_d(dim // 2, cols.astype(float)), one_d(dim // 2, rows.astype(float))], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


@pytest.mark.parametrize("img_size", [32, (32, 48), (48, 16)])
def test_sincos_pos_embed_matches_formula(img_size):
    model = tiny(img_size=img_size)
    gh, gw = model.grid_size
    np.testing.assert_allclose(model.pos_embed[0].numpy(), numpy_sincos(32, gh, gw), atol=1e-6)
    np.testing.assert_allclose(model.decoder_pos_embed[0].numpy(), numpy_sincos(16, gh, gw), atol=1e-6)
    # spot values: patch (row 0, col 1) has sin(1) in channel 0 and cos(0)=1 at the start of the row cosines
    assert model.pos_embed[0, 2, 0].item() == pytest.approx(np.sin(1.0), abs=1e-6)
    assert model.pos_embed[0, 1 + gw, 16 + 8].item() == pytest.approx(np.cos(1.0), abs=1e-6)


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_mask_is_a_function_of_noise(ratio):
    model = tiny().eval()
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    _, pred1, mask1 = model(imgs, mask_ratio=ratio, noise=noise)
    _, pred2, mask2 = model(imgs, mask_ratio=ratio, noise=noise.clone())
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2)
    n_keep = int(16 * (1 - ratio))
    assert mask1.sum(dim=1).tolist() == [16 - n_keep] * 3
    # kept patches are exactly those with the n_keep smallest noise values
    ranks = noise.argsort(dim=1).argsort(dim=1)
    assert torch.equal(mask1, (ranks >= n_keep).float())
    _, _, mask3 = model(imgs, mask_ratio=ratio, noise=1 - noise)
    assert not torch.equal(mask1, mask3)


def test_mask_is_float32_for_half_precision_tokens():
    from mimkit.models.vit import random_masking

    x = torch.randn(2, 16, 8, dtype=torch.float16)
    kept, mask, _ = random_masking(x, 0.75, noise=torch.rand(2, 16))
    assert mask.dtype == torch.float32 and kept.dtype == torch.float16 and kept.shape == (2, 4, 8)


def test_attention_uses_fused_sdpa():
    model = tiny()
    assert all(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])


def test_noise_with_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"noise must have shape \(N, L\) = \(2, 16\)"):
        tiny()(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


def test_mask_ratio_zero_encodes_every_patch():
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.0)
    assert latent.shape == (2, 17, 32)
    assert mask.sum().item() == 0
    loss, pred, _ = model(imgs, mask_ratio=0.0, loss_mode="all_pixels")
    assert pred.shape == (2, 16, 192) and torch.isfinite(loss) and loss.item() > 0
    # with nothing masked the encoder equals forward_features, tokens in shuffled order
    feats = model.forward_features(imgs)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(feats[:, 1:], 1, ids_shuffle[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(latent[:, 1:], shuffled)
    torch.testing.assert_close(latent[:, 0], feats[:, 0])


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_bad_mask_ratio_raises(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny()(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


# ---------------------------------------------------------------------------------------------- losses
def hand_loss(imgs: np.ndarray, pred: np.ndarray, mask: np.ndarray, p: int, norm_pix: bool, mode: str):
    """Per-patch MSE with explicit loops over patches (float64)."""
    n, c, h, w = imgs.shape
    per_patch = np.zeros(mask.shape)
    for b in range(n):
        for i in range(h // p):
            for j in range(w // p):
                k = i * (w // p) + j
                target = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(1, 2, 0).reshape(-1)
                if norm_pix:
                    target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
                per_patch[b, k] = np.mean((pred[b, k] - target) ** 2)
    if mode == "masked_only":
        return float((per_patch * mask).sum() / mask.sum())
    return float(per_patch.mean())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("loss_mode", ["masked_only", "all_pixels"])
def test_losses_match_hand_computation(norm_pix_loss, loss_mode):
    model = tiny(img_size=(16, 24), norm_pix_loss=norm_pix_loss).eval()
    imgs = torch.randn(2, 3, 16, 24)
    imgs[1] *= 1e-3  # patch variances near the 1e-6 epsilon of norm_pix_loss: the epsilon matters
    loss, pred, mask = model(imgs, mask_ratio=0.5, noise=torch.rand(2, 6), loss_mode=loss_mode)
    expected = hand_loss(imgs.double().numpy(), pred.detach().double().numpy(), mask.double().numpy(),
                         8, norm_pix_loss, loss_mode)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.forward_loss(imgs, pred, mask, loss_mode).item() == pytest.approx(expected, rel=1e-5)


def test_loss_modes_differ_and_unknown_mode_raises():
    model = tiny().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    masked = model(imgs, noise=noise, loss_mode="masked_only")[0]
    dense = model(imgs, noise=noise, loss_mode="all_pixels")[0]
    assert masked.item() != pytest.approx(dense.item())
    with pytest.raises(ValueError, match="unknown loss_mode 'al_pixels'"):
        model(imgs, loss_mode="al_pixels")


# ---------------------------------------------------------------------------------------------- shapes
def test_rectangular_patchify_round_trip_and_order():
    model = tiny(img_size=(32, 48))
    assert model.grid_size == (4, 6) and model.num_patches == 24
    imgs = torch.randn(2, 3, 32, 48)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 24, 192)
    # patch k = row * 6 + col holds the (p, q, c) pixels of that square
    expected = imgs[1, :, 8:16, 24:32].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 1 * 6 + 3], expected)
    assert torch.equal(model.unpatchify(patches), imgs)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 24, 192) and mask.shape == (2, 24) and torch.isfinite(loss)
    assert model.unpatchify(pred).shape == imgs.shape


@pytest.mark.parametrize("chans", [1, 5])
def test_other_channel_counts(chans):
    model = tiny(in_chans=chans)
    imgs = torch.randn(2, chans, 32, 32)
    loss, pred, _ = model(imgs)
    assert pred.shape == (2, 16, 64 * chans) and torch.isfinite(loss)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 40, 40), "image size 40x40 does not match the model's img_size 32x32"),
    ((2, 3, 36, 32), "image size 36x32 is not a multiple of the patch size 8"),
    ((2, 1, 32, 32), "model expects 3 channels, images have 1"),
    ((3, 32, 32), r"expected images of shape \(N, C, H, W\)"),
])
def test_bad_images_raise_clear_value_errors(shape, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))
    with pytest.raises(ValueError, match=message):
        model.forward_features(torch.randn(*shape))


def test_img_size_not_multiple_of_patch_is_a_user_error():
    with pytest.raises(UserError, match="not a multiple of patch_size"):
        create_model("mae_vit_tiny_patch16", img_size=30, patch_size=8)


def test_drop_path_rises_linearly():
    model = tiny(depth=3, drop_path=0.2)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in model.blocks]  # rate 0 is an Identity
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert all(type(blk.drop_path1).__name__ == "Identity" for blk in model.decoder_blocks)


# ---------------------------------------------------------------------------------------------- freezing
def trainable(model: MaskedAutoencoderViT) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


B_FIXED = 197 * 768 + 197 * 512
B_DECODER = 26_008_320  # decoder_embed, mask_token, 8 blocks, decoder_norm, decoder_pred (no pos embed)


def test_freeze_encoder_block_layernorms_vit_b():
    model = meta_model("mae_vit_base_patch16")
    model.freeze_everything_except_layernorm_encoder()
    names = trainable(model)
    assert sum(names.values()) == 12 * 2 * 2 * 768 == 36_864
    assert all(re.fullmatch(r"blocks\.\d+\.norm[12]\.(weight|bias)", n) for n in names) and len(names) == 48
    status = model.param_status()
    assert status["total"] == {"trainable": 36_864, "frozen": 111_907_840 - 36_864}
    assert status["encoder.blocks.layernorm"] == {"trainable": 36_864, "frozen": 0}


def test_freeze_all_layernorms_vit_b():
    model = meta_model("mae_vit_base_patch16")
    model.freeze_everything_except_all_layernorms()
    names = trainable(model)
    assert sum(names.values()) == 36_864 + 2 * 768 + 8 * 2 * 2 * 512 + 2 * 512 == 55_808
    assert {"norm.weight", "decoder_norm.bias", "decoder_blocks.7.norm2.weight"} <= set(names)


def test_freeze_encoder_vit_b():
    model = meta_model("mae_vit_base_patch16")
    model.apply_freeze_mode("encoder_only")
    names = trainable(model)
    assert sum(names.values()) == B_DECODER
    assert "mask_token" in names and "decoder_pos_embed" not in names
    assert not any(n.startswith(("blocks.", "patch_embed.", "norm.", "cls_token")) for n in names)


def test_unfreeze_all_never_trains_pos_embeds():
    model = meta_model("mae_vit_base_patch16")
    model.freeze_encoder()
    model.unfreeze_all()
    names = trainable(model)
    assert sum(names.values()) == 111_907_840 - B_FIXED
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert model.param_status()["fixed.pos_embed"] == {"trainable": 0, "frozen": B_FIXED}


def test_param_status_table_and_unknown_freeze_mode():
    model = tiny()
    model.apply_freeze_mode("encoder_layernorms_only")
    text = model.format_param_status()
    assert re.search(r"encoder\.blocks\.layernorm\s+256\s+0\s+100\.00%", text)  # 2 blocks x 2 norms x 2 x 32
    with pytest.raises(UserError, match="did you mean 'encoder_only'"):
        model.apply_freeze_mode("encoder_onyl")


# ---------------------------------------------------------------------------------------------- registry
TINY_ANY = dict(TINY, depth=4, in_chans=3)  # depth 4: LocalMIM taps blocks up to depth-1


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_tiny(name):
    accepted = model_kwargs(name)
    overrides = {k: v for k, v in TINY_ANY.items() if k in accepted} if accepted else TINY_ANY
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    assert model.model_name == resolve_name(name)
    assert sum(p.numel() for p in model.parameters()) > 0
    if isinstance(model, MaskedAutoencoderViT):  # the MAE family (LocalMIM subclasses it)
        assert model.embed_dim == 32 and len(model.blocks) == 4 and model.grid_size == (4, 4)
        imgs = torch.randn(2, 3, 32, 32)
        assert model.forward_features(imgs).shape == (2, 17, 32)
    if type(model) is MaskedAutoencoderViT:
        loss, pred, mask = model(imgs)
        assert pred.shape == (2, 16, 192) and mask.shape == (2, 16) and torch.isfinite(loss)


def test_required_names_and_aliases():
    names = set(list_models())
    for size, p in (("base", 16), ("large", 16), ("huge", 14)):
        canonical = f"mae_vit_{size}_patch{p}"
        for alias in (f"continual_{canonical}", f"{canonical}_dec512d8b"):
            assert alias in names and resolve_name(alias) == canonical
    assert {"mae_vit_tiny_patch16", "mae_vit_small_patch16"} <= names
    a = meta_model("continual_mae_vit_large_patch16")
    b = meta_model("mae_vit_large_patch16")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_huge_decoder_is_the_papers():
    model = meta_model("mae_vit_huge_patch14")
    assert model.decoder_embed.out_features == 512 and len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.patch_size == 14


def test_unknown_model_and_override_are_user_errors():
    with pytest.raises(UserError, match="unknown model 'mae_vit_bse_patch16'.*mean 'mae_vit_base_patch16'"):
        create_model("mae_vit_bse_patch16")
    with pytest.raises(UserError, match="has no option 'norm_pix_los'.*did you mean 'norm_pix_loss'"):
        create_model("mae_vit_tiny_patch16", norm_pix_los=True)
