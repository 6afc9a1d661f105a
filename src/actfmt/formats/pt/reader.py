"""Reading the seed's sharded ``.pt`` layout: ``{split}/layer_XX/shard_XXX.pt`` + ``metadata.json``.

Opening a layer reads the head and tail of each shard (one batch of ranged reads for the layer) and parses
each small pickle without torch (:mod:`actfmt.formats.pt.header`).  A plain shard's rows are then byte ranges
of its file -- row ``i`` is at ``data_offset + i * row_bytes`` -- read by :class:`~actfmt.formats.base.RowStore`
straight into the output buffer (``preadv`` locally; a few random rows from object storage cost a few small
GETs, never a whole shard).  Shards that cannot be read that way (the legacy format, saved views) are loaded by
``torch.load(weights_only=True)``, downloaded first when remote.

Every shard's identity (size, mtime, inode) is pinned when the layer is opened: a shard replaced or rewritten
afterwards is a :class:`~actfmt.errors.ChangedError`, never other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from actfmt.errors import ChangedError, CorruptShardError, NotASplitError, ShardNotFoundError
from actfmt.formats.base import (
    ACTFMT_KEY,
    LayerInfo,
    RowStore,
    RowStoreReader,
    Segment,
    fingerprint_of,
    stored_dtype,
)
from actfmt.formats.layerfiles import read_json_object
from actfmt.formats.pt.header import ShardHeader, load_shard, probe_shard, read_heads
from actfmt.layout import (
    METADATA_FILE,
    layer_index,
    layer_name,
    read_json_document,
    shard_index,
)
from actfmt.storage import Kind, Location

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["SIDECAR", "PtReader", "list_layers", "list_shards"]

#: Where a converted ``.pt`` split keeps the actfmt block (metadata.json keeps the producer's keys only).
SIDECAR = ".actfmt.json"


def list_layers(split: Location) -> list[tuple[int, Location]]:
    """Correctly named ``layer_XX`` directories, sorted by index.  A layer that is listed but cannot be reached
    (a dangling link, or a directory moved away while the split is listed) is an error, never a layer left out."""
    out = []
    for e in split.list_dir():
        if (i := layer_index(e.name)) is None:
            continue
        if e.followed().kind == Kind.MISSING:
            raise ShardNotFoundError(
                f"{e.location}: listed but cannot be reached (a dangling link, or moved while the split was "
                f"being opened); check the split, then open it again."
            )
        if e.is_dir():
            out.append((i, e.location))
    return out


def list_shards(layer_dir: Location) -> list[tuple[int, Location]]:
    """Correctly named ``shard_XXX.pt`` files, sorted by index."""
    return sorted((j, e.location) for e in layer_dir.list_dir() if (j := shard_index(e.name)) is not None)


class PtReader(RowStoreReader):
    """A split in the producer's ``.pt`` layout (see the module docstring)."""

    format = "pt"

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        st = location.stat() if location.kind() is not None else None
        if st is None or st.kind != Kind.DIR:
            raise NotASplitError(f"{location}: not a directory; a .pt split is a directory with layer_XX/.")
        #: The split directory as it was opened (locally: its inode): a tree renamed into its place since
        #: (``convert --overwrite``) is a ChangedError, never rows of two trees.
        self._dir_identity = _dir_identity(location, st)
        self._layer_dirs = list_layers(location)
        if not self._layer_dirs:
            raise NotASplitError(
                f"{location}: no layer_XX directories; a .pt split is a directory with layer_XX/."
            )
        self._stores: dict[int, RowStore] = {}
        self._headers: dict[int, list[ShardHeader]] = {}
        self._check_unchanged()

    def _check_unchanged(self, layer_dir: Location | None = None, expected: Any = None) -> None:
        """Raise :class:`ChangedError` if the split directory (or ``layer_dir``) is no longer the one opened."""
        checks = [(self.location, self._dir_identity)]
        if layer_dir is not None:
            checks.append((layer_dir, expected))
        for loc, identity in checks:
            if identity is None:
                continue
            try:
                now = _dir_identity(loc, loc.stat())
            except FileNotFoundError:
                now = None
            if now != identity:
                raise ChangedError(
                    f"{loc}: replaced (renamed, rewritten or removed) while it was being read; open the split "
                    f"again."
                )

    @cached_property
    def metadata(self) -> dict[str, Any]:
        data = read_json_object(self.location / METADATA_FILE, "every split needs a metadata.json")
        self._check_unchanged()
        return data

    @cached_property
    def actfmt(self) -> dict[str, Any] | None:
        try:
            data = read_json_document(self.location / SIDECAR)
        except (OSError, ValueError):
            return None
        block = data.get(ACTFMT_KEY, data) if isinstance(data, dict) else None
        return block if isinstance(block, dict) else None

    def row_store(self, pos: int) -> RowStore:
        store = self._stores.get(pos)
        if store is not None:
            return store
        _, layer_dir = self._layer_dirs[pos]
        layer_identity = _dir_identity(layer_dir, layer_dir.stat())
        self._check_unchanged()
        files = [loc for _, loc in list_shards(layer_dir)]
        if not files:
            raise ShardNotFoundError(f"{layer_dir}: no shard_XXX.pt files.")
        heads = read_heads(files)
        headers = [probe_shard(f, heads.get(f)) for f in files]
        for f, h in zip(files, headers, strict=True):
            if len(h.shape) != 2:
                raise CorruptShardError(f"{f}: shards must be 2-D, got {list(h.shape)}.")
        width, dtype = int(headers[0].shape[1]), headers[0].dtype
        segments = []
        for f, h in zip(files, headers, strict=True):
            if h.shape[1] != width:
                raise CorruptShardError(
                    f"{f}: {h.shape[1]} columns, but the layer's first shard has {width}; re-create the shard."
                )
            if h.data_offset is not None and h.dtype == dtype:
                segments.append(Segment(f.pinned(h.identity), h.data_offset, int(h.shape[0])))
            else:  # legacy format, a saved view or a mismatched shard: torch loads it
                segments.append(Segment(f, -1, int(h.shape[0]), _loaded(f, dtype)))
        # every shard read is the one at its path now, in the directories opened: one tree, never two
        for f, h in zip(files, headers, strict=True):
            if h.identity and layer_identity is not None and f.stat().identity != h.identity:
                raise ChangedError(f"{f}: replaced while the split was being read; open the split again.")
        self._check_unchanged(layer_dir, layer_identity)
        store = RowStore(segments, width, dtype)
        self._stores[pos], self._headers[pos] = store, headers
        return store

    @cached_property
    def layers(self) -> Sequence[LayerInfo]:
        return [self.layer_info(pos) for pos in range(len(self._layer_dirs))]

    def layer_info(self, layer: int) -> LayerInfo:
        store = self.row_store(layer)
        return LayerInfo(
            name=layer_name(self._layer_dirs[layer][0]),
            index=self._layer_dirs[layer][0],
            rows=store.rows,
            hidden_dim=store.hidden_dim,
            dtype=self._headers[layer][0].dtype,
            shard_rows=tuple(s.rows for s in store.segments),
        )

    def position(self, name: str) -> int | None:
        i = layer_index(name)
        return next((pos for pos, (j, _) in enumerate(self._layer_dirs) if j == i), None)

    def fingerprint(self, layer: int) -> str | None:
        _, layer_dir = self._layer_dirs[layer]
        try:
            return fingerprint_of([loc for _, loc in list_shards(layer_dir)])
        except OSError:
            return "unreadable"

    def close(self) -> None:
        self._stores.clear()
        self._headers.clear()


def _dir_identity(location: Location, st: Any) -> tuple[Any, ...] | None:
    """What names a directory locally (device and inode: a rename keeps them, a replacement does not); ``None``
    on object storage (no directories)."""
    if not location.is_local or len(st.identity) < 4:
        return None
    return tuple(st.identity[2:4])


def _loaded(location: Location, dtype: str) -> np.ndarray:
    """A shard torch had to load, as a stored-dtype array (cast to the layer's dtype when it differs)."""
    import numpy as np
    import torch

    from actfmt.formats.base import torch_dtype

    t = load_shard(location).to(torch_dtype(dtype)).contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return np.ascontiguousarray(t.numpy()).view(stored_dtype(dtype))
