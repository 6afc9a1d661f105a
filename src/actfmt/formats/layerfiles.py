"""Directory stores of one file per layer: ``EM/metadata.json`` + ``EM/layer_00<suffix>`` ..., each layer file a
header followed by the layer's rows, raw, in row order (safetensors, npy).

What such a format writes itself is its header (:meth:`LayerFileWriter.layer_header`) and its parser
(:meth:`LayerFileReader.parse_header`, returning a :class:`LayerFileHeader`); everything else is here, once:

* the reader lists the layer files, reads every header with one batch of ranged reads (one file when a single
  layer is asked for), reads ``metadata.json`` (the producer's keys, then the ``actfmt`` block) with the shared
  bounded JSON loader, and reads rows through :class:`~actfmt.formats.base.RowStore` (``preadv`` locally,
  concurrent ranged GETs remotely, byte runs for the kernel copy); a file shorter than its header says is
  reported by :meth:`LayerFileReader.missing_chunks` (ACT601) and never read past;
* the writer streams each layer file, header first, then the rows -- from a block in memory or copied in the
  kernel from the source's byte runs (``copy_file_range``); locally a block may land at its own offset
  (``pwrite``); on object storage each file is one streamed upload.  ``create`` writes ``metadata.json`` with
  the producer's keys (and, when the format asks, a first ``actfmt`` block without ``complete``);
  ``finalize`` rewrites it with the ``actfmt`` block last (``complete: true``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from actfmt.errors import ConversionError, MetadataError, NotASplitError
from actfmt.formats.base import (
    ACTFMT_KEY,
    ByteRun,
    LayerInfo,
    SplitSpec,
    WriteOptions,
    Writer,
    fingerprint_of,
)
from actfmt.formats.dtypes import ITEMSIZE, as_array
from actfmt.formats.rowstore import RowStore, RowStoreReader, Segment
from actfmt.layout import METADATA_FILE, layer_index, read_json_object
from actfmt.storage import Entry, Location, OutputFile

__all__ = [
    "LayerFileHeader",
    "LayerFileReader",
    "LayerFileWriter",
    "list_layer_files",
]

#: Bytes read at the start of each layer file to find its header (a format reads more when its header is longer).
HEAD_BYTES = 64 << 10
#: Target block size when neither the source's shards nor --chunk-rows say otherwise.
BLOCK_BYTES = 16 << 20


def list_layer_files(entries: Sequence[Entry], suffix: str) -> list[tuple[int, Location]]:
    """Correctly named ``layer_XX<suffix>`` files, sorted by index."""
    out = []
    for e in entries:
        if e.name.endswith(suffix) and e.followed().is_file():
            i = layer_index(e.name[: -len(suffix)])
            if i is not None:
                out.append((i, e.location))
    return sorted(out, key=lambda t: t[0])


@dataclass
class LayerFileHeader:
    """What a layer file's header says: the layer's ``dtype`` (``bfloat16``, ...), ``shape`` ``(rows,
    hidden_dim)``, the offset of its first data byte, the file's size and identity."""

    location: Location
    dtype: str
    shape: tuple[int, int]
    data_start: int
    file_nbytes: int
    identity: tuple[Any, ...] = ()

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_nbytes(self) -> int:
        return self.shape[1] * ITEMSIZE[self.dtype]

    @property
    def data_nbytes(self) -> int:
        return self.rows * self.row_nbytes

    @property
    def expected_file_nbytes(self) -> int:
        return self.data_start + self.data_nbytes

    @property
    def truncated(self) -> bool:
        return self.file_nbytes < self.expected_file_nbytes


class LayerFileReader(RowStoreReader):
    """A split as a directory of ``layer_XX<suffix>`` files and ``metadata.json``; rows through
    :class:`RowStore`.  Subclasses set :attr:`suffix` and implement :meth:`parse_header`."""

    #: What a layer file's name ends with (``.safetensors``, ``.npy``).
    suffix: ClassVar[str]
    #: What to do when ``metadata.json`` is missing (ends the error message).
    metadata_advice: ClassVar[str] = (
        "every split needs a metadata.json; re-run the conversion or restore the file"
    )

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        if not location.is_dir():
            raise NotASplitError(
                f"{location}: not a directory; a {self.format} split is a directory with layer_XX{self.suffix} "
                f"files."
            )
        self._files = list_layer_files(location.list_dir(), self.suffix)
        self._headers: dict[int, LayerFileHeader] = {}
        self._stores: dict[int, RowStore] = {}

    def parse_header(
        self, location: Location, head: bytes, size: int, identity: tuple[Any, ...]
    ) -> LayerFileHeader:  # pragma: no cover - every subclass parses its own
        """Parse and check a layer file's header from its first bytes (read more when ``head`` is short); raise a
        :class:`~actfmt.errors.BadHeaderError` when it is not one the format writes."""
        raise NotImplementedError

    # -- description ---------------------------------------------------------------------------------------
    @cached_property
    def metadata_file(self) -> dict[str, Any]:
        """``metadata.json`` as stored: the producer's keys, then the ``actfmt`` block."""
        return read_json_object(self.location / METADATA_FILE, self.metadata_advice)

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata_file.items() if k != ACTFMT_KEY}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        try:
            block = self.metadata_file.get(ACTFMT_KEY)
        except MetadataError:
            return None
        return block if isinstance(block, dict) else None

    def header(self, layer: int) -> LayerFileHeader:
        """The parsed header of layer position ``layer`` (each file is read only when its layer is used)."""
        h = self._headers.get(layer)
        if h is None:
            loc = self.layer_path(layer)
            st = loc.stat()
            h = self._headers[layer] = self.parse_header(
                loc, loc.read_range(0, HEAD_BYTES), st.size, st.identity
            )
        return h

    @cached_property
    def headers(self) -> list[LayerFileHeader]:
        """Every layer file's header (one batch of ranged reads)."""
        todo = [pos for pos in range(len(self._files)) if pos not in self._headers]
        if todo:
            locs = [self.layer_path(pos) for pos in todo]
            stats = [loc.stat() for loc in locs]
            heads = type(locs[0])._read_ranges([(loc, 0, HEAD_BYTES) for loc in locs], False)
            for pos, loc, st, head in zip(todo, locs, stats, heads, strict=True):
                self._headers[pos] = self.parse_header(loc, head or b"", st.size, st.identity)
        return [self._headers[pos] for pos in range(len(self._files))]

    def _info(self, pos: int, h: LayerFileHeader) -> LayerInfo:
        i, loc = self._files[pos]
        return LayerInfo(
            name=loc.name[: -len(self.suffix)], index=i, rows=h.rows, hidden_dim=h.shape[1], dtype=h.dtype
        )

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        return [self._info(pos, h) for pos, h in enumerate(self.headers)]

    def layer_info(self, layer: int) -> LayerInfo:
        return self._info(layer, self.header(layer))

    def position(self, name: str) -> int | None:
        return next((pos for pos, (_, loc) in enumerate(self._files) if loc.name == name + self.suffix), None)

    def layer_path(self, layer: int) -> Location:
        return self._files[layer][1]

    def missing_chunks(self, layer_pos: int) -> list[str]:
        """``[]``, or the layer file when it is shorter than its header says (the rows that are missing)."""
        h = self.header(layer_pos)
        size = self.layer_path(layer_pos).size()
        if size >= h.expected_file_nbytes:
            return []
        first = max(0, size - h.data_start) // h.row_nbytes if h.row_nbytes else 0
        return [
            f"{self.layer_path(layer_pos).name} (rows {first}-{h.rows - 1}: the file has {size} of "
            f"{h.expected_file_nbytes} bytes)"
        ]

    # -- data ----------------------------------------------------------------------------------------------
    def row_store(self, layer: int) -> RowStore:
        store = self._stores.get(layer)
        if store is None:
            h = self.header(layer)
            store = self._stores[layer] = RowStore(
                [Segment(h.location.pinned(h.identity), h.data_start, h.rows)], h.shape[1], h.dtype
            )
            if h.file_nbytes < h.expected_file_nbytes:  # truncated: never allocate for rows it does not hold
                store.short_file = (h.location, h.file_nbytes)
        return store

    def fingerprint(self, layer: int) -> str | None:
        return fingerprint_of([self.layer_path(layer)])


class LayerFileWriter(Writer):
    """Streams each layer into its own ``layer_XX<suffix>``: :meth:`layer_header` first, then the rows.
    Subclasses set :attr:`suffix` and implement :meth:`layer_header` (and may check options in
    :meth:`check`)."""

    suffix: ClassVar[str]
    #: The dtypes the format stores (:meth:`check` refuses the others, naming ``--dtype``).
    dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(location, spec, options)
        self._out: dict[int, OutputFile] = {}
        self._lock = threading.Lock()
        self._meta = {k: v for k, v in spec.metadata.items() if k != ACTFMT_KEY}
        self._headers: dict[int, bytes] = {}

    # -- what a format says ----------------------------------------------------------------------------------
    def layer_header(self, layer: int) -> bytes:  # pragma: no cover - every subclass writes its own
        """The bytes of layer position ``layer``'s file before its rows."""
        raise NotImplementedError

    @classmethod
    def check(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        """Refuse options or dtypes the format cannot honour (a :class:`ConversionError`)."""
        if options.compression not in (None, "none"):
            raise ConversionError(
                f"the {cls.format} format has no compression (got {options.compression!r}); use --compression "
                f"none, or --to zarr / hdf5 for a compressed store."
            )
        for info in spec.layers:
            if info.dtype not in cls.dtypes:
                raise ConversionError(
                    f"{info.name}: {cls.format} cannot store dtype {info.dtype!r}; pass --dtype "
                    f"{'/'.join(cls.dtypes)}."
                )

    def first_block(self) -> dict[str, Any] | None:
        """An ``actfmt`` block ``create`` writes before any layer (never with ``complete``), or ``None``."""
        return None

    # -- the life cycle ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> LayerFileWriter:
        cls.check(location, spec, options)
        location.mkdir()
        w = cls(location, spec, options)
        first = w.first_block()
        # the producer's keys; finalize adds the complete actfmt block last
        doc = w._meta if first is None else {**w._meta, ACTFMT_KEY: first}
        (location / METADATA_FILE).write_bytes(json.dumps(doc, indent=2).encode(), atomic=True)
        return w

    @classmethod
    def open(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> LayerFileWriter:
        """Continue a partial store.  The records :meth:`first_block` keeps in ``metadata.json`` are brought in
        line with ``spec`` (``--resume`` after a source layer changed dtype or shape: the layer is written
        again, and its record must say what it will hold); written only when they differ."""
        cls.check(location, spec, options)
        w = cls(location, spec, options)
        first = w.first_block()
        if first is not None:
            try:
                now = read_json_object(location / METADATA_FILE, "the partial store lost its metadata.json")
            except MetadataError as exc:
                raise ConversionError(f"{exc} Start again with --overwrite.") from None
            if now.get(ACTFMT_KEY) != first:
                doc = {**w._meta, ACTFMT_KEY: first}
                (location / METADATA_FILE).write_bytes(json.dumps(doc, indent=2).encode(), atomic=True)
        return w

    def _header(self, layer: int) -> bytes:
        h = self._headers.get(layer)
        if h is None:
            h = self._headers[layer] = self.layer_header(layer)
        return h

    def layer_path(self, layer: int) -> Location:
        return self.location / f"layer_{self.spec.layers[layer].index:02d}{self.suffix}"

    def block_rows(self, layer: int) -> list[int]:
        """The source's shards when known (each is one copy), else ``--chunk-rows``, else ~16 MiB."""
        info = self.spec.layers[layer]
        if info.shard_rows and sum(info.shard_rows) == info.rows:
            return list(info.shard_rows)
        step = self.options.chunk_rows or max(1, BLOCK_BYTES // max(1, info.row_bytes))
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    def _output(self, layer: int) -> OutputFile:
        """The layer file being written; the first use in this writer (re)creates it with its header."""
        with self._lock:
            out = self._out.get(layer)
            if out is None:
                out = self.layer_path(layer).open_output()
                try:
                    out.write(self._header(layer))
                except BaseException:
                    out.abort()
                    raise
                self._out[layer] = out
            return out

    def copies_raw(self, layer: int) -> bool:
        return self.location.supports_copy_range

    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        info = self.spec.layers[layer]
        if data is None:  # the source's bytes, copied in the kernel
            assert runs is not None
            arr, rows = None, sum(n for _, _, n in runs) // max(1, info.row_bytes)
        else:
            try:
                arr = as_array(data, info.dtype)
            except ValueError:
                arr = None
            if arr is None or arr.ndim != 2 or arr.shape[1] != info.hidden_dim:
                shape = tuple(getattr(data, "shape", ()))
                raise ConversionError(
                    f"{self.layer_path(layer)}: block of shape {shape} {getattr(data, 'dtype', '')} does not fit "
                    f"layer [{info.rows}, {info.hidden_dim}] {info.dtype}."
                )
            rows = arr.shape[0]
        if start < 0 or start + rows > info.rows:
            raise ConversionError(
                f"{self.layer_path(layer)}: rows {start}..{start + rows} outside [0, {info.rows})."
            )
        out = self._output(layer)
        if rows == 0:
            return
        offset = len(self._header(layer)) + start * info.row_bytes
        if runs is not None and out.location.supports_copy_range:
            for loc, off, n in runs:  # in order: at the end; out of order: at their offset
                out.copy_range(loc, off, n, at=None if out.tell() == offset else offset)
                offset += n
        elif arr is None:
            raise ConversionError(f"{self.layer_path(layer)}: no rows to write (runs cannot be copied here).")
        elif out.tell() == offset:
            out.write(arr)
        elif out.location.supports_pwrite:
            out.pwrite(arr, offset)
        else:
            raise ConversionError(
                f"{self.layer_path(layer)}: blocks must arrive in order on {out.location.scheme}:// "
                f"(row {start} after {(out.tell() - len(self._header(layer))) // max(1, info.row_bytes)})."
            )

    def finish_layer(self, layer: int) -> None:
        info = self.spec.layers[layer]
        out = self._output(layer)
        expected = len(self._header(layer)) + info.nbytes
        with self._lock:
            self._out.pop(layer, None)
        out.close()
        size = self.layer_path(layer).size()
        if size != expected:
            raise ConversionError(
                f"{self.layer_path(layer)}: {size} of {expected} bytes written; a block is missing."
            )

    def finalize(self, block: dict[str, Any]) -> None:
        """``metadata.json`` rewritten with the actfmt block as its last key (the completeness mark)."""
        self.close()
        (self.location / METADATA_FILE).write_bytes(
            json.dumps({**self._meta, ACTFMT_KEY: block}, indent=2).encode(), atomic=True
        )

    def close(self) -> None:
        with self._lock:
            outs, self._out = list(self._out.values()), {}
        for out in outs:
            out.close()
