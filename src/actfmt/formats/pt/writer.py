"""Writing the seed's ``.pt`` layout without torch: each shard is the zip archive ``torch.save`` writes.

A shard file holds, as ``torch.save(tensor)`` does: ``<name>/data.pkl`` (the pickle that rebuilds the tensor
over one storage: ``_rebuild_tensor_v2``, ``persistent_load(('storage', torch.BFloat16Storage, '0', 'cpu', n))``,
contiguous strides), ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/0`` (the rows, raw,
little-endian, 64-byte aligned), ``version`` and ``.data/serialization_id``; stored (uncompressed) records with
their CRC-32, and the zip64 end records.  ``torch.load(weights_only=True)`` (mmap or not), the seed loader and
Python's ``zipfile`` read it; actfmt's own probe reads its header without torch.

The rows are written from the block in memory, or copied in the kernel from the source's raw bytes when the
conversion hands over byte runs (``os.copy_file_range``); the CRC-32 is computed from the block either way.
Shards follow the source's boundaries when known, else the producer's arithmetic.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from actfmt.errors import ConversionError
from actfmt.formats.base import ACTFMT_KEY, ByteRun, SplitSpec, WriteOptions, Writer
from actfmt.formats.crc import crc32
from actfmt.formats.dtypes import as_array
from actfmt.formats.pt.reader import SIDECAR
from actfmt.formats.rowstore import Runs
from actfmt.layout import METADATA_FILE, expected_shard_rows, shard_name
from actfmt.storage import Location

__all__ = ["PtWriter", "shard_bytes"]


ALIGN = 64
_STORAGE_CLASS = {"bfloat16": "BFloat16Storage", "float16": "HalfStorage", "float32": "FloatStorage"}
_U32 = 0xFFFFFFFF


def _pint(n: int) -> bytes:
    """A non-negative int as the smallest pickle opcode torch's pickler would use."""
    if n < 256:
        return b"K" + bytes([n])
    if n < 65536:
        return b"M" + struct.pack("<H", n)
    if n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _unicode(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def tensor_pickle(rows: int, hidden: int, dtype: str) -> bytes:
    """``data.pkl`` of a contiguous ``[rows, hidden]`` tensor over storage ``'0'``, opcode for opcode what
    ``torch.save`` writes (protocol 2)."""
    return b"".join(
        [
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((",
            _unicode("storage"),
            b"q\x01ctorch\n" + _STORAGE_CLASS[dtype].encode() + b"\nq\x02",
            _unicode("0"),
            b"q\x03",
            _unicode("cpu"),
            b"q\x04",
            _pint(rows * hidden),
            b"tq\x05QK\x00",
            _pint(rows) + _pint(hidden) + b"\x86q\x06",
            _pint(hidden) + b"K\x01\x86q\x07",
            b"\x89ccollections\nOrderedDict\nq\x08)Rq\x09tq\x0aRq\x0b.",
        ]
    )


class _Zip:
    """Builds a stored zip archive record by record, 64-byte aligned as torch's writer does."""

    def __init__(self) -> None:
        self.offset = 0
        self.central: list[bytes] = []

    def header(self, name: str, size: int, crc: int) -> bytes:
        raw = name.encode()
        big = size >= _U32 or self.offset >= _U32
        z64 = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        pad = -(self.offset + 30 + len(raw) + len(z64) + 4) % ALIGN
        extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        field = _U32 if big else size
        local = struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            45 if big else 20,
            0,
            0,
            0,
            0x21,
            crc,
            field,
            field,
            len(raw),
            len(extra),
        )
        c64 = []
        if size >= _U32:
            c64 += [size, size]
        if self.offset >= _U32:
            c64.append(self.offset)
        cextra = struct.pack("<HH", 1, 8 * len(c64)) + struct.pack(f"<{len(c64)}Q", *c64) if c64 else b""
        self.central.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                45 if c64 else 20,
                45 if c64 else 20,
                0,
                0,
                0,
                0x21,
                crc,
                _U32 if size >= _U32 else size,
                _U32 if size >= _U32 else size,
                len(raw),
                len(cextra),
                0,
                0,
                0,
                0,
                _U32 if self.offset >= _U32 else self.offset,
            )
            + raw
            + cextra
        )
        out = local + raw + extra
        self.offset += len(out) + size
        return out

    def record(self, name: str, data: bytes) -> bytes:
        return self.header(name, len(data), crc32(data)) + data

    def end(self) -> bytes:
        cd = b"".join(self.central)
        n, start = len(self.central), self.offset
        z64_at = start + len(cd)
        return (
            cd
            + struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cd), start)
            + struct.pack("<4sIQI", b"PK\x06\x07", 0, z64_at, 1)
            + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, min(len(cd), _U32), min(start, _U32), 0)
        )


def shard_bytes(name: str, rows: int, hidden: int, dtype: str, nbytes: int, crc: int) -> tuple[bytes, bytes]:
    """The bytes before and after the data of a shard file whose tensor bytes have length ``nbytes`` and
    CRC-32 ``crc``: ``(head, tail)``; the file is ``head + data + tail``."""
    z = _Zip()
    head = (
        z.record(f"{name}/data.pkl", tensor_pickle(rows, hidden, dtype))
        + z.record(f"{name}/.format_version", b"1")
        + z.record(f"{name}/.storage_alignment", str(ALIGN).encode())
        + z.record(f"{name}/byteorder", b"little")
        + z.header(f"{name}/data/0", nbytes, crc)
    )
    serial = f"{crc:020d}{nbytes:020d}"[-40:].encode()
    tail = z.record(f"{name}/version", b"3\n") + z.record(f"{name}/.data/serialization_id", serial) + z.end()
    return head, tail


class PtWriter(Writer):
    """Writes contiguous shards with the source's row boundaries (else the producer's arithmetic)."""

    format = "pt"

    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> PtWriter:
        if options.compression not in (None, "none"):
            raise ConversionError(f"the pt format has no compression (got {options.compression!r}).")
        location.mkdir()
        for info in spec.layers:
            (location / info.name).mkdir()
        return cls(location, spec, options)

    def block_rows(self, layer: int) -> list[int]:
        info = self.spec.layers[layer]
        if info.shard_rows:
            return list(info.shard_rows)
        meta = self.spec.metadata
        try:
            return expected_shard_rows(info.rows, int(meta["shard_size"]), int(meta["batch_size"]))
        except (KeyError, TypeError, ValueError):
            return super().block_rows(layer)

    wants_crc32 = True

    def copies_raw(self, layer: int) -> bool:
        return self.location.supports_copy_range

    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        info = self.spec.layers[layer]
        if data is None:  # copied from the source's bytes: the conversion gave their CRC
            assert isinstance(runs, Runs) and runs.crc32 is not None
            nbytes, crc, view = runs.nbytes, runs.crc32, None
        else:
            arr = as_array(data, info.dtype)
            if arr.ndim != 2 or arr.shape[1] != info.hidden_dim:
                raise ConversionError(
                    f"{self.location}/{info.name}: a block of shape {arr.shape}, the layer is [*, {info.hidden_dim}]."
                )
            view = arr.data.cast("B")
            nbytes, crc = len(view), crc32(view)
        rows = nbytes // max(1, info.row_bytes)
        bounds = self.block_rows(layer)
        offset, k = 0, 0
        while offset < start and k < len(bounds):
            offset += bounds[k]
            k += 1
        if offset != start or k >= len(bounds) or bounds[k] != rows:
            raise ValueError(f"pt writer: block at row {start} of {rows} rows is not a shard boundary")
        name = shard_name(k)
        head, tail = shard_bytes(name.removesuffix(".pt"), rows, info.hidden_dim, info.dtype, nbytes, crc)
        target = self.location / info.name / name
        with target.open_output() as out:
            out.write(head)
            if runs is not None and target.supports_copy_range:
                for loc, off, n in runs:
                    out.copy_range(loc, off, n)
            else:
                assert view is not None
                out.write(view)
            out.write(tail)

    def finalize(self, block: dict[str, Any]) -> None:
        meta = {k: v for k, v in self.spec.metadata.items() if k != ACTFMT_KEY}
        # as the producer writes it: json.dump(indent=2), no trailing newline
        (self.location / METADATA_FILE).write_bytes(json.dumps(meta, indent=2).encode(), atomic=True)
        (self.location / SIDECAR).write_bytes(json.dumps({ACTFMT_KEY: block}, indent=2).encode(), atomic=True)
