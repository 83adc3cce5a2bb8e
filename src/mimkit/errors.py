"""User-facing errors: the CLI prints these as one line, without a traceback, and exits 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input (config key, path, shape, checkpoint)."""


class ConfigError(UserError):
    """A bad configuration key or value."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(UserError):
    """A missing, empty or unusable dataset."""


class RunInterrupted(Exception):
    """A run stopped early on a signal after writing a checkpoint; rerunning the same command resumes it.

    The CLI prints the message and exits with `exit_code` (75, EX_TEMPFAIL: "try again").
    """

    exit_code = 75


def suggest(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
