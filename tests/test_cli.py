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


def test_examples_dry_run_after_the_key(capsys) -> None:
    assert main(["examples", "5", "--dry_run"]) == 0
    assert capsys.readouterr().out.strip() == "$ mimkit continual continual/quick_test.yaml"


def test_garbage_and_empty_checkpoints_are_named(tmp_path, capsys) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 20)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["visualize", str(garbage), str(garbage)]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(empty), "--output_dir", str(tmp_path / "run")]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_continual_takes_the_architecture_of_its_checkpoint(tmp_path) -> None:
    from conftest import TINY_MODEL, write_images
    from mimkit.tasks.continual import config_from_args as continual_config

    from mimkit.cli import build_parser

    data = tmp_path / "imgs"
    write_images(data, 8)
    run = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, "--data_path", str(data), "--output_dir", str(run), "--batch_size", "4",
                 "--num_workers", "0", "--epochs", "1", "--max_steps", "1"]) == 0
    args = build_parser().parse_args(["continual", "--continual_checkpoint", str(run / "checkpoints/final.pt"),
                                      "--data_path", str(data)])
    cfg = continual_config(args)
    assert cfg.model.type == "mae_vit_tiny_patch16" and cfg.model.kwargs.depth == 2 and cfg.data.input_size == 32
    args = build_parser().parse_args(["continual", "--continual_checkpoint", str(run / "checkpoints/final.pt"),
                                      "--data_path", str(data), "--model", "mae_vit_base_patch16"])
    assert continual_config(args).model.type == "mae_vit_base_patch16"  # an explicit --model wins


# ---------------------------------------------------------------------------------------------- CLI habits
def _subparsers():
    import argparse

    from mimkit.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_help_shows_every_flags_default_exactly_once() -> None:
    from mimkit.cli import COMMANDS

    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    for name, sp in subs.items():
        text = sp.format_help()
        assert "(default 0.75) (default: 0.75)" not in text
        for action in sp._actions:
            if not action.option_strings or action.dest in ("help",) or action.help == "==SUPPRESS==":
                continue
            shown = sp._get_formatter()._expand_help(action) if action.help else ""
            n = shown.lower().count("default") + shown.count("(required)")
            assert n == 1, f"mimkit {name} {action.option_strings[0]}: {shown!r}"


def test_const_flag_help_names_what_it_sets() -> None:
    ft = _subparsers()["finetune"]
    cls = next(a for a in ft._actions if "--cls_token" in a.option_strings)
    text = ft._get_formatter()._expand_help(cls)
    assert "sets model.global_pool to false" in text and "(default: True)" not in text


def test_finetune_help_keeps_the_examples_line_breaks(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--model mae_vit_base_patch16 \\\n        --batch_size 32" in out


@pytest.mark.parametrize("argv, hint", [
    (["pretrain", "--epocs", "3"], "did you mean --epochs?"),
    (["knn", "--checkpoint", "x", "--data_path", "digits", "--temprature", "0.1"], "did you mean --temperature?"),
    (["continual", "--freez_mode", "none"], "did you mean --freeze_mode?"),
])
def test_unknown_flag_gets_did_you_mean(argv, hint, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["pretrain", "--max", "3"], ["knn", "--check", "x", "--data_path", "digits"],
                                  ["visualize", "x.pt", "y.png", "--mask", "0.5"]])
def test_abbreviated_flags_are_refused(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown flag" in err and "flags are not abbreviated" in err
    if argv[1] == "--max":
        assert "did you mean --max_steps?" in err


def test_nothing_imports_the_cli() -> None:
    import ast
    from pathlib import Path

    import mimkit

    root = Path(mimkit.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        if f.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mimkit.cli" or n.startswith("mimkit.cli.") for n in names):
                offenders.append(str(f.relative_to(root)))
            if (isinstance(node, ast.ImportFrom) and node.module == "mimkit"
                    and any(a.name == "cli" for a in node.names)):
                offenders.append(str(f.relative_to(root)))
    assert offenders == []


@pytest.mark.parametrize("command", ["pretrain", "continual", "knn", "linprobe", "finetune", "rankme", "stats"])
def test_data_path_help_names_shards(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "WebDataset shards ('dir/train-{000000..000009}.tar', a glob, or a shard folder)" in out
