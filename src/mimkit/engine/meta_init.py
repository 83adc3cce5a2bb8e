"""Deferred initialisation for --strategy fsdp: build on the meta device, shard, then materialise shard by shard.

    rec = InitRecorder()
    with rec, torch.device("meta"):
        model = build()                 # records every op the constructor, init and load_state_dict run
    metas = meta_tensors(model)
    fully_shard(...); model.to_empty(device="cpu")       # DTensor shards, uninitialised
    rec.materialise([(metas[n], t) for n, t in meta_tensors(model).items()])   # one tensor at a time

The replay runs the recorded ops in their order with the real CPU generator, so every random draw is the one a
normal build makes with the same seed and the weights are bitwise a normal build's (a build that reseeds, as
fork_rng + manual_seed, is followed: meta draws move no generator, so the state each draw saw names its stream).
An op whose result a later op overwrites whole (a Linear's default init before the model's xavier init) still draws
its numbers, on a scratch tensor freed at once; a tensor lives from its first needed write to its last read, then
its rank's rows go into the parameter's shard and it is freed; a tensor copied whole from a loaded checkpoint is
that checkpoint's own storage. So a rank holds about one parameter in full, never the model. torch.tensor(data) on
meta dispatches no op, so it is made on CPU and moved (a recorded copy). Works for any model whose init is
recordable: an init that reads values (torch's rejection-sampling trunc_normal_ skips meta tensors) would give
other weights, and a random draw off the meta device during the build is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# in-place ops that write every element of `self` without reading it (a write before one of them is dead)
_OVERWRITE = {"fill_", "zero_", "uniform_", "normal_", "copy_", "random_", "bernoulli_", "exponential_",
              "geometric_", "cauchy_", "log_normal_"}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    reads: set = field(default_factory=set)  # storage keys whose values the op reads
    writes: set = field(default_factory=set)  # storage keys it writes (in place or new outputs)
    overwrites: set = field(default_factory=set)  # of `writes`: written whole without being read
    new: list = field(default_factory=list)  # (meta output, index in the flat real outputs) of new storages
    rng: Optional[bytes] = None  # a random op: the generator state the build saw (changes only on a reseed)
    live: bool = True


class _KeepConstants(TorchFunctionMode):
    """torch.tensor(data) on the meta device keeps no data and dispatches no op: made on CPU, then moved to meta
    (a recorded copy whose CPU source the replay reads)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type == "meta":
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        return func(*args, **kwargs)


class InitRecorder(TorchDispatchMode):
    """Records the ops a model's build runs on the meta device, to replay them on a real device later."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.known: dict[int, torch.Tensor] = {}  # storage key -> a meta tensor of it (kept: keys stay unique)

    def __enter__(self):
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        # load_state_dict into meta parameters warns that the copy is a no-op: here it is recorded instead
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        self._constants = _KeepConstants()
        self._constants.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._constants.__exit__(*exc)
        self._quiet.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_meta]
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not flat_in and not any(o.is_meta for o in flat_out):
            if torch.Tag.nondeterministic_seeded in func.tags:
                raise RuntimeError(f"the model's build draws random numbers off the meta device ({func}): "
                                   "it cannot be deferred")
            return out  # a CPU constant (a sin-cos table): used as it is at replay
        op = _Op(func, args, kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        for i, a in enumerate(schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(v, torch.Tensor) and v.is_meta:
                k = _key(v)
                self.known.setdefault(k, v)
                if a.alias_info is not None and a.alias_info.is_write:
                    op.writes.add(k)
                    whole = v.numel() * v.element_size() == v.untyped_storage().nbytes()
                    if name.endswith("_") and name.rstrip("_") + "_" in _OVERWRITE and whole and i == 0:
                        op.overwrites.add(k)
                        continue
                op.reads.add(k)
            elif isinstance(v, (list, tuple)):
                op.reads.update(_key(t) for t in v if isinstance(t, torch.Tensor) and t.is_meta)
        for j, o in enumerate(flat_out):
            if o.is_meta and _key(o) not in self.known:  # a new storage (not a view of an input)
                self.known[_key(o)] = o
                op.writes.add(_key(o))
                op.overwrites.add(_key(o))
                op.new.append((o, j))
        if torch.Tag.nondeterministic_seeded in func.tags:
            # meta draws move no generator, so the state seen only changes when the build reseeds (manual_seed,
            # fork_rng): the replay then switches streams as the build did
            op.rng = torch.get_rng_state().numpy().tobytes()
        if op.writes or op.rng is not None:
            self.ops.append(op)  # views and shape queries need no replay: a view is rebuilt from its storage
        return out

    # -------------------------------------------------------------------------------------------- replay
    def materialise(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu",
                    draws: bool = True) -> int:
        """Replay the build on `device`, copying each final tensor into place -> the peak bytes held at once.

        pairs: (the meta tensor the build made, the live tensor it became: a DTensor shard or a plain tensor).
        draws=False skips the random draws of dead writes (when no random value is needed: a checkpoint fills
        the weights and restores the generator)."""
        device = torch.device(device)
        final: dict[int, list] = {}
        for meta, live in pairs:
            final.setdefault(_key(meta), []).append((meta, live))
        needed = set(final)
        for op in reversed(self.ops):  # liveness: which writes a later op or a final tensor reads
            op.live = bool(op.writes & needed)
            if op.live:
                needed -= op.overwrites
                needed |= op.reads
        last: dict[int, int] = {}  # the last live op touching a storage: then it is finished and freed
        last_write: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            if op.live:
                for k in op.reads | op.writes:
                    last[k] = i
                for k in op.writes:
                    last_write[k] = i
        borrowed: set[int] = set()  # storages that are a loaded checkpoint's own tensors (not held by the replay)
        real: dict[int, torch.UntypedStorage] = {}
        held = peak = 0
        saved = torch.get_rng_state()
        streams: dict[bytes, torch.Tensor] = {}  # the state each stream the build drew from has reached here
        stream: Optional[bytes] = None
        try:
            for k in set(final) - set(last):  # written by no live op (torch.empty): zeros, as to_empty leaves
                self._finish(final[k], None)
            for i, op in enumerate(self.ops):
                if not op.live and not (draws and op.rng is not None):
                    continue  # its result is never read and it draws nothing
                if op.rng is not None and op.rng != stream:  # the first draw, or the build reseeded
                    if stream is not None:
                        streams[stream] = torch.get_rng_state()
                    stream = op.rng
                    torch.set_rng_state(streams.get(stream, torch.frombuffer(bytearray(stream), dtype=torch.uint8)))
                if op.live and self._borrow(op, i, real, last_write, device):
                    borrowed.add(_key(op.args[0]))
                    op_done = True
                else:
                    op_done = False
                scratch: dict[int, torch.UntypedStorage] = {}
                store = real if op.live else scratch  # a dead write still draws its numbers, on scratch
                for k in () if op_done else op.reads | op.writes:
                    if k not in store and not (k in op.overwrites and any(k == _key(o) for o, _ in op.new)):
                        store[k] = torch.UntypedStorage(self.known[k].untyped_storage().nbytes(), device=device)
                        held += store[k].nbytes() if op.live else 0

                def to_real(a, store=store):
                    if isinstance(a, torch.device) and a.type == "meta":
                        return device
                    if isinstance(a, torch.Tensor) and a.is_meta:
                        s = store[_key(a)]
                        return torch.empty(0, dtype=a.dtype, device=device).set_(
                            s, a.storage_offset(), a.shape, a.stride())
                    return a

                out = None if op_done else op.func(*tree_map(to_real, op.args), **tree_map(to_real, op.kwargs))
                flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
                for o, j in () if op_done else op.new:
                    store[_key(o)] = flat_out[j].untyped_storage()
                    held += flat_out[j].untyped_storage().nbytes() if op.live else 0
                peak = max(peak, held)
                for k in [k for k in real if last.get(k) == i]:
                    if k in final:
                        self._finish(final[k], real[k])
                    gone = real.pop(k)
                    held -= 0 if k in borrowed else gone.nbytes()
        finally:
            torch.set_rng_state(saved)
        return peak

    @staticmethod
    def _borrow(op: _Op, i: int, real: dict, last_write: dict, device: torch.device) -> bool:
        """A whole tensor copied from a CPU tensor the build was handed (a checkpoint's weights, loaded into the
        model with load_state_dict) and never written again: its storage is that tensor's, no copy is held."""
        if op.func is not torch.ops.aten.copy_.default or len(op.args) < 2:
            return False
        dst, src = op.args[0], op.args[1]
        k = _key(dst)
        ok = (k in op.overwrites and k not in real and isinstance(src, torch.Tensor) and not src.is_meta
              and src.device == device and src.dtype == dst.dtype and src.shape == dst.shape
              and last_write.get(k) == i and dst.is_contiguous() and dst.storage_offset() == 0
              and src.is_contiguous() and src.storage_offset() == 0
              and src.untyped_storage().nbytes() == dst.untyped_storage().nbytes())
        if ok:
            real[k] = src.untyped_storage()
        return ok

    @staticmethod
    def _finish(items: list, storage: Optional[torch.UntypedStorage]) -> None:
        """Copy a finished tensor (or zeros) into each live parameter / buffer it became: a shard's rows or all."""
        for meta, live in items:
            with torch.no_grad():
                local = live.to_local() if hasattr(live, "to_local") else live
                if storage is None:
                    local.zero_()
                    continue
                full = torch.empty(0, dtype=meta.dtype, device=storage.device).set_(
                    storage, meta.storage_offset(), meta.shape, meta.stride())
                if hasattr(live, "placements"):
                    full = _local_rows(full, live)
                local.copy_(full)


def _local_rows(full: torch.Tensor, dt) -> torch.Tensor:
    """This rank's part of `full` under the DTensor `dt`'s placements (FSDP2: rows of dim 0, torch.chunk style)."""
    from torch.distributed.tensor import Shard

    out = full
    for mesh_dim, p in enumerate(dt.placements):
        if isinstance(p, Shard):
            n, r = dt.device_mesh.size(mesh_dim), dt.device_mesh.get_local_rank(mesh_dim)
            chunks = torch.chunk(out, n, dim=p.dim)
            out = chunks[r] if r < len(chunks) else out.narrow(p.dim, 0, 0)
    return out


def meta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a model built on meta, by name (taken before sharding replaces them)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {k: v for k, v in named.items() if v is not None}
