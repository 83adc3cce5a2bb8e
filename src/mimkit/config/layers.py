"""Config layers: files and presets read, merged over a schema, validated; run folders named.

Layers, later wins: schema defaults <- demo preset (only when no data path is given anywhere)
<- config file <- command-line flags <- `section.key=value` overrides. The section layout is seed 001's
(`model / optimization / schedule / data / checkpointing / logging / misc`), so its JSON files load as they are.

One model name is one architecture: `model.kwargs` belong to the `model.type` named beside them, so a layer that
names another model drops the kwargs of the layers beneath it (a preset's kwargs never apply under a user's
`--model`), and a layer taken from a checkpoint (origin starting with ARCH_ORIGIN) replaces them whole.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mimkit.config.schema import CONSTRAINTS
from mimkit.errors import ConfigError, suggest

PRESET_DIR = Path(__file__).parent.parent / "configs"
ARCH_ORIGIN = "architecture of "  # origin of a layer read from a checkpoint: a complete model.type + model.kwargs
RUNS_DIR = "runs"  # default run folders: runs/<command>/<timestamp>
# What the running command wrote, its run folder first: how the Python API hands back a run's folder and results.
_OUTPUTS: ContextVar[Optional[list]] = ContextVar("mimkit_outputs", default=None)


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not full.endswith("kwargs"):
            keys.extend(_all_keys(node, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        keys = _all_keys(schema)
        hint = suggest(str(key), keys)
        leaf = [k for k in keys if k.rsplit(".", 1)[-1] == str(key).rsplit(".", 1)[-1] and k != str(key)]
        if not hint and leaf:  # the right name in the wrong section (a flat dict): name the section it lives in
            hint = f" (did you mean '{leaf[0]}'?)"
        return ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{origin}: bad value for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]} (key '{key}')")


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a plain dict; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        preset = PRESET_DIR / path
        if preset.is_file():
            p = preset
        else:
            shipped = [str(f.relative_to(PRESET_DIR)) for f in PRESET_DIR.rglob("*") if f.suffix in (".yaml", ".json")]
            raise ConfigError(f"config file not found: {path}{suggest(str(path), shipped)}")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if data is None:  # a zero-byte file (or one of comments): likely a failed copy, never silently the defaults
        raise ConfigError(f"config file {p} is empty: give its settings, or leave the file out")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return _strip_seed001_extras(data)


def _strip_seed001_extras(data: dict) -> dict:
    # seed 001's JSON spells the augmentation block as "{...}" in its docs; an empty dict is fine, and
    # "misc.resume" may be "" (meaning none), as in the official repo's argparse default.
    misc = data.get("misc")
    if isinstance(misc, dict) and misc.get("resume") == "":
        misc["resume"] = None
    return data


def parse_dotlist(items: list[str]) -> dict:
    """`a.b=1` items -> nested dict, values parsed as YAML scalars/lists."""
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like section.key=value")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def build_config(
    schema: type,
    layers: list[tuple[str, dict]],
    demo_preset: Optional[str] = None,
) -> DictConfig:
    """Merge `layers` (origin, dict) over the schema's defaults, check every key, type and value.

    When `demo_preset` is given and no layer sets data.data_path, that preset is merged first.
    """
    schema_cfg = OmegaConf.structured(schema)
    if demo_preset and not any(_get(d, "data.data_path") for _, d in layers):
        layers = [(demo_preset, load_file(demo_preset))] + layers
    cfg = schema_cfg
    for origin, data in layers:
        for k, v in data.items():  # `model: 5` in a file: name the section, not '?'
            if k in schema_cfg and isinstance(schema_cfg._get_node(k), DictConfig) and not isinstance(v, dict):
                raise ConfigError(f"{origin}: '{k}' must be a section (a mapping of keys such as {k}.KEY), "
                                  f"got {v!r}")
        try:
            if _replaces_kwargs(cfg, data, origin):
                cfg.model.kwargs = {}
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _explain(e, schema_cfg, origin) from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _replaces_kwargs(cfg: DictConfig, data: dict, origin: str) -> bool:
    """True when `data` names a model other than cfg's (or is a checkpoint's architecture): kwargs start over."""
    new = _get(data, "model.type")
    if not new or "model" not in cfg or "kwargs" not in cfg.model:
        return False
    return origin.startswith(ARCH_ORIGIN) or not same_model(OmegaConf.select(cfg, "model.type"), new)


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Do two model names (aliases resolved) name the same registered builder?"""
    from mimkit.models.registry import same_model as _same

    return _same(a, b)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """Check value constraints and cross-field rules; raise ConfigError naming the key."""
    for key, (ok, valid) in CONSTRAINTS.items():
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            continue  # a key of another command's schema: each command's config holds the keys it uses
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException:
            continue
        if key.startswith("freezeout.") and "freezeout" not in cfg:
            continue
        if not ok(value):
            raise ConfigError(f"bad value for '{key}': {value!r} (must be {valid})")
    model = cfg.get("model") if "model" in cfg else None
    if isinstance(model, DictConfig) and "mask_ratio" in model and "loss_mode" in model:
        if model.mask_ratio == 0 and model.loss_mode == "masked_only":  # nothing masked: the loss is identically 0
            raise ConfigError("bad value for 'model.mask_ratio': 0 with model.loss_mode masked_only leaves no "
                              "patch to reconstruct (the loss is always 0); raise --mask_ratio or give "
                              "--loss_mode all_pixels")
    if (OmegaConf.select(cfg, "distributed.strategy", default=None) == "fsdp"
            and OmegaConf.select(cfg, "optimization.on_nonfinite", default=None) == "rollback"
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):  # (one process under fsdp shards nothing: it can)
        raise ConfigError("optimization.on_nonfinite=rollback is not available under --strategy fsdp over several "
                          "processes; use stop or skip (a stopped run resumes from its last sharded checkpoint)")
    if "data" in cfg:
        size = input_size(cfg)
        if any(s < 1 for s in size):
            raise ConfigError(f"bad value for 'data.input_size': {size} (must be positive)")
        aug = cfg.data.augmentation
        if "crop_scale_min" in aug and aug.crop_scale_min > aug.crop_scale_max:
            raise ConfigError("data.augmentation.crop_scale_min must not exceed crop_scale_max")


def input_size(cfg: DictConfig) -> tuple[int, int]:
    """data.input_size as an (H, W) pair."""
    v = cfg.data.input_size
    if isinstance(v, (list, tuple, ListConfig)):
        if len(v) != 2 or not all(isinstance(x, int) for x in v):
            raise ConfigError(f"bad value for 'data.input_size': {list(v)} (an int or [H, W])")
        return int(v[0]), int(v[1])
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"bad value for 'data.input_size': {v!r} (an int or [H, W])")
    return v, v


def new_run_dir(command: str, root: str | Path = RUNS_DIR) -> Path:
    """Create and return a fresh `root/<command>/<YYYY-mm-dd_HH-MM-SS>` (suffixed -2, -3, ... when taken)."""
    base = Path(root) / command
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base / stamp, 2
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            path, n = base / f"{stamp}-{n}", n + 1


def evaluating(cfg: DictConfig) -> bool:
    """Whether the config asks for an evaluation of a checkpoint (misc.eval / misc.predict), not a training run."""
    return bool(OmegaConf.select(cfg, "misc.eval", default=None) or OmegaConf.select(cfg, "misc.predict",
                                                                                      default=None))


def resolve_output_dir(cfg: DictConfig, command: str) -> str:
    """cfg.misc.output_dir, first set to a new runs/<command>/<timestamp> when unset (the one default scheme).

    The folder is claimed for this run of `command` (engine/runfolder.py): another command's folder, or one a live
    process holds, is refused in one line; the lock is held until the run ends. An evaluation (--eval, --predict)
    only checks that it can write there: it adds its results to any run folder (runfolder.EVALUATIONS).

    An explicit folder is kept as it is (training commands resume from it); a default one is always new, so no
    run ever writes over an earlier one. Under torchrun rank 0 picks the folder and the other ranks receive it.
    """
    import torch.distributed as tdist

    from mimkit.engine import runfolder

    main = int(os.environ.get("RANK", "0")) == 0
    visiting = evaluating(cfg)  # --eval / --predict: results added to the folder, no record and no lock taken
    if cfg.misc.output_dir:
        if visiting:
            runfolder.check_results_dir(cfg.misc.output_dir)
        elif main:  # under torchrun only rank 0 holds the folder's lock
            runfolder.claim(cfg.misc.output_dir, command)
        note_output(cfg.misc.output_dir)
        return cfg.misc.output_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (tdist.is_available() and tdist.is_initialized()):
        raise ConfigError(f"give --output_dir when launching mimkit {command} with torchrun: every process must "
                          "write to the same folder")
    new = (new_run_dir(command) if visiting else runfolder.claim(new_run_dir(command), command)) if main else None
    path = [str(new) if new is not None else None]
    if tdist.is_available() and tdist.is_initialized():
        tdist.broadcast_object_list(path, src=0)
    OmegaConf.set_struct(cfg, False)
    cfg.misc.output_dir = path[0]
    OmegaConf.set_struct(cfg, True)
    note_output(path[0])
    return path[0]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict:
    """Plain nested dict (for checkpoints and results files)."""
    return OmegaConf.to_container(cfg, resolve=True)


def float_list(text: str) -> list[float]:
    """'0.5,0.4,0.3' (or one number) -> [0.5, 0.4, 0.3]: the type of the --mean / --std flags."""
    import argparse

    try:
        return [float(v) for v in str(text).replace(" ", "").strip("[]").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}")


def note_output(path: str | Path) -> None:
    """Record a folder or file the running command writes (the Python API returns the first one noted)."""
    seen = _OUTPUTS.get()
    if seen is not None:
        seen.append(Path(path))


def note_results(results: dict) -> None:
    """Hand the running command's results to the Python API when it writes no results file (pretrain, stats)."""
    seen = _OUTPUTS.get()
    if seen is not None:
        seen.append(dict(results))


@contextmanager
def recording_outputs() -> Iterator[list[Path]]:
    """Collect what note_output records while the block runs (nested runs add to the outer list)."""
    outer = _OUTPUTS.get()
    if outer is not None:
        yield outer
        return
    token = _OUTPUTS.set([])
    try:
        yield _OUTPUTS.get()
    finally:
        _OUTPUTS.reset(token)
