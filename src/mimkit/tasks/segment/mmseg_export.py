"""`mimkit export --format mmseg`: a `mimkit segment` checkpoint as an MMSegmentation model (weights + config).

    mimkit export runs/segment_demo/checkpoints/final.pt --format mmseg   # -> runs/segment_demo/export/final_mmseg/
    # in MMSegmentation:  model = mmseg.apis.init_model("final_mmseg/config.py", "final_mmseg/model.pth")

The folder holds `model.pth` (mmengine's layout: {meta: {dataset_meta: {classes}}, state_dict}) and `config.py`
(an EncoderDecoder: MMSeg's `MAE` backbone, `Feature2Pyramid`, `UPerHead`, `FCNHead`, BN, the run's test mode
and keep-ratio test resize, a `SegDataPreProcessor` with the run's mean / std in 0-255). MMSeg's MAE layer always
has layer scale and a relative position bias: a mimkit backbone without layer scale is written with gammas of 1, every bias table as
zeros (the function is unchanged). No MMSeg package is needed to export; the command checks the written weights
by converting them back and comparing logits with the checkpoint's own segmenter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mimkit.config import note_output
from mimkit.errors import CheckpointError


def test_settings(arch: dict, saved: dict) -> tuple[dict, list[int], str | None]:
    """(MMSeg test_cfg, Resize scale [long, short], a line on what MMSeg cannot reproduce or None) of the run's own
    evaluation: its test.mode / crop_size / stride and data.augmentation.scale, as `mimkit segment` applies them.

    MMSeg's MAE backbone adds a fixed-size position embedding, so it runs only inputs of the crop size: 'slide'
    with the crop as window matches mimkit on any image; 'whole' only on images that resize to the crop."""
    crop = [int(v) for v in arch["img_size"]]
    scale = ((saved.get("data") or {}).get("augmentation") or {}).get("scale") or [4 * max(crop), min(crop)]
    test = saved.get("test") or {}
    if (test.get("mode") or "slide") == "slide":
        window = [int(v) for v in (test.get("crop_size") or crop)]
        stride = [int(v) for v in test.get("stride") or [max(1, 2 * w // 3) for w in window]]
        note = None if window == crop else (
            f"the run slides a {window[0]}x{window[1]} window but MMSeg's MAE backbone takes only {crop[0]}x{crop[1]} "
            "inputs (a fixed position embedding): MMSeg will refuse the windows; evaluate with test.crop_size unset")
        return dict(mode="slide", crop_size=tuple(window), stride=tuple(stride)), list(scale), note
    note = (f"the run predicts in 'whole' mode, which mimkit runs at any size (position embedding interpolated); "
            f"MMSeg's MAE backbone has a fixed one: in MMSeg the exported 'whole' mode runs only images that resize "
            f"to {crop[0]}x{crop[1]} (scale {list(scale)}); for others set test_cfg mode='slide' (mimkit: "
            "--test_mode slide)")
    return dict(mode="whole"), list(scale), note


def config_text(arch: dict, mean: list[float], std: list[float], saved: dict | None = None) -> str:
    """An MMSeg config (Python source) building the segmenter `arch` describes, tested as the run `saved` (its
    config) evaluates: test_cfg and a keep-ratio Resize (test_settings)."""
    test_cfg, scale, _ = test_settings(arch, saved or {})
    ratio = float(arch["mlp_ratio"])
    backbone = dict(type="MAE", img_size=tuple(arch["img_size"]), patch_size=arch["patch_size"],
                    in_channels=arch["in_chans"], embed_dims=arch["embed_dim"], num_layers=arch["depth"],
                    num_heads=arch["num_heads"], mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
                    out_indices=list(arch["taps"]), init_values=float(arch.get("init_values") or 1.0),
                    drop_path_rate=0.0, final_norm=False,
                    norm_cfg=dict(type="LN", eps=float(arch.get("layer_norm_eps", 1e-6))))
    dim, k = arch["embed_dim"], arch["num_classes"]
    lines = [
        "# written by `mimkit export --format mmseg`: load with mmseg.apis.init_model(config, checkpoint)",
        "norm_cfg = dict(type='BN', requires_grad=True)",
        "model = dict(",
        "    type='EncoderDecoder',",
        f"    data_preprocessor=dict(type='SegDataPreProcessor', mean={[round(m * 255, 6) for m in mean]}, "
        f"std={[round(s * 255, 6) for s in std]}, bgr_to_rgb=True, pad_val=0, seg_pad_val=255, "
        f"size={tuple(arch['img_size'])}),",
        f"    backbone=dict({_kw(backbone)}),",
        f"    neck=dict(type='Feature2Pyramid', embed_dim={dim}, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),",
        f"    decode_head=dict(type='UPerHead', in_channels={[dim] * 4}, in_index=[0, 1, 2, 3], "
        f"pool_scales={tuple(arch['pool_scales'])}, channels={arch['channels']}, "
        f"dropout_ratio={arch['dropout']}, num_classes={k}, norm_cfg=norm_cfg, align_corners=False, "
        "loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),",
        f"    auxiliary_head=dict(type='FCNHead', in_channels={dim}, in_index=2, channels={arch['aux_channels']}, "
        f"num_convs=1, concat_input=False, dropout_ratio={arch['dropout']}, num_classes={k}, norm_cfg=norm_cfg, "
        "align_corners=False, loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),",
        "    train_cfg=dict(),",
        f"    test_cfg=dict({_kw(test_cfg)}))",
        "# mimkit's test resize: the largest size with long side <= scale[0] and short side <= scale[1]",
        "test_pipeline = [dict(type='LoadImageFromFile'), "
        f"dict(type='Resize', scale={tuple(scale)}, keep_ratio=True), dict(type='PackSegInputs')]",
        "",
    ]
    return "\n".join(lines)


def _kw(d: dict) -> str:
    """dict(a=1, b=dict(c='x')) written as Python source in MMSeg's config style: 'a=1, b=dict(c='x')'."""
    return ", ".join(f"{k}=dict({_kw(v)})" if isinstance(v, dict) else f"{k}={v!r}" for k, v in d.items())


def run(args: argparse.Namespace, default_output) -> int:
    """Write <out>/model.pth and <out>/config.py; check the weights convert back to the same logits."""
    from mimkit.data.transforms import mean_std
    from mimkit.io import resolve_checkpoint
    from mimkit.models.openmmlab import mmseg_to_segmenter, segmenter_to_mmseg
    from mimkit.models.segmentation import MAESegmenter
    from mimkit.tasks.segment.setup import read_segment_checkpoint

    src = resolve_checkpoint(args.checkpoint)
    seg = read_segment_checkpoint(str(src))
    if seg is None:
        raise CheckpointError(f"--format mmseg exports `mimkit segment` checkpoints; {args.checkpoint} is not one "
                              "(export an encoder as safetensors / timm / hf)")
    arch = dict(seg["config"]["model"]["arch"])
    if args.input_size is not None:
        raise CheckpointError("a segmenter exports at its own crop size; drop --input_size")
    taps = list(arch["taps"])
    if taps != sorted(set(taps)):  # MMSeg's backbone returns each block once, in block order
        raise CheckpointError(f"MMSeg's MAE backbone cannot tap blocks {taps} (out_indices must be 4 different "
                              "blocks in increasing order); this segmenter has no MMSeg equivalent")
    model = MAESegmenter(arch).eval()
    model.load_state_dict(seg["model"], strict=True)
    data = seg["config"].get("data") or {}
    mean, std = mean_std(arch["in_chans"], data.get("mean"), data.get("std"))
    names = list(seg["config"]["model"].get("class_names") or []) or [f"class_{i}" for i in range(arch["num_classes"])]

    out = Path(args.output) if args.output else default_output(src, "segmenter", "mmseg")
    replaced = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    mm_sd = segmenter_to_mmseg(model.state_dict(), arch)
    torch.save({"meta": {"dataset_meta": {"classes": names}, "exported_by": "mimkit export --format mmseg",
                         "source": str(src)}, "state_dict": mm_sd}, out / "model.pth")
    (out / "config.py").write_text(config_text(arch, list(mean), list(std), seg["config"]))
    _, _, unmatched = test_settings(arch, seg["config"])

    # the written weights, converted back, must give the checkpoint's logits
    back, back_arch, _ = mmseg_to_segmenter(mm_sd, {"cfg": (out / "config.py").read_text()})
    again = MAESegmenter({**arch, **back_arch}).eval()  # as MMSeg builds it: layer scale (gammas 1 if ours had none)
    again.load_state_dict(back, strict=True)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, arch["in_chans"], *arch["img_size"])
    with torch.no_grad():
        err = float((model(x) - again(x)).abs().max())
    ok = err <= args.atol
    record = {"checkpoint": str(args.checkpoint), "format": "mmseg", "kind": "segmenter", "output": str(out),
              "files": ["model.pth", "config.py"], "max_abs_error_roundtrip": err, "atol": args.atol, "ok": ok,
              "classes": names, "normalization": {"mean": list(mean), "std": list(std)},
              "mmseg_differs": unmatched}
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in ("model.pth", "config.py", "export.json"):
        note_output(out / f)
    print(f"mimkit export: UperNet ({arch['depth']} blocks x {arch['embed_dim']}-d, {arch['num_classes']} classes) "
          f"from {src} -> {out}/model.pth + config.py (mmseg)" + ("; replaced the earlier export there" if replaced
                                                                  else ""))
    if unmatched:
        print(f"note: {unmatched}")
    print(f"max abs error of the written weights converted back: {err:.3e} ({'ok' if ok else 'ABOVE'} atol "
          f"{args.atol:g}); in MMSegmentation: mmseg.apis.init_model('{out}/config.py', '{out}/model.pth') (with "
          "mmcv-lite, first a stand-in for mmcv._ext: see docs/openmmlab.md)")
    return 0 if ok else 1
