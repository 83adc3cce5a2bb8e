"""Every README command on built-in data runs as written (shortened only with --max_steps), in README order."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING = ("pretrain", "continual", "linprobe", "finetune", "segment", "incremental")


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(line as written, argv after `mimkit`) for every `mimkit ...` line of the bash blocks and every
    `` `mimkit ...` `` example in a table row, in the order they appear, continuation lines joined; lines marked
    `# real data` (and torchrun lines) are left out."""
    out = []
    pattern = r"```bash\n(.*?)```|^\|[^\n]*$"
    for m in re.finditer(pattern, text, flags=re.S | re.M):
        if m.group(1) is not None:
            lines = [line.strip() for line in m.group(1).replace("\\\n", " ").splitlines()]
        else:  # a table row: its code spans that are mimkit commands
            lines = [span.strip() for span in re.findall(r"`(mimkit [^`]+)`", m.group(0))]
        for line in lines:
            if not line.startswith("mimkit ") or "# real data" in line:
                continue
            out.append((line, shlex.split(line, comments=True)[1:]))
    return out


def test_readme_commands_are_found_and_marked() -> None:
    cmds = readme_commands(README.read_text())
    names = [argv[0] for _, argv in cmds]
    assert {"pretrain", "continual", "examples", "knn", "linprobe", "finetune", "export", "visualize"} <= set(names)
    # nothing unmarked needs a dataset of the user's
    assert not [line for line, _ in cmds if "/data/" in line or ".pth" in line]
    assert cmds[0][1] == ["pretrain", "--output_dir", "runs/demo"]  # the demo first: later commands use its weights


COMMANDS = readme_commands(README.read_text())


def shortened(argv: list[str]) -> list[str]:
    """Training commands stop after one optimiser step (incremental: per task; the flag goes right after the
    command: --domains takes every word after it)."""
    return [argv[0], "--max_steps", "1", *argv[1:]] if argv[0] in TRAINING else argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder where the README's first command (the demo) has run, and my_photo.jpg exists."""
    import os

    d = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 96, 3)) * 255).astype(np.uint8)).save(d / "my_photo.jpg")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(shortened(COMMANDS[0][1])) == 0, COMMANDS[0][0]
    finally:
        os.chdir(cwd)
    assert (d / "runs/demo/checkpoints/final.pt").is_file()
    return d


@pytest.mark.slow
@pytest.mark.parametrize("line, argv", COMMANDS[1:], ids=[line[:60] for line, _ in COMMANDS[1:]])
def test_readme_command_runs_on_builtin_data(line: str, argv: list[str], workdir: Path, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    assert main(shortened(argv)) == 0, line
    if argv[0] in ("knn", "visualize"):
        assert list((workdir / "runs" / argv[0]).glob("*/results.json" if argv[0] == "knn" else "*/*.png"))
