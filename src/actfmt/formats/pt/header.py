"""What a ``.pt`` shard says about itself, read without torch: shape, dtype, byte counts, where the rows are.

``torch.save`` writes an uncompressed zip whose small ``data.pkl`` names the tensor's storage type, shape and
storage size.  For the plain pattern every producer writes (``_rebuild_tensor_v2`` over one storage) this
module reads that pickle with an unpickler whose globals are *stubs that only record their arguments*:
nothing from the file is ever called.  Only the head and the tail of a file are read (the local headers and
``data.pkl`` sit at the start, the central directory at the end): two ranged reads per shard, batched for a
whole layer (:func:`read_heads`), locally or on object storage alike.

Anything else -- another global, the legacy (non-zip) format, a damaged zip, a storage record whose size
disagrees -- makes :func:`fast_probe` return ``None``, and :func:`probe_shard` asks torch
(``torch.load(mmap=True, weights_only=True)``), which classifies it (:class:`~actfmt.errors.UnsafeShardError`,
:class:`~actfmt.errors.CorruptShardError`, ...).  Validating a tree header-only therefore never imports torch.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import struct
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from actfmt.errors import ActfmtError, CorruptShardError, NotATensorError, UnsafeShardError
from actfmt.storage import Location
from actfmt.storage.local import open_regular

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "HEAD_BYTES",
    "TAIL_BYTES",
    "ZIP_MAGIC",
    "ShardHeader",
    "fast_probe",
    "load_shard",
    "probe_shard",
    "probe_zip",
    "read_heads",
]

ZIP_MAGIC = b"PK\x03\x04"
#: Bytes read at each end of a shard by a header-only probe; more is fetched if a file needs it.
HEAD_BYTES = 1024
TAIL_BYTES = 1024
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")

#: torch storage class -> (dtype name, item size)
_STORAGES = {
    "BFloat16Storage": ("bfloat16", 2),
    "HalfStorage": ("float16", 2),
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}


@dataclass(frozen=True)
class ShardHeader:
    """What a shard says about itself without its data being read."""

    shape: tuple[int, ...]
    dtype: str
    tensor_nbytes: int
    storage_nbytes: int
    file_nbytes: int
    legacy: bool  # not the zip format: cannot be memory-mapped
    #: Byte offset of the first element in the file when the tensor is contiguous in an uncompressed record
    #: (rows can then be read by offset), else ``None``.
    data_offset: int | None = None
    #: The file's identity when it was probed (:attr:`actfmt.storage.Stat.identity`): a later change shows.
    identity: tuple[Any, ...] = ()


# ----------------------------------------------------------------------------------------------------------
# a cache of headers already probed, by file identity: a conversion validates its source, then reads it


_CACHE: OrderedDict[tuple[Any, ...], tuple[ShardHeader, bool]] = OrderedDict()  # (header, torch needed)
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 1 << 16


def _key(location: Location, identity: tuple[Any, ...]) -> tuple[Any, ...] | None:
    return (type(location).__name__, location.url, identity) if identity else None


def _cached(location: Location, identity: tuple[Any, ...], torch_ok: bool = True) -> ShardHeader | None:
    """The header probed before for this very file (same identity); only torch-free ones unless
    ``torch_ok``."""
    key = _key(location, identity)
    if key is None:
        return None
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is None or (hit[1] and not torch_ok):
        return None
    return hit[0]


def _remember(location: Location, header: ShardHeader, by_torch: bool = False) -> ShardHeader:
    key = _key(location, header.identity)
    if key is not None:
        with _CACHE_LOCK:
            _CACHE[key] = (header, by_torch)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return header


# ----------------------------------------------------------------------------------------------------------
# ranged reads


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a location, serving reads from prefetched blocks and fetching the rest
    with ranged reads.  ``fetched`` counts the bytes requested from storage."""

    def __init__(self, location: Location, size: int, blocks: dict[int, bytes] | None = None) -> None:
        super().__init__()
        self._loc, self._size, self._pos = location, size, 0
        self._blocks = dict(blocks or {})
        self.fetched = sum(len(b) for b in self._blocks.values())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        start = self._pos
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        if end <= start:
            return b""
        for b0, data in self._blocks.items():
            if b0 <= start and end <= b0 + len(data):
                out = data[start - b0 : end - b0]
                break
        else:
            out = self._loc.read_range(start, end)
            self.fetched += len(out)
            self._blocks[start] = out
        self._pos = start + len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _ranges(size: int) -> list[tuple[int, int]]:
    if size <= 0:
        return []
    if size <= HEAD_BYTES + TAIL_BYTES:
        return [(0, size)]
    return [(0, HEAD_BYTES), (size - TAIL_BYTES, size)]


def read_heads(
    locations: Sequence[Location],
) -> dict[Location, tuple[int, tuple[Any, ...], dict[int, bytes]]]:
    """Size, identity and the head + tail bytes of every shard, in one batch of ranged reads per storage
    (concurrent GETs on object storage).  A shard whose read fails is left out: its own probe reports it."""
    stats: dict[Location, tuple[int, tuple[Any, ...]]] = {}
    for loc in locations:
        with contextlib.suppress(OSError):
            st = loc.stat()
            stats[loc] = (st.size, st.identity)
    reqs = [
        (loc, a, b)
        for loc, (size, ident) in stats.items()
        if _cached(loc, ident) is None  # probed already (validation, then conversion): nothing to read
        for a, b in _ranges(size)
    ]
    out: dict[Location, tuple[int, tuple[Any, ...], dict[int, bytes]]] = {
        loc: (size, ident, {}) for loc, (size, ident) in stats.items()
    }
    if not reqs:
        return out
    try:
        got = type(reqs[0][0])._read_ranges(reqs, missing_ok=True)
    except OSError:  # each probe then reads on its own and reports its own error
        return {}
    for (loc, a, _), data in zip(reqs, got, strict=True):
        if data is not None:
            out[loc][2][a] = data
    return out


# ----------------------------------------------------------------------------------------------------------
# the torch-free probe


class _Fallback(Exception):
    pass


class _Refused(Exception):
    """What torch's loader refuses too, found from the header alone: said without importing torch (which
    costs ~200 MB of memory and seconds of a header-only check)."""


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype, self.itemsize = _STORAGES[name]


class _Storage:
    def __init__(self, stype: _StorageType, key: str, numel: int) -> None:
        self.stype, self.key, self.numel = stype, key, numel


class _Tensor:
    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> None:
        if not isinstance(storage, _Storage) or not isinstance(size, tuple):
            raise _Fallback
        if not isinstance(stride, tuple) or len(stride) != len(size) or not isinstance(offset, int):
            raise _Fallback
        if isinstance(offset, bool):
            raise _Fallback
        if offset < 0:  # torch refuses it too ("invalid storage offset")
            raise _Refused(f"the tensor's storage offset is {offset}, below 0")
        if not all(isinstance(n, int) and n >= 0 for n in (*size, *stride)):
            raise _Fallback
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild(*args: Any) -> _Tensor:
    return _Tensor(*args)


def _ordered_dict(*args: Any) -> dict[Any, Any]:
    if args:
        raise _Fallback
    return {}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise _Fallback

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            return _Storage(pid[1], pid[2], pid[4])
        raise _Fallback


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's ``is_contiguous``: C order, ignoring dimensions of size 1."""
    expected = 1
    for n, st in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _zip_problem(infos: Sequence[zipfile.ZipInfo], size: int) -> str | None:
    """Why a shard's zip records cannot be trusted, else ``None``: ``torch.save`` stores every record
    uncompressed, and torch's memory-mapped loader reads a record's bytes where they lie -- a deflated record
    would be read as values, compressed.  Every record must also lie inside the file."""
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            return (
                f"record {info.filename!r} is compressed (zip method {info.compress_type}); torch.save stores "
                f"records uncompressed and a memory-mapped load would read the compressed bytes as values"
            )
        if info.header_offset < 0 or info.header_offset + 30 + info.compress_size > size:
            return f"record {info.filename!r} lies beyond the end of the file ({size} bytes)"
    return None


def zip_data_start(fh: Any, header_offset: int) -> int | None:
    """Where a stored zip record's bytes start: after its 30-byte local header, file name and extra field."""
    fh.seek(header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != ZIP_MAGIC:
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(header_offset + 30 + name_len + extra_len)


def fast_probe(
    location: Location, head: tuple[int, tuple[Any, ...], dict[int, bytes]] | None = None
) -> ShardHeader | None:
    """The shard's header without torch, or ``None`` when the file is not the plain pattern (then ask torch).

    ``head``: what :func:`read_heads` fetched for it (else it is read now).  ``OSError`` (permissions, a
    directory, a missing file) propagates.
    """
    if head is None:
        st = location.stat()
        size, identity, blocks = st.size, st.identity, None
    else:
        size, identity, blocks = head
    cached = _cached(location, identity, torch_ok=False)
    if cached is not None:
        return cached
    if blocks is None or not blocks:
        blocks = {a: location.read_range(a, b) for a, b in _ranges(size)}
    rf = RangeFile(location, size, blocks)
    try:
        header = probe_zip(rf, size)
    except _Refused as exc:
        raise CorruptShardError(
            f"{location}: {exc}; the shard is damaged or crafted: re-create it."
        ) from None
    if header is None:
        return None
    return _remember(location, ShardHeader(**{**header.__dict__, "identity": identity}))


def probe_zip(fh: BinaryIO | RangeFile, size: int) -> ShardHeader | None:
    """:func:`fast_probe` over a seekable binary file of ``size`` bytes."""
    fh.seek(0)
    if fh.read(4) != ZIP_MAGIC:
        return None
    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:  # type: ignore[arg-type]
            infos = {i.filename: i for i in zf.infolist()}
            if _zip_problem(zf.infolist(), size) is not None:
                return None  # torch's loader (through load_shard) refuses it with the reason
            pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1 or infos[pkl[0]].file_size > 1 << 20:
                return None
            prefix = pkl[0][: -len("data.pkl")]
            obj = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
            if not isinstance(obj, _Tensor):
                return None
            st = obj.storage
            rec = infos.get(f"{prefix}data/{st.key}")
            nbytes = st.numel * st.stype.itemsize
            if rec is None or rec.compress_type != zipfile.ZIP_STORED or rec.file_size != nbytes:
                return None
            if rec.header_offset < 0 or rec.header_offset + nbytes > size:
                return None
            numel = math.prod(obj.size)
            if numel:
                # the last element the view reaches (torch's set_ refuses a view beyond its storage)
                extent = obj.offset + sum((n - 1) * k for n, k in zip(obj.size, obj.stride, strict=True)) + 1
                if extent > st.numel:
                    raise _Refused(
                        f"the tensor declares shape {list(obj.size)} (stride {list(obj.stride)}, offset "
                        f"{obj.offset}), which reaches element {extent:,} of a storage of {st.numel:,}"
                    )
            if numel and obj.offset + numel > st.numel:  # (contiguous bound; strides are torch's business)
                return None
            start = zip_data_start(fh, rec.header_offset)
            if start is None or start + nbytes > size:
                return None
    except (
        _Fallback,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RecursionError,
        OverflowError,
        MemoryError,
        struct.error,
    ):
        return None
    contiguous = _contiguous(tuple(obj.size), tuple(obj.stride))
    return ShardHeader(
        shape=tuple(obj.size),
        dtype=st.stype.dtype,
        tensor_nbytes=numel * st.stype.itemsize,
        storage_nbytes=nbytes,
        file_nbytes=size,
        legacy=False,
        data_offset=start + obj.offset * st.stype.itemsize if contiguous else None,
    )


# ----------------------------------------------------------------------------------------------------------
# torch, for everything else


@contextlib.contextmanager
def _local_file(location: Location) -> Iterator[Path]:
    """The file as a local path: itself, or a temporary download (object storage)."""
    if location.local_path is not None:
        yield Path(location.checked_path())  # torch opens the path itself: resolved, inside the tree
        return
    with tempfile.TemporaryDirectory(prefix="actfmt-download-") as tmp:
        local = Path(tmp) / location.name
        local.write_bytes(location.read_bytes())
        try:
            yield local
        except ActfmtError as exc:  # name the object, not the temporary copy
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].replace(str(local), str(location)), *exc.args[1:])
            raise


def _open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """A local file opened for reading without ever blocking: a FIFO, socket or device is an ``OSError``."""
    return os.fdopen(open_regular(os.fspath(path)), "rb")


def load_shard(location: Location, mmap: bool = True) -> torch.Tensor:
    """Load one shard with ``torch.load(weights_only=True)``; a precise :class:`~actfmt.errors.ActfmtError` on
    bad input.  ``OSError`` (permissions, I/O) propagates as itself, with the file name.  An empty file or one
    that is no torch.save file at all is told without importing torch."""
    with _local_file(location) as p:
        with _open_regular(p) as fh:  # OSError (ACT001) propagates; a FIFO is refused, never waited on
            magic = fh.read(4)
        if not magic:
            raise CorruptShardError(f"{location}: empty file (0 bytes); re-create the shard or remove it.")
        is_zip = magic == ZIP_MAGIC
        if not is_zip and magic[:1] != b"\x80":
            raise CorruptShardError(
                f"{location}: not a torch.save file (starts with {magic!r}, expected a zip archive); "
                f"re-create the shard."
            )
        if is_zip:
            size = os.stat(p).st_size
            try:
                with _open_regular(p) as fh, zipfile.ZipFile(fh) as zf:
                    problem = _zip_problem(zf.infolist(), size)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error):
                problem = None  # torch says what is wrong with it
            if problem is not None:
                raise CorruptShardError(
                    f"{location}: {problem}; refused: re-create the shard with torch.save."
                )
        import torch

        try:
            obj = torch.load(str(p), map_location="cpu", mmap=mmap and is_zip, weights_only=True)
            if isinstance(obj, torch.Tensor) and location.local_path is None:
                obj = obj.clone()  # the temporary copy goes away
        except pickle.UnpicklingError as exc:
            msg = str(exc)
            m = _GLOBAL_RE.search(msg)
            if m:
                raise UnsafeShardError(
                    f"{location}: the pickle asks for {m.group(1)!r}, which is not a plain tensor; refused and "
                    f"not executed. Do not load this file with weights_only=False; re-create it from a trusted "
                    f"source."
                ) from None
            raise CorruptShardError(
                f"{location}: the pickle is corrupt ({_first_line(msg)}); re-create the shard."
            ) from None
        except (
            RuntimeError,
            EOFError,
            ValueError,
            KeyError,
            OSError,
            IndexError,
            TypeError,
            AttributeError,
        ) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise CorruptShardError(
                f"{location}: cannot be loaded as a tensor file "
                f"({_first_line(str(exc)) or type(exc).__name__}); the file is truncated or damaged: re-create "
                f"the shard."
            ) from None
    if not isinstance(obj, torch.Tensor):
        raise NotATensorError(
            f"{location}: holds a {type(obj).__name__}, not a single tensor; save the tensor itself "
            f"(torch.save(tensor, path))."
        )
    return obj


def _first_line(msg: str) -> str:
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith("Weights only load failed"):
            return re.sub(r"\. This is an internal miniz error[^)]*", "", line)[:200]
    return msg.strip()[:200]


def probe_shard(
    location: Location, head: tuple[int, tuple[Any, ...], dict[int, bytes]] | None = None
) -> ShardHeader:
    """Shape, dtype and byte counts of a shard: torch-free for the plain pattern, else from ``torch.load``
    (legacy format, saved views, damaged or unsafe files -- these raise precise errors)."""
    header = fast_probe(location, head)
    if header is not None:
        return header
    st = location.stat()
    cached = _cached(location, st.identity)
    if cached is not None:
        return cached
    t = load_shard(location, mmap=True)
    with _local_file(location) as p:
        with _open_regular(p) as fh:
            legacy = fh.read(4) != ZIP_MAGIC
        where = None if legacy else _data_offset(p, t)
    return _remember(
        location,
        ShardHeader(
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            tensor_nbytes=t.numel() * t.element_size(),
            storage_nbytes=t.untyped_storage().nbytes(),
            file_nbytes=st.size,
            legacy=legacy,
            data_offset=where,
            identity=st.identity,
        ),
        by_torch=True,
    )


def _data_offset(path: Path, t: torch.Tensor) -> int | None:
    """Where a shard's tensor bytes start in its (uncompressed zip) file, if it is contiguous; else ``None``."""
    if not t.is_contiguous():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            records = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
            if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
                return None
            rec = records[0]
        if rec.file_size != t.untyped_storage().nbytes():
            return None
        with _open_regular(path) as fh:
            start = zip_data_start(fh, rec.header_offset)
        if start is None:
            return None
        return start + int(t.storage_offset()) * t.element_size()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
