"""What validation knows of a split's own files, format-neutral: its layers and the pieces each is written in.

A format whose split is a directory of separately written pieces (the producer's ``.pt`` shards) builds an
:class:`Inventory` itself (``Format.inventory``): every entry that stands for a layer or a piece, exactly or
badly named, what its header says or why it cannot be read.  The checks read it without knowing the format;
a store that is one object to its reader (zarr, HDF5, safetensors, npy) has none and is checked through its
Reader.  The deep pass reads a piece's rows through :meth:`Inventory.blocks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from actfmt.errors import OutsideTreeError
from actfmt.layout import SUPPORTED_DTYPES, layer_name, shard_name
from actfmt.storage import Entry, Kind, Location

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["Inventory", "LayerEntry", "PieceHeader", "ShardEntry", "kind_detail", "outside_error", "run_each"]


class PieceHeader(Protocol):
    """What a piece says about itself without its data being read."""

    shape: tuple[int, ...]
    dtype: str
    tensor_nbytes: int


def run_each(fn: Callable[[Any], None], items: Sequence[Any], jobs: int) -> None:
    """Run ``fn`` on every item, on ``jobs`` threads (results are stored on the items, so the order of completion
    is irrelevant): the probes of an inventory, the deep pass."""
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def kind_detail(e: Entry) -> str:
    """Why an entry that is not a regular file cannot be read as one."""
    if e.kind == Kind.MISSING:
        target = ""
        if e.location.local_path is not None:
            try:
                target = f" (to {os.readlink(e.location.path)})"
            except OSError:
                target = ""
        return f"a dangling symlink{target}"
    if e.kind == Kind.SPECIAL:
        return "not a regular file (a FIFO, socket or device); not opened"
    if e.kind == Kind.OUTSIDE:
        return "a link outside the tree; not followed, never read"
    return "is a directory, not a file"


def outside_error(e: Entry) -> OutsideTreeError:
    target = os.path.realpath(e.location.path) if e.location.local_path is not None else ""
    return OutsideTreeError(
        f"{e.location}: a link to {target or 'a place'} outside the tree; not followed, never read",
        str(e.location),
        target,
    )


@dataclass
class _Named:
    """An entry that stands for a layer or a piece: its index, where it is, and whether it is named exactly."""

    index: int
    path: Location
    location: str
    exact: bool

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ShardEntry(_Named):
    """One file in a layer directory that stands for a piece (a shard), exactly or badly named."""

    #: A correctly named piece with the same index exists: this one is ignored by the structural checks.
    shadowed: bool = False
    kind: str = "file"
    header: Any = None  # a PieceHeader, or None when it cannot be read
    error: BaseException | None = None
    # deep results
    nonfinite: int = 0
    nan: int = 0
    inf: int = 0
    zero_rows: list[int] = field(default_factory=list)
    digest: str | None = None
    norms: Any = None  # the deep pass's actfmt.moments.RowNorms (norm-outlier, ACT408)

    @property
    def readable(self) -> bool:
        return self.header is not None

    @property
    def is_2d(self) -> bool:
        return self.header is not None and len(self.header.shape) == 2

    @property
    def rows(self) -> int | None:
        return int(self.header.shape[0]) if self.is_2d else None

    @property
    def width(self) -> int | None:
        return int(self.header.shape[1]) if self.is_2d else None

    @property
    def dtype(self) -> str | None:
        return self.header.dtype if self.header is not None else None  # type: ignore[no-any-return]

    @property
    def usable(self) -> bool:
        """Readable, 2-D and of a supported dtype: the deep checks read it."""
        return self.is_2d and self.dtype in SUPPORTED_DTYPES


@dataclass
class LayerEntry(_Named):
    """One entry of a split that stands for a layer (exactly or badly named)."""

    is_dir: bool = True
    shadowed: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    strays: list[tuple[str, bool]] = field(default_factory=list)  # (location, is_dir)
    list_error: OSError | None = None

    @property
    def canonical(self) -> str:
        return layer_name(self.index)

    def live_shards(self) -> list[ShardEntry]:
        """Pieces that count in the structural checks (not shadowed by a correctly named twin), by index."""
        return sorted((s for s in self.shards if not s.shadowed), key=lambda s: (s.index, not s.exact))

    def shard_location(self, index: int) -> str:
        """Where piece ``index`` is (or should be)."""
        for s in self.shards:
            if s.index == index and not s.shadowed:
                return s.location
        return f"{self.location}/{shard_name(index)}"


@dataclass
class Inventory:
    """A split's own files as its format lays them out (see the module docstring)."""

    #: The split's metadata file (its name inside the split): where findings about the metadata point.
    metadata_file: str
    #: The metadata file's entry in the split's listing (``None``: absent), for the checks to read.
    metadata_entry: Entry | None = None
    layers: list[LayerEntry] = field(default_factory=list)
    strays: list[tuple[str, bool]] = field(default_factory=list)
    list_error: OSError | None = None

    def all_shards(self) -> list[ShardEntry]:
        return [s for layer in self.layers for s in layer.shards]

    def blocks(self, entry: ShardEntry) -> Iterable[np.ndarray]:  # pragma: no cover - overridden
        """The piece's rows as stored-dtype arrays of bounded size."""
        raise NotImplementedError
