"""The Python API: every command as a function, for notebooks and scripts; the CLI runs through `run_args` too.

    import mimkit
    run = mimkit.pretrain(epochs=1, output_dir="runs/x")          # keyword arguments named as the command's flags
    run = mimkit.pretrain("pretrain/cpu_small.yaml", data_path="photos", max_steps=5)
    run = mimkit.pretrain({"schedule": {"epochs": 1}}, output_dir="runs/y")   # a config as a dict
    knn = mimkit.knn(checkpoint=run.checkpoint, data_path="digits")
    knn.results["top1"], knn.output_dir

A config (a file path, a preset name or a dict) is the positional argument and sits where a config file does:
preset <- config <- keyword flags. Each call returns a `RunResult` (the run folder and its results as Python
objects). Mistakes raise `mimkit.errors.UserError` naming the problem; nothing exits the interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mimkit import config as C
from mimkit.errors import UserError
from mimkit.commands import COMMANDS, RaisingArgParser, command_parser, parse_command_args
from mimkit.errors import ConfigError, suggest


@dataclass
class RunResult:
    """What a command left: its folder (or written file), its results and its exit code."""

    command: str
    output_dir: Optional[Path]  # the run folder (export, visualize: the file written)
    results: dict = field(default_factory=dict)  # the results.json this run wrote, or the command's summary
    exit_code: int = 0

    @property
    def checkpoint(self) -> Optional[Path]:
        """The final checkpoint of a training run (checkpoints/final.pt, or where the config put it)."""
        named = self.results.get("final_checkpoint")
        final = Path(named) if named else (self.output_dir / "checkpoints" / "final.pt" if self.output_dir else None)
        return final if final is not None and final.is_file() else None

    @property
    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl (empty when the command writes none)."""
        path = self.output_dir / "metrics.jsonl" if self.output_dir else None
        if path is None or not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_args(args: argparse.Namespace) -> RunResult:
    """Run parsed args (`args.command`, `args._module`) and collect what the run wrote: the CLI's path too."""
    from mimkit.commands import HEADS_WAYS
    from mimkit.engine import runfolder
    from mimkit.engine.logging import early_notes
    from mimkit.models.openmmlab import heads_way

    before = runfolder.held()
    try:
        with C.recording_outputs() as written, heads_way(HEADS_WAYS.get(args.command)), early_notes():
            code = importlib.import_module(args._module).run(args) or 0
    except UserError:  # refused before any work: a folder this run created and left empty goes again
        mine = runfolder.held() - before
        runfolder.release(mine)
        runfolder.undo_new_claims(mine)
        raise
    finally:  # the run folders this run claimed are free again (the process may go on: a notebook, a test)
        runfolder.release(runfolder.held() - before)
    return RunResult(args.command, _run_folder(written), _results(written), code)


def _run_folder(written: list) -> Optional[Path]:
    """The run folder (the first folder noted, or the one holding results.json), else the first file written."""
    written = [p for p in written if isinstance(p, Path)]
    folders = [p for p in written if p.is_dir()]
    if folders:
        return folders[0]
    results = [p for p in written if p.name.startswith("results") and p.suffix == ".json"]
    return results[0].parent if results else (written[0] if written else None)


def _results(written: list) -> dict:
    """The results file this run wrote last (results.json, results-2.json beside an earlier one, an export's
    record); else a summary the command handed over (pretrain, stats, shards); else the other JSON results it
    noted by name (continual: {'recon_loss': ..., 'knn_top1': ...}); else {}."""
    handed = [d for d in written if isinstance(d, dict)]
    files = [p for p in written if isinstance(p, Path) and p.suffix == ".json" and p.is_file()]
    main = [p for p in files if p.name.startswith("results") or p.name.endswith("export.json")]
    if main:
        return json.loads(main[-1].read_text())
    if handed:
        return handed[-1]
    return {p.stem: json.loads(p.read_text()) for p in files}


def to_words(command: str, positional: tuple, flags: dict[str, Any]) -> tuple[list[str], Optional[dict]]:
    """Keyword flags -> the words `mimkit COMMAND` would get; a dict config is handed back to sit at file level."""
    sp = command_parser(command, RaisingArgParser)
    by_dest = {a.dest: a for a in sp._actions if a.option_strings}
    positionals = [a for a in sp._actions if not a.option_strings]
    words: list[str] = []
    config_dict = None
    for value in positional:
        if value is None:
            continue
        if isinstance(value, dict):
            config_dict = value
        elif isinstance(value, (list, tuple)):
            words += [str(v) for v in value]
        else:
            words.append(str(value))
    if positional and not positionals and any(v is not None for v in positional):
        raise ConfigError(f"mimkit.{command}() takes keyword arguments only (the flags of `mimkit {command}`)")
    for name, value in flags.items():
        action = by_dest.get(name) or by_dest.get(name.lstrip("-").replace("-", "_"))
        if action is None:
            pos = next((a for a in positionals if a.dest == name), None)
            if pos is not None:
                words[0:0] = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
                continue
            raise ConfigError(f"mimkit.{command}() got an unknown flag {name!r}"
                              f"{suggest(name, list(by_dest) + [a.dest for a in positionals])}")
        if value is None:
            continue
        option = action.option_strings[0]
        if action.dest == "help":
            raise ConfigError(f"for help: help(mimkit.{command}) or `mimkit {command} --help` (every flag, its "
                              "config key and default)")
        if isinstance(value, (list, tuple)) and action.nargs in (None, "?"):
            raise ConfigError(f"mimkit.{command}({name}={value!r}): {option} takes one value, not a list")
        if action.nargs == "?" and isinstance(value, bool):  # an optional value (log_mlflow=True): the bare flag
            if value:
                words.append(option)
            continue
        if action.nargs == 0:  # a switch: True gives it, as typing it does; False leaves it out
            if value is True:
                words.append(option)
            elif value is not False:
                raise ConfigError(f"mimkit.{command}({name}={value!r}): {option} is a switch; give True or False")
            elif action.const is True and action.default is None:  # False cannot be said with this switch
                raise ConfigError(f"mimkit.{command}({name}=False): {option} only switches its config key on; set "
                                  "that key (its --help line names it) to false in the config dict instead")
            continue
        elif isinstance(value, (list, tuple)):
            words += [option, *[str(v) for v in value]]
        else:
            words += [option, str(value)]
    return words, config_dict


def call(command: str, *positional: Any, **flags: Any) -> RunResult:
    """Run `mimkit COMMAND` from Python: positional config / paths, keyword flags; returns the RunResult."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}{suggest(command, list(COMMANDS))}")
    words, config_dict = to_words(command, positional, flags)
    args = parse_command_args(command_parser(command, RaisingArgParser), words)
    if config_dict is not None:
        args.config_dict = config_dict
    return run_args(args)


def run_command(command: str, words: list[str]) -> RunResult:
    """Run `mimkit COMMAND WORDS...` (the words as typed on a command line) from Python; returns the RunResult."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}{suggest(command, list(COMMANDS))}")
    return run_args(parse_command_args(command_parser(command, RaisingArgParser), [str(w) for w in words]))


ConfigLike = Union[str, Path, dict, None]


def pretrain(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit pretrain` (MAE / LocalMIM, FreezeOut); flags as keywords, e.g. pretrain(epochs=1, output_dir='r')."""
    return call("pretrain", config, **flags)


def continual(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit continual`: a domain sequence with forgetting measured; e.g. continual(domains=['photos'])."""
    return call("continual", config, **flags)


def segment(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit segment`: UperNet on an MAE encoder; results hold mIoU and per-class IoU (%)."""
    return call("segment", config, **flags)


def incremental(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit incremental`: class-incremental learning; results hold the accuracy matrix, forgetting, BWT."""
    return call("incremental", config, **flags)


def linprobe(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit linprobe`: the official linear probe; e.g. linprobe(finetune=ckpt, data_path='digits')."""
    return call("linprobe", config, **flags)


def finetune(config: ConfigLike = None, /, **flags: Any) -> RunResult:
    """`mimkit finetune`: end-to-end fine-tuning; e.g. finetune(finetune=ckpt, data_path='digits')."""
    return call("finetune", config, **flags)


def knn(checkpoint: Union[str, Path, None] = None, /, **flags: Any) -> RunResult:
    """`mimkit knn`: k-NN accuracy of a frozen encoder; e.g. knn(ckpt, data_path='digits')."""
    return call("knn", **({"checkpoint": checkpoint} if checkpoint is not None else {}), **flags)


def rankme(checkpoint: Union[str, Path, None] = None, /, **flags: Any) -> RunResult:
    """`mimkit rankme`: effective rank of a frozen encoder's features; e.g. rankme(ckpt, data_path='photos')."""
    return call("rankme", **({"checkpoint": checkpoint} if checkpoint is not None else {}), **flags)


def stats(**flags: Any) -> RunResult:
    """`mimkit stats`: per-channel mean / std of a data set; results hold them, e.g. stats(data_path='photos')."""
    return call("stats", **flags)


def shards(src: Union[str, Path], out_dir: Union[str, Path], /, **flags: Any) -> RunResult:
    """`mimkit shards SRC OUT_DIR`: pack a data set into WebDataset shards; results hold each split's files."""
    return call("shards", src, out_dir, **flags)


def export(checkpoint: Union[str, Path], /, **flags: Any) -> RunResult:
    """`mimkit export CHECKPOINT`: e.g. export(ckpt, format='onnx'); output_dir is the file written."""
    return call("export", checkpoint, **flags)


def visualize(checkpoint: Union[str, Path], *images: Union[str, Path], **flags: Any) -> RunResult:
    """`mimkit visualize CHECKPOINT IMAGE...`: the reconstruction picture; output_dir is the PNG written."""
    return call("visualize", checkpoint, list(images), **flags)
