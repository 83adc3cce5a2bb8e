"""Launched by test_faults.py: `mimkit ARGV` through the CLI, with a first Ctrl-C (SIGINT to this process) after
optimiser step K and the second one while the checkpoint that stop writes is half done (its checkpoint.pt written,
the folder not yet renamed into place). Exits with the CLI's code, as the console script does."""

import os
import signal
import sys
import time

from mimkit.engine import checkpoint


class CtrlCAt:
    """Loop hook: the first SIGINT once the run reaches optimiser step `step`."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    step = int(sys.argv[1])
    hook = CtrlCAt(step)
    original = checkpoint.atomic_save

    def save_then_second_ctrl_c(obj, path):
        original(obj, path)
        if hook.sent:  # the stop's own checkpoint: Ctrl-C again before it is complete
            if os.environ.get("SECOND_CTRL_C_STAMP"):  # when it was pressed, for the exit's promptness
                with open(os.environ["SECOND_CTRL_C_STAMP"], "w") as f:
                    f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here

    checkpoint.atomic_save = save_then_second_ctrl_c
    from mimkit.tasks.pretrain import recipe

    train = recipe.train
    recipe.train = lambda cfg, extra_hooks=(), **kw: train(cfg, [*extra_hooks, hook], **kw)
    from mimkit.cli import main

    sys.argv = ["mimkit", *sys.argv[2:]]  # as the console script: main() with no argv
    sys.exit(main())
