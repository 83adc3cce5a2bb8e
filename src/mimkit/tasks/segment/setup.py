"""Set-up pieces of `mimkit segment`: what the user gave, the encoder to start from, a checkpoint's run settings.

Precedence (DESIGN.md): a checkpoint's own architecture beats `model.type` from a preset or config file (the
ADE20K preset's ViT-B is a fallback for files that do not say), a `--model` flag or `model.type=` override beats
the checkpoint. `--eval` / `--predict` reuse the data, crop, normalisation and inference settings the checkpoint's
run used, each unless the user sets it (flag, override or config file).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from mimkit import config as C
from mimkit.errors import CheckpointError, ConfigError

# What --eval / --predict take from the checkpoint's run unless the user sets it
RUN_SETTINGS = ("data.data_path", "data.reduce_zero_label", "data.mean", "data.std", "data.ignore_index",
                "data.input_size", "data.augmentation.scale", "test.mode", "test.crop_size", "test.stride")


def _flatten(d: Any, prefix: str = "") -> set[str]:
    if not isinstance(d, dict):
        return {prefix[:-1]} if prefix else set()
    out: set[str] = set()
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def given_keys(args: argparse.Namespace, flags: list) -> dict[str, Any]:
    """{'command': dotted keys set by flags or overrides, 'file': dotted keys set by a config file,
    'file_name': that file}."""
    files = [i for i in args.items if "=" not in i] + ([args.config] if getattr(args, "config", None) else [])
    overrides = [i for i in args.items if "=" in i]
    command = {f.key for f in flags if getattr(args, f.name, None) is not None}
    command |= _flatten(C.parse_dotlist(overrides)) if overrides else set()
    file = _flatten(C.load_file(files[0])) if files else set()
    if getattr(args, "config_dict", None) is not None:  # the Python API's config dict stands where a file does
        files, file = ["config dict"], _flatten(args.config_dict)
    return {"command": command, "file": file, "file_name": files[0] if files else None}


def _covers(given: set[str], key: str) -> bool:
    """True when `key` or a section above it was set."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in given for i in range(1, len(parts) + 1))


def apply_run_settings(cfg, saved: dict, given: dict[str, Any]) -> list[str]:
    """Put the checkpoint run's RUN_SETTINGS into cfg where the user set none; returns the keys the user set."""
    mine = given["command"] | given["file"]
    yours = []
    OmegaConf.set_struct(cfg, False)
    for key in RUN_SETTINGS:
        if _covers(mine, key):
            yours.append(key)
            continue
        value = C._get(saved, key)
        if key == "data.input_size":  # the crop the model was built at
            value = saved["model"]["arch"]["img_size"]
        if value is not None or key in ("data.data_path", "data.mean", "data.std", "data.augmentation.scale",
                                        "test.crop_size", "test.stride"):
            OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return yours


def not_a_segment_checkpoint(what: str, resume: Optional[dict]) -> CheckpointError:
    """The error for a --resume file without model.arch; an encoder checkpoint (pretrain, linprobe, ...) is told
    to go to --finetune."""
    sd = (resume or {}).get("model")
    keys = [str(k) for k in sd] if isinstance(sd, dict) else []
    if any(k.startswith(("decoder_", "mask_token")) for k in keys):
        return CheckpointError(f"{what} is a pretraining checkpoint, not a `mimkit segment` one: pass it to "
                               f"--finetune to train a segmenter on its encoder")
    if "patch_embed.proj.weight" in keys or any(k.startswith("encoder.patch_embed") for k in keys):
        return CheckpointError(f"{what} holds an encoder but no segmenter: pass it to --finetune to train one")
    return CheckpointError(f"{what} is not a `mimkit segment` checkpoint (no model.arch in its config)")


# ---------------------------------------------------------------------------------------------- encoders
def read_segment_checkpoint(path: str) -> Optional[dict]:
    """A `mimkit segment` checkpoint (config.model.arch and backbone.* weights) as loaded, an MMSegmentation
    UperNet-on-MAE file converted to one (`mmseg_as_segment_checkpoint`), else None."""
    from mimkit.io import load_checkpoint_file, resolve_checkpoint

    obj = load_checkpoint_file(resolve_checkpoint(path))
    mm = mmseg_as_segment_checkpoint(obj, path)
    if mm is not None:
        return mm
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return None
    arch = ((obj.get("config") or {}).get("model") or {}).get("arch")
    if arch and any(str(k).startswith("backbone.") for k in obj["model"]):
        return obj
    return None


def mmseg_as_segment_checkpoint(obj: Any, path: str) -> Optional[dict]:
    """An MMSeg EncoderDecoder file (MAE backbone, Feature2Pyramid, UPerHead, FCNHead; mmengine's or a bare state
    dict) as a mimkit segment checkpoint {model, config: {model: {arch, class_names}, data: {mean, std}},
    openmmlab: the load line}; None for any other file. Class names come from its meta's dataset_meta, mean / std
    (0-255 in MMSeg) from its saved config's data_preprocessor, when it has them."""
    import re

    from mimkit.models.convert import extract_state_dict, mmengine_dropped
    from mimkit.models.openmmlab import SOURCES, mmseg_to_segmenter, openmmlab_kind

    if isinstance(obj, dict) and "mimkit_version" in obj:
        return None
    try:
        sd, _ = extract_state_dict(obj)
    except CheckpointError:
        return None
    if openmmlab_kind(sd) != "mmseg_upernet":
        return None
    meta = (obj.get("meta") or {}) if isinstance(obj, dict) else {}
    seg_sd, arch, notes = mmseg_to_segmenter(sd, meta)
    if arch["taps"] is None:  # the file's config does not say: MMSeg's out_indices for the depth
        from mimkit.models.segmentation import default_taps

        arch["taps"] = default_taps(arch["depth"])
    classes = ((meta.get("dataset_meta") or {}).get("classes")) if isinstance(meta, dict) else None
    cfg_text = str(meta.get("cfg") or "")
    data: dict[str, Any] = {}
    for key in ("mean", "std"):
        m = re.search(rf"(?<![\w.]){key}\s*=\s*\[([-\d.,\s]+)\]", cfg_text)
        if m:
            data[key] = [float(v) / 255.0 for v in m.group(1).split(",") if v.strip()]
    ignored = mmengine_dropped(obj) + notes
    line = (f"loaded an {SOURCES['mmseg_upernet']} checkpoint: {path} (ViT {arch['depth']} blocks x "
            f"{arch['embed_dim']}-d, {arch['num_heads']} heads, taps {arch['taps']}, {arch['num_classes']} classes"
            + (", layer scale" if "init_values" in arch else "") + ")"
            + (f"; ignored {'; '.join(ignored)}" if ignored else ""))
    return {"model": seg_sd, "openmmlab": line,
            "config": {"model": {"arch": arch, "class_names": list(classes) if classes else None},
                       "data": data if len(data) == 2 else {}}}


def read_resume(cfg) -> Optional[dict]:
    """misc.resume as a segment checkpoint: an MMSeg file converted (for --eval / --predict: it holds no mimkit
    training state), else the engine's resume reading (a mimkit training checkpoint, or latest.pt)."""
    from mimkit.io import load_checkpoint_file, resolve_checkpoint
    from mimkit.tasks.evaluation import common as E

    if cfg.misc.resume:
        try:
            obj = load_checkpoint_file(resolve_checkpoint(cfg.misc.resume))
        except CheckpointError:
            obj = None  # the engine's reader names the problem
        mm = mmseg_as_segment_checkpoint(obj, cfg.misc.resume) if obj is not None else None
        if mm is not None:
            if not (cfg.misc.eval or cfg.misc.predict):
                raise ConfigError(f"--resume {cfg.misc.resume}: an MMSegmentation checkpoint holds no mimkit "
                                  "training state; use it with --eval / --predict, or train on it with --finetune")
            print(mm["openmmlab"])
            return mm
    return E.read_resume(cfg)


def backbone_of(seg_ckpt: dict):
    """The encoder (timm ViT) held under backbone.* of a segment checkpoint, dressed as an MAE encoder for
    segmenter_arch / segmenter_from_encoder (patch_size, in_chans, grid_size, normalization)."""
    from mimkit.models.segmentation import build_backbone

    arch = seg_ckpt["config"]["model"]["arch"]
    bb = build_backbone(arch)
    sd = {k[len("backbone."):]: v for k, v in seg_ckpt["model"].items() if k.startswith("backbone.")}
    try:
        bb.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the segment checkpoint's backbone does not fit its own architecture ({e})") from None
    bb.patch_size, bb.in_chans, bb.grid_size = int(arch["patch_size"]), int(arch["in_chans"]), bb.patch_embed.grid_size
    data = seg_ckpt["config"].get("data") or {}
    bb.normalization = (data["mean"], data["std"]) if data.get("mean") and data.get("std") else None
    return bb


def check_has_encoder(path: str) -> None:
    """CheckpointError unless the file holds ViT encoder weights (patch embedding and blocks)."""
    from mimkit.models.convert import extract_state_dict, load_checkpoint_file, to_mae_state_dict
    from mimkit.tasks.evaluation.common import _resolve

    fix = "give an MAE pretraining checkpoint (mimkit, official .pth or Hugging Face) to --finetune"
    obj = load_checkpoint_file(_resolve(path))
    try:
        sd, _ = extract_state_dict(obj)
        sd, _ = to_mae_state_dict(sd)
    except CheckpointError as e:  # convert.py describes the state dict; name the file (its fix when it has one)
        raise CheckpointError(f"{path}: {e}" if "; give " in str(e) else f"{path} holds no ViT encoder ({e}); {fix}"
                              ) from None
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError(f"{path} holds no ViT encoder (no patch_embed / blocks weights); {fix}")


def build_encoder(cfg, crop: tuple[int, int], given: dict[str, Any]):
    """(MAE-family encoder sized to the crop, description): --finetune weights (a segment checkpoint's backbone
    too), or random weights of --model."""
    from mimkit.models import create_model
    from mimkit.models.loading import architecture_of
    from mimkit.tasks.evaluation.common import _resolve, load_encoder

    m = cfg.model
    if m.finetune:
        seg = read_segment_checkpoint(m.finetune)
        if seg is not None:
            if m.random_init:
                raise ConfigError("--random_init with a segment checkpoint: use --model NAME --random_init (or an "
                                  "MAE checkpoint) for a random encoder")
            bb = backbone_of(seg)
            if seg.get("openmmlab"):
                print(seg["openmmlab"])
            arch = seg["config"]["model"]["arch"]
            return bb, (f"backbone of segment checkpoint {m.finetune} (ViT {arch['depth']} blocks, width "
                        f"{arch['embed_dim']}, patch {arch['patch_size']})")
        check_has_encoder(m.finetune)
        # the checkpoint's own architecture beats a preset's / config file's model.type; --model beats both
        name = m.type if ("model.type" in given["command"] or architecture_of(_resolve(m.finetune)) is None) else None
        encoder, desc = load_encoder(m.finetune, name, crop, m.random_init, cfg.misc.seed)
        # the loader's line describes the whole MAE (decoder too); a segmenter keeps only the encoder
        reinit = f", weights re-initialised (random init, seed {cfg.misc.seed})" if m.random_init else ""
        return encoder, f"{desc.split(' ')[0]} encoder from {m.finetune} [{describe_encoder(encoder)}]{reinit}"
    if not (m.random_init or cfg.data.data_path is None):
        raise ConfigError("give --finetune CHECKPOINT (a pretrained encoder), or --model NAME --random_init")
    if not m.type:
        raise ConfigError("--random_init without --finetune needs --model NAME (see `mimkit models`)")
    torch.manual_seed(cfg.misc.seed)
    kwargs = dict(OmegaConf.to_container(m.kwargs, resolve=True))
    encoder = create_model(m.type, img_size=crop, **kwargs)
    return encoder, f"{m.type} (random init, seed {cfg.misc.seed}) [{describe_encoder(encoder)}]"


def describe_encoder(encoder) -> str:
    """'patch 8, 6 blocks x 192-d (3 heads), 64x64 px': the encoder built (no pretraining decoder)."""
    heads = getattr(getattr(encoder.blocks[0], "attn", None), "num_heads", None) if len(encoder.blocks) else None
    size = encoder.patch_embed.img_size if hasattr(encoder, "patch_embed") else None
    return (f"patch {encoder.patch_size}, {len(encoder.blocks)} blocks x {encoder.embed_dim}-d"
            + (f" ({heads} heads)" if heads else "") + (f", {size[0]}x{size[1]} px" if size else ""))


def describe_taps(taps: list[int], depth: int) -> str:
    """'taps [1, 2, 3, 5] (MMSeg's [3, 5, 7, 11] scaled to 6 blocks)' for the start-up line."""
    from mimkit.models.segmentation import default_taps

    if list(taps) != default_taps(depth):
        return f"taps {list(taps)} (yours, of {depth} blocks)"
    if depth == 12:
        return f"taps {list(taps)} (MMSeg's out_indices for 12 blocks)"
    return f"taps {list(taps)} (MMSeg's [3, 5, 7, 11] scaled to {depth} blocks)"


def check_memory(cfg, model, arch: dict, crop: tuple[int, int], device, seg_loss) -> str:
    """The estimated peak memory of a training step and of an evaluation pass (tasks/preflight.check_memory) as a
    start-up note; a run that cannot fit the machine is refused now, in one line naming what fits (the kernel
    would kill it without a word). On a CPU without a preset, a large crop also gets a note naming the demo.
    `seg_loss`: the recipe's loss (logits, target, ignore_index, avg_non_ignore) -> scalar."""
    from mimkit.tasks.preflight import check_memory as check, meta_images, meta_labels
    from mimkit.tasks.segment.config import slide_window
    from mimkit.tasks.segment.infer import EVAL_BATCH, whole_logits

    bs, ignore = int(cfg.optimization.batch_size), int(OmegaConf.select(cfg, "data.ignore_index", default=255))
    aux_w = float(OmegaConf.select(cfg, "model.aux_weight", default=0.4))
    window = tuple(slide_window(cfg.test, crop)[0]) if OmegaConf.select(cfg, "test.mode") == "slide" else crop

    def train_run(m):
        main, aux = m(meta_images(bs, crop))
        y = meta_labels(bs, *crop)
        return seg_loss(main, y, ignore, False) + aux_w * seg_loss(aux, y, ignore, False)

    cpu = not str(device).startswith("cuda")
    fix = ("use the CPU preset: mimkit segment segment/demo.yaml --data_path DIR [--finetune CKPT]; or lower "
           "--batch_size / --input_size" if cpu else "lower --batch_size / --input_size, or --grad_checkpointing")
    line = check(f"segment at batch {bs}, crop {crop[0]}x{crop[1]}", model, train_run, device, fix,
                 eval_run=lambda m: whole_logits(m, meta_images(min(EVAL_BATCH, 8), window)))
    if cpu and not OmegaConf.select(cfg, "misc.preset", default=None) and crop[0] * crop[1] > 128 * 128:
        line += ("; on a CPU the ADE20K recipe is slow: segment/demo.yaml fits a CPU (mimkit segment "
                 "segment/demo.yaml --data_path DIR)")
    return line
