"""linprobe / finetune take the encoder checkpoint's input size over a preset's, as knn does; --input_size or the
user's own config file win; a resized position embedding is said."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.engine.checkpoint import make_checkpoint
from mimkit.models import create_model

KW = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
          decoder_num_heads=2)


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory) -> Path:
    """A tiny MAE pretrained (as its config says) at 64 px: an 8x8 patch grid."""
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    m = create_model("mae_vit_tiny_patch16", img_size=64, **KW)
    cfg = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": KW, "norm_pix_loss": False},
           "data": {"input_size": 64}}
    torch.save(make_checkpoint(model=m.state_dict(), optimizer={}, epoch=0, step=0, config=cfg), d / "final.pt")
    return d / "final.pt"


def _size(command: str, *words: str) -> int:
    from mimkit.commands import build_parser
    from mimkit.config.flags import config_from_args
    from mimkit.tasks.evaluation import config as EC

    args = build_parser().parse_args([command, *words])
    flags, schema, presets = ((EC.LINPROBE_FLAGS, EC.LinprobeConfig, EC.LINPROBE_PRESETS) if command == "linprobe"
                              else (EC.FINETUNE_FLAGS, EC.FinetuneConfig, EC.FINETUNE_PRESETS))
    # as the commands' own entries call it (the CLI test below runs linprobe's)
    return config_from_args(args, flags, schema, data_presets=presets, checkpoint_size=True).data.input_size


@pytest.mark.parametrize("command", ["linprobe", "finetune"])
def test_checkpoint_size_beats_a_preset_and_a_typed_size_or_own_file_beat_it(command, ckpt64, tmp_path) -> None:
    ft = ["--finetune", str(ckpt64)]
    assert _size(command, f"{command}/digits.yaml", *ft) == 64       # shipped preset file says 32
    assert _size(command, "--data_path", "digits", *ft) == 64        # the data's preset says 32
    assert _size(command, f"{command}/digits.yaml", *ft, "--input_size", "32") == 32
    assert _size(command, f"{command}/digits.yaml", "data.input_size=48", *ft) == 48
    own = tmp_path / "mine.yaml"
    own.write_text("data:\n  data_path: digits\n  input_size: 40\n")
    assert _size(command, str(own), *ft) == 40                       # the user's own file is theirs
    own.write_text("data:\n  data_path: digits\n")
    assert _size(command, str(own), *ft) == 64                       # ... and says nothing of the size here


def test_linprobe_runs_at_the_checkpoint_size_and_says_a_resize(ckpt64, tmp_path) -> None:
    common = ["linprobe", "linprobe/digits.yaml", "--finetune", str(ckpt64), "--max_steps", "1", "--epochs", "1"]
    assert main([*common, "--output_dir", str(tmp_path / "a")]) == 0
    log = (tmp_path / "a" / "log.txt").read_text()  # the start-up line
    assert "64x64 input" in log and "input 64," in log and "resized" not in log
    assert main([*common, "--input_size", "32", "--output_dir", str(tmp_path / "b")]) == 0
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "input 32," in log and "position embedding resized (bicubic) to the 4x4 patch grid of 32x32 px" in log
