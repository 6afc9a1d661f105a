"""A shuffled training stream over one or more splits: the package (its module, ``ring.py`` for now, is split into
rooms next; the order is documented there)."""

from __future__ import annotations

from actfmt.streaming.ring import (
    BLOCK_BYTES,
    BUFFER_BYTES,
    NORMALIZE,
    Geometry,
    Plan,
    Stream,
    StreamError,
    StreamReport,
    _Run,  # noqa: F401 - the race test patches actfmt.streaming._Run until the split names its module
    measure,
    mixing,
    stream,
)

__all__ = [
    "BLOCK_BYTES",
    "BUFFER_BYTES",
    "NORMALIZE",
    "Geometry",
    "Plan",
    "Stream",
    "StreamError",
    "StreamReport",
    "measure",
    "mixing",
    "stream",
]
