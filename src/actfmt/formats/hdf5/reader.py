"""Reading an HDF5 split, locally or from object storage: raw layers by byte offset, gzip ones inflated by
actfmt, others through h5py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from actfmt.errors import BadHeaderError, ExternalDataError, FormatError, MetadataError, NotASplitError
from actfmt.formats.base import (
    ACTFMT_KEY,
    MAX_SHOWN_MISSING,
    VECTOR_NAMES,
    ByteRun,
    LayerInfo,
    MissingChunks,
    Reader,
    StoredVectors,
    check_chunk_grid,
    check_shard_rows,
    stored_vectors_of,
)
from actfmt.formats.dtypes import scratch, stored_dtype
from actfmt.formats.hdf5.codecs import (
    H5Z_DEFLATE,
    H5Z_SHUFFLE,
    first_line,
    guard_inflation,
    import_hdf5plugin,
    inflate_chunk,
    plugin_hint,
    unshuffle,
)
from actfmt.formats.hdf5.layout import (
    DTYPE_ATTR,
    METADATA_ATTR,
    OPEN_DATASETS,
    READ_CACHE_BYTES,
    READ_CACHE_SLOTS,
    RESERVED_ATTRS,
    SHARD_ROWS_ATTR,
    from_attr,
    json_attr,
)
from actfmt.formats.rowstore import RowStore, Segment, row_across
from actfmt.formats.vectors import STATS_GROUP
from actfmt.layout import SUPPORTED_DTYPES, layer_index
from actfmt.storage import Kind, Location, read_pool

if TYPE_CHECKING:  # pragma: no cover
    import h5py
    import numpy as np


class HDF5Reader(Reader):
    """A split stored as one HDF5 file, on any storage (see the module docstring).

    Picklable: the open file is never shipped; the row stores (byte offsets of raw layers) are, so a worker
    reads an uncompressed layer without opening the file with h5py.
    """

    format = "hdf5"

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        try:
            st = location.stat()
        except FileNotFoundError:
            st = None
        if st is None or st.kind != Kind.FILE:
            raise NotASplitError(f"{location}: no such file; an hdf5 split is one .h5 file.")
        #: Where raw rows are read from: the file as it was when opened (a rewrite is a ChangedError).
        self._pinned = location.pinned(st.identity) if st.identity else location
        self._file: h5py.File | None = None
        self._fh: IO[bytes] | None = None
        self._dsets: dict[int, h5py.Dataset] = {}
        self._stores: dict[int, RowStore | None] = {}
        self._deflate: dict[int, tuple[int, int] | None] = {}
        self._infos: dict[int, LayerInfo] = {}
        self._links_checked = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _fh=None, _dsets={})
        return state

    @property
    def file(self) -> h5py.File:
        """The open h5py File (read-only)."""
        if self._file is None:
            import h5py

            # a storage error opening the object (missing, access denied) propagates as is, naming it
            fh = None if self.location.is_local else self.location.open_input()
            try:
                # locally, h5py opens the path itself: the resolved path, checked to stay inside the tree
                self._file = h5py.File(self.location.checked_path() if fh is None else fh, "r")
            except OSError as exc:
                if fh is not None:
                    fh.close()
                raise FormatError(
                    f"{self.location}: cannot be opened as HDF5 ({first_line(exc)}); the file is damaged or "
                    f"still being written: re-create it."
                ) from None
            self._fh = fh
            block = self._block()
            if block and "hdf5plugin" in (block.get("requires_plugins") or []):
                import_hdf5plugin(self.location, "this file (compressed with a plugin codec)")
        return self._file

    def _block(self) -> dict[str, Any] | None:
        f = self._file
        if f is None or ACTFMT_KEY not in f.attrs:
            return None
        try:
            data = json_attr(f.attrs[ACTFMT_KEY])
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @cached_property
    def metadata(self) -> dict[str, Any]:
        attrs = self.file.attrs
        if METADATA_ATTR in attrs:
            try:
                data = json_attr(attrs[METADATA_ATTR])
            except (TypeError, ValueError, UnicodeDecodeError) as exc:
                raise MetadataError(
                    f"{self.location}: attribute {METADATA_ATTR} is not valid JSON ({exc})."
                ) from None
            if not isinstance(data, dict):
                raise MetadataError(f"{self.location}: attribute {METADATA_ATTR} must hold a JSON object.")
            return data
        return {k: from_attr(attrs[k]) for k in attrs if k not in RESERVED_ATTRS}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        self.file  # noqa: B018 - opens it
        return self._block()

    def stored_vectors(self) -> StoredVectors | None:
        import numpy as np

        if self._link(self.file, STATS_GROUP) is None:
            return None
        group = self.file[STATS_GROUP]
        if not hasattr(group, "attrs"):
            return None
        arrays = {}
        for n in VECTOR_NAMES:
            if self._link(group, n) is None:
                continue
            dset = group[n]
            if not hasattr(dset, "id"):
                continue
            self._check_storage(dset, f"{STATS_GROUP}/{n}")
            if dset.size * dset.dtype.itemsize > 1 << 28:
                raise BadHeaderError(
                    f"{self.location}: {STATS_GROUP}/{n} declares shape {dset.shape}; refused."
                )
            arrays[n] = np.asarray(dset[()])
        return stored_vectors_of(arrays, from_attr(group.attrs.get("layers", "null")))

    def _link(self, group: Any, name: str) -> Any:
        """The hard link ``name`` in ``group`` (``None`` when there is none); an external link is an
        :class:`~actfmt.errors.ExternalDataError` and a soft link (which may loop) a
        :class:`~actfmt.errors.BadHeaderError`, both refused without being followed."""
        import h5py

        link = group.get(name, getlink=True)
        if link is None or isinstance(link, h5py.HardLink):
            return link
        where = f"{group.name.rstrip('/')}/{name}".lstrip("/")
        if isinstance(link, h5py.ExternalLink):
            raise ExternalDataError(
                f"{self.location}: {where} is an external link to {link.filename!r}:{link.path}; data outside "
                f"the file is refused, never read: re-create the file with the data inside it."
            )
        target = getattr(link, "path", "?")
        raise BadHeaderError(
            f"{self.location}: {where} is a soft link (to {target}); actfmt writes none and does not follow "
            f"them (one may loop): re-create the file."
        )

    def _check_storage(self, dset: Any, name: str) -> None:
        """Refuse a dataset whose data lives outside the file (external raw-data files, a virtual layout),
        from its creation property list: detected before any read (a relative external file resolves against
        the current directory, and a FIFO there would hang the read)."""
        import h5py

        plist = dset.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            raise ExternalDataError(
                f"{self.location}: {name} is a virtual dataset (its data is mapped from other files); refused, "
                f"never read: re-create the file with the data inside it."
            )
        if plist.get_external_count() > 0:
            files = [plist.get_external(k)[0] for k in range(min(3, plist.get_external_count()))]
            raise ExternalDataError(
                f"{self.location}: {name} stores its data in external files ({', '.join(map(repr, files))}); "
                f"refused, never read: re-create the file with the data inside it."
            )

    @cached_property
    def _names(self) -> list[tuple[int, str]]:
        out = []
        f = self.file
        for name in f:
            i = layer_index(name)
            if i is None or self._link(f, name) is None:
                continue
            if getattr(f[name], "ndim", None) is not None:
                out.append((i, name))
        return sorted(out)

    def _check_stats_links(self) -> None:
        """The statistics group and its vectors are hard links to data inside the file (checked with the
        layers, so a header-only validation reports an external or soft link there too)."""
        import h5py

        if self._link(self.file, STATS_GROUP) is None:
            return
        group = self.file[STATS_GROUP]
        if isinstance(group, h5py.Group):
            for n in VECTOR_NAMES:
                if self._link(group, n) is not None and hasattr(group[n], "id"):
                    self._check_storage(group[n], f"{STATS_GROUP}/{n}")

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        return [self.layer_info(pos) for pos in range(len(self._names))]

    def layer_info(self, layer: int) -> LayerInfo:
        """One layer, described from its dataset alone (a conversion's verification of one layer opens the file
        and looks at nothing else: 28 datasets cost 22 ms an open)."""
        info = self._infos.get(layer)
        if info is not None:
            return info
        if not self._links_checked:
            self._check_stats_links()
            self._links_checked = True
        i, name = self._names[layer]
        dset = self._dataset(layer)
        if dset.ndim != 2:
            raise FormatError(f"{self.location}: dataset {name} must be 2-D, got shape {dset.shape}.")
        self._check_sizes(dset, name)
        rows = int(dset.shape[0])
        info = LayerInfo(
            name=name,
            index=i,
            rows=rows,
            hidden_dim=int(dset.shape[1]),
            dtype=self._dtype_name(dset, name),
            shard_rows=check_shard_rows(f"{self.location}: {name}", dset.attrs.get(SHARD_ROWS_ATTR), rows),
        )
        self._infos[layer] = info
        return info

    def position(self, name: str) -> int | None:
        for pos, (_, have) in enumerate(self._names):
            if have == name:
                self.layer_info(pos)  # its checks, as the list of layers would make them
                return pos
        return None

    def _check_sizes(self, dset: Any, name: str) -> None:
        """The declared shape and chunks, against sane bounds and the file's size, before any per-chunk loop:
        a contiguous layer's raw bytes must lie in the file; a chunked one is bounded in chunk count and size."""
        where = f"{self.location}: {name}"
        shape = tuple(int(n) for n in dset.shape)
        itemsize = int(dset.dtype.itemsize)
        if dset.chunks is None:
            try:
                size = self.location.size()
            except OSError:
                size = None
            check_chunk_grid(where, shape, (max(1, shape[0]), max(1, shape[1])), 0)
            if size is not None and shape[0] * shape[1] * itemsize > size:
                raise BadHeaderError(
                    f"{where}: declares shape {list(shape)} ({shape[0] * shape[1] * itemsize} bytes, stored "
                    f"contiguous) in a file of {size} bytes: the file is damaged or crafted: re-create it."
                )
        else:
            check_chunk_grid(where, shape, tuple(int(n) for n in dset.chunks), itemsize)

    @cached_property
    def chunk_rows(self) -> list[int]:
        """Rows per stored chunk of each layer (all its rows when it is not chunked)."""
        out = []
        for pos, info in enumerate(self.layers):
            chunks = self._dataset(pos).chunks
            out.append(int(chunks[0]) if chunks else max(1, info.rows))
        return out

    def describe(self) -> dict[str, Any]:
        """Chunk shape and compression of the first layer (for ``actfmt info``)."""
        if not self._names:
            return {}
        dset = self._dataset(0)
        comp = dset.compression
        if comp is None and dset.id.get_create_plist().get_nfilters() > 0:
            comp = "plugin filter"
        if comp is not None and dset.compression_opts is not None:
            comp = f"{comp} level {dset.compression_opts}"
        if comp is not None and dset.shuffle:
            comp = f"{comp} (shuffle)"
        return {"chunks": list(dset.chunks) if dset.chunks else None, "compression": comp or "none"}

    def chunk_rows_of(self, layer: int) -> int | None:
        """Rows per chunk of a chunked layer (``None``: contiguous, or stored raw, where any rows are cheap)."""
        if self._rows(layer) is not None:
            return None
        chunks = self._dataset(layer).chunks
        return int(chunks[0]) if chunks else None

    def _dtype_name(self, dset: h5py.Dataset, name: str) -> str:
        raw = dset.attrs.get(DTYPE_ATTR)
        if isinstance(raw, bytes):
            raw = raw.decode()
        if raw is not None:
            if raw not in SUPPORTED_DTYPES or dset.dtype.itemsize != (4 if raw == "float32" else 2):
                raise FormatError(f"{self.location}: {name} has {DTYPE_ATTR}={raw!r} on {dset.dtype} data.")
            return str(raw)
        kind = {("f", 2): "float16", ("f", 4): "float32"}.get((dset.dtype.kind, dset.dtype.itemsize))
        if kind is None:
            raise FormatError(
                f"{self.location}: {name} holds {dset.dtype} without an {DTYPE_ATTR} attribute; "
                f"expected float16, float32 or bfloat16 bits marked {DTYPE_ATTR}='bfloat16'."
            )
        return kind

    def _dataset(self, pos: int) -> h5py.Dataset:
        """Dataset at layer position ``pos``, opened with a chunk cache that suits it."""
        if pos not in self._dsets:
            import h5py

            name = self._names[pos][1]
            f = self.file
            probe = h5py.h5d.open(f.id, name.encode())
            self._check_storage(h5py.Dataset(probe), name)
            filtered = probe.get_create_plist().get_nfilters() > 0
            del probe  # HDF5 shares one chunk cache per open dataset: close it so the dapl below applies
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            # unfiltered: no cache, HDF5 reads the selected rows straight from the file into our buffer;
            # filtered: a cache holding many chunks, so repeated random reads decompress each chunk once
            nbytes = READ_CACHE_BYTES if filtered else 0
            dapl.set_chunk_cache(READ_CACHE_SLOTS if filtered else 1, nbytes, 0.75)
            # each open dataset holds its own cache: keep a few open, so reading every layer stays bounded
            while len(self._dsets) >= OPEN_DATASETS:
                self._dsets.pop(next(iter(self._dsets)))
            self._dsets[pos] = h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl))
        return self._dsets[pos]

    # -- raw rows --------------------------------------------------------------------------------------------
    def _rows(self, pos: int) -> RowStore | None:
        """The layer's rows by byte offset when every one of them is stored raw, else ``None``."""
        if pos not in self._stores:
            info = self.layer_info(pos)
            segments = self._raw_segments(pos, info)
            self._stores[pos] = None if segments is None else RowStore(segments, info.hidden_dim, info.dtype)
        return self._stores[pos]

    def _raw_segments(self, pos: int, info: LayerInfo) -> list[Segment] | None:
        """Segments of raw rows of an unfiltered layer, one per run of chunks lying back to back in the file
        (a few for a layer the writer wrote); ``None`` when a chunk is missing or not stored raw."""
        dset = self._dataset(pos)
        did = dset.id
        if (
            info.hidden_dim == 0
            or dset.dtype != stored_dtype(info.dtype)
            or did.get_create_plist().get_nfilters()
        ):
            return None
        if info.rows == 0:
            return []
        row_bytes = info.row_bytes
        if dset.chunks is None:  # contiguous (another tool's file); compact storage has no offset
            offset = did.get_offset()
            if offset is None or did.get_storage_size() != info.nbytes:
                return None
            return [Segment(self._pinned, int(offset), info.rows)]
        chunk, width = (int(x) for x in dset.chunks)
        n_expected = -(-info.rows // chunk)
        if width != info.hidden_dim or did.get_num_chunks() != n_expected:
            return None
        found: list[tuple[int, int | None, int, int]] = []
        if hasattr(did, "chunk_iter"):
            did.chunk_iter(lambda c: found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask)))
        else:  # pragma: no cover - HDF5 < 1.12.3
            for k in range(n_expected):
                c = did.get_chunk_info(k)
                found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask))
        found.sort()
        segments: list[Segment] = []
        for k, (row, offset, size, mask) in enumerate(found):
            if row != k * chunk or offset is None or size != chunk * row_bytes or mask != 0:
                return None
            rows = min(chunk, info.rows - row)
            last = segments[-1] if segments else None
            if last is not None and last.offset + last.rows * row_bytes == offset:
                segments[-1] = Segment(self._pinned, last.offset, last.rows + rows)
            else:
                segments.append(Segment(self._pinned, int(offset), rows))
        return segments

    # -- data --------------------------------------------------------------------------------------------------
    def read_array(
        self, layer: int, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        import numpy as np

        info = self.layer_info(layer)
        stop = info.rows if stop is None else min(stop, info.rows)
        start = max(0, start)
        store = self._rows(layer)
        if store is not None:
            return store.read(start, stop, out)
        n = max(0, stop - start)
        out = scratch(out, n, info.hidden_dim, stored_dtype(info.dtype))
        if n and not self._inflate_rows(layer, start, stop, out):
            self._guard_inflation(layer, start, stop)
            with plugin_hint(self.location, info.name):
                self._dataset(layer).read_direct(out, source_sel=np.s_[start:stop])
        return out

    def _guard_inflation(self, layer: int, start: int, stop: int) -> None:
        """Before HDF5's own filter pipeline decodes rows ``start:stop`` of a layer: see :func:`guard_inflation`."""
        guard_inflation(self._dataset(layer), f"{self.location}: {self.layer_info(layer).name}", start, stop)

    def _inflate_plan(self, pos: int) -> tuple[int, int] | None:
        """``(chunk rows, shuffle item size or 0)`` when layer ``pos`` is stored in whole-row chunks filtered by
        deflate alone or shuffle then deflate (how actfmt writes gzip), which :meth:`_inflate_rows` decodes
        itself; ``None`` for every other layout or filter pipeline."""
        if pos not in self._deflate:
            plan = None
            info = self.layer_info(pos)
            dset = self._dataset(pos)
            if dset.chunks is not None and dset.chunks[1] == info.hidden_dim and info.hidden_dim:
                plist = dset.id.get_create_plist()
                ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
                stored = dset.dtype == stored_dtype(info.dtype)
                if stored and ids in ([H5Z_DEFLATE], [H5Z_SHUFFLE, H5Z_DEFLATE]):
                    plan = (int(dset.chunks[0]), dset.dtype.itemsize if ids[0] == H5Z_SHUFFLE else 0)
            self._deflate[pos] = plan
        return self._deflate[pos]

    def _inflate_rows(self, layer: int, start: int, stop: int, out: np.ndarray) -> bool:
        """Rows ``start:stop`` of a gzip layer into ``out``, chunk by chunk as stored (``read_direct_chunk``),
        inflated with ISA-L and unshuffled here, on two threads and outside h5py's global lock (so a conversion's
        verification no longer stalls its writer): faster than HDF5's own zlib filter.  ``False`` (nothing
        promised in ``out``) when the layer is not such a layer, or a chunk is missing or filtered otherwise:
        HDF5's own pipeline then reads it.  A chunk that does not inflate to a whole chunk is a FormatError."""
        import numpy as np

        plan = self._inflate_plan(layer)
        if plan is None:
            return False
        chunk, shuffle = plan
        hidden = self.layer_info(layer).hidden_dim
        itemsize = out.dtype.itemsize
        chunk_bytes = chunk * hidden * itemsize
        did = self._dataset(layer).id
        flat = out.reshape(-1).view(np.uint8)
        try:
            raws = []
            for row in range(start - start % chunk, stop, chunk):
                mask, raw = did.read_direct_chunk((row, 0))
                if mask:
                    return False
                raws.append((row, raw))
        except (KeyError, OSError, ValueError):
            return False

        def one(item: tuple[int, bytes]) -> bool:
            row, raw = item
            data = inflate_chunk(
                raw, chunk_bytes, f"{self.location}: {self.layer_info(layer).name}", row, chunk
            )
            lo, hi = max(row, start), min(row + chunk, stop)
            e0, e1 = (lo - row) * hidden, (hi - row) * hidden  # elements of this chunk wanted
            dst = flat[(lo - start) * hidden * itemsize : (hi - start) * hidden * itemsize]
            src = np.frombuffer(data, dtype=np.uint8)
            if shuffle:  # byte k of every element lies together: put each element's bytes back in order
                unshuffle(src.reshape(itemsize, chunk * hidden)[:, e0:e1], dst)
            else:
                dst[:] = src[e0 * itemsize : e1 * itemsize]
            return True

        if len(raws) == 1:
            return one(raws[0])
        return all(read_pool().map(one, raws))

    def example_arrays(self, row: int) -> list[np.ndarray]:
        stores = [self._rows(pos) for pos in range(len(self.layers))]
        if all(s is not None for s in stores):  # every layer stored raw: one batch of reads
            return row_across([s for s in stores if s is not None], row)
        return super().example_arrays(row)

    def take_array(self, layer: int, rows: Any) -> np.ndarray:
        """Rows at any indices (any order, repeats allowed): by byte offset when the layer is stored raw,
        otherwise each touched chunk is read once, as one contiguous run."""
        import numpy as np

        info = self.layer_info(layer)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= info.rows):
            raise IndexError(f"row index out of range for {info.rows} rows of {info.name}")
        store = self._rows(layer)
        if store is not None:
            return store.take(rows)
        got_dtype = stored_dtype(info.dtype)
        if rows.size == 0:
            return np.empty((0, info.hidden_dim), dtype=got_dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        dset = self._dataset(layer)
        got = np.empty((uniq.size, info.hidden_dim), dtype=got_dtype)
        chunk = int(dset.chunks[0]) if dset.chunks else info.rows
        which = uniq // chunk
        cuts = np.flatnonzero(np.diff(which)) + 1
        with plugin_hint(self.location, info.name):
            for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, uniq.size], strict=True):
                sel = uniq[lo_i:hi_i]
                lo, hi = int(sel[0]), int(sel[-1]) + 1
                self._guard_inflation(layer, lo, hi)
                if hi - lo == sel.size:
                    dset.read_direct(got, source_sel=np.s_[lo:hi], dest_sel=np.s_[lo_i:hi_i])
                else:
                    run = np.empty((hi - lo, info.hidden_dim), dtype=got.dtype)
                    dset.read_direct(run, source_sel=np.s_[lo:hi])
                    got[lo_i:hi_i] = run[sel - lo]
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return got
        return got[inverse.reshape(-1)]

    def runs(self, layer: int, start: int, stop: int) -> list[ByteRun] | None:
        store = self._rows(layer)
        return None if store is None else store.runs(start, stop)

    def own_bytes(self, layer: int) -> Iterator[memoryview] | None:
        store = self._rows(layer)
        return None if store is None or not self.location.supports_mmap else store.mapped()

    def missing_chunks(self, layer: int) -> list[str]:
        """Chunks of a chunked layer that were never written, as ``"layer_03/chunk 12 (rows 6144-6655)"``.

        Those would read back as the fill value (zeros) silently.
        """
        info = self.layer_info(layer)
        dset = self._dataset(layer)
        if dset.chunks is None or info.rows == 0:
            return []
        chunk = int(dset.chunks[0])
        n_expected = -(-info.rows // chunk)
        did = dset.id
        n_have = did.get_num_chunks()  # what the file holds (bounded by its size), never what is declared
        if n_have >= n_expected:
            return MissingChunks()
        have = {int(did.get_chunk_info(k).chunk_offset[0]) // chunk for k in range(n_have)}
        total = n_expected - len({k for k in have if k < n_expected})
        shown: list[str] = []
        k = 0
        while len(shown) < min(total, MAX_SHOWN_MISSING):  # at most n_have + MAX_SHOWN_MISSING steps
            if k not in have:
                shown.append(
                    f"{info.name}/chunk {k} (rows {k * chunk}-{min((k + 1) * chunk, info.rows) - 1})"
                )
            k += 1
        return MissingChunks(shown, total)

    def close(self) -> None:
        self._dsets.clear()
        file, fh = self._file, self._fh
        self._file = self._fh = None
        try:
            if file is not None:
                file.close()
        finally:
            if fh is not None:
                fh.close()
