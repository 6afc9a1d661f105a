"""The seed's sharded ``.pt`` layout: ``{split}/layer_XX/shard_XXX.pt`` + ``metadata.json``.

:mod:`~actfmt.formats.pt.header` probes shards without torch, :mod:`~actfmt.formats.pt.reader` reads rows by
offset, :mod:`~actfmt.formats.pt.writer` writes ``torch.save``-compatible shards without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from actfmt.formats.base import Format
from actfmt.formats.pt.header import ShardHeader, fast_probe, load_shard, probe_shard
from actfmt.formats.pt.inventory import inventory
from actfmt.formats.pt.reader import SIDECAR, PtReader, list_layers, list_shards
from actfmt.formats.pt.writer import PtWriter
from actfmt.layout import LOOSE_LAYER_RE, METADATA_FILE
from actfmt.storage import Entry, Location

__all__ = [
    "SIDECAR",
    "PtFormat",
    "PtReader",
    "PtWriter",
    "ShardHeader",
    "fast_probe",
    "list_layers",
    "list_shards",
    "load_shard",
    "probe_shard",
]


class PtFormat(Format):
    """The producer's own layout: a directory per split, ``metadata.json`` and ``layer_XX/shard_XXX.pt``."""

    name = "pt"
    suffixes = ()  # a directory named like the split (EM/)
    reader = PtReader
    writer = PtWriter
    inventory = staticmethod(inventory)

    looks_like = "a directory with metadata.json and layer_XX/ directories"
    fallback = True  # any directory with a metadata.json: asked after the formats that keep one too

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        """A directory with ``metadata.json``, or with ``layer_XX``-like subdirectories (a split whose metadata is
        missing is still a split: validation says what is wrong).  Detection asks every other format first
        (:attr:`fallback`): safetensors and npy directories hold a ``metadata.json`` too."""
        if entries is None:
            return False
        names = {e.name for e in entries}
        if METADATA_FILE in names:
            return True
        return any(LOOSE_LAYER_RE.match(e.name) and e.is_dir() for e in entries)
