"""Launched by torchrun (or run alone) from test_fsdp.py: `mimkit pretrain ARGS`, optionally recording which samples
each rank reads (DUMP/keys-rank{r}.jsonl) and sending itself SIGTERM after optimiser step SIGTERM_AT on rank 0.

Under --strategy fsdp over several ranks it also watches the meta-device build: the largest tensor any op created
while sharding and materialising (an independent count, by a dispatch mode) and the full weights it gave, gathered
to rank 0 (DUMP/build.pt)."""

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

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from mimkit.engine.fsdp import full_model_state
    from mimkit.tasks.pretrain import recipe

    class Largest(TorchDispatchMode):
        """The bytes of the largest real (not meta) storage any op returns."""
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor) and not o.is_meta:
                    self.largest = max(self.largest, o.untyped_storage().nbytes())
            return out

    deferred = recipe.shard_deferred

    def watched(model, *a, **kw):
        with Largest() as mode:
            peak = deferred(model, *a, **kw)
        state = full_model_state(model)
        if rank == 0:
            torch.save({"largest": mode.largest, "peak": peak, "state": state}, dump / "build.pt")
        return peak

    recipe.shard_deferred = watched
    sys.exit(main(["pretrain", *sys.argv[2:]]))
