"""Launched by torchrun (or run alone) from test_fsdp.py: runs a plan of mimkit commands one after the other in the
same processes (one launch instead of one per run: the start-up of torchrun and of two Pythons is most of a tiny
run's time).

    python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py PLAN.json

PLAN.json is a list of steps, each {"argv": ["pretrain", ...]} with optional
- "copy": [src, dst]: rank 0 copies a run folder first (the others wait),
- "sigterm_at": N: rank 0 sends itself SIGTERM after optimiser step N (a cluster's pre-emption: caught, a step
  checkpoint, exit code 75),
- "keys": dir: each rank records the samples it reads (dir/keys-rank{r}.jsonl),
- "watch": file: the meta-device build is watched: the largest real tensor any op created while sharding and
  materialising (an independent count, by a dispatch mode), the replay's own peak and the full weights the build
  gave, gathered to rank 0, saved to `file`.
Every step's exit code goes to PLAN.json's folder as rc-rank{r}.json.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mimkit.cli import main
from mimkit.engine import fsdp, sampling
from mimkit.engine.loop import Trainer

RANK = int(os.environ.get("RANK", "0"))
STEP: dict = {}  # the running step of the plan


class Largest(TorchDispatchMode):
    """The bytes of the largest real (not meta) storage any op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and not o.is_meta:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


def patch() -> None:
    """Sample recording, the SIGTERM and the build watch, each on when the running step asks for it."""
    read = sampling.SeededSamples.__getitem__

    def recording(self, key):
        if STEP.get("keys"):
            Path(STEP["keys"]).mkdir(parents=True, exist_ok=True)
            with open(Path(STEP["keys"]) / f"keys-rank{RANK}.jsonl", "a") as f:
                f.write(json.dumps(list(key)) + "\n")
        return read(self, key)

    sampling.SeededSamples.__getitem__ = recording
    after = Trainer._after_step

    def after_step(self):
        if STEP.get("sigterm_at") and RANK == 0 and self.state.step == STEP["sigterm_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return after(self)

    Trainer._after_step = after_step
    deferred = fsdp.shard_deferred

    def watched(model, *a, **kw):
        if not STEP.get("watch"):
            return deferred(model, *a, **kw)
        with Largest() as mode:
            peak = deferred(model, *a, **kw)
        state = fsdp.full_model_state(model)
        if RANK == 0:
            torch.save({"largest": mode.largest, "peak": peak, "state": state}, STEP["watch"])
        return peak

    fsdp.shard_deferred = watched


if __name__ == "__main__":
    plan_file = Path(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # before the first step: a copy step waits on it (mimkit joins it)
    patch()
    codes = []
    for step in json.loads(plan_file.read_text()):
        STEP.clear()
        STEP.update(step)
        if step.get("copy"):
            if RANK == 0:
                shutil.copytree(*step["copy"])
            if dist.is_initialized():
                dist.barrier()
        try:
            codes.append(main(step["argv"]))
        except SystemExit as e:  # a flag refused while parsing: recorded, the plan goes on
            codes.append(e.code)
        if dist.is_initialized():
            dist.barrier()
    (plan_file.parent / f"rc-rank{RANK}.json").write_text(json.dumps(codes))
