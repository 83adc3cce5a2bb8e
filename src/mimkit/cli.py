"""`mimkit <command>`: parses arguments and calls a task; user mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mimkit.config import ArgParser, take_leftovers
from mimkit.errors import RunInterrupted, UserError

# command -> (module, one-line description); each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("mimkit.tasks.pretrain", "MAE / LocalMIM pretraining (no arguments: the embedded demo)"),
    "visualize": ("mimkit.tasks.visualize", "original / masked / reconstruction picture from a checkpoint"),
    "models": ("mimkit.tasks.list_models", "list the registered models with their parameter counts"),
    "continual": ("mimkit.tasks.continual", "continual MAE pretraining over a domain sequence, with forgetting"),
    "examples": ("mimkit.tasks.examples", "list / run the continual presets (seed 000's example runner)"),
    "knn": ("mimkit.tasks.knn", "k-NN accuracy of a frozen encoder on a labelled set"),
    "rankme": ("mimkit.tasks.rankme", "RankMe (effective rank) of a frozen encoder's features"),
    "linprobe": ("mimkit.tasks.linprobe", "linear probe of a frozen encoder (official MAE recipe)"),
    "finetune": ("mimkit.tasks.finetune", "end-to-end classification fine-tuning (official MAE recipe)"),
    "segment": ("mimkit.tasks.segment", "semantic segmentation: UperNet on an MAE encoder, mIoU (MMSeg recipe)"),
    "incremental": ("mimkit.tasks.incremental", "class-incremental learning against forgetting (CE, KD, EMA, "
                    "masked features, replay)"),
    "shards": ("mimkit.tasks.shards", "pack an image folder into WebDataset tar shards (+ index) for --data_path"),
    "export": ("mimkit.tasks.export", "export an encoder or classifier: pt2, onnx, safetensors, timm, hf, torchscript"),
    "stats": ("mimkit.tasks.stats", "per-channel mean / std of an image folder, for --mean / --std"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each flag's default exactly once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return with_default(action)


def with_default(action: argparse.Action) -> str:
    """The action's help with its default appended, unless the help already states it."""
    text = action.help or ""
    if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
        return text
    if action.required:
        return f"{text} (required)".strip()
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        default = "on" if action.default else "off"
    elif action.default is None:
        default = "none"
    elif isinstance(action.default, (list, tuple)):
        default = " ".join(str(v) for v in action.default)
    else:
        default = "%(default)s"
    return f"{text} (default: {default})".strip()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command; abbreviated flags are refused everywhere."""
    from mimkit import __version__

    parser = ArgParser(prog="mimkit", description="Masked image modeling toolkit.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text),
                            formatter_class=HelpFormatter, allow_abbrev=False)
        mod.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _check_flags(sp: argparse.ArgumentParser, words: list[str]) -> None:
    """Exit 2 with one line on the first word that looks like a flag but is none of the command's."""
    if any(a.nargs == argparse.REMAINDER for a in sp._actions):
        return  # a command that passes flags on (examples -> continual): the receiving parser checks them
    options = [o for a in sp._actions for o in a.option_strings]
    for word in words:
        if word == "--":
            return
        if word.startswith("--") and word.split("=")[0] not in options:
            sp.error(take_leftovers(argparse.Namespace(), [word], options))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; Ctrl-C while starting (imports, parsing) is one line and exit 130 too."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("mimkit: interrupted while starting; nothing was written", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # a mistyped flag is named first, before argparse misses a required one
        _check_flags(_subparser(parser, argv[0]), argv[1:])
    # Overrides and a config file may come after flags too: collect what argparse left over.
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 2
    sp = _subparser(parser, args.command)
    problem = take_leftovers(args, rest, [o for a in sp._actions for o in a.option_strings])
    if problem:
        sp.error(problem)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        print(f"mimkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # a signal: the step finished and a checkpoint was written
        print(f"mimkit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): quit without a new checkpoint
        print(f"mimkit {args.command}: interrupted; the same command resumes from the last checkpoint "
              "(auto_resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
