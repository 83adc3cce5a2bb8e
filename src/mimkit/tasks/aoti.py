"""`mimkit export --format aoti`: an AOTInductor package (torch.export, compiled to a shared library by
Inductor) that a C++ program loads with `torch::inductor::AOTIModelPackageLoader` -- see examples/cpp/.

    mimkit export runs/demo --format aoti                  # -> runs/demo/export/final_encoder.aoti.pt2 (CPU)
    mimkit export runs/demo --format aoti --device cuda    # on a machine with a GPU: a CUDA package

Compiling needs a C++ compiler (Inductor's: $CXX, else g++); without one the export stops in one line before any
work. A package runs only on the device it was compiled for (a CPU package also needs the compiling CPU's
instruction set, recorded as `aoti.cpu_isa`) and with the torch version that compiled it. The export record
(<output>.export.json) also says what a non-Python caller must do to an image (`input`: size, resize, crop,
pixel range; `normalization`: mean, std) and how to read the output (`output_layout`); `preprocess` below is
that recipe in torch, the same operations examples/cpp/mimkit_infer.cpp runs in libtorch.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mimkit.errors import UserError

EVAL_CROP_PCT = 0.875  # mimkit's eval transform: resize to size / 0.875, centre crop size (mimkit.data.transforms)


def find_cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use ($CXX, else g++), or None when there is none."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError, OSError):
        return None


def check(fmt: str, device: str) -> None:
    """Raise UserError before any work when --format aoti cannot compile here, or --device is not usable."""
    if device != "cpu" and fmt != "aoti":
        raise UserError(f"--device {device} applies to --format aoti only; --format {fmt} exports for the CPU")
    if fmt != "aoti":
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA GPU on the exporting machine; export with --device cpu here")
    if find_cxx_compiler() is None:
        raise UserError("--format aoti compiles C++ but no C++ compiler was found (set CXX, or install g++)")


def export_aoti(model: nn.Module, example: torch.Tensor, out: Path, device: str = "cpu") -> Callable:
    """torch.export (dynamic batch) compiled by AOTInductor for `device` into the package `out`; returns the
    reloaded package as a CPU-in, CPU-out runner."""
    if out.suffix != ".pt2":
        raise UserError(f"an AOTInductor package is a .pt2 file; --output {out} should end in .pt2 "
                        "(e.g. encoder.aoti.pt2)")
    model = copy.deepcopy(model).to(device).eval()  # the caller's model stays on the CPU as the reference
    example = example.to(device)
    batch = torch.export.Dim("batch", min=1, max=65536)
    name = next(iter(inspect.signature(model.forward).parameters))
    # On a machine without CUDA, torch's C++-extension helper warns 'No CUDA runtime is found' when Inductor
    # imports it: true, and irrelevant to a CPU package, so it is not shown.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes={name: {0: batch}})
            path = torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    finally:
        quiet.setLevel(level)
    loaded = torch._inductor.aoti_load_package(path)

    def run(x: torch.Tensor) -> torch.Tensor:
        return loaded(x.to(device)).cpu()

    meta = package_metadata(out)
    run.runtime = f"AOTInductor, torch {torch.__version__} ({device})"
    run.record = {"aoti": {"device": device, "torch": torch.__version__, "cpu_isa": meta.get("AOTI_CPU_ISA", ""),
                           "compute_capability": meta.get("AOTI_COMPUTE_CAPABILITY", ""),
                           "model_name": "model"}}
    return run


def package_metadata(path: Path) -> dict:
    """The AOTI_* metadata Inductor wrote into the package (device, CPU ISA, compute capability)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("_metadata.json")), None)
        return json.loads(z.read(name)) if name else {}


def input_record(size: tuple[int, int] | list[int], in_chans: int) -> dict:
    """How an image becomes the model's input, for callers outside Python (the C++ example reads it)."""
    h, w = size
    resize = int(h / EVAL_CROP_PCT) if h == w else [int(h / EVAL_CROP_PCT), int(w / EVAL_CROP_PCT)]
    return {"channels": in_chans, "size": [h, w], "resize": resize, "crop": "center",
            "interpolation": "bicubic, antialiased", "pixel_range": [0, 1],
            "layout": f"(N, {in_chans}, {h}, {w}) float32, channels first; then (pixels - mean) / std",
            "resize_rule": "square size: shorter side to 'resize', aspect kept; otherwise both sides to 'resize'"}


def output_layout(kind: str) -> str:
    """What the exported model returns, in words."""
    if kind == "classifier":
        return "logits (N, num_classes), before softmax"
    return "tokens (N, 1 + L, D) after the final norm, image order, no masking; [:, 0] is the cls embedding"


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) with 1 or 3 channels -> `channels` channels: grey repeated, or RGB to PIL's 'L' luma."""
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1)
    r, g, b = img.int()  # PIL's integer ITU-R 601-2 luma, so a PPM gives the grey values PIL would
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def preprocess(img: torch.Tensor, size: tuple[int, int] | list[int], mean, std) -> torch.Tensor:
    """uint8 image (C, H, W) -> normalised (1, C, h, w): `input_record`'s recipe in torch ops, the ones the C++
    example calls (bicubic antialiased resize of [0, 1] floats, centre crop, normalise). Close to, not bitwise,
    mimkit's PIL eval transform: PIL resizes 8-bit pixels and rounds."""
    h, w = size
    x = to_channels(img, len(mean) if mean is not None else img.shape[0]).float().div(255).unsqueeze(0)
    ih, iw = x.shape[-2:]
    if h == w:  # torchvision's Resize(int): the shorter side to `resize`, the longer in proportion (floored)
        r = int(h / EVAL_CROP_PCT)
        rh, rw = (r, int(r * iw / ih)) if ih <= iw else (int(r * ih / iw), r)
    else:
        rh, rw = int(h / EVAL_CROP_PCT), int(w / EVAL_CROP_PCT)
    x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
    top, left = round((rh - h) / 2.0), round((rw - w) / 2.0)  # torchvision's CenterCrop rounding
    x = x[..., top:top + h, left:left + w]
    if mean is not None and std is not None:
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.contiguous()
