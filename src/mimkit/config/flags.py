"""Flags and the layered builder every command uses: its Flag table -> argparse, then the config of a run.

A command declares only its own table of `Flag`s (the official MAE / seeds' names and the config keys they set) and
its schema; `add_arguments` registers them with each default shown, and `config_from_args` builds the run's config
from the layers preset <- config file <- flags <- dotted overrides, with a starting checkpoint's architecture and a
classifier's --resume settings placed where DESIGN.md's precedence says. `check_rules` is the one shape of a
command's value table.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from mimkit.config import layers as C
from mimkit.errors import ConfigError, UserError, suggest


@dataclass
class Flag:
    """A familiar command-line flag and the config key it sets."""

    name: str
    key: str
    type: Any = str
    help: str = ""
    const: Any = None  # for store_const flags (value set when the flag is present)
    nargs: Optional[str] = None  # "?": the value is optional; given bare (value = const), only `enables` is set
    enables: Optional[str] = None  # a boolean key the flag also sets to true whenever it is given


def grad_checkpointing_value(text: str) -> Any:
    """--grad_checkpointing's value: true / false / a number of blocks."""
    t = text.strip().lower()
    if t in ("true", "all", "yes", "on"):
        return True
    if t in ("false", "no", "off", "none"):
        return False
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"--grad_checkpointing takes a number of blocks, true or false, not '{text}'")


# Memory switches of every command that trains transformer blocks (timm's name; torchtitan's strategy names).
GRAD_CKPT_FLAG = Flag("grad_checkpointing", "model.grad_checkpointing", grad_checkpointing_value,
                      "recompute block activations in backward to save memory: alone = every block, N = the first "
                      "N encoder blocks", nargs="?", const=True)
STRATEGY_FLAG = Flag("strategy", "distributed.strategy", str,
                     "ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, gradients and optimiser "
                     "state sharded over the ranks)")



# Run folder, schedule and optimiser flags every training command shares (official names).
TRAINING_FLAGS: list[Flag] = [
    Flag("output_dir", "misc.output_dir", str, "run folder (resumed when it holds a run); unset = a new "
         "runs/<command>/<timestamp>"),
    Flag("epochs", "schedule.epochs", int),
    Flag("warmup_epochs", "schedule.warmup_epochs", float),
    Flag("start_epoch", "schedule.start_epoch", int),
    Flag("batch_size", "optimization.batch_size", int, "per-device batch size"),
    Flag("accum_iter", "optimization.accum_iter", int, "gradient accumulation steps"),
    Flag("blr", "optimization.base_lr", float, "base lr: lr = blr * effective batch / 256"),
    Flag("lr", "optimization.lr", float, "absolute lr (overrides --blr)"),
    Flag("min_lr", "optimization.min_lr", float, "floor of the cosine schedule"),
    Flag("weight_decay", "optimization.weight_decay", float),
]


def str_list(text: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']: the type of list-valued word flags (--wandb_tags)."""
    return [v.strip() for v in str(text).strip("[]").split(",") if v.strip()]


# Experiment trackers beside TensorBoard, for every training command (seed 003's wandb names; engine/trackers.py).
TRACKING_FLAGS: list[Flag] = [
    Flag("log_wandb", "logging.wandb.enabled", None, "log to Weights & Biases (offline without a login)",
         const=True),
    Flag("wandb_project", "logging.wandb.project", str, "wandb project"),
    Flag("experiment_name", "logging.wandb.project", str, "wandb project (seed 003's name); same as --wandb_project"),
    Flag("wandb_run_name", "logging.wandb.run_name", str, "the run's name in wandb (and MLflow unless "
         "--mlflow_run_name); unset = the run folder's name"),
    Flag("wandb_entity", "logging.wandb.entity", str, "wandb team or user"),
    Flag("wandb_tags", "logging.wandb.tags", str_list, "comma-separated tags, e.g. mae,vit_base"),
    Flag("wandb_mode", "logging.wandb.mode", str, "online | offline | disabled; unset = $WANDB_MODE, else online "
         "with a login, offline without"),
    Flag("wandb_log_checkpoints", "logging.wandb.log_checkpoints", None, "upload checkpoints as wandb artifacts",
         const=True),
    Flag("log_mlflow", "logging.mlflow.tracking_uri", str, "log to MLflow; optional TRACKING_URI (any URI MLflow "
         "accepts); bare = $MLFLOW_TRACKING_URI or a sqlite store <output_dir>/mlflow.db", const=True,
         nargs="?", enables="logging.mlflow.enabled"),
    Flag("mlflow_experiment_name", "logging.mlflow.experiment_name", str, "MLflow experiment; unset = "
         "--wandb_project / --experiment_name, else mimkit"),
    Flag("mlflow_run_name", "logging.mlflow.run_name", str, "the run's name in MLflow; unset = --wandb_run_name, "
         "else the run folder's name"),
]


def add_arguments(p: argparse.ArgumentParser, flags: list[Flag], schema: type) -> None:
    """Register the config-file / override positionals and every flag, its help showing the default."""
    p.add_argument("items", nargs="*", metavar="CONFIG_OR_KEY=VALUE",
                   help="a YAML/JSON config file (or a preset under configs/, e.g. pretrain/mae_vit_base.yaml) "
                        "and dotted overrides such as optimization.base_lr=1.5e-4")
    p.add_argument("--config", default=None, help="config file (same as the positional)")
    defaults = OmegaConf.structured(schema)
    p.mimkit_schema = schema  # read by docs/gen_reference.py: the reference lists every key of the schema
    for f in flags:
        # every flag says the key it sets and that key's default, one way: 'sets KEY [to VALUE] (default: VALUE)'
        value = OmegaConf.select(defaults, f.key, default=None)
        default = "the model's own" if value is None and ".kwargs." in f.key else _show(value)
        text = f.help + "; " if f.help else ""
        if "default" in f.help:
            help_text = f"{text}sets {f.key}"
        elif f.const is not None:
            help_text = f"{text}sets {f.key} to {_show(f.const)} (default: {default})"
        else:
            help_text = f"{text}sets {f.key} (default: {default})"
        if f.nargs is not None:
            if f.enables:
                help_text = f"{text}sets {f.enables} to true, and {f.key} to the value when one is given " \
                            f"(default: {default})"
            elif f.const is not None:  # bare: the const; with a value: that value
                help_text = f"{text}sets {f.key} to {_show(f.const)} alone, or to the value given (default: {default})"
            action = p.add_argument(f"--{f.name}", dest=f.name, nargs=f.nargs, const=f.const, type=f.type,
                                    default=None, metavar=f.key.split(".")[-1].upper(), help=help_text)
        elif f.const is not None:
            action = p.add_argument(f"--{f.name}", dest=f.name, action="store_const", const=f.const, default=None,
                                    help=help_text)
        else:
            action = p.add_argument(f"--{f.name}", dest=f.name, type=f.type, default=None, help=help_text)
        action.config_key = f.key  # read by docs/gen_reference.py: the CLI reference's key column
    p.add_argument("--world_size", type=int, default=None, help="accepted for the official launch commands; "
                   "must equal the number of processes torchrun started")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log_dir", default=None, help="where TensorBoard writes, as in the official scripts; sets "
                   "logging.log_dir (default: <output_dir>/tb)")


def _show(value: Any) -> str:
    """A default as the user would type it (None -> none, True -> true)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)



def config_from_args(args: argparse.Namespace, flags: list[Flag], schema: type,
                     demo_preset: Optional[str] = None,
                     data_presets: Optional[dict[str, str]] = None,
                     builtin_presets: Optional[dict[str, str]] = None,
                     checkpoint_size: bool = False) -> DictConfig:
    """Layers: preset <- config file <- flags <- dotted overrides; validated before any work.

    The preset underneath: `demo_preset` when no layer names any data, else `data_presets[data_path]` (CPU-sized
    presets of the built-in sets) when no config file is given; `builtin_presets` (name -> preset, '*' for any
    other built-in set) when every data path given is a built-in set and neither a config file nor --model is
    given (built-in sets are demo data: the official ViT-L recipe is never built for them by default);
    cfg.misc.preset records which one applied. A
    starting checkpoint (model.init_from) gives its architecture above presets and the config file (its input size
    beneath the file), unless a flag names another model; a classifier's --resume gives its input size and pooling.
    With `checkpoint_size` (linprobe, finetune) the encoder checkpoint (model.finetune) gives its input size as k-NN
    takes it: above a preset (shipped or the data's), beneath the user's own config file, below --input_size.
    """
    files = [i for i in args.items if "=" not in i] + ([args.config] if args.config else [])
    overrides = [i for i in args.items if "=" in i]
    numbers = [f for f in files if _is_number(f)]
    if numbers:  # `--mean 0.5 0.4 0.3`: the values after the first land here
        raise ConfigError(f"stray value(s) {', '.join(numbers)}: a per-channel flag takes one comma-separated "
                          f"value, e.g. --mean 0.5,0.4,0.3 --std 0.2,0.2,0.2")
    if len(files) > 1:
        raise ConfigError(f"give at most one config file, got {', '.join(files)}")
    file_layers = [(files[0], C.load_file(files[0]))] if files else []
    config_dict = getattr(args, "config_dict", None)  # the Python API's config given as a dict: a config file
    if config_dict is not None:
        if files:
            raise ConfigError(f"give a config file ({files[0]}) or a config dict, not both")
        if not isinstance(config_dict, dict):
            raise ConfigError(f"the config must be a path or a dict, got {type(config_dict).__name__}")
        files, file_layers = ["config dict"], [("config dict", config_dict)]
    from_flags: dict = {}
    given: dict[str, tuple[str, Any]] = {}  # key -> (the flag that set it, value): two flags at odds are refused
    for f in flags:
        v = getattr(args, f.name, None)
        if v is not None:
            if f.key in given and given[f.key][1] != v:
                raise ConfigError(f"--{given[f.key][0]} and --{f.name} conflict (both set {f.key}); give one")
            given[f.key] = (f.name, v)
            if f.enables:
                _set_dotted(from_flags, f.enables, True)
            if not (f.enables and f.nargs == "?" and v == f.const):  # a bare switch sets only what it enables
                _set_dotted(from_flags, f.key, v)
    if getattr(args, "log_dir", None) is not None:  # every command with a `logging` section: TensorBoard there
        _set_dotted(from_flags, "logging.log_dir", args.log_dir)
    user = [("command-line flags", from_flags)] + ([("overrides", C.parse_dotlist(overrides))] if overrides else [])
    preset = None
    if demo_preset and not any(C._get(d, "data.data_path") for _, d in file_layers + user):
        preset = demo_preset
    elif not files:
        data = next((C._get(d, "data.data_path") for _, d in reversed(user) if C._get(d, "data.data_path")), None)
        preset = (data_presets or {}).get(str(data)) if data else None
        if preset is None and builtin_presets and _all_builtin(user) and not _named_model(user):
            preset = builtin_presets.get(str(data), builtin_presets.get("*"))
    below = [(preset, _preset_layer(preset, user))] if preset else []
    cfg = C.build_config(schema, below + file_layers + user)
    resume = OmegaConf.select(cfg, "misc.resume", default=None)
    if resume and OmegaConf.select(cfg, "model.finetune", default=_NO) is not _NO:
        below += _resume_layer(resume)
    above: list = []
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    if init_from:
        arch_below, above = _architecture_layers(init_from, user, cfg)
        below += arch_below
    finetune = OmegaConf.select(cfg, "model.finetune", default=None) if checkpoint_size and not resume else None
    if finetune and not any(C._get(d, "data.input_size") is not None for _, d in user):
        size_layer = _checkpoint_size_layer(finetune, user)
        own_file = bool(files) and config_dict is None and Path(files[0]).is_file()
        if own_file:
            below += size_layer
        else:
            above += size_layer
    if len(below) > (1 if preset else 0) or above:
        cfg = C.build_config(schema, below + file_layers + above + user)
    if "preset" in cfg.misc:
        OmegaConf.set_struct(cfg, False)
        cfg.misc.preset = preset
        OmegaConf.set_struct(cfg, True)
    if "logging" in cfg:  # a tracker asked for without its package: one line naming the extra, before any work
        from mimkit.engine.trackers import require_packages

        require_packages(cfg.logging)
    out = OmegaConf.select(cfg, "misc.output_dir", default=None)
    if getattr(args, "command", None) and out is not None:  # before any work: the folder is usable by this command
        from mimkit.config.layers import evaluating
        from mimkit.engine.runfolder import check_results_dir, check_run_dir

        if evaluating(cfg):  # --eval / --predict add their results to any run folder (runfolder.EVALUATIONS)
            check_results_dir(out)
        else:
            check_run_dir(out, args.command)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "world_size", None) not in (None, world):
        raise ConfigError(f"--world_size {args.world_size} but {world} process(es) were launched")
    return cfg


_NO = object()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _data_specs(user: list[tuple[str, dict]]) -> list[str]:
    """Every data path the user's layers name: data.data_path and continual.domains."""
    specs: list[str] = []
    for _, d in user:
        if C._get(d, "data.data_path"):
            specs.append(str(C._get(d, "data.data_path")))
        specs += [str(x) for x in (C._get(d, "continual.domains") or [])]
    return specs


def _all_builtin(user: list[tuple[str, dict]]) -> bool:
    """True when the user names data and every data path is a built-in set (an existing folder wins)."""
    from mimkit.data.builtin import is_builtin

    specs = _data_specs(user)
    return bool(specs) and all(is_builtin(s) and not Path(s).expanduser().exists() for s in specs)


def _named_model(user: list[tuple[str, dict]]) -> Optional[str]:
    """The model a flag or override names, if any."""
    return next((C._get(d, "model.type") for _, d in reversed(user) if C._get(d, "model.type")), None)


def _preset_layer(preset: str, user: list[tuple[str, dict]]) -> dict:
    """The preset's dict; its data (path or domain list) gives way to the data the user names."""
    data = C.load_file(preset)
    specs = _data_specs(user)
    if specs:
        (data.get("data") or {}).pop("data_path", None)
        cont = data.get("continual") or {}
        cont.pop("domains", None)
        if cont.get("eval_domains"):  # a domain the user trains on is no longer a held-out one
            cont["eval_domains"] = [d for d in cont["eval_domains"] if d not in specs]
    return data


def _architecture_layers(init_from: str, user: list[tuple[str, dict]], cfg: Optional[DictConfig] = None
                         ) -> tuple[list, list]:
    """(input-size layer for beneath the config file, model layer for above it) of a starting checkpoint.

    Empty when the checkpoint says nothing readable. When a flag / override names another model, the user's
    model is built with its own kwargs and input size, but the checkpoint's mean / std still lie beneath: the
    weights were trained on inputs normalised so (a config file or --mean / --std still win).
    """
    from mimkit.models.loading import architecture_of
    from mimkit.models.openmmlab import say_guess

    arch = architecture_of(init_from)
    if not arch:
        return [], []
    data = dict(arch.get("data") or {})
    named = next((C._get(d, "model.type") for _, d in reversed(user) if C._get(d, "model.type")), None)
    if named and not C.same_model(named, arch["model"]["type"]):
        norm = {k: data[k] for k in ("mean", "std") if data.get(k) is not None}
        return ([(f"normalisation of {init_from}", {"data": norm})] if norm else []), []
    # heads guessed from the width, unless the user's keys state them (they sit above this layer)
    say_guess(arch.get("heads_guess"), {k: next((C._get(d, f"model.kwargs.{k}") for _, d in user
                                                 if C._get(d, f"model.kwargs.{k}") is not None), None)
                                        for k in ("num_heads", "decoder_num_heads")})
    kw = arch["model"].get("kwargs") or {}
    if cfg is not None and "embed_dim" in kw and "decoder_embed_dim" not in kw:
        arch["model"] = _with_decoder_of(arch["model"], cfg)
    below = [(f"input size of {init_from}", {"data": data})] if data else []
    return below, [(C.ARCH_ORIGIN + str(init_from), {"model": arch["model"]})]


def _with_decoder_of(model: dict, cfg: DictConfig) -> dict:
    """An encoder-only checkpoint's architecture (an mmpretrain classifier) completed with the decoder the config
    so far describes (preset, file, flags): the checkpoint's sizes win for what it holds, the rest stays."""
    import torch

    from mimkit.models.loading import preset_for_kwargs
    from mimkit.models.registry import create_model

    try:
        with torch.device("meta"):
            ours = create_model(cfg.model.type, **OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    except (ConfigError, UserError, TypeError):
        return model  # a config the validator refuses later, in its own words
    if not hasattr(ours, "decoder_blocks") or not len(ours.decoder_blocks):
        return model
    blk = ours.decoder_blocks[0]
    kwargs = {**model["kwargs"], "decoder_embed_dim": ours.decoder_embed.out_features,
              "decoder_depth": len(ours.decoder_blocks), "decoder_num_heads": blk.attn.num_heads}
    if blk.mlp.fc1.out_features != kwargs["decoder_embed_dim"] * kwargs.get("mlp_ratio", 4.0):
        kwargs["decoder_mlp_ratio"] = blk.mlp.fc1.out_features / kwargs["decoder_embed_dim"]
    return {**model, "kwargs": kwargs, "type": preset_for_kwargs(kwargs)}


def _checkpoint_size_layer(checkpoint: str, user: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The input size an encoder checkpoint was trained at, as a layer (none when it says none or --model names
    another model, whose own size applies)."""
    from mimkit.errors import CheckpointError
    from mimkit.io import resolve_checkpoint
    from mimkit.models.loading import architecture_of

    try:
        arch = architecture_of(resolve_checkpoint(checkpoint))
    except CheckpointError:  # the task names what is wrong with the path, in one line
        return []
    size = ((arch or {}).get("data") or {}).get("input_size")
    named = _named_model(user)
    if size is None or (named and not C.same_model(named, arch["model"]["type"])):
        return []
    return [(f"input size of {checkpoint}", {"data": {"input_size": size}})]


def _resume_layer(resume: str) -> list[tuple[str, dict]]:
    """The input size and pooling a classifier checkpoint was trained with (for --eval / resuming at its size)."""
    from mimkit.engine.checkpoint import load_training_checkpoint
    from mimkit.errors import CheckpointError

    try:
        saved = load_training_checkpoint(resume).get("config") or {}
    except CheckpointError:
        if _is_openmmlab(resume):  # an MMSegmentation file for --eval / --predict: the task reads it
            return []
        raise
    layer: dict = {}
    if (saved.get("data") or {}).get("input_size") is not None:
        layer["data"] = {"input_size": saved["data"]["input_size"]}
    if (saved.get("model") or {}).get("global_pool") is not None:
        layer["model"] = {"global_pool": saved["model"]["global_pool"]}
    return [(f"training config of {resume}", layer)] if layer else []


def _is_openmmlab(path: str) -> bool:
    """True for an mmpretrain / MMSegmentation checkpoint (which says no mimkit training config)."""
    from mimkit.errors import CheckpointError
    from mimkit.io import load_checkpoint_file
    from mimkit.models.convert import extract_state_dict
    from mimkit.models.openmmlab import openmmlab_kind

    try:
        return openmmlab_kind(extract_state_dict(load_checkpoint_file(path))[0]) is not None
    except CheckpointError:
        return False


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def take_leftovers(args: Any, rest: list[str], options: list[str]) -> Optional[str]:
    """Words argparse left over: config files / `key=value` overrides go to args.items; an unknown flag (or a
    word a command does not take) comes back as one error line, with the closest flag when one is close."""
    bad = [r for r in rest if r.startswith("-")] or ([] if hasattr(args, "items") else rest)
    if bad:
        name = bad[0].split("=")[0]
        if not name.startswith("-"):
            return f"unrecognized argument: {bad[0]}"
        longer = sorted(o for o in options if o.startswith(name) and name.startswith("--"))
        if longer:  # an abbreviation: refused (it would silently mean another flag once one is added)
            return (f"unknown flag {name} (flags are not abbreviated: did you mean "
                    f"{' or '.join(longer[:3])}?)")
        close = suggest(name, options)
        return f"unknown flag {name}" + (f"; did you mean {close.split(chr(39))[1]}?" if close else "")
    if rest:
        args.items = list(args.items) + rest
    return None


def empty_value(p: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The first flag or positional given as an empty string (an unset shell variable), as one error line."""
    for a in p._actions:
        v = getattr(args, a.dest, None)
        if v == "" or (isinstance(v, list) and "" in v):
            name = a.option_strings[0] if a.option_strings else a.dest.upper()
            return f"{name} is empty (an unset shell variable?): give a value or leave it out"
    return None


def check_arg_values(p: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The first flag whose value breaks schema.ARG_CONSTRAINTS (sizes, counts, ratios), as one error line."""
    from mimkit.config.schema import ARG_CONSTRAINTS

    for a in p._actions:
        rule = ARG_CONSTRAINTS.get(a.dest)
        v = getattr(args, a.dest, None)
        if rule is None or v is None or not a.option_strings or isinstance(v, (bool, str, list)):
            continue
        ok, valid = rule
        if not ok(v):
            return f"bad value for {a.option_strings[0]}: {v!r} (must be {valid})"
    return None


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors: 'mimkit CMD: error: MSG' and a pointer to --help, exit 2 (no usage block)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag with its default)\n")


class _RaisingParser(ArgParser):
    """A parsing problem is a ConfigError (one line, exit 2 from the CLI), never an exit of the interpreter."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise ConfigError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None):  # noqa: D102 - argparse's hook
        raise ConfigError((message or f"{self.prog}: exit {status}").strip())


def parse_command(module: Any, command: str, argv: list[str], raising: bool = False) -> Any:
    """Parse `mimkit COMMAND ARGV` with the command module's own flags (for tasks that run another command);
    `raising`: a bad word raises ConfigError instead of exiting."""
    p = (_RaisingParser if raising else ArgParser)(prog=f"mimkit {command}", allow_abbrev=False)
    module.add_arguments(p)
    args, rest = p.parse_known_args(argv)
    problem = (take_leftovers(args, rest, [o for a in p._actions for o in a.option_strings])
               or empty_value(p, args) or check_arg_values(p, args))
    if problem:
        p.error(problem)
    args.command = command
    return args


def check_rules(cfg: Any, rules: Iterable[tuple[str, bool, str]]) -> None:
    """Raise ConfigError for the first (key, ok, what a valid value is) rule whose `ok` is false, naming the key."""
    for key, ok, valid in rules:
        if not ok:
            value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None
            raise ConfigError(f"bad value for '{key}': {value!r} (must be {valid})")
