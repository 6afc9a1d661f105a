"""The per-split context: everything the rules read, gathered once (one listing per directory, one batch of
header reads per split, one metadata parse; with ``deep``, one pass over the values).

Rules never do I/O of their own: they read a :class:`SplitContext` (or, for cross-split rules, all of them;
for walk rules, the :class:`~actfmt.formats.walk.Walk`).  Splits are found by the one walker,
:func:`actfmt.formats.walk_splits`.  Nothing here opens a file that ``stat`` says is not a regular file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from actfmt.checks.base import Finding, Rule
from actfmt.errors import OutsideTreeError
from actfmt.formats import Split, WalkProblem, get_format
from actfmt.formats.pt.header import ShardHeader, load_shard, probe_shard, read_heads
from actfmt.formats.vectors import STATS_FILE
from actfmt.kernel import BITS, block_moments
from actfmt.layout import (
    JSON_MAX_BYTES,
    KNOWN_KEYS,
    LOOSE_LAYER_RE,
    LOOSE_SHARD_RE,
    METADATA_FILE,
    SUPPORTED_DTYPES,
    JSONLimitError,
    Metadata,
    MetadataProblem,
    ShardPlan,
    layer_index,
    layer_name,
    loads_json,
    parse_metadata,
    shard_index,
    shard_name,
)
from actfmt.moments import RowNorms
from actfmt.storage import Entry, Kind, Location, read_into

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from actfmt.formats.base import Reader

__all__ = [
    "LayerEntry",
    "ShardEntry",
    "ShardRule",
    "SplitContext",
    "SplitRule",
    "TreeRule",
    "WalkRule",
    "deep_bytes",
    "deep_read",
    "scan_split",
]

#: Files a split may hold besides metadata.json and the layer directories (a converted .pt split's sidecar and
#: its statistics vectors).
ALLOWED_SPLIT_FILES = {METADATA_FILE, ".actfmt.json", STATS_FILE}
#: Rows read per step by the deep pass (bounded memory whatever the shard size).
DEEP_BLOCK_BYTES = 16 << 20


# -- rule kinds ----------------------------------------------------------------------------------------------
class SplitRule(Rule):
    """A rule that looks at one split (not registered itself: it has no code)."""

    #: Metadata keys the rule needs; when one is absent or unusable the rule is skipped for that split.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Rules that apply to the producer's ``.pt`` layout only.
    pt_only: ClassVar[bool] = True

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:  # pragma: no cover - overridden
        return ()


class ShardRule(SplitRule):
    """A rule that judges each shard on its own (not registered itself: it has no code)."""

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for s in ctx.all_shards():
            yield from cls.check_shard(s)

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:  # pragma: no cover - overridden
        return ()


class TreeRule(Rule):
    """A rule that compares several splits (not registered itself: it has no code)."""

    @classmethod
    def check_tree(cls, contexts: list[SplitContext]) -> Iterable[Finding]:  # pragma: no cover - overridden
        return ()


class WalkRule(Rule):
    """A rule about the parts of a tree the walk could not read or did not follow: one finding per
    :class:`~actfmt.formats.walk.WalkProblem` of the ``walk_kinds`` it covers."""

    walk_kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_walk(cls, problems: list[WalkProblem]) -> Iterable[Finding]:
        for p in problems:
            if p.kind in cls.walk_kinds:
                yield cls.finding(p.rel, p.detail)


# -- entries -------------------------------------------------------------------------------------------------
def _kind_detail(e: Entry) -> str:
    """Why an entry that is not a regular file cannot be read as one."""
    if e.kind == Kind.MISSING:
        target = ""
        if e.location.local_path is not None:
            try:
                target = f" (to {os.readlink(e.location.path)})"
            except OSError:
                target = ""
        return f"a dangling symlink{target}"
    if e.kind == Kind.SPECIAL:
        return "not a regular file (a FIFO, socket or device); not opened"
    if e.kind == Kind.OUTSIDE:
        return "a link outside the tree; not followed, never read"
    return "is a directory, not a file"


def _outside_error(e: Entry) -> OutsideTreeError:
    target = os.path.realpath(e.location.path) if e.location.local_path is not None else ""
    return OutsideTreeError(
        f"{e.location}: a link to {target or 'a place'} outside the tree; not followed, never read",
        str(e.location),
        target,
    )


@dataclass
class _Named:
    """An entry that stands for a layer or a shard: its index, where it is, and whether it is named exactly."""

    index: int
    path: Location
    location: str
    exact: bool

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ShardEntry(_Named):
    """One file in a layer directory that stands for a shard (exactly or badly named)."""

    #: A correctly named shard with the same index exists: this one is ignored by the structural checks.
    shadowed: bool = False
    kind: str = "file"
    header: ShardHeader | None = None
    error: BaseException | None = None
    # deep results
    nonfinite: int = 0
    nan: int = 0
    inf: int = 0
    zero_rows: list[int] = field(default_factory=list)
    digest: str | None = None
    norms: RowNorms | None = None  # the row norms (norm-outlier, ACT408)

    @property
    def readable(self) -> bool:
        return self.header is not None

    @property
    def is_2d(self) -> bool:
        return self.header is not None and len(self.header.shape) == 2

    @property
    def rows(self) -> int | None:
        return self.header.shape[0] if self.is_2d and self.header is not None else None

    @property
    def width(self) -> int | None:
        return self.header.shape[1] if self.is_2d and self.header is not None else None

    @property
    def dtype(self) -> str | None:
        return self.header.dtype if self.header is not None else None

    @property
    def usable(self) -> bool:
        """Readable, 2-D and of a supported dtype: the deep checks read it."""
        return self.is_2d and self.dtype in SUPPORTED_DTYPES


@dataclass
class LayerEntry(_Named):
    """One entry of a split that stands for a layer (exactly or badly named)."""

    is_dir: bool = True
    shadowed: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    strays: list[tuple[str, bool]] = field(default_factory=list)  # (location, is_dir)
    list_error: OSError | None = None

    @property
    def canonical(self) -> str:
        return layer_name(self.index)

    def live_shards(self) -> list[ShardEntry]:
        """Shards that count in the structural checks (not shadowed by a correctly named twin), by index."""
        return sorted((s for s in self.shards if not s.shadowed), key=lambda s: (s.index, not s.exact))

    def shard_location(self, index: int) -> str:
        """Where shard ``index`` is (or should be)."""
        for s in self.shards:
            if s.index == index and not s.shadowed:
                return s.location
        return f"{self.location}/{shard_name(index)}"


@dataclass
class SplitContext:
    """Everything known about one split; built once by :func:`scan_split`, read by every rule."""

    path: Location
    root: Location
    location: str
    format: str = "pt"
    metadata_raw: Any = None
    #: ``missing``, ``unreadable``, ``special``, ``unparseable`` or ``None`` (the file was read and decoded).
    metadata_state: str | None = None
    metadata_detail: str = ""
    metadata: Metadata | None = None
    problems: list[MetadataProblem] = field(default_factory=list)
    #: Required keys whose values are present and valid.
    good: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerEntry] = field(default_factory=list)
    strays: list[tuple[str, bool]] = field(default_factory=list)
    list_error: OSError | None = None
    deep: bool = False
    layer_digests: dict[int, str] = field(default_factory=dict)
    #: A converted store's reader (opened once by the scan, closed by :meth:`close`) or why it failed.
    reader: Reader | None = None
    reader_error: BaseException | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def loc(self, *parts: str) -> str:
        """A location relative to PATH for ``parts`` below the split."""
        base = "" if self.location == "." else self.location
        return "/".join(p for p in (base, *parts) if p) or "."

    @property
    def metadata_location(self) -> str:
        """Where the metadata lives: ``metadata.json`` in a ``.pt`` split, the store itself otherwise."""
        return self.loc(METADATA_FILE) if self.format == "pt" else self.loc()

    def has(self, *keys: str) -> bool:
        return all(k in self.good for k in keys)

    @property
    def plan(self) -> ShardPlan | None:
        if not self.has("total_examples", "shard_size", "batch_size"):
            return None
        return ShardPlan(self.good["total_examples"], self.good["shard_size"], self.good["batch_size"])

    @property
    def num_layers(self) -> int | None:
        return self.good.get("num_layers")

    def live_layers(self) -> list[LayerEntry]:
        """Layer directories that count in the structural checks: not shadowed, not beyond ``num_layers``."""
        n = self.num_layers
        return sorted(
            (
                layer
                for layer in self.layers
                if layer.is_dir and not layer.shadowed and (n is None or layer.index < n)
            ),
            key=lambda layer: layer.index,
        )

    def all_shards(self) -> list[ShardEntry]:
        return [s for layer in self.layers for s in layer.shards]

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


# -- scanning ------------------------------------------------------------------------------------------------
def _read_metadata(ctx: SplitContext, entries: dict[str, Entry]) -> None:
    e = entries.get(METADATA_FILE)
    if e is None:
        ctx.metadata_state = "missing"
        return
    if e.kind == Kind.SPECIAL:
        ctx.metadata_state, ctx.metadata_detail = "special", _kind_detail(e)
        return
    if e.kind == Kind.OUTSIDE:
        ctx.metadata_state, ctx.metadata_detail = "outside", _kind_detail(e)
        return
    if e.kind != "file":
        ctx.metadata_state, ctx.metadata_detail = "unreadable", _kind_detail(e)
        return
    try:
        raw = e.location.read_range(0, JSON_MAX_BYTES + 1)  # a huge file is refused, not read whole
    except OutsideTreeError as exc:
        ctx.metadata_state, ctx.metadata_detail = "outside", str(exc)
        return
    except OSError as exc:
        ctx.metadata_state, ctx.metadata_detail = "unreadable", exc.strerror or str(exc)
        return
    try:
        data = loads_json(raw)
    except UnicodeDecodeError as exc:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", f"not UTF-8 text ({exc.reason})"
        return
    except json.JSONDecodeError as exc:
        ctx.metadata_state = "unparseable"
        ctx.metadata_detail = f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        return
    except JSONLimitError as exc:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", str(exc)
        return
    _set_metadata(ctx, data)


def _set_metadata(ctx: SplitContext, data: Any) -> None:
    ctx.metadata_raw = data
    meta, problems = parse_metadata(data)
    ctx.metadata, ctx.problems = meta, problems
    if any(p.kind == "unparseable" for p in problems):
        ctx.metadata_state = "unparseable"
        ctx.metadata_detail = problems[0].message
        return
    bad = {p.key for p in problems}
    ctx.good = {k: data[k] for k in KNOWN_KEYS if k in data and k not in bad}


def _scan_layer(layer: LayerEntry) -> None:
    try:
        entries = layer.path.list_dir()
    except OSError as exc:
        layer.list_error = exc
        return
    exact_indices = {shard_index(e.name) for e in entries} - {None}
    for e in entries:
        loc = f"{layer.location}/{e.name}"
        i = shard_index(e.name)
        if i is not None:
            layer.shards.append(ShardEntry(i, e.location, loc, exact=True, kind=e.kind))
            continue
        m = LOOSE_SHARD_RE.match(e.name)
        if m is not None:
            j = int(m.group(1))
            layer.shards.append(
                ShardEntry(j, e.location, loc, exact=False, shadowed=j in exact_indices, kind=e.kind)
            )
            continue
        layer.strays.append((loc, e.kind == Kind.DIR))
    for s in layer.shards:
        if s.kind != "file":
            e = next(x for x in entries if x.location == s.path)
            s.error = _outside_error(e) if e.kind == Kind.OUTSIDE else OSError(_kind_detail(e))


def _scan_pt(ctx: SplitContext) -> None:
    try:
        entries = ctx.path.list_dir()
    except OSError as exc:
        ctx.list_error = exc
        ctx.metadata_state, ctx.metadata_detail = "unreadable", exc.strerror or str(exc)
        return
    _read_metadata(ctx, {e.name: e for e in entries})
    exact_indices = {layer_index(e.name) for e in entries if e.is_dir()} - {None}
    for e in entries:
        if e.name in ALLOWED_SPLIT_FILES:
            continue
        loc = ctx.loc(e.name)
        is_dir = e.is_dir()
        i = layer_index(e.name)
        if i is not None and e.kind == Kind.OUTSIDE:  # a layer directory out of the tree: never listed
            layer = LayerEntry(i, e.location, loc, exact=True, is_dir=True)
            layer.list_error = _outside_error(e)
            ctx.layers.append(layer)
            continue
        if i is not None:
            ctx.layers.append(LayerEntry(i, e.location, loc, exact=True, is_dir=is_dir))
            continue
        m = LOOSE_LAYER_RE.match(e.name)
        if m is not None and is_dir:
            j = int(m.group(1))
            ctx.layers.append(
                LayerEntry(j, e.location, loc, exact=False, is_dir=True, shadowed=j in exact_indices)
            )
            continue
        ctx.strays.append((loc, is_dir))
    for layer in ctx.layers:
        if layer.is_dir and layer.list_error is None:
            _scan_layer(layer)


def _map(fn: Callable[[Any], None], items: list[Any], jobs: int) -> None:
    """Run ``fn`` on every item (results are stored on the items, so the order of completion is irrelevant)."""
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _scan_store(ctx: SplitContext) -> None:
    """Converted stores: the reader is opened once here; the store rules read what it says."""
    try:
        reader = get_format(ctx.format).open_reader(ctx.path)
    except Exception as exc:  # a damaged store is a finding, never a crash
        ctx.metadata_state, ctx.metadata_detail = "unreadable", f"{type(exc).__name__}: {exc}"
        ctx.reader_error = exc
        ctx.cache["layers_error"] = exc
        return
    ctx.reader = reader
    try:
        data = reader.metadata
    except Exception as exc:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", str(exc)
    else:
        _set_metadata(ctx, data)
    try:
        for info in reader.layers:
            ctx.layers.append(LayerEntry(info.index, ctx.path / info.name, ctx.loc(info.name), True, True))
    except Exception as exc:  # reported by the store rules (ACT603, ACT606, ACT007): one root cause
        ctx.layers.clear()
        ctx.cache["layers_error"] = exc


def scan_split(split: Split, root: Location, jobs: int = 1) -> SplitContext:
    """Build the context of one split: list it, parse its metadata, probe every shard's header."""
    ctx = SplitContext(path=split.location, root=root, location=split.rel, format=split.format)
    if split.format != "pt":
        _scan_store(ctx)
        return ctx
    _scan_pt(ctx)
    shards = [s for s in ctx.all_shards() if s.error is None]
    heads = read_heads([s.path for s in shards])  # one batch of ranged reads for the split

    def probe(entry: ShardEntry) -> None:
        try:
            # torch-free for the plain pattern; anything else (legacy, damaged, unsafe) is torch's to judge
            entry.header = probe_shard(entry.path, heads.get(entry.path))
        except Exception as exc:  # a broken file is a finding, never a crash (classified by the ACT0xx rules)
            entry.error = exc

    _map(probe, shards, jobs)
    return ctx


# -- the deep pass -------------------------------------------------------------------------------------------


def _blocks(entry: ShardEntry) -> Iterable[np.ndarray]:
    """The shard's rows as stored-dtype arrays of bounded size (by offset when plain, else through torch)."""
    import numpy as np

    from actfmt.formats.dtypes import as_array

    h = entry.header
    assert h is not None
    rows, width = h.shape[0], h.shape[1]
    dtype = h.dtype
    if h.data_offset is None:
        yield as_array(load_shard(entry.path, mmap=True), dtype)
        return
    row_bytes = width * (4 if dtype == "float32" else 2)
    step = max(1, DEEP_BLOCK_BYTES // max(1, row_bytes))
    where = entry.path.pinned(h.identity)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        buf = np.empty((n, width), dtype=BITS[dtype][0])
        read_into([(where, h.data_offset + start * row_bytes, buf.reshape(-1).view(np.uint8))])
        yield buf


def _deep_read(entry: ShardEntry) -> None:
    """Read the values once: NaN / Inf counts, all-zero rows, and a digest of the bytes."""
    import numpy as np
    import xxhash

    h = entry.header
    assert h is not None
    digest = xxhash.xxh3_64()
    digest.update(f"{tuple(h.shape)}|torch.{h.dtype}|".encode())
    norms = RowNorms()
    row = 0
    try:
        for block in _blocks(entry):
            bits = block.view(BITS[h.dtype][0])
            # one pass of the statistics kernel: NaN / Inf counts, row norms (0 exactly for rows of zeros)
            f = block_moments(bits, h.dtype, columns=False)
            norms.add(f, row)
            entry.nan += f.nan
            entry.inf += f.inf
            if f.zero_rows:
                entry.zero_rows += (np.flatnonzero(f.rownorm2 == 0) + row).tolist()
            digest.update(np.ascontiguousarray(bits).data.cast("B"))
            row += bits.shape[0]
    except Exception as exc:  # changed since the probe: report it like a probe failure
        entry.header, entry.error = None, exc
        return
    entry.nonfinite = entry.nan + entry.inf
    entry.digest = digest.hexdigest()
    entry.norms = norms


def deep_read(contexts: list[SplitContext], jobs: int, on_bytes: Callable[[int], None]) -> None:
    """Read every usable shard's values once (ACT406, ACT407, ACT501) and digest each layer."""
    import xxhash

    todo = [s for ctx in contexts if ctx.format == "pt" for s in ctx.all_shards() if s.usable]

    def read_one(s: ShardEntry) -> None:
        n = s.header.tensor_nbytes if s.header is not None else 0
        _deep_read(s)
        on_bytes(n)

    _map(read_one, todo, jobs)
    for ctx in contexts:
        ctx.deep = True
        for layer in ctx.layers:
            live = layer.live_shards()
            if live and all(s.digest is not None for s in live):
                h = xxhash.xxh3_64()
                for s in live:
                    h.update(f"{s.index}:{s.digest};".encode())
                ctx.layer_digests[layer.index] = h.hexdigest()


def deep_bytes(contexts: list[SplitContext]) -> int:
    """What the deep pass reads: every usable shard's tensor bytes and every store layer's bytes."""
    total = sum(s.header.tensor_nbytes for ctx in contexts for s in ctx.all_shards() if s.usable and s.header)
    for ctx in contexts:
        if ctx.reader is not None:
            with contextlib.suppress(Exception):  # a damaged store: reported by the store rules
                total += sum(li.nbytes for li in ctx.reader.layers)
    return total
