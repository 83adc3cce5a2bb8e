"""Default export names say what the file is and live in the run's export/ folder, never among checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluate import save_tiny

from mimkit.cli import main
from mimkit.tasks.export import default_output


@pytest.mark.parametrize("src, kind, fmt, want", [
    ("runs/demo/checkpoints/final.pt", "encoder", "torchscript", "runs/demo/export/final_encoder.torchscript.pt"),
    ("runs/demo/checkpoints/final.pt", "encoder", "pt2", "runs/demo/export/final_encoder.pt2"),
    ("runs/demo/checkpoints/final.pt", "encoder", "aoti", "runs/demo/export/final_encoder.aoti.pt2"),
    ("runs/lp/checkpoints/best.pt", "classifier", "timm", "runs/lp/export/best_classifier.timm.safetensors"),
    ("runs/demo/checkpoints/epoch-3/model.pt", "encoder", "onnx", "runs/demo/export/epoch-3_encoder.onnx"),
    ("hub/vit-mae/model.safetensors", "encoder", "hf", "hub/export/vit-mae_encoder_hf"),
    ("mae_pretrain_vit_base.pth", "encoder", "safetensors", "export/mae_pretrain_vit_base_encoder.safetensors"),
])
def test_default_output_names(src, kind, fmt, want) -> None:
    assert default_output(Path(src), kind, fmt) == Path(want)


@pytest.mark.slow
def test_torchscript_default_is_not_beside_the_checkpoints(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_tiny(run / "checkpoints" / "final.pt")
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert (run / "export" / "final_encoder.torchscript.pt").is_file()
    assert (run / "export" / "final_encoder.torchscript.pt.export.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final.pt"]  # nothing new among checkpoints
    assert "replaced" not in capsys.readouterr().out
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert "replaced the earlier export" in capsys.readouterr().out  # said, not silent
