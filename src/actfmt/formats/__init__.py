"""The formats: one module (or small package) per format, each a Reader and a Writer over :mod:`actfmt.storage`.

Each format declares what it supports (``remote_read``, ``remote_write``, ``parallel_layers``,
``compressions``); callers consult the registry (:mod:`~actfmt.formats.registry`) instead of refusing in
scattered places.  :func:`walk_splits` is the one split walker.
"""

from __future__ import annotations

from actfmt.formats.inventory import Inventory, LayerEntry, ShardEntry, kind_detail, outside_error, run_each
from actfmt.formats.registry import (
    ALIASES,
    FORMATS,
    all_compressions,
    formats,
    get_format,
    guess_format,
    no_split_found,
    open_reader,
    shared_reader,
    split_name,
    store_suffixes,
)
from actfmt.formats.walk import FoundSplit, Walk, WalkProblem, find_splits, walk_splits

__all__ = [
    "ALIASES",
    "FORMATS",
    "FoundSplit",
    "Inventory",
    "LayerEntry",
    "ShardEntry",
    "Walk",
    "WalkProblem",
    "all_compressions",
    "find_splits",
    "formats",
    "get_format",
    "guess_format",
    "kind_detail",
    "no_split_found",
    "open_reader",
    "outside_error",
    "run_each",
    "shared_reader",
    "split_name",
    "store_suffixes",
    "walk_splits",
]
