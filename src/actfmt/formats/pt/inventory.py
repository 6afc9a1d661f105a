"""The ``.pt`` layout as validation sees it: every entry of a split that stands for a layer directory or a
shard, exactly or badly named, each shard's header (one batch of ranged reads per split, probed torch-free for
the plain pattern), and a shard's rows in bounded blocks for the deep pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actfmt.formats.dtypes import as_array
from actfmt.formats.inventory import Inventory, LayerEntry, ShardEntry, kind_detail, outside_error, run_each
from actfmt.formats.pt.header import load_shard, probe_shard, read_heads
from actfmt.formats.vectors import STATS_FILE
from actfmt.kernel import BITS
from actfmt.layout import LOOSE_LAYER_RE, LOOSE_SHARD_RE, METADATA_FILE, layer_index, shard_index
from actfmt.storage import Kind, Location, read_into

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["ALLOWED_SPLIT_FILES", "PtInventory", "inventory"]

#: Files a split may hold besides metadata.json and the layer directories (a converted .pt split's sidecar and
#: its statistics vectors).
ALLOWED_SPLIT_FILES = {METADATA_FILE, ".actfmt.json", STATS_FILE}
#: Rows read per step by the deep pass (bounded memory whatever the shard size).
DEEP_BLOCK_BYTES = 16 << 20


@dataclass
class PtInventory(Inventory):
    def blocks(self, entry: ShardEntry) -> Iterable[np.ndarray]:
        """The shard's rows as stored-dtype arrays of bounded size (by offset when plain, else through torch)."""
        import numpy as np  # heavy: not on the header-only path

        h = entry.header
        assert h is not None
        rows, width, dtype = h.shape[0], h.shape[1], h.dtype
        if h.data_offset is None:
            yield as_array(load_shard(entry.path, mmap=True), dtype)
            return
        row_bytes = width * (4 if dtype == "float32" else 2)
        step = max(1, DEEP_BLOCK_BYTES // max(1, row_bytes))
        where = entry.path.pinned(h.identity)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            buf = np.empty((n, width), dtype=BITS[dtype][0])
            read_into([(where, h.data_offset + start * row_bytes, buf.reshape(-1).view(np.uint8))])
            yield buf


def _scan_layer(layer: LayerEntry) -> None:
    try:
        entries = layer.path.list_dir()
    except OSError as exc:
        layer.list_error = exc
        return
    exact_indices = {shard_index(e.name) for e in entries} - {None}
    for e in entries:
        loc = f"{layer.location}/{e.name}"
        i = shard_index(e.name)
        if i is not None:
            layer.shards.append(ShardEntry(i, e.location, loc, exact=True, kind=e.kind))
            continue
        m = LOOSE_SHARD_RE.match(e.name)
        if m is not None:
            j = int(m.group(1))
            layer.shards.append(
                ShardEntry(j, e.location, loc, exact=False, shadowed=j in exact_indices, kind=e.kind)
            )
            continue
        layer.strays.append((loc, e.kind == Kind.DIR))
    for s in layer.shards:
        if s.kind != "file":
            e = next(x for x in entries if x.location == s.path)
            s.error = outside_error(e) if e.kind == Kind.OUTSIDE else OSError(kind_detail(e))


def inventory(location: Location, loc: Callable[[str], str], jobs: int = 1) -> PtInventory:
    """List the split (``loc`` turns a name in it into the location findings print), its layer directories
    and their shards; probe every shard's header."""
    inv = PtInventory(metadata_file=METADATA_FILE)
    try:
        entries = location.list_dir()
    except OSError as exc:
        inv.list_error = exc
        return inv
    inv.metadata_entry = next((e for e in entries if e.name == METADATA_FILE), None)
    exact_indices = {layer_index(e.name) for e in entries if e.is_dir()} - {None}
    for e in entries:
        if e.name in ALLOWED_SPLIT_FILES:
            continue
        where = loc(e.name)
        is_dir = e.is_dir()
        i = layer_index(e.name)
        if i is not None and e.kind == Kind.OUTSIDE:  # a layer directory out of the tree: never listed
            layer = LayerEntry(i, e.location, where, exact=True, is_dir=True)
            layer.list_error = outside_error(e)
            inv.layers.append(layer)
            continue
        if i is not None:
            inv.layers.append(LayerEntry(i, e.location, where, exact=True, is_dir=is_dir))
            continue
        m = LOOSE_LAYER_RE.match(e.name)
        if m is not None and is_dir:
            j = int(m.group(1))
            inv.layers.append(
                LayerEntry(j, e.location, where, exact=False, is_dir=True, shadowed=j in exact_indices)
            )
            continue
        inv.strays.append((where, is_dir))
    for layer in inv.layers:
        if layer.is_dir and layer.list_error is None:
            _scan_layer(layer)
    shards = [s for s in inv.all_shards() if s.error is None]
    heads = read_heads([s.path for s in shards])  # one batch of ranged reads for the split

    def probe(entry: ShardEntry) -> None:
        try:
            # torch-free for the plain pattern; anything else (legacy, damaged, unsafe) is torch's to judge
            entry.header = probe_shard(entry.path, heads.get(entry.path))
        except Exception as exc:  # a broken file is a finding, never a crash (classified by the ACT0xx rules)
            entry.error = exc

    run_each(probe, shards, jobs)
    return inv
