"""One door to every data layout: an image folder, WebDataset shards or a built-in set, by the spec the user gave."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from mimkit.data.builtin import builtin_dataset, is_builtin, list_builtin
from mimkit.data.datasets import image_folder
from mimkit.data.shards import is_shard_spec, open_shards
from mimkit.errors import DataError, suggest

logger = logging.getLogger(__name__)


def open_dataset(
    spec: str | Path,
    split: str | None = "train",
    transform: Callable | None = None,
    require_labels: bool = False,
    min_classes: int = 2,
) -> Dataset:
    """A folder path (class folders, flat, with or without train/ and val/), tar shards or a built-in name -> Dataset.

    Items are (transform(image), label); `.classes` is [] for unlabelled sets. An existing folder wins over a
    built-in of the same name. Every problem (missing, empty, unlabelled where labels are needed): DataError.
    """
    if is_shard_spec(spec):  # WebDataset .tar shards: a pattern, one .tar or a folder of them
        return open_shards(spec, split, transform, require_labels=require_labels, min_classes=min_classes)
    path = Path(spec).expanduser()
    if path.exists():
        if is_builtin(str(spec)):
            logger.info("'%s' is a folder here; reading it rather than the built-in set of that name", spec)
        return image_folder(path, transform, split, require_labels=require_labels, min_classes=min_classes)
    if is_builtin(str(spec)):
        ds = builtin_dataset(str(spec), split or "train", transform)
        if require_labels and len(ds.classes) < min_classes:
            raise DataError(f"built-in set '{spec}' is unlabelled; a labelled set is needed here "
                            f"(labelled built-ins: {', '.join(n for n in list_builtin() if n != 'demo')})")
        return ds
    raise DataError(f"data path not found: {spec}{suggest(str(spec), list_builtin())} "
                    f"(a folder, or a built-in set: {', '.join(list_builtin())})")
