"""Converting one split: the one ``convert_split``, the same for every format and every storage.

The steps, through :mod:`actfmt.storage.commit` (which knows local disks from object storage):

1. take the destination's lock; a complete destination is skipped with ``--resume`` and refused otherwise
   unless ``--overwrite``;
2. start a partial store (or continue one with ``--resume``: its journal says which layers are done, with
   which options and from which source files; layers whose source changed since are redone, other options
   are refused with the exact command to use);
3. run the layer tasks (threads here, or tasks on a dask cluster): each copies its layers, hashing as the bytes
   pass, then re-reads them from the partial store and checks the checksums; each finished layer is a journal
   line;
4. check that the source is still what was read (every file's size, mtime and identity), that the lock is still
   ours, keep the layers' statistics (computed from the bytes on their way, unless ``--no-stats``), write the
   actfmt block (the completeness mark) last, and publish (a rename, or nothing more on object
   storage).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from actfmt._version import __version__
from actfmt.checksum import ALGORITHM
from actfmt.conversion.plan import SplitJob
from actfmt.conversion.tasks import LayerResult, LayerRunner, layer_tasks
from actfmt.errors import (
    ActfmtError,
    ChangedError,
    ConversionError,
    DestinationExistsError,
    Interrupted,
    os_error_message,
)
from actfmt.formats import get_format, open_reader
from actfmt.formats.base import LayerInfo, Reader, SplitSpec, StoredVectors, WriteOptions, Writer
from actfmt.formats.options import FormatOptions
from actfmt.moments import SCHEMA_VERSION as STATS_SCHEMA
from actfmt.moments import Moments, layer_moments
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.storage import Location
from actfmt.storage.commit import Commit, commit_for

__all__ = [
    "ConvertResult",
    "PlannedSplit",
    "convert_split",
    "is_complete",
    "plan_split",
    "replace_refusal",
    "spec_for",
]

#: Version of the journal's records.
JOURNAL_VERSION = 2  # 2: the format's own options under "format_options"
#: The key of the requested options that holds the target format's own options (by field name).
FORMAT_OPTIONS = "format_options"


@dataclass
class PlannedSplit:
    """One split of a dry run: where it goes, how much it moves, and what would happen at the destination
    (``create``; ``replace`` with ``--overwrite``, or ``refused`` when what is there is not a complete actfmt
    store of the target format; ``resume`` / ``complete`` with ``--resume``; ``exists``: refused without one of
    them)."""

    job: SplitJob
    layers: int
    bytes: int
    action: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.job.location,
            "source": str(self.job.source),
            "source_format": self.job.source_format,
            "destination": str(self.job.destination),
            "layers": self.layers,
            "bytes": self.bytes,
            "action": self.action,
        }


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
    #: Where the time went: wall seconds of ``validate`` (the source), ``publish``; thread-seconds summed over
    #: the layer tasks for ``read`` (reading and hashing), ``write`` and ``verify``.
    timings: dict[str, float] = field(default_factory=dict)
    #: ``convert(dry_run=True)``: nothing was written; :attr:`planned` says what would have been.
    dry_run: bool = False
    planned: list[PlannedSplit] = field(default_factory=list)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-friendly data (``actfmt convert --output-format json``)."""

        def job(j: SplitJob) -> dict[str, str]:
            return {"location": j.location, "source": str(j.source), "destination": str(j.destination)}

        out: dict[str, Any] = {}
        if self.dry_run:
            out["dry_run"] = True
            out["planned"] = [p.to_dict() for p in self.planned]
        return out | {
            "splits": [job(j) for j in self.splits],
            "skipped": [job(j) for j in self.skipped],
            "layers": self.layers,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "mb_per_s": round(self.mb_per_s, 1),
            "warnings": self.warnings,
            "checksums": self.checksums,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def plan_split(job: SplitJob, to: str, overwrite: bool, resume: bool) -> PlannedSplit:
    """What converting ``job`` into format ``to`` would do, found without writing (``convert --dry-run``)."""
    with open_reader(job.source, job.source_format) as reader:
        layers = list(reader.layers)
    exists = job.destination.kind() is not None
    if resume and exists and is_complete(job.destination, to):
        action = "complete"
    elif resume and commit_for(job.destination, in_place=get_format(to).remote_write).has_partial():
        action = "resume"
    elif not exists:
        action = "create"
    elif overwrite:  # only a complete actfmt store of the target format is ever replaced
        action = "replace" if is_complete(job.destination, to) else "refused"
    else:
        action = "exists"
    return PlannedSplit(job, len(layers), sum(info.nbytes for info in layers), action)


def spec_for(reader: Reader, source_format: str, dtype: str | None) -> SplitSpec:
    """What the writer is asked to create: the source's metadata and layers (recorded shard rows kept)."""
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


def replace_refusal(final: Location, to: str) -> str:
    """Why ``final`` is not replaced: it is not a complete actfmt store of format ``to``."""
    what = "a file" if final.is_local and _is_plain_file(final) else "a directory or object"
    return (
        f"{final}: exists and is {what} that is not a complete actfmt {to} store (its actfmt block does not "
        f"say complete); actfmt replaces only its own complete stores, even with --overwrite. Move or delete it "
        f"yourself, or choose another destination."
    )


def _is_plain_file(loc: Location) -> bool:
    return os.path.isfile(loc.path)


def is_complete(location: Location, fmt: str) -> bool:
    """Is ``location`` a complete actfmt store of format ``fmt`` (its actfmt block says ``complete: true``, as
    ACT603 checks)?  The one test before a destination is replaced."""
    try:
        with get_format(fmt).open_reader(location) as r:
            block = r.actfmt
            return bool(block and block.get("complete") is True)
    except (ActfmtError, OSError, ValueError, KeyError):
        return False


def _fingerprints(reader: Reader, layers: list[LayerInfo]) -> dict[str, str | None]:
    """Per layer, a digest of the identities of the files it is read from (``None`` when the format cannot
    say), taken now."""
    return {li.name: reader.fingerprint(pos) for pos, li in enumerate(layers)}


def _format_options(requested: dict[str, Any]) -> FormatOptions:
    """The target format's own options a set of requested (or recorded) options gives."""
    fmt = get_format(requested["to"])
    return fmt.options_class.from_mapping(requested.get(FORMAT_OPTIONS), fmt.name)


def write_options(requested: dict[str, Any]) -> WriteOptions:
    return WriteOptions(
        chunk_rows=requested.get("chunk_rows"),
        compression=requested.get("compression"),
        level=requested.get("level"),
        format_options=_format_options(requested),
    )


def _flags(rec: dict[str, Any]) -> str:
    """The command-line options that reproduce a recorded set of options."""
    out = [f"--to {rec.get('to')}"]
    if rec.get("compression") is not None:
        out.append(f"--compression {rec['compression']}")
    if rec.get("level") is not None:
        out.append(f"--level {rec['level']}")
    if rec.get("chunk_rows") is not None:
        out.append(f"--chunk-rows {rec['chunk_rows']}")
    out += _format_options(rec).flags()
    if rec.get("dtype") is not None:
        out.append(f"--dtype {rec['dtype']}")
    return " ".join(out)


def _merge(given: Any, recorded: Any) -> Any:
    """Options given now over those recorded (``None``: not given, the recorded value stands), key by key
    down into the format's own options."""
    if isinstance(given, dict) and isinstance(recorded, dict):
        return {k: _merge(v, recorded.get(k)) for k, v in given.items()}
    return recorded if given is None else given


def _resume_state(
    commit: Commit, job: SplitJob, requested: dict[str, Any], fingerprints: dict[str, Any]
) -> tuple[dict[str, LayerResult], list[str], dict[str, Any] | None]:
    """The layers a partial store holds that are still good, notes about the rest, and the options it was
    started with (``None``: it cannot be continued).  Options not given now are taken from the partial store;
    options given differently are refused with the command that continues it."""
    records = commit.read_journal()
    header = records[0] if records else {}
    recorded = header.get("options")
    if header.get("journal") != JOURNAL_VERSION or not isinstance(recorded, dict):
        return (
            {},
            [f"{job.destination}: the partial conversion has no usable journal; starting it again."],
            None,
        )
    merged = _merge(requested, recorded)
    if merged != recorded:
        raise ConversionError(
            f"{job.destination}: the partial conversion was started with {_flags(recorded)}, not "
            f"{_flags(merged)}; to continue it, rerun with --resume {_flags(recorded)}; to start again with the "
            f"new options, rerun with --overwrite."
        )
    done: dict[str, LayerResult] = {}
    redo: list[str] = []
    for rec in records[1:]:
        name = rec.get("layer")
        if not isinstance(name, str) or not isinstance(rec.get("checksum"), str):
            continue
        if rec.get("source") != fingerprints.get(name):
            redo.append(name)
            done.pop(name, None)
            continue
        done[name] = LayerResult(name, rec["checksum"], int(rec.get("nbytes") or 0), rec.get("extra") or {})
    notes = []
    if redo:
        notes.append(
            f"{job.destination}: the source of {', '.join(sorted(set(redo)))} changed since the interrupted run; "
            f"converting {'it' if len(set(redo)) == 1 else 'them'} again."
        )
    return done, notes, recorded


def actfmt_block(
    spec: SplitSpec,
    done: dict[str, LayerResult],
    options: WriteOptions,
    cast_from: dict[str, str],
    moments: dict[str, Moments] | None = None,
) -> dict[str, Any]:
    """The completeness mark and what a store keeps about its conversion."""
    block: dict[str, Any] = {
        "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_format": spec.source_format,
        "dtype": {li.name: li.dtype for li in spec.layers},
        "shard_rows": {li.name: list(li.shard_rows) for li in spec.layers if li.shard_rows},
        "checksum_algorithm": ALGORITHM,
        "checksums": {li.name: done[li.name].checksum for li in spec.layers},
    }
    if cast_from:
        block["cast_from"] = cast_from  # layer -> the source dtype before an explicit --dtype cast
    if moments is not None:
        block["stats"] = {
            "schema_version": STATS_SCHEMA,
            "layers": {li.name: moments[li.name].summary() for li in spec.layers},
        }
    block["complete"] = True  # last key: the completeness mark
    return block


def _layer_moments(
    work: Location, to: str, spec: SplitSpec, done: dict[str, LayerResult], result: ConvertResult
) -> dict[str, Moments]:
    """Every layer's moments: as the layer tasks computed them, or (layers converted by an earlier run with
    ``--no-stats``) from one pass over the layer as written."""
    out: dict[str, Moments] = {}
    missing = []
    for li in spec.layers:
        state = done[li.name].extra.get("moments")
        try:
            m = Moments.from_state(state) if isinstance(state, dict) else None
        except (KeyError, TypeError, ValueError):  # a damaged journal: computed again from the store
            m = None
        if m is not None and m.hidden == li.hidden_dim:
            out[li.name] = m
        else:
            missing.append(li.name)
    if missing:
        t0 = time.perf_counter()
        with get_format(to).open_reader(work) as written:
            for name in missing:
                pos = written.position(name)
                if pos is None:
                    raise ConversionError(f"{work}: {name} was written but cannot be found in the store.")
                out[name] = layer_moments(written, pos)
        result.add_time("stats", time.perf_counter() - t0)
    return out


def _vectors(spec: SplitSpec, moments: dict[str, Moments]) -> StoredVectors:
    """The layers' mean and std vectors (float32, for users) and exact means (float64), ``[layers, hidden_dim]``."""
    import numpy as np

    names = [li.name for li in spec.layers]
    hidden = max((m.hidden for m in moments.values()), default=0)
    mean = np.zeros((len(names), hidden), dtype=np.float64)
    std = np.zeros((len(names), hidden), dtype=np.float32)
    for i, name in enumerate(names):
        m = moments[name]
        mean[i, : m.hidden] = m.mean
        std[i, : m.hidden] = np.sqrt(m.variance)
    return StoredVectors(names, {"mean": mean.astype(np.float32), "std": std, "mean_f64": mean})


class _SourceChanged(ChangedError):
    """The source's files changed between the start and the end of the conversion (worded for the user)."""


@dataclass
class _Started:
    """A split's conversion once its partial store is ready: what the layer tasks and the publication need."""

    spec: SplitSpec
    options: WriteOptions
    writer_cls: type[Writer]
    done: dict[str, LayerResult]
    cast_from: dict[str, str]
    fingerprints: dict[str, str | None]
    dtype: str | None


def _complete_already(commit: Commit, job: SplitJob, to: str, *, resume: bool, overwrite: bool) -> bool:
    """``True`` when the destination is complete and ``--resume`` skips it; raises when what is there may not
    be replaced (no ``--overwrite``, or not a complete actfmt store of the target format)."""
    final = job.destination
    if not commit.final_exists():
        return False
    complete = is_complete(final, to)
    if resume and complete:
        return True
    if not overwrite and not (resume and commit.has_partial()):
        raise DestinationExistsError(
            f"{final}: already exists; pass --overwrite to replace it"
            + (" (it is not a complete conversion, so --resume cannot continue it)." if resume else ".")
        )
    if not complete and not (commit.work == final and commit.has_partial()):
        raise DestinationExistsError(replace_refusal(final, to))
    return False


def _start(
    commit: Commit,
    job: SplitJob,
    reader: Reader,
    requested: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    result: ConvertResult,
) -> _Started:
    """Continue the partial store (``--resume``, when its journal and options allow) or create a new one."""
    final = job.destination
    fingerprints = _fingerprints(reader, list(reader.layers))
    done: dict[str, LayerResult] = {}
    recorded = None
    if resume and commit.has_partial():
        done, notes, recorded = _resume_state(commit, job, requested, fingerprints)
        result.warnings += notes
    elif commit.has_partial():
        result.warnings.append(
            f"{final}: an interrupted conversion was left here; it is discarded and the split converted "
            f"again (next time, --resume continues it layer by layer)."
        )
    chosen = recorded or requested
    dtype, options = chosen.get("dtype"), write_options(chosen)
    spec = spec_for(reader, job.source_format, dtype)
    cast_from = {a.name: a.dtype for a in reader.layers if dtype is not None and a.dtype != dtype}
    if cast_from:
        casts = sorted({f"{a} -> {dtype}" for a in cast_from.values()})
        exact = dtype == "float32"  # every float16 and bfloat16 value is a float32
        result.warnings.append(
            f"{job.location}: values cast {', '.join(casts)} (--dtype); "
            + ("every value exact, in more bytes." if exact else "not bit-exact.")
        )
    writer_cls = get_format(requested["to"]).writer_class()
    writer = None
    if recorded is not None:
        try:
            writer = writer_cls.open(commit.work, spec, options)
        except ConversionError as exc:  # the source changed shape or dtype since: start again
            result.warnings.append(
                f"{final}: the partial conversion no longer fits the source ({exc}); converting the split again "
                f"from the start."
            )
            recorded = None
    if writer is None:
        done = {}
        commit.prepare(overwrite)
        commit.start_journal({"journal": JOURNAL_VERSION, "options": requested, "source": str(job.source)})
        writer = writer_cls.create(commit.work, spec, options)
    writer.close()  # the tasks open the store themselves
    return _Started(spec, options, writer_cls, done, cast_from, fingerprints, dtype)


def _run_layers(
    st: _Started,
    commit: Commit,
    job: SplitJob,
    to: str,
    reader: Reader,
    *,
    verify: bool,
    stats: bool,
    progress: ProgressCallback | None,
    result: ConvertResult,
    runner_for: Callable[[Reader], LayerRunner],
    per_layer_progress: bool,
) -> None:
    """Run the layer tasks still to do; each finished layer is a journal line."""
    todo = [pos for pos, li in enumerate(st.spec.layers) if li.name not in st.done]
    total = sum(st.spec.layers[p].nbytes for p in todo)
    emit(progress, ProgressEvent("start", "convert", total=total, description=job.label))
    tasks = layer_tasks(
        job.source,
        job.source_format,
        commit.work,
        to,
        st.spec,
        st.options,
        todo,
        job.location,
        verify,
        st.dtype,
        str(job.destination),
        stats,
    )
    for results in runner_for(reader)(tasks):
        for res in results:
            st.done[res.name] = res
            commit.append_journal(
                {
                    "layer": res.name,
                    "checksum": res.checksum,
                    "nbytes": res.nbytes,
                    "source": st.fingerprints.get(res.name),
                    "extra": {k: v for k, v in res.extra.items() if k != "seconds"},
                }
            )
            result.layers += 1
            result.bytes += res.nbytes
            for phase, seconds in (res.extra.get("seconds") or {}).items():
                result.add_time(phase, seconds)
            if per_layer_progress:
                emit(progress, ProgressEvent("advance", "convert", advance=res.nbytes, nbytes=res.nbytes))
    emit(progress, ProgressEvent("end", "convert", description=job.label))


def _publish(st: _Started, commit: Commit, to: str, *, stats: bool, result: ConvertResult) -> None:
    """Keep the statistics, write the actfmt block (the completeness mark) last, and publish."""
    moments = _layer_moments(commit.work, to, st.spec, st.done, result) if stats else None
    t0 = time.perf_counter()
    commit.check_owner()  # still ours: only then write the completeness mark
    writer = st.writer_cls.open(commit.work, st.spec, st.options)
    try:
        if moments is not None:
            writer.write_stats(_vectors(st.spec, moments))
        writer.finalize(actfmt_block(st.spec, st.done, st.options, st.cast_from, moments))
    finally:
        writer.close()
    commit.publish()
    result.add_time("publish", time.perf_counter() - t0)


def convert_split(
    job: SplitJob,
    requested: dict[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    verify: bool,
    progress: ProgressCallback | None,
    result: ConvertResult,
    runner_for: Callable[[Reader], LayerRunner],
    per_layer_progress: bool,
    stats: bool = True,
) -> None:
    """Convert one split (see the module docstring).  ``requested``: ``to``, ``chunk_rows``, ``compression``,
    ``level``, ``dtype`` and ``format_options`` (the format's own, by field; ``None``: not given)."""
    to = requested["to"]
    commit = commit_for(job.destination, in_place=get_format(to).remote_write)
    with commit:
        try:
            result.warnings += commit.notes
            if _complete_already(commit, job, to, resume=resume, overwrite=overwrite):
                result.skipped.append(job)
                return
            with open_reader(job.source, job.source_format) as reader:
                st = _start(commit, job, reader, requested, resume=resume, overwrite=overwrite, result=result)
                _run_layers(
                    st,
                    commit,
                    job,
                    to,
                    reader,
                    verify=verify,
                    stats=stats,
                    progress=progress,
                    result=result,
                    runner_for=runner_for,
                    per_layer_progress=per_layer_progress,
                )
                now = _fingerprints(reader, st.spec.layers)
            if now != st.fingerprints:
                changed = sorted(k for k in st.fingerprints if now.get(k) != st.fingerprints[k])
                raise _SourceChanged(
                    f"{job.source}: source changed during conversion ({', '.join(changed)}); nothing was published. "
                    f"Rerun when the source no longer changes (--resume redoes only what changed)."
                )
            _publish(st, commit, to, stats=stats, result=result)
        except Interrupted as exc:  # SIGINT / SIGTERM: the lock is released on the way out, the partial kept
            if commit.has_partial():
                exc.partials.append(str(commit.work))
            raise
        except _SourceChanged:
            raise
        except ChangedError as exc:  # a file replaced while it was read: the same outcome, worded the same
            raise ChangedError(
                f"{job.source}: source changed during conversion ({exc}); nothing was published. Rerun when the "
                f"source no longer changes (--resume redoes only what changed)."
            ) from None
        except OSError as exc:  # a full disk, a permission...: say where, and that the work done is kept
            if isinstance(exc, ActfmtError) or not commit.has_partial():
                raise
            raise ConversionError(
                f"{os_error_message(exc)} The partial conversion is kept at {commit.work}: once fixed, rerun with "
                f"--resume to continue it."
            ) from exc
    result.splits.append(job)
    result.checksums[job.location] = {name: r.checksum for name, r in st.done.items()}
