"""Format registry: name -> "module:Class", imported lazily so ``import actfmt`` stays light."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from actfmt.errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.formats.base import Format, Reader

__all__ = ["FORMATS", "get_format", "guess_format", "open_reader"]

#: Registry, in detection order (the most specific signature first).
FORMATS: dict[str, str] = {
    "zarr": "actfmt.formats.zarr_:ZarrFormat",
    "hdf5": "actfmt.formats.hdf5:HDF5Format",
    "safetensors": "actfmt.formats.safetensors_:SafetensorsFormat",
    "pt": "actfmt.formats.pt:PtFormat",
}
ALIASES = {"h5": "hdf5", "torch": "pt", "st": "safetensors"}


def get_format(name: str) -> type[Format]:
    """The Format class registered under ``name`` (``zarr``, ``hdf5``, ``safetensors``, ``pt``)."""
    key = ALIASES.get(name.lower(), name.lower())
    try:
        target = FORMATS[key]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def guess_format(path: str | Path) -> str | None:
    """The name of the format whose split ``path`` is, or ``None`` when it is not a split."""
    p = Path(path)
    for name in FORMATS:
        if get_format(name).can_open(p):
            return name
    return None


def open_reader(path: str | Path, format: str | None = None) -> Reader:
    """Open one split for reading, detecting its format unless given."""
    p = Path(path)
    name = format or guess_format(p)
    if name is None:
        from actfmt.errors import NotASplitError

        if not p.exists():
            raise NotASplitError(f"{p}: no such file or directory; check the path.")
        raise NotASplitError(
            f"{p}: not a split in any known format (expected metadata.json + layer_XX/, a .zarr, "
            f"a .h5 or layer_XX.safetensors files)."
        )
    return get_format(name).open_reader(p)
