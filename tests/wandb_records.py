"""Read an offline wandb run's `run-<id>.wandb` back: wandb's LevelDB-style record log, parsed with wandb's own
protobuf definitions (wandb 0.31 keeps history, summary and config only there until `wandb sync`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768  # the log's block size; a record header never straddles a block boundary
HEADER = 7  # file header: ':W&B', magic 0xBEE1, version; record header: crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every `wandb_internal_pb2.Record` in one .wandb file, in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind == FULL:
            parts = chunk
        elif kind == FIRST:
            parts = chunk
            continue
        elif kind == MIDDLE:
            parts += chunk
            continue
        elif kind == LAST:
            parts += chunk
        else:  # zero padding at the end
            break
        rec = pb.Record()
        rec.ParseFromString(parts)
        out.append(rec)
    return out


def finished(path: str | Path, timeout: float = 60.0) -> Path:
    """Wait until the run's exit record is on disk (wandb-core writes the file asynchronously, after finish())."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return Path(path)
        except (AssertionError, OSError, struct.error):
            pass  # not written yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout:.0f} s")
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: str | Path) -> dict:
    """{'run': RunRecord, 'history': [{key: value}], 'config': {key: value}, 'summary': {key: value}} of a file."""
    run, history, config, summary = None, [], {}, {}
    for rec in records(finished(path)):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            for item in rec.run.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            for item in rec.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
    return {"run": run, "history": history, "config": config, "summary": summary}
