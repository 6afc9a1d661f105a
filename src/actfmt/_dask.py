"""Dask integration for reading: lazy dask arrays over layers (``LayerView.to_dask()``).

Needs the ``dask`` extra (``pip install 'actfmt[dask]'``); imported only when used.  (Conversion on a dask
cluster, ``--executor dask``, is :mod:`actfmt.conversion.executors`.)

:func:`layer_to_dask` gives a lazy ``[rows, hidden_dim]`` dask array whose blocks are read by picklable tasks
that open the split themselves (its location, local or remote, travels with its storage options; no handle is
captured), so it computes on the threaded scheduler or on a distributed cluster alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actfmt.errors import ActfmtError
from actfmt.formats import shared_reader
from actfmt.formats.base import Reader
from actfmt.formats.dtypes import stored_dtype
from actfmt.storage import Location

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["TARGET_CHUNK_BYTES", "layer_to_dask"]

#: Default size of a ``to_dask`` block (rounded to whole chunks or shards of the store).
TARGET_CHUNK_BYTES = 64 * 1024 * 1024

_INSTALL_HINT = "install the dask extra: pip install 'actfmt[dask]'"


# ----------------------------------------------------------------------------------------------------------
# lazy arrays


@dataclass(frozen=True)
class _LayerSource:
    """Array-like over one stored layer for ``da.from_array``: picklable, opens the split per process."""

    location: Location
    format: str
    pos: int
    name: str
    rows: int
    hidden_dim: int
    stored: str  # torch dtype name: float16 / bfloat16 / float32
    fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.hidden_dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return stored_dtype(self.stored)

    def __dask_tokenize__(self) -> Any:
        return (
            type(self).__name__,
            str(self.location),
            self.format,
            self.pos,
            self.name,
            self.shape,
            self.stored,
            self.fingerprint,
        )

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the stored numpy dtype, as an array of its own."""
        return shared_reader(self.location, self.format).read_array(self.pos, start, max(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return shared_reader(self.location, self.format).take_array(self.pos, rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1 :]
        rows, cols = (key + (slice(None),) * 2)[:2]
        if len(key) > 2:
            raise IndexError(f"too many indices for a 2-D layer: {key!r}")
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.rows)
            out = self.read_rows(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        elif isinstance(rows, (int, np.integer)):
            i = int(rows) + (self.rows if rows < 0 else 0)
            if not 0 <= i < self.rows:
                raise IndexError(f"row {rows} out of range for {self.name} with {self.rows} rows")
            out = self.read_rows(i, i + 1)[0]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = np.where(idx < 0, idx + self.rows, idx)
            out = self.take(idx.reshape(-1)).reshape(*idx.shape, self.hidden_dim)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        return out[..., cols]  # type: ignore[no-any-return]


def _bf16_bits_to_float32(block: np.ndarray) -> np.ndarray:
    import numpy as np

    return (block.astype(np.uint32) << np.uint32(16)).view(np.float32)  # exact: bf16 is float32's top half


def _to_float32(block: np.ndarray) -> np.ndarray:
    import numpy as np

    return block.astype(np.float32)


def _group_rows(units: list[int], target_rows: int) -> list[int]:
    """Consecutive ``units`` (chunks or shards, in rows) grouped into blocks of about ``target_rows``."""
    out: list[int] = []
    acc = 0
    for n in units:
        if acc and acc + n > target_rows:
            out.append(acc)
            acc = 0
        acc += n
    if acc or not out:
        out.append(acc)
    return out


def layer_to_dask(reader: Reader, pos: int, chunk_rows: int | None = None, dtype: Any = None) -> Any:
    """A lazy dask array ``[rows, hidden_dim]`` over layer position ``pos`` of an open split.

    Blocks are ``chunk_rows`` rows (default: about 64 MiB), rounded to whole shards (pt, safetensors from pt)
    or whole stored chunks (zarr, hdf5) when ``chunk_rows`` is not given.  ``dtype``: ``None`` gives the stored
    numpy dtype: float16 and float32 as such, **bfloat16 as its uint16 bits** (numpy has no bfloat16;
    ``torch.from_numpy(x).view(torch.bfloat16)`` restores it exactly); ``"float32"`` upcasts lazily and exactly.
    """
    try:
        import dask.array as da
        import numpy as np
        from dask.base import tokenize
    except ImportError as exc:
        raise ActfmtError(f"to_dask() needs dask ({exc}); {_INSTALL_HINT}.") from None

    info = reader.layers[pos]
    stored = stored_dtype(info.dtype)
    want = stored if dtype is None else np.dtype(dtype)
    if want not in (stored, np.dtype(np.float32)):
        raise ValueError(
            f"to_dask(dtype={dtype!r}): {info.name} is {info.dtype}; choose None (stored: {stored}) or 'float32'."
        )
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"to_dask(chunk_rows={chunk_rows}): must be at least 1.")
    target = int(chunk_rows) if chunk_rows else max(1, TARGET_CHUNK_BYTES // max(1, info.row_bytes))
    unit = reader.chunk_rows_of(pos)
    if reader.format == "pt" and info.shard_rows:  # whole shards: a block reads the shards it covers
        blocks = _group_rows(list(info.shard_rows), target)
    elif chunk_rows:
        blocks = [min(target, info.rows - s) for s in range(0, info.rows, target)] or [0]
    else:  # whole chunks
        step = target if unit is None else max(1, target // unit) * unit
        blocks = [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]
    src = _LayerSource(
        reader.location,
        reader.format,
        pos,
        info.name,
        info.rows,
        info.hidden_dim,
        info.dtype,
        reader.fingerprint(pos),
    )
    name = f"actfmt-{info.name}-{tokenize(src, tuple(blocks))}"
    arr = da.from_array(
        src,
        chunks=(tuple(blocks), (info.hidden_dim,)),
        name=name,
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0), dtype=stored),
    )
    if want == stored:
        return arr
    fn = _bf16_bits_to_float32 if info.dtype == "bfloat16" else _to_float32
    return arr.map_blocks(fn, dtype=np.float32)
