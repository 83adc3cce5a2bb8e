"""Segmentation pieces: neck / head shapes, MMSeg layer decay, metrics by hand, data layouts, inference modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mimkit.data.segmentation import (
    ADE20K_CLASSES, SegEvalPipeline, SegTrainPipeline, check_pairs, open_segmentation, reduce_zero_label,
)
from mimkit.errors import DataError
from mimkit.metrics.segmentation import ConfusionMatrix, metrics_from_confusion
from mimkit.models import create_model
from mimkit.models.segmentation import default_taps, segmenter_arch, segmenter_from_encoder
from mimkit.tasks.segment import param_groups, warmup_poly
from mimkit.tasks.segment.infer import slide_logits, whole_logits

TINY = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def tiny_segmenter(size=(32, 32), classes=5, seed=0):
    torch.manual_seed(seed)
    enc = create_model("mae_vit_tiny_patch16", img_size=size, **TINY)
    arch = segmenter_arch(enc, size, classes, None, 16, 8, [1, 2, 3, 6], 0.1)
    return segmenter_from_encoder(enc, arch, 0.1)


# ---------------------------------------------------------------------------------------------- model
def test_vit_base_neck_strides_at_512_on_meta() -> None:
    with torch.device("meta"):
        enc = create_model("mae_vit_base_patch16", img_size=512)
        model = segmenter_from_encoder_meta(enc)
        feats = model.extract_feat(torch.empty(2, 3, 512, 512))
        assert [tuple(f.shape) for f in feats] == [(2, 768, 128, 128), (2, 768, 64, 64), (2, 768, 32, 32),
                                                   (2, 768, 16, 16)]  # strides 4, 8, 16, 32
        main, aux = model(torch.empty(2, 3, 512, 512))
        assert tuple(main.shape) == (2, 150, 128, 128) and tuple(aux.shape) == (2, 150, 32, 32)
    assert model.taps == [3, 5, 7, 11]


def segmenter_from_encoder_meta(enc):
    from mimkit.models.segmentation import MAESegmenter

    return MAESegmenter(segmenter_arch(enc, (512, 512), 150, None, 768, 256, [1, 2, 3, 6], 0.1), 0.1)


def test_default_taps_scale_with_depth() -> None:
    assert default_taps(12) == [3, 5, 7, 11]
    assert default_taps(24) == [7, 11, 15, 23]  # MMSeg's ViT-L taps
    assert default_taps(6) == [1, 2, 3, 5]
    assert all(0 <= t < 2 for t in default_taps(2))


def test_tiny_model_shapes_train_and_eval_non_square() -> None:
    model = tiny_segmenter(size=(32, 32))
    x = torch.randn(2, 3, 48, 80)  # another size and not square: positions are interpolated
    feats = model.extract_feat(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    main, aux = model(x)
    assert tuple(main.shape) == (2, 5, 24, 40) and tuple(aux.shape) == (2, 5, 6, 10)
    model.eval()
    assert tuple(model(x).shape) == (2, 5, 48, 80)


def test_backbone_keeps_the_encoder_maths() -> None:
    torch.manual_seed(0)
    enc = create_model("mae_vit_tiny_patch16", img_size=32, **TINY).eval()
    model = segmenter_from_encoder(enc, segmenter_arch(enc, (32, 32), 3, [0, 0, 1, 1], 16, 8, [1], 0.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    want = enc.forward_features(x, layers=(1,))[0][:, 1:]  # raw block output, cls dropped
    got = model.backbone.blocks[1](model.backbone.blocks[0](
        torch.cat([model.backbone.cls_token.expand(2, -1, -1), model.backbone.patch_embed(x).reshape(2, 16, 32)], 1)
        + model.backbone.pos_embed))[:, 1:]
    assert torch.allclose(got, want, atol=1e-5)
    # the pyramid's identity level is that map, reshaped to (N, D, h, w)
    level = model.neck.identity(want.transpose(1, 2).reshape(2, 32, 4, 4))
    assert torch.allclose(model.extract_feat(x)[2], level, atol=1e-5)


def test_uperhead_equals_hugging_face_uperhead() -> None:
    """Peer check: MMSeg-named weights loaded into transformers' UperNetHead give the same logits."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.upernet.modeling_upernet import UperNetHead

    model = tiny_segmenter().eval()
    head = model.decode_head
    cfg = transformers.UperNetConfig(hidden_size=16, pool_scales=[1, 2, 3, 6], num_labels=5)
    hf = UperNetHead(cfg, in_channels=[32] * 4).eval()
    sd = {k.replace(".bn.", ".batch_norm.").replace("conv_seg", "classifier"): v for k, v in head.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    feats = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2)]
    for m in (head, hf):  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
    sd = {k.replace(".bn.", ".batch_norm.").replace("conv_seg", "classifier"): v for k, v in head.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    assert torch.allclose(head(feats), hf(feats), atol=1e-5)


def _mmseg_layer_id(var_name: str, max_layer_id: int) -> int:
    # mmseg/engine/optimizers/layer_decay_optimizer_constructor.py get_layer_id_for_vit, restated
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    if var_name.startswith("backbone.patch_embed"):
        return 0
    if var_name.startswith("backbone.layers"):
        return int(var_name.split(".")[2]) + 1
    return max_layer_id - 1


@pytest.mark.parametrize("depth,rate", [(2, 0.65), (3, 0.9)])
def test_layer_decay_scales_equal_mmseg(depth, rate) -> None:
    torch.manual_seed(0)
    enc = create_model("mae_vit_tiny_patch16", img_size=32, **{**TINY, "depth": depth})
    model = segmenter_from_encoder(enc, segmenter_arch(enc, (32, 32), 4, None, 16, 8, [1, 2], 0.1))
    groups = param_groups(model, 0.05, rate)
    by_param = {id(p): g for g in groups for p in g["params"]}
    num_layers = depth + 2  # LearningRateDecayOptimizerConstructor: paramwise num_layers + 2
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("neck.") for n in names) and any(n.startswith("auxiliary_head.") for n in names)
    for name, p in model.named_parameters():
        mm_name = name.replace("backbone.blocks.", "backbone.layers.")  # MMSeg's MAE calls blocks layers
        scale = rate ** (num_layers - _mmseg_layer_id(mm_name, num_layers) - 1)
        assert by_param[id(p)]["lr_scale"] == pytest.approx(scale), name
        no_decay = p.ndim == 1 or name in ("backbone.cls_token", "backbone.pos_embed")
        assert by_param[id(p)]["weight_decay"] == (0.0 if no_decay else 0.05), name
    # the loop logs the first group's lr: the heads' (scale 1), as MMSeg logs the base lr
    assert groups[0]["lr_scale"] == 1.0 and groups[0]["names"][0].startswith(("neck.", "decode_head."))
    assert [g["lr_scale"] for g in groups] == sorted((g["lr_scale"] for g in groups), reverse=True)


def test_warmup_then_poly() -> None:
    kw = dict(lr=1e-4, min_lr=0.0, warmup=1500, warmup_ratio=1e-6, total=160000, power=1.0)
    assert warmup_poly(0, **kw) == pytest.approx(1e-10)
    assert warmup_poly(750, **kw) == pytest.approx(1e-4 * (1e-6 + (1 - 1e-6) * 0.5))
    assert warmup_poly(1500, **kw) == pytest.approx(1e-4)
    assert warmup_poly(1500 + (160000 - 1500) / 2, **kw) == pytest.approx(5e-5)
    assert warmup_poly(160000, **kw) == 0.0


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_from_a_hand_computed_confusion_matrix() -> None:
    # 4 classes; class 3 is absent from both prediction and target; 255 is ignored
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])  # predictions on ignored pixels do not count
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred[:1], target[:1])  # accumulated over "images", never averaged per image
    cm.update(pred[1:], target[1:])
    want = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, want)
    m = cm.compute()
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]  # TP / (target + pred - TP)
    assert m["IoU"][:3] == pytest.approx(iou) and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx(sum(iou) / 3)  # the absent class is left out of the mean
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert m["mDice"] == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    from mimkit.metrics.segmentation import format_class_table

    table = format_class_table(m, [f"c{i}" for i in range(len(m["IoU"]))])
    assert "n/a" in table and "nan" not in table  # the absent class has no score


def test_confusion_matrix_rejects_out_of_range_targets() -> None:
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([3]))
    assert metrics_from_confusion(torch.zeros(2, 2))["pixels"] == 0


# ---------------------------------------------------------------------------------------------- data
def test_reduce_zero_label() -> None:
    mask = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    assert reduce_zero_label(mask).tolist() == [[255, 0, 1], [149, 255, 2]]


def write_ade(root, n_train=3, n_val=2, size=(40, 30), label_max=150, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
            mask = rng.integers(0, label_max + 1, (size[1], size[0])).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def test_ade20k_unpaired_files_are_named(tmp_path) -> None:
    root = write_ade(tmp_path / "ADEChallengeData2016")
    ann = root / "annotations" / "validation" / "ADE_validation_00000001.png"
    ann.unlink()
    with pytest.raises(DataError, match=r"image .*ADE_validation_00000001.jpg has no annotation \(expected .*"
                                        r"ADE_validation_00000001.png\)$"):
        open_segmentation(str(root), "val")
    (root / "images" / "validation" / "ADE_validation_00000001.jpg").unlink()
    (root / "annotations" / "training" / "ADE_training_00000009.png").write_bytes(ann.parent.joinpath(
        "ADE_validation_00000000.png").read_bytes())
    with pytest.raises(DataError, match=r"annotation .*ADE_training_00000009.png has no image in .*training$"):
        open_segmentation(str(root), "train")


def test_ade20k_layout_from_its_folder_or_parent(tmp_path) -> None:
    root = write_ade(tmp_path / "ADEChallengeData2016")
    for spec in (root, tmp_path):
        train = open_segmentation(str(spec), "train")
        val = open_segmentation(str(spec), "val")
        assert len(train) == 3 and len(val) == 2 and train.reduce_zero_label
        assert train.classes == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    check_pairs(train)
    from mimkit.data.segmentation import SegmentationDataset

    image, mask = SegmentationDataset(train).raw(0)
    raw = np.array(Image.open(train.pairs[0][1]))
    assert image.shape == (30, 40, 3) and np.array_equal(mask, reduce_zero_label(raw))


def write_generic(root, classes=("sky", "road", "car"), sizes=None, label_max=2, with_names=True, n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(root / split / "images" / f"{i}.png")
            mw, mh = (sizes or {}).get((split, i), (32, 24))
            mask = rng.integers(0, label_max + 1, (mh, mw)).astype(np.uint8)
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    if with_names:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_generic_layout_and_its_checks(tmp_path) -> None:
    root = write_generic(tmp_path / "ok")
    src = open_segmentation(str(root), "train")
    assert src.classes == ["sky", "road", "car"] and not src.reduce_zero_label and len(src) == 3
    check_pairs(src)
    with pytest.raises(DataError, match="is 20x24 but its image .* is 32x24"):
        check_pairs(open_segmentation(str(write_generic(tmp_path / "size", sizes={("val", 1): (20, 24)})), "val"))
    with pytest.raises(DataError, match=r"has label [3-7] but there are 3 classes: the values allowed in a mask "
                                        r"file are 0-2 and 255"):
        check_pairs(open_segmentation(str(write_generic(tmp_path / "range", label_max=7)), "train"))
    nonames = write_generic(tmp_path / "nonames", with_names=False)
    with pytest.raises(DataError, match="no classes.txt"):
        open_segmentation(str(nonames), "train")
    assert len(open_segmentation(str(nonames), "train", num_classes=4).classes) == 4
    (root / "train" / "masks" / "1.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        open_segmentation(str(root), "train")


def test_train_pipeline_crops_pads_and_is_seeded() -> None:
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    mask = np.zeros((20, 30), dtype=np.int64)
    mask[:, 15:] = 1
    # scale (128, 32) x 0.5 = (64, 16): 20x30 -> 16x24 (short side 16), then padded to 32x32
    pipe = SegTrainPipeline((32, 32), scale=(128, 32), ratio_range=(0.5, 0.5))
    torch.manual_seed(3)
    img, seg = pipe(image, mask)
    assert tuple(img.shape) == (3, 32, 32) and tuple(seg.shape) == (32, 32)
    assert (seg[16:] == 255).all() and (seg[:, 24:] == 255).all()
    assert (img[:, 16:] == 0).all() and (img[:, :, 24:] == 0).all()
    assert set(seg[:16, :24].unique().tolist()) == {0, 1}
    torch.manual_seed(3)
    img2, seg2 = pipe(image, mask)
    assert torch.equal(img, img2) and torch.equal(seg, seg2)
    ev_img, ev_mask = SegEvalPipeline((32, 32), scale=(128, 32))(image, mask)
    assert tuple(ev_img.shape) == (3, 32, 48) and tuple(ev_mask.shape) == (20, 30)  # mask kept at its size


def test_builtin_mosaics_are_deterministic_and_disjoint() -> None:
    from mimkit.data.mosaics import MOSAIC_COUNT, make_mosaic, mosaic_sources

    train, val = open_segmentation(None, "train"), open_segmentation(None, "val")
    assert len(train) == MOSAIC_COUNT["train"] and len(val) == MOSAIC_COUNT["val"]
    assert train.classes == list(mosaic_sources()) and len(train.classes) >= 2
    images, masks = train.arrays
    again = make_mosaic("train", 5, tuple(train.classes))
    assert np.array_equal(images[5], again[0]) and np.array_equal(masks[5], again[1])
    assert len(np.unique(masks[5])) >= 2 and masks.max() < len(train.classes)
    assert not any(np.array_equal(val.arrays[0][i], images[i]) for i in range(10))


# ---------------------------------------------------------------------------------------------- inference
def test_slide_equals_whole_when_one_window_covers_the_image() -> None:
    model = tiny_segmenter().eval()
    x = torch.randn(1, 3, 24, 40)
    assert torch.allclose(slide_logits(model, x, (32, 48), (16, 16)), whole_logits(model, x), atol=1e-6)
    # windows that overlap average their logits and cover every pixel
    out = slide_logits(model, torch.randn(2, 3, 40, 56), (32, 32), (16, 16))
    assert tuple(out.shape) == (2, 5, 40, 56) and torch.isfinite(out).all()


class _Ones(torch.nn.Module):
    """A 'segmenter' giving logit 1 everywhere: slide_logits then averages to 1 where covered, NaN (0 / 0) where not."""

    patch_size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones((x.shape[0], 1, *x.shape[2:]))


@pytest.mark.parametrize("size", [(80, 400), (61, 97), (17, 129), (64, 64), (65, 63)])
@pytest.mark.parametrize("crop", [64, 33, 512])
def test_default_slide_window_covers_every_pixel(size, crop) -> None:
    from mimkit import config as C
    from mimkit.tasks.segment.config import SegmentConfig, slide_window

    cfg = C.build_config(SegmentConfig, [("flags", {"data": {"input_size": crop}})])
    window, stride = slide_window(cfg.test, C.input_size(cfg))
    assert window == [crop, crop] and stride == [2 * crop // 3] * 2  # follows the crop (341 at 512, as MMSeg)
    out = slide_logits(_Ones(), torch.zeros(1, 3, *size), window, stride)
    assert torch.equal(out, torch.ones(1, 1, *size))  # every pixel in >= 1 window (an uncovered one would be NaN)


def test_a_stride_above_the_window_is_refused() -> None:
    from mimkit import config as C
    from mimkit.errors import ConfigError
    from mimkit.tasks.segment.config import SegmentConfig, check_segment_config

    cfg = C.build_config(SegmentConfig, [("flags", {"data": {"input_size": 64, "data_path": "x"},
                                                    "test": {"stride": [341, 341]}})])
    with pytest.raises(ConfigError, match=r"test.stride \[341, 341\] is larger than the sliding window \[64, 64\]"):
        check_segment_config(cfg)
    with pytest.raises(ValueError):
        slide_logits(_Ones(), torch.zeros(1, 3, 80, 400), (64, 64), (65, 65))
    OmegaConf.update(cfg, "test.mode", "whole")  # whole-image inference has no windows: nothing to refuse
    check_segment_config(cfg)


def test_whole_pads_to_the_patch_and_crops_back() -> None:
    model = tiny_segmenter().eval()
    x = torch.randn(1, 3, 30, 37)
    out = whole_logits(model, x)
    assert tuple(out.shape) == (1, 5, 30, 37)
    padded = model(torch.nn.functional.pad(x, (0, 3, 0, 2)))
    assert torch.allclose(out, padded[:, :, :30, :37])


def test_ade20k_preset_is_mmsegs_recipe() -> None:
    from mimkit import config as C
    from mimkit.tasks.segment.config import SegmentConfig, check_segment_config

    cfg = C.build_config(SegmentConfig, [("preset", C.load_file("segment/ade20k_vit_base.yaml")),
                                         ("flags", {"data": {"data_path": "/data/ADEChallengeData2016"}})])
    check_segment_config(cfg)
    o, s, m = cfg.optimization, cfg.schedule, cfg.model
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.weight_decay, o.layer_decay) == (1e-4, 0.9, 0.999, 0.05, 0.65)
    assert (s.max_iters, s.warmup_iters, s.warmup_ratio, s.power) == (160000, 1500, 1e-6, 1.0)
    assert o.batch_size * 8 == 16 and m.taps is None and default_taps(12) == [3, 5, 7, 11] and m.drop_path == 0.1
    assert (m.channels, m.aux_channels, m.aux_weight, list(m.pool_scales)) == (768, 256, 0.4, [1, 2, 3, 6])
    assert cfg.data.input_size == 512 and cfg.data.ignore_index == 255 and cfg.data.reduce_zero_label
    assert list(cfg.data.augmentation.ratio_range) == [0.5, 2.0] and cfg.data.augmentation.cat_max_ratio == 0.75
    assert cfg.test.mode == "slide"
    # the preset leaves scale, window and stride to follow the crop, as the schema: MMSeg's values at 512
    from mimkit.data.segmentation import SegTrainPipeline
    from mimkit.tasks.segment.config import slide_window

    schema = C.build_config(SegmentConfig, [("flags", {"data": {"data_path": "/data/ADEChallengeData2016"}})])
    assert slide_window(schema.test, C.input_size(schema)) == slide_window(cfg.test, C.input_size(cfg)) \
        == ([512, 512], [341, 341])
    assert SegTrainPipeline((512, 512), schema.data.augmentation.scale).scale == \
        SegTrainPipeline((512, 512), cfg.data.augmentation.scale).scale == (2048, 512)


def test_eval_settings_come_from_the_checkpoint_unless_the_user_gives_them() -> None:
    import argparse

    from mimkit import config as C
    from mimkit.tasks.segment.config import SEGMENT_FLAGS, SegmentConfig
    from mimkit.tasks.segment.setup import apply_run_settings, given_keys

    p = argparse.ArgumentParser()
    from mimkit.tasks.segment import add_arguments

    add_arguments(p)
    args = p.parse_args(["--test_mode", "whole", "test.stride=[8,8]", "--eval", "--resume", "x.pt"])
    given = given_keys(args, SEGMENT_FLAGS)
    assert {"test.mode", "test.stride", "misc.eval", "misc.resume"} <= given["command"] and not given["file"]
    cfg = C.build_config(SegmentConfig, [("demo", C.load_file("segment/demo.yaml")),
                                         ("you", {"test": {"mode": "whole", "stride": [8, 8]}})])
    saved = {"model": {"arch": {"img_size": [48, 40]}},
             "data": {"data_path": "/ade", "reduce_zero_label": True, "mean": [0.5] * 3, "std": [0.2] * 3,
                      "augmentation": {"scale": [192, 48]}},
             "test": {"mode": "slide", "crop_size": [48, 40], "stride": [16, 16]}}
    assert apply_run_settings(cfg, saved, given) == ["test.mode", "test.stride"]
    assert cfg.test.mode == "whole" and list(cfg.test.stride) == [8, 8]  # yours
    assert list(cfg.test.crop_size) == [48, 40] and list(cfg.data.input_size) == [48, 40]  # the checkpoint's
    assert cfg.data.data_path == "/ade" and cfg.data.reduce_zero_label and list(cfg.data.mean) == [0.5] * 3
    assert list(cfg.data.augmentation.scale) == [192, 48]


def test_a_checkpoints_architecture_beats_the_presets_model_type(tmp_path) -> None:
    from mimkit import config as C
    from mimkit.engine.checkpoint import make_checkpoint
    from mimkit.tasks.segment.config import SegmentConfig
    from mimkit.tasks.segment.setup import build_encoder

    kw = {**TINY, "depth": 3}
    enc = create_model("mae_vit_tiny_patch16", img_size=32, **kw)
    config = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": kw}, "data": {"input_size": 32}}
    torch.save(make_checkpoint(model=enc.state_dict(), optimizer={}, epoch=0, step=0, config=config), tmp_path / "e.pt")
    cfg = C.build_config(SegmentConfig, [("preset", C.load_file("segment/ade20k_vit_base.yaml")),
                                         ("flags", {"model": {"finetune": str(tmp_path / "e.pt")}})])
    assert cfg.model.type == "mae_vit_base_patch16"  # the preset's, a fallback only
    built, desc = build_encoder(cfg, (32, 32), {"command": {"model.finetune"}, "file": {"model.type"}})
    assert len(built.blocks) == 3 and built.embed_dim == TINY["embed_dim"] and "mae_vit_tiny_patch16" in desc
    assert torch.equal(built.blocks[2].mlp.fc1.weight, enc.blocks[2].mlp.fc1.weight)
    assert segmenter_arch(built, (32, 32), 4, None, 8, 8, [1], 0.1)["taps"] == default_taps(3) == [0, 1, 1, 2]
