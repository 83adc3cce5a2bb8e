"""Exporting a real `mimkit linprobe` run: its own normalisation, ONNX on onnxruntime, a true timm state dict."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluate import save_tiny, write_colour_set

from mimkit.cli import main
from mimkit.io import load_checkpoint_file

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A tiny linprobe run (cls token) with its own --mean / --std; returns its folder."""
    d = tmp_path_factory.mktemp("probe")
    ckpt = save_tiny(d / "tiny.pt")
    data = write_colour_set(d / "data")
    out = d / "run"
    assert main(["linprobe", "--finetune", str(ckpt), "--data_path", str(data), "--epochs", "2",
                 "--warmup_epochs", "0", "--batch_size", "8", "--output_dir", str(out), "--device", "cpu",
                 "--num_workers", "0", "--opt", "sgd", "--blr", "8", "--no_aug", "--input_size", "32",
                 "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]) == 0
    return out


def _probe(run):
    from mimkit.tasks.linprobe import probe_from_checkpoint

    obj = load_checkpoint_file(run / "checkpoints" / "final.pt")
    return probe_from_checkpoint(obj, obj["model"])


def _export(src, fmt, out) -> dict:
    assert main(["export", str(src), "--format", fmt, "--output", str(out)]) == 0
    return json.loads(out.with_name(out.name + ".export.json").read_text())


@pytest.mark.slow
def test_probe_export_records_the_probe_runs_normalisation(probe_run, tmp_path) -> None:
    r = _export(probe_run, "pt2", tmp_path / "probe.pt2")
    assert r["kind"] == "classifier" and r["ok"]
    assert r["normalization"] == {"mean": pytest.approx(MEAN), "std": pytest.approx(STD)}  # not ImageNet's


@pytest.mark.slow
def test_probe_onnx_runs_on_onnxruntime_like_the_eval_mode_probe(probe_run, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    r = _export(probe_run, "onnx", tmp_path / "probe.onnx")
    assert r["ok"] and r["runtime"].startswith("onnxruntime") and r["output_shape"][1:] == [3]
    probe = _probe(probe_run)
    bn = probe.head[0]
    assert bn.running_var.sub(1).abs().max() > 1e-3  # trained statistics: folding them is really exercised
    x = torch.randn(4, 3, 32, 32)
    sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = probe.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_probe_timm_export_loads_strictly_into_timm_create_model(probe_run, tmp_path) -> None:
    import timm
    from safetensors.torch import load_file

    r = _export(probe_run, "timm", tmp_path / "probe.safetensors")
    sd = load_file(str(tmp_path / "probe.safetensors"))
    assert not any(k.startswith(("encoder.", "decoder", "mask_token")) for k in sd)  # timm names, no decoder
    recipe = r["timm"]
    vit = timm.create_model(recipe["model_name"], pretrained=False, **recipe["kwargs"])
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    probe = _probe(probe_run).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), probe(x), rtol=1e-5, atol=1e-5)
        # the features under the head are the frozen encoder's cls token
        torch.testing.assert_close(vit.forward_head(vit.forward_features(x), pre_logits=True),
                                   probe.encoder.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_encoder_timm_export_loads_strictly_into_timm_create_model(tmp_path) -> None:
    import timm
    from safetensors.torch import load_file

    from mimkit.models.loading import model_from_checkpoint

    ckpt = save_tiny(tmp_path / "tiny.pt")
    r = _export(ckpt, "timm", tmp_path / "enc.safetensors")
    vit = timm.create_model(r["timm"]["model_name"], pretrained=False, **r["timm"]["kwargs"])
    vit.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)
    enc, _ = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), enc.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_probe_checkpoint_holds_no_decoder_and_still_resumes_strictly(probe_run) -> None:
    from mimkit.models.heads import LinearProbe

    sd = torch.load(probe_run / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert any(k.startswith("encoder.blocks.") for k in sd)
    assert not any(k.startswith(("encoder.decoder", "encoder.mask_token")) for k in sd)
    probe = _probe(probe_run)
    assert isinstance(probe, LinearProbe)
    probe.load_state_dict(sd, strict=True)  # what --resume / --eval do
