"""Where layer tasks run: threads in this process (:func:`local_runner`), or tasks on dask.distributed
(:func:`dask_layer_runner`, ``actfmt convert --executor dask [--scheduler ADDRESS]``).

Both run the same :class:`~actfmt.conversion.tasks.LayerTask` s with :func:`~actfmt.conversion.tasks.run_layer_task`:
planning, locking, the journal and publishing stay in the calling process (the *driver*).  On dask each task opens
the source and the partial store itself; a failed task is retried (:data:`actfmt._dask.TASK_RETRIES` times, and
dask reschedules the tasks of a worker that dies), rewriting its layers from row 0; nothing is published before
every layer is done and verified, and when retries run out the partial store and its journal stay for
``--resume``.  Workers must reach the source and destination (the same paths on a shared filesystem, or object
storage: locations pickle with their storage options) and have actfmt installed.  The cluster itself (the local
one, a client, mapping tasks) is :mod:`actfmt._dask`, dask's one home; this module only says what a conversion's
task is on it.  Needs the ``dask`` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actfmt._dask import TASK_RETRIES, dask_client, dask_map
from actfmt.conversion.tasks import Cancelled, LayerResult, LayerRunner, LayerTask, run_layer_task
from actfmt.errors import ActfmtError, ConversionError
from actfmt.formats.base import Reader

__all__ = ["dask_layer_runner", "local_runner", "on_dask"]


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


def on_dask(task: LayerTask) -> LayerTask:
    """``task`` as it runs on a dask worker: one core.  dask's model is one task per worker thread, so a task's
    own threads (zarr's and HDF5's codec threads, the read-ahead of the next block) would only oversubscribe
    the cores the cluster already schedules; there they run one after the other on the task's thread
    (measured on 2 cores: 2 workers x 2 encode threads scaled 1.12x over one worker; one thread: 1.9x)."""
    options = dataclasses.replace(task.options, extra={**task.options.extra, "threads": 1})
    return dataclasses.replace(task, options=options, read_ahead=False)


@contextlib.contextmanager
def dask_layer_runner(scheduler: Any, workers: int) -> Iterator[LayerRunner]:
    """A :data:`~actfmt.conversion.LayerRunner` on dask.distributed, for the duration of one ``convert``
    (``scheduler`` and ``workers``: see :func:`actfmt._dask.dask_client`)."""

    def run_on(client: Any) -> LayerRunner:
        def run(tasks: list[LayerTask]) -> Iterator[list[LayerResult]]:
            for task, fut in dask_map(client, run_layer_task, [on_dask(t) for t in tasks], "convert"):
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
