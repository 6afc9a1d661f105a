"""The zip CRC-32: every record of a ``.pt`` shard (a zip file) carries it, and a writer that copies a block
from byte runs (:attr:`~actfmt.formats.base.Writer.wants_crc32`) is handed it.  A detail of the formats,
not the layer checksum (:mod:`actfmt.checksum`)."""

from __future__ import annotations

try:  # ISA-L's runs at memory speed, zlib's at ~2 GB/s
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    from zlib import crc32

__all__ = ["crc32"]
