"""The docs site: the generated CLI reference is current and complete, the site builds strictly (a broken link fails
it), the README stays short, and every tutorial / how-to command on built-in data runs as written (shortened only
with --max_steps, as tests/test_readme.py does for the README)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.cli import main
from mimkit.commands import COMMANDS, command_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_readme import readme_commands, shortened  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose bash blocks run in CI, in the order a reader meets them (the demo first: later pages use runs/demo).
RUN_PAGES = ["getting-started/demo.md", "getting-started/your-images.md", "tutorials/pretrain-evaluate.md",
             "tutorials/continual.md", "tutorials/localmim-freezeout.md", "tutorials/segmentation.md",
             "tutorials/incremental.md", "how-to/data.md", "how-to/models.md", "how-to/checkpoints.md",
             "how-to/logs.md", "how-to/export.md", "reference/configuration.md"]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- the generated reference
def test_cli_reference_is_current() -> None:
    stale = _gen().stale_pages()
    assert not stale, f"stale generated pages {stale}: run `make docs-reference` (python docs/gen_reference.py)"


def test_cli_reference_lists_every_flag_of_every_help() -> None:
    for name in COMMANDS:
        page = (DOCS / "reference" / "cli" / f"{name}.md").read_text()
        sp = command_parser(name)
        usage = sp.format_help()
        shown = {o for a in sp._actions if a.help != argparse.SUPPRESS and a.dest != "help"
                 for o in a.option_strings}
        assert all(o in usage for o in shown)  # what --help prints: every option string it lists
        missing = sorted(f for f in shown if f"`{f}`" not in page)
        assert not missing, f"reference/cli/{name}.md lacks {missing}"
    index = (DOCS / "reference" / "cli" / "index.md").read_text()
    assert all(f"({name}.md)" in index for name in COMMANDS)


def test_cli_reference_rows_carry_key_default_and_help() -> None:
    page = (DOCS / "reference" / "cli" / "pretrain.md").read_text()
    assert "| `--mask_ratio` | `model.mask_ratio` | `0.75` | fraction of patches removed, in [0, 1) |" in page
    assert "| `--blr` | `optimization.base_lr` | `0.00015` | base lr: lr = blr \\* effective batch / 256 |" in page
    assert "| `freezeout.t_0` | `float` | `0.8` |" in page  # a config key with its type and default
    assert "| `--k` | `[10, 20, 100, 200]` | neighbour counts" in (DOCS / "reference/cli/knn.md").read_text()


def test_changing_a_flags_help_makes_the_reference_stale(monkeypatch) -> None:
    from mimkit.tasks.pretrain import config as PC

    flag = next(f for f in PC.FLAGS if f.name == "mask_ratio")
    monkeypatch.setattr(flag, "help", "a new help text")
    stale = _gen().stale_pages()
    assert "docs/reference/cli/pretrain.md" in stale  # (continual shares pretraining's flags: stale too)
    assert "docs/reference/cli/knn.md" not in stale


# ---------------------------------------------------------------------- the site
def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(root / "mkdocs.yml"), "-d", str(site)], capture_output=True, text=True, env=env)


needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                                  or importlib.util.find_spec("mkdocstrings") is None,
                                  reason="mkdocs / mkdocstrings missing: pip install -e '.[docs]'")


@needs_mkdocs
@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    r = _mkdocs(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mimkit.api.pretrain" in (tmp_path / "site/reference/api/index.html").read_text()  # mkdocstrings ran
    assert "--mask_ratio" in (tmp_path / "site/reference/cli/pretrain/index.html").read_text()
    assert (tmp_path / "site/figures/demo_reconstruction.png").is_file()


@needs_mkdocs
@pytest.mark.slow
def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "src", tmp_path / "src")  # mkdocstrings reads the package from src/
    page = tmp_path / "docs" / "tutorials" / "continual.md"
    page.write_text(page.read_text() + "\nSee [the old page](../no_such_page.md).\n")
    r = _mkdocs(tmp_path, tmp_path / "site")
    assert r.returncode != 0
    assert "WARNING" in r.stderr and "no_such_page.md" in r.stderr


def test_every_page_is_in_the_nav_and_every_figure_is_small() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")]
    assert not [p for p in pages if p not in nav], "a page missing from mkdocs.yml's nav"
    pngs = list((DOCS / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {"demo_reconstruction.png", "demo_reconstruction_before.png",
                                      "freezeout_schedule.png"}
    assert all(p.stat().st_size < 200_000 for p in pngs)


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")


# ---------------------------------------------------------------------- the tutorials' commands
def page_commands() -> list[tuple[str, str, list[str]]]:
    """(page, line, argv) for every runnable `mimkit` line of RUN_PAGES, in reading order."""
    out = []
    for page in RUN_PAGES:
        out += [(page, line, argv) for line, argv in readme_commands((DOCS / page).read_text())]
    return out


PAGE_COMMANDS = page_commands()


def test_every_tutorial_has_runnable_commands() -> None:
    pages = {page for page, _, _ in PAGE_COMMANDS}
    assert pages == set(RUN_PAGES)
    assert not [line for _, line, _ in PAGE_COMMANDS if "/data/" in line or ".pth" in line]


@pytest.fixture(scope="module")
def docs_workdir(tmp_path_factory) -> Path:
    """A folder where the demo has run (shortened) and my_photo.jpg exists, as a reader's would."""
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 96, 3)) * 255).astype(np.uint8)).save(d / "my_photo.jpg")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(shortened(["pretrain", "--output_dir", "runs/demo"])) == 0
    finally:
        os.chdir(cwd)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("page, line, argv", PAGE_COMMANDS, ids=[f"{p}: {l[7:55]}" for p, l, _ in PAGE_COMMANDS])
def test_tutorial_command_runs_on_builtin_data(page: str, line: str, argv: list[str], docs_workdir: Path,
                                               monkeypatch) -> None:
    monkeypatch.chdir(docs_workdir)
    assert main(shortened(argv)) == 0, f"{page}: {line}"


@pytest.mark.slow
def test_python_api_tutorial_runs(docs_workdir: Path, monkeypatch) -> None:
    """The tutorial's first Python block as written; training calls shortened with max_steps=1 only."""
    import mimkit.api as api

    block = re.findall(r"```python\n(.*?)```", (DOCS / "tutorials/python-api.md").read_text(), flags=re.S)[0]
    real_call = api.call

    def short_call(command, *positional, **flags):
        if command in ("pretrain", "continual", "linprobe", "finetune", "segment"):
            flags.setdefault("max_steps", 1)
        return real_call(command, *positional, **flags)

    monkeypatch.setattr(api, "call", short_call)
    monkeypatch.chdir(docs_workdir)
    scope: dict = {}
    exec(compile(block, "python-api.md", "exec"), scope)
    assert scope["knn"].results["metrics"] and scope["exported"].output_dir.is_file()
