"""npy splits: a directory with ``metadata.json`` and one NumPy ``.npy`` file per layer.

On disk (the contract)::

    EM/metadata.json         the producer's keys verbatim, then "actfmt": {"dtype": {...}, ..., "complete": true}
    EM/layer_00.npy          a .npy file (format version 1.0), C order, shape [total_examples, hidden_dim]
    EM/layer_01.npy ...

* Any NumPy reads a layer without actfmt: ``numpy.load("EM/layer_03.npy", mmap_mode="r")``.
* float16 and float32 are stored as ``<f2`` / ``<f4``; bfloat16, which NumPy lacks, as its bits, ``<u2``, with
  the real dtype recorded in ``metadata.json`` (``actfmt.dtype``: ``{"layer_03": "bfloat16"}``), as the other
  stores do (``torch.from_numpy(a.view("int16")).view(torch.bfloat16)`` restores it).  ``create`` writes that
  record before any layer (an ``actfmt`` block without ``complete``), ``finalize`` the whole block last
  (``complete: true``): until then the split is an interrupted conversion (ACT603).
* The header is NumPy's own (``{'descr': '<f2', 'fortran_order': False, 'shape': (R, H), }``), padded with
  spaces so that the data starts at a multiple of 64 bytes (aligned for memory mapping).
* No compression: the format has none.
* The split keeps the split's name (``EM`` -> ``EM/``), as safetensors does: a ``.npy`` suffix names a *file* to
  every NumPy user, so a directory called ``EM.npy`` would mislead, and the files inside carry the suffix.

Reading parses each header here, strictly and bounded (untrusted input): the magic string, version 1.0, 2.0 or
3.0, a header of at most :data:`MAX_HEADER` bytes, a dict literal of exactly ``descr`` (one of
:data:`DESCRS`), ``fortran_order`` (``False``) and a 2-D ``shape`` -- no ``eval``, no ``ast``.  Rows are read
through :class:`~actfmt.formats.base.RowStore` at the data offset (:mod:`~actfmt.formats.layerfiles`: preadv,
object storage, byte runs, truncation reported as missing rows).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from actfmt.errors import BadHeaderError, ConversionError, CorruptShardError
from actfmt.formats.base import Format
from actfmt.formats.layerfiles import LayerFileHeader, LayerFileReader, LayerFileWriter
from actfmt.storage import Entry, Kind, Location

__all__ = ["DESCRS", "MAGIC", "NpyFormat", "NpyReader", "NpyWriter", "build_header", "parse_header"]

SUFFIX = ".npy"
MAGIC = b"\x93NUMPY"
#: NumPy's own bound on a header it parses (``max_header_size``).
MAX_HEADER = 10_000
#: The data starts at a multiple of this many bytes (NumPy's own alignment).
ALIGN = 64
#: Stored dtype string of each dtype (little-endian; bfloat16 as its bits).
DESCRS = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}
_FIX = "re-run the conversion (actfmt convert ... --overwrite) or restore the file"

# one item of the header's dict literal: a quoted key, then a quoted string, a boolean or a tuple of integers
_ITEM = re.compile(
    r"\s*'([a-z_]{1,32})'\s*:\s*(?:'([<>|=]?[a-zA-Z]\d{0,2})'|(True|False)|\(([0-9,\s]{0,80})\))\s*"
)


class HeaderError(CorruptShardError, BadHeaderError):
    """A layer file's header that is not a ``.npy`` header actfmt writes and reads (rule ACT606)."""


def build_header(dtype: str, rows: int, hidden: int) -> bytes:
    """The bytes before a layer's data: magic, version 1.0, the header length, the dict padded to :data:`ALIGN`."""
    if dtype not in DESCRS:
        raise ConversionError(f"npy: cannot store dtype {dtype!r} (supported: {', '.join(DESCRS)}).")
    text = f"{{'descr': '{DESCRS[dtype]}', 'fortran_order': False, 'shape': ({rows}, {hidden}), }}"
    pad = -(len(MAGIC) + 4 + len(text) + 1) % ALIGN
    body = (text + " " * pad + "\n").encode("latin1")
    return MAGIC + b"\x01\x00" + len(body).to_bytes(2, "little") + body


def _fields(location: Location, text: str) -> dict[str, Any]:
    """The header's dict literal, parsed strictly: exactly ``descr``, ``fortran_order`` and ``shape``."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise HeaderError(f"{location}: the .npy header is not a dict literal; {_FIX}.")
    body, pos, out = body[1:-1], 0, {}
    while pos < len(body) and body[pos:].strip():
        m = _ITEM.match(body, pos)
        if m is None:
            raise HeaderError(
                f"{location}: the .npy header cannot be parsed near {body[pos : pos + 30]!r}; {_FIX}."
            )
        key, text_value, flag, tup = m.groups()
        if key in out:
            raise HeaderError(f"{location}: the .npy header gives {key!r} twice; {_FIX}.")
        if text_value is not None:
            out[key] = text_value
        elif flag is not None:
            out[key] = flag == "True"
        else:
            parts = [p.strip() for p in tup.split(",")]
            if parts and parts[-1] == "":
                parts.pop()
            if not all(p.isdigit() and len(p) <= 19 for p in parts):
                raise HeaderError(f"{location}: the .npy shape ({tup}) is not a tuple of integers; {_FIX}.")
            out[key] = tuple(int(p) for p in parts)
        pos = m.end()
        if pos < len(body):
            if body[pos] != ",":
                raise HeaderError(
                    f"{location}: the .npy header lacks a ',' near {body[pos : pos + 30]!r}; {_FIX}."
                )
            pos += 1
    if set(out) != {"descr", "fortran_order", "shape"}:
        raise HeaderError(
            f"{location}: the .npy header has the keys {sorted(out)}; a .npy header has exactly descr, "
            f"fortran_order and shape; {_FIX}."
        )
    if not isinstance(out["descr"], str) or not isinstance(out["fortran_order"], bool):
        raise HeaderError(f"{location}: the .npy header's descr or fortran_order has the wrong type; {_FIX}.")
    if not isinstance(out["shape"], tuple):
        raise HeaderError(f"{location}: the .npy shape is not a tuple; {_FIX}.")
    return out


def parse_header(
    location: Location, head: bytes, size: int, identity: tuple[Any, ...] = (), recorded: str | None = None
) -> LayerFileHeader:
    """Parse and check a layer's ``.npy`` header from the file's first bytes (more are read when the header is
    longer than ``head``).  ``recorded``: the layer's dtype as ``metadata.json`` records it (required for
    ``<u2``, bfloat16's bits)."""
    if len(head) < 10 or head[:6] != MAGIC:
        raise HeaderError(f"{location}: not a .npy file (no NumPy magic string); {_FIX}.")
    major, minor = head[6], head[7]
    if major not in (1, 2, 3) or minor != 0:
        raise HeaderError(
            f"{location}: .npy format version {major}.{minor}; NumPy writes 1.0, 2.0 and 3.0; {_FIX}."
        )
    width = 2 if major == 1 else 4
    start = 8 + width
    if len(head) < start:
        raise HeaderError(f"{location}: {size} bytes, too short for a .npy file; {_FIX}.")
    n = int.from_bytes(head[8:start], "little")
    if n > MAX_HEADER:
        raise HeaderError(
            f"{location}: declares a {n}-byte .npy header, more than the {MAX_HEADER} NumPy reads; {_FIX}."
        )
    if start + n > size:
        raise HeaderError(f"{location}: truncated inside its .npy header ({size} bytes); {_FIX}.")
    if len(head) < start + n:
        head = location.read_range(0, start + n)
    try:
        text = head[start : start + n].decode("utf-8" if major == 3 else "latin1")
    except UnicodeDecodeError:
        raise HeaderError(f"{location}: the .npy header is not valid UTF-8; {_FIX}.") from None
    if not text.endswith("\n"):
        raise HeaderError(f"{location}: the .npy header does not end with a newline; {_FIX}.")
    f = _fields(location, text)
    descr, shape = f["descr"], f["shape"]
    if f["fortran_order"]:
        raise HeaderError(f"{location}: stored in Fortran order; actfmt reads C-order layers; {_FIX}.")
    if len(shape) != 2:
        raise HeaderError(f"{location}: shape {list(shape)}; a layer is 2-D [rows, hidden_dim].")
    if shape[1] == 0:
        raise HeaderError(f"{location}: shape {list(shape)}; hidden_dim must be at least 1; {_FIX}.")
    by_descr = {v: k for k, v in DESCRS.items()}
    if descr not in by_descr:
        raise HeaderError(
            f"{location}: dtype {descr!r}; actfmt reads {', '.join(f'{v} ({k})' for k, v in DESCRS.items())}; "
            f"convert the activations to one of those."
        )
    dtype = by_descr[descr]
    if recorded is not None and DESCRS.get(recorded) != descr:
        raise HeaderError(
            f"{location}: stored as {descr} but metadata.json records dtype {recorded!r}; {_FIX}."
        )
    if descr == "<u2" and recorded != "bfloat16":
        raise HeaderError(
            f"{location}: uint16 data without metadata.json recording it as bfloat16 (actfmt.dtype); {_FIX}."
        )
    header = LayerFileHeader(location, dtype, (shape[0], shape[1]), start + n, size, identity)
    if header.expected_file_nbytes < size:  # NumPy would ignore them: the header does not describe the file
        raise HeaderError(
            f"{location}: {size - header.expected_file_nbytes} bytes follow the data (shape {list(shape)} "
            f"{descr}); the header does not describe the file; {_FIX}."
        )
    return header


class NpyReader(LayerFileReader):
    """A split in the npy layout; rows through :class:`~actfmt.formats.base.RowStore`."""

    format = "npy"
    suffix = SUFFIX

    def _recorded(self, location: Location) -> str | None:
        block = self.actfmt or {}
        dtypes = block.get("dtype")
        value = dtypes.get(location.name[: -len(SUFFIX)]) if isinstance(dtypes, dict) else None
        return value if isinstance(value, str) else None

    def parse_header(
        self, location: Location, head: bytes, size: int, identity: tuple[Any, ...]
    ) -> LayerFileHeader:
        return parse_header(location, head, size, identity, self._recorded(location))


class NpyWriter(LayerFileWriter):
    """Streams each layer into its own ``layer_XX.npy``: the NumPy header, then the rows."""

    format = "npy"
    suffix = SUFFIX
    dtypes = tuple(DESCRS)

    def first_block(self) -> dict[str, Any] | None:
        return {"dtype": {li.name: li.dtype for li in self.spec.layers}}  # <u2 is bfloat16 from the start

    def layer_header(self, layer: int) -> bytes:
        info = self.spec.layers[layer]
        return build_header(info.dtype, info.rows, info.hidden_dim)

    def finalize(self, block: dict[str, Any]) -> None:
        out = {k: v for k, v in block.items() if k != "complete"}
        out.setdefault("dtype", {li.name: li.dtype for li in self.spec.layers})
        if "complete" in block:
            out["complete"] = block["complete"]  # the completeness mark stays the last key
        super().finalize(out)


class NpyFormat(Format):
    """A directory per split: ``metadata.json`` and one ``layer_XX.npy`` file per layer."""

    name = "npy"
    suffixes = ()  # a directory named like the split (EM/): see the module docstring
    looks_like = "a directory of layer_XX.npy files"
    reader = NpyReader
    writer = NpyWriter

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        return entries is not None and any(
            e.name.startswith("layer_") and e.name.endswith(SUFFIX) and e.kind != Kind.DIR for e in entries
        )
