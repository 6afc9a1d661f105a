"""``actfmt stats``: per-layer statistics of every split under some paths, and where sibling splits separate.

:func:`stats` finds the splits (any format, local or object storage), takes each layer's per-split figures from
the store when ``actfmt convert`` kept them (``source: "stored"``; ``recompute`` forces a pass) and otherwise
computes them in one pass (:class:`~actfmt.moments.Moments`), then, for every pair of sibling splits of one
dataset, projects both splits' rows on the difference of their exact means in a second pass
(:class:`~actfmt.moments.Projection`).  Layers run in parallel: threads here, or tasks on a dask cluster
(``executor="dask"``); the figures do not depend on which.

The result's :meth:`StatsResult.to_dict` is the versioned JSON document of ``actfmt stats --output-format json``
(schema in the README, "Statistics").
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from actfmt._dask import dask_client, dask_map
from actfmt._version import __version__
from actfmt.errors import ActfmtError, StatsError
from actfmt.formats import FoundSplit, open_reader, shared_reader, walk_splits
from actfmt.formats.base import Reader, StoredVectors
from actfmt.formats.registry import no_split_found
from actfmt.formats.registry import split_name as registry_split_name
from actfmt.moments import (
    LAYER_FIELDS,
    PAIR_FIELDS,
    SCHEMA_VERSION,
    LayerStats,
    Moments,
    PairStats,
    Projection,
    direction,
    layer_moments,
    layer_projection,
    pair_figures,
    pair_order,
)
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.storage import Location, PathLike, resolve

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "EXECUTORS",
    "PairResult",
    "SplitStats",
    "StatsResult",
    "parse_layers",
    "split_name",
    "stats",
    "stored_layer_stats",
]

EXECUTORS = ("local", "dask")


def parse_layers(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,5,10-12"`` -> ``[0, 5, 10, 11, 12]`` (layer indices as in ``layer_05``); ``None`` for every layer."""
    if text is None:
        return None
    if not isinstance(text, str):
        return sorted({int(i) for i in text})
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise StatsError(
                f"--layers {text!r}: {part!r} is not a layer number or a range; write e.g. 0,5,10-12."
            ) from None
        if a < 0 or b < a:
            raise StatsError(
                f"--layers {text!r}: {part!r} is not a valid range (write low-high, e.g. 10-12)."
            )
        out.update(range(a, b + 1))
    if not out:
        raise StatsError(f"--layers {text!r}: no layer given; write e.g. 0,5,10-12.")
    return sorted(out)


def split_name(location: Location) -> str:
    """The split's name: its directory or file name without a store suffix (``EM.zarr`` -> ``EM``)."""
    return registry_split_name(location.name)


# ----------------------------------------------------------------------------------------------------------
# results


@dataclass
class SplitStats:
    """The per-split figures of one split (``splits[]`` of the JSON)."""

    path: str  # the split's location (a path or URL)
    location: str  # relative to the root it was found under ("." for the root itself)
    format: str
    split: str
    model_name: str | None
    dataset_name: str | None
    hidden_dim: int | None
    dtype: str | None
    source: str  # "stored" (kept by actfmt convert) or "computed" (a pass over the values)
    layers: list[LayerStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d


@dataclass
class PairResult:
    """The pair figures of two sibling splits, per layer (``pairs[]`` of the JSON)."""

    dataset: str  # the directory both splits lie in (a path or URL)
    location: str  # that directory relative to the root it was found under ("." for the root itself)
    a: str
    b: str
    a_path: str
    b_path: str
    best_layer: str | None
    best_index: int | None
    layers: list[PairStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d


@dataclass
class StatsResult:
    """What :func:`stats` found."""

    roots: list[str]
    splits: list[SplitStats] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``schema_version`` 1; see the README)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "actfmt", "version": __version__},
            "roots": self.roots,
            "splits": [s.to_dict() for s in self.splits],
            "pairs": [p.to_dict() for p in self.pairs],
        }

    def to_csv(self) -> str:
        """One row per (split, layer) and per (pair, layer).  ``kind`` is ``split`` or ``pair``; a split row names
        its ``split``, a pair row its ``pair`` (``EM vs Neutral``) and both sides (``a``, ``b``); ``path`` is the
        split, or the directory both splits of the pair lie in."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["kind", "path", "split", "pair", "a", "b", "layer", "index", *LAYER_FIELDS, *PAIR_FIELDS])
        for s in self.splits:
            for li in s.layers:
                row = li.to_dict()
                blank = [""] * len(PAIR_FIELDS)
                w.writerow(
                    [
                        "split",
                        s.path,
                        s.split,
                        "",
                        "",
                        "",
                        li.layer,
                        li.index,
                        *(row[k] for k in LAYER_FIELDS),
                        *blank,
                    ]
                )
        for p in self.pairs:
            for pl in p.layers:
                row = pl.to_dict()
                blank = [""] * len(LAYER_FIELDS)
                w.writerow(
                    ["pair", p.dataset, "", f"{p.a} vs {p.b}", p.a, p.b, pl.layer, pl.index, *blank]
                    + [row[k] for k in PAIR_FIELDS]
                )
        return out.getvalue()


def stored_layer_stats(reader: Reader) -> dict[str, LayerStats]:
    """The per-split figures ``actfmt convert`` recorded in the store's actfmt block (an empty dict if none)."""
    block = reader.actfmt or {}
    kept = block.get("stats")
    if not isinstance(kept, dict) or kept.get("schema_version") != SCHEMA_VERSION:
        return {}
    layers = kept.get("layers")
    if not isinstance(layers, dict):
        return {}
    out = {}
    for info in reader.layers:
        summary = layers.get(info.name)
        if isinstance(summary, dict) and all(k in summary for k in LAYER_FIELDS):
            out[info.name] = LayerStats.from_summary(info.name, info.index, summary)
    return out


# ----------------------------------------------------------------------------------------------------------
# the passes, as tasks (picklable: a dask worker opens the split itself)


@dataclass(frozen=True)
class _Task:
    location: Location
    format: str
    pos: int
    nbytes: int
    w: Any = None  # the pair direction (second pass), else None
    t: float = 0.0

    def run(self, reader: Reader | None = None, on_bytes: Callable[[int], None] | None = None) -> Any:
        r = reader if reader is not None else shared_reader(self.location, self.format)
        try:
            if self.w is None:
                return layer_moments(r, self.pos, on_bytes)
            return layer_projection(r, self.pos, self.w, self.t, on_bytes)
        except ActfmtError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            name = r.layers[self.pos].name
            raise StatsError(f"{self.location}/{name}: cannot be read ({exc}).") from None


def _run_task(task: _Task) -> Any:  # the dask task (a module-level function pickles by reference)
    return task.run()


def _run(
    tasks: list[_Task],
    readers: dict[Location, Reader],
    jobs: int,
    client: Any,
    progress: ProgressCallback | None,
) -> Iterator[tuple[_Task, Any]]:
    """Run ``tasks`` (largest first) on threads sharing ``readers``, or on the dask ``client``."""
    tasks = sorted(tasks, key=lambda t: -t.nbytes)
    if client is not None:
        for task, fut in dask_map(client, _run_task, tasks, "stats"):
            try:
                result = fut.result()
            except ActfmtError:
                raise
            except Exception as exc:
                raise StatsError(
                    f"{task.location}: a stats task failed on the dask cluster ({type(exc).__name__}: {exc})."
                ) from exc
            emit(progress, ProgressEvent("advance", "stats", advance=task.nbytes, nbytes=task.nbytes))
            yield task, result
        return
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            emit(progress, ProgressEvent("advance", "stats", advance=n, nbytes=n))

    with ThreadPoolExecutor(
        max_workers=max(1, min(jobs, len(tasks) or 1)), thread_name_prefix="actfmt-stats"
    ) as pool:
        futures = {pool.submit(t.run, readers[t.location], on_bytes): t for t in tasks}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()


# ----------------------------------------------------------------------------------------------------------
# the API


@dataclass
class _Found:
    split: FoundSplit
    root: Location
    reader: Reader
    positions: list[int]
    stored: dict[str, LayerStats]
    vectors: StoredVectors | None
    moments: dict[int, Moments] = field(default_factory=dict)


def _find(
    paths: Sequence[PathLike], storage_options: dict[str, Any] | None
) -> list[tuple[Location, FoundSplit]]:
    found: list[tuple[Location, FoundSplit]] = []
    for p in paths:
        root = resolve(p, storage_options)
        walk = walk_splits(root)
        if not walk.splits:
            raise no_split_found(root, [f"{w.rel}: {w.detail}" for w in walk.problems[:3]])
        found += [(root, s) for s in walk.splits]
    return found


def stats(
    paths: PathLike | Sequence[PathLike],
    *,
    layers: str | Sequence[int] | None = None,
    pairs: bool = True,
    recompute: bool = False,
    jobs: int | None = None,
    executor: str = "local",
    scheduler: Any = None,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StatsResult:
    """Per-layer statistics of every split under ``paths`` and the pair figures of sibling splits.

    ``layers``: layer indices (``[0, 5]`` or ``"0,5,10-12"``; default every layer).  ``pairs=False`` skips the
    pair figures (and their second pass).  ``recompute`` ignores the figures a store keeps.  ``jobs``: layers
    read at once (default: one per CPU); ``executor="dask"`` runs the passes as tasks on dask.distributed (on
    ``scheduler``, or a local cluster of ``jobs`` processes).  Raises :class:`~actfmt.errors.ActfmtError`
    subclasses on input that cannot be read.
    """
    t0 = time.perf_counter()
    if isinstance(paths, (str, os.PathLike, Location)):
        paths = [paths]
    if executor not in EXECUTORS:
        raise StatsError(f"--executor {executor!r} is unknown; choose one of: {', '.join(EXECUTORS)}.")
    if scheduler is not None and executor != "dask":
        raise StatsError("--scheduler needs --executor dask.")
    wanted = parse_layers(layers)
    result = StatsResult(roots=[str(p) for p in paths])
    workers = max(1, jobs if jobs else (os.cpu_count() or 1))
    with contextlib.ExitStack() as stack:
        found: list[_Found] = []
        for root, split in _find(paths, storage_options):
            try:
                reader = stack.enter_context(open_reader(split.location, split.format))
                infos = list(reader.layers)
            except ActfmtError:
                raise
            except (OSError, ValueError, KeyError) as exc:
                raise StatsError(f"{split.location}: cannot be read ({exc}).") from None
            positions = [p for p, li in enumerate(infos) if wanted is None or li.index in wanted]
            stored = {} if recompute else stored_layer_stats(reader)
            vectors = reader.stored_vectors() if stored and pairs else None
            found.append(_Found(split, root, reader, positions, stored, vectors))
        if wanted is not None and not any(f.positions for f in found):
            have = sorted({li.index for f in found for li in f.reader.layers})
            shown = f"{have[0]}-{have[-1]}" if have else "none"
            raise StatsError(f"--layers {layers}: no such layer in any split (layers here: {shown}).")
        groups = _siblings(found) if pairs else []
        paired = {id(f) for a, b in groups for f in (a, b)}
        client = stack.enter_context(_dask_client(scheduler, workers)) if executor == "dask" else None
        readers = {f.split.location: f.reader for f in found}
        # pass 1: the per-split figures of every layer the store does not keep (and, for pairs, exact means)
        first: list[_Task] = []
        for f in found:
            for pos in f.positions:
                info = f.reader.layers[pos]
                exact_mean = f.vectors.row("mean_f64", info.name) if f.vectors is not None else None
                if info.name in f.stored and (id(f) not in paired or exact_mean is not None):
                    if exact_mean is not None:
                        f.moments[pos] = Moments.from_mean(exact_mean, f.stored[info.name].rows)
                    continue
                first.append(_Task(f.split.location, f.split.format, pos, info.nbytes))
        second_pairs = [(a, b, _common(a, b)) for a, b in groups]
        total = sum(t.nbytes for t in first)
        total += sum(
            a.reader.layers[pa].nbytes + b.reader.layers[pb].nbytes
            for a, b, c in second_pairs
            for pa, pb in c
        )
        emit(progress, ProgressEvent("start", "stats", total=total, description="stats"))
        by_location = {f.split.location: f for f in found}
        for task, m in _run(first, readers, workers, client, progress):
            by_location[task.location].moments[task.pos] = m
        result.bytes_read += sum(t.nbytes for t in first)
        # pass 2: every row of both splits of a pair projected on the difference of their means
        second: list[_Task] = []
        dirs: dict[tuple[int, int, int], tuple[np.ndarray, float]] = {}
        for a, b, common in second_pairs:
            for pa, pb in common:
                w, t = direction(a.moments[pa], b.moments[pb])
                dirs[(id(a), pa, pb)] = (w, t)
                second.append(_Task(a.split.location, a.split.format, pa, a.reader.layers[pa].nbytes, w, t))
                second.append(_Task(b.split.location, b.split.format, pb, b.reader.layers[pb].nbytes, w, t))
        projections: dict[tuple[Location, int], Projection] = {}
        for task, p in _run(second, readers, workers, client, progress):
            projections[(task.location, task.pos)] = p
        result.bytes_read += sum(t.nbytes for t in second)
        emit(progress, ProgressEvent("end", "stats", description="stats"))
        for f in found:
            result.splits.append(_split_stats(f))
        for a, b, common in second_pairs:
            result.pairs.append(_pair_result(a, b, common, projections))
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _dask_client(scheduler: Any, workers: int) -> Iterator[Any]:
    with dask_client(scheduler, workers) as client:
        yield client


def _siblings(found: list[_Found]) -> list[tuple[_Found, _Found]]:
    """Every pair of splits lying in one directory (one dataset), ordered as :func:`pair_order` says."""
    by_dir: dict[Location, dict[str, _Found]] = {}
    for f in found:
        by_dir.setdefault(f.split.location.parent, {})[split_name(f.split.location)] = f
    out = []
    for _, named in sorted(by_dir.items(), key=lambda kv: str(kv[0])):
        for a, b in pair_order(list(named)):
            out.append((named[a], named[b]))
    return out


def _common(a: _Found, b: _Found) -> list[tuple[int, int]]:
    """The layer positions of ``a`` and ``b`` with the same name and width, in layer order."""
    theirs = {b.reader.layers[p].name: p for p in b.positions}
    out = []
    for pa in a.positions:
        info = a.reader.layers[pa]
        pb = theirs.get(info.name)
        if pb is not None and b.reader.layers[pb].hidden_dim == info.hidden_dim:
            out.append((pa, pb))
    return out


def _split_stats(f: _Found) -> SplitStats:
    meta: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        meta = dict(f.reader.metadata)
    infos = f.reader.layers
    layers = []
    computed = False
    for pos in f.positions:
        info = infos[pos]
        m = f.moments.get(pos)
        if m is not None and not m.mean_only:
            layers.append(LayerStats.from_summary(info.name, info.index, m.summary()))
            computed = True
        else:
            layers.append(f.stored[info.name])
    dtypes = {infos[p].dtype for p in f.positions}
    hidden = {infos[p].hidden_dim for p in f.positions}
    return SplitStats(
        path=str(f.split.location),
        location=f.split.rel,
        format=f.split.format,
        split=split_name(f.split.location),
        model_name=meta.get("model_name"),
        dataset_name=meta.get("dataset_name"),
        hidden_dim=hidden.pop() if len(hidden) == 1 else None,
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        source="computed" if computed or not f.positions else "stored",
        layers=layers,
    )


def _pair_result(
    a: _Found, b: _Found, common: list[tuple[int, int]], projections: dict[tuple[Location, int], Projection]
) -> PairResult:
    rows = []
    for pa, pb in common:
        info = a.reader.layers[pa]
        rows.append(
            pair_figures(
                info.name,
                info.index,
                a.moments[pa],
                b.moments[pb],
                projections[(a.split.location, pa)],
                projections[(b.split.location, pb)],
            )
        )
    best = best_layer(rows)
    return PairResult(
        dataset=str(a.split.location.parent),
        location=a.split.rel.rpartition("/")[0] or ".",
        a=split_name(a.split.location),
        b=split_name(b.split.location),
        a_path=str(a.split.location),
        b_path=str(b.split.location),
        best_layer=best.layer if best else None,
        best_index=best.index if best else None,
        layers=rows,
    )


def best_layer(rows: Sequence[PairStats]) -> PairStats | None:
    """The layer where the splits separate best: the highest midpoint accuracy, then the largest |Cohen's d|,
    then the earliest layer."""
    scored = [r for r in rows if r.midpoint_accuracy is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.midpoint_accuracy, abs(r.cohens_d or 0.0), -r.index))
