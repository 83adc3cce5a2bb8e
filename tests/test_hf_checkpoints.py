"""Hugging Face checkpoints saved by the INSTALLED transformers load into our model and match HF's outputs;
the 4.x file layout too; a folder works wherever a checkpoint is expected (mimkit.io.resolve_checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mimkit.errors import CheckpointError
from mimkit.io import resolve_checkpoint
from mimkit.models import create_model
from mimkit.models.convert import load_into_model
from mimkit.models.loading import architecture_of, model_from_checkpoint

transformers = pytest.importorskip("transformers")

HF_ARCH = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
               intermediate_size=192, decoder_hidden_size=32, decoder_num_hidden_layers=2,
               decoder_num_attention_heads=4, decoder_intermediate_size=128, layer_norm_eps=1e-6)
OUR_ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
                decoder_depth=2, decoder_num_heads=4)


@pytest.fixture(scope="module")
def hf_model():
    """A tiny ViTMAEForPreTraining of the installed transformers, every weight distinctive."""
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**HF_ARCH)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "vitmae"
    hf_model.save_pretrained(str(folder))
    return folder


def assert_same_outputs(ours, hf) -> None:
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 16, generator=g)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_save_pretrained_folder_has_the_installed_layout(saved):
    keys = list(load_file(str(saved / "model.safetensors")))
    # transformers 5 writes the decoder blocks as decoder.decoder_encoder.layer.N (the failing key)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert any(k.startswith("decoder.decoder_encoder.layer.0.") for k in keys)


@pytest.mark.parametrize("which", ["folder", "file"])
def test_save_pretrained_loads_and_matches_hf(saved, hf_model, which):
    path = saved if which == "folder" else saved / "model.safetensors"
    ours, desc = model_from_checkpoint(path)  # the architecture from config.json, no --model needed
    assert (ours.embed_dim, len(ours.blocks), ours.patch_size, len(ours.decoder_blocks)) == (48, 2, 8, 2)
    assert "huggingface" in desc and "patch 8" in desc
    assert_same_outputs(ours, hf_model)


def test_single_file_without_config(saved, hf_model, tmp_path):
    lone = tmp_path / "weights.safetensors"
    shutil.copy(saved / "model.safetensors", lone)
    ours = create_model("mae_vit_base_patch16", **OUR_ARCH).eval()
    assert load_into_model(ours, lone).source == "huggingface"
    assert_same_outputs(ours, hf_model)
    pt = tmp_path / "hf_state_dict.pt"  # the in-memory (transformers 5: vit.layers.N.q_proj) names, torch.save'd
    torch.save(hf_model.state_dict(), pt)
    ours2 = create_model("mae_vit_base_patch16", **OUR_ARCH).eval()
    load_into_model(ours2, pt)
    assert_same_outputs(ours2, hf_model)


def _to_4x(key: str) -> str:
    """The transformers 4.x ViTMAEForPreTraining names, written out by hand (not with mimkit's tables)."""
    import re

    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."),
                     (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")):
        key = key.replace(new, old)
    return key


def test_4x_layout_loads_and_matches_hf(hf_model, tmp_path):
    sd = {_to_4x(k): v for k, v in hf_model.state_dict().items()}
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in sd
    assert "vit.encoder.layer.1.output.dense.bias" in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = create_model("mae_vit_base_patch16", **OUR_ARCH).eval()
    load_into_model(ours, tmp_path / "pytorch_model.bin")
    assert_same_outputs(ours, hf_model)


def test_vitmae_model_folder_encoder_only(hf_model, tmp_path):
    enc = transformers.ViTMAEModel(transformers.ViTMAEConfig(**HF_ARCH, mask_ratio=0.0)).eval()
    enc.load_state_dict(hf_model.vit.state_dict())
    enc.save_pretrained(str(tmp_path / "enc"))
    ours, _ = model_from_checkpoint(tmp_path / "enc")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = enc(pixel_values=x, noise=torch.arange(16.0).expand(2, -1)).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), expected, rtol=1e-5, atol=1e-5)


def test_architecture_of_hf_folder(saved):
    arch = architecture_of(saved)
    assert arch["model"]["kwargs"]["embed_dim"] == 48 and arch["model"]["kwargs"]["decoder_depth"] == 2
    assert arch["data"]["input_size"] == 32


# ---------------------------------------------------------------------------------------------- folders
def _run_folder(root: Path) -> Path:
    ck = root / "run" / "checkpoints"
    (ck / "epoch-2").mkdir(parents=True)
    for name in ("final.pt", "latest.pt", "epoch-2/model.pt"):
        (ck / name).write_bytes(b"x")
    return root / "run"


def test_resolver_finds_the_file_a_folder_means(tmp_path, saved):
    run = _run_folder(tmp_path)
    assert resolve_checkpoint(run) == run / "checkpoints" / "final.pt"
    assert resolve_checkpoint(run, prefer="latest") == run / "checkpoints" / "latest.pt"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "final.pt"
    assert resolve_checkpoint(run / "checkpoints" / "epoch-2") == run / "checkpoints" / "epoch-2" / "model.pt"
    assert resolve_checkpoint(saved) == saved / "model.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint in folder .*empty: looked for model.pt, final.pt, "
                       r"checkpoints/final.pt.*model.safetensors"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_every_checkpoint_reader_takes_a_folder(tmp_path, saved, hf_model):
    """load_into_model (continual / init_from), load_encoder (knn, rankme, linprobe, finetune), the export loader
    and the training-checkpoint reader (resume) all go through the resolver."""
    from mimkit.engine.checkpoint import load_training_checkpoint
    from mimkit.tasks.evaluation.common import load_encoder
    from mimkit.tasks.export import load_for_export

    ours = create_model("mae_vit_base_patch16", **OUR_ARCH).eval()
    load_into_model(ours, saved)
    assert_same_outputs(ours, hf_model)
    enc, _ = load_encoder(str(saved))
    assert enc.embed_dim == 48
    _, kind, mae, _, _ = load_for_export(str(saved))
    assert kind == "encoder" and mae.depth == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="looked for model.pt, latest.pt"):
        load_training_checkpoint(tmp_path / "empty")


@pytest.mark.slow
def test_cli_commands_take_folders(tmp_path, saved, capsys):
    from mimkit.cli import main

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["visualize", str(saved), str(img), "--output", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").is_file()
    assert main(["export", str(saved), "--format", "pt2", "--output", str(tmp_path / "e.pt2")]) == 0
    assert "ok atol" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["visualize", str(tmp_path / "empty"), str(img)]) == 2
    err = capsys.readouterr().err
    assert "looked for model.pt" in err and "Traceback" not in err
