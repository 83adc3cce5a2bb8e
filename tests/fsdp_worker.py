"""Launched by torchrun (or run alone) from test_fsdp.py: `mimkit pretrain ARGS`, optionally recording which samples
each rank reads (DUMP/keys-rank{r}.jsonl) and sending itself SIGTERM after optimiser step SIGTERM_AT on rank 0."""

import json
import os
import signal
import sys
from pathlib import Path

from mimkit.cli import main
from mimkit.engine import sampling
from mimkit.engine.loop import Trainer

if __name__ == "__main__":
    dump = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    dump.mkdir(parents=True, exist_ok=True)
    read = sampling.SeededSamples.__getitem__

    def recording(self, key):
        with open(dump / f"keys-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(list(key)) + "\n")
        return read(self, key)

    sampling.SeededSamples.__getitem__ = recording
    stop_at = int(os.environ.get("SIGTERM_AT", "0"))
    after = Trainer._after_step

    def after_step(self):
        if stop_at and rank == 0 and self.state.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's pre-emption would: caught, step checkpoint
        return after(self)

    Trainer._after_step = after_step
    sys.exit(main(["pretrain", *sys.argv[2:]]))
