"""The seed's sharded ``.pt`` layout: ``{split}/layer_XX/shard_XXX.pt`` + ``metadata.json``.

Shards are opened with ``torch.load(mmap=True, weights_only=True)``: shape and dtype come from the small
pickle, data pages are touched only when rows are read.  Files in the legacy (non-zip) format cannot be
memory-mapped and fall back to a full ``weights_only`` load.  A pickle that asks for anything beyond plain
tensors is refused by ``weights_only`` and never executed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import (
    CorruptShardError,
    MetadataError,
    NotASplitError,
    NotATensorError,
    ShardNotFoundError,
    UnsafeShardError,
)
from actfmt.formats.base import ACTFMT_KEY, Format, LayerInfo, Reader, SplitSpec, WriteOptions, Writer
from actfmt.layout import (
    LOOSE_LAYER_RE,
    METADATA_FILE,
    expected_shard_rows,
    layer_index,
    layer_name,
    shard_index,
    shard_name,
    write_json,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["SIDECAR", "PtFormat", "PtReader", "PtWriter", "ShardHeader", "load_shard", "probe_shard"]

#: Where a converted ``.pt`` split keeps the actfmt block (metadata.json keeps the producer's keys only).
SIDECAR = ".actfmt.json"
ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


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
    #: (rows can then be read with ``pread``), else ``None``.
    data_offset: int | None = None


def load_shard(path: str | Path, mmap: bool = True) -> torch.Tensor:
    """Load one shard safely; raise a precise :class:`~actfmt.errors.ActfmtError` on bad input.

    ``OSError`` (permissions, I/O) propagates as itself, with the file name.
    """
    import pickle

    import torch

    from actfmt.remote import RemotePath

    if isinstance(path, RemotePath):  # object storage: a local copy of this one file (deep reads, odd files)
        from actfmt.remote import local_copy, relabel

        with local_copy(path) as local:
            try:
                return load_shard(local, mmap=False)
            except Exception as exc:
                raise relabel(exc, local, path) from None
    p = Path(path)
    with open(p, "rb") as fh:  # OSError (ACT001) propagates
        magic = fh.read(4)
    if not magic:
        raise CorruptShardError(f"{p}: empty file (0 bytes); re-create the shard or remove it.")
    is_zip = magic == ZIP_MAGIC
    if not is_zip and magic[:1] != b"\x80":
        raise CorruptShardError(
            f"{p}: not a torch.save file (starts with {magic!r}, expected a zip archive); re-create the shard."
        )
    try:
        obj = torch.load(str(p), map_location="cpu", mmap=mmap and is_zip, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        m = _GLOBAL_RE.search(msg)
        if m:
            raise UnsafeShardError(
                f"{p}: the pickle asks for {m.group(1)!r}, which is not a plain tensor; refused and not "
                f"executed. Do not load this file with weights_only=False; re-create it from a trusted source."
            ) from None
        raise CorruptShardError(
            f"{p}: the pickle is corrupt ({_first_line(msg)}); re-create the shard."
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
            f"{p}: cannot be loaded as a tensor file ({_first_line(str(exc)) or type(exc).__name__}); "
            f"the file is truncated or damaged: re-create the shard."
        ) from None
    if not isinstance(obj, torch.Tensor):
        raise NotATensorError(
            f"{p}: holds a {type(obj).__name__}, not a single tensor; save the tensor itself "
            f"(torch.save(tensor, path))."
        )
    return obj


def _first_line(msg: str) -> str:
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith("Weights only load failed"):
            return line[:200]
    return msg.strip()[:200]


def probe_shard(path: str | Path) -> ShardHeader:
    """Shape, dtype and byte counts of a shard, reading only its header (legacy files: a full load)."""
    from actfmt.remote import RemotePath

    if isinstance(path, RemotePath):  # only for files the torch-free probe could not read: download it
        from actfmt.remote import local_copy, relabel

        with local_copy(path) as local:
            try:
                return probe_shard(local)
            except Exception as exc:
                raise relabel(exc, local, path) from None
    p = Path(path)
    t = load_shard(p, mmap=True)
    legacy = not _is_zip(p)
    where = None if legacy else _data_offset(p, t)
    return ShardHeader(
        shape=tuple(t.shape),
        dtype=str(t.dtype).removeprefix("torch."),
        tensor_nbytes=t.numel() * t.element_size(),
        storage_nbytes=t.untyped_storage().nbytes(),
        file_nbytes=p.stat().st_size,
        legacy=legacy,
        data_offset=None if where is None else where[1],
    )


def _is_zip(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(4) == ZIP_MAGIC


def list_layers(split: Path) -> list[tuple[int, Path]]:
    """Correctly named ``layer_XX`` directories, sorted by index."""
    out = []
    for entry in split.iterdir():
        i = layer_index(entry.name)
        if i is not None and entry.is_dir():
            out.append((i, entry))
    return sorted(out)


def list_shards(layer_dir: Path) -> list[tuple[int, Path]]:
    """Correctly named ``shard_XXX.pt`` files, sorted by index."""
    out = []
    for entry in layer_dir.iterdir():
        j = shard_index(entry.name)
        if j is not None:
            out.append((j, entry))
    return sorted(out)


class _ShardRef:
    """One shard of a layer: its file, its header, and (loaded only when needed) its memory-mapped tensor."""

    __slots__ = ("header", "path", "tensor")

    def __init__(self, path: Path, header: ShardHeader) -> None:
        self.path = path
        self.header = header
        self.tensor: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.header.shape[0]

    def load(self) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = load_shard(self.path)
        return self.tensor


class PtReader(Reader):
    """A split in the producer's ``.pt`` layout.

    Opening reads each shard's small pickle only (no torch needed for the plain pattern).  Rows are read with
    ``pread`` straight into one output buffer — no shard page is mapped into the process, no ``torch.cat`` —
    and shards that cannot be read that way (legacy format, saved views) are memory-mapped by ``torch.load``.
    """

    format = "pt"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not self.path.is_dir():
            raise NotASplitError(f"{self.path}: not a directory; a .pt split is a directory with layer_XX/.")
        self._layer_dirs = list_layers(self.path)
        self._shards: dict[int, list[_ShardRef]] = {}
        self._offsets: dict[int, list[int]] = {}

    @cached_property
    def metadata(self) -> dict[str, Any]:
        p = self.path / METADATA_FILE
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MetadataError(f"{p}: missing; every split needs a metadata.json.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MetadataError(f"{p}: not valid JSON ({exc}); fix the file.") from None
        if not isinstance(data, dict):
            raise MetadataError(f"{p}: must hold a JSON object.")
        return data

    @cached_property
    def actfmt(self) -> dict[str, Any] | None:
        p = self.path / SIDECAR
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        block = data.get(ACTFMT_KEY, data) if isinstance(data, dict) else None
        return block if isinstance(block, dict) else None

    def _load_layer(self, pos: int) -> list[_ShardRef]:
        if pos not in self._shards:
            from actfmt.checks.header import fast_probe

            _, layer_dir = self._layer_dirs[pos]
            shards = [_ShardRef(p, fast_probe(p) or probe_shard(p)) for _, p in list_shards(layer_dir)]
            if not shards:
                raise ShardNotFoundError(f"{layer_dir}: no shard_XXX.pt files.")
            for ref in shards:
                if len(ref.header.shape) != 2:
                    raise CorruptShardError(f"{ref.path}: shards must be 2-D, got {ref.header.shape}.")
            offsets = [0]
            for ref in shards:
                offsets.append(offsets[-1] + ref.rows)
            self._shards[pos] = shards
            self._offsets[pos] = offsets
        return self._shards[pos]

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        out = []
        for pos, (i, _) in enumerate(self._layer_dirs):
            shards = self._load_layer(pos)
            first = shards[0].header
            out.append(
                LayerInfo(
                    name=layer_name(i),
                    index=i,
                    rows=self._offsets[pos][-1],
                    hidden_dim=int(first.shape[1]),
                    dtype=first.dtype,
                    shard_rows=tuple(ref.rows for ref in shards),
                )
            )
        return out

    def _buffer(self, layer: int, rows: int) -> tuple[Any, torch.dtype, int]:
        import numpy as np

        from actfmt.formats.base import torch_dtype

        info = self.layers[layer]
        unsigned = {2: np.uint16, 4: np.uint32}[info.itemsize]
        out = np.empty((rows, info.hidden_dim), dtype=unsigned)  # numpy: huge pages for big buffers
        return out, torch_dtype(info.dtype), info.hidden_dim * info.itemsize

    def _direct(self, layer: int, ref: _ShardRef) -> bool:
        info = self.layers[layer]
        h = ref.header
        return h.data_offset is not None and h.dtype == info.dtype and h.shape[1] == info.hidden_dim

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import torch

        shards = self._load_layer(layer)
        offsets = self._offsets[layer]
        total = offsets[-1]
        stop = total if stop is None else min(stop, total)
        start = max(0, start)
        out, dtype, row_bytes = self._buffer(layer, max(0, stop - start))
        for k, ref in enumerate(shards):
            lo, hi = offsets[k], offsets[k + 1]
            if hi <= start or lo >= stop:
                continue
            a, b = max(start, lo), min(stop, hi)
            if self._direct(layer, ref):
                assert ref.header.data_offset is not None
                _pread_into(
                    ref.path, ref.header.data_offset + (a - lo) * row_bytes, out[a - start : b - start]
                )
            else:  # legacy format, a saved view or a mismatched shard: copy from the loaded tensor
                torch.from_numpy(out[a - start : b - start]).view(dtype).copy_(ref.load()[a - lo : b - lo])
        return torch.from_numpy(out).view(dtype)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        import numpy as np
        import torch

        shards = self._load_layer(layer)
        offsets = np.asarray(self._offsets[layer])
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise IndexError(f"row index out of range for {offsets[-1]} rows")
        out, dtype, row_bytes = self._buffer(layer, rows.size)
        which = np.searchsorted(offsets, rows, side="right") - 1
        for k in np.unique(which):
            ref = shards[k]
            sel = np.flatnonzero(which == k)
            local = rows[sel] - offsets[k]
            if self._direct(layer, ref):
                assert ref.header.data_offset is not None
                fd = os.open(ref.path, os.O_RDONLY)
                try:
                    for j, r in zip(sel.tolist(), local.tolist(), strict=True):
                        _pread_fd(fd, ref.path, ref.header.data_offset + r * row_bytes, out[j])
                finally:
                    os.close(fd)
            else:  # legacy format or a saved view: index the loaded tensor
                picked = ref.load()[torch.from_numpy(local)].to(dtype)
                torch.from_numpy(out).view(dtype)[torch.from_numpy(sel)] = picked
        return torch.from_numpy(out).view(dtype)

    def close(self) -> None:
        self._shards.clear()
        self._offsets.clear()


def _data_offset(path: Path, t: torch.Tensor) -> tuple[Path, int] | None:
    """Where a shard's tensor bytes start in its (uncompressed zip) file, if it is contiguous; else ``None``."""
    import zipfile

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
        with open(path, "rb") as fh:
            start = zip_data_start(fh, rec.header_offset)
        if start is None:
            return None
        return path, start + int(t.storage_offset()) * t.element_size()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def zip_data_start(fh: Any, header_offset: int) -> int | None:
    """Where a stored zip record's bytes start: after its 30-byte local header, file name and extra field."""
    import struct

    fh.seek(header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != ZIP_MAGIC:
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(header_offset + 30 + name_len + extra_len)


def _pread_into(path: Path, offset: int, out: Any) -> None:
    """Fill the numpy array ``out`` with bytes of ``path`` from ``offset`` (looping over short reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _pread_fd(fd, path, offset, out)
    finally:
        os.close(fd)


def _pread_fd(fd: int, path: Path, offset: int, out: Any) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptShardError(f"{path}: the file ends early; the shard is truncated: re-create it.")
        done += n


class PtWriter(Writer):
    """Writes contiguous shards with the source's row boundaries (else the producer's arithmetic)."""

    format = "pt"
    parallel_layers = True

    @classmethod
    def create(cls, path: str | Path, spec: SplitSpec, options: WriteOptions) -> PtWriter:
        if options.compression not in (None, "none"):
            from actfmt.errors import ConversionError

            raise ConversionError(f"the pt format has no compression (got {options.compression!r}).")
        p = Path(path)
        p.mkdir(parents=True)
        for info in spec.layers:
            (p / info.name).mkdir()
        return cls(p, spec, options)

    def block_rows(self, layer: int) -> list[int]:
        info = self.spec.layers[layer]
        if info.shard_rows:
            return list(info.shard_rows)
        meta = self.spec.metadata
        try:
            return expected_shard_rows(info.rows, int(meta["shard_size"]), int(meta["batch_size"]))
        except (KeyError, TypeError, ValueError):
            return super().block_rows(layer)

    def write(self, layer: int, start: int, data: torch.Tensor) -> None:
        import torch

        info = self.spec.layers[layer]
        bounds = self.block_rows(layer)
        offset, k = 0, 0
        while offset < start:
            offset += bounds[k]
            k += 1
        if offset != start or bounds[k] != data.shape[0]:
            raise ValueError(f"pt writer: block at row {start} of {len(data)} rows is not a shard boundary")
        t = data
        if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()  # never save a view: torch.save writes the whole storage
        target = self.path / info.name / shard_name(k)
        tmp = target.with_name(target.name + ".tmp")
        torch.save(t, tmp)
        os.replace(tmp, target)

    def finalize(self, block: dict[str, Any]) -> None:
        meta = {k: v for k, v in self.spec.metadata.items() if k != ACTFMT_KEY}
        write_json(self.path / METADATA_FILE, meta)
        write_json(self.path / SIDECAR, {ACTFMT_KEY: block})


class PtFormat(Format):
    name = "pt"
    suffix = ""
    compressions = ("none",)

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_dir():
            return False
        if (path / METADATA_FILE).is_file():
            return not any(path.glob("layer_*.safetensors"))
        try:
            return any(LOOSE_LAYER_RE.match(e.name) and e.is_dir() for e in path.iterdir())
        except OSError:
            return False

    @classmethod
    def open_reader(cls, path: str | Path) -> PtReader:
        from actfmt.remote import RemotePath

        if isinstance(path, RemotePath):
            from actfmt.formats.pt_remote import RemotePtReader

            return RemotePtReader(path)
        return PtReader(path)

    @classmethod
    def writer_class(cls) -> type[Writer]:
        return PtWriter
