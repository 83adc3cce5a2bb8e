"""The one training engine: loop, optimiser groups and schedules, checkpoints, logging, distributed."""
