"""SeededSamples: each item is a pure function of (seed, epoch, index), and fetching it leaves every RNG alone."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from mimkit.engine.sampling import SeededSamples, sample_seed


class RandomItems(Dataset):
    """Item i: a torch draw and a Python draw, as a random augmentation makes."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.rand(3), random.random()


def test_item_is_the_cpu_stream_of_its_sample_seed() -> None:
    ds = SeededSamples(RandomItems(), seed=7)
    x, r = ds[(2, 1)]
    s = sample_seed(7, 2, 1)
    g = torch.Generator().manual_seed(s)
    assert torch.equal(x, torch.rand(3, generator=g))
    assert r == random.Random(s).random()
    x2, r2 = ds[(2, 1)]
    assert torch.equal(x, x2) and r == r2
    assert not torch.equal(x, ds[(3, 1)][0])  # another epoch, another crop


def test_fetching_an_item_leaves_global_rngs_and_other_devices_alone(monkeypatch) -> None:
    def no_global_seed(seed):  # seeding every device from a data item would leak out of the fork
        raise AssertionError("torch.manual_seed called per item")

    monkeypatch.setattr(torch, "manual_seed", no_global_seed)
    torch.default_generator.manual_seed(0)
    random.seed(0)
    before_t, before_py = torch.get_rng_state(), random.getstate()
    SeededSamples(RandomItems(), seed=1)[(0, 3)]
    assert torch.equal(torch.get_rng_state(), before_t)
    assert random.getstate() == before_py
