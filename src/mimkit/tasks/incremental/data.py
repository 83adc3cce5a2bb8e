"""Data of `mimkit incremental`: labelled sets (built-in digits, class folders, CIFAR python layout), the class
order fixed by the seed, and the per-task subsets with labels renumbered in that order."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mimkit.errors import DataError

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class CifarDataset(Dataset):
    """CIFAR-10 / CIFAR-100 from the python-version pickles; items (transform(PIL image), label), `.classes`."""

    def __init__(self, images: np.ndarray, targets: list[int], classes: list[str],
                 transform: Optional[Callable]) -> None:
        self.images, self.targets, self.classes, self.transform = images, targets, classes, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def cifar_folder(root: Path, kind: str) -> Optional[Path]:
    """The folder holding `kind`'s pickles: root itself or root/<cifar-10-batches-py | cifar-100-python>."""
    sub, train, test, meta, _, _ = CIFAR_FILES[kind]
    for cand in (root / sub, root):
        if all((cand / f).is_file() for f in (*train, *test, meta)):
            return cand
    return None


def detect_cifar(root: Path) -> Optional[str]:
    """'cifar10' / 'cifar100' when the folder holds (or names) that layout, else None."""
    for kind, (sub, train, _, _, _, _) in CIFAR_FILES.items():
        if (root / sub).exists() or (root / train[0]).is_file():
            return kind
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as e:  # a truncated or foreign file: one clear line
            raise DataError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from None


def _field(d: dict, key: str, path: Path) -> Any:
    """d[key] under a bytes key (the original pickles) or a str key (re-pickled under Python 3)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"CIFAR file {path} has no '{key}' entry: not a CIFAR python-version pickle of this kind "
                    f"(re-extract it from {CIFAR_URL})")


def open_cifar(root: str | Path, kind: str, train_tf: Callable, val_tf: Callable) -> tuple[CifarDataset, CifarDataset]:
    """(train, test) of CIFAR-10/100 in the python layout; a missing file is one DataError saying what goes where."""
    root = Path(root).expanduser()
    sub, train_files, test_files, meta, names_key, label_key = CIFAR_FILES[kind]
    folder = cifar_folder(root, kind)
    if folder is None:
        need = [*train_files, *test_files, meta]
        look = root / sub if (root / sub).is_dir() or not any((root / f).exists() for f in need) else root
        missing = ", ".join(f for f in need if not (look / f).is_file())
        name = "CIFAR-10" if kind == "cifar10" else "CIFAR-100"
        raise DataError(f"{root} is not a complete {name} folder: {look} lacks {missing}; put the python "
                        f"version's files ({', '.join(need)}) in "
                        f"{root / sub}/ (extract {sub.replace('-batches-py', '').replace('-python', '')}-python.tar.gz "
                        f"from {CIFAR_URL} into {root})")
    classes = [c.decode() if isinstance(c, bytes) else str(c)
               for c in _field(_unpickle(folder / meta), names_key, folder / meta)]

    def load(files: list[str]) -> tuple[np.ndarray, list[int]]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f)
            xs.append(np.asarray(_field(d, "data", folder / f), dtype=np.uint8)
                      .reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.extend(int(v) for v in _field(d, label_key, folder / f))
        return np.ascontiguousarray(np.concatenate(xs)), ys

    (xtr, ytr), (xte, yte) = load(train_files), load(test_files)
    return CifarDataset(xtr, ytr, classes, train_tf), CifarDataset(xte, yte, classes, val_tf)


def open_data(data_path: str, dataset: str, train_tf: Callable, val_tf: Callable) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, kind): digits / class folders (as `mimkit knn` reads them) or the CIFAR python layout."""
    from mimkit.tasks.evaluation.common import open_labelled

    root = Path(str(data_path)).expanduser()
    kind = dataset
    if dataset == "auto":
        kind = (detect_cifar(root) if root.is_dir() else None) or "folder"
    if kind in CIFAR_FILES:
        train, val = open_cifar(root, kind, train_tf, val_tf)
    else:
        try:
            train, val = open_labelled(str(data_path), train_tf, val_tf)
        except DataError as e:
            if dataset != "auto" or str(data_path) == "digits":
                raise
            raise DataError(f"{e}; or, for CIFAR, the extracted cifar-100-python/ (train, test, meta) or "
                            f"cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) folder of the python "
                            f"version ({CIFAR_URL})") from None
    return train, val, kind


def targets_of(ds: Dataset) -> np.ndarray:
    """Integer labels of every item, without decoding any image."""
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets, dtype=np.int64)
    return np.asarray([t for _, t in ds.samples], dtype=np.int64)


def class_order(num_classes: int, seed: int) -> list[int]:
    """The class order of a run: a permutation of range(num_classes) fixed by the seed (as PyCIL)."""
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


@dataclass
class TaskSplit:
    """Task t holds classes order[offsets[t]:offsets[t + 1]]; label = position in the order."""

    order: list[int]
    sizes: list[int]

    @property
    def offsets(self) -> list[int]:
        """Cumulative class counts: offsets[t] = classes seen before task t."""
        return [int(v) for v in np.concatenate([[0], np.cumsum(self.sizes)])]

    def classes(self, t: int) -> list[int]:
        """Original class ids of task t."""
        return self.order[self.offsets[t]:self.offsets[t + 1]]


class Relabelled(Dataset):
    """The items of `base` at `indices`, labels mapped to their position in the class order."""

    def __init__(self, base: Dataset, indices: np.ndarray, mapping: dict[int, int]) -> None:
        self.base, self.indices, self.mapping = base, [int(i) for i in indices], mapping
        self.classes = getattr(base, "classes", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.base[self.indices[index]]
        if item is None:  # an unreadable file: the collate function skips it
            return None
        return item[0], self.mapping[int(item[1])]


def with_transform(ds: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of ds whose items go through `transform` (ds itself when it has no `.transform`)."""
    import copy

    if not hasattr(ds, "transform"):
        return ds
    twin = copy.copy(ds)
    twin.transform = transform
    return twin


def task_subsets(ds: Dataset, split: TaskSplit) -> list[Relabelled]:
    """One Relabelled subset per task (items of that task's classes, in dataset order)."""
    targets = targets_of(ds)
    mapping = {c: i for i, c in enumerate(split.order)}
    return [Relabelled(ds, np.flatnonzero(np.isin(targets, split.classes(t))), mapping)
            for t in range(len(split.sizes))]


def fixed_subset(ds: Dataset, split: TaskSplit, n: int) -> Relabelled:
    """At most n held-out items evenly spread over the whole set (every class): the RankMe set of a run."""
    idx = np.arange(len(ds)) if len(ds) <= n else np.linspace(0, len(ds) - 1, n).round().astype(np.int64)
    return Relabelled(ds, idx, {c: i for i, c in enumerate(split.order)})


def transforms(input_size: int, padding: int, hflip: bool, mean: Optional[list] = None,
               std: Optional[list] = None):
    """(train, eval) pipelines: Resize + RandomCrop(size, padding) + flip (the CIFAR recipe); eval: Resize.

    Normalised with mean / std when given, else ImageNet's statistics (what MAE encoders expect).
    """
    from torchvision import transforms as T

    from mimkit.data.transforms import ConvertMode, mean_std

    mean, std = mean_std(3, mean, std)
    base = [ConvertMode("RGB"), T.Resize((input_size, input_size))]
    aug = ([T.RandomCrop(input_size, padding=padding)] if padding else []) + \
        ([T.RandomHorizontalFlip()] if hflip else [])
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(base + aug + tail), T.Compose(base + tail)

