"""Dask integration: conversion on ``dask.distributed`` and lazy dask arrays over layers.

Needs the ``dask`` extra (``pip install 'actfmt[dask]'``); imported only when used.

**Conversion** (``actfmt convert --executor dask [--scheduler ADDRESS]``): :func:`actfmt.convert.convert` plans,
locks, creates the partial store, verifies and renames in the calling process (the *driver*), exactly as a local
run does; only the copying of layers runs on the cluster, as :class:`~actfmt.convert.LayerTask` s through
:func:`dask_layer_runner`.  The unit of work is one layer: each task opens the source and the partial store
itself (``Writer.open``), copies its layer from row 0 and returns ``(layer, checksum, bytes)``.  Layers never
share a chunk, shard or file in zarr, safetensors and pt, so no two tasks ever write the same one.  HDF5 keeps a
split in one file that one process at a time may write (``parallel_layers = False``): its layers run as **one**
sequential task, so an HDF5 split uses one worker (several splits still go one after the other).

* Bit-exact and same checksums as a local run: each layer is copied and hashed in row order by the same code
  (:func:`actfmt.convert.copy_layer`), and the driver re-reads the result to verify it unless told not to.
* A failed task is retried (:data:`TASK_RETRIES` times, and dask reschedules the tasks of a worker that dies):
  a retry rewrites its whole layer from row 0, replacing every chunk/shard/byte range a partial attempt
  wrote, and nothing is published before every layer is done and verified.  When retries run out the error
  is raised; the partial store and its per-layer state stay for ``--resume``.
* Progress: the driver emits one ``advance`` per finished layer (its bytes) as tasks complete.
* Workers must reach the source and destination at the same paths as the driver (a shared filesystem) and
  have actfmt installed.

**Reading** (:func:`layer_to_dask`, behind ``LayerView.to_dask()``): a lazy ``[rows, hidden_dim]`` dask array
whose blocks are read by picklable tasks that open the files themselves (no handle is captured), so it computes
on the threaded scheduler or on a distributed cluster alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import ActfmtError, ConversionError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from actfmt.convert import LayerRunner, LayerTask
    from actfmt.formats.base import LayerInfo

__all__ = ["TARGET_CHUNK_BYTES", "TASK_RETRIES", "dask_layer_runner", "layer_to_dask"]

#: How many times a failed layer task is retried before the conversion fails.
TASK_RETRIES = 2
#: Default size of a ``to_dask`` block (rounded to whole chunks or shards of the store).
TARGET_CHUNK_BYTES = 64 * 1024 * 1024

_INSTALL_HINT = "install the dask extra: pip install 'actfmt[dask]'"


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ConversionError(f"--executor dask needs dask.distributed ({exc}); {_INSTALL_HINT}.") from None
    return distributed


# ----------------------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def dask_layer_runner(scheduler: Any, workers: int) -> Iterator[LayerRunner]:
    """A :data:`~actfmt.convert.LayerRunner` on dask.distributed, for the duration of one ``convert``.

    ``scheduler``: a ``distributed.Client`` (used as is, not closed), an address (``tcp://host:8786``) or
    ``None`` for a ``LocalCluster`` of ``workers`` single-threaded worker processes, closed at the end.
    """
    distributed = _import_distributed()
    client: Any
    cluster: Any = None
    own = True
    if isinstance(scheduler, distributed.Client):
        client, own = scheduler, False
    elif scheduler is None:
        cluster = distributed.LocalCluster(
            n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        client = distributed.Client(cluster, set_as_default=False)
    else:
        address = str(scheduler)
        try:
            client = distributed.Client(address, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConversionError(
                f"--scheduler {address}: cannot connect to a dask scheduler ({exc}); start one with "
                f"`dask scheduler` (and workers with `dask worker {address}`), or omit --scheduler for a "
                f"local cluster."
            ) from None

    def run(tasks: list[LayerTask]) -> Iterator[list[tuple[str, str, int]]]:
        from actfmt.convert import run_layer_task

        token = uuid.uuid4().hex[:8]
        # dask's model is one task per worker thread: a task's own codec threads would only oversubscribe the
        # cores the cluster already schedules (2 workers x 2 encode threads on 2 cores scaled 1.12x; 1 thread: 1.9x)
        tasks = [
            dataclasses.replace(
                t, options=dataclasses.replace(t.options, extra={**t.options.extra, "threads": 1})
            )
            for t in tasks
        ]
        futures = {
            client.submit(
                run_layer_task, t, key=f"actfmt-convert-{token}-{t.key}", retries=TASK_RETRIES, pure=False
            ): t
            for t in tasks
        }
        try:
            for fut in distributed.as_completed(list(futures), loop=client.loop):
                task = futures[fut]
                try:
                    yield fut.result()
                except ActfmtError:
                    raise
                except Exception as exc:
                    raise ConversionError(
                        f"{task.partial}: the task writing {task.key} failed on the dask cluster after "
                        f"{TASK_RETRIES} retries ({type(exc).__name__}: {exc}); nothing was published. Fix "
                        f"the cause and rerun with --resume to continue layer by layer."
                    ) from exc
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                client.cancel(pending)

    try:
        yield run
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()


# ----------------------------------------------------------------------------------------------------------
# lazy arrays


@dataclass(frozen=True)
class _LayerSource:
    """Array-like over one stored layer for ``da.from_array``: picklable, opens the files per access.

    ``shards`` (pt only): ``(shard file, rows)`` in order, so a block loads just the shards it covers.
    """

    path: str
    format: str
    pos: int
    name: str
    rows: int
    hidden_dim: int
    stored: str  # torch dtype name: float16 / bfloat16 / float32
    shards: tuple[tuple[str, int], ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.hidden_dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        from actfmt.formats.base import storage_numpy_dtype

        return storage_numpy_dtype(self.stored)

    def __dask_tokenize__(self) -> Any:
        return (type(self).__name__, self.path, self.format, self.pos, self.name, self.shape, self.stored)

    def _numpy(self, t: Any) -> np.ndarray:
        import torch

        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(self.dtype)  # type: ignore[no-any-return]
        return t.numpy()  # type: ignore[no-any-return]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the stored numpy dtype, as an array of its own."""
        import numpy as np

        stop = max(start, stop)
        if self.shards is not None:
            from actfmt.formats.pt import load_shard

            parts = []
            lo = 0
            for file, n in self.shards:
                hi = lo + n
                if hi > start and lo < stop:
                    t = load_shard(file, mmap=True)
                    parts.append(self._numpy(t[max(start, lo) - lo : min(stop, hi) - lo]))
                lo = hi
            if not parts:
                return np.empty((0, self.hidden_dim), dtype=self.dtype)
            return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()  # never a view of a map
        from actfmt.formats import open_reader

        with open_reader(self.path, self.format) as r:
            return self._numpy(r.read(self.pos, start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        from actfmt.formats import open_reader

        with open_reader(self.path, self.format) as r:
            return self._numpy(r.take(self.pos, rows))

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1 :]
        rows, cols = (key + (slice(None),) * 2)[:2]
        if len(key) > 2:
            raise IndexError(f"too many indices for a 2-D layer: {key!r}")
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.rows)
            out = self.read_rows(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        elif isinstance(rows, (int, np.integer)):
            i = int(rows) + (self.rows if rows < 0 else 0)
            if not 0 <= i < self.rows:
                raise IndexError(f"row {rows} out of range for {self.name} with {self.rows} rows")
            out = self.read_rows(i, i + 1)[0]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = np.where(idx < 0, idx + self.rows, idx)
            out = self.take(idx.reshape(-1)).reshape(*idx.shape, self.hidden_dim)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        return out[..., cols]  # type: ignore[no-any-return]


def _bf16_bits_to_float32(block: np.ndarray) -> np.ndarray:
    import numpy as np

    return (block.astype(np.uint32) << np.uint32(16)).view(np.float32)  # exact: bf16 is float32's top half


def _to_float32(block: np.ndarray) -> np.ndarray:
    import numpy as np

    return block.astype(np.float32)


def _group_rows(units: list[int], target_rows: int) -> list[int]:
    """Consecutive ``units`` (chunks or shards, in rows) grouped into blocks of about ``target_rows``."""
    out: list[int] = []
    acc = 0
    for n in units:
        if acc and acc + n > target_rows:
            out.append(acc)
            acc = 0
        acc += n
    if acc or not out:
        out.append(acc)
    return out


def _store_chunk_rows(path: Path, format: str, pos: int) -> int | None:
    """Rows per stored chunk of a zarr array or HDF5 dataset (blocks are whole chunks), else None."""
    from actfmt.formats import open_reader

    with (
        contextlib.suppress(ActfmtError, OSError, KeyError, IndexError, ValueError),
        open_reader(path, format) as r,
    ):
        if format == "zarr":
            return int(r.chunk_rows[pos])  # type: ignore[attr-defined]
        if format == "hdf5":
            chunks = r._dataset(pos).chunks  # type: ignore[attr-defined]
            return int(chunks[0]) if chunks else None
    return None


def layer_to_dask(
    path: str | Path,
    format: str,
    pos: int,
    info: LayerInfo,
    chunk_rows: int | None = None,
    dtype: Any = None,
) -> Any:
    """A lazy dask array ``[rows, hidden_dim]`` over layer position ``pos`` of the split at ``path``.

    Blocks are ``chunk_rows`` rows (default: about 64 MiB), rounded to whole shards for pt and to whole stored
    chunks for zarr/hdf5 when ``chunk_rows`` is not given.  ``dtype``: ``None`` gives the stored numpy dtype:
    float16 and float32 as such, **bfloat16 as its uint16 bits** (numpy has no bfloat16;
    ``torch.from_numpy(x).view(torch.bfloat16)`` restores it exactly); ``"float32"`` upcasts lazily and exactly.
    """
    try:
        import dask.array as da
        import numpy as np
        from dask.base import tokenize
    except ImportError as exc:
        raise ActfmtError(f"to_dask() needs dask ({exc}); {_INSTALL_HINT}.") from None
    from actfmt.formats.base import storage_numpy_dtype

    p = Path(path).resolve()  # absolute: workers may run elsewhere
    stored = storage_numpy_dtype(info.dtype)
    want = stored if dtype is None else np.dtype(dtype)
    if want not in (stored, np.dtype(np.float32)):
        raise ValueError(
            f"to_dask(dtype={dtype!r}): {info.name} is {info.dtype}; choose None (stored: {stored}) or 'float32'."
        )
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"to_dask(chunk_rows={chunk_rows}): must be at least 1.")
    row_bytes = max(1, info.hidden_dim * info.itemsize)
    target = int(chunk_rows) if chunk_rows else max(1, TARGET_CHUNK_BYTES // row_bytes)
    shards: tuple[tuple[str, int], ...] | None = None
    if format == "pt":
        from actfmt.formats.pt import list_layers, list_shards

        layer_dir = dict(list_layers(p))[info.index]
        files = [str(f) for _, f in list_shards(layer_dir)]
        rows = list(info.shard_rows or ())
        if len(rows) != len(files) or sum(rows) != info.rows:
            from actfmt.formats.pt import load_shard

            rows = [int(load_shard(f).shape[0]) for f in files]  # mmap: headers only
        shards = tuple(zip(files, rows, strict=True))
        blocks = _group_rows(rows, target)
    else:
        unit = None if chunk_rows else _store_chunk_rows(p, format, pos)
        step = target if unit is None else max(1, target // unit) * unit
        blocks = [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]
    src = _LayerSource(str(p), format, pos, info.name, info.rows, info.hidden_dim, info.dtype, shards)
    name = f"actfmt-{info.name}-{tokenize(src, p.stat().st_mtime_ns, tuple(blocks))}"
    arr = da.from_array(
        src,
        chunks=(tuple(blocks), (info.hidden_dim,)),
        name=name,
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0), dtype=stored),
    )
    if want == stored:
        return arr
    fn = _bf16_bits_to_float32 if info.dtype == "bfloat16" else _to_float32
    return arr.map_blocks(fn, dtype=np.float32)
