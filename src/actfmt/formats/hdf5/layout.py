"""The layout contract of an HDF5 split: the names of its attributes and dimensions, the signature, the limits
and defaults, and how metadata values become attributes and back (see :mod:`actfmt.formats.hdf5`)."""

from __future__ import annotations

import json
import math
from typing import Any

from actfmt.formats.base import ACTFMT_KEY
from actfmt.layout import loads_json

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Where the signature may be: at 0, or after a user block of 512, 1024 or 2048 bytes.
SIGNATURE_OFFSETS = (0, 512, 1024, 2048)
#: Names a file on object storage must have to be probed (a request per file would cost too much).
REMOTE_SUFFIXES = (".h5", ".hdf5")
#: Root attribute holding the producer's metadata as one exact JSON document.
METADATA_ATTR = "actfmt_metadata"
#: Dataset attributes.
DTYPE_ATTR = "actfmt_dtype"
#: On a bfloat16 layer: how to get the values back from the uint16 bits (h5py users see it in ``dset.attrs``,
#: ``h5dump -A`` and ``h5ls -v`` print it).
ENCODING_ATTR = "actfmt_encoding"
BF16_ENCODING = (
    "bfloat16 values stored as their uint16 bits: decode with x.view(ml_dtypes.bfloat16), or "
    "torch.from_numpy(x.view('int16')).view(torch.bfloat16); the integers themselves mean nothing"
)
#: The layers' dimensions (also the names of the dimension scales).
DIMENSION_NAMES = ("example", "hidden")
SHARD_ROWS_ATTR = "actfmt_shard_rows"
RESERVED_ATTRS = (ACTFMT_KEY, METADATA_ATTR)

CHUNK_TARGET_BYTES = 1 << 20  # 1 MiB per chunk
BLOCK_TARGET_BYTES = 48 << 20  # ~48 MiB per write() block
READ_CACHE_BYTES = 64 << 20  # chunk cache of a compressed dataset
#: Datasets kept open at once (each with a READ_CACHE_BYTES chunk cache when compressed): bounds memory.
OPEN_DATASETS = 4
READ_CACHE_SLOTS = 12421  # a prime, ~100x the chunks 64 MiB holds at 0.5 MiB/chunk


def default_chunk_rows(rows: int, hidden_dim: int, itemsize: int) -> int:
    """The largest power of two whose chunk stays within 1 MiB, capped at ``rows`` (at least 1)."""
    row_bytes = max(1, hidden_dim * itemsize)
    n = 1 << max(0, math.floor(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes))))
    return max(1, min(n, rows))


def attr_value(value: Any) -> Any:
    """A metadata value as an HDF5-friendly attribute value (native scalars; JSON text otherwise)."""
    import numpy as np

    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def from_attr(value: Any) -> Any:
    """An attribute value back as a JSON-friendly Python value (for files without ``actfmt_metadata``)."""
    import numpy as np

    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [from_attr(v) for v in value.tolist()] if value.ndim else from_attr(value[()])
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, list, dict)) or value is None:
        return value
    return None  # h5py.Empty and the like


def json_attr(raw: Any) -> Any:
    """A JSON string attribute, decoded (``ValueError`` / ``TypeError`` when it is not JSON)."""
    if not isinstance(raw, (bytes, str)):
        raise TypeError(f"a JSON attribute must be a string, got {type(raw).__name__}")
    return loads_json(raw)
