"""Small named arrays beside a store: a plain safetensors file (any safetensors reader opens it).

``actfmt convert`` keeps each layer's mean and standard deviation vectors with the data it writes.  Directory
stores (pt, safetensors) hold them in ``.actfmt_stats.safetensors``: tensors ``mean`` and ``std`` of shape
``[layers, hidden_dim]`` (float32) and, in ``__metadata__``, ``layers``: the layer names of the rows, as JSON.
Zarr and HDF5 keep the same arrays inside the store, in the group :data:`STATS_GROUP` (see their modules).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from actfmt.layout import loads_json
from actfmt.storage import Location

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["STATS_FILE", "STATS_GROUP", "read_tensors", "write_tensors"]

#: The vectors' file in a directory store (hidden: tools that list layers do not see it).
STATS_FILE = ".actfmt_stats.safetensors"
#: The group of a Zarr or HDF5 store that holds them (its attribute ``layers`` names the rows).
STATS_GROUP = "actfmt_stats"
_ST = {"float32": "F32", "float64": "F64", "int64": "I64"}
_NP = {v: k for k, v in _ST.items()}


def write_tensors(location: Location, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """A safetensors file of C-contiguous little-endian arrays (written atomically)."""
    import numpy as np

    head: dict[str, Any] = {"__metadata__": dict(metadata)}
    parts, at = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
        head[name] = {
            "dtype": _ST[arr.dtype.name],
            "shape": list(arr.shape),
            "data_offsets": [at, at + arr.nbytes],
        }
        parts.append(arr.tobytes())
        at += arr.nbytes
    body = json.dumps(head, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    location.write_bytes(len(body).to_bytes(8, "little") + body + b"".join(parts), atomic=True)


def read_tensors(location: Location) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """The arrays and ``__metadata__`` of such a file, or ``None`` when there is none (or it is damaged)."""
    import numpy as np

    try:
        raw = location.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = loads_json(raw[8 : 8 + n])
        meta = head.pop("__metadata__", {}) or {}
        out = {}
        for name, entry in head.items():
            a, b = entry["data_offsets"]
            arr = np.frombuffer(
                raw[8 + n + a : 8 + n + b], dtype=np.dtype(_NP[entry["dtype"]]).newbyteorder("<")
            )
            out[name] = arr.reshape(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out, meta
