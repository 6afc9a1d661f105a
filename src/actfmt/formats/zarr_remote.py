"""Zarr stores on object storage (``s3://bucket/out/EM.zarr``): the same layout as :mod:`actfmt.formats.zarr_`.

Reading parses the same ``zarr.json`` / ``.zarray`` documents and fetches chunk objects itself, concurrently
(one batch of GETs per read): uncompressed chunks with ranged GETs of just the rows asked for, compressed chunks
whole, decoded on two threads.  Stores with codecs actfmt does not decode itself go through zarr-python's
``FsspecStore``.  A missing chunk reads as the fill value, as in every Zarr reader; :meth:`missing_chunks` lists
them from one listing (ACT601).

Writing makes the group and array metadata with zarr-python (into a temporary local directory, then uploaded:
a handful of small objects), encodes chunks as the local writer does and uploads each block's chunks
concurrently.  ``finalize`` rewrites the group's attributes with the ``actfmt`` block: the last object written,
so an interrupted conversion never looks complete.  There is no rename on object storage: see
:func:`actfmt.remote.convert_split_remote` for what that means for atomicity, locking and ``--resume``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import ConversionError, FormatError, MetadataError, NotASplitError
from actfmt.formats.base import ACTFMT_KEY, SplitSpec, WriteOptions
from actfmt.formats.zarr_ import (
    ZarrFormat,
    ZarrReader,
    ZarrWriter,
    _ArrayMeta,
    _np_dtype,
)
from actfmt.remote import RemotePath

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = ["RemoteZarrReader", "RemoteZarrWriter"]

#: Nearby rows of an uncompressed chunk closer than this are fetched in one ranged GET.
MERGE_GAP = 8 << 10


def _chunk_path(root: RemotePath, m: _ArrayMeta, k: int) -> RemotePath:
    return root / m.name / m.chunk_key(k)


def _fetch_whole(paths: list[RemotePath]) -> list[bytes | None]:
    """Whole objects, concurrently; ``None`` for a missing one (it reads as the fill value)."""
    if not paths:
        return []
    fs = paths[0].fs
    with paths[0]._io():
        got = fs.cat([p.key for p in paths], on_error="return")
    out: list[bytes | None] = []
    for p in paths:
        v = got.get(p.key) if isinstance(got, dict) else got
        if isinstance(v, FileNotFoundError) or v is None:
            out.append(None)
        elif isinstance(v, BaseException):
            with p._io():
                raise v
        else:
            out.append(bytes(v))
    return out


class RemoteZarrReader(ZarrReader):
    """A split stored as a Zarr group (v2 or v3) on object storage."""

    def __init__(self, path: RemotePath) -> None:  # Reader.__init__ would make a local Path
        self.path = path  # type: ignore[assignment]
        self._zarr_group: Any = None
        self._pool: Any = None
        if not ZarrFormat.can_open(path):  # type: ignore[arg-type]
            raise NotASplitError(
                f"{path}: not a Zarr group (no zarr.json or .zgroup); convert a split with "
                f"`actfmt convert SRC DST --to zarr`."
            )

    def missing_chunks(self, layer: int) -> list[str]:
        m = self._metas[layer]
        adir = self.path / m.name
        prefix = adir.key.rstrip("/") + "/"  # type: ignore[attr-defined]
        try:
            present = {k[len(prefix) :] for k in adir.find() if k.startswith(prefix)}  # type: ignore[attr-defined]
        except FileNotFoundError:
            present = set()
        return [f"{m.name}/{k}" for k in (m.chunk_key(i) for i in range(m.nchunks)) if k not in present]

    def _array(self, layer: int) -> Any:
        import zarr
        from zarr.storage import FsspecStore

        if self._zarr_group is None:
            p: RemotePath = self.path  # type: ignore[assignment]
            store = FsspecStore.from_url(str(p), storage_options=p.storage_options or None, read_only=True)
            self._zarr_group = zarr.open_group(store, mode="r")
        return self._zarr_group[self._metas[layer].name]

    def _fill(self, m: _ArrayMeta, chunks: dict[int, Any], raws: list[bytes | None], keys: list[int]) -> None:
        """Decode whole chunks (or zeros when missing) into ``chunks[k]`` (numpy arrays), on two threads."""
        import numpy as np

        def one(i: int) -> None:
            k, raw, dst = keys[i], raws[i], chunks[keys[i]]
            if raw is None:
                dst[...] = 0
            elif m.codec is None:
                if len(raw) != dst.nbytes:
                    raise FormatError(
                        f"{self.path}/{m.name}/{m.chunk_key(k)}: chunk of {len(raw)} bytes, expected "
                        f"{dst.nbytes}; the store is damaged: re-convert it."
                    )
                dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
            else:
                m.codec.decode(raw, out=dst)

        if len(keys) > 1 and m.codec is not None:
            list(self._threads().map(one, range(len(keys))))
        else:
            for i in range(len(keys)):
                one(i)

    def _rows_uncompressed(self, m: _ArrayMeta, rows: np.ndarray, out: np.ndarray) -> None:
        """Sorted unique ``rows`` of an uncompressed array into ``out``: ranged GETs of runs of rows."""
        import numpy as np

        cr = m.chunk_rows
        row_bytes = m.shape[1] * out.itemsize
        gap = max(1, MERGE_GAP // max(1, row_bytes))
        which = rows // cr
        reqs: list[tuple[RemotePath, int, int, np.ndarray, np.ndarray]] = []
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            local = rows[sel] - k * cr
            cuts = np.flatnonzero(np.diff(local) > gap) + 1
            for part in np.split(np.arange(sel.size), cuts):
                a, b = int(local[part[0]]), int(local[part[-1]]) + 1
                reqs.append((_chunk_path(self.path, m, k), a, b, sel[part], local[part] - a))  # type: ignore[arg-type]
        if not reqs:
            return
        got = reqs[0][0].read_ranges(
            [(a * row_bytes, b * row_bytes) for _, a, b, _, _ in reqs], [r[0] for r in reqs], missing_ok=True
        )
        for (path, a, b, dst_rows, src_rows), data in zip(reqs, got, strict=True):
            if data is None:  # a missing chunk reads as the fill value (ACT601 reports it)
                out[dst_rows] = 0
                continue
            if len(data) != (b - a) * row_bytes:
                raise FormatError(f"{path}: chunk ends early; the store is damaged: re-convert it.")
            block = np.frombuffer(data, dtype=out.dtype).reshape(b - a, m.shape[1])
            out[dst_rows] = block[src_rows]

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import numpy as np

        m = self._metas[layer]
        stop = m.shape[0] if stop is None else min(stop, m.shape[0])
        start = max(0, start)
        if stop <= start:
            return self._torch(np.empty((0, m.shape[1]), dtype=_np_dtype(m.dtype)), layer)
        if not m.direct:
            return self._torch(np.ascontiguousarray(self._array(layer)[start:stop]), layer)
        out = np.empty((stop - start, m.shape[1]), dtype=_np_dtype(m.dtype))
        if m.codec is None:
            self._rows_uncompressed(m, np.arange(start, stop, dtype=np.int64), out)
            return self._torch(out, layer)
        cr = m.chunk_rows
        keys = list(range(start // cr, (stop - 1) // cr + 1))
        chunks = {k: np.empty((cr, m.shape[1]), dtype=out.dtype) for k in keys}
        raws = _fetch_whole([_chunk_path(self.path, m, k) for k in keys])  # type: ignore[arg-type]
        self._fill(m, chunks, raws, keys)
        for k in keys:
            lo, hi = max(start, k * cr), min(stop, (k + 1) * cr)
            out[lo - start : hi - start] = chunks[k][lo - k * cr : hi - k * cr]
        return self._torch(out, layer)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        import numpy as np
        import torch

        m = self._metas[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= m.shape[0]):
            raise IndexError(f"row index out of range for {m.shape[0]} rows of {self.path}/{m.name}")
        if rows.size == 0:
            return self.read(layer, 0, 0)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if not m.direct:
            got = np.ascontiguousarray(self._array(layer).get_orthogonal_selection((uniq, slice(None))))
        elif m.codec is None:
            got = np.empty((uniq.size, m.shape[1]), dtype=_np_dtype(m.dtype))
            self._rows_uncompressed(m, uniq, got)
        else:
            got = np.empty((uniq.size, m.shape[1]), dtype=_np_dtype(m.dtype))
            cr = m.chunk_rows
            keys = np.unique(uniq // cr).tolist()
            chunks = {k: np.empty((cr, m.shape[1]), dtype=got.dtype) for k in keys}
            raws = _fetch_whole([_chunk_path(self.path, m, k) for k in keys])  # type: ignore[arg-type]
            self._fill(m, chunks, raws, keys)
            for i, r in enumerate(uniq.tolist()):
                got[i] = chunks[r // cr][r % cr]
        t = self._torch(got, layer)
        return t if uniq.size == rows.size and np.array_equal(uniq, rows) else t[torch.from_numpy(inverse)]


class RemoteZarrWriter(ZarrWriter):
    """Writes a Zarr group on object storage in place (see the module docstring)."""

    def __init__(self, path: RemotePath, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(path, spec, options)  # type: ignore[arg-type]
        self.path = path  # type: ignore[assignment]

    @classmethod
    def create(cls, path: Any, spec: SplitSpec, options: WriteOptions) -> RemoteZarrWriter:
        import tempfile

        if path.exists():
            raise ConversionError(f"{path}: already exists; the zarr writer creates a new store.")
        with tempfile.TemporaryDirectory(prefix="actfmt-zarr-meta-") as tmp:
            local = Path(tmp) / "store.zarr"
            ZarrWriter.create(local, spec, options)  # the metadata documents only: no chunk is written
            docs = {
                path / f.relative_to(local).as_posix(): f.read_bytes()
                for f in local.rglob("*")
                if f.is_file()
            }
        path.pipe(docs)
        return cls(path, spec, options)

    @classmethod
    def open(cls, path: Any, spec: SplitSpec, options: WriteOptions) -> RemoteZarrWriter:
        return cls(path, spec, options)

    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        import numpy as np

        block = self._block(layer, start, data)
        if block is None:
            return
        m, arr = block
        cr, hidden, n = m.chunk_rows, self.spec.layers[layer].hidden_dim, arr.shape[0]

        def one(s: int) -> tuple[RemotePath, bytes]:
            part = arr[s : s + cr]
            if part.shape[0] < cr:  # edge chunk: padded to the full chunk, as Zarr requires
                full = np.zeros((cr, hidden), dtype=part.dtype)
                full[: part.shape[0]] = part
                part = full
            raw = part.tobytes() if m.codec is None else bytes(m.codec.encode(part))
            return _chunk_path(self.path, m, (start + s) // cr), raw  # type: ignore[arg-type]

        starts = range(0, n, cr)
        if m.codec is not None and len(starts) > 1:
            encoded = list(self._threads().map(one, starts))
        else:
            encoded = [one(s) for s in starts]
        self.path.pipe(dict(encoded))  # type: ignore[attr-defined]

    def finalize(self, block: dict[str, Any]) -> None:
        """Add the actfmt block to the group attributes: one PUT of the group's metadata document, last."""
        out = dict(block)
        out.setdefault("dtype", {li.name: li.dtype for li in self.spec.layers})
        p: RemotePath = self.path  # type: ignore[assignment]
        v3 = p / "zarr.json"
        try:
            doc = json.loads(v3.read_bytes())
        except FileNotFoundError:
            doc = None
        if isinstance(doc, dict):
            attrs = doc.setdefault("attributes", {})
            attrs[ACTFMT_KEY] = out
            v3.write_text(json.dumps(doc, indent=2))
            return
        v2 = p / ".zattrs"
        try:
            attrs = json.loads(v2.read_bytes())
        except FileNotFoundError:
            attrs = {}
        if not isinstance(attrs, dict):
            raise MetadataError(f"{v2}: not a JSON object; the store is damaged: re-convert it.")
        attrs[ACTFMT_KEY] = out
        v2.write_text(json.dumps(attrs, indent=2))
