"""Run logging: console progress (tqdm on a terminal, sparse lines otherwise), log.txt, metrics.jsonl, and the
experiment trackers of engine/trackers.py (TensorBoard, wandb, MLflow), which every record fans out to."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

LOGGER_NAME = "mimkit"


class _Console(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout is now, not the one of the moment it was made: a program (or pytest,
    or wandb's console capture) that swaps stdout and later closes the old one must not break our logging."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    """The package logger (console handler added once)."""
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        h = _Console()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class _EarlyNotes(logging.Handler):
    """Warnings said before a run's log.txt exists (a guessed architecture while the config is built), kept for
    the first run logger to write into its log.txt."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.taken = False  # a run logger of this command has opened its log.txt (it gets later records itself)

    def emit(self, record: logging.LogRecord) -> None:
        # Not "is any FileHandler attached": a handler another run left behind in this process must not swallow
        # this command's notes.
        if not self.taken:
            self.records = (self.records + [record])[-50:]


_EARLY: list[_EarlyNotes] = []


@contextlib.contextmanager
def early_notes():
    """Within (one command): warnings said before its run logger opens also reach the run's log.txt."""
    h = _EarlyNotes()
    log = get_logger()
    log.addHandler(h)
    _EARLY.append(h)
    try:
        yield
    finally:
        _EARLY.remove(h)
        log.removeHandler(h)


class SmoothedValue:
    """Exponential moving average of a scalar, for the smoothed loss."""

    def __init__(self, beta: float = 0.98) -> None:
        self.beta, self.avg, self.n = beta, 0.0, 0

    def update(self, v: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * v
        return self.avg / (1 - self.beta**self.n)


class RunLogger:
    """Everything a run reports goes through here; only rank 0 writes files."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, print_freq: int = 100,
                 tracking: Optional[Mapping] = None, config: Optional[dict] = None,
                 parent: Optional["RunLogger"] = None, parent_prefix: str = "") -> None:
        """`tracking`: the config's logging section (tensorboard, wandb, mlflow); `config`: the resolved config the
        trackers record as parameters. Without `tracking`, TensorBoard alone as `tensorboard` says. `parent`: a
        run this one is part of (a continual stage): every record also goes to the parent's trackers, its names
        under `parent_prefix`, so one wandb / MLflow run holds the whole sequence."""
        self.run_dir = Path(run_dir)
        self.parent, self.parent_prefix = parent, parent_prefix
        log_dir = tracking.get("log_dir") if tracking is not None else None
        self.tb_dir = Path(log_dir) if log_dir else self.run_dir / "tb"  # --log_dir, as the official scripts
        self.enabled = enabled
        self.print_freq = max(1, print_freq)
        self.log = get_logger()
        self.tty = sys.stdout.isatty()
        self.metrics_file = None
        self.trackers: list = []
        self.log_path = self.run_dir / "log.txt"
        self._file_handler = None
        self._bar = None
        # whole-run timing: set by start_run; the estimate is printed once, after ESTIMATE_AFTER timed iterations
        self.slow_hint: str | None = None  # a task's advice, shown when the estimate runs to hours on a CPU
        # (n, what): the run is one of n similar runs still to come (continual stages); the estimate says the total
        self.also_estimate: tuple[int, str] | None = None
        # iterations of the fits still to come after this one in the same run (incremental's later tasks):
        # the estimate and the run ETA count them too, at this fit's time per iteration
        self.later_iters = 0
        # what this fit's own iterations are ("this task (2 of 5)"); with later_label (what they and later_iters add
        # up to, "the 4 tasks still to train") the estimate says this fit's time, and the total once per run
        self.scope = "the whole run"
        self.later_label: str | None = None
        self._later_said = False
        self.device_type = "cpu"
        self._run_left = None
        self._run_seen = 0
        self._run_t1 = None
        self._estimated = False
        # per-epoch timing for the refined estimate: the epoch under way and the ones finished in this run
        self._epoch_now: Optional[dict] = None
        self._epochs_timed: list[dict] = []
        self._refined = False
        if not enabled:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file_handler = logging.FileHandler(self.log_path)
        except OSError as e:
            from mimkit.errors import UserError

            raise UserError(f"cannot write to the output folder {self.run_dir}: {e.strerror or e}; "
                            "choose a writable --output_dir") from None
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._file_handler.setLevel(logging.INFO)
        # Everything under the package logger (data warnings naming a skipped file too) lands in log.txt.
        for early in _EARLY:  # and what was said before the run folder existed
            for record in early.records:
                self._file_handler.handle(record)
            early.records.clear()
            early.taken = True
        self.log.addHandler(self._file_handler)
        self.file_log = logging.getLogger(f"{LOGGER_NAME}.fileonly.{id(self)}")
        self.file_log.addHandler(self._file_handler)
        self.file_log.setLevel(logging.INFO)
        self.file_log.propagate = False
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from mimkit.engine import trackers as T

        tracking = tracking if tracking is not None else {"tensorboard": tensorboard}
        self.trackers = T.open_trackers(self.run_dir, tracking, config, self.info, tensorboard_dir=self.tb_dir)
        if config is not None:
            self._each("log_config", config)

    def _each(self, method: str, *args: Any) -> None:
        """Call one method on every tracker; a tracker that fails is reported once and dropped (the run goes on)."""
        if self.parent is not None and method != "log_config":
            # the parent's own trackers only (not TensorBoard: this stage has its own tb/), names under the prefix
            name = f"{self.parent_prefix}/{args[0]}" if method in ("log_scalars", "log_image", "log_table") \
                else args[0]
            self.parent._each_shared(method, name, *args[1:])
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a full disk, a store gone away: metrics.jsonl still has the record
                self.trackers.remove(t)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                self.info(f"{t.name}: stopped logging ({first}); metrics.jsonl keeps every record")

    def _each_shared(self, method: str, *args: Any) -> None:
        """A child run's record into this run's trackers other than TensorBoard (the child writes its own tb/)."""
        tb = [t for t in self.trackers if t.name == "tensorboard"]
        self.trackers = [t for t in self.trackers if t.name != "tensorboard"]
        try:
            self._each(method, *args)
        finally:
            self.trackers = tb + self.trackers

    @property
    def tb(self):
        """The TensorBoard writer, if TensorBoard is on (for callers that add their own summaries)."""
        return next((t.writer for t in self.trackers if t.name == "tensorboard"), None)

    # -------------------------------------------------------------- text
    def info(self, msg: str) -> None:
        """A line on the console and in log.txt."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
            self.file_log.info(msg)
        else:
            self.log.info(msg)

    def file_only(self, msg: str) -> None:
        """A line in log.txt only."""
        if self.enabled:
            self.file_log.info(msg)

    # -------------------------------------------------------------- progress
    ESTIMATE_AFTER = 3  # iterations timed (after the first, which pays for start-up) before the estimate

    def start_run(self, iters_left: int, device_type: str = "cpu") -> None:
        """The run has `iters_left` iterations to go: time the first few, print the whole run's estimate; refine it
        after the second epoch, counting each epoch's start-up (workers, the first batch), evaluation and
        checkpoints as measured on that epoch."""
        self._run_left, self.device_type = max(0, iters_left), device_type
        self._run_seen, self._run_t1, self._estimated = 0, None, False
        self._epoch_now, self._epochs_timed, self._refined = None, [], False
        self._run_t0 = time.perf_counter()

    def run_eta(self) -> float | None:
        """Seconds left in the whole run, from the mean iteration time since the first; None before it is known."""
        if self._run_left is None or self._run_t1 is None or self._run_seen < 2:
            return None
        per_iter = (time.perf_counter() - self._run_t1) / (self._run_seen - 1)
        return per_iter * (max(0, self._run_left - self._run_seen) + self.later_iters)

    def _tick_run(self) -> None:
        if self._run_left is None:
            return
        self._run_seen += 1
        now = time.perf_counter()
        if self._run_seen == 1:
            self._run_t1 = now
        ep = self._epoch_now
        if ep is not None:  # the epoch's first and last iteration times: its steady pace, apart from its start-up
            ep["ticks"] += 1
            ep["t_first"] = ep["t_first"] if ep["ticks"] > 1 else now
            ep["t_last"] = now
        if self._estimated:
            return
        short = self._run_left <= 1 + self.ESTIMATE_AFTER  # too short to time a few iterations first: every run
        if short and self._run_seen == 1:  # gets an estimate, a short one from its first iteration (start-up too)
            per_iter = time.perf_counter() - self._run_t0
            how = "timed on the first iteration, start-up included"
        elif not short and self._run_seen == 1 + self.ESTIMATE_AFTER:
            per_iter = (time.perf_counter() - self._run_t1) / self.ESTIMATE_AFTER
            how = f"timed over iterations 2-{1 + self.ESTIMATE_AFTER}"
        else:
            return
        self._estimated = True
        n_iters = self._run_left + (0 if self.later_label else self.later_iters)
        total = per_iter * n_iters
        iters = f"{n_iters:,} iteration{'s' if n_iters > 1 else ''}"
        later = (f"; refined after epoch {self._epoch + 2} with each epoch's start-up and evaluation"
                 if self._run_left > 2 * max(self._iters, 1) else "")
        self.info(f"estimated time of {self.scope}: {_duration_or_less(total)} ({iters} at {per_iter:.3g} s each, "
                  f"{how}{later})")
        self._record_estimate(total, total, "iterations")
        if self.later_label and self.later_iters and not self._later_said:
            self._later_said = True
            all_iters = n_iters + self.later_iters
            both = _duration_or_less(per_iter * all_iters)
            self.info(f"estimated time of {self.later_label}: {both if both.startswith('under') else 'at least ' + both} "
                      f"({all_iters:,} iterations at this one's {per_iter:.3g} s; later ones grow (replay, a wider "
                      "head, a teacher) and evaluation between them is not counted)")
        if self.also_estimate and self.also_estimate[0] > 1:
            n, what = self.also_estimate
            total *= n
            self.info(f"estimated time of {n} {what}: {_duration_or_less(total)}")
        if total > 3600 and self.device_type == "cpu" and self.slow_hint:
            self.info(f"that is hours on a CPU: {self.slow_hint}")

    TIMING = "timing record: "  # log.txt lines benchmarks/estimates.py reads (metrics.jsonl keeps training records)

    def _record_estimate(self, total: float, left: float, basis: str) -> None:
        """The estimate in seconds, a log.txt line (benchmarks/estimates.py compares it with the run's time)."""
        elapsed = time.perf_counter() - self._run_t0
        self.file_only(self.TIMING + json.dumps({"kind": "estimate", "basis": basis, "total_s": round(total, 3),
                                                  "left_s": round(left, 3), "elapsed_s": round(elapsed, 3)}))

    def _epoch_timed(self, now: float) -> None:
        """The epoch under way ended (the next one starts, or the run closes): keep its wall time and pace."""
        ep, self._epoch_now = self._epoch_now, None
        if ep is None or not ep["ticks"]:
            return
        ep["wall"] = now - ep["t0"]  # its iterations, start-up, summary, end-of-epoch hooks and checkpoint
        self._epochs_timed.append(ep)
        if len(self._epochs_timed) >= 2 and not self._refined and self._run_left:
            self._refine(now)

    def _refine(self, now: float) -> None:
        """The whole run's estimate from the last finished epoch (the first paid for one-time start-up): its steady
        time per iteration, and the rest of its wall time (loader start-up, evaluation, pictures, checkpoint) once
        for every epoch still to start."""
        ep = self._epochs_timed[-1]
        n = ep["ticks"]
        per_iter = (ep["t_last"] - ep["t_first"]) / (n - 1) if n > 1 else ep["wall"]
        per_epoch = max(0.0, ep["wall"] - n * per_iter)
        iters_left = max(0, self._run_left - self._run_seen) + (0 if self.later_label else self.later_iters)
        epochs_left = math.ceil(iters_left / max(ep["iters"], 1))
        left = iters_left * per_iter + epochs_left * per_epoch
        total = now - self._run_t0 + left
        self._refined = True
        self.info(f"estimated time of {self.scope}, refined after epoch {ep['epoch'] + 1}: {_duration_or_less(total)}"
                  f" ({format_duration(left)} left: {iters_left:,} iterations at {per_iter:.3g} s and {epochs_left:,}"
                  f" epoch start(s) at {per_epoch:.3g} s for the data loader, evaluation and checkpoints)")
        self._record_estimate(total, left, "epochs")

    def start_epoch(self, epoch: int, total_iters: int, initial: int = 0) -> None:
        """Begin the per-epoch progress display."""
        self._t0 = time.perf_counter()
        if self._run_left is not None:
            self._epoch_timed(self._t0)
            self._epoch_now = {"epoch": epoch, "iters": total_iters, "t0": self._t0, "ticks": 0}
        self._iters = total_iters
        self._epoch = epoch
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iters, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True, leave=True)

    def progress(self, it: int, fields: dict[str, float]) -> None:
        """Update the bar (terminal) or print a line every print_freq iterations (CI, files)."""
        if not self.enabled:
            return
        self._tick_run()
        run_eta = self.run_eta()
        if self._bar is not None:
            self._bar.update(1)
            post = {k: _fmt(v) for k, v in fields.items()}
            if run_eta is not None:
                post["run_eta"] = format_duration(run_eta)
            self._bar.set_postfix(post, refresh=False)
        elif it % self.print_freq == 0 or it == self._iters - 1:
            done = it + 1
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self._iters - done)
            text = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            run = f"  run eta {format_duration(run_eta)}" if run_eta is not None else ""
            self.info(f"epoch {self._epoch} [{done}/{self._iters}] {text}  epoch eta {format_duration(eta)}{run}")

    def end_epoch(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -------------------------------------------------------------- machine-readable
    def metrics(self, record: dict[str, Any], step: int, tb_prefix: str = "train") -> None:
        """One JSON line in metrics.jsonl; the numeric fields as '<tb_prefix>/<key>' scalars in every tracker."""
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(_jsonable(record)) + "\n")
        scalars = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items() if k not in ("epoch", "step")}
        scalars = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self._each("log_scalars", tb_prefix, scalars, step)

    def image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) image into every tracker."""
        if self.enabled:
            self._each("log_image", tag, img_hwc, step)

    def table(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (column names, rows of values) into every tracker: a wandb Table, an MLflow JSON artifact, a
        Markdown table in TensorBoard's Text tab."""
        if self.enabled:
            self._each("log_table", tag, list(columns), [list(r) for r in rows], step)

    def checkpoint_saved(self, path: Path, name: str) -> None:
        """A checkpoint was written (wandb uploads it as an artifact only with logging.wandb.log_checkpoints)."""
        if self.enabled:
            self._each("log_checkpoint", Path(path), name)

    def close(self, status: Optional[str] = None) -> None:
        """Flush and close files and trackers. `status` (see run_status): finished, preempted (a signal stop that
        a rerun resumes), interrupted or failed; None = from the exception being handled, as in the `finally`
        every task closes its logger in, so a SIGTERM'd run is never recorded as finished."""
        self.end_epoch()
        if not self.enabled:
            return
        if status is None:
            status = run_status(sys.exc_info()[1])
        if self._run_left is not None and self._file_handler is not None:
            # the run's measured time, beside its estimates (benchmarks/estimates.py)
            self.file_only(self.TIMING + json.dumps({"kind": "run_time", "status": status, "seconds": round(
                time.perf_counter() - self._run_t0, 3), "iterations": self._run_seen}))
        from mimkit.engine.trackers import write_state

        try:  # the rows logged so far, so a resumed run continues wandb's row counter
            write_state(self.run_dir, self.trackers)
        except OSError:
            pass
        for t in self.trackers:
            try:
                line = t.close(status)
            except Exception as e:  # closing must never lose the files written so far
                line = f"{t.name}: could not finish cleanly ({str(e).strip()[:200]})"
            if line:
                self.info(line)
        self.trackers = []
        if self.metrics_file:
            self.metrics_file.close()
        if self._file_handler:
            self.log.removeHandler(self._file_handler)
            self.file_log.removeHandler(self._file_handler)
            self._file_handler.close()


def run_status(exc: Optional[BaseException]) -> str:
    """How a run ends, for the trackers: 'finished' (no exception), 'preempted' (a signal stop that wrote a
    checkpoint: RunInterrupted), 'interrupted' (a second Ctrl-C), else 'failed'."""
    from mimkit.errors import RunInterrupted

    if exc is None:
        return "finished"
    if isinstance(exc, RunInterrupted):
        return "preempted"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def format_duration(seconds: float) -> str:
    """'42 s', '7 min', '2 h 05 min', '3 d 4 h'."""
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def _duration_or_less(seconds: float) -> str:
    """format_duration, or 'under a minute' for anything shorter (a short run's estimate is rough anyway)."""
    return "under a minute" if seconds < 60 else format_duration(seconds)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        elif hasattr(v, "item"):
            v = v.item()
        out[k] = v
    return out
