"""Deterministic data order: each sample is a pure function of (seed, epoch, index), whatever the workers.

This is what makes a resume in the middle of an epoch continue bitwise where the straight run would be.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mimkit.engine.signals import ignore_stop_signals


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset; item (epoch, i) is base[i] computed with torch and Python RNGs seeded for (epoch, i)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the one fork_rng restores): torch.manual_seed also seeds CUDA / MPS / XPU,
            # which would leak out of the fork, and while CUDA is uninitialised it queues each call with a
            # formatted stack trace (milliseconds per image: more than a tiny model's whole step).
            torch.default_generator.manual_seed(s)
            random.seed(s)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)


class EpochSampler(Sampler):
    """DistributedSampler's order (shuffled by seed + epoch, split over ranks, no repeats), yielding (epoch, index) keys.

    The epoch is one list of samples (the shuffle, cut to a multiple of the world size); rank r takes every
    world-size-th of it from r. `set_start(g)` skips the first g samples of that list (all ranks together), so a
    run resumed at global sample g continues the same list on any number of processes: no sample of the
    interrupted epoch is seen twice or skipped. `end` keeps the list the epoch started with (its world size).
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        self.n = len(dataset)
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0
        self.end: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int, end: int | None = None) -> None:
        """Skip the first `start` samples of the epoch's list; `end`: where that list ends (None = this world's)."""
        self.start, self.end = start, end

    def epoch_end(self) -> int:
        """Length of this epoch's list: all samples, cut to a multiple of the world size (drop_last)."""
        return self.n // self.world * self.world if self.end is None else self.end

    def order(self) -> list[int]:
        """This epoch's sample list, as DistributedSampler(shuffle, seed, drop_last=True) shuffles it."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def full_len(self) -> int:
        """Samples of one whole epoch on this rank."""
        return self.n // self.world

    def __len__(self) -> int:
        return max(0, self.epoch_end() - self.start) // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rest = self.order()[self.start:self.epoch_end()]
        usable = len(rest) // self.world * self.world  # every rank runs the same number of samples
        for idx in rest[self.rank:usable:self.world]:
            yield (self.epoch, idx)


def build_loader(
    dataset: Dataset, batch_size: int, sampler: EpochSampler, collate: Callable, num_workers: int,
    pin_memory: bool, persistent_workers: bool, seed: int,
) -> DataLoader:
    """DataLoader over `sampler` with drop_last and its own generator (never the global RNG)."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=True, persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals if num_workers else None,
    )


def shutdown_workers(loader: DataLoader, iterator=None) -> None:
    """Stop the worker processes of `iterator` (or of a persistent `loader`) now.

    Workers ignore SIGTERM (ignore_stop_signals), so they must not be left for the interpreter's exit, where
    multiprocessing stops leftover children with SIGTERM and then waits for them forever.
    """
    for it in (iterator, getattr(loader, "_iterator", None)):
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()
    if getattr(loader, "_iterator", None) is not None:
        loader._iterator = None  # a later epoch or fit() starts fresh workers

