"""`mimkit examples`: seed 000's example runner over the continual presets in configs/continual/.

    mimkit examples                      # list them (an interactive menu when run on a terminal)
    mimkit examples 2b                   # run example 2b, printing the command it runs
    mimkit examples 2 --data_path /new_domain --continual_checkpoint mae_pretrain_vit_large.pth
    mimkit examples --dry_run 3          # print the command only

With no --data_path / --domains the example runs on the built-in demo domains; the examples that freeze part of
the model (2, 2b, 3) then start from the demo's pretrained checkpoint (runs/demo, pretrained first when absent),
since freezing random weights learns nothing. Every word after the example's name is passed on to
`mimkit continual`.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

from mimkit.errors import UserError, suggest

# menu key -> (preset under configs/, title); the keys and titles are seed 000's menu
EXAMPLES: dict[str, tuple[str, str]] = {
    "1": ("continual/basic.yaml", "Basic continual training (50 epochs): all parameters, dense loss"),
    "2": ("continual/encoder_layernorms.yaml", "Encoder block LayerNorms-only training (30 epochs)"),
    "2b": ("continual/all_layernorms.yaml", "All LayerNorms training (25 epochs)"),
    "3": ("continual/encoder_frozen.yaml", "Encoder-frozen training (40 epochs): decoder adapts"),
    "4": ("continual/original_loss.yaml", "Original MAE loss (20 epochs): masked patches only"),
    "5": ("continual/quick_test.yaml", "Quick test (5 epochs)"),
}

FREEZING = ("2", "2b", "3")  # the examples whose preset freezes part of the model
DEMO_RUN = "runs/demo"  # where the freezing examples find (or pretrain) their starting checkpoint
# words that say where the data or the starting weights come from: then the example runs as the user says
OWN_CHOICE = ("--continual_checkpoint", "--init_from", "model.init_from", "--data_path", "data.data_path",
              "--domains", "continual.domains")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The example's key, --dry_run, and the words passed on to `mimkit continual`."""
    p.add_argument("--dry_run", action="store_true", help="print the command without running it")
    p.add_argument("example", nargs="?", default=None, help=f"which example: {', '.join(EXAMPLES)}")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags and overrides passed on to `mimkit continual`")


def listing() -> str:
    """The menu text."""
    lines = ["Available examples (mimkit examples KEY [flags for mimkit continual]):"]
    lines += [f"  {key:<3} {title}   [{preset}]" for key, (preset, title) in EXAMPLES.items()]
    return "\n".join(lines)


def command(key: str, extra: list[str] = ()) -> list[str]:
    """The `mimkit` argv that example `key` runs."""
    if key not in EXAMPLES:
        raise UserError(f"unknown example '{key}'{suggest(key, EXAMPLES)}; choose one of {', '.join(EXAMPLES)}")
    return ["continual", EXAMPLES[key][0], *extra]


def run_example(key: str, extra: list[str] = (), dry_run: bool = False) -> int:
    """Print the command, then run it in this process (same exit codes as `mimkit continual`)."""
    argv = command(key, list(extra))
    check_words(argv)  # before anything runs (a dry run too): a misspelt flag is named, with the closest one
    own = any(w.split("=")[0] in OWN_CHOICE for w in extra)
    if key in FREEZING and not own:
        ckpt = Path(DEMO_RUN) / "checkpoints" / "final.pt"
        argv[2:2] = ["--continual_checkpoint", str(ckpt)]
        if not ckpt.is_file():
            pre = ["pretrain", "--output_dir", DEMO_RUN]
            print(f"example {key} freezes part of the model: it starts from the demo's pretrained weights, "
                  f"which {ckpt} does not hold yet", flush=True)
            print("$ mimkit " + shlex.join(pre), flush=True)
            if not dry_run:
                rc = run_command(pre)
                if rc:
                    return rc
    print("$ mimkit " + shlex.join(argv), flush=True)
    if dry_run:
        return 0
    return run_command(argv)


def check_words(argv: list[str]) -> None:
    """Parse `mimkit ARGV`'s words with the receiving command's own flags; a bad one is a ConfigError."""
    from mimkit.config import parse_command

    module = importlib.import_module(f"mimkit.tasks.{argv[0]}")
    parse_command(module, argv[0], argv[1:], raising=True)


def run_command(argv: list[str]) -> int:
    """Run `mimkit ARGV` in this process without the CLI module (nothing imports it): parse, then the task."""
    from mimkit.config import parse_command

    module = importlib.import_module(f"mimkit.tasks.{argv[0]}")
    return module.run(parse_command(module, argv[0], argv[1:])) or 0


def menu(ask: Callable[[str], str] = input) -> Optional[str]:
    """Interactive choice on a terminal; None when the user quits."""
    print(listing())
    while True:
        choice = ask("Choose an example (q to quit): ").strip()
        if choice.lower() in ("q", "quit", ""):
            return None
        if choice in EXAMPLES:
            return choice
        print(f"unknown choice '{choice}'{suggest(choice, EXAMPLES)}")


def run(args: argparse.Namespace) -> int:
    """CLI entry: run the named example, or list them / show the menu."""
    if "--dry_run" in args.extra:  # `mimkit examples 5 --dry_run` means the same as `--dry_run 5`
        args.extra = [a for a in args.extra if a != "--dry_run"]
        args.dry_run = True
    if args.example is None:
        if not sys.stdin.isatty():
            print(listing())
            return 0
        key = menu()
        if key is None:
            return 0
        return run_example(key, args.extra, args.dry_run)
    return run_example(args.example, args.extra, args.dry_run)
