"""The table of formats (name -> ``"module:Class"``) and what their declarations say about naming.

This is the bottom of :mod:`actfmt.formats`: it imports no format and nothing above :mod:`actfmt.errors`, so the
Format protocol itself (:mod:`~actfmt.formats.base`) can ask it which suffixes the registered formats name their
stores with.  A format is registered by one line of :data:`FORMATS`; everything else about it is declared on its
``Format`` class (suffixes, capabilities, what a split of it looks like, its write options).  The typed API
(:func:`~actfmt.formats.registry.get_format`, :func:`~actfmt.formats.registry.open_reader`...) is
:mod:`actfmt.formats.registry`, which re-exports these names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from actfmt.errors import FormatError

__all__ = ["ALIASES", "FORMATS", "canonical", "load", "split_name", "store_suffixes", "strip_suffix"]

#: Registry, in detection order (the most specific signature first; a format declaring ``fallback``, pt, is asked
#: last wherever it is listed).  One line per format.
FORMATS: dict[str, str] = {
    "zarr": "actfmt.formats.zarr:ZarrFormat",
    "hdf5": "actfmt.formats.hdf5:HDF5Format",
    "safetensors": "actfmt.formats.safetensors:SafetensorsFormat",
    "npy": "actfmt.formats.npy:NpyFormat",
    "pt": "actfmt.formats.pt:PtFormat",
}
#: Other names a format answers to (``--to h5``).
ALIASES = {"h5": "hdf5", "torch": "pt", "st": "safetensors"}


def canonical(name: str) -> str:
    """The registered name of ``name`` or of the format it is an alias of; :class:`FormatError` when unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")
    return key


def load(name: str) -> Any:
    """The Format class registered under ``name`` (or an alias), imported on first use (typed:
    :func:`actfmt.formats.registry.get_format`)."""
    module, _, cls = FORMATS[canonical(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def store_suffixes() -> tuple[str, ...]:
    """Every suffix a registered format names its stores with (``.zarr``, ``.h5``, ``.hdf5``...), longest
    first: the one list of them (each format declares its own, ``Format.suffixes``)."""
    out = {s for name in FORMATS for s in load(name).suffixes}
    return tuple(sorted(out, key=lambda s: (-len(s), s)))


def strip_suffix(name: str, suffixes: Sequence[str]) -> str:
    """``name`` without the first of ``suffixes`` it ends with (a name that is only a suffix is kept)."""
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def split_name(name: str) -> str:
    """The split a store called ``name`` holds: ``name`` without a registered format's suffix
    (``EM.zarr`` -> ``EM``; ``EM`` and a name that is only a suffix stay as they are)."""
    return strip_suffix(name, store_suffixes())
