"""OpenMMLab checkpoints: mmengine files read without running code, mmpretrain MAE / ViT and MMSegmentation
UperNet-on-MAE models built by their own libraries load into mimkit with the same outputs, and a mimkit segmenter
exports back to a folder MMSegmentation's own init_model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.errors import CheckpointError
from mimkit.io import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]


def _image(folder: Path) -> str:
    from PIL import Image

    path = folder / "img.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- safe reading
class _Evil:
    """Unpickling this object would create the marker file (os.system) if the reader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    torch.save({"payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r": no weights \(no .state_dict. of tensors.*it names posix.system"):
        load_checkpoint_file(tmp_path / "evil.pt")
    # inside an mmengine-style file it is read inertly and dropped; the weights still load
    torch.save({"meta": {"epoch": 2, "hook": _Evil(marker)}, "state_dict": {"w": torch.arange(3.0)},
                "optimizer": _Evil(marker)}, tmp_path / "mm.pth")
    obj = load_checkpoint_file(tmp_path / "mm.pth")
    assert torch.equal(obj["state_dict"]["w"], torch.arange(3.0))
    assert obj["meta"] == {"epoch": 2} and obj["_mimkit_dropped"] == ["optimizer"]
    assert not marker.exists()
    # through the CLI: one line, exit 2, still no marker
    assert main(["visualize", str(tmp_path / "evil.pt"), _image(tmp_path), "--output", str(tmp_path / "o.png")]) == 2
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_an_mmengine_file_without_state_dict_is_one_line(tmp_path, capsys) -> None:
    torch.save({"meta": {"epoch": 1}, "optimizer": {"state": {}}}, tmp_path / "nostate.pth")
    assert main(["knn", "--checkpoint", str(tmp_path / "nostate.pth"), "--data_path", "digits",
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no weights (no 'state_dict'): an mmengine checkpoint" in err, err


# ---------------------------------------------------------------------------------------------- real libraries
@pytest.fixture(scope="module")
def mm():
    """The mmpretrain / mmseg builders (tests/openmmlab_models.py), or a skip when the extra is absent."""
    for name in ("mmengine", "mmpretrain", "mmseg"):
        pytest.importorskip(name, reason="needs the openmmlab extra: pip install 'mimkit[openmmlab]'")
    sys.path.insert(0, str(Path(__file__).parent))
    import openmmlab_models

    return openmmlab_models


@pytest.fixture(scope="module")
def mae_file(mm, tmp_path_factory):
    cfg = mm.mae_cfg()
    torch.manual_seed(0)
    model = mm.mmpretrain_models().build(cfg)
    model.init_weights()
    mm.randomise_(model)
    path = mm.save_like_runner(model.eval(), cfg, tmp_path_factory.mktemp("mae") / "mae_epoch_3.pth")
    return model, path


def test_mmpretrain_mae_loads_strictly_and_reproduces_its_outputs(mae_file, caplog) -> None:
    from mimkit.models.convert import load_into_model
    from mimkit.models.loading import model_from_checkpoint

    theirs, path = mae_file
    ours, desc = model_from_checkpoint(path)
    assert "mmpretrain MAE (backbone + neck)" in desc and "encoder 2x64, decoder 1x32" in desc
    report = load_into_model(ours, path, strict=True)  # strict: every key maps, nothing is left over
    assert report.summary().startswith("loaded an mmpretrain MAE (backbone + neck) checkpoint; ignored the "
                                       "mmengine file's meta, optimizer, message_hub")
    ours.norm_pix_loss = True  # their head's norm_pix
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(7)  # their MAEViT draws its masking noise with torch.rand(N, L): we hand ours the same
    with torch.no_grad():
        latent, mask, ids = theirs.backbone(x)
        pred = theirs.neck(latent, ids)
        loss = theirs.head.loss(pred, x, mask)
        feats = theirs.backbone(x, mask=None)[0]
    torch.manual_seed(7)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        our_loss, our_pred, our_mask = ours(x, 0.75, noise)
        our_latent, _, _ = ours.forward_encoder(x, 0.75, noise)
        our_feats = ours.forward_features(x)
    assert torch.equal(mask, our_mask)
    torch.testing.assert_close(our_latent, latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_pred, pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_feats, feats, atol=1e-5, rtol=0)


def test_mmpretrain_classifier_gives_its_encoder_and_visualize_refuses_it(mm, tmp_path, capsys) -> None:
    from mimkit.models.loading import model_from_checkpoint

    cfg = mm.vit_classifier_cfg()
    torch.manual_seed(1)
    theirs = mm.mmpretrain_models().build(cfg)
    theirs.init_weights()
    mm.randomise_(theirs)
    path = mm.save_like_runner(theirs.eval(), cfg, tmp_path / "vit_cls.pth")
    ours, desc = model_from_checkpoint(path)
    assert "mmpretrain ViT classifier (backbone + head)" in desc
    assert ours.load_report.decoder_fresh and "head (2 tensors)" in ours.load_report.summary()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = theirs.extract_feat(x)[0]  # their avg_featmap: ln2(mean of patch tokens)
        tokens = ours.forward_features(x, layers=[1])[0]
        our_pooled = ours.norm(tokens[:, 1:].mean(1))  # their ln2 is our norm
    torch.testing.assert_close(our_pooled, pooled, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["visualize", str(path), _image(tmp_path), "--output", str(tmp_path / "v.png")]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "holds no MAE decoder" in err, err
    assert "starts fresh" not in out + err and "loaded an" not in out + err  # the refusal alone
    # an encoder-taking command (knn, linprobe, finetune, ...): no random decoder built or counted, none said
    enc, desc = model_from_checkpoint(path, decoder="unused")
    assert "no decoder" in desc and "encoder only" in enc.load_report.summary()
    assert "starts fresh" not in enc.load_report.summary()
    assert sum(p.numel() for n, p in enc.named_parameters() if n.startswith("decoder")) < 10_000  # not 8x512
    torch.testing.assert_close(enc.norm(enc.forward_features(x, layers=[1])[0][:, 1:].mean(1)), pooled, atol=1e-5,
                               rtol=0)
    # pretrain --init_from: the checkpoint's encoder, the preset's decoder (digits: 2 blocks x 64-d, 2 heads)
    from mimkit.cli import build_parser
    from mimkit.tasks.pretrain import config as PC

    cfg = PC.config_from_args(build_parser().parse_args(["pretrain", "--data_path", "digits", "--init_from",
                                                         str(path)]))
    kw = cfg.model.kwargs
    assert (kw.decoder_embed_dim, kw.decoder_depth, kw.decoder_num_heads) == (64, 2, 2), kw
    assert kw.embed_dim == ours.embed_dim and kw.depth == len(ours.blocks)


@pytest.fixture(scope="module")
def upernet_file(mm, tmp_path_factory):
    cfg = mm.upernet_cfg()
    torch.manual_seed(2)
    model = mm.import_mmseg().build(cfg)
    model.init_weights()
    mm.randomise_(model)
    classes = [f"thing{i}" for i in range(mm.TINY_SEG["classes"])]
    path = mm.save_like_runner(model.eval(), cfg, tmp_path_factory.mktemp("seg") / "iter_160.pth", classes)
    return model, path, classes


def _their_logits(model, x: torch.Tensor) -> torch.Tensor:
    metas = [dict(img_shape=tuple(x.shape[2:]), ori_shape=tuple(x.shape[2:]))] * x.shape[0]
    with torch.no_grad():
        return model.encode_decode(x, metas)


def test_mmseg_upernet_reproduces_its_logits_and_backbone_features(mm, upernet_file) -> None:
    from mimkit.models.loading import model_from_checkpoint
    from mimkit.models.segmentation import MAESegmenter
    from mimkit.tasks.segment.setup import read_segment_checkpoint

    theirs, path, classes = upernet_file
    seg = read_segment_checkpoint(str(path))
    arch = seg["config"]["model"]["arch"]
    assert arch["taps"] == mm.TINY_SEG["taps"] and arch["num_heads"] == 2 and arch["layer_norm_eps"] == 1e-5
    assert seg["config"]["model"]["class_names"] == classes
    assert seg["config"]["data"]["mean"] == pytest.approx([m / 255 for m in mm.MEAN])
    assert "4 relative position bias tables (all zeros: no effect)" in seg["openmmlab"]
    ours = MAESegmenter(arch).eval()
    ours.load_state_dict(seg["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), _their_logits(theirs, x), atol=1e-5, rtol=0)
    # the encoder alone, for every command that takes one: taps equal their backbone's outputs
    enc, desc = model_from_checkpoint(path)
    assert "MMSegmentation UperNet on an MAE backbone" in desc and enc.init_values is not None
    with torch.no_grad():
        outs = enc.forward_features(x, layers=mm.TINY_SEG["taps"])
        their_outs = theirs.backbone(x)
    for o, t in zip(outs, their_outs, strict=True):
        torch.testing.assert_close(o[:, 1:].transpose(1, 2).reshape(t.shape), t, atol=1e-5, rtol=0)


def test_a_trained_relative_position_bias_is_refused_in_one_line(mm, upernet_file, tmp_path, capsys) -> None:
    theirs, _, _ = upernet_file
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    sd["backbone.layers.0.attn.relative_position_bias_table"] += 0.1
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "relpos.pth")
    assert main(["segment", "--eval", "--resume", str(tmp_path / "relpos.pth"), "--output_dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained relative position bias" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_segment_eval_predict_finetune_on_an_mmseg_file_and_export_back(mm, upernet_file, tmp_path, capsys) -> None:
    """The CLI on an MMSeg file (the built-in 8-class mosaics), then a mimkit run exported to MMSeg's init_model."""
    theirs, path, classes = upernet_file
    common = ["--num_workers", "0", "--test_mode", "whole", "logging.tensorboard=false", "--no_auto_resume",
              "--input_size", "32"]
    assert main(["segment", "--eval", "--resume", str(path), *common, "--output_dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "loaded an MMSegmentation UperNet on an MAE backbone checkpoint" in out and "layer scale" in out
    assert "ignored the mmengine file's meta, optimizer, message_hub" in out
    assert "the checkpoint run's settings" not in out and "the settings of the MMSeg file's config" in out
    # the file names its classes thing0..; evaluated on the mosaics, the data's names are used and that is said
    assert "note: class names are the data's" in out and "the checkpoint names them thing0" in out
    assert (tmp_path / "ev" / "results.json").is_file()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs)
    assert main(["segment", "--predict", str(imgs), "--resume", str(path), *common, "--output_dir",
                 str(tmp_path / "pr")]) == 0
    assert "wrote 1 label PNG(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "pr").rglob("img*.png"))) >= 1
    # further training: --finetune takes its backbone (layer scale included)
    run = tmp_path / "ft"
    assert main(["segment", "--finetune", str(path), "--max_iters", "2", "--batch_size", "4", "model.channels=16",
                 "model.aux_channels=8", *common, "--output_dir", str(run)]) == 0
    ck = load_checkpoint_file(run / "checkpoints" / "final.pt")
    assert ck["config"]["model"]["arch"]["init_values"] == 1.0 and "backbone.blocks.0.ls1.gamma" in ck["model"]
    # --resume of an MMSeg file for training is refused: it holds no mimkit training state
    assert main(["segment", "--resume", str(path), "--max_iters", "2", *common, "--output_dir",
                 str(tmp_path / "rs")]) == 2
    assert "holds no mimkit training state" in capsys.readouterr().err

    # export the mimkit run back to MMSeg; their init_model loads it and predicts what mimkit predicts
    exp = tmp_path / "exp"
    assert main(["export", str(run), "--format", "mmseg", "--output", str(exp)]) == 0
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import openmmlab_models as mm
mm.import_mmseg()
from mmseg.apis import init_model
model = init_model({str(exp / 'config.py')!r}, {str(exp / 'model.pth')!r}, device='cpu').eval()
x = torch.load({str(tmp_path / 'x.pt')!r})
metas = [dict(img_shape=(32, 32), ori_shape=(32, 32))] * x.shape[0]
with torch.no_grad():
    torch.save(model.encode_decode(x, metas), {str(tmp_path / 'theirs.pt')!r})
print(model.dataset_meta['classes'])
"""
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    from mimkit.models.segmentation import MAESegmenter

    ours = MAESegmenter(ck["config"]["model"]["arch"]).eval()
    ours.load_state_dict(ck["model"], strict=True)
    with torch.no_grad():
        mine = ours(x)
    torch.testing.assert_close(torch.load(tmp_path / "theirs.pt"), mine, atol=1e-5, rtol=0)
    assert "do not match exactly" not in done.stdout + done.stderr  # mmengine's line for missing / unexpected keys
    names = ck["config"]["model"]["class_names"]
    assert str(list(names)) == done.stdout.strip().splitlines()[-1]  # class names travel in meta.dataset_meta


def test_a_segmenter_without_layer_scale_exports_to_what_mmseg_builds(mm, tmp_path) -> None:
    """An ordinary mimkit segmenter (no layer scale, eps 1e-6): MMSeg builds the exported config and loads the
    weights strictly (gammas of 1, zero bias tables written for it), with the same logits."""
    from mmengine.config import Config

    from mimkit.models.segmentation import MAESegmenter

    arch = dict(img_size=[32, 32], patch_size=8, in_chans=3, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
                taps=[0, 1, 2, 3], num_classes=3, channels=16, aux_channels=8, pool_scales=[1, 2, 3, 6], dropout=0.1)
    torch.manual_seed(3)
    ours = MAESegmenter(arch).eval()
    mm.randomise_(ours)
    torch.save({"model": ours.state_dict(), "mimkit_version": "test", "config": {
        "model": {"arch": arch, "class_names": ["a", "b", "c"]}, "data": {"mean": [0.5] * 3, "std": [0.25] * 3}}},
        tmp_path / "seg.pt")
    assert main(["export", str(tmp_path / "seg.pt"), "--format", "mmseg", "--output", str(tmp_path / "ex")]) == 0
    cfg = Config.fromfile(str(tmp_path / "ex" / "config.py"))
    assert cfg.model.data_preprocessor.mean == [127.5] * 3 and cfg.model.backbone.norm_cfg.eps == 1e-6
    theirs = mm.import_mmseg().build(cfg.model).eval()
    theirs.load_state_dict(load_checkpoint_file(tmp_path / "ex" / "model.pth")["state_dict"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mine = ours(x)
    torch.testing.assert_close(_their_logits(theirs, x), mine, atol=1e-5, rtol=0)
    # read back by mimkit (knn & co): the folder resolves to model.pth, its heads come from config.py beside it
    # (2 heads of 32-d; the width alone would say 1 of 64-d)
    from mimkit.models.loading import model_from_checkpoint

    enc, desc = model_from_checkpoint(tmp_path / "ex")
    assert enc.blocks[0].attn.num_heads == 2 and "ex/model.pth" in desc
    mine_sd = ours.state_dict()
    assert all(torch.equal(v, mine_sd["backbone." + k]) for k, v in enc.state_dict().items()
               if "backbone." + k in mine_sd)  # (gammas of 1 are the export's own: MMSeg's MAE layer has them)
    # taps MMSeg cannot express (a block twice: default_taps of a 2-block encoder) are one line, nothing written
    torch.save({"model": MAESegmenter({**arch, "depth": 2, "taps": [0, 0, 0, 1]}).state_dict(), "mimkit_version": "t",
                "config": {"model": {"arch": {**arch, "depth": 2, "taps": [0, 0, 0, 1]}}}}, tmp_path / "dup.pt")
    assert main(["export", str(tmp_path / "dup.pt"), "--format", "mmseg", "--output", str(tmp_path / "ex2")]) == 2
    assert not (tmp_path / "ex2").exists()


def test_unmapped_keys_are_listed_in_the_load_line(mae_file, tmp_path) -> None:
    from mimkit.models.convert import load_into_model
    from mimkit.models.loading import model_from_checkpoint

    theirs, _ = mae_file
    sd = dict(theirs.state_dict())
    sd["backbone.pre_norm.weight"] = torch.ones(64)  # a VisionTransformer(pre_norm=True) part mimkit has no name for
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "extra.pth")
    ours, _ = model_from_checkpoint(tmp_path / "extra.pth")
    assert "unused: backbone.pre_norm.weight" in ours.load_report.summary()
    with pytest.raises(CheckpointError, match="1 unexpected keys \\(backbone.pre_norm.weight\\)"):
        load_into_model(ours, tmp_path / "extra.pth", strict=True)


def test_beit_q_and_v_biases_become_one_qkv_bias(mm) -> None:
    """MMSeg's BEiTAttention (q_bias, v_bias, no k bias; its relative table at zero) equals a timm Attention
    holding the converted qkv bias (a zero k part)."""
    from timm.models.vision_transformer import Attention

    from mimkit.models.openmmlab import openmmlab_to_mae

    mm.import_mmseg()
    from mmseg.models.backbones.beit import BEiTAttention

    torch.manual_seed(4)
    theirs = BEiTAttention(embed_dims=32, num_heads=2, window_size=(4, 4), bias="qv_bias").eval()
    with torch.no_grad():
        theirs.q_bias.normal_()
        theirs.v_bias.normal_()
        theirs.relative_position_bias_table.zero_()
    sd = {f"backbone.layers.0.attn.{k}": v for k, v in theirs.state_dict().items()}
    sd["backbone.patch_embed.projection.weight"] = torch.zeros(32, 3, 8, 8)
    mae_sd, dropped = openmmlab_to_mae(sd)
    assert "1 relative position bias tables (all zeros: no effect)" in dropped
    ours = Attention(32, num_heads=2, qkv_bias=True).eval()
    ours.load_state_dict({k[len("blocks.0.attn."):]: v for k, v in mae_sd.items() if k.startswith("blocks.0.")})
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mmseg_inference_model_on_the_export_agrees_with_segment_predict_on_a_non_square_image(mm, tmp_path,
                                                                                                capsys) -> None:
    """The exported test_pipeline (keep-ratio Resize to [4 crop, crop]) and test_cfg (slide, the crop as window):
    MMSeg's own inference_model on a 45x70 image labels the pixels as `mimkit segment --predict` does."""
    import numpy as np
    from PIL import Image

    from mimkit.models.segmentation import MAESegmenter

    arch = dict(img_size=[32, 32], patch_size=8, in_chans=3, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
                taps=[0, 1, 2, 3], num_classes=3, channels=16, aux_channels=8, pool_scales=[1, 2, 3, 6], dropout=0.1)
    torch.manual_seed(4)
    ours = MAESegmenter(arch).eval()
    mm.randomise_(ours)
    torch.save({"model": ours.state_dict(), "mimkit_version": "test", "optimizer": {}, "epoch": 1, "step": 1,
                "config": {"model": {"arch": arch, "class_names": ["a", "b", "c"]},
                           "data": {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 32}, "test": {"mode": "slide"}}},
               tmp_path / "seg.pt")
    assert main(["export", str(tmp_path / "seg.pt"), "--format", "mmseg", "--output", str(tmp_path / "ex")]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "mmcv._ext" in out  # slide with the crop as window: nothing MMSeg cannot match
    text = (tmp_path / "ex" / "config.py").read_text()
    assert "test_cfg=dict(mode='slide', crop_size=(32, 32), stride=(21, 21))" in text
    assert "dict(type='Resize', scale=(128, 32), keep_ratio=True)" in text
    # a smooth picture (a few sharp edges), not noise: resizing in uint8 (MMSeg, cv2) or float (mimkit) agrees
    yy, xx = np.mgrid[0:45, 0:70]
    img = np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    img[10:30, 20:50] = [200, 30, 90]
    Image.fromarray(img).save(tmp_path / "pic.png")
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
import openmmlab_models as mm
mm.import_mmseg()
from mmseg.apis import inference_model, init_model
model = init_model({str(tmp_path / 'ex' / 'config.py')!r}, {str(tmp_path / 'ex' / 'model.pth')!r}, device='cpu')
np.save({str(tmp_path / 'theirs.npy')!r}, inference_model(model, {str(tmp_path / 'pic.png')!r}).pred_sem_seg.data[0].numpy())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "pic.png").write_bytes((tmp_path / "pic.png").read_bytes())
    assert main(["segment", "--predict", str(imgs), "--resume", str(tmp_path / "seg.pt"), "--test_mode", "slide",
                 "--num_workers", "0", "--output_dir", str(tmp_path / "pr"), "logging.tensorboard=false"]) == 0
    mine = np.array(Image.open(next((tmp_path / "pr").rglob("pic.png_label.png"))))
    theirs = np.load(tmp_path / "theirs.npy")
    assert theirs.shape == mine.shape == (45, 70)
    agree = float((theirs == mine).mean())
    print(f"MMSeg inference_model vs mimkit --predict: {agree:.2%} of pixels agree")
    assert agree >= 0.99, agree


def test_an_mmseg_file_with_other_classes_than_the_data_names_the_checkpoint(mm, tmp_path, capsys) -> None:
    """A 5-class MMSeg file evaluated on the 8-class mosaics: the count is the checkpoint's (no --num_classes was
    typed, so the line must not blame one)."""
    spec = dict(mm.TINY_SEG, classes=5)
    cfg = mm.upernet_cfg(spec)
    torch.manual_seed(2)
    model = mm.import_mmseg().build(cfg)
    model.init_weights()
    path = mm.save_like_runner(model.eval(), cfg, tmp_path / "iter_5c.pth", [f"c{i}" for i in range(5)])
    assert main(["segment", "--eval", "--resume", str(path), "--num_workers", "0", "--test_mode", "whole",
                 "--input_size", "32", "--output_dir", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert "head predicts 5 classes" in err and "has 8" in err and "--num_classes" not in err, err
    assert not (tmp_path / "ev" / "results.json").exists()
