"""A header-only probe of ``.pt`` shards that needs no torch: shape, dtype and byte counts from ``data.pkl``.

``torch.save`` writes an uncompressed zip whose small ``data.pkl`` names the tensor's storage type, shape and
storage size.  For the plain pattern every producer writes (``_rebuild_tensor_v2`` over one storage) this
module reads that pickle with an unpickler whose globals are *stubs that only record their arguments*:
nothing from the file is ever called.  Anything else — another global, the legacy format, a damaged zip,
a storage record whose size disagrees — returns ``None`` and the caller falls back to
:func:`actfmt.formats.pt.probe_shard` (``torch.load(mmap=True, weights_only=True)``), which classifies it.
Validating a tree header-only therefore never imports torch.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from actfmt.formats.pt import ShardHeader, zip_data_start

__all__ = ["fast_probe", "probe_zip"]

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


class _Fallback(Exception):
    pass


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


def fast_probe(path: str | Path) -> ShardHeader | None:
    """The shard's header without torch, or ``None`` when the file is not the plain pattern (then ask torch).

    ``OSError`` (permissions, a directory) propagates, as from :func:`~actfmt.formats.pt.probe_shard`.
    A remote shard (:class:`~actfmt.remote.RemotePath`) is probed with two small ranged reads.
    """
    from actfmt.remote import RemotePath

    if isinstance(path, RemotePath):
        from actfmt.remote import open_shard

        with open_shard(path) as rf:
            return probe_zip(rf, rf.seek(0, 2))
    p = Path(path)
    with open(p, "rb") as fh:
        return probe_zip(fh, fh.seek(0, 2))


def probe_zip(fh: BinaryIO, size: int) -> ShardHeader | None:
    """:func:`fast_probe` over a seekable binary file of ``size`` bytes (a local file, or ranged reads).

    Also reads the data record's local header: ``data_offset`` is where the tensor's first element is in the
    file when the tensor is contiguous (rows can then be read by offset), else ``None``.
    """
    fh.seek(0)
    if fh.read(4) != b"PK\x03\x04":
        return None
    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1 or infos[pkl[0]].file_size > 1 << 20:
                return None
            prefix = pkl[0][: -len("data.pkl")]
            obj = _Unpickler(_Reader(zf.read(pkl[0]))).load()
            if not isinstance(obj, _Tensor):
                return None
            st = obj.storage
            rec = infos.get(f"{prefix}data/{st.key}")
            nbytes = st.numel * st.stype.itemsize
            if rec is None or rec.compress_type != zipfile.ZIP_STORED or rec.file_size != nbytes:
                return None
            if rec.header_offset + nbytes > size:
                return None
            numel = math.prod(obj.size)
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


class _Reader:
    """A minimal file-like object over bytes for the unpickler."""

    def __init__(self, data: bytes) -> None:
        import io

        self._f = io.BytesIO(data)
        self.read = self._f.read
        self.readline = self._f.readline
        self.readinto = self._f.readinto
