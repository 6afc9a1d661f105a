"""The one checksum: xxh3-64 of a layer's raw bytes in row order (convert, verify and validate share it).

``convert`` hashes each block as it passes, the writer's blocks in row order, so the digest does not depend on
block sizes, threads or executors; ``validate --deep`` and ``convert``'s verification re-read a store and hash
it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.formats.base import LayerInfo, Reader

__all__ = ["ALGORITHM", "SCAN_BYTES", "Hasher", "layer_checksum", "scan_blocks"]

ALGORITHM = "xxh3_64"
#: Bytes read per step when hashing or comparing a layer (bounded memory whatever the layer size).
SCAN_BYTES = 32 << 20


class Hasher:
    """An incremental layer checksum: ``update`` with each block's bytes in row order, then ``digest()``."""

    def __init__(self) -> None:
        import xxhash

        self._h = xxhash.xxh3_64()

    def update(self, data: Any) -> None:
        self._h.update(memoryview(data).cast("B"))

    def digest(self) -> str:
        return f"{ALGORITHM}:{self._h.hexdigest()}"


def scan_blocks(info: LayerInfo, step_bytes: int = SCAN_BYTES) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``step_bytes`` covering the layer."""
    step = max(1, step_bytes // max(1, info.row_bytes))
    for start in range(0, info.rows, step):
        yield start, min(info.rows, start + step)


def layer_checksum(
    reader: Reader, pos: int, on_bytes: Callable[[int], None] | None = None, own: bool = False
) -> str:
    """The checksum of layer position ``pos`` of an open reader, streamed in bounded blocks.  ``own``: the store
    is actfmt's own, just written and locked (its memory-mapped bytes are hashed in place)."""
    h = Hasher()
    views = reader.own_bytes(pos) if own else None
    if views is not None:
        for view in views:
            h.update(view)
            if on_bytes:
                on_bytes(len(view))
        return h.digest()
    for start, stop in scan_blocks(reader.layer_info(pos)):
        block = reader.read_array(pos, start, stop)
        h.update(block)
        if on_bytes:
            on_bytes(block.nbytes)
    return h.digest()
