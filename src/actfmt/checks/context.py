"""The per-split context: everything the rules read, gathered once (one directory listing, one header probe per
shard, one metadata parse; with ``deep``, one pass over the values).

Rules never do I/O of their own: they read a :class:`SplitContext` (or, for cross-split rules, all of them).

Split discovery
    A directory is a split when it holds ``metadata.json`` or ``layer_XX``-like subdirectories, or when one of
    the converted-store formats (``.zarr``, ``.h5``, ``layer_XX.safetensors``) recognises it.  The walk starts
    at PATH, stops descending at a split, skips hidden entries and does not follow symlinked directories.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, ClassVar

from actfmt.checks.base import Finding, Rule
from actfmt.errors import NotASplitError
from actfmt.layout import (
    METADATA_FILE,
    REQUIRED_KEYS,
    SUPPORTED_DTYPES,
    Metadata,
    MetadataProblem,
    ShardPlan,
    layer_index,
    layer_name,
    parse_metadata,
    rel,
    shard_index,
    shard_name,
)
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.remote import as_path, is_remote

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.formats.pt import ShardHeader

__all__ = [
    "LayerEntry",
    "ShardEntry",
    "SplitContext",
    "SplitRule",
    "TreeRule",
    "deep_pass",
    "discover_splits",
    "scan_split",
]

#: Names that recover an index but are spelled off the pattern (``layer_3``, ``Layer-03``, ``shard_1.pt``,
#: ``shard_000.pth``): ACT104, and the entry still stands for its index in the structural checks.
BAD_LAYER_RE = re.compile(r"^layer[_-]?(\d+)$", re.IGNORECASE)
BAD_SHARD_RE = re.compile(r"^shard[_-]?(\d+)\.(?:pt|pth)$", re.IGNORECASE)
#: Files a split may hold besides metadata.json and the layer directories (a converted .pt split's sidecar).
ALLOWED_SPLIT_FILES = {METADATA_FILE, ".actfmt.json"}


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


class TreeRule(Rule):
    """A rule that compares several splits (not registered itself: it has no code)."""

    @classmethod
    def check_tree(cls, contexts: list[SplitContext]) -> Iterable[Finding]:  # pragma: no cover - overridden
        return ()


# -- entries -------------------------------------------------------------------------------------------------
@dataclass
class ShardEntry:
    """One file in a layer directory that stands for a shard (exactly or badly named)."""

    index: int
    path: Path
    location: str
    exact: bool
    #: A correctly named shard with the same index exists: this one is ignored by the structural checks.
    shadowed: bool = False
    header: ShardHeader | None = None
    error: BaseException | None = None
    # deep results
    nonfinite: int = 0
    nan: int = 0
    inf: int = 0
    zero_rows: list[int] = field(default_factory=list)
    digest: str | None = None

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
class LayerEntry:
    """One entry of a split that stands for a layer (exactly or badly named)."""

    index: int
    path: Path
    location: str
    exact: bool
    is_dir: bool
    shadowed: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    strays: list[tuple[str, bool]] = field(default_factory=list)  # (location, is_dir)
    list_error: OSError | None = None

    @property
    def name(self) -> str:
        return self.path.name

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

    path: Path
    root: Path
    location: str
    format: str = "pt"
    metadata_raw: Any = None
    #: ``missing``, ``unreadable``, ``unparseable`` or ``None`` (the file was read and decoded).
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


# -- discovery -----------------------------------------------------------------------------------------------
def _store_format(p: Path) -> str | None:
    """The converted-store format that recognises ``p`` (zarr / hdf5 / safetensors), tolerating missing
    format modules (they are optional and may fail to import)."""
    try:
        from actfmt.formats import FORMATS, get_format
    except Exception:  # pragma: no cover - registry itself broken
        return None
    for name in FORMATS:
        if name == "pt":
            continue
        try:
            fmt = get_format(name)
            if fmt.can_open(p):
                return name
        except Exception:
            continue
    return None


def _scandir(p: Path) -> Any:
    """``os.scandir``, or the listing of a :class:`~actfmt.remote.RemotePath` (entries of the same shape)."""
    scan = getattr(p, "scandir", None)
    return scan() if scan is not None else os.scandir(p)


def _entry_path(e: Any) -> Path:
    return e.path if isinstance(e.path, PurePath) else Path(e.path)  # type: ignore[return-value]


def _is_pt_split(p: Path) -> bool:
    try:
        if not p.is_dir():
            return False
        if (p / METADATA_FILE).exists() or (p / METADATA_FILE).is_symlink():
            return True
        with _scandir(p) as it:
            return any(BAD_LAYER_RE.match(e.name) and e.is_dir() for e in it)
    except OSError:
        return False


def split_format(p: Path) -> str | None:
    """``"pt"``, a store format name, or ``None`` when ``p`` is not a split."""
    store = _store_format(p)
    if store is not None:
        return store
    return "pt" if _is_pt_split(p) else None


def discover_splits(root: str | Path) -> list[tuple[Path, str]]:
    """Every split at or below ``root`` as ``(path, format)``, sorted; raise :class:`NotASplitError` if none."""
    top = as_path(root)
    if is_remote(top):
        top.prefetch()  # type: ignore[attr-defined]  # one listing of the prefix: the walk then costs no request
    if not top.exists() and not top.is_symlink():
        raise NotASplitError(f"{top}: no such file or directory; check the path.")
    found: list[tuple[Path, str]] = []

    def walk(p: Path, depth: int) -> None:
        fmt = split_format(p)
        if fmt is not None:
            found.append((p, fmt))
            return
        if depth > 8 or not p.is_dir() or (p.is_symlink() and p != top):
            return
        try:
            children = sorted(p.iterdir(), key=lambda c: c.name)
        except OSError:
            return
        for child in children:
            if not child.name.startswith("."):
                walk(child, depth + 1)

    walk(top, 0)
    if not found:
        raise NotASplitError(
            f"{top}: no split found (a split is a directory with metadata.json and layer_XX/ directories, "
            f"or a converted .zarr / .h5 / safetensors store); point actfmt at an Activations tree or a split."
        )
    return found


# -- scanning ------------------------------------------------------------------------------------------------
def _read_metadata(ctx: SplitContext) -> None:
    p = ctx.path / METADATA_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if p.is_symlink():
            ctx.metadata_state, ctx.metadata_detail = "unreadable", "a dangling symlink"
        else:
            ctx.metadata_state = "missing"
        return
    except OSError as exc:
        ctx.metadata_state, ctx.metadata_detail = "unreadable", exc.strerror or str(exc)
        return
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", f"not UTF-8 text ({exc.reason})"
        return
    except json.JSONDecodeError as exc:
        ctx.metadata_state = "unparseable"
        ctx.metadata_detail = f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        return
    except RecursionError:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", "JSON nested too deeply"
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
    ctx.good = {k: data[k] for k in REQUIRED_KEYS if k not in bad}


def _scan_layer(ctx: SplitContext, layer: LayerEntry) -> None:
    try:
        with _scandir(layer.path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        layer.list_error = exc
        return
    exact_indices = {shard_index(e.name) for e in entries} - {None}
    for e in entries:
        loc = f"{layer.location}/{e.name}"
        i = shard_index(e.name)
        if i is not None:
            layer.shards.append(ShardEntry(i, _entry_path(e), loc, exact=True))
            continue
        m = BAD_SHARD_RE.match(e.name)
        if m is not None:
            j = int(m.group(1))
            layer.shards.append(ShardEntry(j, _entry_path(e), loc, exact=False, shadowed=j in exact_indices))
            continue
        layer.strays.append((loc, _is_dir(e)))


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def _scan_pt(ctx: SplitContext) -> None:
    _read_metadata(ctx)
    try:
        with _scandir(ctx.path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        ctx.list_error = exc
        return
    exact_indices = {layer_index(e.name) for e in entries if _is_dir(e)} - {None}
    for e in entries:
        if e.name in ALLOWED_SPLIT_FILES:
            continue
        loc = ctx.loc(e.name)
        is_dir = _is_dir(e)
        i = layer_index(e.name)
        if i is not None:
            ctx.layers.append(LayerEntry(i, _entry_path(e), loc, exact=True, is_dir=is_dir))
            continue
        m = BAD_LAYER_RE.match(e.name)
        if m is not None and is_dir:
            j = int(m.group(1))
            ctx.layers.append(
                LayerEntry(j, _entry_path(e), loc, exact=False, is_dir=True, shadowed=j in exact_indices)
            )
            continue
        ctx.strays.append((loc, is_dir))
    for layer in ctx.layers:
        if layer.is_dir:
            _scan_layer(ctx, layer)


def _probe(entry: ShardEntry) -> None:
    from actfmt.checks.header import fast_probe
    from actfmt.formats.pt import probe_shard

    try:
        # torch-free for the plain pattern; anything else (legacy, damaged, unsafe) is torch's to judge
        entry.header = fast_probe(entry.path) or probe_shard(entry.path)
    except Exception as exc:  # a broken file is a finding, never a crash (classified by the ACT0xx rules)
        entry.error = exc


def _map(fn: Callable[[ShardEntry], None], items: list[ShardEntry], jobs: int) -> None:
    """Run ``fn`` on every item (results are stored on the items, so the order of completion is irrelevant)."""
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _deep_read(entry: ShardEntry) -> None:
    """Read the values once: non-finite count, all-zero rows, and a digest of the bytes."""
    import torch
    import xxhash

    from actfmt.formats.pt import load_shard

    try:
        t = load_shard(entry.path, mmap=True)
    except Exception as exc:  # changed since the probe: report it like a probe failure
        entry.header, entry.error = None, exc
        return
    if t.dim() != 2:
        return
    t = t.contiguous()
    # One pass: the per-row max of |x| is NaN/Inf iff the row holds one, and 0 iff the row is all zeros.
    rowmax = torch.zeros(t.shape[0], dtype=t.dtype) if t.shape[1] == 0 else t.abs().amax(dim=1)
    if not bool(torch.isfinite(rowmax).all()):
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        entry.nan, entry.inf, entry.nonfinite = nan, inf, nan + inf
    zero = rowmax == 0
    if bool(zero.any()):
        entry.zero_rows = [int(i) for i in torch.nonzero(zero).flatten().tolist()]
    h = xxhash.xxh3_64()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data if t.element_size() else b"")
    entry.digest = h.hexdigest()


def scan_split(path: Path, root: Path, fmt: str, jobs: int = 1) -> SplitContext:
    """Build the context of one split: list it, parse its metadata, probe every shard's header."""
    ctx = SplitContext(path=path, root=root, location=rel(path, root), format=fmt)
    if fmt != "pt":
        _scan_store(ctx)
        return ctx
    _scan_pt(ctx)
    shards = ctx.all_shards()
    if is_remote(path):
        from actfmt.remote import prefetch_shards

        prefetch_shards([s.path for s in shards])  # type: ignore[misc]  # heads + tails, one concurrent batch
    _map(_probe, shards, jobs)
    return ctx


def deep_pass(contexts: list[SplitContext], jobs: int = 1, progress: ProgressCallback | None = None) -> None:
    """Read every usable shard's values once (ACT406, ACT407, ACT501), with one progress bar for all splits."""
    import xxhash

    todo = [s for ctx in contexts if ctx.format == "pt" for s in ctx.all_shards() if s.usable]
    nbytes = sum(s.header.tensor_nbytes for s in todo if s.header is not None)
    emit(progress, ProgressEvent("start", "validate", total=nbytes, description="reading values"))

    def read_one(s: ShardEntry) -> None:
        n = s.header.tensor_nbytes if s.header is not None else 0
        _deep_read(s)
        emit(progress, ProgressEvent("advance", "validate", advance=n, nbytes=n))

    _map(read_one, todo, jobs)
    stores = [ctx for ctx in contexts if ctx.format != "pt" and "reader" in ctx.cache]
    if stores:
        from actfmt.checks.stores import store_checksums

        def on_bytes(n: int) -> None:
            emit(progress, ProgressEvent("advance", "validate", advance=n, nbytes=n))

        for ctx in stores:
            store_checksums(ctx, on_bytes)
    emit(progress, ProgressEvent("end", "validate"))
    for ctx in contexts:
        ctx.deep = True
        for layer in ctx.layers:
            live = layer.live_shards()
            if live and all(s.digest is not None for s in live):
                h = xxhash.xxh3_64()
                for s in live:
                    h.update(f"{s.index}:{s.digest};".encode())
                ctx.layer_digests[layer.index] = h.hexdigest()


def _scan_store(ctx: SplitContext) -> None:
    """Converted stores: metadata only here (store rules open their reader themselves, once, via the cache)."""
    try:
        from actfmt.formats import get_format

        reader = get_format(ctx.format).open_reader(ctx.path)
    except Exception as exc:
        ctx.metadata_state, ctx.metadata_detail = "unreadable", f"{type(exc).__name__}: {exc}"
        ctx.cache["reader_error"] = exc
        return
    ctx.cache["reader"] = reader
    try:
        data = reader.metadata
    except Exception as exc:
        ctx.metadata_state, ctx.metadata_detail = "unparseable", str(exc)
    else:
        _set_metadata(ctx, data)
    try:
        for info in reader.layers:
            ctx.layers.append(LayerEntry(info.index, ctx.path / info.name, ctx.loc(info.name), True, True))
    except Exception:  # reported by the store rules (ACT603)
        pass
