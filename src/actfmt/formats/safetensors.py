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
:class:`~actfmt.formats.rowstore.RowStore` (``preadv`` straight into the output locally, ranged GETs remotely).

The directory-of-layer-files machinery (listing, metadata.json, streaming, byte runs, truncation) is
:mod:`~actfmt.formats.layerfiles`'s, shared with npy; this module is the safetensors header, written and parsed.

``__metadata__`` embeds the producer's metadata when its JSON is at most :data:`EMBED_LIMIT` bytes; a larger
``metadata.json`` (extra keys such as long prompt lists) is embedded as its required keys only, with
``"metadata.json.truncated": "true"``, so it is not copied into every layer file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from actfmt.errors import BadHeaderError, ConversionError, CorruptShardError
from actfmt.formats.base import Format, LayerInfo
from actfmt.formats.dtypes import ITEMSIZE
from actfmt.formats.layerfiles import LayerFileHeader, LayerFileReader, LayerFileWriter
from actfmt.layout import REQUIRED_KEYS, loads_json
from actfmt.storage import Entry, Location

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
#: The safetensors library refuses headers larger than this.
MAX_HEADER = 100_000_000
#: The producer's metadata is embedded in each layer file up to this many bytes of JSON.
EMBED_LIMIT = 64 << 10
_FIX = "re-run the conversion (actfmt convert ... --overwrite) or restore the file"


# ----------------------------------------------------------------------------------------------------------
# header


class SafetensorsHeader(LayerFileHeader):
    """The parsed header of a one-tensor safetensors file (its tensor's ``name``, its ``__metadata__``)."""

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
        super().__init__(location, dtype, shape, data_start, file_nbytes, identity)
        self.name = name
        self.metadata = meta  # __metadata__ (str -> str)


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
    nbytes = shape[0] * shape[1] * ITEMSIZE[dtype]
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


class SafetensorsReader(LayerFileReader):
    """A split in the safetensors layout; rows through :class:`RowStore`."""

    format = "safetensors"
    suffix = SUFFIX
    metadata_advice = (
        "every split needs a metadata.json (each layer file keeps a copy in its "
        "__metadata__['metadata.json']; re-run the conversion or restore the file)"
    )

    def parse_header(
        self, location: Location, head: bytes, size: int, identity: tuple[Any, ...]
    ) -> SafetensorsHeader:
        return parse_header(location, head, size, identity)


# ----------------------------------------------------------------------------------------------------------
# writer


class SafetensorsWriter(LayerFileWriter):
    """Streams each layer into its own ``layer_XX.safetensors``: header first, then the rows."""

    format = "safetensors"
    suffix = SUFFIX
    dtypes = tuple(ST_DTYPES)

    def layer_header(self, layer: int) -> bytes:
        return build_header(self.spec.layers[layer], self._meta)


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
