"""The per-split context: everything the rules read, gathered once (one listing per directory, one batch of
header reads per split, one metadata parse; with ``deep``, one pass over the values).

Rules never do I/O of their own: they read a :class:`SplitContext` (or, for cross-split rules, all of them;
for walk rules, the :class:`~actfmt.formats.walk.Walk`).  Splits are found by the one walker,
:func:`actfmt.formats.walk_splits`.  Nothing here opens a file that ``stat`` says is not a regular file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from actfmt.checks.base import Finding, Rule
from actfmt.checksum import Hasher, scan_blocks
from actfmt.errors import OutsideTreeError
from actfmt.formats import (
    FoundSplit,
    Inventory,
    LayerEntry,
    ShardEntry,
    WalkProblem,
    get_format,
    kind_detail,
    run_each,
)
from actfmt.kernel import BITS, block_moments
from actfmt.layout import (
    JSON_MAX_BYTES,
    KNOWN_KEYS,
    JSONLimitError,
    Metadata,
    MetadataProblem,
    ShardPlan,
    loads_json,
    parse_metadata,
)
from actfmt.moments import Moments, RowNorms
from actfmt.storage import Entry, Kind, Location

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


# -- rule kinds ----------------------------------------------------------------------------------------------
class SplitRule(Rule):
    """A rule that looks at one split (not registered itself: it has no code)."""

    #: Metadata keys the rule needs; when one is absent or unusable the rule is skipped for that split.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Rules about a split's own files (its metadata file, layer directories and pieces): they apply to the
    #: splits whose format keeps an :class:`~actfmt.formats.inventory.Inventory`, the rest to every split.
    needs_inventory: ClassVar[bool] = True

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


@dataclass
class SplitContext:
    """Everything known about one split; built once by :func:`scan_split`, read by every rule."""

    path: Location
    root: Location
    location: str
    format: str  # the registry name of its format
    #: The split's own files as its format lays them out (``None``: a store, checked through its reader).
    inventory: Inventory | None = None
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
    #: Per layer index, ``(kind, digest)`` of its data from the deep pass (an inventory's pieces: their xxh3
    #: digests; a store: the checksum of its rows); digests of different kinds are never compared.
    layer_digests: dict[int, tuple[str, str]] = field(default_factory=dict)
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
        """Where the metadata lives: the inventory's metadata file, else the store itself."""
        return self.loc(self.inventory.metadata_file) if self.inventory is not None else self.loc()

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
def _read_metadata(ctx: SplitContext, e: Entry | None) -> None:
    if e is None:
        ctx.metadata_state = "missing"
        return
    if e.kind == Kind.SPECIAL:
        ctx.metadata_state, ctx.metadata_detail = "special", kind_detail(e)
        return
    if e.kind == Kind.OUTSIDE:
        ctx.metadata_state, ctx.metadata_detail = "outside", kind_detail(e)
        return
    if e.kind != "file":
        ctx.metadata_state, ctx.metadata_detail = "unreadable", kind_detail(e)
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


def _scan_store(ctx: SplitContext) -> None:
    """A store: the reader is opened once here; the store rules read what it says."""
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


def scan_split(split: FoundSplit, root: Location, jobs: int = 1) -> SplitContext:
    """Build the context of one split: its format's inventory (listings, the pieces' headers) and metadata,
    or its store opened once."""
    ctx = SplitContext(path=split.location, root=root, location=split.rel, format=split.format)
    make = get_format(split.format).inventory
    if make is None:
        _scan_store(ctx)
        return ctx
    inv = ctx.inventory = make(split.location, ctx.loc, jobs)
    ctx.layers, ctx.strays, ctx.list_error = inv.layers, inv.strays, inv.list_error
    if inv.list_error is not None:
        ctx.metadata_state = "unreadable"
        ctx.metadata_detail = inv.list_error.strerror or str(inv.list_error)
    else:
        _read_metadata(ctx, inv.metadata_entry)
    return ctx


def store_info(ctx: SplitContext) -> dict[str, Any]:
    """Layers, missing chunks and the actfmt block of a store, gathered once (cached on the context)."""
    cached = ctx.cache.get("store")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    info: dict[str, Any] = {"layers": [], "missing": {}, "block": None, "error": None}
    ctx.cache["store"] = info
    reader = ctx.reader
    if reader is None:
        return info
    try:
        info["block"] = reader.actfmt
        info["layers"] = list(reader.layers)
        for pos, layer in enumerate(info["layers"]):
            missing = reader.missing_chunks(pos)  # a MissingChunks keeps its total
            if missing:
                info["missing"][layer.name] = missing
    except Exception as exc:  # a damaged store is a finding, never a crash
        info["error"] = exc
    return info


# -- the deep pass -------------------------------------------------------------------------------------------
# One pass over the values of every split, whatever its format: the pieces of an inventory one by one, a
# store's layers through its reader; every block goes through the statistics kernel once (NaN / Inf counts,
# all-zero rows, row norms, and the per-dimension sums where the store keeps statistics) and into a digest.


@dataclass
class _Measured:
    """What one read of rows measured."""

    norms: RowNorms = field(default_factory=RowNorms)
    nan: int = 0
    inf: int = 0
    zero_rows: list[int] = field(default_factory=list)


def _measure(
    blocks: Iterable[np.ndarray],
    dtype: str,
    digest: Callable[[np.ndarray], None],
    moments: Moments | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> _Measured:
    import numpy as np  # heavy: not on the header-only path

    out = _Measured()
    row = 0
    for block in blocks:
        bits = block.view(BITS[dtype][0])
        f = block_moments(bits, dtype, columns=moments is not None)
        out.norms.add(f, row)
        out.nan += f.nan
        out.inf += f.inf
        if f.zero_rows:
            out.zero_rows += (np.flatnonzero(f.rownorm2 == 0) + row).tolist()
        if moments is not None and bits.shape[0]:
            moments.add(f, bits.shape[0])
        digest(block)
        row += bits.shape[0]
        if on_bytes is not None:
            on_bytes(block.nbytes)
    return out


def _deep_read(inv: Inventory, entry: ShardEntry) -> None:
    """Read a piece's values once: NaN / Inf counts, all-zero rows, row norms, and a digest of its bytes."""
    import numpy as np
    import xxhash

    h = entry.header
    assert h is not None
    digest = xxhash.xxh3_64()
    digest.update(f"{tuple(h.shape)}|torch.{h.dtype}|".encode())
    try:
        got = _measure(
            inv.blocks(entry), h.dtype, lambda b: digest.update(np.ascontiguousarray(b).data.cast("B"))
        )
    except Exception as exc:  # changed since the probe: report it like a probe failure
        entry.header, entry.error = None, exc
        return
    entry.nan, entry.inf, entry.zero_rows, entry.norms = got.nan, got.inf, got.zero_rows, got.norms
    entry.nonfinite = entry.nan + entry.inf
    entry.digest = digest.hexdigest()


def _store_layer(ctx: SplitContext, pos: int, on_bytes: Callable[[int], None]) -> None:
    """Read a store layer once through its reader: its checksum as ``actfmt convert`` recorded it
    (``ctx.cache["checksums"]``), its row norms (``"norms"``) and, when the store keeps statistics, the
    statistics again (``"moments"``)."""
    reader, info = ctx.reader, store_info(ctx)
    assert reader is not None
    layer = info["layers"][pos]
    kept = isinstance((info["block"] or {}).get("stats"), dict)
    h = Hasher()
    m = Moments(layer.hidden_dim) if kept else None
    blocks = (reader.read_array(pos, start, stop) for start, stop in scan_blocks(layer))
    try:
        got = _measure(blocks, layer.dtype, h.update, m, on_bytes)
    except Exception as exc:
        ctx.cache["checksums"][layer.name] = exc
        return
    ctx.cache["checksums"][layer.name] = h.digest()
    ctx.cache["norms"][layer.name] = got.norms
    if m is not None:
        ctx.cache["moments"][layer.name] = m


def deep_read(contexts: list[SplitContext], jobs: int, on_bytes: Callable[[int], None]) -> None:
    """Read every split's values once (ACT406, ACT407, ACT408, ACT501, ACT604, ACT602) and digest each layer."""
    import xxhash

    pieces: list[tuple[Inventory, ShardEntry]] = []
    layers: list[tuple[SplitContext, int]] = []
    for ctx in contexts:
        ctx.deep = True
        inv = ctx.inventory
        if inv is not None:
            pieces += [(inv, s) for s in inv.all_shards() if s.usable]
            continue
        ctx.cache.update(checksums={}, norms={}, moments={})
        info = store_info(ctx)
        if ctx.reader is not None and info["error"] is None:
            layers += [(ctx, pos) for pos, li in enumerate(info["layers"]) if li.name not in info["missing"]]

    def run(item: tuple[Any, Any]) -> None:
        if isinstance(item[0], SplitContext):
            _store_layer(item[0], item[1], on_bytes)
        else:
            inv, piece = item
            n = piece.header.tensor_nbytes  # counted even when the read fails (the bar still ends full)
            _deep_read(inv, piece)
            on_bytes(n)

    run_each(run, [*pieces, *layers], jobs)
    for ctx in contexts:
        if ctx.inventory is None:
            for layer in ctx.layers:
                got = ctx.cache.get("checksums", {}).get(layer.name)
                if isinstance(got, str):
                    ctx.layer_digests[layer.index] = ("rows", got)
            continue
        for layer in ctx.layers:
            live = layer.live_shards()
            if live and all(s.digest is not None for s in live):
                h = xxhash.xxh3_64()
                for s in live:
                    h.update(f"{s.index}:{s.digest};".encode())
                ctx.layer_digests[layer.index] = ("pieces", h.hexdigest())


def deep_bytes(contexts: list[SplitContext]) -> int:
    """What the deep pass reads: every usable piece's tensor bytes and every store layer's bytes."""
    total = sum(s.header.tensor_nbytes for ctx in contexts for s in ctx.all_shards() if s.usable and s.header)
    for ctx in contexts:
        if ctx.reader is not None:
            with contextlib.suppress(Exception):  # a damaged store: reported by the store rules
                total += sum(li.nbytes for li in ctx.reader.layers)
    return total
