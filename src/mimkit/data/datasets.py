"""Image datasets on disk: class folders (ImageNet layout), flat folders, ADE20K; corrupt files skipped.

Layouts accepted by `image_folder(path, transform, split)`:
    path/train/<class>/*.jpg, path/val/<class>/*.jpg   (split='train' / 'val')
    path/<class>/*.jpg                                 (no split level: the whole folder is the training set)
    path/*.jpg                                         (flat, unlabelled: label 0, classes == [])
A sample whose file cannot be decoded comes back as None (with a warning naming the file); `collate_batch`
drops it and counts it in `skipped`, so a DataLoader must use `collate_fn=collate_batch`.
Every file is read by mimkit.data.images.read_image (16-bit, alpha, CMYK, EXIF orientation handled there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mimkit.data.images import read_image
from mimkit.errors import DataError

logger = logging.getLogger(__name__)

# What a broken file raises inside PIL: OSError (truncated data, UnidentifiedImageError),
# ValueError / SyntaxError (malformed headers in some decoders), DecompressionBombError (absurd sizes).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
SPLIT_DIRS = {"train": "train", "val": "val", "test": "test"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _image_files(directory: str | Path) -> list[str]:
    """Image files directly inside `directory` (not recursive), sorted."""
    return sorted(
        e.path for e in os.scandir(directory)
        if e.is_file() and not _is_hidden(e.name) and has_file_allowed_extension(e.name, IMG_EXTENSIONS)
    )


def _is_loop(path: str | Path) -> bool:
    """True when the folder `path` is a link back to itself or to a folder above it (walking it never ends)."""
    real, parent = os.path.realpath(path), os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return parent == real or parent.startswith(real + os.sep)


def _subdirs(directory: str | Path) -> list[str]:
    """Sub-folders (class folders), hidden ones and links looping back above `directory` left out."""
    return sorted(e.name for e in os.scandir(directory)
                  if e.is_dir() and not _is_hidden(e.name) and not (e.is_symlink() and _is_loop(e.path)))


def looping_links(directory: str | Path) -> list[str]:
    """Symlinked sub-folders of `directory` that point back to it or above (left out of every walk)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_symlink() and e.is_dir() and _is_loop(e.path))


class Walk:
    """A folder walk that ends: a symlinked folder is followed once (a loop, or a second link to a folder already
    walked, is skipped and counted), and a file reached by several paths counts once (by its real path)."""

    def __init__(self) -> None:
        self.seen_dirs: set[str] = set()
        self.seen_files: set[str] = set()
        self.skipped_links = 0  # symlinked folders not followed (a loop or a folder already walked)
        self.duplicates = 0  # image files reached a second time through a link
        self.loop: str = ""  # the first loop found, "link -> target", for the message
        self.reserved: set[str] = set()  # class folders (real paths) that only their own class walks

    def images(self, directory: str | Path, recursive: bool = False) -> list[str]:
        """Image files under `directory` (its sub-folders too when `recursive`), sorted, each real file once."""
        found: list[str] = []
        self._walk(str(directory), recursive, found)
        return sorted(found)

    def _walk(self, directory: str, recursive: bool, found: list[str]) -> None:
        real = os.path.realpath(directory)
        if real in self.seen_dirs or (real in self.reserved and real != getattr(self, "_root", real)):
            self.skipped_links += 1
            if not self.loop and _is_loop(directory):
                self.loop = f"{directory} -> {real}"
            return
        self.seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if _is_hidden(e.name):
                continue
            if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS):
                rp = os.path.realpath(e.path)
                if rp in self.seen_files:
                    self.duplicates += 1
                    continue
                self.seen_files.add(rp)
                found.append(e.path)
            elif recursive and e.is_dir():
                self._walk(e.path, recursive, found)

    def walk_class(self, directory: str | Path) -> list[str]:
        """One class folder's images, recursively; a link into another class folder is not followed."""
        found: list[str] = []
        self._root = os.path.realpath(directory)
        self._walk(str(directory), True, found)
        return sorted(found)

    def note(self) -> str:
        """The start-up line's part about links, '' when there were none to skip."""
        parts = []
        if self.skipped_links:
            parts.append(f"{self.skipped_links} symlinked folder(s) not followed again"
                         + (f" (a loop: {self.loop})" if self.loop else ""))
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate image(s) reached through links counted once")
        return "; ".join(parts)


class FolderDataset(ImageFolder):
    """torchvision ImageFolder that also reads flat folders and returns None for an undecodable file.

    Items: (image, label), image as `transform` makes it (a (C, H, W) tensor for our pipelines), label an int.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, flat: bool = False) -> None:
        self.flat = flat  # read by find_classes/make_dataset, which the parent constructor calls
        super().__init__(str(root), transform=transform, loader=read_image, allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folders, sorted, hidden ones (.ipynb_checkpoints, __MACOSX) skipped; [] when flat."""
        if self.flat:
            return [], {}
        classes = _subdirs(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """(path, label) pairs; a flat folder's images all get label 0."""
        self.walk = Walk()
        if self.flat:
            return [(p, 0) for p in self.walk.images(directory)]
        self.walk.reserved = {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
        return [(p, class_to_idx[c]) for c in sorted(class_to_idx)
                for p in self.walk.walk_class(os.path.join(directory, c))]

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """(transform(image), label), or None when the file cannot be decoded."""
        path, target = self.samples[index]
        try:
            sample = self.loader(path)  # read_image: the full decode, any mode -> 8-bit RGB
        except DECODE_ERRORS as e:
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def resolve_split(path: str | Path, split: str | None) -> Path:
    """The folder of `split`: path/<split> when it exists; else path itself for 'train' (or None)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if not path.is_dir():
        raise DataError(f"data path is not a folder: {path}")
    if split is None:
        return path
    sub = path / SPLIT_DIRS.get(split, split)
    if sub.is_dir():
        return sub
    if split == "train":
        if (path / "val").is_dir():  # a val/ without a train/ would otherwise turn 'val' into a class
            raise DataError(f"{path} has a val/ folder but no train/ folder")
        return path
    raise DataError(f"no '{split}' split: {sub} does not exist")


def image_folder(
    path: str | Path,
    transform: Callable | None = None,
    split: str | None = None,
    require_labels: bool = False,
    min_classes: int = 2,
) -> FolderDataset:
    """Class-folder or flat image set at `path` (module docstring); every layout problem is a DataError."""
    root = resolve_split(path, split)
    classes = _subdirs(root)
    flat = not classes
    if flat and require_labels:
        raise DataError(
            f"{root} has no class folders; a labelled set needs one sub-folder of images per class"
        )
    ds = FolderDataset(root, transform=transform, flat=flat)
    loops = looping_links(root)
    ds.link_note = "; ".join(x for x in (  # for the start-up line (tasks/preflight.image_notes)
        f"{len(loops)} symlinked folder(s) looping back skipped ({', '.join(loops)})" if loops else "",
        ds.walk.note()) if x)
    if ds.link_note:
        logger.warning("%s: %s", root, ds.link_note)
    if not ds.samples:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    if not flat:
        used = {label for _, label in ds.samples}
        empty = [c for i, c in enumerate(ds.classes) if i not in used]
        if empty:
            raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
        loose = _image_files(root)
        if loose:
            logger.warning("ignoring %d image(s) directly in %s: it has class folders", len(loose), root)
        if require_labels and len(ds.classes) < min_classes:
            raise DataError(
                f"{root} has {len(ds.classes)} class folder(s) ({', '.join(ds.classes)}); "
                f"a labelled set needs at least {min_classes}"
            )
    return ds


def check_same_classes(train_ds: Dataset, val_ds: Dataset) -> None:
    """Raise DataError when the val set's classes differ from the training set's (names and order)."""
    train_c, val_c = list(train_ds.classes), list(val_ds.classes)
    if train_c == val_c:
        return
    only_train = sorted(set(train_c) - set(val_c))
    only_val = sorted(set(val_c) - set(train_c))
    where = getattr(val_ds, "root", "the val set")
    detail = "; ".join(
        s for s in (
            f"missing from val: {', '.join(only_train[:5])}" if only_train else "",
            f"not in train: {', '.join(only_val[:5])}" if only_val else "",
        ) if s
    ) or "same names in a different order"
    raise DataError(f"the classes of {where} differ from the training set's ({detail})")


def collate_batch(samples: Sequence[tuple[torch.Tensor, Any] | None]) -> dict[str, Any]:
    """Drop None (unreadable) samples and stack the rest.

    Returns {"images": (N, C, H, W) float, "labels": (N,) long (or (N, H, W) for masks), "skipped": int};
    N may be 0 when every sample of the batch was unreadable.
    """
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {"images": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "skipped": skipped}
    images = torch.stack([s[0] for s in kept])
    first = kept[0][1]
    if isinstance(first, torch.Tensor):
        labels = torch.stack([s[1] for s in kept]).long()
    else:
        labels = torch.tensor([s[1] for s in kept], dtype=torch.long)
    return {"images": images, "labels": labels, "skipped": skipped}


# ADE20K (SceneParsing, ADEChallengeData2016): 150 classes; annotation 0 = "other", ignored.
ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
IGNORE_INDEX = 255


class ADE20KFolder(Dataset):
    """ADE20K layout: images/<split>/X.jpg paired with annotations/<split>/X.png.

    Items: transform(image, mask) (seg_train_transform: (C, H, W) float, (H, W) long), None if unreadable.
    With reduce_zero_label (the mmseg convention) labels 1..150 become 0..149, 0 ("other") 255 (ignored).
    """

    num_classes = 150

    def __init__(
        self, root: str | Path, split: str = "train", transform: Callable | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data path not found: {self.root}")
        if split not in ADE20K_SPLITS:
            raise DataError(f"unknown ADE20K split '{split}'; use train or val")
        sub = ADE20K_SPLITS[split]
        img_dir, ann_dir = self.root / "images" / sub, self.root / "annotations" / sub
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(f"not an ADE20K layout: {d} does not exist")
        images = {Path(p).stem: p for p in _image_files(img_dir)}
        masks = {Path(p).stem: p for p in _image_files(ann_dir) if p.lower().endswith(".png")}
        if not images:
            raise DataError(f"no images found in {img_dir}")
        unpaired_i, unpaired_m = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
        if unpaired_i:
            raise DataError(f"image {images[unpaired_i[0]]} has no annotation (expected "
                            f"{ann_dir / (unpaired_i[0] + '.png')})"
                            + (f"; {len(unpaired_i) - 1} more image(s) without one" if len(unpaired_i) > 1 else ""))
        if unpaired_m:
            raise DataError(f"annotation {masks[unpaired_m[0]]} has no image in {img_dir}"
                            + (f"; {len(unpaired_m) - 1} more without one" if len(unpaired_m) > 1 else ""))
        self.samples = [(images[k], masks[k]) for k in sorted(images)]
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        """(image, mask) after the joint transform, or None when either file cannot be decoded."""
        img_path, mask_path = self.samples[index]
        try:
            img = read_image(img_path)
            with Image.open(mask_path) as f:
                f.load()
                mask = f.copy()
        except DECODE_ERRORS as e:
            logger.warning("skipping unreadable pair %s (%s: %s)", img_path, type(e).__name__, e)
            return None
        if img.size != mask.size:  # a mismatched pair is unusable, like an undecodable one
            logger.warning("skipping %s: mask is %s, image is %s", img_path, mask.size, img.size)
            return None
        if self.reduce_zero_label:
            # uint8 arithmetic wraps 0 -> 255: exactly the ignore index
            mask = Image.eval(mask, lambda v: (v - 1) % 256)
        if self.transform is not None:
            return self.transform(img, mask)
        return img, mask


def ade20k_folder(
    path: str | Path, split: str = "train", transform: Callable | None = None, reduce_zero_label: bool = True
) -> ADE20KFolder:
    """ADE20K-layout set of (image, mask) pairs; `transform` is joint, e.g. seg_train_transform."""
    return ADE20KFolder(path, split, transform, reduce_zero_label)
