"""Reading a ``.pt`` split on object storage (``s3://bucket/Activations/.../EM``) with ranged reads.

Opening a layer reads only the head and tail of each shard (``HEAD_BYTES`` + ``TAIL_BYTES``, one batch of
concurrent ranged GETs for the whole layer): the zip's central directory, the small ``data.pkl`` (parsed
without torch by :mod:`actfmt.checks.header`) and the data record's local header, which locate the tensor's
first byte.  Rows are then byte ranges — row ``i`` of a shard is ``data_offset + i * row_bytes`` — so a few
random rows cost a few small GETs, never a whole shard, and a block of rows is one GET per shard it touches,
all fetched concurrently.  A shard that is not the plain pattern (legacy format, a saved view, anything odd) is
downloaded once and loaded by ``torch.load(weights_only=True)``, with the same precise errors as locally.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from actfmt.errors import CorruptShardError, MetadataError, NotASplitError, ShardNotFoundError
from actfmt.formats.base import ACTFMT_KEY, LayerInfo, Reader, torch_dtype
from actfmt.formats.pt import ShardHeader
from actfmt.layout import METADATA_FILE, layer_index, layer_name, shard_index
from actfmt.remote import RemotePath, prefetch_shards

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


__all__ = ["RemotePtReader"]

#: Adjacent row ranges closer than this are fetched as one request (fewer GETs beat a few wasted bytes).
MERGE_GAP = 8 << 10


class _RemoteShard:
    __slots__ = ("layout", "path", "rows", "tensor")

    def __init__(self, path: RemotePath, layout: ShardHeader | None, tensor: torch.Tensor | None) -> None:
        self.path, self.layout, self.tensor = path, layout, tensor
        shape = layout.shape if layout is not None else tuple(tensor.shape)  # type: ignore[union-attr]
        if len(shape) != 2:
            raise CorruptShardError(f"{path}: shards must be 2-D, got {list(shape)}.")
        self.rows = int(shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout is not None:
            return self.layout.shape
        assert self.tensor is not None
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> str:
        if self.layout is not None:
            return self.layout.dtype
        assert self.tensor is not None
        return str(self.tensor.dtype).removeprefix("torch.")


def _probe_layout(path: RemotePath) -> ShardHeader | None:
    """The header of a plain, contiguous shard (rows readable by offset), else ``None``."""
    from actfmt.checks.header import fast_probe

    header = fast_probe(path)  # type: ignore[arg-type]
    return header if header is not None and header.data_offset is not None else None


class RemotePtReader(Reader):
    """A ``.pt`` split on object storage, read with ranged GETs (see the module docstring)."""

    format = "pt"

    def __init__(self, path: RemotePath) -> None:  # Reader.__init__ would make a local Path
        self.path = path  # type: ignore[assignment]
        if not path.is_dir():
            raise NotASplitError(f"{path}: not found, or not a directory of layer_XX/ prefixes.")
        layers = []
        for entry in path.iterdir():
            i = layer_index(entry.name)
            if i is not None and entry.is_dir():
                layers.append((i, entry))
        self._layer_dirs: list[tuple[int, RemotePath]] = sorted(layers, key=lambda t: t[0])
        self._shards: dict[int, list[_RemoteShard]] = {}
        self._offsets: dict[int, list[int]] = {}

    @cached_property
    def metadata(self) -> dict[str, Any]:
        p = self.path / METADATA_FILE
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise MetadataError(f"{p}: missing; every split needs a metadata.json.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MetadataError(f"{p}: not valid JSON ({exc}); fix the file.") from None
        if not isinstance(data, dict):
            raise MetadataError(f"{p}: must hold a JSON object.")
        return data

    @cached_property
    def actfmt(self) -> dict[str, Any] | None:
        from actfmt.formats.pt import SIDECAR

        p = self.path / SIDECAR
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            return None
        block = data.get(ACTFMT_KEY, data) if isinstance(data, dict) else None
        return block if isinstance(block, dict) else None

    def _load_layer(self, pos: int) -> list[_RemoteShard]:
        if pos not in self._shards:
            from actfmt.formats.pt import load_shard

            _, layer_dir = self._layer_dirs[pos]
            files = sorted(
                ((j, e) for e in layer_dir.iterdir() if (j := shard_index(e.name)) is not None),
                key=lambda t: t[0],
            )
            if not files:
                raise ShardNotFoundError(f"{layer_dir}: no shard_XXX.pt objects.")
            prefetch_shards([p for _, p in files])  # heads and tails of every shard, concurrently
            shards = []
            for _, p in files:
                layout = _probe_layout(p)
                shards.append(_RemoteShard(p, layout, None if layout is not None else load_shard(p)))  # type: ignore[arg-type]
            offsets = [0]
            for s in shards:
                offsets.append(offsets[-1] + s.rows)
            self._shards[pos], self._offsets[pos] = shards, offsets
        return self._shards[pos]

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        out = []
        for pos, (i, _) in enumerate(self._layer_dirs):
            shards = self._load_layer(pos)
            first = shards[0]
            out.append(
                LayerInfo(
                    name=layer_name(i),
                    index=i,
                    rows=self._offsets[pos][-1],
                    hidden_dim=int(first.shape[1]),
                    dtype=first.dtype,
                    shard_rows=tuple(s.rows for s in shards),
                )
            )
        return out

    # -- data ----------------------------------------------------------------------------------------------
    def _buffer(self, layer: int, rows: int) -> tuple[np.ndarray, torch.dtype, int]:
        import numpy as np

        info = self.layers[layer]
        out = np.empty((rows, info.hidden_dim), dtype={2: np.uint16, 4: np.uint32}[info.itemsize])
        return out, torch_dtype(info.dtype), info.hidden_dim * info.itemsize

    def _direct(self, layer: int, s: _RemoteShard) -> bool:
        info = self.layers[layer]
        return s.layout is not None and s.dtype == info.dtype and s.shape[1] == info.hidden_dim

    def _fetch(self, jobs: list[tuple[_RemoteShard, int, int, Any]], row_bytes: int) -> None:
        """Fill each ``dst`` (a numpy view) with rows ``[a, b)`` of its shard; one concurrent batch of GETs."""
        import numpy as np

        if not jobs:
            return
        ranges, paths = [], []
        for s, a, b, _ in jobs:
            assert s.layout is not None and s.layout.data_offset is not None
            base = s.layout.data_offset
            ranges.append((base + a * row_bytes, base + b * row_bytes))
            paths.append(s.path)
        got = paths[0].read_ranges(ranges, paths)
        for (s, a, b, dst), data in zip(jobs, got, strict=True):
            assert data is not None  # (read_ranges gives None only with missing_ok)
            if len(data) != (b - a) * row_bytes:
                raise CorruptShardError(
                    f"{s.path}: the object ends early; the shard is truncated: re-create it."
                )
            dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        import torch

        shards = self._load_layer(layer)
        offsets = self._offsets[layer]
        stop = offsets[-1] if stop is None else min(stop, offsets[-1])
        start = max(0, start)
        out, dtype, row_bytes = self._buffer(layer, max(0, stop - start))
        jobs = []
        for k, s in enumerate(shards):
            lo, hi = offsets[k], offsets[k + 1]
            if hi <= start or lo >= stop:
                continue
            a, b = max(start, lo), min(stop, hi)
            dst = out[a - start : b - start]
            if self._direct(layer, s):
                jobs.append((s, a - lo, b - lo, dst))
            else:
                assert s.tensor is not None
                torch.from_numpy(dst).view(dtype).copy_(s.tensor[a - lo : b - lo])
        self._fetch(jobs, row_bytes)
        return torch.from_numpy(out).view(dtype)

    def take(self, layer: int, rows: Any) -> torch.Tensor:
        """Rows in any order: runs of nearby rows become one ranged GET each, all fetched concurrently."""
        import numpy as np
        import torch

        shards = self._load_layer(layer)
        offsets = np.asarray(self._offsets[layer])
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise IndexError(f"row index out of range for {offsets[-1]} rows")
        out, dtype, row_bytes = self._buffer(layer, rows.size)
        if rows.size == 0:
            return torch.from_numpy(out).view(dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        got, _, _ = self._buffer(layer, uniq.size)
        which = np.searchsorted(offsets, uniq, side="right") - 1
        gap = max(1, MERGE_GAP // max(1, row_bytes))
        jobs, spans = [], []
        for k in np.unique(which).tolist():
            s = shards[k]
            sel = np.flatnonzero(which == k)
            local = uniq[sel] - offsets[k]
            if not self._direct(layer, s):
                assert s.tensor is not None
                torch.from_numpy(got[sel]).view(dtype).copy_(s.tensor[torch.from_numpy(local)])
                continue
            # runs of rows no more than `gap` apart: one range each
            cuts = np.flatnonzero(np.diff(local) > gap) + 1
            for part in np.split(np.arange(sel.size), cuts):
                a, b = int(local[part[0]]), int(local[part[-1]]) + 1
                buf, _, _ = self._buffer(layer, b - a)
                jobs.append((s, a, b, buf))
                spans.append((buf, sel[part], local[part] - a))
        self._fetch(jobs, row_bytes)
        for buf, dst_rows, src_rows in spans:
            got[dst_rows] = buf[src_rows]
        out[...] = got[inverse.reshape(-1)]
        return torch.from_numpy(out).view(dtype)

    def close(self) -> None:
        self._shards.clear()
        self._offsets.clear()
