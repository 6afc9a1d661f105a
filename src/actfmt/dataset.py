"""One read-only view over a split in any format: :func:`open` -> :class:`Split` -> :class:`LayerView`.

>>> with actfmt.open("Activations/org_Model/SP_data/EM") as split:   # doctest: +SKIP
...     x = split.layer(15)[:]                 # a whole layer, [num_examples, hidden_dim]
...     rows = split.layer(15)[[3, 1, 3]]      # any rows, any order, repeats allowed
...     for batch in split.layer(15).iter_batches(256, shuffle=True, seed=0): ...
...     e = split.example(42)                  # [num_layers, hidden_dim]
...     split.layer(15).stats().scale_factor  # figures kept by `actfmt convert`, else one pass
...     mu, sigma = split.layer(15).mean(), split.layer(15).std()

Rows come back as torch tensors in the stored dtype (bfloat16 restored).  Reads are memory-mapped where the
format allows; nothing loads a whole shard to return a few rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from actfmt._dask import layer_to_dask
from actfmt.errors import ActfmtError, NotASplitError
from actfmt.formats import find_splits, open_reader
from actfmt.formats.base import LayerInfo, Reader, StoredVectors
from actfmt.formats.dtypes import to_torch, torch_dtype
from actfmt.moments import LayerStats, Moments, layer_moments
from actfmt.statistics import stored_layer_stats
from actfmt.storage import Location, PathLike, resolve

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["LayerView", "Split", "open", "open_tree"]


class LayerView:
    """One layer of a split: ``len``, ``shape``, ``dtype``, indexing, batches."""

    def __init__(self, reader: Reader, pos: int, cache: dict[str, Any] | None = None) -> None:
        self._reader = reader
        self._pos = pos
        self._cache = cache if cache is not None else {}  # the split's: statistics computed once
        self.info: LayerInfo = reader.layers[pos]
        #: ``layer_03``, 3, ``(rows, hidden_dim)``
        self.name, self.index, self.shape = (
            self.info.name,
            self.info.index,
            (self.info.rows, self.info.hidden_dim),
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.info.dtype)

    def __len__(self) -> int:
        return self.info.rows

    def __repr__(self) -> str:
        return (
            f"<LayerView {self.name} shape={self.shape} dtype={self.info.dtype} format={self._reader.format}>"
        )

    def read(self) -> torch.Tensor:
        """The whole layer as one tensor (it must fit in memory)."""
        return self._reader.read(self._pos, 0, self.info.rows)

    def __getitem__(self, key: Any) -> torch.Tensor:
        import numpy as np
        import torch

        n = self.info.rows
        if isinstance(key, tuple):
            rows, cols = key[0], key[1:]
            out = self[rows]
            return out[(slice(None), *cols)] if cols else out
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {self.name} with {n} rows")
            i %= n
            return self._reader.read(self._pos, i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._reader.read(self._pos, start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        if isinstance(key, torch.Tensor):
            if key.dtype == torch.bool:
                key = torch.nonzero(key).flatten()
            key = key.cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {n} rows")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"cannot index rows with {type(key).__name__} of dtype {idx.dtype}")
        return self._take(idx)

    def _take(self, idx: Any) -> torch.Tensor:
        import numpy as np

        n = self.info.rows
        flat = np.asarray(idx, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row index out of range for {self.name} with {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = self._reader.take(self._pos, flat)
        return out.reshape(*np.shape(idx), self.info.hidden_dim)

    def iter_batches(
        self, batch_size: int, shuffle: bool = False, seed: int | None = None, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Batches of rows, in order or shuffled (reproducibly with ``seed``)."""
        import numpy as np

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = self.info.rows
        if not shuffle:
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                if drop_last and stop - start < batch_size:
                    return
                yield self._reader.read(self._pos, start, stop)
            return
        perm = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, batch_size):
            ids = perm[start : start + batch_size]
            if drop_last and ids.size < batch_size:
                return
            yield self._reader.take(self._pos, ids)

    # -- statistics ----------------------------------------------------------------------------------------
    def _moments(self) -> Moments:
        key = f"moments:{self._pos}"
        if key not in self._cache:
            self._cache[key] = layer_moments(self._reader, self._pos)
        m: Moments = self._cache[key]
        return m

    def _stored(self, recompute: bool) -> tuple[LayerStats | None, StoredVectors | None]:
        if recompute:
            return None, None
        if "stored" not in self._cache:
            self._cache["stored"] = (stored_layer_stats(self._reader), self._reader.stored_vectors())
        figures, vectors = self._cache["stored"]
        return figures.get(self.name), vectors

    def stats(self, recompute: bool = False) -> LayerStats:
        """The layer's figures (as ``actfmt stats`` shows them): kept by ``actfmt convert``, or computed with one
        pass over the values (once per open split; ``recompute`` forces it)."""
        stored, _ = self._stored(recompute)
        if stored is not None:
            return stored
        return LayerStats.from_summary(self.name, self.index, self._moments().summary())

    def mean(self, recompute: bool = False) -> torch.Tensor:
        """The per-dimension mean, ``[hidden_dim]`` float32 (kept by ``actfmt convert``, else computed)."""
        return self._vector("mean", recompute)

    def std(self, recompute: bool = False) -> torch.Tensor:
        """The per-dimension population standard deviation, ``[hidden_dim]`` float32."""
        return self._vector("std", recompute)

    def _vector(self, name: str, recompute: bool) -> torch.Tensor:
        import numpy as np
        import torch

        _, vectors = self._stored(recompute)
        row = vectors.row(name, self.name) if vectors is not None else None
        if row is None:
            m = self._moments()
            row = m.mean if name == "mean" else np.sqrt(m.variance)
        return torch.from_numpy(np.array(row, dtype=np.float32))

    def to_dask(self, chunk_rows: int | None = None, dtype: Any = None) -> Any:
        """A lazy dask array over this layer (needs ``dask``); picklable, so it computes on a cluster too.

        ``dtype=None``: the stored numpy dtype (bfloat16 comes as its uint16 bits: numpy has no bfloat16);
        ``dtype="float32"``: upcast lazily and exactly.  See :func:`actfmt._dask.layer_to_dask`.
        """
        return layer_to_dask(self._reader, self._pos, chunk_rows, dtype)


class Split:
    """One split in any format.  Use as a context manager, or call :meth:`close`."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self._by_index = {li.index: pos for pos, li in enumerate(reader.layers)}
        self._cache: dict[str, Any] = {}
        #: Where the split is (``str()`` gives its path or URL) and its format's name.
        self.path: Location = reader.location
        self.format: str = reader.format

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._reader.metadata)

    @property
    def layers(self) -> list[int]:
        """The layer indices present, in order."""
        return [li.index for li in self._reader.layers]

    @property
    def num_layers(self) -> int:
        return len(self._by_index)

    @property
    def num_examples(self) -> int:
        ls = self._reader.layers
        return ls[0].rows if ls else int(self._reader.metadata.get("total_examples", 0))

    @property
    def hidden_dim(self) -> int:
        ls = self._reader.layers
        return ls[0].hidden_dim if ls else int(self._reader.metadata.get("hidden_dim", 0))

    @property
    def dtype(self) -> torch.dtype:
        ls = self._reader.layers
        if not ls:
            raise NotASplitError(f"{self.path}: the split has no layers.")
        return torch_dtype(ls[0].dtype)

    def layer(self, index: int) -> LayerView:
        """The layer ``layer_{index:02d}`` (negative indices count from the last layer)."""
        if index < 0:
            index = self.layers[index] if -len(self.layers) <= index else index
        try:
            return LayerView(self._reader, self._by_index[index], self._cache)
        except KeyError:
            raise IndexError(
                f"{self.path}: no layer {index}; the split has layers {self.layers[0]}..{self.layers[-1]}"
                if self.layers
                else f"{self.path}: the split has no layers"
            ) from None

    def example(self, i: int) -> torch.Tensor:
        """Row ``i`` of every layer, stacked: ``[num_layers, hidden_dim]`` (one batch of reads)."""
        import torch

        n = self.num_examples
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        i %= n
        rows = self._reader.example_arrays(i)
        return torch.cat([to_torch(r, li.dtype) for r, li in zip(rows, self._reader.layers, strict=True)])

    def to_xarray(self, dtype: Any = None, chunk_rows: int | None = None, lazy: bool | None = None) -> Any:
        """The split as an ``xarray.Dataset`` (needs ``xarray``): one variable per layer, ``layer_00`` ... in
        layer order, dimensions ``example`` / ``hidden`` with integer coordinates, the split's metadata as
        attributes and each variable's stored dtype as its attribute ``actfmt_dtype``.

        ``dtype=None``: float16 and float32 as stored, **bfloat16 as float32** (exact: every bfloat16 value is a
        float32; numpy has no bfloat16 of its own, and sums in ``ml_dtypes.bfloat16`` would round at every
        step); ``dtype="float32"``: every layer as float32.  ``lazy=None``: dask arrays (rows read when
        computed, ``chunk_rows`` as in :meth:`LayerView.to_dask`) when dask is installed, else the layers read
        into memory; ``lazy=True`` requires dask, ``lazy=False`` reads now."""
        import numpy as np

        try:
            import xarray as xr
        except ImportError as exc:
            raise ActfmtError(f"to_xarray() needs xarray ({exc}); pip install xarray.") from None
        if dtype is not None and np.dtype(dtype) != np.float32:
            raise ValueError(f"to_xarray(dtype={dtype!r}): choose None (natural) or 'float32'.")
        if lazy is None:
            try:
                import dask.array  # noqa: F401
            except ImportError:
                lazy = False
            else:
                lazy = True
        data_vars: dict[str, Any] = {}
        for index in self.layers:
            view = self.layer(index)
            want = "float32" if dtype is not None or view.info.dtype == "bfloat16" else None
            if lazy:
                arr: Any = view.to_dask(chunk_rows, dtype=want)
            else:
                t = view.read()
                arr = (t.float() if want else t).numpy()
            data_vars[view.name] = (("example", "hidden"), arr, {"actfmt_dtype": view.info.dtype})
        coords = {
            "example": np.arange(self.num_examples, dtype=np.int64),
            "hidden": np.arange(self.hidden_dim, dtype=np.int64),
        }
        return xr.Dataset(data_vars, coords=coords, attrs=self.metadata)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"<Split {self.path} format={self.format} layers={self.num_layers} "
            f"examples={self.num_examples} hidden_dim={self.hidden_dim}>"
        )

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Split:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: PathLike, format: str | None = None, storage_options: dict[str, Any] | None = None) -> Split:
    """Open one split in any format (``.pt`` directory, ``.zarr``, ``.h5``, safetensors directory).

    ``path`` may be an fsspec URL (``s3://bucket/.../EM``, ``memory://...``) of a split in any format, with
    ``storage_options`` for its filesystem (credentials, ``endpoint_url``); rows are then read with ranged
    requests (a few rows never fetch a whole shard or an uncompressed chunk)."""
    reader = open_reader(path, format, storage_options)
    try:
        return Split(reader)
    except BaseException:  # a store whose layers cannot be read: its open file is not left behind
        reader.close()
        raise


def open_tree(
    root: PathLike, storage_options: dict[str, Any] | None = None
) -> dict[tuple[str, str, str], Split]:
    """Every split under ``root`` (a directory or an fsspec URL), keyed by ``(model_name, dataset_name,
    split)`` from its metadata."""
    out: dict[tuple[str, str, str], Split] = {}
    for loc, fmt in find_splits(resolve(root, storage_options)):
        s = Split(open_reader(loc, fmt))
        meta = s.metadata
        key = (
            str(meta.get("model_name", loc.parent.parent.name)),
            str(meta.get("dataset_name", loc.parent.name)),
            str(meta.get("split", loc.stem)),
        )
        out[key] = s
    return out


def as_locations(splits: Sequence[Any]) -> list[Location]:
    """Splits, paths or URLs as locations (picklable, with their storage options)."""
    return [s.path if isinstance(s, Split) else resolve(s) for s in splits]
