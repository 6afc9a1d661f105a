"""Everything dask: the cluster the ``--executor dask`` commands run on, and lazy dask arrays over layers.

Needs the ``dask`` extra (``pip install 'actfmt[dask]'``); dask is imported only when used.

* The cluster: :func:`dask_client` (an address, a ``distributed.Client``, or :func:`local_cluster`: worker
  processes started for one command) and :func:`dask_map` (tasks retried :data:`TASK_RETRIES` times, results as
  they finish).  ``convert`` (:func:`actfmt.conversion.executors.dask_layer_runner`: what a layer task is on a
  worker) and ``stats`` map their tasks with it.
* Reading: :func:`layer_to_dask` (``LayerView.to_dask()``) gives a lazy ``[rows, hidden_dim]`` dask array whose blocks are read by picklable tasks
that open the split themselves (its location, local or remote, travels with its storage options; no handle is
captured), so it computes on the threaded scheduler or on a distributed cluster alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from actfmt.errors import ActfmtError, ConversionError
from actfmt.formats import shared_reader
from actfmt.formats.base import Reader
from actfmt.formats.dtypes import stored_dtype
from actfmt.storage import Location

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "CLUSTER_CONFIG",
    "FORK_MAX_RSS",
    "TARGET_CHUNK_BYTES",
    "TASK_RETRIES",
    "dask_client",
    "dask_map",
    "dask_setup",
    "layer_to_dask",
    "local_cluster",
    "relax_malloc",
    "start_method",
]

T = TypeVar("T")

#: How many times a failed task is retried on dask before the command fails.
TASK_RETRIES = 2

#: Default size of a ``to_dask`` block (rounded to whole chunks or shards of the store).
TARGET_CHUNK_BYTES = 64 * 1024 * 1024

_INSTALL_HINT = "install the dask extra: pip install 'actfmt[dask]'"


# ----------------------------------------------------------------------------------------------------------
# the cluster


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ConversionError(f"--executor dask needs dask.distributed ({exc}); {_INSTALL_HINT}.") from None
    return distributed


#: dask settings of the cluster :func:`local_cluster` starts (its scheduler and nannies in this process, its
#: workers).  dask's defaults poll for a busy machine: the event-loop tick every 20 ms, the system monitor every
#: 0.5 s, the worker's memory every 0.1 s, and a statistical profiler sampling every thread's stack every 10 ms
#: (for the dashboard).  Measured on 2 cores: idle, a 2-worker cluster cost 0.065 CPU-s per second with them,
#: 0.014 with these; a local conversion run inside a worker's task took 0.52 CPU-s with them, 0.48 with these (in
#: a plain process 0.47-0.49).  Memory is still watched (each second): a layer task holds at most two blocks.
CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.worker.profile.enabled": False,
}


#: The largest resident size of this process at which :func:`local_cluster` forks its workers.  A forked worker
#: starts as a copy of this process, and dask counts the pages it shares with it against the worker's memory
#: limit (a share of the machine's memory): a command (100-300 MB) forks, a notebook holding gigabytes spawns.
FORK_MAX_RSS = 1 << 30

#: The environment variable of dask's own setting (``distributed.worker.multiprocessing-method``): set, it
#: chooses how :func:`local_cluster` starts its workers, as it does for every dask cluster.
_START_METHOD_ENV = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"


def _resident_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), ``None`` where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def start_method() -> str:
    """How :func:`local_cluster` starts its worker processes: ``"fork"`` on Linux while this process is small
    (:data:`FORK_MAX_RSS`), else dask's setting (``spawn`` unless configured).

    A spawned worker is a fresh interpreter that imports distributed and what a task needs (numpy, zarr...):
    0.6-0.9 CPU-s per worker measured, most of a short conversion on two cores; a forked one has them already
    (0.05 CPU-s).  The libraries a task uses re-arm after a fork (h5py takes its lock around it, zarr restarts
    its event loop, blosc its threads; :func:`actfmt.formats.shared_reader` forgets the readers it inherits).
    Set ``distributed.worker.multiprocessing-method`` (or ``DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD``)
    to choose: any value but dask's default ``spawn``, or ``spawn`` given in the environment, is used as is."""
    import dask

    configured = str(dask.config.get("distributed.worker.multiprocessing-method", default="spawn"))
    if configured != "spawn" or _START_METHOD_ENV in os.environ:
        return configured
    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return configured  # macOS: fork is unsafe with its system libraries
    rss = _resident_bytes()
    if rss is None or rss > FORK_MAX_RSS:
        return configured
    return "fork"


def local_cluster(workers: int) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded worker processes (started by :func:`start_method`, set up
    by :func:`dask_setup`) with :data:`CLUSTER_CONFIG`, and without the ``MALLOC_TRIM_THRESHOLD_`` that dask sets
    in its workers' environment (``distributed.nanny.pre-spawn-environ``): setting it turns off glibc's adaptive
    mmap threshold, so every buffer above 128 KiB (a chunk compressed, a block read) is a fresh mapping, faulted
    in page by page and unmapped again.  Measured: zarr layer tasks (blosc-zstd) took 1.46 CPU-s per 460 MB in a
    plain process and 2.2-2.6 with it, the whole difference between a dask worker core and a local one (0.52x).
    dask's other settings (one BLAS/OpenMP thread) stay.  (distributed also copies that environment into the
    process starting the cluster, so a second cluster started there inherits it anyway: :func:`dask_setup` then
    sets glibc's thresholds in the workers, :func:`relax_malloc`.)"""
    import dask

    distributed = _import_distributed()
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    config = {
        **CLUSTER_CONFIG,
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.multiprocessing-method": start_method(),
    }
    with dask.config.set(config):
        return distributed.LocalCluster(
            n_workers=max(1, workers),
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            preload=[__name__],  # dask_setup below, in each worker
        )


class _ShutdownNoise(logging.Filter):
    """Drops what distributed logs in a worker when the command stops it on purpose: a heartbeat that met the
    closed scheduler (dask/distributed#7105: a traceback after every successful run, now and then) once the
    worker is no longer running, and the tasks cancelled when the command stops early (an error, Ctrl-C)."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Async instruction for") and "CancelledError" in record.getMessage():
            return False
        if msg.startswith("Failed to communicate with scheduler during heartbeat"):
            from distributed.core import Status

            return bool(self.worker.status == Status.running)
        return True


def dask_setup(worker: Any) -> None:
    """Run by distributed in each worker of :func:`local_cluster` as it starts (its ``preload``): Ctrl-C is the
    command's to handle (it is sent to the worker processes too; they stop when the command closes the cluster,
    not with a traceback each), shutdown noise filtered (:class:`_ShutdownNoise`), glibc's thresholds set
    (:func:`relax_malloc`)."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to change
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    noise = _ShutdownNoise(worker)
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logging.getLogger(name).addFilter(noise)
    relax_malloc()


def relax_malloc() -> bool:
    """In this process, give glibc's malloc the thresholds its adaptive mode would reach (buffers up to 32 MiB from
    the heap, trimmed beyond 128 MiB) whatever ``MALLOC_TRIM_THRESHOLD_`` said at start; ``False`` where there is
    no glibc.  Run in the workers of the cluster :func:`dask_client` starts."""
    try:  # glibc's soname (mallopt is glibc's; ctypes.util.find_library would cost 17 ms of every start-up)
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_trim_threshold, 128 << 20) and libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


@contextlib.contextmanager
def dask_client(scheduler: Any, workers: int) -> Iterator[Any]:
    """A ``distributed.Client`` for the duration of one command.

    ``scheduler``: a ``distributed.Client`` (used as is, not closed), an address (``tcp://host:8786``) or
    ``None`` for a :func:`local_cluster` of ``workers`` single-threaded worker processes, closed at the end.
    """
    distributed = _import_distributed()
    client: Any
    cluster: Any = None
    own = True
    if isinstance(scheduler, distributed.Client):
        client, own = scheduler, False
    elif scheduler is None:
        cluster = local_cluster(workers)
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
    try:
        yield client
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()


def dask_map(client: Any, fn: Callable[[T], Any], items: list[T], name: str) -> Iterator[tuple[T, Any]]:
    """``fn`` over ``items`` as tasks on ``client`` (each retried :data:`TASK_RETRIES` times): ``(item, future)``
    as they finish (``future.result()`` gives the result or raises the task's error); the remaining tasks are
    cancelled when the caller stops early."""
    distributed = _import_distributed()
    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(fn, item, key=f"actfmt-{name}-{token}-{i}", retries=TASK_RETRIES, pure=False): item
        for i, item in enumerate(items)
    }
    try:
        for fut in distributed.as_completed(list(futures), loop=client.loop):
            yield futures[fut], fut
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


# ----------------------------------------------------------------------------------------------------------
# lazy arrays


@dataclass(frozen=True)
class _LayerSource:
    """Array-like over one stored layer for ``da.from_array``: picklable, opens the split per process."""

    location: Location
    format: str
    pos: int
    name: str
    rows: int
    hidden_dim: int
    stored: str  # torch dtype name: float16 / bfloat16 / float32
    fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.hidden_dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return stored_dtype(self.stored)

    def __dask_tokenize__(self) -> Any:
        return (
            type(self).__name__,
            str(self.location),
            self.format,
            self.pos,
            self.name,
            self.shape,
            self.stored,
            self.fingerprint,
        )

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the stored numpy dtype, as an array of its own."""
        return shared_reader(self.location, self.format).read_array(self.pos, start, max(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return shared_reader(self.location, self.format).take_array(self.pos, rows)

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


def layer_to_dask(reader: Reader, pos: int, chunk_rows: int | None = None, dtype: Any = None) -> Any:
    """A lazy dask array ``[rows, hidden_dim]`` over layer position ``pos`` of an open split.

    Blocks are ``chunk_rows`` rows (default: about 64 MiB): whole shards where the layer is stored as shard
    files (``Reader.shard_rows_of``: a ``.pt`` tree), else, when ``chunk_rows`` is not given, whole stored chunks
    (zarr, chunked hdf5).  ``dtype``: ``None`` gives the stored
    numpy dtype: float16 and float32 as such, **bfloat16 as its uint16 bits** (numpy has no bfloat16;
    ``torch.from_numpy(x).view(torch.bfloat16)`` restores it exactly); ``"float32"`` upcasts lazily and exactly.
    """
    try:
        import dask.array as da
        import numpy as np
        from dask.base import tokenize
    except ImportError as exc:
        raise ActfmtError(f"to_dask() needs dask ({exc}); {_INSTALL_HINT}.") from None

    info = reader.layers[pos]
    stored = stored_dtype(info.dtype)
    want = stored if dtype is None else np.dtype(dtype)
    if want not in (stored, np.dtype(np.float32)):
        raise ValueError(
            f"to_dask(dtype={dtype!r}): {info.name} is {info.dtype}; choose None (stored: {stored}) or 'float32'."
        )
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"to_dask(chunk_rows={chunk_rows}): must be at least 1.")
    target = int(chunk_rows) if chunk_rows else max(1, TARGET_CHUNK_BYTES // max(1, info.row_bytes))
    unit = reader.chunk_rows_of(pos)
    shards = reader.shard_rows_of(pos)
    if shards:  # whole shards: a block reads the shards it covers
        blocks = _group_rows(list(shards), target)
    elif chunk_rows:
        blocks = [min(target, info.rows - s) for s in range(0, info.rows, target)] or [0]
    else:  # whole chunks
        step = target if unit is None else max(1, target // unit) * unit
        blocks = [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]
    src = _LayerSource(
        reader.location,
        reader.format,
        pos,
        info.name,
        info.rows,
        info.hidden_dim,
        info.dtype,
        reader.fingerprint(pos),
    )
    name = f"actfmt-{info.name}-{tokenize(src, tuple(blocks))}"
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
