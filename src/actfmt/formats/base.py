"""The Format protocol: every storage format is one module with a Reader and a Writer over :mod:`actfmt.storage`.

A *split* is ``num_layers`` 2-D arrays ``[total_examples, hidden_dim]`` plus the producer's metadata.  Readers
return rows as numpy arrays of the *stored* dtype (:func:`stored_dtype`: bfloat16 as its ``uint16`` bits, since
numpy has none) and, for the public API, as torch tensors with bfloat16 restored; writers receive numpy row
blocks.  Nothing on the conversion path needs torch.  Shared logic (planning, checksums, commit, resume,
verification) lives in :mod:`actfmt.conversion`, never here.

Rows stored raw (a ``.pt`` shard's tensor, a safetensors file, an uncompressed zarr chunk) are all read by one
piece of code, :class:`RowStore`: segments of whole rows at known byte offsets, read with batched
:func:`~actfmt.storage.read_into` calls (``preadv`` locally, concurrent ranged GETs remotely).  Its
:meth:`RowStore.runs` gives the byte runs a writer may copy in the kernel.

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from actfmt.errors import ConversionError
from actfmt.formats.catalog import split_name as registry_split_name
from actfmt.formats.catalog import strip_suffix
from actfmt.layout import loads_json
from actfmt.storage import Entry, Location, read_into, short_read

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = [
    "ACTFMT_KEY",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_SHARDS",
    "MAX_SHOWN_MISSING",
    "VECTOR_NAMES",
    "ByteRun",
    "Format",
    "FormatOptions",
    "LayerInfo",
    "MissingChunks",
    "Reader",
    "RowStore",
    "RowStoreReader",
    "Runs",
    "Segment",
    "SplitSpec",
    "StoredVectors",
    "WriteOptions",
    "Writer",
    "as_array",
    "check_chunk_grid",
    "check_shard_rows",
    "check_write_chunks",
    "dtype_name",
    "fingerprint_of",
    "option_flag",
    "scratch",
    "stored_dtype",
    "stored_vectors_of",
    "to_torch",
    "torch_dtype",
]

#: Takes of at most this many rows skip the sorting and grouping of larger ones.
SMALL_TAKE = 8
#: Name of the actfmt block in a store's attributes / metadata.
ACTFMT_KEY = "actfmt"
#: Stored numpy dtype of each supported dtype (little-endian; bfloat16 as its bits).
_STORED = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# -- what a header may declare (untrusted input: checked before it drives an allocation, a loop or a read) ----
#: Chunks per layer a store may declare (actfmt writes chunks of 1-2 MiB: 2**20 of them is a 1-2 TiB layer).
MAX_CHUNKS = 1 << 20
#: Bytes one chunk may hold once decoded (actfmt writes 1-2 MiB): what a decoder may allocate for one chunk.
MAX_CHUNK_BYTES = 256 << 20
#: Shards per layer a store may record (``actfmt_shard_rows``): the producer's 80-row shards of 5M examples.
MAX_SHARDS = 1 << 16
#: Missing chunks listed by name (the rest are counted).
MAX_SHOWN_MISSING = 100


class MissingChunks(list[str]):
    """The first :data:`MAX_SHOWN_MISSING` missing chunks of a layer by name; ``total`` counts them all."""

    def __init__(self, shown: Sequence[str] = (), total: int | None = None) -> None:
        super().__init__(shown)
        self.total = len(self) if total is None else total


def check_chunk_grid(
    where: object, shape: Sequence[int], chunks: Sequence[int], itemsize: int, data_bytes: int | None = None
) -> None:
    """A :class:`~actfmt.errors.BadHeaderError` unless a layer's declared ``shape`` (2-D, non-negative, a
    positive width) and ``chunks`` (positive) stay within :data:`MAX_CHUNKS` chunks of at most
    :data:`MAX_CHUNK_BYTES` bytes.  ``data_bytes``: the bytes the store holds, when a raw layer must fit."""
    from actfmt.errors import BadHeaderError

    if len(shape) != 2 or len(chunks) != 2:
        raise BadHeaderError(
            f"{where}: declares shape {list(shape)} with chunks {list(chunks)}; a layer is 2-D "
            f"[examples, hidden_dim]."
        )
    if min(shape) < 0 or shape[1] == 0:
        raise BadHeaderError(
            f"{where}: declares shape {list(shape)}; rows must be >= 0 and hidden_dim >= 1: the store is "
            f"damaged or crafted: re-convert it."
        )
    if min(chunks) <= 0:
        raise BadHeaderError(f"{where}: declares chunk shape {list(chunks)}; chunk sizes must be >= 1.")
    chunk_bytes = chunks[0] * chunks[1] * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise BadHeaderError(
            f"{where}: declares chunks of {list(chunks)} ({chunk_bytes} bytes each), more than the "
            f"{MAX_CHUNK_BYTES} bytes actfmt decodes per chunk: re-convert with smaller --chunk-rows."
        )
    n = -(-shape[0] // chunks[0]) * -(-shape[1] // chunks[1])
    if n > MAX_CHUNKS:
        raise BadHeaderError(
            f"{where}: shape {list(shape)} in chunks of {list(chunks)} declares {n} chunks, more than the "
            f"{MAX_CHUNKS} actfmt reads per layer: the store is damaged or crafted (or re-convert it with "
            f"larger --chunk-rows)."
        )
    nbytes = shape[0] * shape[1] * itemsize
    if data_bytes is not None and nbytes > data_bytes:
        raise BadHeaderError(
            f"{where}: declares shape {list(shape)} ({nbytes} bytes of raw data) but the store holds "
            f"{data_bytes} bytes: the store is damaged or crafted: re-convert it."
        )


def check_write_chunks(where: object, chunk_rows: int, info: LayerInfo) -> None:
    """A :class:`~actfmt.errors.ConversionError` when a writer's chunks would exceed :data:`MAX_CHUNK_BYTES` or
    :data:`MAX_CHUNKS` (what every reader refuses), naming the ``--chunk-rows`` that would fit."""
    from actfmt.errors import ConversionError

    nbytes = chunk_rows * info.row_bytes
    if nbytes > MAX_CHUNK_BYTES:
        raise ConversionError(
            f"{where}: --chunk-rows {chunk_rows} makes chunks of {nbytes} bytes; actfmt reads chunks of at most "
            f"{MAX_CHUNK_BYTES} bytes: use --chunk-rows {max(1, MAX_CHUNK_BYTES // max(1, info.row_bytes))} or less."
        )
    n = -(-info.rows // max(1, chunk_rows))
    if n > MAX_CHUNKS:
        raise ConversionError(
            f"{where}: --chunk-rows {chunk_rows} makes {n} chunks of {info.rows} rows; actfmt reads at most "
            f"{MAX_CHUNKS} chunks per layer: use --chunk-rows {-(-info.rows // MAX_CHUNKS)} or more."
        )


def check_shard_rows(where: object, shard_rows: Any, rows: int) -> tuple[int, ...] | None:
    """The shard-row list a store records for a layer of ``rows`` rows (``actfmt_shard_rows``), checked before
    anything loops over it: ``None`` when absent; a :class:`~actfmt.errors.BadHeaderError` unless it is a list
    of at most ``rows`` (or 1) and :data:`MAX_SHARDS` non-negative integers summing to ``rows``."""
    from actfmt.errors import BadHeaderError

    if shard_rows is None:
        return None
    if hasattr(shard_rows, "tolist"):  # an HDF5 attribute (numpy array)
        shard_rows = shard_rows.tolist()
    if not isinstance(shard_rows, (list, tuple)):
        raise BadHeaderError(f"{where}: the recorded shard rows are not a list; re-convert the store.")
    if len(shard_rows) > max(1, rows) or len(shard_rows) > MAX_SHARDS:
        raise BadHeaderError(
            f"{where}: records {len(shard_rows)} shards for {rows} rows (at most one shard per row and "
            f"{MAX_SHARDS} in all); the store is damaged or crafted: re-convert it."
        )
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shard_rows):
        raise BadHeaderError(
            f"{where}: the recorded shard rows must be non-negative integers; re-convert the store."
        )
    total = sum(shard_rows)
    if total != rows:
        raise BadHeaderError(
            f"{where}: the recorded shard rows sum to {total}, the layer has {rows} rows; re-convert the store."
        )
    return tuple(int(n) for n in shard_rows)


def stored_dtype(name: str) -> np.dtype:
    """The numpy dtype a layer of dtype ``name`` is stored and handed around as (bfloat16: ``<u2``)."""
    import numpy as np

    try:
        return np.dtype(_STORED[name])
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; actfmt stores {', '.join(_STORED)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array as a torch tensor of its real dtype, sharing memory (bfloat16 bits viewed back)."""
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def scratch(out: np.ndarray | None, rows: int, hidden: int, dtype: np.dtype) -> np.ndarray:
    """A ``[rows, hidden]`` array of ``dtype``: a view of the caller's buffer ``out`` (any C-contiguous array of
    enough bytes: conversions reuse two buffers instead of faulting in fresh pages for every block), else new."""
    import numpy as np

    if out is not None:
        flat = out.reshape(-1).view(np.uint8)
        n = rows * hidden * dtype.itemsize
        if flat.size >= n:
            return flat[:n].view(dtype).reshape(rows, hidden)
    return np.empty((rows, hidden), dtype=dtype)


def as_array(data: Any, dtype: str) -> np.ndarray:
    """A row block as a C-contiguous array of the stored dtype: a numpy array as is (bits reinterpreted when
    needed), a torch tensor without a copy when it is contiguous."""
    import numpy as np

    want = stored_dtype(dtype)
    if type(data).__module__.startswith("torch"):
        import torch

        t = data.detach()
        if dtype_name(t.dtype) != dtype:
            raise ValueError(f"a {dtype_name(t.dtype)} block for a {dtype} layer")
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return np.ascontiguousarray(t.numpy()).view(want)
    arr = np.ascontiguousarray(data)
    if arr.dtype != want:
        if arr.dtype.itemsize != want.itemsize or arr.dtype.kind not in "fiu":
            raise ValueError(f"a {arr.dtype} block for a {dtype} layer (stored as {want})")
        arr = arr.view(want)
    return arr


def fingerprint_of(locations: Sequence[Location]) -> str:
    """A digest of the current identities of ``locations`` (a missing one counts as missing)."""
    import hashlib

    h = hashlib.sha256()
    for loc in locations:
        try:
            ident = repr(loc.stat().identity)
        except FileNotFoundError:
            ident = "missing"
        h.update(f"{loc.name}={ident};".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a split as stored: name, shape, dtype and (for sharded formats) row counts per shard."""

    name: str
    index: int
    rows: int
    hidden_dim: int
    dtype: str  # torch spelling: "float16", "bfloat16", "float32"
    shard_rows: tuple[int, ...] | None = None

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE.get(self.dtype, 2)

    @property
    def row_bytes(self) -> int:
        return self.hidden_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass
class SplitSpec:
    """What a writer is asked to create: the split's metadata (verbatim) and its layers."""

    metadata: dict[str, Any]
    layers: list[LayerInfo]
    source_format: str = "pt"


def option_flag(name: str) -> str:
    """The command-line flag of a format option field: ``zarr_format`` -> ``--zarr-format``."""
    return "--" + name.replace("_", "-")


_O = TypeVar("_O", bound="FormatOptions")


@dataclass(frozen=True)
class FormatOptions:
    """A format's own write options: subclass it as a frozen dataclass (``Format.options_class``), one field
    per option with a default.  The command line makes each field a flag by itself (``zarr_format`` ->
    ``--zarr-format``); a field's ``metadata`` gives its ``help`` and, optionally, its ``choices``.  The object
    serialises itself for the resume journal (:meth:`to_dict`) and for the command that continues a conversion
    (:meth:`flags`).  This base class has no option (the formats without options of their own use it)."""

    @classmethod
    def from_mapping(cls: type[_O], values: Mapping[str, Any] | None, format_name: str) -> _O:
        """The options ``values`` give (``None`` values: not given, the default); a
        :class:`~actfmt.errors.ConversionError` for an option the format does not have or a value not among
        the field's ``choices``."""
        known = {f.name: f for f in fields(cls)}
        given = {k: v for k, v in (values or {}).items() if v is not None}
        for key in given:
            if key not in known:
                have = ", ".join(option_flag(n) for n in known) or "none"
                raise ConversionError(
                    f"{option_flag(key)} is not an option of the {format_name} format (its own options: {have})."
                )
        for key, value in given.items():
            choices = known[key].metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConversionError(
                    f"{option_flag(key)} {value!r} is not available for {format_name}; choose one of: "
                    f"{', '.join(str(c) for c in choices)}."
                )
        return cls(**given)

    @classmethod
    def of(cls: type[_O], options: WriteOptions) -> _O:
        """The options of this class a writer was given (the defaults when it was given none)."""
        got = options.format_options
        if isinstance(got, cls):
            return got
        if type(got) is FormatOptions:
            return cls()
        raise TypeError(f"{type(got).__name__} given where {cls.__name__} is expected")

    def to_dict(self) -> dict[str, Any]:
        """Every option's value (the journal records them)."""
        return asdict(self)

    def flags(self) -> list[str]:
        """The command-line options that give these values (options at their default are left out)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is MISSING or value != f.default:
                out.append(f"{option_flag(f.name)} {value}")
        return out


@dataclass
class WriteOptions:
    """Format-neutral writer options; each format uses what applies and rejects what it cannot honour.  The
    format's own options are ``format_options`` (its :attr:`Format.options_class`)."""

    chunk_rows: int | None = None
    compression: str | None = None  # None = the format's default; "none" = uncompressed
    level: int | None = None
    format_options: FormatOptions = field(default_factory=FormatOptions)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# raw rows


def _truncated(loc: Location, got: int, want: int) -> Exception:
    from actfmt.errors import TruncatedError

    return TruncatedError(
        f"{loc}: truncated (the file has {got} bytes, {want} expected); re-run the conversion."
    )


@dataclass(frozen=True)
class Segment:
    """``rows`` whole rows stored raw in ``location`` from byte ``offset`` -- or, when ``array`` is given,
    rows that had to be loaded another way (a legacy ``.pt`` shard), held in memory."""

    location: Location
    offset: int
    rows: int
    array: Any = field(default=None, compare=False, repr=False)


#: ``(location, byte offset, byte count)``: a run of raw bytes a writer may copy as is.
ByteRun = tuple[Location, int, int]


class Runs(list[ByteRun]):
    """The byte runs of a block of rows handed to a writer without the rows in memory, with the CRC-32 of
    their bytes when the writer asked for it (:attr:`Writer.wants_crc32`)."""

    def __init__(self, runs: Sequence[ByteRun] = (), crc32: int | None = None) -> None:
        super().__init__(runs)
        self.crc32 = crc32

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self)


class RowStore:
    """A layer whose rows are stored raw, in segments of whole rows (shards, files or chunks).

    ``missing_ok``: a missing file reads as zeros (a zarr chunk that was never written reads as the fill value).
    """

    def __init__(
        self, segments: Sequence[Segment], hidden_dim: int, dtype: str, missing_ok: bool = False
    ) -> None:
        import numpy as np

        self.segments = list(segments)
        self.hidden_dim = hidden_dim
        self.dtype = stored_dtype(dtype)
        self.row_bytes = hidden_dim * self.dtype.itemsize
        self.missing_ok = missing_ok
        #: ``(location, file size)`` of a single-segment store whose file ends before its declared rows (a
        #: truncated or crafted file): a read past that end fails before anything is allocated for it.
        self.short_file: tuple[Location, int] | None = None
        self.offsets = np.zeros(len(self.segments) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in self.segments], out=self.offsets[1:])

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(segment index, first row in it, last row + 1 in it)`` covering rows ``[start, stop)``."""
        import numpy as np

        out = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop and k < len(self.segments):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out.append((k, a - lo, b - lo))
            start = max(start, hi)
            k += 1
        return out

    def runs(self, start: int, stop: int) -> list[ByteRun] | None:
        """The byte runs holding rows ``[start, stop)``, in order (``None`` if some rows are not stored raw)."""
        rb = self.row_bytes
        pieces = self._pieces(start, stop)
        if any(self.segments[k].array is not None for k, _, _ in pieces):
            return None
        return [
            (self.segments[k].location, self.segments[k].offset + a * rb, (b - a) * rb) for k, a, b in pieces
        ]

    def mapped(self) -> Iterator[memoryview]:
        """The layer's raw bytes, segment by segment, as views of memory maps (no copy), in row order.

        Only for stores whose every segment is a local file actfmt itself owns (the partial store it has just
        written, under its lock): a file truncated by someone else while it is mapped would kill the process
        (SIGBUS).  ``None`` segments (in memory) are yielded as they are."""
        for seg in self.segments:
            n = seg.rows * self.row_bytes
            if seg.array is not None:
                yield seg.array.data.cast("B")
                continue
            mm = seg.location.mmap() if n else None
            if mm is None:
                yield self.read(0, 0).data.cast("B")  # an empty segment
                continue
            try:
                if len(mm) < seg.offset + n:
                    raise _truncated(seg.location, len(mm), seg.offset + n)
                view = memoryview(mm)[seg.offset : seg.offset + n]
                try:
                    yield view
                finally:
                    view.release()
            finally:
                mm.close()

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        import numpy as np

        start, stop = max(0, start), min(max(start, stop), self.rows)
        if self.short_file is not None and stop > start:
            loc, size = self.short_file
            want = self.segments[0].offset + stop * self.row_bytes
            if want > size:
                raise short_read(loc, size, want)
        out = scratch(out, max(0, stop - start), self.hidden_dim, self.dtype)
        reqs, pos = [], 0
        for k, a, b in self._pieces(start, stop):
            seg, dst = self.segments[k], out[pos : pos + b - a]
            if seg.array is not None:
                dst[...] = seg.array[a:b]
            else:
                reqs.append((seg.location, seg.offset + a * self.row_bytes, dst.reshape(-1).view(np.uint8)))
            pos += b - a
        for ok, (_, _, buf) in zip(read_into(reqs, self.missing_ok), reqs, strict=True):
            if not ok:
                buf[:] = 0
        return out

    def _take_few(self, rows: list[int]) -> np.ndarray:
        """A few rows (an example across layers, a probe's query): one request per row, no sorting."""
        import bisect

        import numpy as np

        got = np.empty((len(rows), self.hidden_dim), dtype=self.dtype)
        starts = self._starts
        reqs: list[tuple[Location, int, Any]] = []
        for j, r in enumerate(rows):
            k = bisect.bisect_right(starts, r) - 1
            seg, local = self.segments[k], r - starts[k]
            if seg.array is not None:
                got[j] = seg.array[local]
            else:
                reqs.append((seg.location, seg.offset + local * self.row_bytes, got[j].view(np.uint8)))
        for ok, (_, _, buf) in zip(read_into(reqs, self.missing_ok), reqs, strict=True):
            if not ok:
                buf[:] = 0
        return got

    def row_request(self, row: int, dst: np.ndarray) -> tuple[Location, int, Any] | None:
        """The read request that fills ``dst`` with row ``row`` (``None``: copied from memory already)."""
        import bisect

        starts = self._starts
        k = bisect.bisect_right(starts, row) - 1
        seg, local = self.segments[k], row - starts[k]
        if seg.array is not None:
            dst[...] = seg.array[local]
            return None
        return (seg.location, seg.offset + local * self.row_bytes, dst.reshape(-1).view("u1"))

    @cached_property
    def _starts(self) -> list[int]:
        return [int(x) for x in self.offsets[:-1]] if len(self.offsets) > 1 else [0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted-or-not, repeated-or-not indices; runs of nearby rows are one request each."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        if rows.size <= SMALL_TAKE:
            return self._take_few(rows.tolist())
        uniq, inverse = np.unique(rows, return_inverse=True)
        got = np.empty((uniq.size, self.hidden_dim), dtype=self.dtype)
        if uniq.size == 0:
            return got[inverse.reshape(-1)]
        which = np.searchsorted(self.offsets, uniq, side="right") - 1
        reqs: list[tuple[Location, int, Any]] = []
        scatter: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for k in np.unique(which).tolist():
            seg = self.segments[k]
            sel = np.flatnonzero(which == k)
            local = uniq[sel] - int(self.offsets[k])
            if seg.array is not None:
                got[sel] = seg.array[local]
                continue
            gap = max(1, seg.location.merge_gap // max(1, self.row_bytes))
            cuts = np.flatnonzero(np.diff(local) > gap) + 1
            for part in np.split(np.arange(sel.size), cuts):
                a, b = int(local[part[0]]), int(local[part[-1]]) + 1
                off = seg.offset + a * self.row_bytes
                if b - a == part.size:  # consecutive rows: straight into the output
                    lo = int(sel[part[0]])
                    reqs.append((seg.location, off, got[lo : lo + part.size].reshape(-1).view(np.uint8)))
                else:
                    buf = np.empty((b - a, self.hidden_dim), dtype=self.dtype)
                    reqs.append((seg.location, off, buf.reshape(-1).view(np.uint8)))
                    scatter.append((buf, sel[part], local[part] - a))
        oks = read_into(reqs, self.missing_ok)
        for ok, (_, _, buf) in zip(oks, reqs, strict=True):
            if not ok:
                buf[:] = 0
        for buf, dst, src in scatter:
            got[dst] = buf[src]
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return got
        return got[inverse.reshape(-1)]


# ----------------------------------------------------------------------------------------------------------
# readers and writers


#: The arrays ``actfmt convert`` keeps with a store, ``[layers, hidden_dim]`` each: ``mean`` and ``std`` (float32,
#: for users) and ``mean_f64`` (the exact mean, from which ``actfmt stats`` takes the pair direction).
VECTOR_NAMES = ("mean", "std", "mean_f64")


@dataclass
class StoredVectors:
    """The per-layer vectors kept with a store: ``arrays[name][i]`` belongs to layer ``layers[i]``."""

    layers: list[str]
    arrays: dict[str, np.ndarray]

    def row(self, name: str, layer: str) -> np.ndarray | None:
        """The vector ``name`` (``mean``, ``std``, ``mean_f64``) of ``layer``, or ``None``."""
        arr = self.arrays.get(name)
        if arr is None or layer not in self.layers:
            return None
        return arr[self.layers.index(layer)]


def stored_vectors_of(arrays: dict[str, np.ndarray], layers: Any) -> StoredVectors | None:
    """Check what a store holds: a list of layer names and ``[layers, hidden_dim]`` arrays that agree."""
    if isinstance(layers, str):
        try:
            layers = loads_json(layers)
        except ValueError:
            return None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        return None
    out = {}
    for name in VECTOR_NAMES:
        arr = arrays.get(name)
        if arr is None:
            continue
        if getattr(arr, "ndim", 0) != 2 or arr.shape[0] != len(layers):
            return None
        out[name] = arr
    if "mean" not in out or "std" not in out:
        return None
    return StoredVectors(list(layers), out)


class Reader(abc.ABC):
    """Read-only access to one split in one format.  Use as a context manager."""

    format: ClassVar[str]

    def __init__(self, location: Location) -> None:
        self.location = location

    @property
    def path(self) -> Location:
        """The split's location (``str()`` gives its path or URL)."""
        return self.location

    # -- description ---------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The producer's metadata keys, verbatim (without the actfmt block)."""

    @property
    def actfmt(self) -> dict[str, Any] | None:
        """The actfmt block written by a conversion, or ``None`` (e.g. a producer's ``.pt`` tree)."""
        return None

    @property
    @abc.abstractmethod
    def layers(self) -> Sequence[LayerInfo]:
        """The layers present, sorted by index."""

    def layer_info(self, layer: int) -> LayerInfo:
        """One layer's description (formats that describe layers lazily need not look at the others)."""
        return self.layers[layer]

    def position(self, name: str) -> int | None:
        """The position of the layer called ``name`` (``layer_03``), or ``None``."""
        names = [li.name for li in self.layers]
        return names.index(name) if name in names else None

    def describe(self) -> dict[str, Any]:
        """Chunks, compression and the like, for ``actfmt info``."""
        return {}

    def stored_vectors(self) -> StoredVectors | None:
        """The per-layer vectors ``actfmt convert`` kept with the store (:data:`VECTOR_NAMES`), or ``None``.
        Directory stores: the safetensors file :data:`~actfmt.formats.vectors.STATS_FILE`."""
        from actfmt.formats.vectors import STATS_FILE, read_tensors

        found = read_tensors(self.location / STATS_FILE)
        return None if found is None else stored_vectors_of(found[0], found[1].get("layers"))

    def missing_chunks(self, layer: int) -> list[str]:
        """Parts of layer position ``layer`` the store lacks (they would read back as zeros)."""
        return []

    # -- data ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of layer *position* ``layer``, in the stored dtype: an array of its own, or a
        view of ``out`` (a scratch buffer the caller reuses, see :func:`scratch`) when the format reads into one."""

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        """Rows at the given indices (any order, repeats allowed), in the stored dtype."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        info = self.layers[layer]
        if rows.size and (rows.min() < 0 or rows.max() >= info.rows):
            raise IndexError(f"row index out of range for {info.rows} rows of {info.name}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((uniq.size, info.hidden_dim), dtype=stored_dtype(info.dtype))
        breaks = np.flatnonzero(np.diff(uniq) > 1) + 1
        for run in np.split(np.arange(uniq.size), breaks):
            if run.size:
                lo, hi = int(uniq[run[0]]), int(uniq[run[-1]]) + 1
                out[run] = self.read_array(layer, lo, hi)
        return out[inverse.reshape(-1)]

    def chunk_rows_of(self, layer: int) -> int | None:
        """Rows per stored chunk of layer position ``layer`` (reads of whole chunks are cheapest), or
        ``None`` when the format has no chunks."""
        return None

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        """The raw bytes of layer position ``layer`` as memory-mapped views, in row order, for a store actfmt has
        just written and holds the lock of (its verification: nothing is copied); ``None`` where the format or
        the storage cannot (then :meth:`read_array` is used).  Never for someone else's files: a file truncated
        while mapped kills the process."""
        return None

    def fingerprint(self, layer: int) -> str | None:
        """A digest of the identities (size, mtime, inode; ETag remotely) of the files layer position ``layer``
        is read from, taken now: it changes when they are rewritten or replaced.  ``None``: cannot say."""
        return None

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        """The raw byte runs holding rows ``[start, stop)`` when the rows are stored as is (then a writer
        may copy them in the kernel), else ``None``."""
        return None

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as a torch tensor of the real dtype."""
        return to_torch(self.read_array(layer, start, stop), self.layers[layer].dtype)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        """Rows at the given indices as a torch tensor of the real dtype."""
        return to_torch(self.take_array(layer, rows), self.layers[layer].dtype)

    def example_arrays(self, row: int) -> list[np.ndarray]:
        """Row ``row`` of every layer, each ``[1, hidden_dim]`` in its stored dtype (``Split.example``)."""
        return [self.take_array(pos, [row]) for pos in range(len(self.layers))]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_across(stores: Sequence[RowStore], row: int) -> list[np.ndarray]:
    """Row ``row`` of every store (one per layer), each ``[1, hidden_dim]``, in one batch of reads."""
    import numpy as np

    outs, reqs, owners = [], [], []
    for store in stores:
        if not 0 <= row < store.rows:
            raise IndexError(f"row {row} out of range for {store.rows} rows")
        got = np.empty((1, store.hidden_dim), dtype=store.dtype)
        req = store.row_request(row, got[0])
        if req is not None:
            reqs.append(req)
            owners.append(store)
        outs.append(got)
    oks = read_into(reqs, missing_ok=any(s.missing_ok for s in owners))
    for ok, req, store in zip(oks, reqs, owners, strict=True):
        if not ok:
            if not store.missing_ok:
                raise FileNotFoundError(f"{req[0]}: missing")
            req[2][:] = 0
    return outs


class RowStoreReader(Reader):
    """A reader whose layers are :class:`RowStore` s (every row stored raw): reads, takes and byte runs all go
    through the layer's store."""

    @abc.abstractmethod
    def row_store(self, layer: int) -> RowStore:
        """The :class:`RowStore` of layer position ``layer`` (built on first use)."""

    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        store = self.row_store(layer)
        return store.read(start, store.rows if stop is None else stop, out)

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        return self.row_store(layer).take(rows)

    def example_arrays(self, row: int) -> list[np.ndarray]:
        return row_across([self.row_store(pos) for pos in range(len(self.layers))], row)

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        return self.row_store(layer).runs(start, stop)

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        store = self.row_store(layer)
        if not all(s.location.supports_mmap or s.array is not None for s in store.segments):
            return None
        return store.mapped()


class Writer(abc.ABC):
    """Writes one split into a (temporary) location.  ``convert`` handles the commit, checksums and resume.

    Life cycle: ``create`` once (makes every array / file, in the driver process), then ``open`` in each
    process that writes, ``write`` row blocks (each inside one layer, as ``block_rows`` says), ``finish_layer``,
    ``close``, and finally ``finalize`` once with the actfmt block (written last: the completeness mark).
    """

    format: ClassVar[str]

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        self.location = location
        self.spec = spec
        self.options = options

    @classmethod
    @abc.abstractmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> Writer:
        """Create the empty store at ``location`` (which does not exist yet) and return a writer on it."""

    @classmethod
    def open(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> Writer:
        """Open an existing (partial) store for writing more layers."""
        return cls(location, spec, options)

    def block_rows(self, layer: int) -> list[int]:
        """Row counts of the blocks ``write`` wants for ``layer``, in order (chunks, shards, ...)."""
        info = self.spec.layers[layer]
        step = self.options.chunk_rows or info.rows or 1
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    #: Does the writer need the CRC-32 of a block it copies from byte runs (a zip record's header does)?
    wants_crc32: ClassVar[bool] = False

    def copies_raw(self, layer: int) -> bool:
        """Can ``write`` store a block of ``layer`` from the source's byte runs alone (``data=None``), copying
        them in the kernel?  Then the conversion never holds those rows in memory."""
        return False

    @abc.abstractmethod
    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        """Write rows ``start ..`` of ``layer``: ``data`` (an array of the stored dtype, or a torch tensor).
        ``runs``, when given, are the source's raw bytes of exactly these rows: a writer that stores rows raw
        may copy them in the kernel instead; ``data`` is ``None`` only when :meth:`copies_raw` said so (then
        ``runs`` is a :class:`Runs`)."""

    def finish_layer(self, layer: int) -> None:  # noqa: B027 - optional hook
        """Called once every block of ``layer`` is written (flush, close a per-layer file...)."""

    def write_stats(self, vectors: StoredVectors) -> None:
        """Keep every layer's vectors (:data:`VECTOR_NAMES`) with the store; called before :meth:`finalize`.
        Directory stores: a safetensors file (:data:`~actfmt.formats.vectors.STATS_FILE`)."""
        from actfmt.formats.vectors import STATS_FILE, write_tensors

        write_tensors(self.location / STATS_FILE, vectors.arrays, {"layers": json.dumps(vectors.layers)})

    @abc.abstractmethod
    def finalize(self, block: dict[str, Any]) -> None:
        """Write the actfmt block (with ``complete: true``) last."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""


class Format(abc.ABC):
    """A storage format: a name, how its splits are recognised, its Reader and Writer, what it supports."""

    name: ClassVar[str]
    #: What a split's name ends with (``(".zarr",)``, ``(".h5", ".hdf5")``); the first is the one written.  Empty
    #: for a plain directory named like the split (``EM/``).  The registry unites them
    #: (:func:`~actfmt.formats.catalog.store_suffixes`): nothing else lists suffixes.
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: Compression names this format accepts; the first is the default.
    compressions: ClassVar[tuple[str, ...]] = ("none",)
    #: The format's own write options (a frozen dataclass; the CLI makes each field a flag).
    options_class: ClassVar[type[FormatOptions]] = FormatOptions
    #: Capabilities, consulted instead of refusing in scattered places.
    remote_read: ClassVar[bool] = True
    #: Can the writer write object storage in place?  (If not, convert stages the store locally and uploads.)
    remote_write: ClassVar[bool] = True
    #: May different processes write different layers of one split at the same time?
    parallel_layers: ClassVar[bool] = True
    #: Is a split one file (``True``) or a directory?
    single_file: ClassVar[bool] = False
    #: Does :meth:`recognises` take directories other formats may claim (pt: any directory with a
    #: ``metadata.json``)?  Then detection asks it after every other format, wherever its registry line is.
    fallback: ClassVar[bool] = False

    @classmethod
    def writes_in_parallel(cls, options: WriteOptions) -> bool:
        """May different threads or processes write different layers at once, with these options?"""
        return cls.parallel_layers

    #: What a split of this format looks like, for the one "no split found" message
    #: (:func:`~actfmt.formats.registry.no_split_found`): ``"a .zarr group"``.
    looks_like: ClassVar[str]

    @classmethod
    def can_open(cls, location: Location, entries: Sequence[Entry] | None = None) -> bool:
        """Is ``location`` a split of this format?  ``entries``: its listing when the caller has it (a walk),
        else it is listed here (:func:`~actfmt.formats.registry.guess_format` lists once for every format).  A
        single-file format is never listed for."""
        if cls.single_file:
            return entries is None and cls.recognises(location, None)
        return cls.recognises(location, cls.listing(location, entries))

    @classmethod
    @abc.abstractmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        """Is ``location`` a split of this format?  Cheap: names and a few bytes.  ``entries``: the listing of
        ``location``, ``None`` when it is no listable directory (a file, or nothing there); never list again."""

    @staticmethod
    def listing(location: Location, entries: Sequence[Entry] | None) -> Sequence[Entry] | None:
        """``entries``, else the directory's listing; ``None`` when ``location`` is no listable directory."""
        if entries is not None:
            return entries
        try:
            return location.list_dir()
        except OSError:
            return None

    #: The format's one Reader and one Writer.
    reader: ClassVar[type[Reader]]
    writer: ClassVar[type[Writer]]

    @classmethod
    def open_reader(cls, location: Location) -> Reader:
        return cls.reader(location)

    @classmethod
    def writer_class(cls) -> type[Writer]:
        return cls.writer

    @classmethod
    def split_name(cls, location: Location) -> str:
        """The name of the split a store of this format holds (``EM.zarr`` -> ``EM``; a directory: its name)."""
        return strip_suffix(location.name, cls.suffixes)

    @classmethod
    def destination(cls, split: Location) -> Location:
        """Where a split named like ``split`` goes in this format (``EM`` -> ``EM.zarr``; any registered
        format's suffix is replaced: ``EM.h5`` -> ``EM.zarr``)."""
        return split.with_name(registry_split_name(split.name) + (cls.suffixes[0] if cls.suffixes else ""))
