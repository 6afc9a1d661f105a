"""Conversion between formats: plan (splits x layers) -> layer tasks -> verify -> publish.

Guarantees (see README): bit-exact, out-of-core (a few blocks in memory), atomic (a partial store becomes the
destination only when complete and verified), locked (a second writer refuses), resumable layer by layer,
verified from the written destination, and the source never modified.  The library never prints: progress goes
to a callback as :class:`~actfmt.progress.ProgressEvent`.

Also here: :func:`verify` (do two splits/trees hold the same activations?) and :func:`info`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

from actfmt.checks import validate
from actfmt.checksum import ALGORITHM as CHECKSUM_ALGORITHM
from actfmt.checksum import layer_checksum
from actfmt.conversion.executors import dask_layer_runner, local_runner
from actfmt.conversion.info import SplitInfo, info
from actfmt.conversion.plan import SplitJob, check_safe, plan
from actfmt.conversion.split import (
    FORMAT_OPTIONS,
    ConvertResult,
    PlannedSplit,
    convert_split,
    plan_split,
    spec_for,
)
from actfmt.conversion.tasks import (
    LayerResult,
    LayerRunner,
    LayerTask,
    copy_layer,
    layer_tasks,
    run_layer_task,
)
from actfmt.conversion.verify import VerifyResult, verify
from actfmt.errors import ConversionError, ValidationFailedError
from actfmt.formats import Walk, get_format, walk_splits
from actfmt.formats.base import Reader
from actfmt.layout import SUPPORTED_DTYPES
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.storage import Location, PathLike, resolve

__all__ = [
    "CHECKSUM_ALGORITHM",
    "EXECUTORS",
    "ConvertResult",
    "LayerResult",
    "LayerRunner",
    "LayerTask",
    "PlannedSplit",
    "SplitInfo",
    "SplitJob",
    "VerifyResult",
    "convert",
    "copy_layer",
    "info",
    "layer_checksum",
    "layer_tasks",
    "plan",
    "run_layer_task",
    "spec_for",
    "verify",
]

#: Where layer tasks run: ``local`` (threads in this process) or ``dask`` (tasks on dask.distributed).
EXECUTORS = ("local", "dask")


def _validate_source(src: Location, walk: Walk) -> None:
    report = validate(src, walk=walk)
    if report.errors:
        worst = report.sorted_findings()[:5]
        lines = [
            f"{src}: the source fails validation ({report.errors} error{'s' if report.errors != 1 else ''}); "
            f"fix it, or convert anyway with --force:",
            *(f"  {f.code} {f.location}: {f.message}" for f in worst),
        ]
        if report.errors > len(worst):
            lines.append(f"  ... and {report.errors - len(worst)} more")
        raise ValidationFailedError("\n".join(lines), report, lines)


def convert(
    src: PathLike,
    dst: PathLike,
    to: str,
    *,
    chunk_rows: int | None = None,
    compression: str | None = None,
    level: int | None = None,
    jobs: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = True,
    format_options: Mapping[str, Any] | None = None,
    zarr_format: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    stats: bool = True,
    progress: ProgressCallback | None = None,
    executor: str = "local",
    scheduler: Any = None,
    storage_options: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> ConvertResult:
    """Convert every split under ``src`` (any format) to format ``to`` under ``dst``.

    ``dry_run`` plans, refuses what a real run would refuse (an unsafe destination, a source failing
    validation) and returns the plan in :attr:`ConvertResult.planned` (splits, destinations, layers, bytes, what
    happens at each destination) without writing anything.

    ``format_options``: the target format's own options by field name (its ``Format.options_class``, e.g.
    ``{"zarr_format": 2}``); an option the format does not have is refused.  ``zarr_format=N`` is short for
    ``format_options={"zarr_format": N}``.

    ``dtype`` casts explicitly (the result records it and a warning is returned); without it the dtype never
    changes.  A source that fails validation is refused (:class:`ValidationFailedError`) unless ``force``.

    With ``stats`` (the default), each layer's statistics are computed from the bytes on their way and kept with
    the store: the figures of ``actfmt stats`` in the ``actfmt`` block, the mean and std vectors beside the data
    (see :meth:`~actfmt.formats.base.Writer.write_stats`).  ``stats=False`` (``--no-stats``) skips that work.

    ``executor="dask"`` writes the layers as tasks on dask.distributed (see :mod:`actfmt._dask`): on the
    cluster at ``scheduler`` (an address such as ``tcp://host:8786``, or a ``distributed.Client``), else on a
    ``LocalCluster`` of ``jobs`` worker processes.  Planning, locking and publishing stay in this process; the
    workers must reach ``src`` and ``dst`` (a shared filesystem, or object storage).

    ``src`` and ``dst`` may be fsspec URLs (``s3://bucket/Activations``), with ``storage_options`` for their
    filesystems.  Into object storage, a store is written in place with its completeness mark last (HDF5: written
    locally, uploaded when complete).
    """
    t0 = time.perf_counter()
    fmt = get_format(to)
    if compression is not None and compression not in fmt.compressions:
        raise ConversionError(
            f"--compression {compression!r} is not available for {fmt.name}; choose one of: "
            f"{', '.join(fmt.compressions)}."
        )
    given = dict(format_options or {})
    if zarr_format is not None:
        given["zarr_format"] = zarr_format
    fmt.options_class.from_mapping(given, fmt.name)  # an unknown option or value: refused before any work
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConversionError(
            f"--dtype {dtype!r} is not supported; choose one of: {', '.join(SUPPORTED_DTYPES)}."
        )
    if overwrite and resume:
        raise ConversionError("--overwrite and --resume contradict each other; give one.")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ConversionError(f"--chunk-rows must be positive, got {chunk_rows}.")
    if executor not in EXECUTORS:
        raise ConversionError(f"--executor {executor!r} is unknown; choose one of: {', '.join(EXECUTORS)}.")
    if scheduler is not None and executor != "dask":
        raise ConversionError("--scheduler needs --executor dask.")
    src_loc, dst_loc = resolve(src, storage_options), resolve(dst, storage_options)
    if executor == "dask" and "memory" in (src_loc.scheme, dst_loc.scheme):
        raise ConversionError(
            "memory:// lives inside one process: dask workers cannot see it; use s3://, gs:// or a shared disk."
        )
    walk = walk_splits(src_loc)
    jobs_list = plan(src_loc, dst_loc, fmt.name, walk)
    check_safe(src_loc, dst_loc, jobs_list)
    if not force:
        t_validate = time.perf_counter()
        _validate_source(src_loc, walk)
    result = ConvertResult()
    if not force:
        result.add_time("validate", time.perf_counter() - t_validate)
    if dry_run:
        result.dry_run = True
        result.planned = [plan_split(job, fmt.name, overwrite, resume) for job in jobs_list]
        result.layers = sum(p.layers for p in result.planned)
        result.bytes = sum(p.bytes for p in result.planned)
        result.seconds = time.perf_counter() - t0
        return result
    requested = {
        "to": fmt.name,
        "chunk_rows": chunk_rows,
        "compression": compression,
        "level": level,
        "dtype": dtype,
        # the format's own options as given (None: not given), each field of its options class
        FORMAT_OPTIONS: {f.name: given.get(f.name) for f in dataclasses.fields(fmt.options_class)},
    }
    workers = max(1, jobs if jobs is not None else (os.cpu_count() or 1))

    def on_bytes(n: int) -> None:
        emit(progress, ProgressEvent("advance", "convert", advance=n, nbytes=n))

    def on_verify(n: int) -> None:
        emit(progress, ProgressEvent("advance", "verify", advance=n, nbytes=n))

    with contextlib.ExitStack() as stack:
        if executor == "dask":
            dask_runner = stack.enter_context(dask_layer_runner(scheduler, workers))

            def runner_for(reader: Reader) -> LayerRunner:
                return dask_runner

        else:

            def runner_for(reader: Reader) -> LayerRunner:
                return local_runner(workers, reader, on_bytes, on_verify)

        for job in jobs_list:
            convert_split(
                job,
                requested,
                overwrite=overwrite,
                resume=resume,
                verify=verify,
                progress=progress,
                result=result,
                runner_for=runner_for,
                per_layer_progress=executor == "dask",
                stats=stats,
            )
    result.seconds = time.perf_counter() - t0
    return result
