"""The command table and argument parsing shared by the CLI and the Python API: one way from words to a run's args.

Each command is a module with `add_arguments(parser)` and `run(args) -> int`; a command spanning several files points
at its package's recipe. Parsing refuses abbreviated and unknown flags with the closest valid one named.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from typing import Sequence

from mimkit.config import ArgParser, take_leftovers
from mimkit.config.flags import check_arg_values, empty_value
from mimkit.errors import ConfigError

# command -> (module, one-line description); each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("mimkit.tasks.pretrain.recipe", "MAE / LocalMIM pretraining (no arguments: the embedded demo)"),
    "visualize": ("mimkit.tasks.visualize", "original / masked / reconstruction picture from a checkpoint"),
    "models": ("mimkit.tasks.list_models", "list the registered models with their parameter counts"),
    "continual": ("mimkit.tasks.continual.recipe", "continual MAE pretraining over a domain sequence, with forgetting"),
    "examples": ("mimkit.tasks.examples", "list / run the continual presets (seed 000's example runner)"),
    "knn": ("mimkit.tasks.knn", "k-NN accuracy of a frozen encoder on a labelled set"),
    "rankme": ("mimkit.tasks.rankme", "RankMe (effective rank) of a frozen encoder's features"),
    "linprobe": ("mimkit.tasks.linprobe", "linear probe of a frozen encoder (official MAE recipe)"),
    "finetune": ("mimkit.tasks.finetune", "end-to-end classification fine-tuning (official MAE recipe)"),
    "segment": ("mimkit.tasks.segment.recipe", "semantic segmentation: UperNet on an MAE encoder, mIoU (MMSeg recipe)"),
    "incremental": ("mimkit.tasks.incremental.recipe", "class-incremental learning against forgetting (CE, KD, EMA, "
                    "masked features, replay)"),
    "shards": ("mimkit.tasks.shards", "pack an image folder into WebDataset tar shards (+ index) for --data_path"),
    "export": ("mimkit.tasks.export", "export an encoder or classifier: pt2, onnx, safetensors, timm, hf, torchscript, "
               "aoti"),
    "stats": ("mimkit.tasks.stats", "per-channel mean / std of an image folder, for --mean / --std"),
}


# How each command that reads an encoder checkpoint lets a user state the heads of a file that does not (an
# OpenMMLab file without its saved config): the guess line names it. Absent: model.kwargs.num_heads=N (dotted keys).
_BY_MODEL = "give --model NAME, a registered model {width} wide with the right heads (`mimkit models`)"
HEADS_WAYS: dict[str, str] = {
    **dict.fromkeys(("knn", "rankme", "linprobe", "finetune", "segment", "visualize", "export"), _BY_MODEL),
    "incremental": "give --model NAME with --finetune, a registered MAE model {width} wide with the right heads "
                   "(`mimkit models`)",
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


class RaisingArgParser(ArgParser):
    """For the Python API: a parsing problem raises ConfigError (a UserError) instead of exiting the interpreter."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        # argparse speaks of command-line flags; a Python caller typed keywords
        message = re.sub(r"^argument --(\w+)(/--[\w-]+)?:", r"\1:", message)
        message = re.sub(r"^the following arguments are required: (.*)$",
                         lambda m: "missing required argument(s): " + m.group(1).replace("--", ""), message)
        raise ConfigError(f"{self.prog.replace('mimkit ', 'mimkit.')}(): {message}")

    def exit(self, status: int = 0, message: str | None = None):  # noqa: D102 - argparse's hook
        raise ConfigError((message or f"exit {status}").strip())


def build_parser(parser_class: type = ArgParser) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command; abbreviated flags are refused everywhere."""
    from mimkit import __version__

    parser = parser_class(prog="mimkit", description="Masked image modeling toolkit.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text),
                            formatter_class=HelpFormatter, allow_abbrev=False)
        mod.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def command_parser(command: str, parser_class: type = ArgParser) -> argparse.ArgumentParser:
    """The parser of one command alone, as `mimkit COMMAND` builds it."""
    module, help_text = COMMANDS[command]
    mod = importlib.import_module(module)
    sp = parser_class(prog=f"mimkit {command}", description=(mod.__doc__ or help_text),
                      formatter_class=HelpFormatter, allow_abbrev=False)
    mod.add_arguments(sp)
    sp.set_defaults(_module=module, command=command)
    return sp


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of `command` inside the top-level parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def options_of(sp: argparse.ArgumentParser) -> list[str]:
    """Every option string a parser takes."""
    return [o for a in sp._actions for o in a.option_strings]


LAUNCHER_FLAGS = ("--local-rank", "--local_rank")


def strip_launcher_flags(words: Sequence[str]) -> list[str]:
    """`words` without the flag `python -m torch.distributed.launch` adds (`--local-rank=N` / `--local_rank N`,
    before or after the command); its value goes to the LOCAL_RANK environment variable unless that is set."""
    out: list[str] = []
    i = 0
    words = list(words)
    while i < len(words):
        w = words[i]
        name, eq, value = w.partition("=")
        if name in LAUNCHER_FLAGS:
            if not eq and i + 1 < len(words) and words[i + 1].lstrip("-").isdigit():
                value, i = words[i + 1], i + 1
            if value.isdigit():
                os.environ.setdefault("LOCAL_RANK", value)
            i += 1
            continue
        if w == "--":  # everything after belongs to someone else
            out += words[i:]
            break
        out.append(w)
        i += 1
    return out


def check_flags(sp: argparse.ArgumentParser, words: Sequence[str]) -> None:
    """Refuse (sp.error) the first word that looks like a flag but is none of the command's."""
    if any(a.nargs == argparse.REMAINDER for a in sp._actions):
        return  # a command that passes flags on (examples -> continual): the receiving parser checks them
    options = options_of(sp)
    for word in words:
        if word == "--":
            return
        if word.startswith("--") and word.split("=")[0] not in options:
            sp.error(take_leftovers(argparse.Namespace(), [word], options))


def parse_command_args(sp: argparse.ArgumentParser, words: Sequence[str]) -> argparse.Namespace:
    """One command's words -> its args: unknown flags refused first, config files / overrides collected after."""
    check_flags(sp, words)
    args, rest = sp.parse_known_args(list(words))
    problem = take_leftovers(args, rest, options_of(sp)) or empty_value(sp, args) or check_arg_values(sp, args)
    if problem:
        sp.error(problem)
    return args
