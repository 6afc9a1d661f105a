"""safetensors splits: a directory with ``metadata.json`` and one ``layer_XX.safetensors`` per layer.

On disk (the contract)::

    EM/metadata.json               the producer's keys verbatim, then "actfmt": {..., "complete": true}
    EM/layer_00.safetensors        one tensor "activations" [total_examples, hidden_dim], BF16 / F16 / F32
    EM/layer_01.safetensors ...

* Each layer file holds exactly one tensor named ``"activations"`` (:data:`TENSOR`) in the layer's own dtype
  (bfloat16 stored natively as ``BF16``), so ``safetensors.torch.load_file(f)["activations"]`` is the layer.
* ``__metadata__`` (str -> str, as safetensors requires) holds ``"format": "pt"`` (the Hugging Face
  convention), ``"actfmt.layer": "layer_03"`` and ``"metadata.json"``: the producer's metadata as one JSON
  string, so every file carries the split's metadata on its own.  The actfmt block (checksums, completeness)
  is only in the directory's ``metadata.json``: it is known once every layer is written.
* ``metadata.json`` is written by ``create`` with the producer's keys only, and rewritten by ``finalize``
  with the ``"actfmt"`` block as its last key (``complete: true``).  Readers return the producer's keys
  without ``"actfmt"``.  A directory whose ``metadata.json`` has no ``actfmt`` block is an interrupted
  conversion.
* No compression: the format has none.

Files are written streaming: ``create`` writes each file's header (8-byte little-endian length, then the JSON
header padded with spaces to a multiple of 8, as the safetensors library does), and ``write`` puts each row
block at its own offset with ``os.pwrite`` straight from the tensor's memory (no copy, any order).  A file
shorter than its header promises is reported by :meth:`SafetensorsReader.missing_chunks` (rule ACT601).

Reading parses the header in Python (no library import), reads row ranges with ``os.preadv`` into a
freshly allocated buffer (one copy, split over two threads for large reads) and gathers random rows by
fancy-indexing a memory map of the file (one copy, only the touched pages are read).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import ConversionError, CorruptShardError, MetadataError, NotASplitError
from actfmt.formats.base import (
    ACTFMT_KEY,
    Format,
    LayerInfo,
    Reader,
    SplitSpec,
    WriteOptions,
    Writer,
    tensor_bytes,
)
from actfmt.layout import METADATA_FILE, layer_index, write_json

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = [
    "SUFFIX",
    "TENSOR",
    "SafetensorsFormat",
    "SafetensorsHeader",
    "SafetensorsReader",
    "SafetensorsWriter",
    "build_header",
    "read_header",
]

#: The name of the one tensor in every layer file.
TENSOR = "activations"
SUFFIX = ".safetensors"
#: torch dtype name <-> safetensors dtype string.
ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
#: The safetensors library refuses headers larger than this.
MAX_HEADER = 100_000_000
#: Reads at least this large are split over several threads.
_PARALLEL_READ_BYTES = 16 << 20
#: Target block size when neither the source's shards nor --chunk-rows say otherwise.
_BLOCK_BYTES = 16 << 20


def layer_file(index: int) -> str:
    """``layer_file(3) == "layer_03.safetensors"``."""
    return f"layer_{index:02d}{SUFFIX}"


def list_layer_files(split: Path) -> list[tuple[int, Path]]:
    """Correctly named ``layer_XX.safetensors`` files, sorted by index."""
    out = []
    for entry in split.iterdir():
        if entry.name.endswith(SUFFIX):
            i = layer_index(entry.name[: -len(SUFFIX)])
            if i is not None and entry.is_file():
                out.append((i, entry))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# header


class SafetensorsHeader:
    """The parsed header of a one-tensor safetensors file."""

    def __init__(
        self,
        path: Path,
        name: str,
        dtype: str,
        shape: tuple[int, int],
        data_start: int,
        file_nbytes: int,
        meta: dict,
    ) -> None:
        self.path = path
        self.name = name
        self.dtype = dtype  # torch spelling
        self.shape = shape
        self.data_start = data_start  # absolute offset of the first data byte (8 + header length)
        self.file_nbytes = file_nbytes
        self.metadata = meta  # __metadata__ (str -> str)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_nbytes(self) -> int:
        return self.shape[1] * _ITEMSIZE[self.dtype]

    @property
    def data_nbytes(self) -> int:
        return self.rows * self.row_nbytes

    @property
    def expected_file_nbytes(self) -> int:
        return self.data_start + self.data_nbytes

    @property
    def truncated(self) -> bool:
        return self.file_nbytes < self.expected_file_nbytes


def build_header(info: LayerInfo, metadata: dict[str, Any]) -> bytes:
    """The bytes before the data of a layer file: 8-byte length + JSON header padded with spaces to 8."""
    if info.dtype not in ST_DTYPES:
        raise ConversionError(
            f"safetensors: cannot store dtype {info.dtype!r} (supported: {', '.join(ST_DTYPES)})."
        )
    head = {
        "__metadata__": {
            "format": "pt",
            "actfmt.layer": info.name,
            "metadata.json": json.dumps(metadata, ensure_ascii=False),
        },
        TENSOR: {
            "dtype": ST_DTYPES[info.dtype],
            "shape": [info.rows, info.hidden_dim],
            "data_offsets": [0, info.nbytes],
        },
    }
    body = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of a one-tensor layer file; :class:`CorruptShardError` if it is not one."""
    fix = "re-run the conversion (actfmt convert ... --overwrite) or restore the file"
    with open(path, "rb") as fh:  # OSError propagates with the file name
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CorruptShardError(f"{path}: {size} bytes, too short for a safetensors file; {fix}.")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER or n > size - 8:
            raise CorruptShardError(
                f"{path}: not a safetensors file or truncated (header length {n} but the file has {size} bytes); "
                f"{fix}."
            )
        raw = fh.read(n)
    try:
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptShardError(f"{path}: the safetensors header is not valid JSON ({exc}); {fix}.") from None
    if not isinstance(head, dict):
        raise CorruptShardError(f"{path}: the safetensors header is not a JSON object; {fix}.")
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CorruptShardError(f"{path}: __metadata__ is not a JSON object; {fix}.")
    if len(head) != 1:
        raise CorruptShardError(
            f"{path}: holds {len(head)} tensors ({', '.join(sorted(head)[:5])}); an actfmt layer file holds "
            f"exactly one, {TENSOR!r}; {fix}."
        )
    ((name, entry),) = head.items()
    try:
        st_dtype = entry["dtype"]
        shape = tuple(int(x) for x in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptShardError(
            f"{path}: tensor {name!r} has a malformed header entry ({exc!r}); {fix}."
        ) from None
    if st_dtype not in _FROM_ST:
        raise CorruptShardError(
            f"{path}: tensor {name!r} has dtype {st_dtype!r}; actfmt reads {', '.join(_FROM_ST)}; convert the "
            f"activations to one of those."
        )
    dtype = _FROM_ST[st_dtype]
    if len(shape) != 2 or min(shape) < 0:
        raise CorruptShardError(
            f"{path}: tensor {name!r} has shape {list(shape)}; a layer is 2-D [rows, hidden]."
        )
    nbytes = shape[0] * shape[1] * _ITEMSIZE[dtype]
    if begin != 0 or end != nbytes:
        raise CorruptShardError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}], expected [0, {nbytes}] for shape "
            f"{list(shape)} {st_dtype}; {fix}."
        )
    return SafetensorsHeader(path, name, dtype, (shape[0], shape[1]), 8 + n, size, meta)


# ----------------------------------------------------------------------------------------------------------
# reader


def _storage_np(dtype: str) -> np.dtype:
    import numpy as np

    return np.dtype("<i4") if dtype == "float32" else np.dtype("<i2")


def _to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    from actfmt.formats.base import torch_dtype

    return torch.from_numpy(arr).view(torch_dtype(dtype))


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``offset`` (looping over short reads); a file ending early is corrupt."""
    done = 0
    total = buf.nbytes
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CorruptShardError(
                f"{path}: truncated (ends before byte {offset + total}); re-run the conversion "
                f"(actfmt convert ... --resume or --overwrite)."
            )
        done += n


class SafetensorsReader(Reader):
    """A split in the safetensors layout; row ranges by ``preadv``, random rows from a memory map."""

    format = "safetensors"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not self.path.is_dir():
            raise NotASplitError(
                f"{self.path}: not a directory; a safetensors split is a directory with layer_XX.safetensors files."
            )
        self._files = list_layer_files(self.path)
        self._fds: dict[int, int] = {}
        self._maps: dict[int, tuple[mmap.mmap, Any]] = {}
        self._lock = threading.Lock()

    # -- description ---------------------------------------------------------------------------------------
    @cached_property
    def _metadata_file(self) -> dict[str, Any]:
        p = self.path / METADATA_FILE
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MetadataError(
                f"{p}: missing; every split needs a metadata.json (each layer file keeps a copy in its "
                f"__metadata__['metadata.json']; re-run the conversion or restore the file)."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MetadataError(
                f"{p}: not valid JSON ({exc}); fix the file or re-run the conversion."
            ) from None
        if not isinstance(data, dict):
            raise MetadataError(f"{p}: must hold a JSON object.")
        return data

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self._metadata_file.items() if k != ACTFMT_KEY}

    @property
    def actfmt(self) -> dict[str, Any] | None:
        try:
            block = self._metadata_file.get(ACTFMT_KEY)
        except MetadataError:
            return None
        return block if isinstance(block, dict) else None

    @cached_property
    def headers(self) -> list[SafetensorsHeader]:
        return [read_header(p) for _, p in self._files]

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        return [
            LayerInfo(name=p.name[: -len(SUFFIX)], index=i, rows=h.rows, hidden_dim=h.shape[1], dtype=h.dtype)
            for (i, p), h in zip(self._files, self.headers, strict=True)
        ]

    def layer_path(self, layer: int) -> Path:
        return self._files[layer][1]

    def missing_chunks(self, layer_pos: int) -> list[str]:
        """``[]``, or the layer file when it is shorter than its header says (the rows that are missing)."""
        h = self.headers[layer_pos]
        size = self.layer_path(layer_pos).stat().st_size
        if size >= h.expected_file_nbytes:
            return []
        first = max(0, size - h.data_start) // h.row_nbytes if h.row_nbytes else 0
        return [
            f"{self.layer_path(layer_pos).name} (rows {first}-{h.rows - 1}: the file has {size} of "
            f"{h.expected_file_nbytes} bytes)"
        ]

    # -- data ----------------------------------------------------------------------------------------------
    def _check_complete(self, layer: int) -> SafetensorsHeader:
        h = self.headers[layer]
        size = self.layer_path(layer).stat().st_size
        if size < h.expected_file_nbytes:
            raise CorruptShardError(
                f"{h.path}: truncated ({size} of {h.expected_file_nbytes} bytes); re-run the conversion "
                f"(actfmt convert ... --resume or --overwrite)."
            )
        return h

    def _fd(self, layer: int) -> int:
        fd = self._fds.get(layer)
        if fd is None:
            with self._lock:
                fd = self._fds.get(layer)
                if fd is None:
                    fd = os.open(self.layer_path(layer), os.O_RDONLY)
                    self._fds[layer] = fd
        return fd

    def _array(self, layer: int) -> np.ndarray:
        """The layer's rows as a read-only numpy array over a memory map of the file (storage ints)."""
        entry = self._maps.get(layer)
        if entry is None:
            import numpy as np

            h = self._check_complete(layer)
            fd = self._fd(layer)  # takes the lock itself: not inside it
            with self._lock:
                entry = self._maps.get(layer)
                if entry is None:
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                    arr = np.frombuffer(
                        mm, dtype=_storage_np(h.dtype), count=h.rows * h.shape[1], offset=h.data_start
                    ).reshape(h.shape)
                    entry = (mm, arr)
                    self._maps[layer] = entry
        return entry[1]

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import numpy as np

        h = self.headers[layer]
        stop = h.rows if stop is None else min(stop, h.rows)
        start = max(0, start)
        stop = max(start, stop)
        out = np.empty((stop - start, h.shape[1]), dtype=_storage_np(h.dtype))
        if out.nbytes:
            buf = memoryview(out).cast("B")  # type: ignore[arg-type]
            fd = self._fd(layer)
            offset = h.data_start + start * h.row_nbytes
            parts = min(os.cpu_count() or 1, 4, max(1, out.nbytes // (_PARALLEL_READ_BYTES // 2)))
            if parts == 1:
                _pread_into(fd, buf, offset, h.path)
            else:
                step = (-(-out.nbytes // parts) + 4095) & ~4095  # page-aligned pieces
                pieces = [(s, min(s + step, out.nbytes)) for s in range(0, out.nbytes, step)]
                errors: list[BaseException] = []

                def work(lo: int, hi: int) -> None:
                    try:
                        _pread_into(fd, buf[lo:hi], offset + lo, h.path)
                    except BaseException as exc:  # re-raised in the caller
                        errors.append(exc)

                threads = [threading.Thread(target=work, args=p, daemon=True) for p in pieces[1:]]
                for t in threads:
                    t.start()
                work(*pieces[0])
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
        return _to_torch(out, h.dtype)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        import numpy as np

        h = self.headers[layer]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= h.rows):
            raise IndexError(f"row index out of range for {h.rows} rows")
        if rows.size == 0:
            return _to_torch(np.empty((0, h.shape[1]), dtype=_storage_np(h.dtype)), h.dtype)
        return _to_torch(self._array(layer)[rows], h.dtype)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
            fds, self._fds = self._fds, {}
        for mm, arr in maps.values():
            del arr
            with contextlib.suppress(BufferError):  # a caller still holds a view; released with it
                mm.close()
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------------------
# writer


def _check_options(options: WriteOptions) -> None:
    if options.compression not in (None, "none"):
        raise ConversionError(
            f"the safetensors format has no compression (got {options.compression!r}); use --compression none, "
            f"or --to zarr / hdf5 for a compressed store."
        )


class SafetensorsWriter(Writer):
    """Streams each layer into its own ``layer_XX.safetensors``: header first, then row blocks by ``pwrite``."""

    format = "safetensors"
    parallel_layers = True

    def __init__(self, path: str | Path, spec: SplitSpec, options: WriteOptions) -> None:
        super().__init__(path, spec, options)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._meta = {k: v for k, v in spec.metadata.items() if k != ACTFMT_KEY}
        self._headers: dict[int, bytes] = {}

    def _header(self, layer: int) -> bytes:
        h = self._headers.get(layer)
        if h is None:
            h = self._headers[layer] = build_header(self.spec.layers[layer], self._meta)
        return h

    @classmethod
    def create(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> SafetensorsWriter:
        _check_options(options)
        for info in spec.layers:
            if info.dtype not in ST_DTYPES:
                raise ConversionError(
                    f"{info.name}: safetensors cannot store dtype {info.dtype!r}; pass --dtype bfloat16/float16/float32."
                )
        p = Path(path)
        p.mkdir(parents=True)
        w = cls(p, spec, options)
        write_json(p / METADATA_FILE, w._meta)  # producer keys; finalize adds the actfmt block last
        for pos in range(len(spec.layers)):
            w._open_layer(pos)
            w._close_layer(pos)
        return w

    @classmethod
    def open(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> SafetensorsWriter:
        _check_options(options)
        return cls(path, spec, options)

    def layer_path(self, layer: int) -> Path:
        return self.path / layer_file(self.spec.layers[layer].index)

    def block_rows(self, layer: int) -> list[int]:
        """The source's shards when known (each is read with one copy), else ``--chunk-rows``, else ~16 MiB."""
        info = self.spec.layers[layer]
        if info.shard_rows and sum(info.shard_rows) == info.rows:
            return list(info.shard_rows)
        step = self.options.chunk_rows or max(1, _BLOCK_BYTES // max(1, info.hidden_dim * info.itemsize))
        return [min(step, info.rows - s) for s in range(0, info.rows, step)] or [0]

    def _open_layer(self, layer: int) -> int:
        """The layer file's descriptor; (re)writes the header when the file lacks it or has another one."""
        fd = self._fds.get(layer)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(layer)
            if fd is not None:
                return fd
            header = self._header(layer)
            fd = os.open(self.layer_path(layer), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.pread(fd, len(header), 0) != header:
                    os.ftruncate(fd, 0)
                    _pwrite_all(fd, memoryview(header), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fds[layer] = fd
            return fd

    def _close_layer(self, layer: int) -> None:
        with self._lock:
            fd = self._fds.pop(layer, None)
        if fd is not None:
            os.close(fd)

    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        from actfmt.formats.base import dtype_name

        info = self.spec.layers[layer]
        got = dtype_name(data.dtype)
        if data.dim() != 2 or data.shape[1] != info.hidden_dim or got != info.dtype:
            raise ConversionError(
                f"{self.layer_path(layer)}: block of shape {tuple(data.shape)} {got} does not fit layer "
                f"[{info.rows}, {info.hidden_dim}] {info.dtype}."
            )
        if start < 0 or start + data.shape[0] > info.rows:
            raise ConversionError(
                f"{self.layer_path(layer)}: rows {start}..{start + data.shape[0]} outside [0, {info.rows})."
            )
        fd = self._open_layer(layer)
        if data.shape[0] == 0:
            return
        _pwrite_all(
            fd, tensor_bytes(data), len(self._header(layer)) + start * info.hidden_dim * info.itemsize
        )

    def finish_layer(self, layer: int) -> None:
        info = self.spec.layers[layer]
        fd = self._open_layer(layer)
        expected = len(self._header(layer)) + info.nbytes
        size = os.fstat(fd).st_size
        if size > expected:
            os.ftruncate(fd, expected)  # stale bytes from another run
        elif size < expected:
            self._close_layer(layer)
            raise ConversionError(
                f"{self.layer_path(layer)}: {size} of {expected} bytes written; a block is missing."
            )
        if self.options.extra.get("fsync"):
            os.fsync(fd)
        self._close_layer(layer)

    def finalize(self, block: dict[str, Any]) -> None:
        for pos in list(self._fds):
            self._close_layer(pos)
        write_json(self.path / METADATA_FILE, {**self._meta, ACTFMT_KEY: block})

    def close(self) -> None:
        for pos in list(self._fds):
            self._close_layer(pos)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < buf.nbytes:
        done += os.pwrite(fd, buf[done:], offset + done)


# ----------------------------------------------------------------------------------------------------------


class SafetensorsFormat(Format):
    name = "safetensors"
    suffix = ""
    compressions = ("none",)

    @classmethod
    def can_open(cls, path: Path) -> bool:
        try:
            return path.is_dir() and any(path.glob("layer_*" + SUFFIX))
        except OSError:
            return False

    @classmethod
    def open_reader(cls, path: str | Path) -> SafetensorsReader:
        from actfmt.remote import refuse_remote

        refuse_remote(path, "safetensors")
        return SafetensorsReader(path)

    @classmethod
    def writer_class(cls) -> type[Writer]:
        return SafetensorsWriter
