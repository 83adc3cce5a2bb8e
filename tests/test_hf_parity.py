"""Peer parity with Hugging Face transformers' ViTMAEForPreTraining (an independent MAE implementation).

Same weights (through mimkit.models.convert), same images, same `noise`: same mask, loss and predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimkit.models import create_model
from mimkit.models.convert import hf_config_kwargs, hf_to_mae, mae_to_hf

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")

ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def pair(norm_pix_loss: bool, mask_ratio: float):
    """(our model, an HF model) built from the same config, HF still holding its own init."""
    torch.manual_seed(0)
    ours = create_model("mae_vit_base_patch16", norm_pix_loss=norm_pix_loss, **ARCH).eval()
    config = transformers.ViTMAEConfig(**hf_config_kwargs(ours), mask_ratio=mask_ratio)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu"  # HF's default eps is 1e-12
    hf = transformers.ViTMAEForPreTraining(config).eval()
    return ours, hf


def hf_uses_legacy_names(hf) -> bool:
    """transformers 4.x names its blocks vit.encoder.layer.N.attention.attention.query; 5.x vit.layers.N.q_proj."""
    return "vit.encoder.layer.0.layernorm_before.weight" in hf.state_dict()


def run_both(ours, hf, mask_ratio: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    imgs[2] *= 1e-3  # patch variances near the 1e-6 epsilon of norm_pix_loss
    noise = torch.rand(3, ours.num_patches, generator=g)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=mask_ratio, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    return (loss, pred, mask), out


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_our_weights_in_hf_give_the_same_loss_and_predictions(norm_pix_loss, mask_ratio):
    ours, hf = pair(norm_pix_loss, mask_ratio)
    with torch.no_grad():  # move weights away from init so every tensor matters
        for name, p in ours.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    hf.load_state_dict(mae_to_hf(ours.state_dict(), legacy=hf_uses_legacy_names(hf)), strict=True)
    (loss, pred, mask), out = run_both(ours, hf, mask_ratio)
    assert torch.equal(mask, out.mask)
    assert mask.sum(dim=1).tolist() == [16 - int(16 * (1 - mask_ratio))] * 3
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_weights_in_ours_give_the_same_loss_and_predictions(norm_pix_loss):
    ours, hf = pair(norm_pix_loss, 0.75)
    with torch.no_grad():  # HF init leaves the fixed embeddings at zero in some versions: give them values
        hf.vit.embeddings.position_embeddings.normal_()
        hf.decoder.decoder_pos_embed.normal_()
    ours.load_state_dict(hf_to_mae(hf.state_dict()), strict=True)
    (loss, pred, mask), out = run_both(ours, hf, 0.75, seed=2)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_sincos_pos_embed_matches_hf_formula():
    ours = create_model("mae_vit_base_patch16", **{**ARCH, "img_size": 48})
    dim, grid = ours.embed_dim, ours.grid_size[0]
    if hasattr(modeling, "build_2d_sinusoidal_position_embedding"):  # transformers >= 5
        ref = modeling.build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
        half = dim // 2  # HF rotates its [h | w] halves to the MAE [w | h] layout, as its initialize_weights does
        ref = torch.cat([ref[..., half:], ref[..., :half]], dim=-1).numpy()
    else:  # transformers 4.x
        ref = modeling.get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)
    np.testing.assert_allclose(ours.pos_embed[0].numpy(), ref, atol=1e-6)
