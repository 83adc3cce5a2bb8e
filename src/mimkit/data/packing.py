"""Pack any data layout mimkit reads into WebDataset `.tar` shards with an index (`mimkit shards`)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
from pathlib import Path

from mimkit.data.shards import INDEX_FORMAT, INDEX_SUFFIX, LABEL_EXT, is_shard_spec, scan_tar, undecodable
from mimkit.data.sources import open_dataset
from mimkit.errors import DataError

logger = logging.getLogger("mimkit.data.shards")  # the logger name users filter on


def write_shards(src: str, out_dir: str | Path, shard_size: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Write every split of `src` (any layout open_dataset reads) as `<split>-NNNNNN.tar` + `<split>.index.json`.

    Samples go in an order shuffled by `seed` (class-sorted shards would starve streaming readers of classes);
    each keeps its position in the source's sorted listing as its key. Image files are stored byte for byte
    (no re-encoding); in-memory built-in sets are stored as PNG.
    Returns split -> {"count", "shards", "index", "pattern"}.
    """
    import webdataset as wds


    if shard_size < 1:
        raise DataError(f"--shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir).expanduser()
    if out.exists() and (any(out.glob("*.tar")) or any(out.glob(f"*{INDEX_SUFFIX}"))):
        raise DataError(f"{out} already holds shards; choose an empty OUT_DIR (nothing was overwritten)")
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT_DIR {out} is a file; give a new or empty folder for the shards")
    if is_shard_spec(src):
        raise DataError(f"{src} is already shards; give the image folder (or built-in set) to pack")
    sets = {"train": open_dataset(src, "train", None)}
    for split in ("val",):
        try:
            sets[split] = open_dataset(src, split, None)
        except DataError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for split, ds in sets.items():
        pattern = str(out / f"{split}-%06d.tar")
        written: list[str] = []
        skipped = 0
        with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=0.0,
                             post=written.append) as sink:
            for i in random.Random(seed).sample(range(len(ds.samples)), len(ds.samples)):
                name, label = ds.samples[i]
                sample = {"__key__": f"{i:08d}", LABEL_EXT: str(int(label))}
                if os.path.isfile(name):
                    ext = Path(name).suffix.lower().lstrip(".") or "jpg"
                    with open(name, "rb") as f:
                        sample[ext] = f.read()
                    why = undecodable(sample[ext])
                    if why:  # training would skip it each epoch; leave it out once, here
                        logger.warning("mimkit shards: skipping undecodable image %s (%s); not packed", name, why)
                        skipped += 1
                        continue
                else:  # a built-in set's in-memory image
                    buf = io.BytesIO()
                    ds[i][0].save(buf, format="PNG")
                    sample["png"] = buf.getvalue()
                if not ds.classes:
                    del sample[LABEL_EXT]
                sink.write(sample)
        paths = [Path(w) for w in written]
        shards = [{"name": p.name, "bytes": p.stat().st_size, "count": len(m), "members": m}
                  for p, m in ((p, scan_tar(p)) for p in paths)]
        index = out / f"{split}{INDEX_SUFFIX}"
        index.write_text(json.dumps({"format": INDEX_FORMAT, "split": split, "classes": list(ds.classes),
                                     "count": len(ds.samples) - skipped, "shards": shards}) + "\n")
        last = len(paths) - 1
        name = f"{split}-{{000000..{last:06d}}}.tar" if last else f"{split}-000000.tar"
        result[split] = {"count": len(ds.samples) - skipped, "shards": len(paths), "index": str(index),
                         "pattern": str(out / name), "skipped": skipped}
    return result
