"""Launched by test_survive.py (directly or by torchrun): pretrain; rank R sends itself SIGTERM after optimiser
step K (K = 0: no signal; K < 0: rank R dies at once, exit 1, after step -K, the first time only, as a crashed
worker). Exits like the CLI: 75 after a signal stop, 0 when training finished."""

import os
import signal
import sys

from mimkit.cli import build_parser
from mimkit.errors import RunInterrupted
from mimkit.tasks.pretrain import config_from_args, train


class SignalAt:
    """Loop hook: SIGTERM to this very process once the run reaches optimiser step `step` on rank `rank`."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer) -> None:
        if trainer.dist.rank != self.rank:
            return
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        marker = trainer.ckpt.dir / ".died-once"
        if trainer.state.step == -self.step and not marker.exists():
            marker.write_text("x")
            os._exit(1)


if __name__ == "__main__":
    step, rank = int(sys.argv[1]), int(sys.argv[2])
    args = build_parser().parse_args(["pretrain", *sys.argv[3:]])
    try:
        train(config_from_args(args), extra_hooks=[SignalAt(step, rank)] if step else [], print_summary=False)
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
