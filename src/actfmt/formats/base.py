"""The Format protocol: every storage format is one module with a Reader and a Writer over :mod:`actfmt.storage`.

A *split* is ``num_layers`` 2-D arrays ``[total_examples, hidden_dim]`` plus the producer's metadata.  Readers
return rows as numpy arrays of the *stored* dtype (:func:`~actfmt.formats.dtypes.stored_dtype`: bfloat16 as its ``uint16`` bits, since
numpy has none) and, for the public API, as torch tensors with bfloat16 restored; writers receive numpy row
blocks.  Nothing on the conversion path needs torch.  Shared logic (planning, checksums, commit, resume,
verification) lives in :mod:`actfmt.conversion`, never here.

The dtypes and row blocks are :mod:`actfmt.formats.dtypes`; rows stored raw are read by
:class:`~actfmt.formats.rowstore.RowStore` (:mod:`actfmt.formats.rowstore`).

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from actfmt.errors import BadHeaderError, ConversionError
from actfmt.formats.catalog import split_name as registry_split_name
from actfmt.formats.catalog import strip_suffix
from actfmt.formats.dtypes import ITEMSIZE, stored_dtype, to_torch
from actfmt.formats.options import FormatOptions
from actfmt.formats.vectors import STATS_FILE, read_tensors, write_tensors
from actfmt.layout import loads_json
from actfmt.storage import Entry, Location

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
    "LayerInfo",
    "MissingChunks",
    "Reader",
    "SplitSpec",
    "StoredVectors",
    "WriteOptions",
    "Writer",
    "check_chunk_grid",
    "check_shard_rows",
    "check_write_chunks",
    "fingerprint_of",
    "stored_vectors_of",
]

#: Name of the actfmt block in a store's attributes / metadata.
ACTFMT_KEY = "actfmt"
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


def fingerprint_of(locations: Sequence[Location]) -> str:
    """A digest of the current identities of ``locations`` (a missing one counts as missing)."""
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
        return ITEMSIZE.get(self.dtype, 2)

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


@dataclass
class WriteOptions:
    """Format-neutral writer options; each format uses what applies and rejects what it cannot honour.  The
    format's own options are ``format_options`` (its :attr:`Format.options_class`)."""

    chunk_rows: int | None = None
    compression: str | None = None  # None = the format's default; "none" = uncompressed
    level: int | None = None
    format_options: FormatOptions = field(default_factory=FormatOptions)
    extra: dict[str, Any] = field(default_factory=dict)


#: ``(location, byte offset, byte count)``: a run of raw bytes a writer may copy as is.
ByteRun = tuple[Location, int, int]


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

    def shard_rows_of(self, layer: int) -> tuple[int, ...] | None:
        """Rows of each file layer position ``layer`` is stored in, when the format stores a layer as files of
        their own (a ``.pt`` tree's shards: a dask block reads whole ones), else ``None``.  Not
        ``LayerInfo.shard_rows``, which a store converted from shards also records (where its rows came from)."""
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
    #: May a reader in this process open the partial store and read a finished layer (after
    #: ``Writer.finish_layer``) while the writer still has the store open?  Then a local task of several layers
    #: verifies layer k on a helper thread while it copies layer k+1 (:func:`~actfmt.conversion.tasks.run_layer_task`).
    reads_while_writing: ClassVar[bool] = False
    #: Is a split one file (``True``) or a directory?
    single_file: ClassVar[bool] = False
    #: ``inventory(location, loc, jobs) -> Inventory``: a format whose split is a directory of separately
    #: written pieces lists them for validation (:mod:`actfmt.formats.inventory`); ``None``: validation reads
    #: the split through its Reader alone.
    inventory: ClassVar[Any] = None
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
