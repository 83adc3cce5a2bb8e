"""`mimkit export`: a checkpoint's encoder (unmasked features) or fine-tuned classifier in a deployable format.

    mimkit export runs/demo/checkpoints/final.pt --format pt2   # torch.export -> runs/demo/export/final_encoder.pt2
    mimkit export runs/demo --format onnx --output encoder.onnx    # a run folder: its final.pt
    mimkit export runs/demo --format safetensors | timm | hf | torchscript   # export/final_encoder.torchscript.pt ...
    mimkit export runs/linprobe/<time>/checkpoints/best.pt --format onnx    # a probe / fine-tuned classifier: logits
    mimkit export runs/demo --format aoti    # AOTInductor package for C++ (examples/cpp/): export/final_encoder.aoti.pt2

Default outputs go to the run's export/ folder (beside checkpoints/, never among them), named for what they are:
<checkpoint>_<encoder|classifier> + .pt2, .onnx, .safetensors, .timm.safetensors, .torchscript.pt, _hf/ or
.aoti.pt2 (mimkit.tasks.aoti: needs a C++ compiler, checked before any work).

onnx and hf need `pip install 'mimkit[export]'` (onnx, onnxruntime, transformers); this is checked before any
work. pt2 (torch.export, loaded back with torch.export.load) replaces TorchScript, which PyTorch deprecates.
The encoder export is `forward_features` (no masking: tracing the masked training forward, as seed 001 did,
freezes one random mask into the graph). Every export is reloaded and run on random input beside the
PyTorch model (ONNX by onnxruntime); the max absolute difference is printed and written to
<output>.export.json, with the input normalisation (mean, std) the model expects.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from mimkit.config import note_output
from mimkit.errors import CheckpointError, UserError
from mimkit.io import resolve_checkpoint
from mimkit.tasks import aoti

FORMATS = ("pt2", "onnx", "safetensors", "timm", "hf", "torchscript", "aoti", "mmseg")
# Default file names end in what the file is, never a bare .pt that reads as a training checkpoint.
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "safetensors": ".safetensors",
          "timm": ".timm.safetensors", "hf": "_hf", "pt2": ".pt2", "aoti": ".aoti.pt2", "mmseg": "_mmseg"}
EXPORT_DIR = "export"  # default: <run folder>/export/, apart from the checkpoints
# Optional packages each format needs (all in the `export` extra).
REQUIRES = {"onnx": ("onnx",), "hf": ("transformers",)}
EXTRA_HINT = "pip install 'mimkit[export]'"


def check_requirements(fmt: str) -> None:
    """Raise UserError naming what to install when --format `fmt` needs a package that is missing."""
    missing = []
    for name in REQUIRES.get(fmt, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format {fmt} needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}"
                        f": {EXTRA_HINT}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `mimkit export`."""
    p.add_argument("checkpoint", help="mimkit / official MAE / Hugging Face checkpoint (file or run / checkpoint / "
                   "save_pretrained folder), or a fine-tuned classifier")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="pt2 (torch.export), onnx, safetensors, timm, hf (transformers folder), torchscript, "
                   "aoti (AOTInductor package for C++: examples/cpp/), "
                   "mmseg (a `mimkit segment` checkpoint as an MMSegmentation model.pth + config.py folder)")
    p.add_argument("--output", default=None, help="file (folder for hf) (default: <run>/export/<checkpoint>_<kind> "
                   "+ .pt2 | .onnx | .safetensors | .timm.safetensors | .torchscript.pt | _hf/ | .aoti.pt2, e.g. "
                   "runs/demo/export/final_encoder.pt2)")
    p.add_argument("--model", default=None, help="model name when the checkpoint does not say")
    p.add_argument("--input_size", type=int, default=None, help="image size (default: the checkpoint's)")
    p.add_argument("--batch_size", type=int, default=2, help="batch of the random parity input")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max-abs difference accepted")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity input")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device the aoti package is compiled "
                   "for and runs on (cuda: export on a machine with a GPU)")


class EncoderFeatures(nn.Module):
    """The unmasked encoder as a module: imgs (N, C, H, W) -> normed tokens (N, 1+L, D)."""

    def __init__(self, mae: nn.Module) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_features(imgs)


def load_for_export(path: str, model_name: str | None = None, input_size: int | None = None):
    """(module to export, kind 'encoder' | 'classifier', the MAE encoder or None, description, reference module
    the export must match: the module itself, or a linear probe before its BatchNorm was folded)."""
    from mimkit.models.convert import extract_state_dict, load_checkpoint_file
    from mimkit.tasks.evaluation.common import _resolve, load_encoder

    p = _resolve(path)
    obj = load_checkpoint_file(p)
    sd, _ = extract_state_dict(obj)
    if "head.1.weight" in sd and isinstance(obj, dict) and "mimkit_version" in obj:  # a `mimkit linprobe` run
        from mimkit.models.heads import probe_as_vit
        from mimkit.tasks.linprobe import probe_from_checkpoint

        if input_size is not None:
            raise UserError("a linear probe exports at its own input size; drop --input_size")
        probe = probe_from_checkpoint(obj, sd)
        model = probe_as_vit(probe)  # a plain timm ViT: BatchNorm folded into the head (eval statistics)
        model.saved_config = obj.get("config")  # the probe run's data.mean / data.std go into the export record
        return model, "classifier", None, f"linear probe from {p.name} (as a timm ViT classifier)", probe
    if "head.weight" in sd and isinstance(obj, dict) and "mimkit_version" in obj:
        model, kind = _classifier(obj, sd, input_size)
        model.saved_config = obj.get("config")  # its data.mean / data.std go into the export record
        return model, kind, None, f"fine-tuned classifier from {p.name}", model
    mae, desc = load_encoder(str(p), model_name, input_size, decoder="fresh")  # a HF export writes the decoder
    model = EncoderFeatures(mae).eval()
    return model, "encoder", mae, desc, model


def _classifier(obj: dict, sd: dict, input_size: int | None):
    """Rebuild a `mimkit finetune` classifier from the timm arguments its config saved; load it strictly."""
    from mimkit.models.heads import vit_from_arch

    arch = ((obj.get("config") or {}).get("model") or {}).get("arch")
    if not arch:
        raise CheckpointError("this classifier checkpoint's config has no model.arch (not from mimkit finetune)")
    if input_size is not None and [input_size, input_size] != list(arch["img_size"]):
        raise UserError(f"a fine-tuned classifier exports at its own size {arch['img_size']}; drop --input_size")
    model = vit_from_arch(arch)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = (str(e).splitlines() + [""])[1][:200]
        raise CheckpointError(f"classifier checkpoint does not fit its architecture: {detail}") from None
    return model.eval(), "classifier"


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> Callable:
    """torch.jit.trace -> out; returns the reloaded module's forward."""
    # The tracer warns about the model's shape checks (Python conditionals on the fixed traced size) and torch
    # announces TorchScript's deprecation; neither affects the traced graph, which the parity check verifies.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(out))
        return torch.jit.load(str(out))


def export_pt2(model: nn.Module, example: torch.Tensor, out: Path) -> Callable:
    """torch.export (dynamic batch) saved with torch.export.save -> out; returns the reloaded program's module."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    name = next(iter(inspect.signature(model.forward).parameters))
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={name: {0: batch}})
    torch.export.save(program, str(out))
    return torch.export.load(str(out)).module()


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path) -> Callable:
    """torch.onnx.export (opset 17, dynamic batch) -> out; returns a runner: onnxruntime (the `export` extra), or
    onnx's reference evaluator when onnxruntime is not installed."""
    import onnx

    # The shape checks in the model's forward are Python conditionals on the traced sizes; the tracer warns
    # about each, harmlessly for a fixed image size (the batch stays dynamic).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    onnx.checker.check_model(onnx.load(str(out)))
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

        def runner(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])

        runner.runtime = f"onnxruntime {ort.__version__}"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(out))

        def runner(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(ref.run(None, {"images": x.numpy()})[0])

        runner.runtime = f"onnx.reference (onnxruntime not installed: {EXTRA_HINT})"
    return runner


def export_safetensors(model: nn.Module, kind: str, mae, out: Path) -> Callable:
    """Weights only (MAE names for an encoder, timm names for a classifier); returns a reloaded model's forward."""
    from safetensors.torch import load_file

    from mimkit.models.convert import save_safetensors

    sd = model.mae.state_dict() if kind == "encoder" else model.state_dict()
    save_safetensors(sd, out, metadata={"format": "pt", "mimkit_kind": kind})
    clone = _fresh_copy(model)
    clone.load_state_dict({("mae." + k if kind == "encoder" else k): v for k, v in load_file(str(out)).items()})
    return clone.eval()


def export_timm(model: nn.Module, kind: str, mae, out: Path) -> Callable:
    """A timm VisionTransformer state dict (num_classes=0 for an encoder); returns the timm model's features."""
    from safetensors.torch import load_file

    from mimkit.models.convert import mae_to_timm_vit, save_safetensors
    from mimkit.models.heads import vit_classifier_like

    if kind == "classifier":
        save_safetensors(model.state_dict(), out, metadata={"format": "pt"})
        clone = _fresh_copy(model)
        clone.load_state_dict(load_file(str(out)), strict=True)
        clone.eval().timm = timm_recipe(clone)
        return clone
    save_safetensors(mae_to_timm_vit(_mae_sd(mae)), out, metadata={"format": "pt"})
    timm_vit = vit_classifier_like(mae, 0, global_pool=False)
    timm_vit.load_state_dict(load_file(str(out)), strict=True)
    timm_vit.eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return timm_vit.forward_features(x)  # (N, 1+L, D) after norm, as ours

    features.timm = timm_recipe(timm_vit)
    return features


# timm's ViT names by width (the heads and depth of its presets); any other size is built from explicit kwargs.
TIMM_VIT_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1280: "vit_huge"}


def timm_recipe(vit: nn.Module) -> dict:
    """{'model_name', 'kwargs'}: `timm.create_model(model_name, **kwargs)` builds a model that loads the timm
    export of `vit` (a timm VisionTransformer) with strict=True; every size is stated, so any width works."""
    from mimkit.tasks.finetune import vit_arch_of

    arch = vit_arch_of(vit)
    base = TIMM_VIT_NAMES.get(arch["embed_dim"], "vit_base")
    kwargs = {k: (tuple(v) if k == "img_size" else v) for k, v in arch.items() if k != "layer_norm_eps"}
    if arch.get("layer_norm_eps") is not None:
        kwargs["norm_layer"] = f"partial(nn.LayerNorm, eps={arch['layer_norm_eps']:g})"  # a note, not JSON-built
    import timm

    exact = f"{base}_patch{arch['patch_size']}_{arch['img_size'][0]}"
    name = next((n for n in (exact, f"{base}_patch16_224", "vit_base_patch16_224") if timm.is_model(n)))
    return {"model_name": name, "kwargs": kwargs}


def hf_vit_config_kwargs(mae: nn.Module) -> dict:
    """``transformers.ViTConfig`` arguments of the MAE encoder (its LayerNorm eps included)."""
    from mimkit.models.convert import hf_config_kwargs

    c = hf_config_kwargs(mae)
    keep = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "qkv_bias", "layer_norm_eps")
    return {k: c[k] for k in keep}


def export_hf(model: nn.Module, kind: str, mae, out: Path) -> Callable:
    """A transformers ``ViTModel`` folder (save_pretrained, no pooler): the MAE encoder as a plain ViT.

    Not ViTMAEModel: transformers' ViTMAE embeddings always shuffle the patch tokens by random noise (mask_ratio
    0 keeps every token but in a random order, with no config switch to stop it), so its plain forward would
    hand users permuted tokens. ViTModel runs the same weights unmasked, tokens in image order, deterministic.
    """
    if kind != "encoder":
        raise UserError("--format hf exports MAE encoders; export a classifier (linear probe or fine-tuned) as "
                        "timm, onnx or pt2, or its encoder from the checkpoint it was trained from")
    import transformers
    from transformers import ViTConfig, ViTModel

    from mimkit.data.transforms import mean_std, normalization_of
    from mimkit.models.convert import mae_to_hf

    hf = ViTModel(ViTConfig(**hf_vit_config_kwargs(mae)), add_pooling_layer=False)
    sd = {k[len("vit."):]: v for k, v in mae_to_hf(_mae_sd(mae)).items() if k.startswith("vit.")}
    hf.load_state_dict(sd, strict=True)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no shard-loading bars in the middle of mimkit's output
    try:
        hf.save_pretrained(str(out))
        mean, std = mean_std(mae.in_chans, *normalization_of(mae))
        size = {"height": mae.img_size[0], "width": mae.img_size[1]}
        (out / "preprocessor_config.json").write_text(json.dumps({  # transformers' ViTImageProcessor reads this
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": size, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean), "image_std": list(std)}, indent=2) + "\n")
        hf = ViTModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()

    def run(x: torch.Tensor) -> torch.Tensor:
        return hf(pixel_values=x).last_hidden_state  # the plain forward users call: no noise, no mask

    run.runtime = f"transformers {transformers.__version__} (ViTModel)"
    return run


def _mae_sd(mae: nn.Module) -> dict:
    return mae.encoder_state_dict() if hasattr(mae, "encoder_state_dict") else mae.state_dict()


def _fresh_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()  # the reloaded weights, not the copied ones, must make the outputs match
    return clone


def normalization_record(kind: str, mae, checkpoint_obj_config: dict | None, in_chans: int) -> dict:
    """{'mean': [...], 'std': [...]}: the input normalisation the exported model expects."""
    from mimkit.data.transforms import mean_std, normalization_of

    if kind == "encoder":
        given = normalization_of(mae)
    else:
        data = (checkpoint_obj_config or {}).get("data") or {}
        given = (data.get("mean"), data.get("std"))
    mean, std = mean_std(in_chans, *given) if in_chans in (1, 3) else given
    return {"mean": list(mean) if mean else None, "std": list(std) if std else None}


def default_output(src: Path, kind: str, fmt: str) -> Path:
    """<run>/export/<checkpoint>_<kind><suffix>: runs/demo/checkpoints/final.pt -> runs/demo/export/final_encoder.pt2
    (torchscript: final_encoder.torchscript.pt, timm: .timm.safetensors, hf: final_encoder_hf/). A checkpoint
    outside a run's checkpoints/ folder exports to an export/ folder beside it."""
    stem = src.stem
    where = src.parent
    if src.name in ("model.pt", "model.safetensors", "pytorch_model.bin") or src.name.endswith(".index.json"):
        stem, where = src.parent.name, src.parent.parent  # epoch-N/model.pt, an HF save_pretrained folder
    if where.name == "checkpoints":
        where = where.parent
    return where / EXPORT_DIR / f"{stem}_{kind}{SUFFIX[fmt]}"


def check_output(output: Optional[str], fmt: str) -> None:
    """--output fits the format (its suffix; hf writes a folder) and can be written: one line before any work."""
    from mimkit.engine.runfolder import check_output_file, check_place

    if output is None:
        return
    if fmt == "hf":  # save_pretrained writes a folder
        check_place(Path(output), "--output", want_dir=True)
        return
    suffix = {"torchscript": (".pt", ".torchscript"), "pt2": (".pt2",), "onnx": (".onnx",),
              "safetensors": (".safetensors",), "timm": (".safetensors",), "aoti": (".pt2",)}[fmt]
    check_output_file(output, "--output", suffix, f"--format {fmt}")


def run(args: argparse.Namespace) -> int:
    """Export, reload, compare on random input; exit 1 when the max error exceeds --atol."""
    check_requirements(args.format)  # before any work: a missing package is one line, not a traceback
    if args.format == "mmseg":
        from mimkit.tasks.segment import mmseg_export

        return mmseg_export.run(args, default_output)
    aoti.check(args.format, args.device)  # likewise a missing C++ compiler (aoti), or --device cuda without a GPU
    check_output(args.output, args.format)
    torch.manual_seed(args.seed)
    model, kind, mae, desc, reference = load_for_export(args.checkpoint, args.model, args.input_size)
    size = model.patch_embed.img_size if kind == "classifier" else mae.img_size
    in_chans = model.patch_embed.proj.in_channels if kind == "classifier" else mae.in_chans
    example = torch.randn(args.batch_size, in_chans, *size)
    out = Path(args.output) if args.output else default_output(resolve_checkpoint(args.checkpoint), kind, args.format)
    replaced = out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    note_output(out)
    exporters = {
        "torchscript": lambda: export_torchscript(model, example, out),
        "pt2": lambda: export_pt2(model, example, out),
        "onnx": lambda: export_onnx(model, example, out),
        "safetensors": lambda: export_safetensors(model, kind, mae, out),
        "timm": lambda: export_timm(model, kind, mae, out),
        "hf": lambda: export_hf(model, kind, mae, out),
        "aoti": lambda: aoti.export_aoti(model, example, out, args.device),
    }
    runner = exporters[args.format]()
    check = torch.randn(args.batch_size + 1, in_chans, *size)  # another batch size than the traced one
    if args.format == "torchscript":
        check = torch.randn(args.batch_size, in_chans, *size)  # a trace fixes no batch size, but keep it simple
    with torch.no_grad():
        expected = reference(check)
        got = runner(check)
    err = float((expected - got).abs().max())
    ok = err <= args.atol
    record = {"checkpoint": str(args.checkpoint), "format": args.format, "kind": kind, "output": str(out),
              "output_shape": list(expected.shape), "max_abs_error": err, "atol": args.atol, "ok": ok,
              "model": desc, "runtime": getattr(runner, "runtime", f"torch {torch.__version__}"),
              "normalization": normalization_record(kind, mae, getattr(model, "saved_config", None), in_chans),
              "input": aoti.input_record(size, in_chans), "output_layout": aoti.output_layout(kind),
              "torch": torch.__version__, **getattr(runner, "record", {})}
    if getattr(runner, "timm", None):  # how to build the timm model that loads this file strictly
        record["timm"] = runner.timm
    record_path = Path(str(out) + ".export.json" if args.format != "hf" else out / "export.json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    note_output(record_path)
    print(f"mimkit export: {desc} -> {out} ({args.format}, {kind}, output {tuple(expected.shape)})"
          + ("; replaced the earlier export there" if replaced else ""))
    print(f"max abs error vs PyTorch on random input: {err:.3e} ({'ok' if ok else 'ABOVE'} atol {args.atol:g}; "
          f"run by {record['runtime']})")
    norm = record["normalization"]
    print(f"inputs: (N, {in_chans}, {size[0]}, {size[1]}) pixels in [0, 1] normalised with mean {norm['mean']} "
          f"std {norm['std']}")
    if "timm" in record:
        t = record["timm"]
        print(f"timm: timm.create_model('{t['model_name']}', " + ", ".join(f"{k}={v!r}" for k, v in t["kwargs"].items())
              + ").load_state_dict(safetensors.torch.load_file(path), strict=True)")
    return 0 if ok else 1
