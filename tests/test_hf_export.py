"""Hugging Face both ways with the installed transformers: the checkpoint's LayerNorm eps is ours and goes back
out; `--format hf` runs unmasked with tokens in image order; a size no preset has is labelled honestly."""

from __future__ import annotations

import json

import pytest
import torch

from mimkit.cli import main
from mimkit.models.loading import architecture_of, model_from_checkpoint

transformers = pytest.importorskip("transformers")

# No registered preset has these sizes; eps is left at ViTMAEConfig's default (1e-12).
ODD = dict(image_size=32, patch_size=8, hidden_size=40, num_hidden_layers=3, num_attention_heads=2,
           intermediate_size=160, decoder_hidden_size=24, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
           decoder_intermediate_size=96)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """(a save_pretrained ViTMAEForPreTraining folder of an unregistered size with eps 1e-12, the HF model)."""
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**ODD)).eval()
    assert hf.config.layer_norm_eps == 1e-12
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("hf") / "odd"
    hf.save_pretrained(str(folder))
    return folder, hf


def _layer_norm_eps(model) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}


def test_checkpoint_eps_is_used_and_outputs_match_hf(odd) -> None:
    folder, hf = odd
    ours, _ = model_from_checkpoint(folder)
    assert _layer_norm_eps(ours) == {1e-12}  # every LayerNorm, encoder and decoder
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    arch = architecture_of(folder)
    assert arch["model"]["kwargs"]["layer_norm_eps"] == 1e-12  # continual / pretrain --init_from build with it


def test_unregistered_size_is_labelled_generic_with_its_real_architecture(odd) -> None:
    folder, _ = odd
    ours, desc = model_from_checkpoint(folder)
    assert desc.startswith("mae_vit (patch 8, encoder 3x40, decoder 1x24, 32x32 input")
    assert "mae_vit_base_patch16" not in desc and ours.model_name == "mae_vit"
    assert architecture_of(folder)["model"]["type"] == "mae_vit"


def test_preset_sized_hf_config_keeps_the_preset_name(tmp_path) -> None:
    cfg = transformers.ViTMAEConfig(image_size=32, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                    num_attention_heads=3, intermediate_size=768, decoder_hidden_size=128,
                                    decoder_num_hidden_layers=4, decoder_num_attention_heads=4,
                                    decoder_intermediate_size=512)
    transformers.ViTMAEForPreTraining(cfg).save_pretrained(str(tmp_path / "tiny"))
    assert architecture_of(tmp_path / "tiny")["model"]["type"] == "mae_vit_tiny_patch16"


@pytest.mark.slow
def test_hf_export_writes_the_models_eps_and_plain_forward_keeps_token_order(odd, tmp_path) -> None:
    folder, _ = odd
    out = tmp_path / "exported"
    assert main(["export", str(folder), "--format", "hf", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-12 and config["hidden_size"] == 40
    ours, _ = model_from_checkpoint(folder)
    loaded = transformers.AutoModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = loaded(pixel_values=x).last_hidden_state  # the plain forward: no noise argument
        b = loaded(pixel_values=x).last_hidden_state
        want = ours.forward_features(x)
    assert a.shape == (3, 1 + 16, 40) and torch.equal(a, b)  # deterministic: nothing shuffled at random
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)  # patch tokens in image order
    # and it reads back into mimkit (same encoder outputs)
    again, _ = model_from_checkpoint(out)
    assert _layer_norm_eps(again) >= {1e-12}
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_hf_export_of_a_default_mimkit_model_keeps_eps_1e6(tmp_path) -> None:
    from test_evaluate import save_tiny

    ckpt = save_tiny(tmp_path / "tiny.pt")
    assert main(["export", str(ckpt), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_norm_eps"] == 1e-6


def test_classifier_and_segmenter_keep_the_encoders_eps(odd) -> None:
    from mimkit.models.heads import vit_classifier
    from mimkit.models.segmentation import segmenter_arch, segmenter_from_encoder

    folder, _ = odd
    enc, _ = model_from_checkpoint(folder)
    clf = vit_classifier(enc, 3, global_pool=False)
    seg = segmenter_from_encoder(enc, segmenter_arch(enc, (32, 32), 3, None, 8, 8, (1, 2), 0.1))
    assert _layer_norm_eps(clf) == {1e-12} and _layer_norm_eps(seg.backbone) == {1e-12}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the classifier's cls features are the encoder's
        torch.testing.assert_close(clf.forward_features(x), enc.forward_features(x), rtol=1e-5, atol=1e-5)
