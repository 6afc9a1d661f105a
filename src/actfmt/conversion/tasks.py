"""Layer tasks: the unit of work any executor runs (threads here, processes on a dask cluster).

A :class:`LayerTask` copies some layers of one split into the partial store, then re-reads them from there and
checks their checksums (the verification overlaps the other layers' copying instead of being a second pass).
It holds locations and plain data only, so it pickles; each task opens the source and the partial store
itself.  One task per layer when the format lets processes write different layers at once
(``Format.parallel_layers``), else one task holding every layer (HDF5: one file, one writer).  No two tasks
ever write the same chunk, shard or file, and a retried task rewrites its layers from row 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from actfmt.checksum import ALGORITHM, Hasher, layer_checksum
from actfmt.errors import ConversionError
from actfmt.formats import get_format, open_reader
from actfmt.formats.base import Reader, SplitSpec, WriteOptions, Writer
from actfmt.formats.crc import crc32
from actfmt.formats.dtypes import as_array, to_torch, torch_dtype
from actfmt.formats.rowstore import Runs
from actfmt.moments import Moments, RowBatcher
from actfmt.storage import Location, scan_runs

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


__all__ = [
    "Cancelled",
    "LayerResult",
    "LayerRunner",
    "LayerTask",
    "copy_layer",
    "layer_tasks",
    "run_layer_task",
]

T = TypeVar("T")


@dataclass(frozen=True)
class LayerTask:
    """Copy (and verify) some layers of one split into its partial store.  Picklable."""

    source: Location
    source_format: str
    work: Location  # the partial store, created by the driver
    to: str
    spec: SplitSpec
    options: WriteOptions
    layers: tuple[int, ...]
    key: str  # human-readable: "<split location>/<layer names>"
    verify: bool = True
    #: ``--dtype``: the dtype every layer is cast to (``spec`` already says so), else ``None``.
    cast: str | None = None
    #: The destination as the user named it (for messages).
    final: str = ""
    #: Compute each layer's statistics from the bytes on their way (``convert --no-stats`` turns it off).
    stats: bool = True
    #: Read block k+1 on a helper thread while block k is written (two cores' worth per task).  Off on dask,
    #: whose model is one task per worker thread: there the read and the write of a block run one after the
    #: other on the task's thread, and other tasks fill the other cores.
    read_ahead: bool = True


@dataclass
class LayerResult:
    """What a task reports for one layer."""

    name: str
    checksum: str
    nbytes: int
    extra: dict[str, Any] = field(default_factory=dict)


#: Runs layer tasks somewhere; yields each task's results as the tasks finish, in any order.
LayerRunner = Callable[[list[LayerTask]], Iterator[list[LayerResult]]]


def _cast(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """An explicit ``--dtype`` cast (torch's rounding: round to nearest even)."""
    return as_array(to_torch(arr, src).to(torch_dtype(dst)), dst)


class Cancelled(Exception):
    """Another task failed, or the user interrupted: stop between blocks."""


def copy_layer(
    reader: Reader,
    writer: Writer,
    pos: int,
    spec: SplitSpec,
    on_bytes: Callable[[int], None] | None = None,
    cast: str | None = None,
    stop: threading.Event | None = None,
    stats: bool = False,
    read_ahead: bool = True,
) -> LayerResult:
    """Copy layer ``pos`` from row 0 (a retried copy rewrites the whole layer).  With ``stats``, the layer's
    :class:`~actfmt.moments.Moments` are computed from the same bytes on their way (no extra read).

    Blocks are the writer's (``Writer.block_rows``).  A helper thread reads and hashes block k+1 while block k
    is written: reads, hashing and writes overlap (all release the GIL), and at most two blocks are in memory.
    Without ``read_ahead`` the same steps run one after the other on the calling thread (one core per task).
    When the rows are stored raw in the source and no cast happens, the writer also gets their byte runs and
    may copy them in the kernel.  The checksum is of the converted rows in row order, whatever runs the copy.
    """
    info = spec.layers[pos]
    source = reader.layer_info(pos)
    source_dtype = source.dtype
    bounds, start = [], 0
    for n in writer.block_rows(pos):
        bounds.append((start, start + n))
        start += n
    if start != info.rows:
        raise ConversionError(
            f"{writer.location}/{info.name}: the writer's blocks cover {start} rows, not {info.rows}."
        )
    h = Hasher()
    convert = cast is not None and cast != source_dtype
    # the source's own checksum, recorded when it was converted: the bytes read are hashed as they pass (the
    # source's bytes, before any cast) and must match it, so damaged data is never laundered into a clean copy
    recorded = _recorded_checksum(reader, source.name)
    hs = Hasher() if convert and recorded is not None else h
    spent = {"read": 0.0, "write": 0.0, "stats": 0.0}
    # two buffers, reused: block k+1 is read into one while block k (in the other) is written; no fresh pages
    # to fault in for every block, and memory stays at two blocks whatever the split's size
    import numpy as np

    most = max((b - a for a, b in bounds), default=0) * source.row_bytes
    buffers = [np.empty(most, dtype=np.uint8), np.empty(most, dtype=np.uint8)]

    raw = not convert and writer.copies_raw(pos)
    moments = Moments(info.hidden_dim) if stats else None
    batcher = RowBatcher(moments, info.dtype, info.row_bytes) if moments is not None else None

    def scan(a: int, b: int) -> Runs | None:
        """The block as the source's byte runs, hashed (and CRC'd) piece by piece: never held in memory."""
        runs = reader.runs(pos, a, b)
        if runs is None:
            return None
        crc = [0]

        def visit(piece: memoryview) -> None:
            h.update(piece)
            if writer.wants_crc32:
                crc[0] = crc32(piece, crc[0])
            if batcher is not None:
                t = time.perf_counter()
                batcher.feed(piece)
                spent["stats"] += time.perf_counter() - t

        scan_runs(runs, visit)
        return Runs(runs, crc[0] if writer.wants_crc32 else None)

    def load(k: int) -> tuple[np.ndarray | None, list[Any] | None]:
        t0, s0 = time.perf_counter(), spent["stats"]
        a, b = bounds[k]
        copied = scan(a, b) if raw else None
        if copied is not None:
            spent["read"] += time.perf_counter() - t0 - (spent["stats"] - s0)
            return None, copied
        block = reader.read_array(pos, a, b, buffers[k % 2])
        runs = None
        if convert:
            if hs is not h:
                hs.update(block)
            block = _cast(block, source_dtype, info.dtype)
        else:
            runs = reader.runs(pos, a, b)
        h.update(block)  # one loading thread runs the loads in order: the hash sees row order
        if moments is not None:
            t = time.perf_counter()
            moments.update(block, info.dtype)
            spent["stats"] += time.perf_counter() - t
        spent["read"] += time.perf_counter() - t0 - (spent["stats"] - s0)
        return block, runs

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actfmt-load") if read_ahead else _Inline()
    with pool as pre:
        ahead = pre.submit(load, 0) if bounds else None
        for k, (a, b) in enumerate(bounds):
            assert ahead is not None
            block, runs = ahead.result()
            if stop is not None and stop.is_set():
                raise Cancelled
            ahead = pre.submit(load, k + 1) if k + 1 < len(bounds) else None
            t0 = time.perf_counter()
            writer.write(pos, a, block, runs)
            spent["write"] += time.perf_counter() - t0
            if on_bytes:
                on_bytes((b - a) * info.row_bytes)
    if recorded is not None and (got := hs.digest()) != recorded:
        raise ConversionError(
            f"{reader.location}/{source.name}: the source's data does not match the checksum recorded when it was "
            f"converted (recorded {recorded}, read {got}): it is damaged, and a copy of it is not published. "
            f"Restore the source from a good copy (`actfmt validate --deep` names the damaged layers)."
        )
    t0 = time.perf_counter()
    writer.finish_layer(pos)
    spent["write"] += time.perf_counter() - t0
    extra: dict[str, Any] = {"seconds": spent}
    if moments is not None and batcher is not None:
        t0 = time.perf_counter()
        batcher.flush()
        spent["stats"] += time.perf_counter() - t0
        extra["moments"] = moments.state()
    return LayerResult(info.name, h.digest(), info.nbytes, extra)


class _Inline:
    """An executor that runs what it is given at once, on the calling thread (``copy_layer`` without read-ahead)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered by .result(), as a pool's future would
            fut.set_exception(exc)
        return fut


def _recorded_checksum(reader: Reader, name: str) -> str | None:
    """The checksum the source's actfmt block records for layer ``name`` (a store actfmt converted), else
    ``None``: only one of the algorithm :class:`~actfmt.checksum.Hasher` computes is compared."""
    try:
        block = reader.actfmt
    except Exception:  # an unreadable block: nothing recorded to compare with (validation reports it)
        return None
    sums = block.get("checksums") if isinstance(block, dict) else None
    value = sums.get(name) if isinstance(sums, dict) else None
    return value if isinstance(value, str) and value.startswith(f"{ALGORITHM}:") else None


def _check(task: LayerTask, res: LayerResult, on_bytes: Callable[[int], None] | None) -> None:
    """Re-read one layer from the partial store and compare its checksum with the source's."""
    with get_format(task.to).open_reader(task.work) as written:
        pos = written.position(res.name)
        if pos is None:
            raise ConversionError(f"{task.work}: {res.name} was written but cannot be found in the store.")
        got = layer_checksum(written, pos, on_bytes, own=True)
    if got != res.checksum:
        raise ConversionError(
            f"{task.final or task.work}/{res.name}: checksum of the written data {got} differs from the source's "
            f"{res.checksum}; the conversion is not published. Check the disk and retry."
        )


def run_layer_task(
    task: LayerTask,
    reader: Reader | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_verify: Callable[[int], None] | None = None,
    on_result: Callable[[LayerResult], None] | None = None,
    stop: threading.Event | None = None,
) -> list[LayerResult]:
    """Run one :class:`LayerTask`, layer by layer: copy, verify from the partial store, report (``on_result``).
    ``reader``: an open reader on the source to share (threads); a worker process opens its own.

    Where the format lets a reader open the store while its writer has it open (``Format.reads_while_writing``:
    HDF5, whose chunked split is one task) and the task may use more than one core (``read_ahead``: not on dask),
    layer k is verified on a helper thread while layer k+1 is copied, one layer at a time (memory stays at a
    block per stage), and reported once verified.  Otherwise the writer is closed after each layer (some
    formats lock their file) and the layer verified before the next one is copied."""
    fmt = get_format(task.to)
    writer = fmt.writer_class().open(task.work, task.spec, task.options)
    own = reader is None
    src = open_reader(task.source, task.source_format) if reader is None else reader
    overlap = task.verify and task.read_ahead and len(task.layers) > 1 and fmt.reads_while_writing
    results: list[LayerResult] = []

    def check(res: LayerResult) -> LayerResult:
        if task.verify:
            t0 = time.perf_counter()
            _check(task, res, on_verify)
            res.extra.setdefault("seconds", {})["verify"] = time.perf_counter() - t0
        return res

    def report(res: LayerResult) -> None:
        if on_result is not None:
            on_result(res)
        results.append(res)

    checker: Any = ThreadPoolExecutor(1, thread_name_prefix="actfmt-verify") if overlap else _Inline()
    try:
        with checker:  # on an error, waits for the layer being verified before the writer is closed
            pending: Future[LayerResult] | None = None
            for pos in task.layers:
                res = copy_layer(
                    src, writer, pos, task.spec, on_bytes, task.cast, stop, task.stats, task.read_ahead
                )
                if not overlap:
                    writer.close()  # the next layer's first write opens it again
                    report(check(res))
                    continue
                verified = checker.submit(check, res)
                if pending is not None:
                    report(pending.result())
                pending = verified
            if pending is not None:
                report(pending.result())
    finally:
        writer.close()
        if own:
            src.close()
    return results


def layer_tasks(
    source: Location,
    source_format: str,
    work: Location,
    to: str,
    spec: SplitSpec,
    options: WriteOptions,
    todo: list[int],
    label: str,
    verify: bool,
    cast: str | None,
    final: str = "",
    stats: bool = True,
) -> list[LayerTask]:
    """The tasks for layers ``todo``: one per layer, or one for all when the format has one writer."""
    if not todo:
        return []
    groups = [(pos,) for pos in todo] if get_format(to).writes_in_parallel(options) else [tuple(todo)]
    return [
        LayerTask(
            source,
            source_format,
            work,
            to,
            spec,
            options,
            g,
            f"{label}/{'+'.join(spec.layers[p].name for p in g)}",
            verify,
            cast,
            final,
            stats,
        )
        for g in groups
    ]
