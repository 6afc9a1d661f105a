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

__all__ = [
    "TASKS_PER_THREAD",
    "TASK_TARGET_BYTES",
    "dask_layer_runner",
    "group_tasks",
    "local_runner",
    "on_dask",
]

#: On dask, consecutive layer tasks of a split are merged into tasks of at most about this many bytes ...
TASK_TARGET_BYTES = 256 << 20
#: ... and each task takes at most 1/(this x the worker threads) of the layers still to hand out (guided
#: scheduling): big tasks first, one-layer tasks at the end, so the workers finish together.
TASKS_PER_THREAD = 2


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


def group_tasks(tasks: list[LayerTask], threads: int) -> list[LayerTask]:
    """Consecutive one-layer ``tasks`` of a split merged into tasks of several layers where layers are small: a
    dask task costs about 10 ms of CPU in the driver and the worker whatever it does (measured: 4 ms for an
    empty one, 11-12 ms per seed-sized layer task above the same work done locally), 10-20 % of a 58 MB layer
    written at 1 GB per CPU-second.

    Guided scheduling: each task takes ``ceil(left / (TASKS_PER_THREAD x threads))`` of the ``left`` layers not
    yet handed out, at most :data:`TASK_TARGET_BYTES` of them (at least one).  dask runs tasks in the order they
    are submitted, so the big ones go first and the last ones are single layers: a worker that a busy core
    slowed down takes fewer of them instead of finishing alone (measured on 2 cores, the seed split to zarr: 8
    equal tasks left one worker idle 0.3-0.7 s of a 3.5-4.1 s run).  A merged task copies and verifies its
    layers one after the other and is retried as one (rewriting them from row 0)."""
    if len(tasks) < 2 or any(len(t.layers) != 1 for t in tasks):
        return tasks
    nbytes = [t.spec.layers[t.layers[0]].nbytes for t in tasks]
    share = TASKS_PER_THREAD * max(1, threads)
    out, start = [], 0
    while start < len(tasks):
        take, size = 1, nbytes[start]
        want = -(-(len(tasks) - start) // share)
        while take < want and size + nbytes[start + take] <= TASK_TARGET_BYTES:
            size += nbytes[start + take]
            take += 1
        group = tasks[start : start + take]
        start += take
        if take == 1:
            out.append(group[0])
            continue
        layers = tuple(p for t in group for p in t.layers)
        label = group[0].key.rsplit("/", 1)[0]
        key = f"{label}/{'+'.join(group[0].spec.layers[p].name for p in layers)}"
        out.append(dataclasses.replace(group[0], layers=layers, key=key))
    return out


@contextlib.contextmanager
def dask_layer_runner(scheduler: Any, workers: int) -> Iterator[LayerRunner]:
    """A :data:`~actfmt.conversion.LayerRunner` on dask.distributed, for the duration of one ``convert``
    (``scheduler`` and ``workers``: see :func:`actfmt._dask.dask_client`)."""

    def run_on(client: Any) -> LayerRunner:
        def run(tasks: list[LayerTask]) -> Iterator[list[LayerResult]]:
            threads = sum(client.nthreads().values()) or 1
            todo = [on_dask(t) for t in group_tasks(tasks, threads)]
            for task, fut in dask_map(client, run_layer_task, todo, "convert"):
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
