"""`python -m mimkit` (used by `torchrun -m mimkit ...`)."""

import sys

from mimkit.cli import main

sys.exit(main())
