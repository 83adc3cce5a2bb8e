"""`mimkit export --format aoti` and examples/cpp: a tiny encoder and a tiny linear probe, exported as AOTInductor
packages and TorchScript, run from the C++ program (built with CMake against the installed torch) on a PPM image;
its output equals the Python model's on the same image."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import TINY_KW, save_tiny

import mimkit.tasks.aoti as A
from mimkit.cli import main
from mimkit.engine.checkpoint import make_checkpoint
from mimkit.tasks.export import load_for_export

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]  # the probe's own normalisation, not ImageNet's
CLASSES = 4


def save_tiny_probe(path: Path) -> Path:
    """A `mimkit linprobe`-style checkpoint (tiny encoder, BatchNorm with real statistics, its own mean / std)."""
    from mimkit.models import create_model
    from mimkit.models.heads import LinearProbe

    torch.manual_seed(2)
    probe = LinearProbe(create_model("mae_vit_tiny_patch16", img_size=32, **TINY_KW), CLASSES)
    bn, linear = probe.head
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2)  # folding the BatchNorm into the head is really exercised
    torch.nn.init.normal_(linear.weight)
    cfg = {"model": {"arch": {"probe_encoder": {"type": "mae_vit_tiny_patch16", "kwargs": TINY_KW}},
                     "global_pool": False, "nb_classes": CLASSES},
           "data": {"input_size": 32, "mean": MEAN, "std": STD}}
    torch.save(make_checkpoint(model=probe.state_dict(), optimizer={}, epoch=1, step=1, config=cfg), path)
    return path


def write_photo(path: Path, h: int = 45, w: int = 60) -> Path:
    """A smooth, photo-like RGB image (gradients and a disc, not noise), not square: resize and crop both act."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((y - h * 0.4) ** 2 + (x - w * 0.6) ** 2 < (h * 0.3) ** 2).astype(np.float32)
    rgb = np.stack([x / w * 255, y / h * 200 + 30 * disc, 120 + 100 * disc], -1)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)  # .ppm: Pillow writes binary P6
    return path


def _tools_or_skip() -> None:
    missing = [t for t in ("cmake",) if shutil.which(t) is None]
    if A.find_cxx_compiler() is None:
        missing.append("a C++ compiler")
    if missing:
        pytest.skip(f"the C++ example needs {' and '.join(missing)}")


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """examples/cpp built once for the module (CMake against the installed torch's libtorch)."""
    _tools_or_skip()
    build = tmp_path_factory.mktemp("cpp_build")
    subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j2"], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / "mimkit_infer"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """{(kind, format): (model file, checkpoint)} for the tiny encoder and probe, aoti and torchscript."""
    _tools_or_skip()
    d = tmp_path_factory.mktemp("aoti")
    ckpts = {"encoder": save_tiny(d / "tiny.pt"), "classifier": save_tiny_probe(d / "probe.pt")}
    out = {}
    for kind, ckpt in ckpts.items():
        for fmt, suffix in (("aoti", ".aoti.pt2"), ("torchscript", ".torchscript.pt")):
            path = d / f"{kind}{suffix}"
            assert main(["export", str(ckpt), "--format", fmt, "--output", str(path)]) == 0
            out[kind, fmt] = path, ckpt
    return out


def _run(program: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=120)


def _saved(path: Path) -> torch.Tensor:
    lines = path.read_text().split("\n")
    shape = [int(v) for v in lines[0].split()[2:]]  # "# shape 1 17 32"
    return torch.tensor([float(v) for v in lines[1:] if v]).view(shape)


@pytest.mark.slow
@pytest.mark.parametrize("kind, fmt", [("encoder", "aoti"), ("encoder", "torchscript"),
                                       ("classifier", "aoti"), ("classifier", "torchscript")])
def test_cpp_program_matches_python_on_an_image(kind, fmt, program, exports, tmp_path) -> None:
    model_file, ckpt = exports[kind, fmt]
    record = json.loads(Path(str(model_file) + ".export.json").read_text())
    assert record["ok"] and record["max_abs_error"] <= 1e-4 and record["format"] == fmt
    assert record["input"]["size"] == [32, 32] and record["input"]["resize"] == 36
    image = write_photo(tmp_path / "photo.ppm")
    done = _run(program, model_file, image, "--save", tmp_path / "out.txt", "--threads", "1", "--repeat", "5")
    assert done.returncode == 0, done.stderr
    got = _saved(tmp_path / "out.txt")

    *_, reference = load_for_export(str(ckpt))  # the PyTorch model (for the probe: before its BatchNorm fold)
    img = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)
    x = A.preprocess(img, record["input"]["size"], record["normalization"]["mean"], record["normalization"]["std"])
    with torch.no_grad():
        want = reference.eval()(x)
    assert got.shape == want.shape == ((1, 17, 32) if kind == "encoder" else (1, CLASSES))
    assert (got - want).abs().max() <= 1e-4
    assert "time per image:" in done.stdout and " ms " in done.stdout
    if kind == "encoder":
        assert "cls embedding, 32 values" in done.stdout
        assert record["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    else:
        assert f"output (1, {CLASSES}): class scores" in done.stdout
        assert record["normalization"] == {"mean": pytest.approx(MEAN), "std": pytest.approx(STD)}


def test_preprocess_is_close_to_mimkits_eval_transform(tmp_path) -> None:
    """The C++ recipe (torch ops on floats) stays near mimkit's PIL eval transform (8-bit pixels, rounded)."""
    from mimkit.data.transforms import eval_transform

    image = write_photo(tmp_path / "photo.ppm")
    img = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)
    ours = A.preprocess(img, (32, 32), MEAN, STD)[0]
    pil = eval_transform(32, 3, MEAN, STD)(Image.open(image))
    assert ours.shape == pil.shape and (ours - pil).abs().mean() < 0.02


def test_aoti_without_a_compiler_is_one_line_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import mimkit.tasks.export as X

    monkeypatch.setattr(A, "find_cxx_compiler", lambda: None)
    loaded = []
    monkeypatch.setattr(X, "load_for_export", lambda *a, **k: loaded.append(a))
    out = tmp_path / "never.aoti.pt2"
    assert main(["export", str(save_tiny(tmp_path / "t.pt")), "--format", "aoti", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mimkit export: error: --format aoti compiles C++ but no C++ compiler was found "
                   "(set CXX, or install g++)")
    assert not loaded and not out.exists()


def test_device_cuda_is_for_aoti_only(tmp_path, capsys) -> None:
    ckpt = save_tiny(tmp_path / "t.pt")
    assert main(["export", str(ckpt), "--format", "pt2", "--device", "cuda"]) == 2
    assert "--device cuda applies to --format aoti only" in capsys.readouterr().err


def _with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of an AOTI package whose AOTI_* metadata says something else (another device, say)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_metadata.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(info, data)
    return dst


@pytest.mark.slow
def test_a_package_for_another_device_or_torch_is_one_line(program, exports, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine runs CUDA packages")
    model_file, _ = exports["encoder", "aoti"]
    image = write_photo(tmp_path / "photo.ppm")
    cuda = _with_metadata(model_file, tmp_path / "cuda.aoti.pt2", AOTI_DEVICE_KEY="cuda")
    shutil.copy(str(model_file) + ".export.json", str(cuda) + ".export.json")
    done = _run(program, cuda, image)
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "is a CUDA package but this machine has no usable CUDA GPU" in done.stderr

    old = tmp_path / "old.aoti.pt2"
    shutil.copy(model_file, old)
    record = json.loads(Path(str(model_file) + ".export.json").read_text())
    Path(str(old) + ".export.json").write_text(json.dumps({**record, "torch": "2.0.0+cpu"}))
    done = _run(program, old, image)
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert "was compiled by torch 2.0.0+cpu" in done.stderr and "export it again with this torch" in done.stderr


@pytest.mark.slow
def test_cpp_program_bad_inputs_are_one_line(program, exports, tmp_path) -> None:
    model_file, _ = exports["encoder", "torchscript"]
    jpeg = tmp_path / "photo.jpg"
    Image.open(write_photo(tmp_path / "photo.ppm")).save(jpeg)
    done = _run(program, model_file, jpeg)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a binary PPM (P6) or PGM (P5)" in done.stderr
    alone = tmp_path / "alone.torchscript.pt"
    shutil.copy(model_file, alone)  # no export record beside it: the recipe must come from the flags
    done = _run(program, alone, tmp_path / "photo.ppm")
    assert done.returncode == 2 and "pass --size" in done.stderr
    done = _run(program, alone, tmp_path / "photo.ppm", "--size", "32", "--resize", "36", "--mean", "0.485,0.456,0.406",
                "--std", "0.229,0.224,0.225", "--repeat", "1", "--threads", "1")
    assert done.returncode == 0 and "cls embedding" in done.stdout


@pytest.mark.slow
def test_a_grey_pgm_feeds_an_rgb_encoder_like_python(program, exports, tmp_path) -> None:
    model_file, ckpt = exports["encoder", "aoti"]
    grey = tmp_path / "grey.pgm"
    Image.open(write_photo(tmp_path / "photo.ppm")).convert("L").save(grey)  # Pillow writes binary P5
    done = _run(program, model_file, grey, "--save", tmp_path / "out.txt", "--threads", "1", "--repeat", "1")
    assert done.returncode == 0, done.stderr
    img = torch.from_numpy(np.array(Image.open(grey)))[None]  # (1, H, W)
    x = A.preprocess(img, (32, 32), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # grey repeated to 3 channels
    *_, reference = load_for_export(str(ckpt))
    with torch.no_grad():
        assert (_saved(tmp_path / "out.txt") - reference(x)).abs().max() <= 1e-4
