"""Fast checks of --strategy and resuming on another world size: the sample list, the effective batch, one-line
refusals, single-process FSDP (the 2-process runs are in test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import TINY_MODEL, write_images
from mimkit.engine.distributed import keep_effective_batch
from mimkit.engine.fsdp import shardable_blocks
from mimkit.engine.sampling import EpochSampler
from mimkit.errors import ConfigError


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_is_distributed_samplers_order(world):
    data = list(range(37))
    for rank in range(world):
        ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        ref.set_epoch(3)
        ours = EpochSampler(data, rank, world, 5)
        ours.set_epoch(3)
        assert [i for _, i in ours] == list(ref)  # the order earlier runs (and their resumes) used
        ours.set_start(4 * world)  # 4 samples per rank already read
        assert [i for _, i in ours] == list(ref)[4:]


def test_global_offset_covers_the_epoch_on_another_world_size():
    data = list(range(24))
    read = []
    for rank in range(2):  # 2 ranks read the first 3 batches of 2
        s = EpochSampler(data, rank, 2, 0)
        read += [i for _, i in s][:6]
    rest = EpochSampler(data, 0, 1, 0)
    rest.set_start(12, end=24)  # 1 process continues at global sample 12 of the same list
    read += [i for _, i in rest]
    assert sorted(read) == data


def test_keep_effective_batch():
    assert keep_effective_batch((4, 1, 2), 4, 1, 2) == (1, None)
    accum, note = keep_effective_batch((4, 1, 2), 4, 1, 1)
    assert accum == 2 and "accum_iter 1 -> 2 keeps the effective batch 8" in note
    accum, note = keep_effective_batch((4, 2, 1), 4, 2, 2)
    assert accum == 1 and "2 -> 1" in note
    assert keep_effective_batch((4, 1, 2), 8, 1, 1)[0] == 1  # the user kept it with --batch_size
    with pytest.raises(ConfigError, match=r"use --batch_size 2 --accum_iter 1"):
        keep_effective_batch((2, 2, 1), 3, 1, 2)  # 4 = 3 x ? x 2 has no answer; batch 2 x accum 1 x 2 does
    with pytest.raises(ConfigError, match="a number of processes that divides 4"):
        keep_effective_batch((2, 1, 2), 1, 1, 3)


def test_fsdp_needs_blocks():
    with pytest.raises(ConfigError, match="--strategy fsdp: resnet lists no transformer blocks"):
        shardable_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), "resnet")


def test_fsdp_in_one_process_shards_nothing(tmp_path, image_folder):
    from mimkit.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(image_folder), "--epochs", "1", "--batch_size", "4",
                 "--device", "cpu", "--num_workers", "0", "--strategy", "fsdp", "--grad_checkpointing",
                 "--output_dir", str(out)]) == 0
    log = (out / "log.txt").read_text()
    assert "--strategy fsdp in a single process shards nothing" in log
    assert "activation checkpointing: 3 block(s)" in log
    assert "sharded" not in torch.load(out / "checkpoints/final.pt", weights_only=True)


def test_bad_strategy_is_one_line(tmp_path, capsys):
    from mimkit.cli import main

    assert main(["pretrain", "--strategy", "zero3", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "distributed.strategy" in err and "ddp or fsdp" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["finetune", "segment", "incremental"])
def test_every_training_command_takes_strategy(command, tmp_path, capsys):
    from mimkit.cli import main

    assert main([command, "--strategy", "zero3", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "distributed.strategy" in err and "ddp or fsdp" in err and not (tmp_path / "x").exists()


def test_incremental_refuses_fsdp_in_one_line(tmp_path, capsys):
    from mimkit.cli import main

    assert main(["incremental", "--strategy", "fsdp", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--strategy fsdp is not available in incremental" in err and "--strategy ddp" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_fsdp_needs_blocks_finds_a_vit_classifier_and_a_segmenter():
    from mimkit.models import create_model
    from mimkit.models.heads import vit_classifier
    from mimkit.models.segmentation import segmenter_arch, segmenter_from_encoder

    enc = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    clf = vit_classifier(enc, 3)
    assert shardable_blocks(clf) == list(clf.blocks)
    seg = segmenter_from_encoder(enc, segmenter_arch(enc, (32, 32), 4, None, 16, 8, [1, 2], 0.1), 0.0)
    assert shardable_blocks(seg) == list(seg.backbone.blocks)


def test_rollback_under_fsdp_over_several_processes_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from mimkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused by the config checks, before joining
    assert main(["pretrain", *TINY_MODEL, "--strategy", "fsdp", "optimization.on_nonfinite=rollback",
                 "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimization.on_nonfinite=rollback is not available under --strategy fsdp" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


def test_grad_checkpointing_help_gives_both_forms(capsys):
    from mimkit.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sets model.grad_checkpointing to true alone, or to the value given (default: false)" in text


def test_finetune_says_checkpointing_and_more_blocks_than_depth(tmp_path, image_folder):
    """finetune logs the checkpointing line as pretrain does; N above the depth is said; a run stopped by
    --max_steps inside an epoch evaluates through the per-epoch hook, so best.pt is kept as after an epoch."""
    from mimkit.cli import main

    enc = tmp_path / "pre"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(image_folder), "--epochs", "1", "--batch_size", "4",
                 "--device", "cpu", "--num_workers", "0", "--grad_checkpointing", "10",
                 "--output_dir", str(enc)]) == 0
    assert ("activation checkpointing: 2 block(s) recompute their activations in backward (frozen blocks are "
            "skipped); --grad_checkpointing 10 asks for more than the encoder's 2 blocks: all 2"
            ) in (enc / "log.txt").read_text()
    ft, labelled = tmp_path / "ft", tmp_path / "labelled"
    write_images(labelled / "train", 8, classes=2)
    write_images(labelled / "val", 4, classes=2, seed=1)
    assert main(["finetune", "--finetune", str(enc / "checkpoints/final.pt"), "--data_path", str(labelled),
                 "--input_size", "32", "--epochs", "1", "--batch_size", "2", "--num_workers", "0", "--device",
                 "cpu", "--amp", "off", "--max_steps", "1", "--grad_checkpointing", "--output_dir", str(ft)]) == 0
    log = (ft / "log.txt").read_text()
    assert "activation checkpointing: 2 block(s) recompute their activations" in log
    assert "eval epoch 0: acc1" in log
    best = torch.load(ft / "checkpoints/best.pt", weights_only=True)
    fin = torch.load(ft / "checkpoints/final.pt", weights_only=True)
    assert best["step"] == fin["step"] == 1 and all(torch.equal(best["model"][k], v) for k, v in fin["model"].items())
