"""WebDataset tar shards: `write_shards` (the `mimkit shards` command) and a map-style reader over them.

    --data_path 'shards/train-{000000..000127}.tar'   a brace range (or a glob, or one .tar)
    --data_path shards/                              a folder `mimkit shards` wrote: train-*.tar, val-*.tar

A sample is the tar members sharing a key (WebDataset's convention: `key.jpg`, `key.cls`); the image is the
member with an image extension, the label the integer text of `.cls` (no `.cls`: label 0, unlabelled).

Why a map-style view and not a streaming pipeline: `write_shards` leaves an index beside the shards
(`<split>.index.json`: every sample's image offset and size inside its tar, the labels, the counts), and shards
from elsewhere are indexed by reading their tar headers once. Item i is then one seek and one read, so the
engine's EpochSampler + SeededSamples apply unchanged: the order is a function of (seed, epoch, rank), DDP gives
each sample to one rank per epoch, a mid-epoch resume is bitwise, and a corrupt member comes back as None and is
skipped and counted by `collate_batch`, all exactly as for folders. A streaming reader would read shards
sequentially, but its order would depend on how shards fall to workers and ranks, and resume would be approximate.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mimkit.data.datasets import DECODE_ERRORS
from mimkit.data.images import read_image
from mimkit.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff")
LABEL_EXT = "cls"
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "mimkit-shards-1"
SPLITS = ("train", "val", "test")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
_WARNED: set[tuple[str, int]] = set()  # (shard, offset) of members already reported unreadable in this process


# ---------------------------------------------------------------------------------------------- naming
def is_shard_spec(spec: str | Path) -> bool:
    """True for a .tar path, a brace range / glob of them, or a folder of .tar shards (no images, no sub-folders)."""
    s = str(spec)
    if s.rstrip("}").lower().endswith(COMPRESSED):
        raise DataError(f"{s}: compressed shards are not supported; use uncompressed .tar shards "
                        f"(decompress them, or repack the images with `mimkit shards`)")
    if s.endswith(".tar") or (s.endswith(".tar}") and "{" in s):
        return True
    if ("{" in s and ".." in s) or any(c in s for c in "*?["):
        return ".tar" in s
    path = Path(s).expanduser()
    if not path.is_dir():
        return False
    has_tar = False
    for e in os.scandir(path):  # stops at the first sign of an image folder (a sub-folder or an image)
        if e.name.startswith("."):
            continue
        if e.is_dir():
            return False
        if e.name.endswith(".tar"):
            has_tar = True
        elif has_file_allowed_extension(e.name, IMG_EXTENSIONS):
            return False
    return has_tar


def shard_paths(spec: str | Path, split: str | None = "train") -> list[Path]:
    """The shard files `spec` names for `split` (sorted for a folder, in pattern order otherwise)."""
    s = str(spec)
    path = Path(s).expanduser()
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".tar")
        named = {sp: [p for p in tars if p.name.startswith(f"{sp}-")] for sp in SPLITS}
        if split in named and named[split]:
            return named[split]
        if split in (None, "train") and not any(named.values()):
            return tars  # unsplit shards: all of them are the training set
        raise DataError(f"no {split} shards in {path} (looked for {split}-*.tar)")
    if split not in (None, "train"):
        # a pattern names the training shards; another split is <split>-*.tar in the same folder
        own = _pattern_paths(s)
        if all(p.name.startswith(f"{split}-") for p in own):
            raise DataError(f"{s} names {split} shards themselves, so its {split} split would be the same images; "
                            f"give the training shards (e.g. {path.parent / 'train-*.tar'}, or the folder "
                            f"{path.parent}) and the {split}-*.tar beside them are the {split} split")
        return shard_paths(path.parent, split)
    paths = _pattern_paths(s)
    held_out = [p for p in paths if p.name.startswith(("val-", "test-"))]
    if held_out and len(held_out) < len(paths):  # a glob like dir/*.tar also matches the held-out shards
        logger.warning("%s: leaving out %d val-/test-*.tar shard(s) it matches (held out, not training data)",
                       s, len(held_out))
        paths = [p for p in paths if p not in held_out]
    return paths


def _pattern_paths(s: str) -> list[Path]:
    """Every existing file a brace range / glob / single path names; DataError when none or some are missing."""
    from webdataset.shardlists import expand_urls

    names = [n for part in expand_urls(s) for n in (sorted(glob.glob(os.path.expanduser(part)))
                                                    if any(c in part for c in "*?[") else [part])]
    paths = [Path(n).expanduser() for n in names]
    found = [p for p in paths if p.is_file()]
    if not found:
        raise DataError(f"no shard matches {s}")
    if len(found) < len(paths):
        missing = [p for p in paths if not p.is_file()]
        raise DataError(f"{len(missing)} of the {len(paths)} shards {s} names do not exist (first: {missing[0]})")
    return paths


def has_shard_split(spec: str | Path, split: str) -> bool:
    """True when `spec` (a shard folder or pattern) has shards of `split` (e.g. val-*.tar beside train-*.tar)."""
    try:
        shard_paths(spec, split)
    except DataError:
        return False
    return True


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's member naming: 'dir/key.ext.more' -> ('dir/key', 'ext.more')."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


# ---------------------------------------------------------------------------------------------- index
def scan_tar(path: Path) -> list[list]:
    """[key, image offset, image size, label] per sample of one tar (label -1 when it has no .cls)."""
    samples: dict[str, list] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key.startswith("__") or os.path.basename(key).startswith("."):
                    continue
                entry = samples.setdefault(key, [key, -1, 0, -1])
                if ext in IMAGE_EXTS and entry[1] < 0:
                    entry[1], entry[2] = m.offset_data, m.size
                elif ext == LABEL_EXT:
                    text = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                    try:
                        entry[3] = int(text)
                    except ValueError:
                        raise DataError(f"{path}: {m.name} holds '{text[:20]}', not an integer class") from None
    except (tarfile.ReadError, EOFError) as e:
        raise DataError(f"{path} is not a readable tar file ({e}): truncated, or not a plain .tar shard") from None
    return [s for s in samples.values() if s[1] >= 0]


def _load_indexes(folder: Path) -> dict[str, dict]:
    """Shard name -> its entry from every index file in `folder`."""
    out: dict[str, dict] = {}
    for f in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable shard index %s (%s)", f, e)
            continue
        if data.get("format") != INDEX_FORMAT:
            continue
        for shard in data.get("shards", []):
            out[shard["name"]] = {**shard, "classes": data.get("classes", [])}
    return out


def index_shards(paths: list[Path]) -> tuple[list[tuple[int, int, int, int]], list[str], list[int]]:
    """(samples as (shard, offset, size, label), class names, per-shard counts); index files used when fresh."""
    indexes: dict[Path, dict[str, dict]] = {}
    samples: list[tuple[int, int, int, int]] = []
    counts, classes = [], []
    for k, p in enumerate(paths):
        folder = p.parent
        if folder not in indexes:
            indexes[folder] = _load_indexes(folder)
        entry = indexes[folder].get(p.name)
        if entry is not None and entry.get("bytes") == p.stat().st_size:
            members, classes = entry["members"], entry["classes"] or classes
        else:
            members = scan_tar(p)
        counts.append(len(members))
        samples.extend((k, int(off), int(size), int(label)) for _, off, size, label in members)
    return samples, list(classes), counts


# ---------------------------------------------------------------------------------------------- reading
class ShardDataset(Dataset):
    """Map-style view over tar shards. Items: (transform(PIL image), label), or None for an undecodable member.

    `index`: (N, 4) int64 array of (shard, offset, size, label); NumPy rather than a list of tuples, so that
    DataLoader workers share it copy-on-write instead of copying it object by object.
    """

    def __init__(self, spec: str, paths: list[Path], transform: Callable | None = None, mode: str = "RGB") -> None:
        self.root = spec
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.mode = mode
        samples, classes, self.counts = index_shards(paths)
        self.index = np.asarray(samples, dtype=np.int64).reshape(-1, 4)
        labels = self.index[:, 3]
        self.labelled = len(labels) > 0 and bool((labels >= 0).all())
        if self.labelled and not classes:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        self.classes = classes if self.labelled else []
        self.targets = labels.copy() if self.labelled else np.zeros_like(labels)

    def __len__(self) -> int:
        return len(self.index)

    def read_bytes(self, index: int) -> tuple[bytes, int]:
        """The image member's raw bytes and the label."""
        shard, offset, size, _ = (int(v) for v in self.index[index])
        with open(self.paths[shard], "rb") as f:
            f.seek(offset)
            return f.read(size), int(self.targets[index])

    def member_name(self, index: int) -> str:
        """'shard.tar:member' of item `index`, read from the tar header just before the member's data."""
        shard, offset = self.paths[int(self.index[index, 0])], int(self.index[index, 1])
        try:
            with open(shard, "rb") as f:
                f.seek(offset - tarfile.BLOCKSIZE)
                name = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape").name
        except (OSError, tarfile.TarError, ValueError):
            name = f"member at byte {offset}"
        return f"{shard}:{name}"

    def warn_unreadable(self, index: int, e: BaseException) -> None:
        """Name the undecodable member, once per member and process (persistent workers: once per run)."""
        key = (self.paths[int(self.index[index, 0])], int(self.index[index, 1]))
        if key in _WARNED:
            return
        _WARNED.add(key)
        why = str(e).split(" <_io.")[0]  # PIL names the BytesIO object, which tells the user nothing
        logger.warning("skipping unreadable image %s (%s: %s)", self.member_name(index), type(e).__name__, why)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """(transform(image), label), or None (with a warning) when the member cannot be decoded."""
        data, label = self.read_bytes(index)
        try:
            img = read_image(io.BytesIO(data), self.mode)  # as for files: EXIF orientation, 16-bit, alpha, ...
        except DECODE_ERRORS as e:
            self.warn_unreadable(index, e)
            return None
        return (self.transform(img) if self.transform is not None else img), label


def open_shards(spec: str | Path, split: str | None = "train", transform: Callable | None = None,
                require_labels: bool = False, min_classes: int = 2) -> ShardDataset:
    """The shards `spec` names for `split` as a dataset; every problem is one DataError line."""
    paths = shard_paths(spec, split)
    ds = ShardDataset(str(spec), paths, transform)
    if not len(ds):
        raise DataError(f"no images in the shards {spec} (no member ending in {', '.join(IMAGE_EXTS[:5])}, ...)")
    if require_labels and len(ds.classes) < min_classes:
        raise DataError(f"the shards {spec} carry {len(ds.classes)} class(es); a labelled set needs .cls labels "
                        f"with at least {min_classes} classes")
    logger.info("%s: %d images in %d shard(s)", spec, len(ds), len(paths))
    return ds


# ---------------------------------------------------------------------------------------------- writing
def undecodable(data: bytes) -> str | None:
    """Why PIL cannot decode `data` ('ErrorType: message'), or None when it decodes (JPEG at 1/8 scale: fast)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (1, 1))  # JPEG: DCT-domain downscale, still reads the whole stream
            im.load()
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {str(e).split(' <_io.')[0]}"
    return None
