"""The Zarr metadata documents, read and written without zarr-python.

Reading: a group is a directory with a v3 ``zarr.json`` whose ``node_type`` is not ``array`` (a damaged
``zarr.json`` still makes a store: the reader says what is wrong) or a v2 ``.zgroup``; its attributes are in
``zarr.json`` (v3) or ``.zattrs`` (v2).  An array's ``zarr.json`` / ``.zarray`` + ``.zattrs`` is parsed into an
:class:`ArrayMeta`: what actfmt needs to find and decode chunks itself, and whether it can (``direct``: 2-D,
chunks spanning the full second dimension, little-endian 16/32-bit data, fill value 0, C order, no filters,
no transposes, no sharding, at most one compressor actfmt knows).  The documents of several arrays are read as
one batch (concurrent GETs on object storage).

Writing: the documents zarr-python 3.1 writes for the same group and arrays, key for key
(``json.dumps(indent=2)``, ``NaN`` allowed as zarr-python allows it), so a store written by actfmt is
byte-identical in its metadata to one made with ``zarr.create_group`` / ``create_array``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actfmt.errors import BadHeaderError, ExternalDataError, MetadataError
from actfmt.formats.base import check_chunk_grid
from actfmt.formats.zarr.codecs import codec_from_v2, codec_from_v3, stored_codecs
from actfmt.layout import JSON_MAX_BYTES, loads_json
from actfmt.storage import Entry, Location, read_objects

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "DIMENSION_NAMES",
    "DTYPE_ATTR",
    "METADATA_NAMES",
    "SHARD_ROWS_ATTR",
    "XARRAY_DIMENSIONS",
    "ZARRAY",
    "ZARR_JSON",
    "ZATTRS",
    "ZGROUP",
    "ArrayMeta",
    "GroupProbe",
    "array_documents",
    "encode_json",
    "group_attributes",
    "group_documents",
    "itemsize_of",
    "probe_group",
    "read_arrays",
    "read_json",
    "set_group_attribute",
]

#: Array attributes actfmt writes: the real dtype (bfloat16 is stored as uint16) and the source's shard rows.
DTYPE_ATTR = "actfmt_dtype"
SHARD_ROWS_ATTR = "actfmt_shard_rows"
ZARR_JSON, ZGROUP, ZARRAY, ZATTRS = "zarr.json", ".zgroup", ".zarray", ".zattrs"
#: Names of metadata documents (everything else in an array's directory is a chunk).
METADATA_NAMES = frozenset({ZARR_JSON, ZGROUP, ZARRAY, ZATTRS})
DIMENSION_NAMES = ("example", "hidden")
#: The v2 array attribute naming its dimensions (xarray's convention; v3 has ``dimension_names``).
XARRAY_DIMENSIONS = "_ARRAY_DIMENSIONS"
#: v3 ``data_type`` -> the numpy spelling of the stored dtype.
_V3_DTYPES = {
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "uint16": "<u2",
    "int16": "<i2",
    "bfloat16": "bfloat16",
}
_V3_NAMES = {
    "<f2": "float16",
    "<f4": "float32",
    "<f8": "float64",
    "<u2": "uint16",
    "<i2": "int16",
    "<i8": "int64",
    "bfloat16": "bfloat16",
}
#: Stored dtypes actfmt reads and writes chunks of itself (``bfloat16``: the zarr-extensions data type, v3, and
#: tensorstore's v2 spelling; its chunks hold the same little-endian bits as ``<u2``).
_DIRECT_DTYPES = ("<u2", "<f2", "<f4", "<i2", "bfloat16")
_FLOAT = ("<f2", "<f4", "<f8", "bfloat16")


def itemsize_of(dtype: str) -> int:
    """Bytes per value of a stored dtype (numpy spelling, or ``bfloat16``)."""
    return 2 if dtype == "bfloat16" else int(dtype[-1])


def encode_json(doc: Any) -> bytes:
    """A metadata document as zarr-python writes it."""
    return json.dumps(doc, indent=2, allow_nan=True).encode()


def parse_json(location: Location, raw: bytes | None) -> Any:
    """``raw`` parsed (``None`` when the document is missing); a damaged document is a
    :class:`~actfmt.errors.MetadataError` naming it."""
    if raw is None:
        return None
    try:
        return loads_json(raw)
    except ValueError as exc:  # not JSON, not UTF-8, or beyond actfmt's bounds (size, depth, digits)
        raise MetadataError(
            f"{location}: not valid JSON ({exc}); the store is damaged: re-convert it."
        ) from None


def read_json(location: Location) -> Any:
    """The document at ``location`` parsed, or ``None`` when it is missing."""
    try:
        raw = location.read_range(0, JSON_MAX_BYTES + 1)  # a huge document is refused, not read whole
    except FileNotFoundError:
        return None
    return parse_json(location, raw)


# ----------------------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class GroupProbe:
    """What the listing and ``zarr.json`` of a directory say about it as a Zarr group."""

    zarr_format: int
    doc: Any = None  # v3: the parsed zarr.json
    error: MetadataError | None = None  # v3: zarr.json is damaged


def probe_group(location: Location, entries: Sequence[Entry] | None = None) -> GroupProbe | None:
    """The group at ``location``, or ``None`` when it is not a Zarr group (zarr-python is not imported).
    ``entries``: its listing, when the caller has it."""
    if entries is None:
        try:
            entries = location.list_dir()
        except OSError:
            return None
    kinds = {e.name: e for e in entries}
    v3 = kinds.get(ZARR_JSON)
    if v3 is not None and v3.is_file():
        try:
            doc = read_json(v3.location)
        except MetadataError as exc:
            return GroupProbe(3, None, exc)  # a damaged store is still a store
        except OSError as exc:
            return GroupProbe(3, None, MetadataError(f"{v3.location}: cannot be read ({exc})."))
        if isinstance(doc, dict) and doc.get("node_type") == "array":
            return None
        return GroupProbe(3, doc)
    v2 = kinds.get(ZGROUP)
    if v2 is not None and v2.is_file():
        return GroupProbe(2)
    return None


def group_attributes(location: Location, probe: GroupProbe) -> dict[str, Any]:
    """The group's attributes (v3 from ``zarr.json``, v2 from ``.zattrs``)."""
    if probe.error is not None:
        raise probe.error
    if probe.zarr_format == 3:
        attrs = probe.doc.get("attributes") if isinstance(probe.doc, dict) else None
        where = location / ZARR_JSON
    else:
        where = location / ZATTRS
        attrs = read_json(where)
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise MetadataError(f"{where}: the group attributes are not a JSON object; re-convert the store.")
    return attrs


def group_documents(attributes: Mapping[str, Any], zarr_format: int) -> dict[str, bytes]:
    """The documents of a group with ``attributes`` (relative key -> bytes)."""
    if zarr_format == 3:
        return {
            ZARR_JSON: encode_json({"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"})
        }
    return {ZGROUP: encode_json({"zarr_format": 2}), ZATTRS: encode_json(dict(attributes))}


def set_group_attribute(location: Location, key: str, value: Any) -> None:
    """Set one group attribute, placed last: one atomic rewrite of ``zarr.json`` (v3) or ``.zattrs`` (v2)."""
    v3 = location / ZARR_JSON
    doc = read_json(v3)
    if doc is not None:
        if not isinstance(doc, dict):
            raise MetadataError(f"{v3}: not a JSON object; the store is damaged: re-convert it.")
        attrs = doc.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise MetadataError(f"{v3}: the group attributes are not a JSON object; re-convert the store.")
        attrs.pop(key, None)
        attrs[key] = value
        doc["attributes"] = attrs
        v3.write_bytes(encode_json(doc), atomic=True)
        return
    v2 = location / ZATTRS
    attrs = read_json(v2) or {}
    if not isinstance(attrs, dict):
        raise MetadataError(f"{v2}: not a JSON object; the store is damaged: re-convert it.")
    attrs.pop(key, None)
    attrs[key] = value
    v2.write_bytes(encode_json(attrs), atomic=True)


# ----------------------------------------------------------------------------------------------------------
# arrays


def array_documents(
    shape: tuple[int, ...],
    chunk_rows: int,
    dtype: str,
    compression: str,
    level: int | None,
    attributes: Mapping[str, Any],
    zarr_format: int,
    dimension_names: Sequence[str] = DIMENSION_NAMES,
) -> dict[str, bytes]:
    """The documents of an array of ``shape`` stored as ``dtype`` (numpy spelling: ``<u2``, ``<f2``, ``<f4``,
    ``<i8``, or ``bfloat16``), chunks ``(chunk_rows, *shape[1:])``, fill value 0 (v2: null), C order, default chunk key
    encoding, its dimensions named (v3 ``dimension_names``; v2 the attribute ``_ARRAY_DIMENSIONS``, as xarray
    reads them)."""
    itemsize = itemsize_of(dtype)
    fill: int | float | None = 0.0 if dtype in _FLOAT else 0
    if zarr_format == 2:
        # null: xarray takes a v2 fill value for a missing-value marker and would show every stored 0 as NaN
        # (zarr-python still reads a missing chunk as zeros)
        fill = None
    chunks = [int(chunk_rows), *(int(n) for n in shape[1:])]
    codecs = stored_codecs(compression, level, itemsize, zarr_format)
    if zarr_format == 2:
        zarray = {
            "shape": list(shape),
            "chunks": chunks,
            "dtype": dtype,
            "fill_value": fill,
            "order": "C",
            "filters": None,
            "dimension_separator": ".",
            "compressor": codecs,
            "zarr_format": 2,
        }
        zattrs = {**attributes, XARRAY_DIMENSIONS: list(dimension_names)}
        return {ZARRAY: encode_json(zarray), ZATTRS: encode_json(zattrs)}
    doc = {
        "shape": list(shape),
        "data_type": _V3_NAMES[dtype],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": fill,
        "codecs": codecs,
        "attributes": dict(attributes),
        "dimension_names": list(dimension_names),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    return {ZARR_JSON: encode_json(doc)}


@dataclass(frozen=True)
class ArrayMeta:
    """What actfmt needs of one array's metadata."""

    name: str
    zarr_format: int
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str  # numpy spelling of the stored dtype, e.g. "<u2"
    attributes: dict[str, Any]
    separator: str
    prefix: str  # v3 default encoding: "c"; v3 "v2" encoding and v2: ""
    codec: Any  # numcodecs codec, None = raw bytes
    direct: bool  # can actfmt read and write chunk objects itself?

    def chunk_key(self, i: int) -> str:
        """The key of row-chunk ``i`` relative to the array (``c.3.0``, ``c/3/0`` or ``3.0``)."""
        parts = [str(i)] + ["0"] * (len(self.shape) - 1)
        if self.prefix:
            parts.insert(0, self.prefix)
        return self.separator.join(parts)

    @property
    def chunk_rows(self) -> int:
        return self.chunks[0]

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one decoded chunk (the declared chunk shape times the item size)."""
        return math.prod(self.chunks) * _ITEMSIZES.get(self.dtype, 8)

    @property
    def nchunks(self) -> int:
        return -(-self.shape[0] // self.chunks[0]) if self.shape and self.shape[0] and self.chunks[0] else 0


#: Item size of the stored dtypes (for the header's bounds; other dtypes are refused by the reader).
_ITEMSIZES = {"<f2": 2, "<f4": 4, "<f8": 8, "<u2": 2, "<i2": 2, "bfloat16": 2}
#: The chunk key separators of the Zarr specifications: anything else could name a key outside the array.
SEPARATORS = (".", "/")
#: numcodecs ids a v2 array may name (compressor or filter), and v3 codec names: what actfmt or zarr-python
#: decodes without running anything from the store (no ``pickle``, ``json2``, object or ``vlen`` codecs).
_V2_SAFE = frozenset(
    {
        "blosc",
        "zstd",
        "gzip",
        "zlib",
        "lz4",
        "bz2",
        "lzma",
        "delta",
        "shuffle",
        "fixedscaleoffset",
        "bitround",
    }
)
_V3_SAFE = frozenset({"bytes", "blosc", "zstd", "gzip", "transpose", "crc32c"})


def _unsafe_codec_v3(codecs: Any) -> str | None:
    """The name of the first codec of a v3 ``codecs`` list (nested sharding codecs included) that actfmt does
    not allow, else ``None``."""
    todo = [codecs]
    while todo:
        items = todo.pop()
        if not isinstance(items, list):
            return repr(items)
        for c in items:
            name = c.get("name") if isinstance(c, dict) else c
            if not isinstance(name, str):
                return repr(name)
            if name == "sharding_indexed":
                conf = c.get("configuration") if isinstance(c, dict) else None
                if not isinstance(conf, dict):
                    return name
                todo += [conf.get("codecs") or [], conf.get("index_codecs") or []]
            elif name not in _V3_SAFE and name.removeprefix("numcodecs.") not in _V2_SAFE:
                return name
    return None


def _unsafe_codec_v2(zarray: dict[str, Any]) -> str | None:
    comp = zarray.get("compressor")
    filters = zarray.get("filters") or []
    for cfg in ([comp] if comp is not None else []) + (filters if isinstance(filters, list) else [filters]):
        cid = cfg.get("id") if isinstance(cfg, dict) else cfg
        if cid not in _V2_SAFE:
            return repr(cid) if not isinstance(cid, str) else cid
    if zarray.get("object_codec") is not None:
        return "object_codec"
    return None


def _check_array(where: Location, m: ArrayMeta) -> None:
    """The header's structure and sizes, before anything loops over its chunks or allocates one."""
    if m.separator not in SEPARATORS:
        cls = (
            ExternalDataError
            if ("." in m.separator or "/" in m.separator or "\\" in m.separator)
            else BadHeaderError
        )
        raise cls(
            f"{where}: chunk key separator {m.separator!r}; Zarr allows only '.' or '/' (any other could name "
            f"files outside the store): refused, the store is damaged or crafted."
        )
    check_chunk_grid(where, m.shape, m.chunks, _ITEMSIZES.get(m.dtype, 8))


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise TypeError(value)
    return tuple(value)


def _is_zero(fill: Any) -> bool:
    return fill is None or (not isinstance(fill, bool) and isinstance(fill, (int, float)) and fill == 0)


def parse_v3(adir: Location, doc: Any) -> ArrayMeta | None:
    """An array's ``zarr.json`` (``None`` when it is not an array)."""
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        return None
    try:
        shape = _ints(doc["shape"])
        grid = doc["chunk_grid"]
        chunks = _ints(grid["configuration"]["chunk_shape"])
        dt = doc["data_type"]
        enc = doc.get("chunk_key_encoding") or {"name": "default"}
        conf = enc.get("configuration") or {}
        codecs = list(doc.get("codecs") or [])
        attrs = doc.get("attributes") or {}
    except (KeyError, TypeError, AttributeError):
        raise BadHeaderError(
            f"{adir / ZARR_JSON}: incomplete array metadata (shape and chunk_shape must be lists of integers); "
            f"re-convert the store."
        ) from None
    if not isinstance(attrs, dict):
        raise MetadataError(f"{adir / ZARR_JSON}: the array attributes are not a JSON object.")
    if not isinstance(enc, dict) or not isinstance(conf, dict) or enc.get("name") not in ("default", "v2"):
        raise BadHeaderError(f"{adir / ZARR_JSON}: unknown chunk_key_encoding {enc!r}; refused.")
    unsafe = _unsafe_codec_v3(codecs)
    if unsafe is not None:
        raise BadHeaderError(
            f"{adir / ZARR_JSON}: codec {unsafe!r} is not one actfmt reads (bytes, blosc, zstd, gzip, "
            f"transpose, crc32c, sharding); refused and not run."
        )
    default = enc.get("name") == "default"
    sep = str(conf.get("separator", "/" if default else "."))
    dtype = _V3_DTYPES.get(dt, dt) if isinstance(dt, str) else json.dumps(dt)
    codec, direct = None, False
    first = codecs[0] if codecs and isinstance(codecs[0], dict) else {}
    bytes_conf = first.get("configuration")
    endian = bytes_conf.get("endian", "little") if isinstance(bytes_conf, dict) else "little"
    if first.get("name") == "bytes" and endian == "little":
        rest = codecs[1:]
        if not rest:
            direct = True
        elif len(rest) == 1:
            codec = codec_from_v3(rest[0])
            direct = codec is not None
    direct = direct and grid.get("name") == "regular" and not doc.get("storage_transformers")
    direct = direct and _is_zero(doc.get("fill_value", 0))
    m = ArrayMeta(adir.name, 3, shape, chunks, dtype, attrs, sep, "c" if default else "", codec, direct)
    _check_array(adir / ZARR_JSON, m)
    return _finish(m)


def parse_v2(adir: Location, zarray: Any, zattrs: Any) -> ArrayMeta | None:
    """An array's ``.zarray`` and ``.zattrs`` (``None`` when there is no ``.zarray``)."""
    if zarray is None:
        return None
    try:
        if not isinstance(zarray, dict):
            raise TypeError(zarray)
        shape = _ints(zarray["shape"])
        chunks = _ints(zarray["chunks"])
        dtype = str(zarray["dtype"])
    except (KeyError, TypeError):
        raise BadHeaderError(
            f"{adir / ZARRAY}: incomplete array metadata (shape and chunks must be lists of integers); "
            f"re-convert the store."
        ) from None
    attrs = zattrs if zattrs is not None else {}
    if not isinstance(attrs, dict):
        raise MetadataError(f"{adir / ZATTRS}: the array attributes are not a JSON object.")
    if dtype[:1] in ("|", "="):
        dtype = "<" + dtype[1:]
    unsafe = _unsafe_codec_v2(zarray)
    if unsafe is not None:
        raise BadHeaderError(
            f"{adir / ZARRAY}: codec {unsafe!r} is not one actfmt reads (blosc, zstd, gzip, zlib, lz4, bz2, "
            f"lzma and simple filters); refused and not run."
        )
    comp = zarray.get("compressor")
    codec = codec_from_v2(comp) if comp else None
    direct = (
        (comp is None or codec is not None)
        and not zarray.get("filters")
        and zarray.get("order", "C") == "C"
        and _is_zero(zarray.get("fill_value", 0))
    )
    sep = zarray.get("dimension_separator") or "."
    m = ArrayMeta(adir.name, 2, shape, chunks, dtype, attrs, str(sep), "", codec, direct)
    _check_array(adir / ZARRAY, m)
    return _finish(m)


def _finish(m: ArrayMeta) -> ArrayMeta:
    direct = (
        m.direct
        and len(m.shape) == 2
        and len(m.chunks) == 2
        and m.chunks[0] > 0
        and m.chunks[1] == m.shape[1]
        and m.dtype in _DIRECT_DTYPES
    )
    if direct == m.direct:
        return m
    return ArrayMeta(
        m.name,
        m.zarr_format,
        m.shape,
        m.chunks,
        m.dtype,
        m.attributes,
        m.separator,
        m.prefix,
        m.codec,
        direct,
    )


def read_arrays(group: Location, names: Sequence[str]) -> dict[str, ArrayMeta]:
    """The arrays among ``names`` (directories of ``group``): their documents read in one batch (a second for
    the v2 documents of those without ``zarr.json``).  Directories that hold no array are left out."""
    out: dict[str, ArrayMeta] = {}
    dirs = [group / n for n in names]
    v3 = read_objects([d / ZARR_JSON for d in dirs], missing_ok=True)
    rest = []
    for d, raw in zip(dirs, v3, strict=True):
        m = parse_v3(d, parse_json(d / ZARR_JSON, raw)) if raw is not None else None
        if m is not None:
            out[d.name] = m
        elif raw is None:
            rest.append(d)
    if rest:
        docs = read_objects([d / key for d in rest for key in (ZARRAY, ZATTRS)], missing_ok=True)
        for i, d in enumerate(rest):
            zarray = parse_json(d / ZARRAY, docs[2 * i])
            if zarray is None:
                continue
            m = parse_v2(d, zarray, parse_json(d / ZATTRS, docs[2 * i + 1]))
            if m is not None:
                out[d.name] = m
    return {n: out[n] for n in names if n in out}


def small_array_documents(
    location: Location,
    name: str,
    arr: np.ndarray,
    zarr_format: int,
    dimension_names: Sequence[str] = ("layer", "hidden"),
) -> dict[Location, bytes]:
    """The documents and the one chunk of a small array ``location/name`` (uncompressed): the statistics'
    2-D float arrays, the 1-D coordinates ``example`` / ``hidden``."""
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    shape = tuple(int(n) for n in arr.shape)
    dtype = arr.dtype.str
    rows = shape[0]
    docs = {
        location / name / k: v
        for k, v in array_documents(
            shape, max(rows, 1), dtype, "none", None, {}, zarr_format, dimension_names
        ).items()
    }
    key = ".".join(["0"] * len(shape))
    if zarr_format == 3:
        key = "c." + key
    if rows and all(shape):
        docs[location / name / key] = arr.tobytes()
    return docs
