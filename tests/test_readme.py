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
TRAINING = ("pretrain", "continual", "linprobe", "finetune")


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(line as written, argv after `mimkit`) for every `mimkit ...` line of the README's bash blocks, continuation
    lines joined; lines marked `# real data, GPUs` (and torchrun lines) are left out."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith("mimkit ") or "real data, GPUs" in line:
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


@pytest.mark.slow
def test_every_readme_command_on_builtin_data_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 96, 3)) * 255).astype(np.uint8)).save("my_photo.jpg")
    for line, argv in readme_commands(README.read_text()):
        if argv[0] in TRAINING:  # shortened: the flag goes right after the command (--domains takes the rest)
            argv = [argv[0], "--max_steps", "2", *argv[1:]]
        assert main(argv) == 0, line
    assert (tmp_path / "runs/demo/checkpoints/final.pt").is_file()
    assert list((tmp_path / "runs/knn").glob("*/results.json"))
    assert list((tmp_path / "runs/visualize").glob("*/reconstruction.png"))
