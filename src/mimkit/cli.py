"""`mimkit <command>`: parses arguments and runs the command through the Python API's one path; user mistakes
print one line and exit 2."""

from __future__ import annotations

import sys
from typing import Sequence

from mimkit.api import run_args
from mimkit.commands import COMMANDS, build_parser, check_flags, options_of, strip_launcher_flags, subparser
from mimkit.config import take_leftovers
from mimkit.config.flags import check_arg_values, empty_value
from mimkit.errors import RunInterrupted, UserError


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; Ctrl-C while starting (imports, parsing) is one line and exit 130 too."""
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        print("mimkit: interrupted while starting; nothing was written", file=sys.stderr)
        code = 130
    if code == 130 and argv is None:  # the console's Ctrl-C: out now (see _exit_now)
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Leave the process at once after a Ctrl-C, as the docs promise: the run already cleaned up (temporary
    checkpoint files removed, the run logger closed, run folders released); what is left is the interpreter's
    teardown of torch and every imported module, which takes seconds (4.7 s in the trial). Only for the console
    (argv None): a caller of main() in Python keeps its process."""
    import os

    from mimkit.engine.runfolder import held, release

    release(held())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    # `python -m torch.distributed.launch` (without --use-env) puts --local-rank=N before the command: the
    # launcher's flag, never the user's mistake
    argv = strip_launcher_flags(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # a mistyped flag is named first, before argparse misses a required one
        check_flags(subparser(parser, argv[0]), argv[1:])
    # Overrides and a config file may come after flags too: collect what argparse left over.
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 2
    sp = subparser(parser, args.command)
    problem = take_leftovers(args, rest, options_of(sp)) or empty_value(sp, args) or check_arg_values(sp, args)
    if problem:
        sp.error(problem)
    try:
        return run_args(args).exit_code
    except UserError as e:
        print(f"mimkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # a signal: the step finished and a checkpoint was written
        print(f"mimkit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): quit without a new checkpoint
        print(f"mimkit {args.command}: interrupted; {_resume_hint()}", file=sys.stderr)
        return 130


def _resume_hint() -> str:
    """'the same command resumes ...' only when a run folder this process claimed holds a checkpoint."""
    from mimkit.engine.runfolder import claimed

    saved = [f for f in claimed() if any(f.glob("**/latest.pt"))]
    if saved:
        return f"the same command resumes from the last checkpoint in {saved[-1]} (auto_resume)"
    folders = claimed()
    where = f" (run folder {folders[-1]})" if folders else ""
    return f"no checkpoint was written{where}, so a rerun starts over"


if __name__ == "__main__":
    sys.exit(main())
