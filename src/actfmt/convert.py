"""Conversion between formats: plan (splits x layers) -> execute -> verify -> finalize.

Guarantees (see README): bit-exact, out-of-core (a few blocks in memory), atomic (a hidden temporary sibling
renamed into place when complete), locked (a second writer refuses), resumable layer by layer, verified from
the written destination.  The library never prints: progress goes to a callback as
:class:`~actfmt.progress.ProgressEvent`.

Also here: :func:`verify` (do two splits/trees hold the same activations?) and :func:`info`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import (
    ActfmtError,
    ConversionError,
    DestinationExistsError,
    LockedError,
    NotASplitError,
    ValidationFailedError,
)
from actfmt.formats import find_splits, get_format, open_reader
from actfmt.formats.base import ACTFMT_KEY, LayerInfo, Reader, SplitSpec, WriteOptions, Writer, tensor_bytes
from actfmt.layout import SUPPORTED_DTYPES, rel, write_json
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.remote import as_path, is_remote

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CHECKSUM_ALGORITHM",
    "EXECUTORS",
    "ConvertResult",
    "LayerTask",
    "SplitInfo",
    "SplitJob",
    "VerifyResult",
    "convert",
    "info",
    "layer_checksum",
    "plan",
    "run_layer_task",
    "tensor_bytes",
    "verify",
]

CHECKSUM_ALGORITHM = "xxh3_64"
#: Where layer tasks run: ``local`` (threads in this process) or ``dask`` (tasks on dask.distributed).
EXECUTORS = ("local", "dask")
#: Rows read per step when hashing or comparing a layer (bounded memory whatever the layer size).
SCAN_BYTES = 64 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------------
# checksums


def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


def _digest(h: Any) -> str:
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def _scan_blocks(info: LayerInfo) -> Iterator[tuple[int, int]]:
    step = max(1, SCAN_BYTES // max(1, info.hidden_dim * info.itemsize))
    for start in range(0, info.rows, step):
        yield start, min(info.rows, start + step)


def layer_checksum(reader: Reader, pos: int, on_bytes: Callable[[int], None] | None = None) -> str:
    """xxh3_64 of a layer's raw bytes in row order, streamed in bounded blocks."""
    h = _hasher()
    for start, stop in _scan_blocks(reader.layers[pos]):
        buf = tensor_bytes(reader.read(pos, start, stop))
        h.update(buf)
        if on_bytes:
            on_bytes(buf.nbytes)
    return _digest(h)


# ----------------------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class SplitJob:
    """One split to convert: where it is, what it is, where it goes."""

    source: Path
    source_format: str
    destination: Path
    location: str  # relative to the source root, "/"-separated

    @property
    def label(self) -> str:
        """What progress shows for this split: its location, or its name when the source is the split."""
        return self.source.name if self.location == "." else self.location


def plan(src: str | Path, dst: str | Path, to: str) -> list[SplitJob]:
    """Map every split under ``src`` to its destination under ``dst`` (the tree is mirrored).

    Either may be an fsspec URL (``s3://...``) or a :class:`~actfmt.remote.RemotePath`."""
    src, dst = as_path(src), as_path(dst)
    fmt = get_format(to)
    splits = find_splits(src)
    if not splits:
        raise NotASplitError(
            f"{src}: no split found (a split is a directory with metadata.json and layer_XX/, a .zarr, a .h5 "
            f"or a directory of layer_XX.safetensors); check the path."
        )
    jobs = []
    for path, name in splits:
        where = rel(path, src)
        parent = dst if where == "." else dst / Path(where).parent
        jobs.append(SplitJob(path, name, fmt.destination(parent / path.name), where))
    return jobs


# ----------------------------------------------------------------------------------------------------------
# locking and the temporary sibling


def _sibling(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.actfmt-{tag}")


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock beside the destination (released by the kernel if we die)."""
    lock_path = _sibling(final, "lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{final}: another actfmt convert is writing this destination (lock {lock_path.name}); "
                f"wait for it to finish, or choose another destination."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    """The resume state, after every layer.  Atomic but not fsynced: it guards against a killed process (the
    page cache survives it); the layers' data is not fsynced either, so an fsync here would promise nothing
    more after a power loss, and on a busy disk it cost tens of ms per layer."""
    if is_remote(path):  # object storage: one PUT replaces an object atomically
        path.write_text(json.dumps(data, indent=2))
        return
    write_json(path, data, fsync=False)


# ----------------------------------------------------------------------------------------------------------
# conversion


@dataclass
class ConvertResult:
    """What a conversion did."""

    splits: list[SplitJob] = field(default_factory=list)
    skipped: list[SplitJob] = field(default_factory=list)  # already complete (--resume)
    layers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)  # location -> layer -> checksum

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def _spec_for(reader: Reader, source_format: str, dtype: str | None) -> SplitSpec:
    block = reader.actfmt or {}
    recorded = block.get("shard_rows") or {}
    layers = []
    for info in reader.layers:
        shard_rows = info.shard_rows
        if shard_rows is None and isinstance(recorded.get(info.name), list):
            shard_rows = tuple(int(n) for n in recorded[info.name])
        if shard_rows is not None and sum(shard_rows) != info.rows:
            shard_rows = None
        layers.append(replace(info, shard_rows=shard_rows, dtype=dtype or info.dtype))
    return SplitSpec(metadata=dict(reader.metadata), layers=layers, source_format=source_format)


def _is_complete(path: Path, fmt: str) -> bool:
    try:
        with get_format(fmt).open_reader(path) as r:
            block = r.actfmt
            return bool(block and block.get("complete") is True)
    except (ActfmtError, OSError, ValueError, KeyError):
        return False


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    chunk_rows: int | None = None,
    compression: str | None = None,
    level: int | None = None,
    jobs: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = True,
    zarr_format: int = 3,
    dtype: str | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    executor: str = "local",
    scheduler: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert every split under ``src`` (any format) to format ``to`` under ``dst``.

    ``dtype`` casts explicitly (the result records it and a warning is returned); without it the dtype never
    changes.  A source that fails validation is refused (:class:`ValidationFailedError`) unless ``force``.

    ``executor="dask"`` writes the layers as tasks on dask.distributed (see :mod:`actfmt._dask`): on the
    cluster at ``scheduler`` (an address such as ``tcp://host:8786``, or a ``distributed.Client``), else on a
    ``LocalCluster`` of ``jobs`` worker processes.  Planning, locking, verification and the final rename stay
    in this process; the workers must see ``src`` and ``dst`` at the same paths (a shared filesystem).

    ``src`` and ``dst`` may be fsspec URLs (``s3://bucket/Activations``), with ``storage_options`` for their
    filesystems: any readable source (pt, zarr) from object storage; zarr into object storage, written in place
    with the completeness mark last (see :mod:`actfmt.remote`).
    """
    t0 = time.perf_counter()
    fmt = get_format(to)
    if compression is not None and compression not in fmt.compressions:
        raise ConversionError(
            f"--compression {compression!r} is not available for {fmt.name}; choose one of: "
            f"{', '.join(fmt.compressions)}."
        )
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
    src_path, dst_path = as_path(src, storage_options), as_path(dst, storage_options)
    if executor == "dask" and any(getattr(p, "scheme", "") == "memory" for p in (src_path, dst_path)):
        raise ConversionError(
            "memory:// lives inside one process: dask workers cannot see it; use s3://, gs:// or a shared disk."
        )
    jobs_list = plan(src_path, dst_path, fmt.name)
    if src_path.resolve() == dst_path.resolve() or any(
        j.destination.resolve() == j.source.resolve() for j in jobs_list
    ):
        raise ConversionError(f"{dst}: the destination is the source; choose another destination.")
    if not is_remote(src_path) and not is_remote(dst_path):
        inside = Path(dst_path).resolve()
        if inside.is_relative_to(Path(src_path).resolve()):
            raise ConversionError(
                f"{dst}: the destination is inside the source {src}, which actfmt never modifies; choose a "
                f"destination outside it."
            )
    if not force:
        _validate_source(src_path)
    result = ConvertResult()
    options = WriteOptions(
        chunk_rows=chunk_rows, compression=compression, level=level, zarr_format=zarr_format
    )
    workers = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    runner_cm: contextlib.AbstractContextManager[LayerRunner | None] = contextlib.nullcontext()
    if executor == "dask":
        from actfmt._dask import dask_layer_runner

        runner_cm = dask_layer_runner(scheduler, workers)
    with runner_cm as runner:
        for job in jobs_list:
            _convert_split(
                job, fmt.name, options, workers, overwrite, resume, verify, dtype, progress, result, runner
            )
    result.seconds = time.perf_counter() - t0
    return result


def _validate_source(src: Path) -> None:
    from actfmt.checks import validate

    report = validate(src)
    if report.errors:
        worst = report.sorted_findings()[:5]
        lines = "\n".join(f"  {f.code} {f.location}: {f.message}" for f in worst)
        more = f"\n  ... and {report.errors - len(worst)} more" if report.errors > len(worst) else ""
        raise ValidationFailedError(
            f"{src}: the source fails validation ({report.errors} error{'s' if report.errors != 1 else ''}); fix it, or convert anyway "
            f"with --force:\n{lines}{more}",
            report,
        )


def _convert_split(
    job: SplitJob,
    to: str,
    options: WriteOptions,
    workers: int,
    overwrite: bool,
    resume: bool,
    verify: bool,
    dtype: str | None,
    progress: ProgressCallback | None,
    result: ConvertResult,
    runner: LayerRunner | None = None,
) -> None:
    final = job.destination
    if is_remote(final):  # object storage: no rename, no flock (see actfmt.remote)
        from actfmt.remote import convert_split_remote

        convert_split_remote(
            job, to, options, workers, overwrite, resume, verify, dtype, progress, result, runner
        )
        return
    if final.exists() or final.is_symlink():
        if resume and _is_complete(final, to):
            result.skipped.append(job)
            return
        if not overwrite:
            raise DestinationExistsError(
                f"{final}: already exists; pass --overwrite to replace it"
                + (" (it is not a complete conversion, so --resume cannot continue it)." if resume else ".")
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final), open_reader(job.source, job.source_format) as reader:
        spec = _spec_for(reader, job.source_format, dtype)
        cast_from = {a.name: a.dtype for a in reader.layers if dtype is not None and a.dtype != dtype}
        if cast_from:
            casts = sorted({f"{a} -> {dtype}" for a in cast_from.values()})
            if casts:
                result.warnings.append(
                    f"{job.location}: values cast {', '.join(casts)} (--dtype); not bit-exact."
                )
        tmp = _sibling(final, "partial")
        state_path = _sibling(final, "state.json")
        writer_cls = get_format(to).writer_class()
        done: dict[str, str] = {}
        if resume and tmp.exists() and state_path.is_file():
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
                done = {k: v for k, v in state.get("layers", {}).items() if isinstance(v, str)}
            except (OSError, json.JSONDecodeError):
                done = {}
            writer = writer_cls.open(tmp, spec, options)
        else:
            _remove(tmp)
            _remove(state_path)
            writer = writer_cls.create(tmp, spec, options)
        try:
            if runner is not None:
                writer.close()  # the workers open the store themselves
                tasks = _layer_tasks(job, tmp, to, spec, options, writer_cls, done)
                _run_layer_tasks(job, spec, tasks, runner, done, state_path, progress, result)
            else:
                _write_layers(
                    job, spec, reader, writer, writer_cls, workers, done, state_path, progress, result
                )
        finally:
            writer.close()  # some formats (HDF5) lock the file: close before reading it back
        if verify:
            _verify_written(job, tmp, to, spec, done, progress, runner=runner, workers=workers)
        writer = writer_cls.open(tmp, spec, options)
        try:
            writer.finalize(_actfmt_block(job, spec, done, options, cast_from))  # the completeness mark, last
        finally:
            writer.close()
        # atomic publish: the complete store appears under its final name in one rename
        if final.exists() or final.is_symlink():
            trash = _sibling(final, "old")
            _remove(trash)
            os.replace(final, trash)
            os.replace(tmp, final)
            _remove(trash)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        _remove(state_path)
    result.splits.append(job)
    result.checksums[job.location] = dict(done)


def _write_layers(
    job: SplitJob,
    spec: SplitSpec,
    reader: Reader,
    writer: Writer,
    writer_cls: type[Writer],
    workers: int,
    done: dict[str, str],
    state_path: Path,
    progress: ProgressCallback | None,
    result: ConvertResult,
) -> None:
    todo = [pos for pos, info in enumerate(spec.layers) if info.name not in done]
    total_bytes = sum(spec.layers[p].nbytes for p in todo)
    emit(progress, ProgressEvent("start", "convert", total=total_bytes, description=job.label))

    def one_layer(pos: int) -> tuple[str, str, int]:
        return copy_layer(
            job.source,
            spec,
            reader,
            writer,
            pos,
            lambda n: emit(progress, ProgressEvent("advance", "convert", advance=n, nbytes=n)),
        )

    def record(name: str, digest: str, nbytes: int) -> None:
        done[name] = digest
        _write_json_atomic(state_path, {"layers": done})
        result.layers += 1
        result.bytes += nbytes

    parallel = workers > 1 and writer_cls.parallel_layers and len(todo) > 1
    if parallel:
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            for name, digest, nbytes in pool.map(one_layer, todo):
                record(name, digest, nbytes)
    else:
        for pos in todo:
            record(*one_layer(pos))
    emit(progress, ProgressEvent("end", "convert", description=job.label))


def copy_layer(
    source: Path,
    spec: SplitSpec,
    reader: Reader,
    writer: Writer,
    pos: int,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[str, str, int]:
    """Copy layer ``pos`` from row 0 (a retried copy rewrites the whole layer): ``(name, checksum, nbytes)``.

    The checksum is of the converted rows in row order, whatever runs the copy."""
    info = spec.layers[pos]
    h = _hasher()
    target = torch_dtype_of(info.dtype)
    bounds, start = [], 0
    for n in writer.block_rows(pos):
        bounds.append((start, start + n))
        start += n
    if start != info.rows:
        raise ConversionError(
            f"{source}/{info.name}: the writer's blocks cover {start} rows, not {info.rows}."
        )

    def load(k: int) -> torch.Tensor:
        block = reader.read(pos, *bounds[k])
        block = block if block.dtype == target else block.to(target)
        h.update(tensor_bytes(block))  # one reader thread runs the loads in order: the hash sees row order
        return block

    # read and hash block k+1 on a helper thread while block k is written: reads, hashing and writes overlap
    # (all release the GIL), and at most two blocks are in memory
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="actfmt-read") as pre:
        ahead = pre.submit(load, 0) if bounds else None
        for k, (a, _) in enumerate(bounds):
            assert ahead is not None
            block = ahead.result()
            ahead = pre.submit(load, k + 1) if k + 1 < len(bounds) else None
            writer.write(pos, a, block)
            if on_bytes:
                on_bytes(block.nbytes)
    writer.finish_layer(pos)
    return info.name, _digest(h), info.nbytes


# ----------------------------------------------------------------------------------------------------------
# the executor seam: layer tasks that any engine can run (each opens the source and the partial store itself)


@dataclass(frozen=True)
class LayerTask:
    """Copy some layers of one split into its partial store.  Picklable: paths and plain data only.

    One task per layer when the format lets processes write different layers at once
    (``Writer.parallel_layers``), else one task holding every layer (HDF5: one file, one writer).  No two
    tasks ever write the same chunk, shard or file.
    """

    source: Path
    source_format: str
    partial: Path  # the temporary sibling, created by the driver
    to: str
    spec: SplitSpec
    options: WriteOptions
    layers: tuple[int, ...]
    key: str  # human-readable: "<split location>/<layer names>"
    verify: bool = False  # re-read the written layers from the partial store and hash them instead of copying


#: Runs layer tasks somewhere; yields each task's per-layer results as the tasks finish, in any order.
LayerRunner = Callable[[list[LayerTask]], Iterator[list[tuple[str, str, int]]]]


def run_layer_task(task: LayerTask) -> list[tuple[str, str, int]]:
    """Run one :class:`LayerTask` (in a worker): ``[(layer name, checksum, nbytes), ...]``."""
    if task.verify:
        with get_format(task.to).open_reader(task.partial) as written:
            return [
                (written.layers[pos].name, layer_checksum(written, pos), written.layers[pos].nbytes)
                for pos in task.layers
            ]
    writer = get_format(task.to).writer_class().open(task.partial, task.spec, task.options)
    try:
        with open_reader(task.source, task.source_format) as reader:
            return [copy_layer(task.source, task.spec, reader, writer, pos) for pos in task.layers]
    finally:
        writer.close()


def _layer_tasks(
    job: SplitJob,
    tmp: Path,
    to: str,
    spec: SplitSpec,
    options: WriteOptions,
    writer_cls: type[Writer],
    done: dict[str, str],
) -> list[LayerTask]:
    todo = [pos for pos, info in enumerate(spec.layers) if info.name not in done]
    groups = [(pos,) for pos in todo] if writer_cls.parallel_layers else ([tuple(todo)] if todo else [])
    return [
        LayerTask(
            job.source,
            job.source_format,
            tmp,
            to,
            spec,
            options,
            g,
            f"{job.location}/{'+'.join(spec.layers[p].name for p in g)}",
        )
        for g in groups
    ]


def _run_layer_tasks(
    job: SplitJob,
    spec: SplitSpec,
    tasks: list[LayerTask],
    runner: LayerRunner,
    done: dict[str, str],
    state_path: Path,
    progress: ProgressCallback | None,
    result: ConvertResult,
) -> None:
    total_bytes = sum(spec.layers[p].nbytes for t in tasks for p in t.layers)
    emit(progress, ProgressEvent("start", "convert", total=total_bytes, description=job.label))
    for results in runner(tasks):
        for name, digest, nbytes in results:
            done[name] = digest
            _write_json_atomic(state_path, {"layers": done})  # resume: layer by layer, as with local runs
            result.layers += 1
            result.bytes += nbytes
            emit(progress, ProgressEvent("advance", "convert", advance=nbytes, nbytes=nbytes))
    emit(progress, ProgressEvent("end", "convert", description=job.label))


def torch_dtype_of(name: str) -> torch.dtype:
    from actfmt.formats.base import torch_dtype

    return torch_dtype(name)


def _verify_written(
    job: SplitJob,
    tmp: Path,
    to: str,
    spec: SplitSpec,
    done: dict[str, str],
    progress: ProgressCallback | None,
    runner: LayerRunner | None = None,
    workers: int = 1,
) -> None:
    """Re-read every written layer and compare its checksum with the source's; layers in parallel (threads, or
    the executor's workers), since reading back is as much work as writing."""
    total = sum(info.nbytes for info in spec.layers)
    emit(progress, ProgressEvent("start", "verify", total=total, description=job.label))
    with get_format(to).open_reader(tmp) as r:
        names = [li.name for li in r.layers]
        expected = [li.name for li in spec.layers]
        if names != expected:
            raise ConversionError(
                f"{tmp}: wrote layers {names}, expected {expected}; the destination is not kept."
            )

        def advance(n: int) -> None:
            emit(progress, ProgressEvent("advance", "verify", advance=n, nbytes=n))

        def one(pos: int) -> tuple[str, str, int]:
            return names[pos], layer_checksum(r, pos, advance), r.layers[pos].nbytes

        results: Iterator[tuple[str, str, int]]
        if runner is not None:
            tasks = [
                LayerTask(
                    job.source,
                    job.source_format,
                    tmp,
                    to,
                    spec,
                    WriteOptions(),
                    (pos,),
                    f"{job.location}/{name}/verify",
                    verify=True,
                )
                for pos, name in enumerate(names)
            ]
            results = (item for batch in runner(tasks) for item in batch)
        elif workers > 1 and len(names) > 1:
            pool = ThreadPoolExecutor(
                max_workers=min(workers, len(names)), thread_name_prefix="actfmt-verify"
            )
            results = pool.map(one, range(len(names)))
        else:
            pool = None
            results = map(one, range(len(names)))
        try:
            for name, got, nbytes in results:
                if runner is not None:
                    advance(nbytes)
                if got != done[name]:
                    raise ConversionError(
                        f"{job.destination}/{name}: checksum of the written data {got} differs from the "
                        f"source's {done[name]}; the conversion is not published. Check the disk and retry."
                    )
        finally:
            if runner is None and pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    emit(progress, ProgressEvent("end", "verify", description=job.label))


def _actfmt_block(
    job: SplitJob, spec: SplitSpec, done: dict[str, str], options: WriteOptions, cast_from: dict[str, str]
) -> dict[str, Any]:
    from actfmt import __version__

    block: dict[str, Any] = {
        "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_format": spec.source_format,
        "dtype": {li.name: li.dtype for li in spec.layers},
        "shard_rows": {li.name: list(li.shard_rows) for li in spec.layers if li.shard_rows},
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "checksums": {li.name: done[li.name] for li in spec.layers},
    }
    if cast_from:
        block["cast_from"] = cast_from  # layer -> the source dtype before an explicit --dtype cast
    block["complete"] = True  # last key: the completeness mark
    return block


# ----------------------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyResult:
    """Do two splits or trees hold the same activations?  ``differences`` says where they do not."""

    a: str
    b: str
    splits: int = 0
    layers: int = 0
    bytes: int = 0
    differences: list[str] = field(default_factory=list)
    first: dict[str, Any] | None = None  # {"split", "layer", "row"} of the first differing row

    @property
    def equal(self) -> bool:
        return not self.differences


def _split_key(location: str) -> str:
    p = Path(location)
    name = p.name
    for suffix in (".zarr", ".h5", ".hdf5"):
        name = name.removesuffix(suffix)
    return (p.parent / name).as_posix() if location != "." else "."


def verify(
    a: str | Path,
    b: str | Path,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> VerifyResult:
    """Compare two splits or trees (any two formats) bit for bit, layer by layer.

    Either may be an fsspec URL, with ``storage_options`` for its filesystem."""
    a, b = as_path(a, storage_options), as_path(b, storage_options)
    res = VerifyResult(str(a), str(b))
    sa = {_split_key(rel(p, a)): (p, f) for p, f in find_splits(a)}
    sb = {_split_key(rel(p, b)): (p, f) for p, f in find_splits(b)}
    if not sa:
        raise NotASplitError(f"{a}: no split found; check the path.")
    if not sb:
        raise NotASplitError(f"{b}: no split found; check the path.")
    if len(sa) == 1 and len(sb) == 1:  # two single splits: compare whatever their names
        sb = {next(iter(sa)): next(iter(sb.values()))}
    for key in sorted(set(sa) - set(sb)):
        res.differences.append(f"{key}: only in {a}")
    for key in sorted(set(sb) - set(sa)):
        res.differences.append(f"{key}: only in {b}")
    for key in sorted(set(sa) & set(sb)):
        (pa, fa), (pb, fb) = sa[key], sb[key]
        with open_reader(pa, fa) as ra, open_reader(pb, fb) as rb:
            res.splits += 1
            _compare_split(key, ra, rb, res, progress)
    return res


def _compare_split(
    key: str, ra: Reader, rb: Reader, res: VerifyResult, progress: ProgressCallback | None
) -> None:
    import torch

    ma = {k: v for k, v in ra.metadata.items() if k != ACTFMT_KEY}
    mb = {k: v for k, v in rb.metadata.items() if k != ACTFMT_KEY}
    if ma != mb:
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k, "<absent>") != mb.get(k, "<absent>"))
        res.differences.append(f"{key}: metadata differs in {', '.join(keys)}")
    la = {li.name: (pos, li) for pos, li in enumerate(ra.layers)}
    lb = {li.name: (pos, li) for pos, li in enumerate(rb.layers)}
    for name in sorted(set(la) ^ set(lb)):
        res.differences.append(f"{key}/{name}: only in {'A' if name in la else 'B'}")
    total = sum(li.nbytes for _, li in la.values())
    emit(
        progress,
        ProgressEvent("start", "verify", total=total, description=ra.path.name if key == "." else key),
    )
    for name in sorted(set(la) & set(lb)):
        (pa, ia), (pb, ib) = la[name], lb[name]
        if (ia.rows, ia.hidden_dim, ia.dtype) != (ib.rows, ib.hidden_dim, ib.dtype):
            res.differences.append(
                f"{key}/{name}: shape/dtype {ia.rows}x{ia.hidden_dim} {ia.dtype} vs "
                f"{ib.rows}x{ib.hidden_dim} {ib.dtype}"
            )
            continue
        res.layers += 1
        for start, stop in _scan_blocks(ia):
            xa = torch.frombuffer(tensor_bytes(ra.read(pa, start, stop)), dtype=torch.uint8)
            xb = torch.frombuffer(tensor_bytes(rb.read(pb, start, stop)), dtype=torch.uint8)
            res.bytes += xa.numel()
            emit(progress, ProgressEvent("advance", "verify", advance=xa.numel(), nbytes=xa.numel()))
            if not torch.equal(xa, xb):
                bad = int(torch.nonzero(xa != xb)[0, 0]) // (ia.hidden_dim * ia.itemsize)
                row = start + bad
                res.differences.append(f"{key}/{name}: first difference at row {row}")
                if res.first is None:
                    res.first = {"split": key, "layer": name, "row": row}
                break
    emit(progress, ProgressEvent("end", "verify", description=key))


# ----------------------------------------------------------------------------------------------------------
# info


@dataclass
class SplitInfo:
    """One split as ``actfmt info`` shows it."""

    location: str
    format: str
    layers: int
    examples: int | None
    hidden_dim: int | None
    dtype: str | None
    bytes_on_disk: int
    raw_bytes: int
    chunks: list[int] | None
    compression: str | None
    complete: bool | None

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.bytes_on_disk if self.bytes_on_disk else None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["compression_ratio"] = None if self.ratio is None else round(self.ratio, 3)
        return d


def _disk_usage(path: Path) -> int:
    if is_remote(path):
        return int(path.du())  # type: ignore[attr-defined]
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def info(path: str | Path, storage_options: dict[str, Any] | None = None) -> list[SplitInfo]:
    """Describe every split under ``path`` (a directory, or an fsspec URL with ``storage_options``): format,
    shape, dtype, bytes on disk (stored, on object storage), compression."""
    root = as_path(path, storage_options)
    out = []
    for p, fmt in find_splits(root):
        with open_reader(p, fmt) as r:
            layers = list(r.layers)
            meta = r.metadata
            describe = getattr(r, "describe", None)
            extra: dict[str, Any] = describe() if callable(describe) else {}
            block = r.actfmt
            out.append(
                SplitInfo(
                    location=rel(p, root),
                    format=fmt,
                    layers=len(layers),
                    examples=layers[0].rows if layers else meta.get("total_examples"),
                    hidden_dim=layers[0].hidden_dim if layers else meta.get("hidden_dim"),
                    dtype=layers[0].dtype if layers else None,
                    bytes_on_disk=_disk_usage(p),
                    raw_bytes=sum(li.nbytes for li in layers),
                    chunks=extra.get("chunks"),
                    compression=extra.get("compression"),
                    complete=None if block is None else bool(block.get("complete")),
                )
            )
    return out
