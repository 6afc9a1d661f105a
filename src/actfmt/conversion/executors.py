"""Where layer tasks run: threads in this process (:func:`local_runner`), or tasks on dask.distributed
(:func:`dask_layer_runner`, ``actfmt convert --executor dask [--scheduler ADDRESS]``).

Both run the same :class:`~actfmt.conversion.tasks.LayerTask` s with :func:`~actfmt.conversion.tasks.run_layer_task`:
planning, locking, the journal and publishing stay in the calling process (the *driver*).  On dask each task opens
the source and the partial store itself; a failed task is retried (:data:`TASK_RETRIES` times, and dask
reschedules the tasks of a worker that dies), rewriting its layers from row 0; nothing is published before every
layer is done and verified, and when retries run out the partial store and its journal stay for ``--resume``.
Workers must reach the source and destination (the same paths on a shared filesystem, or object storage:
locations pickle with their storage options) and have actfmt installed.  Needs the ``dask`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from actfmt.conversion.tasks import Cancelled, LayerResult, LayerRunner, LayerTask, run_layer_task
from actfmt.errors import ActfmtError, ConversionError
from actfmt.formats.base import Reader

__all__ = ["TASK_RETRIES", "dask_client", "dask_layer_runner", "dask_map", "local_cluster", "local_runner"]

T = TypeVar("T")

#: How many times a failed layer task is retried on dask before the conversion fails.
TASK_RETRIES = 2

_INSTALL_HINT = "install the dask extra: pip install 'actfmt[dask]'"


def local_runner(
    workers: int, reader: Reader, on_bytes: Callable[[int], None], on_verify: Callable[[int], None]
) -> LayerRunner:
    """Threads in this process, sharing the open source reader; progress per block, results per layer."""

    def run(tasks: list[LayerTask]) -> Iterator[list[LayerResult]]:
        if not tasks:
            return
        done: queue.Queue[LayerResult | BaseException | None] = queue.Queue()
        stop = threading.Event()  # set on the first failure: the other tasks stop between blocks

        def one(task: LayerTask) -> None:
            try:
                if not stop.is_set():
                    run_layer_task(task, reader, on_bytes, on_verify, done.put, stop)
            except BaseException as exc:
                stop.set()
                done.put(exc)
            finally:
                done.put(None)

        threads = min(max(1, workers), len(tasks))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actfmt-layer") as pool:
            futures = [pool.submit(one, t) for t in tasks]
            finished = 0
            try:
                while finished < len(tasks):
                    item = done.get()
                    if item is None:
                        finished += 1
                    elif isinstance(item, Cancelled):
                        continue
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield [item]
            finally:
                stop.set()
                for fut in futures:
                    fut.cancel()

    return run


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ConversionError(f"--executor dask needs dask.distributed ({exc}); {_INSTALL_HINT}.") from None
    return distributed


# ----------------------------------------------------------------------------------------------------------
# conversion


def local_cluster(workers: int) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded worker processes, without the ``MALLOC_TRIM_THRESHOLD_``
    that dask sets in its workers' environment (``distributed.nanny.pre-spawn-environ``): setting it turns off
    glibc's adaptive mmap threshold, so every buffer above 128 KiB (a chunk compressed, a block read) is a fresh
    mapping, faulted in page by page and unmapped again.  Measured: zarr layer tasks (blosc-zstd) took 1.46 CPU-s
    per 460 MB in a plain process and 2.2-2.6 with it, the whole difference between a dask worker core and a
    local one (0.52x).  dask's other settings (one BLAS/OpenMP thread) stay.  (distributed also copies that
    environment into the process starting the cluster, so a second cluster started there inherits it anyway:
    :func:`dask_client` then sets glibc's thresholds in the workers, :func:`relax_malloc`.)"""
    import dask

    distributed = _import_distributed()
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return distributed.LocalCluster(
            n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=":0"
        )


def relax_malloc() -> bool:
    """In this process, give glibc's malloc the thresholds its adaptive mode would reach (buffers up to 32 MiB from
    the heap, trimmed beyond 128 MiB) whatever ``MALLOC_TRIM_THRESHOLD_`` said at start; ``False`` where there is
    no glibc.  Run in the workers of the cluster :func:`dask_client` starts."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
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
        client.run(relax_malloc)
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


@contextlib.contextmanager
def dask_layer_runner(scheduler: Any, workers: int) -> Iterator[LayerRunner]:
    """A :data:`~actfmt.conversion.LayerRunner` on dask.distributed, for the duration of one ``convert``
    (``scheduler`` and ``workers``: see :func:`dask_client`)."""

    def run_on(client: Any) -> LayerRunner:
        def run(tasks: list[LayerTask]) -> Iterator[list[LayerResult]]:
            # dask's model is one task per worker thread: a task's own codec threads would only oversubscribe
            # the cores the cluster already schedules (2 workers x 2 encode threads on 2 cores scaled 1.12x;
            # 1 thread: 1.9x)
            tasks = [
                dataclasses.replace(
                    t, options=dataclasses.replace(t.options, extra={**t.options.extra, "threads": 1})
                )
                for t in tasks
            ]
            for task, fut in dask_map(client, run_layer_task, tasks, "convert"):
                try:
                    yield fut.result()
                except ActfmtError:
                    raise
                except Exception as exc:
                    raise ConversionError(
                        f"{task.final or task.work}: the task writing {task.key} failed on the dask cluster after "
                        f"{TASK_RETRIES} retries ({type(exc).__name__}: {exc}); nothing was published. Fix "
                        f"the cause and rerun with --resume to continue layer by layer."
                    ) from exc

        return run

    with dask_client(scheduler, workers) as client:
        yield run_on(client)
