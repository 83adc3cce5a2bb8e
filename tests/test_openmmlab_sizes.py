"""OpenMMLab checkpoints of non-standard widths: the number of heads comes from the mmengine file's saved config
(meta['cfg'], read with `ast`, never executed), not from a 64-d-head guess; without a config the guess is said in
one line and model.kwargs overrides it. Real mmpretrain models saved by mmengine's own saver."""

from __future__ import annotations

import logging

import pytest
import torch
from test_openmmlab import mm  # noqa: F401  (the module fixture: skips without the openmmlab extra)

from mimkit.errors import CheckpointError

# 96 wide with 3 heads (32-d), decoder 48 wide with 3 heads (16-d): the width guesses (1 and 1 heads) are wrong
DIM, HEADS, DEC, DEC_HEADS = 96, 3, 48, 3


@pytest.fixture(scope="module")
def odd_mae(mm, tmp_path_factory):  # noqa: F811
    """(their MAE, its file with the saved config, the same weights in a file without one)."""
    from mmengine.runner.checkpoint import save_checkpoint

    cfg = mm.mae_cfg(dim=DIM, heads=HEADS, dec=DEC, dec_heads=DEC_HEADS)
    torch.manual_seed(3)
    model = mm.mmpretrain_models().build(cfg)
    model.init_weights()
    mm.randomise_(model)
    d = tmp_path_factory.mktemp("odd")
    with_cfg = mm.save_like_runner(model.eval(), cfg, d / "odd_epoch_1.pth")
    bare = d / "odd_nocfg.pth"
    save_checkpoint({"meta": {"epoch": 1}, "state_dict": model.state_dict()}, str(bare))
    return model, with_cfg, bare


def _same_outputs(theirs, ours) -> None:
    """Reconstruction loss with the same mask noise, decoder prediction and unmasked features within 1e-5."""
    ours.norm_pix_loss = True  # their head's norm_pix
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(11)
    with torch.no_grad():
        latent, mask, ids = theirs.backbone(x)
        pred = theirs.neck(latent, ids)
        loss = theirs.head.loss(pred, x, mask)
        feats = theirs.backbone(x, mask=None)[0]
    torch.manual_seed(11)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        our_loss, our_pred, our_mask = ours(x, 0.75, noise)
        our_feats = ours.forward_features(x)
    assert torch.equal(mask, our_mask)
    torch.testing.assert_close(our_pred, pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_feats, feats, atol=1e-5, rtol=0)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def said():
    """The lines models/openmmlab.py says (its once-per-process memory cleared)."""
    from mimkit.models import openmmlab

    openmmlab._SAID.clear()
    h = _Lines()
    logger = logging.getLogger(openmmlab.__name__)
    logger.addHandler(h)
    yield h.lines
    logger.removeHandler(h)


def _heads(model) -> tuple[int, int]:
    return model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads


def test_heads_come_from_the_saved_config_and_outputs_match(odd_mae, said) -> None:
    from mimkit.models.loading import model_from_checkpoint

    theirs, path, _ = odd_mae
    ours, desc = model_from_checkpoint(path)
    assert _heads(ours) == (HEADS, DEC_HEADS) and f"encoder 2x{DIM}, decoder 1x{DEC}" in desc
    assert not said  # nothing guessed
    _same_outputs(theirs, ours)


@pytest.fixture
def wrong_guess(monkeypatch):
    """Width guesses of 1 head: wrong for the files here (the real guess, 3 and 3, happens to be right)."""
    from mimkit.models import openmmlab

    monkeypatch.setattr(openmmlab, "guess_heads", lambda width, decoder=False: 1)


def test_the_width_guess_is_consistent() -> None:
    from mimkit.models.openmmlab import guess_heads

    assert [guess_heads(w) for w in (96, 192, 768, 1024, 320, 100)] == [3, 3, 12, 16, 5, 1]
    assert [guess_heads(w, decoder=True) for w in (512, 48, 64, 100)] == [16, 3, 2, 1]


def test_without_a_config_the_guess_is_one_line_and_model_or_model_kwargs_override_it(odd_mae, said,
                                                                                       wrong_guess) -> None:
    from mimkit.cli import build_parser
    from mimkit.commands import HEADS_WAYS
    from mimkit.models.convert import load_into_model
    from mimkit.models.loading import model_from_checkpoint
    from mimkit.models.openmmlab import heads_way
    from mimkit.models.registry import create_model
    from mimkit.tasks.pretrain import config as PC

    theirs, _, bare = odd_mae
    guessed, _ = model_from_checkpoint(bare)
    assert _heads(guessed) == (1, 1)
    assert len(said) == 1, said
    assert "does not say its number of heads" in said[0]
    assert "assuming 1 head for width 96 (96-d heads), decoder 1 head for width 48 (48-d heads)" in said[0]
    assert "set model.kwargs.num_heads=N / model.kwargs.decoder_num_heads=N" in said[0]  # the dotted keys' commands
    # knn & co: an explicit --model of the same width gives its heads (nano: 96 wide, 3 heads; its decoder is 64
    # wide, not 48, so the decoder's guess stands and is said, naming --model)
    said.clear()
    with heads_way(HEADS_WAYS["knn"]):
        named, desc = model_from_checkpoint(bare, model_name="mae_vit_nano_patch4_dec64d2b")
        assert _heads(named) == (HEADS, 1) and "encoder 2x96" in desc
        assert len(said) == 1 and "assuming decoder 1 head for width 48" in said[0] and "width 96" not in said[0]
        assert "give --model NAME, a registered model 96 wide" in said[0]
        with pytest.raises(CheckpointError, match=r"--model mae_vit_base_patch16 is 768 wide but .*96-wide"):
            model_from_checkpoint(bare, model_name="mae_vit_base_patch16")
    torch.testing.assert_close(named.forward_features(torch.ones(1, 3, 32, 32)),
                               theirs.backbone(torch.ones(1, 3, 32, 32), mask=None)[0], atol=1e-5, rtol=0)
    # the override wins over the checkpoint's guessed architecture (pretrain --init_from, dotted keys), unsaid
    said.clear()
    args = build_parser().parse_args(["pretrain", "--data_path", "digits", "--init_from", str(bare),
                                      f"model.kwargs.num_heads={HEADS}", f"model.kwargs.decoder_num_heads={DEC_HEADS}"])
    cfg = PC.config_from_args(args)
    assert not said
    kw = dict(cfg.model.kwargs)
    assert kw["num_heads"] == HEADS and kw["decoder_num_heads"] == DEC_HEADS and kw["embed_dim"] == DIM
    ours = create_model(cfg.model.type, img_size=32, **kw)
    load_into_model(ours, bare, strict=True)
    _same_outputs(theirs, ours.eval())


def test_a_model_named_against_the_saved_config_is_refused(odd_mae) -> None:
    from mimkit.models.loading import model_from_checkpoint

    _, path, _ = odd_mae  # 96 wide, 3 heads stated; a registered 96-wide model with other heads: none, so patch one
    from mimkit.models import loading

    orig = loading.create_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "create_model", lambda name, **kw: orig(name, **{"num_heads": 2, **kw})
                   if name == "mae_vit_nano_patch4_dec64d2b" and not kw else orig(name, **kw))
        with pytest.raises(CheckpointError, match=r"has 2 heads but .*saved config says 3: leave --model out"):
            model_from_checkpoint(path, model_name="mae_vit_nano_patch4_dec64d2b")


def test_arch_names_and_dicts_are_read_without_running_the_config(tmp_path) -> None:
    from mimkit.models.openmmlab import saved_architecture, saved_model_config

    # mmpretrain's 's' arch is 768 wide with 8 heads (not ViT-S's 384 / 6, not 768's usual 12)
    text = ("model = dict(type='MAE', backbone=dict(type='MAEViT', arch='s', patch_size=16),\n"
            "    neck=dict(type='MAEPretrainDecoder', decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16))")
    assert saved_architecture({"cfg": text}) == {"embed_dim": 768, "num_heads": 8, "decoder_embed_dim": 512,
                                                  "decoder_depth": 8, "decoder_num_heads": 16}
    # MMSeg's keywords, a tuple of taps, the backbone's LN eps (another module's num_heads / eps ignored)
    seg = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
           "model = dict(decode_head=dict(num_heads=99, pool_scales=(1, 2, 3, 6), norm_cfg=norm_cfg),\n"
           "    backbone=dict(type='MAE', embed_dims=96, num_layers=4, num_heads=3, out_indices=(1, 3),\n"
           "                  norm_cfg=dict(eps=1e-06, type='LN')))")
    assert saved_architecture({"cfg": seg}) == {"embed_dim": 96, "depth": 4, "num_heads": 3, "layer_norm_eps": 1e-6,
                                                "out_indices": [1, 3], "pool_scales": [1, 2, 3, 6]}
    # nothing in the text runs: a call that would write a marker file reads as None
    marker = tmp_path / "MARKER"
    evil = (f"model = dict(backbone=dict(arch=__import__('pathlib').Path({str(marker)!r}).write_text('x'),"
            " num_heads=open({!r}, 'w')))".format(str(marker)))
    assert saved_model_config({"cfg": evil}) == {"backbone": {"arch": None, "num_heads": None}}
    assert saved_architecture({"cfg": evil}) == {} and not marker.exists()
    assert saved_architecture({"cfg": "model = dict(("}) == {} and saved_architecture(None) == {}


@pytest.mark.slow
def test_cli_knn_and_pretrain_init_from_take_the_odd_width_files(odd_mae, tmp_path, image_folder, capsys,
                                                                 said) -> None:
    """From the CLI: knn on the file with its config (3 heads, said nowhere as a guess); pretrain --init_from the
    file without one, the encoder's heads given as model.kwargs: the run builds 3 heads and starts from their
    weights; the decoder's guess alone is said, on the console and in log.txt."""
    import json

    from test_evaluate import write_colour_set

    from mimkit.cli import main
    from mimkit.io import load_checkpoint_file

    _, path, bare = odd_mae
    data = write_colour_set(tmp_path / "data", size=32)
    assert main(["knn", "--checkpoint", str(path), "--data_path", str(data), "--k", "3", "--num_workers", "0",
                 "--device", "cpu", "--output_dir", str(tmp_path / "knn")]) == 0
    out = capsys.readouterr().out
    assert "mmpretrain MAE (backbone + neck)" in out and not said
    assert json.loads((tmp_path / "knn/results.json").read_text())["metrics"]
    run = tmp_path / "pre"
    with pytest.MonkeyPatch.context() as mp:  # a wrong width guess (1 head), as the real one is right here
        from mimkit.models import openmmlab

        mp.setattr(openmmlab, "guess_heads", lambda width, decoder=False: 1)
        assert main(["pretrain", "--init_from", str(bare), "--data_path", str(image_folder), "--epochs", "1",
                     "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--amp", "off", "--warmup_epochs",
                     "0", "--output_dir", str(run), f"model.kwargs.num_heads={HEADS}"]) == 0
    kw = load_checkpoint_file(run / "checkpoints/final.pt")["config"]["model"]["kwargs"]
    assert (kw["embed_dim"], kw["num_heads"], kw["decoder_num_heads"]) == (DIM, HEADS, 1)
    # only what the keys left to the guess is said, once, and it is in the run's log.txt too
    assert len(said) == 1 and "assuming decoder 1 head for width 48" in said[0] and "width 96" not in said[0]
    assert "set model.kwargs.decoder_num_heads=N" in said[0]
    assert said[0] in (run / "log.txt").read_text()
