"""safetensors splits: a directory with ``metadata.json`` and one ``layer_XX.safetensors`` per layer.

On disk (the contract)::

    EM/metadata.json               the producer's keys verbatim, then "actfmt": {..., "complete": true}
    EM/layer_00.safetensors        one tensor "activations" [total_examples, hidden_dim], BF16 / F16 / F32
    EM/layer_01.safetensors ...

* Each layer file holds exactly one tensor named ``"activations"`` (:data:`TENSOR`) in the layer's own dtype
  (bfloat16 stored natively as ``BF16``), so ``safetensors.torch.load_file(f)["activations"]`` is the layer.
* ``__metadata__`` (str -> str, as safetensors requires) holds ``"format": "pt"`` (the Hugging Face
  convention), ``"actfmt.layer": "layer_03"`` and ``"metadata.json"``: the producer's metadata as one JSON
  string, so every file carries the split's metadata on its own.  The actfmt block (checksums, completeness)
  is only in the directory's ``metadata.json``: it is known once every layer is written.
* ``metadata.json`` is written by ``create`` with the producer's keys only, and rewritten by ``finalize``
  with the ``"actfmt"`` block as its last key (``complete: true``).  Readers return the producer's keys
  without ``"actfmt"``.  A directory whose ``metadata.json`` has no ``actfmt`` block is an interrupted
  conversion.
* No compression: the format has none.

A layer file is written as a stream: its header (8-byte little-endian length, then the JSON header padded with
spaces to a multiple of 8, as the safetensors library does), then its rows in order -- from the block in memory,
or copied in the kernel from the source's raw bytes (``os.copy_file_range``) when the conversion hands over byte
runs.  Locally a block may also land at its own offset in any order (``pwrite``).  On object storage each layer
file is one streamed upload.  A file shorter than its header promises is reported by
:meth:`SafetensorsReader.missing_chunks` (rule ACT601).

Reading parses the header in Python (no library import) with one ranged read per file, and reads rows through
:class:`~actfmt.formats.base.RowStore` (``preadv`` straight into the output locally, ranged GETs remotely).

``__metadata__`` embeds the producer's metadata when its JSON is at most :data:`EMBED_LIMIT` bytes; a larger
``metadata.json`` (extra keys such as long prompt lists) is embedded as its required keys only, with
``"metadata.json.truncated": "true"``, so it is not copied into every layer file.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from actfmt.errors import BadHeaderError, ConversionError, CorruptShardError, MetadataError, NotASplitError
from actfmt.formats.base import (
    ACTFMT_KEY,
    ByteRun,
    Format,
    LayerInfo,
    RowStore,
    RowStoreReader,
    Segment,
    SplitSpec,
    WriteOptions,
    Writer,
    as_array,
    fingerprint_of,
)
from actfmt.formats.pt.reader import read_json_object
from actfmt.layout import METADATA_FILE, REQUIRED_KEYS, layer_index, loads_json
from actfmt.storage import Entry, Location, OutputFile

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = [
    "SUFFIX",
    "TENSOR",
    "SafetensorsFormat",
    "SafetensorsHeader",
    "SafetensorsReader",
    "SafetensorsWriter",
    "build_header",
    "parse_header",
]

#: The name of the one tensor in every layer file.
TENSOR = "activations"
SUFFIX = ".safetensors"
#: torch dtype name <-> safetensors dtype string.
ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
#: The safetensors library refuses headers larger than this.
MAX_HEADER = 100_000_000
#: The producer's metadata is embedded in each layer file up to this many bytes of JSON.
EMBED_LIMIT = 64 << 10
#: Bytes read at the start of each layer file to find its header (more if the header is longer).
HEAD_BYTES = 64 << 10
#: Target block size when neither the source's shards nor --chunk-rows say otherwise.
_BLOCK_BYTES = 16 << 20
_FIX = "re-run the conversion (actfmt convert ... --overwrite) or restore the file"


def layer_file(index: int) -> str:
    """``layer_file(3) == "layer_03.safetensors"``."""
    return f"layer_{index:02d}{SUFFIX}"


def list_layer_files(entries: Sequence[Entry]) -> list[tuple[int, Location]]:
    """Correctly named ``layer_XX.safetensors`` files, sorted by index."""
    out = []
    for e in entries:
        if e.name.endswith(SUFFIX) and e.followed().is_file():
            i = layer_index(e.name[: -len(SUFFIX)])
            if i is not None:
                out.append((i, e.location))
    return sorted(out, key=lambda t: t[0])


# ----------------------------------------------------------------------------------------------------------
# header


class SafetensorsHeader:
    """The parsed header of a one-tensor safetensors file."""

    def __init__(
        self,
        location: Location,
        name: str,
        dtype: str,
        shape: tuple[int, int],
        data_start: int,
        file_nbytes: int,
        meta: dict[str, Any],
        identity: tuple[Any, ...] = (),
    ) -> None:
        self.location = location
        self.name = name
        self.dtype = dtype  # torch spelling
        self.shape = shape
        self.data_start = data_start  # absolute offset of the first data byte (8 + header length)
        self.file_nbytes = file_nbytes
        self.metadata = meta  # __metadata__ (str -> str)
        self.identity = identity

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_nbytes(self) -> int:
        return self.shape[1] * _ITEMSIZE[self.dtype]

    @property
    def data_nbytes(self) -> int:
        return self.rows * self.row_nbytes

    @property
    def expected_file_nbytes(self) -> int:
        return self.data_start + self.data_nbytes

    @property
    def truncated(self) -> bool:
        return self.file_nbytes < self.expected_file_nbytes


def embedded_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """What a layer file's ``__metadata__`` says about the split (bounded: see :data:`EMBED_LIMIT`)."""
    text = json.dumps(metadata, ensure_ascii=False)
    if len(text.encode("utf-8")) <= EMBED_LIMIT:
        return {"metadata.json": text}
    required = {k: metadata[k] for k in REQUIRED_KEYS if k in metadata}
    return {"metadata.json": json.dumps(required, ensure_ascii=False), "metadata.json.truncated": "true"}


def build_header(info: LayerInfo, metadata: dict[str, Any]) -> bytes:
    """The bytes before the data of a layer file: 8-byte length + JSON header padded with spaces to 8."""
    if info.dtype not in ST_DTYPES:
        raise ConversionError(
            f"safetensors: cannot store dtype {info.dtype!r} (supported: {', '.join(ST_DTYPES)})."
        )
    head = {
        "__metadata__": {"format": "pt", "actfmt.layer": info.name, **embedded_metadata(metadata)},
        TENSOR: {
            "dtype": ST_DTYPES[info.dtype],
            "shape": [info.rows, info.hidden_dim],
            "data_offsets": [0, info.nbytes],
        },
    }
    body = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class HeaderError(CorruptShardError, BadHeaderError):
    """A layer file's header that is not a safetensors header the library would accept (rule ACT606)."""


def _uint(x: Any) -> bool:
    """An unsigned 64-bit integer as serde reads one: a JSON integer, not a bool, a float or a string."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64


def _short_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_header(
    location: Location, head: bytes, size: int, identity: tuple[Any, ...] = ()
) -> SafetensorsHeader:
    """Parse and check the header of a one-tensor layer file from its first bytes (``head`` must hold the
    whole header); :class:`CorruptShardError` if it is not one."""
    if len(head) < 8:
        raise HeaderError(f"{location}: {size} bytes, too short for a safetensors file; {_FIX}.")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER or n > size - 8:
        raise HeaderError(
            f"{location}: not a safetensors file or truncated (header length {n} but the file has {size} "
            f"bytes); {_FIX}."
        )
    if len(head) < 8 + n:
        head = location.read_range(0, 8 + n)
    body = head[8 : 8 + n]
    try:
        doc = loads_json(body, MAX_HEADER)
    except ValueError as exc:  # not JSON, not UTF-8, nested too deeply, a huge integer
        raise HeaderError(f"{location}: the safetensors header is not valid JSON ({exc}); {_FIX}.") from None
    if not isinstance(doc, dict):
        raise HeaderError(f"{location}: the safetensors header is not a JSON object; {_FIX}.")
    if not body.startswith(b"{"):  # the library's own first check (InvalidHeaderStart)
        raise HeaderError(f"{location}: the safetensors header does not start with '{{'; {_FIX}.")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{location}: __metadata__ is not a JSON object of strings; {_FIX}.")
    if len(doc) != 1:
        raise HeaderError(
            f"{location}: holds {len(doc)} tensors ({', '.join(sorted(doc)[:5])}); an actfmt layer file holds "
            f"exactly one, {TENSOR!r}; {_FIX}."
        )
    ((name, entry),) = doc.items()
    # exactly what the library accepts: dtype a known name, shape a list of unsigned integers, data_offsets
    # two unsigned integers (no strings, floats, booleans or negatives), a size that fits in 64 bits
    problem = None
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        problem = "it lacks dtype, shape or data_offsets"
    elif not isinstance(entry["shape"], list) or not all(_uint(x) for x in entry["shape"]):
        problem = f"shape {_short_json(entry['shape'])} is not a list of non-negative integers"
    elif (
        not isinstance(entry["data_offsets"], list)
        or len(entry["data_offsets"]) != 2
        or not all(_uint(x) for x in entry["data_offsets"])
    ):
        problem = f"data_offsets {_short_json(entry['data_offsets'])} are not two non-negative integers"
    elif not isinstance(entry["dtype"], str):
        problem = f"dtype {_short_json(entry['dtype'])} is not a string"
    if problem is not None:
        raise HeaderError(f"{location}: tensor {name!r} has a malformed header entry ({problem}); {_FIX}.")
    st_dtype = entry["dtype"]
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if st_dtype not in _FROM_ST:
        raise HeaderError(
            f"{location}: tensor {name!r} has dtype {st_dtype!r}; actfmt reads {', '.join(_FROM_ST)}; convert "
            f"the activations to one of those."
        )
    dtype = _FROM_ST[st_dtype]
    if len(shape) != 2:
        raise HeaderError(
            f"{location}: tensor {name!r} has shape {list(shape)}; a layer is 2-D [rows, hidden]."
        )
    nbytes = shape[0] * shape[1] * _ITEMSIZE[dtype]
    if nbytes >= 1 << 64:
        raise HeaderError(
            f"{location}: tensor {name!r} declares shape {list(shape)}, more bytes than a file can hold; {_FIX}."
        )
    if begin != 0 or end != nbytes:
        raise HeaderError(
            f"{location}: tensor {name!r} has data_offsets [{begin}, {end}], expected [0, {nbytes}] for shape "
            f"{list(shape)} {st_dtype}; {_FIX}."
        )
    if 8 + n + nbytes < size:  # the library refuses bytes beyond the data (MetadataIncompleteBuffer)
        raise HeaderError(
            f"{location}: {size - 8 - n - nbytes} bytes follow the data of tensor {name!r} (shape {list(shape)} "
            f"{st_dtype}); the header does not describe the file; {_FIX}."
        )
    return SafetensorsHeader(location, name, dtype, (shape[0], shape[1]), 8 + n, size, meta, identity)


# ----------------------------------------------------------------------------------------------------------
# reader


class SafetensorsReader(RowStoreReader):
    """A split in the safetensors layout; rows through :class:`RowStore`."""

    format = "safetensors"

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        if not location.is_dir():
            raise NotASplitError(
                f"{location}: not a directory; a safetensors split is a directory with layer_XX.safetensors files."
            )
        self._files = list_layer_files(location.list_dir())
        self._headers: dict[int, SafetensorsHeader] = {}
        self._stores: dict[int, RowStore] = {}

    # -- description ---------------------------------------------------------------------------------------
    @cached_property
    def _metadata_file(self) -> dict[str, Any]:
        return read_json_object(
            self.location / METADATA_FILE,
            "every split needs a metadata.json (each layer file keeps a copy in its "
            "__metadata__['metadata.json']; re-run the conversion or restore the file)",
        )

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self._metadata_file.items() if k != ACTFMT_KEY}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        try:
            block = self._metadata_file.get(ACTFMT_KEY)
        except MetadataError:
            return None
        return block if isinstance(block, dict) else None

    def header(self, layer: int) -> SafetensorsHeader:
        """The parsed header of layer position ``layer`` (each file is read only when its layer is used)."""
        h = self._headers.get(layer)
        if h is None:
            loc = self.layer_path(layer)
            st = loc.stat()
            h = self._headers[layer] = parse_header(loc, loc.read_range(0, HEAD_BYTES), st.size, st.identity)
        return h

    @cached_property
    def headers(self) -> list[SafetensorsHeader]:
        """Every layer file's header (one batch of ranged reads)."""
        todo = [pos for pos in range(len(self._files)) if pos not in self._headers]
        if todo:
            locs = [self.layer_path(pos) for pos in todo]
            stats = [loc.stat() for loc in locs]
            heads = type(locs[0])._read_ranges([(loc, 0, HEAD_BYTES) for loc in locs], False)
            for pos, loc, st, head in zip(todo, locs, stats, heads, strict=True):
                self._headers[pos] = parse_header(loc, head or b"", st.size, st.identity)
        return [self._headers[pos] for pos in range(len(self._files))]

    def _info(self, pos: int, h: SafetensorsHeader) -> LayerInfo:
        i, loc = self._files[pos]
        return LayerInfo(
            name=loc.name[: -len(SUFFIX)], index=i, rows=h.rows, hidden_dim=h.shape[1], dtype=h.dtype
        )

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        return [self._info(pos, h) for pos, h in enumerate(self.headers)]

    def layer_info(self, layer: int) -> LayerInfo:
        return self._info(layer, self.header(layer))

    def position(self, name: str) -> int | None:
        return next((pos for pos, (_, loc) in enumerate(self._files) if loc.name == name + SUFFIX), None)

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


# ----------------------------------------------------------------------------------------------------------
# writer


def _check_options(options: WriteOptions) -> None:
    if options.compression not in (None, "none"):
        raise ConversionError(
            f"the safetensors format has no compression (got {options.compression!r}); use --compression none, "
            f"or --to zarr / hdf5 for a compressed store."
        )


class SafetensorsWriter(Writer):
    """Streams each layer into its own ``layer_XX.safetensors``: header first, then the rows."""

    format = "safetensors"

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(location, spec, options)
        self._out: dict[int, OutputFile] = {}
        self._lock = threading.Lock()
        self._meta = {k: v for k, v in spec.metadata.items() if k != ACTFMT_KEY}
        self._headers: dict[int, bytes] = {}

    def _header(self, layer: int) -> bytes:
        h = self._headers.get(layer)
        if h is None:
            h = self._headers[layer] = build_header(self.spec.layers[layer], self._meta)
        return h

    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> SafetensorsWriter:
        _check_options(options)
        for info in spec.layers:
            if info.dtype not in ST_DTYPES:
                raise ConversionError(
                    f"{info.name}: safetensors cannot store dtype {info.dtype!r}; pass --dtype bfloat16/float16/float32."
                )
        location.mkdir()
        w = cls(location, spec, options)
        # the producer's keys; finalize adds the actfmt block last
        (location / METADATA_FILE).write_bytes(json.dumps(w._meta, indent=2).encode(), atomic=True)
        return w

    @classmethod
    def open(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> SafetensorsWriter:
        _check_options(options)
        return cls(location, spec, options)

    def layer_path(self, layer: int) -> Location:
        return self.location / layer_file(self.spec.layers[layer].index)

    def block_rows(self, layer: int) -> list[int]:
        """The source's shards when known (each is one copy), else ``--chunk-rows``, else ~16 MiB."""
        info = self.spec.layers[layer]
        if info.shard_rows and sum(info.shard_rows) == info.rows:
            return list(info.shard_rows)
        step = self.options.chunk_rows or max(1, _BLOCK_BYTES // max(1, info.row_bytes))
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
        self.close()
        (self.location / METADATA_FILE).write_bytes(
            json.dumps({**self._meta, ACTFMT_KEY: block}, indent=2).encode(), atomic=True
        )

    def close(self) -> None:
        with self._lock:
            outs, self._out = list(self._out.values()), {}
        for out in outs:
            out.close()


# ----------------------------------------------------------------------------------------------------------


class SafetensorsFormat(Format):
    """A directory per split: ``metadata.json`` and one ``layer_XX.safetensors`` file per layer."""

    name = "safetensors"
    suffixes = ()  # a directory named like the split (EM/)
    reader = SafetensorsReader
    writer = SafetensorsWriter

    looks_like = "a directory of layer_XX.safetensors files"

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        return entries is not None and any(
            e.name.startswith("layer_") and e.name.endswith(SUFFIX) for e in entries
        )
