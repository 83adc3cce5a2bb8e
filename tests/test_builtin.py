"""Built-in sets: deterministic bytes, documented sizes and classes, disjoint splits, open_dataset routing."""

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.data import builtin
from mimkit.data.builtin import builtin_dataset, is_builtin, list_builtin, make_crops
from mimkit.data.sources import open_dataset
from mimkit.data.transforms import eval_transform, pretrain_transform
from mimkit.errors import DataError

SIZES = {  # name: (train, val, classes)
    "demo": (9 * 36, 9 * 4, []),
    "digits": (1437, 360, [str(i) for i in range(10)]),
    "photos": (6 * 80, 6 * 20, ["astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera"]),
    "microscopy": (4 * 80, 4 * 20, ["immunohistochemistry", "retina", "cell", "microaneurysms"]),
    "textures": (3 * 80, 3 * 20, ["brick", "grass", "gravel"]),
    "space": (2 * 80, 2 * 20, ["hubble_deep_field", "moon"]),
}


def test_listed_names_and_descriptions() -> None:
    assert set(list_builtin()) == set(SIZES)
    assert all(is_builtin(n) and isinstance(d, str) and d for n, d in list_builtin().items())
    assert not is_builtin("imagenet")


@pytest.mark.parametrize("name", list(SIZES))
def test_sizes_classes_and_items(name: str) -> None:
    n_train, n_val, classes = SIZES[name]
    tr, va = builtin_dataset(name, "train"), builtin_dataset(name, "val")
    assert (len(tr), len(va)) == (n_train, n_val)
    assert tr.classes == va.classes == classes
    img, label = tr[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.size == {"demo": (128, 128), "digits": (32, 32)}.get(name, (96, 96))
    if classes:  # labelled: every class present in both splits, labels in range
        assert set(tr.targets) == set(va.targets) == set(range(len(classes)))
    else:
        assert set(tr.targets) == {0}
    x, y = builtin_dataset(name, "val", eval_transform(32))[len(va) - 1]
    assert x.shape == (3, 32, 32) and y == va.targets[-1]


def test_deterministic_bytes_across_rebuilds() -> None:
    first = {n: builtin_dataset(n, s).images.tobytes() for n in SIZES for s in ("train", "val")}
    builtin._build.cache_clear()
    builtin._load_rgb.cache_clear()
    second = {n: builtin_dataset(n, s).images.tobytes() for n in SIZES for s in ("train", "val")}
    assert first == second
    # and independent of the cache: the crop function alone gives the same bytes
    assert np.array_equal(make_crops("gravel", "val", 3, 96, (0.2, 0.3), False),  # gravel = class 2
                          builtin_dataset("textures", "val").images[40:43])


def test_builds_fast_from_cold() -> None:
    builtin._build.cache_clear()
    builtin._load_rgb.cache_clear()
    for name in SIZES:
        t = time.perf_counter()
        builtin_dataset(name, "train")
        builtin_dataset(name, "val")
        assert time.perf_counter() - t < 2.0, name


def test_train_and_val_crops_differ() -> None:
    for name in ("photos", "microscopy", "textures", "space", "demo"):
        tr = {bytes(im) for im in builtin_dataset(name, "train").images}
        va = {bytes(im) for im in builtin_dataset(name, "val").images}
        assert not tr & va and len(tr) == len(builtin_dataset(name, "train"))  # no duplicates at all


def test_digits_split_is_stratified_and_fixed() -> None:
    from sklearn.datasets import load_digits

    tr, va = builtin_dataset("digits", "train"), builtin_dataset("digits", "val")
    full = Counter(load_digits().target.tolist())
    ctr, cva = Counter(tr.targets), Counter(va.targets)
    for c in range(10):
        assert ctr[c] + cva[c] == full[c]
        assert abs(cva[c] / full[c] - 0.2) < 0.02  # stratified: every class ~20% in val
    ids_tr = {n for n, _ in tr.samples}
    ids_va = {n for n, _ in va.samples}
    assert len(ids_tr) + len(ids_va) == 1797
    assert {n.split("/")[-1] for n in ids_tr}.isdisjoint({n.split("/")[-1] for n in ids_va})
    # the first val image is sklearn's digit at that index, upsampled: same class and a visible stroke
    idx = int(va.samples[0][0].split("/")[-1])
    assert va.targets[0] == load_digits().target[idx] and va.images[0].max() > 200


def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError, match="did you mean 'photos'"):
        builtin_dataset("photo")
    with pytest.raises(DataError, match="no 'test' split"):
        builtin_dataset("digits", "test")


def test_open_dataset_routes_builtin_and_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = open_dataset("demo", "train", pretrain_transform(32))
    assert ds[0][0].shape == (3, 32, 32) and ds.classes == []
    assert len(open_dataset("digits", "val", require_labels=True)) == 360
    with pytest.raises(DataError, match="unlabelled"):
        open_dataset("demo", "train", require_labels=True)
    with pytest.raises(DataError, match="not found: textur .*did you mean 'textures'"):
        open_dataset("textur")
    # a folder of the same name as a built-in wins
    monkeypatch.chdir(tmp_path)
    for c in ("x", "y"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "photos" / c / "0.png")
    local = open_dataset("photos", "train", require_labels=True)
    assert local.classes == ["x", "y"] and len(local) == 2
