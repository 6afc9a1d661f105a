"""Writing an HDF5 split (local files only): contiguous layers at their offsets, chunked ones as whole chunks."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from actfmt.errors import ConversionError
from actfmt.formats.base import (
    ACTFMT_KEY,
    ByteRun,
    LayerInfo,
    SplitSpec,
    StoredVectors,
    WriteOptions,
    Writer,
    check_write_chunks,
)
from actfmt.formats.dtypes import as_array, stored_dtype
from actfmt.formats.hdf5.codecs import Codec, deflate, import_hdf5plugin, shuffled
from actfmt.formats.hdf5.layout import (
    BF16_ENCODING,
    BLOCK_TARGET_BYTES,
    DIMENSION_NAMES,
    DTYPE_ATTR,
    ENCODING_ATTR,
    METADATA_ATTR,
    RESERVED_ATTRS,
    SHARD_ROWS_ATTR,
    attr_value,
    default_chunk_rows,
    from_attr,
)
from actfmt.formats.vectors import STATS_GROUP
from actfmt.layout import SUPPORTED_DTYPES, layer_index
from actfmt.storage import LocalLocation, Location

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import h5py
    import numpy as np


#: One lock per file a process writes contiguous rows into: the layer tasks of an uncompressed HDF5 split write at
#: their own offsets of one file, and the kernel lets one write into a file at a time (ext4's inode lock), making
#: the others spin for it.  Measured (seed split, 2 tasks): 2.6 -> 2.2 CPU-s for the conversion, the same wall
#: time.
_COPY_LOCKS: dict[str, threading.Lock] = {}
_COPY_LOCKS_GUARD = threading.Lock()


def _copy_lock(path: str) -> threading.Lock:
    with _COPY_LOCKS_GUARD:
        return _COPY_LOCKS.setdefault(path, threading.Lock())


def _fits(dset: Any, info: LayerInfo) -> bool:
    """Does an existing dataset have the shape and dtype layer ``info`` needs?"""
    return (
        dset is not None
        and getattr(dset, "shape", None) == (max(0, info.rows), info.hidden_dim)
        and dset.dtype == stored_dtype(info.dtype)
        and from_attr(dset.attrs.get(DTYPE_ATTR)) == info.dtype
    )


def _attach_scales(f: h5py.File, dset: h5py.Dataset) -> None:
    """Name the layer's dimensions ``example`` / ``hidden`` and attach the dimension scales of those names
    (int64 ``0 .. n-1``, made with the first layer): h5py's ``dset.dims``, ``h5dump`` and netCDF-4 readers
    (xarray's ``h5netcdf`` engine) then know which axis is which."""
    import numpy as np

    for axis, dim in enumerate(DIMENSION_NAMES):
        n = int(dset.shape[axis])
        scale = f.get(dim)
        if scale is None:
            scale = f.create_dataset(dim, data=np.arange(n, dtype="<i8"))
            scale.make_scale(dim)
        dset.dims[axis].label = dim
        if scale.shape == (n,):
            dset.dims[axis].attach_scale(scale)


def _detach_scales(dset: h5py.Dataset) -> None:
    """Detach a dataset from its scales before it is deleted (no dangling references left in the scales)."""
    for axis in range(dset.ndim):
        for scale in list(dset.dims[axis].values()):
            dset.dims[axis].detach_scale(scale)


class HDF5Writer(Writer):
    """Writes every layer of a split into one local HDF5 file.

    Uncompressed and without ``--chunk-rows``, datasets are *contiguous*, their space allocated when the file is
    created (nothing written: the file is sparse until filled), so each layer's bytes have a known offset: they
    are written there with ``pwrite`` (or ``os.copy_file_range`` from the source's raw bytes), by any number of
    threads or processes at once, and HDF5 itself only writes the metadata.  Otherwise the layers are chunked
    and whole chunks go through ``write_direct_chunk`` (gzip encoded on a thread pool), one writer at a time.
    """

    format = "hdf5"

    def __init__(self, location: Location, spec: SplitSpec, options: WriteOptions) -> None:
        if not location.is_local:
            raise ConversionError(
                f"{location}: the hdf5 writer writes local files only; write the file into a local "
                f"directory and upload it (actfmt convert does that for you)."
            )
        super().__init__(location, spec, options)
        self._file: h5py.File | None = None
        self._pool: Any = None
        self._pending: tuple[Any, list[int], list[Any]] | None = None  # (dataset, chunk rows, deflating)
        self._codecs: dict[int, Codec] = {}
        self._requested = Codec.resolve(options, location)
        self._offsets: dict[str, int] | None = None  # contiguous datasets: where each one's bytes start
        self._out: Any = None  # the file opened for positional writes

    @staticmethod
    def contiguous(options: WriteOptions) -> bool:
        """Are the layers written contiguous (uncompressed, no ``--chunk-rows``)?"""
        return (options.compression or "").lower() == "none" and not options.chunk_rows

    @property
    def local_path(self) -> Path:
        return self.location.local_path  # type: ignore[no-any-return]

    # pickling (a writer may be sent to a worker process): never ship the open h5py handle or the pool
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pool=None, _pending=None, _codecs={}, _out=None)
        return state

    def chunk_rows(self, layer: int) -> int:
        info = self.spec.layers[layer]
        if self.options.chunk_rows:
            return max(1, min(int(self.options.chunk_rows), max(1, info.rows)))
        return default_chunk_rows(info.rows, info.hidden_dim, info.itemsize)

    @classmethod
    def create(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> HDF5Writer:
        import h5py

        self = cls(location, spec, options)
        for info in spec.layers:
            if info.dtype not in SUPPORTED_DTYPES:
                raise ConversionError(
                    f"{location}: {info.name} has dtype {info.dtype}; hdf5 stores only "
                    f"{', '.join(SUPPORTED_DTYPES)} (use --dtype to cast)."
                )
        for pos, info in enumerate(spec.layers):
            if not cls.contiguous(options):
                check_write_chunks(f"{location}: {info.name}", self.chunk_rows(pos), info)
        if location.exists():
            raise ConversionError(f"{location}: already exists; the writer only creates new files.")
        location.parent.mkdir()
        try:
            with h5py.File(self.local_path, "w", track_order=True) as f:
                meta = {k: v for k, v in spec.metadata.items() if k not in RESERVED_ATTRS}
                for key, value in meta.items():
                    f.attrs[key] = attr_value(value)
                f.attrs[METADATA_ATTR] = json.dumps(meta, ensure_ascii=False, allow_nan=True)
                for pos in range(len(spec.layers)):
                    self._make_dataset(f, pos)
        except BaseException:
            location.delete()  # never leave a half-made file behind
            raise
        return self

    def _make_dataset(self, f: h5py.File, pos: int) -> None:
        """Create the dataset of layer position ``pos`` (empty: contiguous space allocated, or chunked)."""
        import h5py
        import numpy as np

        info = self.spec.layers[pos]
        rows = max(0, info.rows)
        if self.contiguous(self.options):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the offset is known now
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # nothing written until the data
            dset = f.create_dataset(
                info.name, shape=(rows, info.hidden_dim), dtype=stored_dtype(info.dtype), dcpl=dcpl
            )
        else:
            dset = f.create_dataset(
                info.name,
                shape=(rows, info.hidden_dim),
                maxshape=(None if rows == 0 else rows, info.hidden_dim),
                dtype=stored_dtype(info.dtype),
                chunks=(self.chunk_rows(pos), max(1, info.hidden_dim)),
                fillvalue=0,
                **self._requested.kwargs,
            )
        dset.attrs[DTYPE_ATTR] = info.dtype
        if info.dtype == "bfloat16":
            dset.attrs[ENCODING_ATTR] = BF16_ENCODING
        if info.shard_rows:
            dset.attrs[SHARD_ROWS_ATTR] = np.asarray(info.shard_rows, dtype=np.int64)
        _attach_scales(f, dset)

    @classmethod
    def open(cls, location: Location, spec: SplitSpec, options: WriteOptions) -> HDF5Writer:
        """A partial file, with every dataset that no longer has the source's shape or dtype made again, empty
        (``--resume`` after the source of a layer changed: that layer is converted again)."""
        import h5py

        self = cls(location, spec, options)
        if not os.path.exists(self.local_path):
            return self
        with h5py.File(self.local_path, "r") as f:
            stale = [pos for pos, info in enumerate(spec.layers) if not _fits(f.get(info.name), info)]
        if stale:
            with h5py.File(self.local_path, "r+") as f:
                for pos in stale:
                    name = spec.layers[pos].name
                    if name in f:
                        _detach_scales(f[name])
                        del f[name]
                    self._make_dataset(f, pos)
        return self

    # -- file handle ---------------------------------------------------------------------------------------
    def _f(self) -> h5py.File:
        if self._file is None:
            import h5py

            try:
                self._file = h5py.File(self.local_path, "r+")
            except FileNotFoundError:
                raise ConversionError(
                    f"{self.location}: not found; create() the file before writing."
                ) from None
        return self._file

    def _dataset(self, layer: int) -> tuple[h5py.Dataset, Codec]:
        info = self.spec.layers[layer]
        f = self._f()
        if info.name not in f:
            raise ConversionError(f"{self.location}: dataset {info.name} is missing; re-create the file.")
        dset = f[info.name]
        if layer not in self._codecs:
            self._codecs[layer] = Codec.of_dataset(dset)
            if "hdf5plugin" in self._codecs[layer].requires_plugins:
                import_hdf5plugin(self.location, f"{info.name} (compressed with a plugin filter)")
        return dset, self._codecs[layer]

    def block_rows(self, layer: int) -> list[int]:
        info = self.spec.layers[layer]
        if info.rows <= 0:
            return [0]
        chunk = self.chunk_rows(layer)
        chunk_bytes = chunk * info.hidden_dim * info.itemsize
        step = chunk * max(1, BLOCK_TARGET_BYTES // max(1, chunk_bytes))
        return [min(step, info.rows - s) for s in range(0, info.rows, step)]

    # -- writing -------------------------------------------------------------------------------------------
    def copies_raw(self, layer: int) -> bool:
        return self.contiguous(self.options)

    def write(self, layer: int, start: int, data: Any, runs: list[ByteRun] | None = None) -> None:
        """Write rows ``start ..`` of ``layer``: contiguous layers at their offset (from ``runs`` in the kernel
        when given), chunked ones chunk by chunk from ``data``."""
        import numpy as np

        info = self.spec.layers[layer]
        if data is None:  # a contiguous layer, from the source's bytes
            assert runs is not None and self.contiguous(self.options)
            self._write_at(layer, start, None, runs)
            return
        try:
            arr = as_array(data, info.dtype)
        except ValueError as exc:
            raise ConversionError(f"{self.location}: {info.name}: {exc}.") from None
        n = int(arr.shape[0]) if arr.ndim else 0
        if n == 0:
            return
        if arr.ndim != 2 or arr.shape[1] != info.hidden_dim:
            raise ConversionError(
                f"{self.location}: {info.name}: block of shape {tuple(arr.shape)} does not fit "
                f"[{info.rows}, {info.hidden_dim}]."
            )
        if start < 0 or start + n > info.rows:
            raise ConversionError(
                f"{self.location}: {info.name}: rows {start}..{start + n} outside 0..{info.rows}."
            )
        if self.contiguous(self.options):
            self._write_at(layer, start, arr, runs)
            return
        dset, codec = self._dataset(layer)
        chunk = int(dset.chunks[0])
        if not codec.direct or start % chunk:
            self._drain()
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        # whole chunks, written as stored (no HDF5 copy, no chunk cache); the last may be padded
        starts = range(start, start + n, chunk)
        pieces = [arr[s - start : min(s - start + chunk, n)] for s in starts]
        if pieces[-1].shape[0] != chunk and starts[-1] + pieces[-1].shape[0] != info.rows:
            # a block ending mid-chunk inside the layer: let HDF5 merge it
            self._drain()
            dset.write_direct(arr, dest_sel=np.s_[start : start + n])
            return
        if pieces[-1].shape[0] != chunk:
            pad = np.zeros((chunk, info.hidden_dim), dtype=arr.dtype)
            pad[: pieces[-1].shape[0]] = pieces[-1]
            pieces[-1] = pad
        if codec.name == "none":
            self._drain()
            for s, piece in zip(starts, pieces, strict=True):
                dset.id.write_direct_chunk((s, 0), piece)
            return
        # gzip: this block's chunks are deflated on the pool while the previous block's are written (and the
        # source's next block is read); the shuffled copies are made here, so the caller may reuse its buffer
        itemsize, shuffle, level = arr.dtype.itemsize, codec.shuffle, int(codec.level or 0)
        pool = self._executor()
        futures = [pool.submit(deflate, shuffled(p, itemsize, shuffle), level) for p in pieces]
        self._drain()
        self._pending = (dset, list(starts), futures)

    def _drain(self) -> None:
        """Write the chunks still being deflated (in order), waiting for them."""
        pending, self._pending = self._pending, None
        if pending is not None:
            dset, starts, futures = pending
            for s, fut in zip(starts, futures, strict=True):
                dset.id.write_direct_chunk((s, 0), fut.result())

    def _offset(self, layer: int) -> int:
        """Where the contiguous dataset of ``layer`` starts in the file (read once, with h5py, read-only)."""
        if self._offsets is None:
            import h5py

            with h5py.File(self.local_path, "r") as f:
                offsets = {name: f[name].id.get_offset() for name in f if layer_index(name) is not None}
            if any(v is None for v in offsets.values()):
                raise ConversionError(f"{self.location}: a dataset has no file space; re-create the file.")
            self._offsets = {k: int(v) for k, v in offsets.items()}
        name = self.spec.layers[layer].name
        if name not in self._offsets:
            raise ConversionError(f"{self.location}: dataset {name} is missing; re-create the file.")
        return self._offsets[name]

    def _write_at(self, layer: int, start: int, arr: np.ndarray | None, runs: list[ByteRun] | None) -> None:
        """Rows of a contiguous dataset, written at their offset in the file (never through HDF5)."""
        at = self._offset(layer) + start * self.spec.layers[layer].row_bytes
        if self._out is None:
            assert isinstance(self.location, LocalLocation)  # (the constructor refuses others)
            self._out = self.location.open_update()
        with _copy_lock(str(self.local_path)):
            if runs is not None:
                for loc, off, n in runs:
                    self._out.copy_range(loc, off, n, at=at)
                    at += n
            else:
                assert arr is not None
                self._out.pwrite(arr, at)

    def _executor(self) -> Any:
        if self._pool is None:
            workers = int(self.options.extra.get("threads") or min(4, os.cpu_count() or 1))
            self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="actfmt-h5")
        return self._pool

    def finish_layer(self, layer: int) -> None:
        self._drain()
        # make everything so far durable in the file's own metadata: a killed run resumes layer by layer
        if self._file is not None:
            self._file.flush()
        if self._out is not None:
            self._out.close()
            self._out = None

    def write_stats(self, vectors: StoredVectors) -> None:
        """The vectors as datasets of the group ``actfmt_stats`` (``mean``, ``std``, ``mean_f64``), with the rows'
        layer names as the group's JSON attribute ``layers``."""
        f = self._f()
        if STATS_GROUP in f:
            del f[STATS_GROUP]
        group = f.create_group(STATS_GROUP)
        group.attrs["layers"] = json.dumps(vectors.layers)
        for name, arr in vectors.arrays.items():
            group.create_dataset(name, data=arr)

    def finalize(self, block: dict[str, Any]) -> None:
        f = self._f()
        plugins: list[str] = []
        for pos, info in enumerate(self.spec.layers):
            if info.name in f:
                _, codec = self._dataset(pos)
                plugins += [p for p in codec.requires_plugins if p not in plugins]
        out = dict(block)
        out["requires_plugins"] = plugins
        f.attrs[ACTFMT_KEY] = json.dumps(out, ensure_ascii=False)
        f.flush()
        self.close()

    def close(self) -> None:
        # chunks still being deflated are written if they can be (what was written stays written); an error
        # here is left to the error that stopped the run, if any: the layer was not finished, a resume redoes it
        try:
            self._drain()
        except Exception:
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._out is not None:
            self._out.close()
            self._out = None
        self._codecs.clear()
