"""The Format protocol: every storage format is one module with a Reader and a Writer.

A *split* is ``num_layers`` 2-D arrays ``[total_examples, hidden_dim]`` plus the producer's metadata.  Readers
expose it row-wise as torch tensors (bfloat16 restored); writers receive row blocks.  Shared logic (planning,
checksums, atomic rename, locking, resume, verification) lives in :mod:`actfmt.convert`, never here.

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = [
    "ACTFMT_KEY",
    "Format",
    "LayerInfo",
    "Reader",
    "SplitSpec",
    "WriteOptions",
    "Writer",
    "numpy_dtype",
    "storage_numpy_dtype",
    "tensor_bytes",
    "torch_dtype",
]

#: Name of the actfmt block in a store's attributes / metadata.
ACTFMT_KEY = "actfmt"


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def storage_numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a format stores ``name`` as: bfloat16 is kept as its uint16 bits."""
    import numpy as np

    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


numpy_dtype = storage_numpy_dtype


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (one copy only if it is not contiguous; bf16 via int16)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a split as stored: name, shape, dtype and (for sharded formats) row counts per shard."""

    name: str
    index: int
    rows: int
    hidden_dim: int
    dtype: str  # torch spelling: "float16", "bfloat16", "float32"
    shard_rows: tuple[int, ...] | None = None

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def nbytes(self) -> int:
        return self.rows * self.hidden_dim * self.itemsize


@dataclass
class SplitSpec:
    """What a writer is asked to create: the split's metadata (verbatim) and its layers."""

    metadata: dict[str, Any]
    layers: list[LayerInfo]
    source_format: str = "pt"


@dataclass
class WriteOptions:
    """Format-neutral writer options; each format uses what applies and rejects what it cannot honour."""

    chunk_rows: int | None = None
    compression: str | None = None  # None = the format's default; "none" = uncompressed
    level: int | None = None
    zarr_format: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


class Reader(abc.ABC):
    """Read-only access to one split in one format.  Use as a context manager."""

    format: ClassVar[str]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- description ---------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The producer's metadata keys, verbatim (without the actfmt block)."""

    @property
    def actfmt(self) -> dict[str, Any] | None:
        """The actfmt block written by a conversion, or ``None`` (e.g. a producer's ``.pt`` tree)."""
        return None

    @property
    @abc.abstractmethod
    def layers(self) -> Sequence[LayerInfo]:
        """The layers present, sorted by index."""

    # -- data ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of layer *position* ``layer`` as a contiguous tensor in its real dtype."""

    def take(self, layer: int, rows: np.ndarray) -> torch.Tensor:
        """Rows at the given (sorted or not, repeated or not) indices, in the given order."""
        import numpy as np
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        info = self.layers[layer]
        if rows.size == 0:
            return torch.empty((0, info.hidden_dim), dtype=torch_dtype(info.dtype))
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        out = torch.empty((rows.size, info.hidden_dim), dtype=torch_dtype(info.dtype))
        # group sorted ids into runs of consecutive rows and read each run once
        breaks = np.flatnonzero(np.diff(srt) > 1) + 1
        for run in np.split(np.arange(srt.size), breaks):
            lo, hi = int(srt[run[0]]), int(srt[run[-1]]) + 1
            block = self.read(layer, lo, hi)
            out[torch.from_numpy(order[run])] = block[torch.from_numpy(srt[run] - lo)]
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Writer(abc.ABC):
    """Writes one split into a (temporary) path.  ``convert`` handles atomicity, locking and checksums.

    Life cycle: ``create`` once (makes every array / file, in the parent process), then ``open`` in each
    process that writes, ``write`` row blocks (each inside one layer, aligned to ``block_rows``), ``close``,
    and finally ``finalize`` once with the actfmt block (written last: the completeness mark).
    """

    format: ClassVar[str]
    #: May different processes write different layers of one split at the same time?
    parallel_layers: ClassVar[bool] = True

    def __init__(self, path: str | Path, spec: SplitSpec, options: WriteOptions) -> None:
        self.path = Path(path)
        self.spec = spec
        self.options = options

    @classmethod
    @abc.abstractmethod
    def create(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> Writer:
        """Create the empty store at ``path`` (which does not exist yet) and return a writer on it."""

    @classmethod
    def open(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> Writer:
        """Open an existing (partial) store for writing more layers."""
        return cls(path, spec, options)

    def block_rows(self, layer: int) -> list[int]:
        """Row counts of the blocks ``write`` wants for ``layer``, in order (chunks, shards, ...)."""
        info = self.spec.layers[layer]
        step = self.options.chunk_rows or info.rows or 1
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    @abc.abstractmethod
    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        """Write ``data`` (rows ``start .. start+len(data)`` of ``layer``) in its real dtype."""

    def finish_layer(self, layer: int) -> None:  # noqa: B027 - optional hook
        """Called once every block of ``layer`` is written (flush, close a per-layer file...)."""

    @abc.abstractmethod
    def finalize(self, block: dict[str, Any]) -> None:
        """Write the actfmt block (with ``complete: true``) last."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""


class Format(abc.ABC):
    """A storage format: a name, how its splits are recognised, its Reader and Writer classes."""

    name: ClassVar[str]
    #: What a split's path ends with (``.zarr``, ``.h5``) or ``""`` for a plain directory.
    suffix: ClassVar[str]
    #: Compression names this format accepts; the first is the default.
    compressions: ClassVar[tuple[str, ...]] = ("none",)

    @classmethod
    @abc.abstractmethod
    def can_open(cls, path: Path) -> bool:
        """Is ``path`` a split of this format?  Cheap: looks at names and a few bytes only."""

    @classmethod
    @abc.abstractmethod
    def open_reader(cls, path: str | Path) -> Reader: ...

    @classmethod
    @abc.abstractmethod
    def writer_class(cls) -> type[Writer]: ...

    @classmethod
    def destination(cls, split_dir: Path) -> Path:
        """The path a split named ``split_dir.name`` gets in this format (``EM`` -> ``EM.zarr``)."""
        name = split_dir.name
        for other in (".zarr", ".h5", ".hdf5"):
            name = name.removesuffix(other)
        return split_dir.with_name(name + cls.suffix)
