"""Top-level CLI: `mimkit models`, help texts, and one-line errors."""

from __future__ import annotations

import pytest

from mimkit.cli import main


def test_models_lists_true_parameter_counts(capsys) -> None:
    assert main(["models", "--aliases"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("mae_", "localmim_"))}
    assert rows["mae_vit_base_patch16"] == ["85,798,656", "26,109,184", "111,907,840"]
    assert rows["mae_vit_large_patch16"][2] == "329,541,888" and rows["mae_vit_huge_patch14"][2] == "657,074,508"
    assert "continual_mae_vit_large_patch16" in out and "MIM_vit_base_patch16" in out
    assert "mae_vit_base_patch16_dec512d8b" in out


@pytest.mark.parametrize("command", ["pretrain", "continual", "knn", "linprobe", "finetune", "export", "visualize"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: mimkit " + command in capsys.readouterr().out


def test_pretrain_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sets model.mask_ratio (default: 0.75)" in out and "sets optimization.base_lr (default: 0.00015)" in out
