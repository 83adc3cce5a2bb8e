"""Folder datasets on real files written to tmp_path: layouts, corrupt images, and every layout error."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.data.datasets import ade20k_folder, check_same_classes, collate_batch, image_folder
from mimkit.data.transforms import eval_transform, seg_eval_transform, seg_train_transform
from mimkit.errors import DataError, UserError

TF = eval_transform(16)


def _write(path: Path, value: int = 0, size: tuple[int, int] = (20, 24), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _classes(root: Path, classes: dict[str, int]) -> Path:
    """root/<class>/img{i}.jpg|png with n images per class, pixel value = 40 * class index."""
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            _write(root / name / f"img{i}.{'jpg' if i % 2 else 'png'}", 40 * c)
    return root


def test_class_folders_without_split_level(tmp_path: Path) -> None:
    _classes(tmp_path, {"cat": 2, "dog": 3})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    ds = image_folder(tmp_path, TF, split="train", require_labels=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    assert [Path(p).parent.name for p, _ in ds.samples] == ["cat"] * 2 + ["dog"] * 3
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and y == 1


def test_imagenet_layout_with_train_and_val(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"a": 2, "b": 2, "c": 1})
    _classes(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    tr = image_folder(tmp_path, TF, split="train", require_labels=True)
    va = image_folder(tmp_path, TF, split="val", require_labels=True)
    assert tr.classes == va.classes == ["a", "b", "c"] and (len(tr), len(va)) == (5, 3)
    assert all("/train/" in p for p, _ in tr.samples) and all("/val/" in p for p, _ in va.samples)
    check_same_classes(tr, va)  # no error


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"x{i}.jpeg", 10 * i)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path, TF)
    assert ds.classes == [] and len(ds) == 3 and {y for _, y in (ds[i] for i in range(3))} == {0}
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path, TF, require_labels=True)


def test_grayscale_and_rgba_files_load_as_rgb(tmp_path: Path) -> None:
    _write(tmp_path / "g.png", 100, mode="L")
    _write(tmp_path / "a.png", 100, mode="RGBA")
    ds = image_folder(tmp_path, TF)
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(2))


def test_corrupt_image_is_skipped_counted_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _classes(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "a" / "broken.jpg"
    good_bytes = (tmp_path / "a" / "img1.jpg").read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated JPEG
    (tmp_path / "b" / "garbage.png").write_bytes(b"not a png at all")
    ds = image_folder(tmp_path, TF)
    assert len(ds) == 6
    with caplog.at_level(logging.WARNING, logger="mimkit.data.datasets"):
        batches = list(DataLoader(ds, batch_size=6, collate_fn=collate_batch))
    assert len(batches) == 1
    b = batches[0]
    assert b["skipped"] == 2 and b["images"].shape == (4, 3, 16, 16) and b["images"].dtype == torch.float32
    assert b["labels"].tolist() == [0, 0, 1, 1] and b["labels"].dtype == torch.long
    assert "broken.jpg" in caplog.text and "garbage.png" in caplog.text


def test_collate_all_skipped_and_masks() -> None:
    out = collate_batch([None, None])
    assert out["skipped"] == 2 and out["images"].shape[0] == 0 and out["labels"].shape == (0,)
    masks = collate_batch([(torch.zeros(3, 4, 4), torch.ones(4, 4, dtype=torch.long)), None])
    assert masks["labels"].shape == (1, 4, 4) and masks["skipped"] == 1


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as e:
        image_folder(tmp_path / "nope", TF)
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)  # the CLI prints it without a traceback
    with pytest.raises(DataError, match="no images found"):
        image_folder(tmp_path, TF)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="no images in .*: b"):  # an empty class folder
        image_folder(tmp_path, TF)


def test_empty_or_missing_split(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="no 'val' split"):
        image_folder(tmp_path, TF, split="val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no images found"):
        image_folder(tmp_path, TF, split="val")
    only_val = tmp_path / "other"
    _classes(only_val / "val", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="val/ folder but no train/"):
        image_folder(only_val, TF, split="train")


def test_one_class_is_an_error_when_labels_are_required(tmp_path: Path) -> None:
    _classes(tmp_path, {"only": 3})
    assert len(image_folder(tmp_path, TF)) == 3  # fine for pretraining
    with pytest.raises(DataError, match="1 class folder.*at least 2"):
        image_folder(tmp_path, TF, require_labels=True)


def test_val_classes_differ(tmp_path: Path) -> None:
    _classes(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    _classes(tmp_path / "val", {"a": 1, "b": 1, "d": 1})
    tr, va = image_folder(tmp_path, TF, "train"), image_folder(tmp_path, TF, "val")
    with pytest.raises(DataError, match="missing from val: c; not in train: d"):
        check_same_classes(tr, va)


def _ade(root: Path, split: str, names: list[str], masks: list[str] | None = None) -> None:
    for n in names:
        _write(root / "images" / split / f"{n}.jpg", 90, size=(40, 30))
    for n in masks if masks is not None else names:
        lab = np.zeros((30, 40), np.uint8)
        lab[:, 20:] = 5  # left half "other" (0), right half class 5
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(root / "annotations" / split / f"{n}.png")


def test_ade20k_layout_pairs_and_labels(tmp_path: Path) -> None:
    _ade(tmp_path, "training", ["ADE_train_1", "ADE_train_2"])
    _ade(tmp_path, "validation", ["ADE_val_1"])
    tr = ade20k_folder(tmp_path, "train", seg_train_transform(16))
    va = ade20k_folder(tmp_path, "val", seg_eval_transform(16))
    assert (len(tr), len(va)) == (2, 1)
    x, m = va[0]
    assert x.shape == (3, 16, 16) and m.shape == (16, 16) and m.dtype == torch.long
    # reduce_zero_label: 0 ("other") -> 255 ignored, 5 -> 4
    assert set(m[:, :8].unique().tolist()) == {255} and set(m[:, 8:].unique().tolist()) == {4}
    x, m = tr[0]
    assert set(m.unique().tolist()) <= {4, 255}
    raw = ade20k_folder(tmp_path, "val", reduce_zero_label=False)
    img, mask = raw[0]
    assert img.size == (40, 30) and set(np.unique(np.asarray(mask)).tolist()) == {0, 5}


def test_ade20k_unpaired_and_missing(tmp_path: Path) -> None:
    _ade(tmp_path, "training", ["a", "b", "c"], masks=["a", "b", "z"])
    with pytest.raises(DataError, match=r"image .*c\.\w+ has no annotation \(expected .*training.c\.png\)$"):
        ade20k_folder(tmp_path, "train")  # the image named first; then, once it has one, the mask without an image
    (tmp_path / "annotations" / "training" / "c.png").write_bytes(
        (tmp_path / "annotations" / "training" / "a.png").read_bytes())
    with pytest.raises(DataError, match=r"annotation .*z\.png has no image in .*training$"):
        ade20k_folder(tmp_path, "train")
    with pytest.raises(DataError, match="validation does not exist"):
        ade20k_folder(tmp_path, "val")
    with pytest.raises(DataError, match="not found"):
        ade20k_folder(tmp_path / "missing", "train")


def test_datasets_pickle_for_spawned_workers(tmp_path: Path) -> None:
    import pickle

    from mimkit.data.builtin import builtin_dataset
    from mimkit.data.transforms import finetune_transform, pretrain_transform

    _classes(tmp_path, {"a": 1, "b": 1})
    for ds in (image_folder(tmp_path, pretrain_transform(16)), image_folder(tmp_path, finetune_transform(16)),
               builtin_dataset("textures", "val", pretrain_transform(16, in_chans=1))):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds) and clone[0][0].shape == ds[0][0].shape
    _ade(tmp_path / "ade", "training", ["a"])
    seg = pickle.loads(pickle.dumps(ade20k_folder(tmp_path / "ade", "train", seg_train_transform(8))))
    assert seg[0][1].shape == (8, 8)
