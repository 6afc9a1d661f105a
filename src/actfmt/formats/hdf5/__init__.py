"""One split as one HDF5 file: the format's package (its module, ``reader.py`` for now, is split into rooms next)."""

from __future__ import annotations

from actfmt.formats.hdf5.reader import (
    COMPRESSIONS,
    HDF5_SIGNATURE,
    HDF5Format,
    HDF5Reader,
    HDF5Writer,
    default_chunk_rows,
)

__all__ = ["COMPRESSIONS", "HDF5_SIGNATURE", "HDF5Format", "HDF5Reader", "HDF5Writer", "default_chunk_rows"]
