"""`mimkit segment --eval / --predict --resume CKPT`: a trained segmenter rebuilt from its checkpoint alone.

The checkpoint's run settings (data path, crop, normalisation, reduce_zero_label, test mode, window, stride) and
class names apply unless the user sets them; the start-up line says which came from where. Nothing already in the
output folder is written over: results-2.json, overlays-2/, predictions-2/ ... go beside earlier ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from mimkit import config as C
from mimkit.errors import CheckpointError, DataError


def evaluate_checkpoint(cfg, resume: dict | None, given: dict, dist) -> dict:
    """--eval: mIoU of the checkpoint on its val split (results.json); --predict: label PNGs and overlays."""
    from mimkit.data.segmentation import SegEvalPipeline, SegmentationDataset, check_pairs, open_segmentation
    from mimkit.models.segmentation import MAESegmenter
    from mimkit.tasks.evaluation import common as E
    from mimkit.tasks.segment import infer as I
    from mimkit.tasks.segment import config as SC
    from mimkit.tasks.segment.setup import apply_run_settings

    what = cfg.misc.resume or "latest.pt"
    saved = (resume or {}).get("config") or {}
    arch = (saved.get("model") or {}).get("arch")
    if resume is None or not arch:
        from mimkit.tasks.segment.setup import not_a_segment_checkpoint

        raise not_a_segment_checkpoint(what, resume)
    yours = apply_run_settings(cfg, saved, given)
    crop = C.input_size(cfg)
    window, stride = SC.slide_window(cfg.test, crop)  # a stride above the window is refused before any work
    names = list(saved["model"].get("class_names") or []) or [f"class_{i}" for i in range(arch["num_classes"])]
    scale = cfg.data.augmentation.scale or f"[{4 * max(crop)}, {min(crop)}] (4 x crop, crop)"
    settings = (f"test {cfg.test.mode}" + (f" (window {window}, stride {stride})" if cfg.test.mode == "slide" else "")
                + f", crop {list(crop)}, scale {scale}; "
                + ("the settings of the MMSeg file's config where it states them, mimkit's defaults elsewhere"
                   if "openmmlab" in resume else "the checkpoint run's settings")
                + (f" except yours: {', '.join(yours)}" if yours else ""))
    desc = f"UperNet from {what} ({arch['depth']} blocks, taps {arch['taps']}, {arch['num_classes']} classes)"
    pipeline = SegEvalPipeline(crop, cfg.data.augmentation.scale, cfg.data.mean, cfg.data.std)
    model = MAESegmenter(arch)
    E.load_model_state(model, resume, f"checkpoint {what}")
    model.to(dist.device)
    out = Path(C.resolve_output_dir(cfg, "segment"))
    if cfg.misc.predict:
        paths = I.image_paths(cfg.misc.predict)
        dest = I.fresh_dir(out, "predictions")
        if dist.is_main:
            print(f"mimkit segment --predict: {desc}; {len(paths)} image(s) from {cfg.misc.predict}; {settings}")
        written, skipped = I.predict(model, paths, pipeline, cfg.test, crop, dist.device, dest, names)
        for line in skipped:
            print(f"warning: {line}")
        print(f"wrote {len(written)} label PNG(s) and overlay(s) and legend.png / legend.csv to {dest}"
              + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""))
        return {"predictions": [str(p) for p in written], "skipped": len(skipped)}
    d = cfg.data
    if d.data_path and "data.data_path" not in yours and not Path(d.data_path).expanduser().exists():
        raise DataError(f"the checkpoint was trained on {d.data_path}, which is not here; give --data_path")
    # The checkpoint's class count names a generic layout's classes; the built-in mosaics have their own, and a
    # mismatch there is the checkpoint's, not a --num_classes the user never typed.
    builtin = d.data_path in (None, "", "mosaics")
    val_src = open_segmentation(d.data_path, "val", cfg.model.num_classes or (None if builtin else len(names)),
                                d.reduce_zero_label, names)
    if len(val_src.classes) != arch["num_classes"]:
        raise CheckpointError(f"the checkpoint's head predicts {arch['num_classes']} classes, but the data "
                              f"({d.data_path or 'builtin:mosaics'}) has {len(val_src.classes)}: give --data_path "
                              "of a set with the checkpoint's classes")
    if d.check_masks:
        check_pairs(val_src)
    elif len(val_src) == 0:
        raise DataError(f"{d.data_path}: the val split is empty")
    if dist.is_main:
        print(f"mimkit segment --eval: {desc}; {len(val_src)} val images of {d.data_path or 'builtin:mosaics'}; "
              f"{settings}")
        if saved["model"].get("class_names") and list(val_src.classes) != names:
            # One rule with --predict: the data's names where the data has them, the checkpoint's where it has none
            print(f"note: class names are the data's ({', '.join(val_src.classes[:4])}"
                  f"{', ...' if len(val_src.classes) > 4 else ''}); the checkpoint names them "
                  f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''} (--predict uses those)")
    overlays = I.fresh_dir(out, "overlays") if dist.is_main and cfg.test.num_overlays else None
    metrics, _ = I.evaluate(model, SegmentationDataset(val_src), pipeline, cfg.test, crop, dist.device,
                            d.ignore_index, overlays, cfg.test.num_overlays)
    return report(cfg, metrics, list(val_src.classes), desc, dist, {"eval_only": True, "settings": settings},
                  keep_earlier=True)


def pct(v: float) -> Optional[float]:
    """A fraction as a percentage (4 decimals); None for NaN (a class absent from prediction and target)."""
    return None if math.isnan(v) else round(100 * v, 4)


def percent_metrics(m: dict, class_names: list[str]) -> dict:
    """results.json metrics: mIoU, aAcc (pixel accuracy), mAcc, mDice and per-class IoU / Acc / Dice, in %."""
    per_class = {n: {"IoU": pct(i), "Acc": pct(a), "Dice": pct(d)}
                 for n, i, a, d in zip(class_names, m["IoU"], m["Acc"], m["Dice"], strict=True)}
    return {"mIoU": pct(m["mIoU"]), "aAcc": pct(m["aAcc"]), "mAcc": pct(m["mAcc"]), "mDice": pct(m["mDice"]),
            "pixels": m["pixels"], "per_class": per_class}


def report(cfg, metrics: dict, classes: list[str], desc: str, dist, extra: dict, keep_earlier: bool = False) -> dict:
    """Print the per-class table and write results.json (rank 0; results-2.json, ... beside an earlier one
    with keep_earlier); returns the metrics in %."""
    from mimkit.metrics.segmentation import format_class_table
    from mimkit.tasks.evaluation.common import write_results

    out = percent_metrics(metrics, classes)
    if dist.is_main:
        path = write_results(cfg.misc.output_dir, "segment", out, cfg.model.finetune or cfg.misc.resume,
                             str(cfg.data.data_path or "builtin:mosaics"), C.to_container(cfg),
                             {"model": desc, "test_mode": cfg.test.mode, "units": "percent", **extra},
                             keep_earlier=keep_earlier)
        print(format_class_table(metrics, classes))
        print(f"results: {path}")
    return out
