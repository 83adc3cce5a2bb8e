"""Experiment trackers behind RunLogger: TensorBoard, Weights & Biases, MLflow. A fourth is one `Tracker` subclass.

Every backend receives the same records: scalars under a prefix ('train/loss' at a step), pictures, tables, the
resolved config as parameters, and (wandb only, when asked) checkpoints. Only rank 0 builds a RunLogger with
trackers, so other ranks never touch them. The wandb run id and the MLflow run id are kept in
<run_dir>/trackers.json, so a resumed run (same output folder) continues the same record, its steps continuing.

A tracker that cannot start, or fails while logging, is reported in one line and dropped: training goes on and
metrics.jsonl / TensorBoard keep everything.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

STATE_FILE = "trackers.json"  # the tracker run ids of a run folder
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # package -> the mimkit extra that installs it
WANDB_MODES = ("online", "offline", "disabled")
# how a run ended (engine.logging.run_status) -> wandb's exit code (RunInterrupted's 75, Ctrl-C's 130) / MLflow status
EXIT_CODES = {"finished": 0, "preempted": 75, "interrupted": 130, "failed": 1}
MLFLOW_STATUS = {"finished": "FINISHED", "preempted": "KILLED", "interrupted": "KILLED", "failed": "FAILED"}


class Tracker:
    """One backend. Subclasses override what their tool supports; the defaults do nothing."""

    name = "tracker"

    def log_config(self, config: dict) -> None:
        """The resolved config (nested dict) as the run's parameters."""

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """Scalars named '<prefix>/<key>' at `step` (the step continues across resumes)."""

    def log_image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) picture."""

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table: column names and rows of values."""

    def log_checkpoint(self, path: Path, name: str) -> None:
        """A checkpoint file or folder just written (most backends ignore it)."""

    def state(self) -> dict:
        """What to keep in trackers.json to continue this run later."""
        return {}

    def close(self, status: str = "finished") -> Optional[str]:
        """Finish as `status` says (finished, preempted, interrupted, failed: logging.run_status); may return one
        line for the console (how to upload an offline run)."""
        return None


# ------------------------------------------------------------------ TensorBoard
class TensorBoardTracker(Tracker):
    """TensorBoard event files in `log_dir` (the run's tb/ unless told otherwise)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def log_config(self, config: dict) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def log_image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, img_hwc, step, dataformats="HWC")

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        # TensorBoard has no table type: a Markdown table in the Text tab
        lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)

    def close(self, status: str = "finished") -> Optional[str]:
        self.writer.flush()
        self.writer.close()
        return None


# ------------------------------------------------------------------ Weights & Biases
class WandbTracker(Tracker):
    """A wandb run; offline when there is no login or no server, with the `wandb sync` command to upload later."""

    name = "wandb"

    def __init__(self, run_dir: Path, settings: Mapping, config: dict, saved: dict, say: Callable[[str], None],
                 default_name: str) -> None:
        import wandb

        self.wandb, self.say = wandb, say
        self.log_checkpoints = bool(settings.get("log_checkpoints"))
        mode, why = wandb_mode(settings.get("mode"))
        self.dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        project = settings.get("project") or os.environ.get("WANDB_PROJECT") or "mimkit"
        run_id = saved.get("id") or os.environ.get("WANDB_RUN_ID") or _new_id()
        kwargs = dict(project=project, entity=settings.get("entity") or None, dir=str(self.dir), id=run_id,
                      name=settings.get("run_name") or saved.get("name") or default_name,
                      tags=list(settings.get("tags") or []) or None, config=config, resume="allow",
                      reinit="create_new")
        # console capture off (log.txt has the console) and no code saving: the run folder stays small
        quiet = dict(console="off", save_code=False, silent=True)
        if mode == "online" and not _reachable(wandb):
            mode, why = "offline", "the wandb server is unreachable"
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, **quiet), **kwargs)
        except Exception as e:  # no login, server down mid-start, bad entity: never the end of a run
            if mode != "online":
                raise
            mode, why = "offline", f"wandb could not start online ({_one_line(e)})"
            self.run = wandb.init(mode=mode, settings=wandb.Settings(**quiet), **kwargs)
        self.mode = mode
        self._prefixes: set[str] = set()
        # wandb's own row counter (_step): an offline session starts it at 0 again, and a synced or resumed run
        # drops rows whose _step is not past the last one, so it is kept in trackers.json and continued here
        self._row = int(saved.get("row", 0))
        where = f"{project}/{self.run.id}"
        resumed = " (resumed)" if saved.get("id") else ""  # the id came from trackers.json: the same wandb run
        if mode == "offline":
            say(f"wandb: {why + '; ' if why else ''}logging offline ({where}){resumed}; upload later with: "
                f"{self.sync_command()}")
        else:
            say(f"wandb: logging to {self.run.url or where}{resumed}")

    def sync_command(self) -> str:
        """The command that uploads every offline session of this run id, oldest first."""
        return f"wandb sync {self.dir / 'wandb'}/offline-run-*-{self.run.id}"

    def _step_key(self, prefix: str) -> str:
        # each prefix has its own x-axis ('train/step', 'incremental/step'): wandb's own _step only grows, and
        # restarts in every offline session, so our step rides along as a metric
        key = f"{prefix}/step"
        if prefix not in self._prefixes:
            self._prefixes.add(prefix)
            self.run.define_metric(key)
            self.run.define_metric(f"{prefix}/*", step_metric=key)
        return key

    def _log(self, row: dict) -> None:
        self.run.log(row, step=self._row)
        self._row += 1

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        self._log({**{f"{prefix}/{k}": v for k, v in values.items()}, self._step_key(prefix): step})

    def log_image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        prefix = tag.split("/")[0] if "/" in tag else "media"
        self._log({tag if "/" in tag else f"media/{tag}": self.wandb.Image(img_hwc), self._step_key(prefix): step})

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        prefix = tag.split("/")[0] if "/" in tag else "tables"
        table = self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self._log({tag if "/" in tag else f"tables/{tag}": table, self._step_key(prefix): step})

    def log_checkpoint(self, path: Path, name: str) -> None:
        if not self.log_checkpoints:  # artifacts fill cluster storage (seed 004): only when asked
            return
        art = self.wandb.Artifact(f"checkpoints-{self.run.id}", type="model")
        (art.add_dir if path.is_dir() else art.add_file)(str(path))
        self.run.log_artifact(art, aliases=[name, "latest"])

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.run.project, "name": self.run.name, "mode": self.mode,
                "row": self._row}

    def close(self, status: str = "finished") -> Optional[str]:
        if status == "preempted":  # wandb shows the run as pre-empted (to be resumed), not crashed
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))
        return f"wandb: offline run {self.run.id}; upload with: {self.sync_command()}" if self.mode == "offline" \
            else None


def wandb_mode(flag: Optional[str]) -> tuple[str, str]:
    """(mode, why): --wandb_mode, else $WANDB_MODE, else online with a login and offline without one."""
    mode = flag or os.environ.get("WANDB_MODE") or ""
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode in ("offline", "disabled"):
        return mode, ""
    if not _has_login():
        return "offline", "no wandb login (WANDB_API_KEY or `wandb login`)"
    return "online", ""


def _has_login() -> bool:
    """A wandb API key in the environment or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(wandb: Any, timeout: float = 5.0) -> bool:
    """Can a TCP connection to the wandb server open within `timeout` s? (So online never waits on a dead net.)"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ MLflow
class MlflowTracker(Tracker):
    """An MLflow run: metrics with steps, the config as params, pictures and tables as artifacts."""

    name = "mlflow"
    MAX_PARAM = 6000  # MLflow's param value limit (characters)

    def __init__(self, run_dir: Path, settings: Mapping, config: dict, saved: dict, say: Callable[[str], None],
                 default_name: str) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        uri = settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.uri = uri
        _create_sqlite_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        name = settings.get("experiment_name") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mimkit"
        run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            resumed = " (resumed)"
        else:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                exp_id = self.client.create_experiment(name, artifact_location=_artifact_root(uri))
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=settings.get("run_name") or default_name,
                                         tags={"mimkit.run_dir": str(run_dir.resolve())})
            self.run_id, resumed = run.info.run_id, ""
        say(f"mlflow: logging to {uri}, experiment {name}, run {self.run_id}{resumed}")

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        # a param is immutable in MLflow: a resumed run with a changed value keeps the first and notes the new one
        params, changed = [], {}
        for k, v in _flatten(config).items():
            text = _param(v)[: self.MAX_PARAM]
            if k not in have:
                params.append(Param(k, text))
            elif have[k] != text:
                changed[f"resumed.{k}"] = text
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        for k, v in changed.items():
            self.client.set_tag(self.run_id, k, v)

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, int(step))
                                                    for k, v in values.items()])

    def log_image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, np.asarray(img_hwc), artifact_file=f"{tag}/step_{step:08d}.png")

    def log_table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        data = {c: [_jsonable(r[i]) for r in rows] for i, c in enumerate(columns)}
        self.client.log_dict(self.run_id, {"step": step, "columns": list(columns), "data": data},
                             f"tables/{tag}/step_{step:08d}.json")

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self, status: str = "finished") -> Optional[str]:
        # a pre-empted run is KILLED until the rerun continues it (back to RUNNING, then FINISHED)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))
        return None


def _create_sqlite_store(uri: str) -> None:
    """A new local sqlite store made with its artifact root beside the database: MLflow's client would create it
    with the Default experiment's artifacts in ./mlruns/0 of whatever folder the command ran from."""
    root = _artifact_root(uri)
    if root is None or Path(uri[len("sqlite:///"):]).exists():
        return
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, root)
    except Exception:  # another mlflow layout: the client creates the store as before (Default in ./mlruns)
        pass


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside a local sqlite / file store (MLflow would use ./mlruns of the current folder); None = the
    server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        return None
    return None


# ------------------------------------------------------------------ opening
def require_packages(logging_cfg: Mapping) -> None:
    """Before any work: a tracker asked for whose package is missing is one line naming the extra to install."""
    from mimkit.errors import ConfigError

    for name, section in (("wandb", _section(logging_cfg, "wandb")), ("mlflow", _section(logging_cfg, "mlflow"))):
        if section.get("enabled") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.{name}.enabled needs the {name} package: pip install 'mimkit[{EXTRAS[name]}]'")


def open_trackers(run_dir: Path, logging_cfg: Mapping, config: Optional[dict], say: Callable[[str], None],
                  tensorboard_dir: Optional[Path] = None) -> list[Tracker]:
    """The backends `logging_cfg` enables, each continuing the run recorded in <run_dir>/trackers.json.

    A backend that cannot start is one line through `say`; the run goes on without it.
    """
    trackers: list[Tracker] = []
    if logging_cfg.get("tensorboard", True):
        trackers.append(TensorBoardTracker(tensorboard_dir or run_dir / "tb"))
    saved = read_state(run_dir)
    default_name = run_dir.resolve().name
    for name, cls in (("wandb", WandbTracker), ("mlflow", MlflowTracker)):
        section = _section(logging_cfg, name)
        if not section.get("enabled"):
            continue
        if name == "mlflow":  # MLflow's experiment and run names are wandb's unless set
            wb = _section(logging_cfg, "wandb")
            section = {**section, "experiment_name": section.get("experiment_name") or wb.get("project"),
                       "run_name": section.get("run_name") or wb.get("run_name")}
        if name == "wandb" and wandb_mode(section.get("mode"))[0] == "disabled":
            say("wandb: disabled (wandb mode disabled); nothing is sent")
            continue
        try:
            trackers.append(cls(run_dir, section, config or {}, saved.get(name) or {}, say, default_name))
        except Exception as e:  # an unwritable store, a bad URI: report, train on
            say(f"{name}: cannot start ({_one_line(e)}); training goes on without it "
                f"(metrics.jsonl and TensorBoard keep everything)")
    write_state(run_dir, trackers)
    return trackers


def read_state(run_dir: Path) -> dict:
    """The tracker ids recorded in a run folder ({} for a new run)."""
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, trackers: Iterable[Tracker]) -> None:
    """Record each tracker's run id so a resume continues the same runs (ids of trackers not used now are kept)."""
    state = read_state(run_dir)
    fresh = {t.name: t.state() for t in trackers if t.state()}
    if not fresh:
        return
    state.update(fresh)
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def _section(cfg: Mapping, name: str) -> Mapping:
    value = cfg.get(name) if hasattr(cfg, "get") else None
    return value if value is not None else {}


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _param(v: Any) -> str:
    """A config value as MLflow stores params: text (lists and None as YAML would show them)."""
    if v is None:
        return "None"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _jsonable(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _new_id() -> str:
    """A fresh run id as wandb makes them: 8 characters of [a-z0-9]."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _quiet_mlflow() -> None:
    """MLflow and alembic announce each table they create at INFO: keep the console to mimkit's own lines."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
