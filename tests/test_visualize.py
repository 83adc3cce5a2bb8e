"""`mimkit visualize` on mimkit and Hugging Face checkpoints, and the picture it draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY_MODEL, write_images
from mimkit.cli import main
from mimkit.models import create_model
from mimkit.models.convert import mae_to_hf
from mimkit.tasks.visualize import COLUMNS, reconstruction_grid

pytestmark = pytest.mark.slow


def test_grid_columns_show_original_masked_and_pasted() -> None:
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    pic = reconstruction_grid(model, imgs, 0.75, noise)
    header = pic.shape[0] - 2 * 128  # 32 px images are drawn 4x larger
    body = pic[header:][::4, ::4]
    assert body.shape == (64, 4 * 32, 3) and len(COLUMNS) == 4
    orig, masked, pasted = body[:32, :32], body[:32, 32:64], body[:32, 96:]
    # visible patches of the masked and pasted columns equal the original; masked ones are grey in column 2
    keep = (noise[0].argsort().argsort() < 4).reshape(4, 4)
    for r in range(4):
        for c in range(4):
            sl = (slice(r * 8, r * 8 + 8), slice(c * 8, c * 8 + 8))
            if keep[r, c]:
                assert np.array_equal(masked[sl], orig[sl]) and np.array_equal(pasted[sl], orig[sl])
            else:
                assert np.all(np.abs(masked[sl].astype(int) - 128) <= 1)


def test_visualize_cli_mimkit_and_hf_checkpoints(tmp_path: Path, image_folder: Path) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, "--norm_pix_loss", "--data_path", str(image_folder), "--output_dir",
                 str(run), "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--max_steps", "1"]) == 0
    imgs = write_images(tmp_path / "pics", 2, size=48)
    out = tmp_path / "recon.png"
    assert main(["visualize", str(run / "checkpoints/final.pt"), *map(str, imgs), "--output", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width >= 4 * 32 and im.height > 2 * 32
    # Hugging Face ViTMAEForPreTraining weights (safetensors) of a registered preset
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    hf = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in mae_to_hf(model.state_dict()).items()}, str(hf))
    out2 = tmp_path / "hf.png"
    assert main(["visualize", str(hf), str(imgs[0]), "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                 "--output", str(out2)]) == 0
    assert out2.exists()


def test_visualize_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["visualize", str(tmp_path / "none.pt"), str(tmp_path / "x.jpg")]) == 2
    assert "not found" in capsys.readouterr().err
