"""mimkit export: every format reloads and matches PyTorch on random input, encoder and classifier."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import save_tiny

from mimkit.cli import main
from mimkit.engine.checkpoint import make_checkpoint
from mimkit.models import create_model
from mimkit.models.heads import vit_classifier
from mimkit.tasks.finetune import vit_arch_of


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(tiny encoder checkpoint, fine-tuned-style classifier checkpoint with a non-trivial head)."""
    d = tmp_path_factory.mktemp("export")
    enc_path = save_tiny(d / "tiny.pt")
    enc, _ = __import__("mimkit.models.loading", fromlist=["x"]).model_from_checkpoint(enc_path)
    torch.manual_seed(1)
    clf = vit_classifier(enc, 5, global_pool=True)
    torch.nn.init.normal_(clf.head.weight)  # a real head, so the logits are not all ~0
    cfg = {"model": {"finetune": str(enc_path), "arch": vit_arch_of(clf)}, "data": {"input_size": 32}}
    clf_path = d / "clf.pt"
    torch.save(make_checkpoint(model=clf.state_dict(), optimizer={}, epoch=1, step=1, config=cfg), clf_path)
    return enc_path, clf_path


def _export(ckpt, fmt: str, out) -> dict:
    assert main(["export", str(ckpt), "--format", fmt, "--output", str(out)]) == 0
    return json.loads((out / "export.json" if fmt == "hf" else out.with_name(out.name + ".export.json")).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx", "safetensors", "timm", "hf"])
def test_encoder_export_parity(fmt, ckpts, tmp_path, capsys) -> None:
    r = _export(ckpts[0], fmt, tmp_path / f"enc_{fmt}")
    assert r["kind"] == "encoder" and r["ok"] and r["max_abs_error"] < 1e-4
    assert r["output_shape"][1:] == [1 + 16, 32]  # all 4x4 patches + cls: no masking
    assert "max abs error" in capsys.readouterr().out
    if fmt == "torchscript":  # the traced module is the unmasked encoder: deterministic, equal to ours
        m = torch.jit.load(str(tmp_path / f"enc_{fmt}"))
        x = torch.randn(2, 3, 32, 32)
        enc = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
        enc.load_state_dict(torch.load(ckpts[0], weights_only=True)["model"])
        assert torch.equal(m(x), m(x)) and torch.allclose(m(x), enc.eval().forward_features(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx", "safetensors", "timm"])
def test_classifier_export_parity(fmt, ckpts, tmp_path) -> None:
    r = _export(ckpts[1], fmt, tmp_path / f"clf_{fmt}")
    assert r["kind"] == "classifier" and r["ok"] and r["output_shape"][1:] == [5]
    assert r["max_abs_error"] < 1e-4


def test_hf_classifier_is_a_clear_error(ckpts, tmp_path, capsys) -> None:
    assert main(["export", str(ckpts[1]), "--format", "hf", "--output", str(tmp_path / "x")]) == 2
    assert "hf exports MAE encoders" in capsys.readouterr().err


@pytest.mark.slow
def test_pt2_is_a_torch_export_program_with_a_dynamic_batch(ckpts, tmp_path) -> None:
    r = _export(ckpts[0], "pt2", tmp_path / "enc.pt2")
    program = torch.export.load(str(tmp_path / "enc.pt2"))
    assert isinstance(program, torch.export.ExportedProgram) and r["runtime"].startswith("torch")
    enc, _ = __import__("mimkit.models.loading", fromlist=["x"]).model_from_checkpoint(ckpts[0])
    x = torch.randn(5, 3, 32, 32)  # neither the traced batch (2) nor the checked one (3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), enc.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_parity_runs_on_onnxruntime(ckpts, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    r = _export(ckpts[0], "onnx", tmp_path / "enc.onnx")
    assert r["runtime"].startswith("onnxruntime") and r["ok"]
    assert r["normalization"] == {"mean": pytest.approx([0.485, 0.456, 0.406]),
                                  "std": pytest.approx([0.229, 0.224, 0.225])}


@pytest.mark.parametrize("fmt, package", [("onnx", "onnx"), ("hf", "transformers")])
def test_missing_package_is_one_line_before_any_work(fmt, package, ckpts, tmp_path, capsys, monkeypatch) -> None:
    import mimkit.tasks.export as X

    monkeypatch.setitem(__import__("sys").modules, package, None)  # `import package` now raises ImportError
    loaded = []
    monkeypatch.setattr(X, "load_for_export", lambda *a, **k: loaded.append(a))
    out = tmp_path / "never"
    assert main(["export", str(ckpts[0]), "--format", fmt, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mimkit export: error: --format {fmt} needs the {package} package: pip install 'mimkit[export]'"
    assert not loaded and not out.exists()  # checked before the checkpoint was even read
