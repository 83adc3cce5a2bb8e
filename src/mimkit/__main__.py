"""`python -m mimkit` (used by `torchrun -m mimkit ...`)."""

import sys

try:
    from mimkit.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the CLI: one line, no traceback
    print("mimkit: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
