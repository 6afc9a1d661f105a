"""Format registry: name -> "module:Class", imported lazily so ``import actfmt`` stays light."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actfmt.errors import FormatError
from actfmt.remote import as_path, is_remote

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.formats.base import Format, Reader

__all__ = ["FORMATS", "find_splits", "get_format", "guess_format", "open_reader"]

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
    p = as_path(path)
    if is_remote(p) and p.suffix.lower() in (".h5", ".hdf5") and p.is_file():
        return "hdf5"  # recognised by name on object storage (opening it says it is not supported there)
    for name in FORMATS:
        if get_format(name).can_open(p):
            return name
    return None


def open_reader(
    path: str | Path, format: str | None = None, storage_options: dict[str, Any] | None = None
) -> Reader:
    """Open one split for reading, detecting its format unless given.

    ``path`` may be an fsspec URL (``s3://...``); ``storage_options`` go to its filesystem.
    """
    p = as_path(path, storage_options)
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


def find_splits(root: str | Path, storage_options: dict[str, Any] | None = None) -> list[tuple[Path, str]]:
    """Every split at or below ``root`` as ``(path, format name)``, in sorted order.

    A split is recognised by its format's ``can_open``; the walk does not descend into a split, and skips
    hidden entries (actfmt's own partial conversions and locks start with a dot).
    """
    from actfmt.errors import NotASplitError

    top = as_path(root, storage_options)
    if is_remote(top):
        top.prefetch()  # type: ignore[attr-defined]  # one listing of the prefix: the walk then costs no request
    if not top.exists():
        raise NotASplitError(f"{top}: no such file or directory; check the path.")
    found: list[tuple[Path, str]] = []

    def walk(p: Path) -> None:
        name = guess_format(p)
        if name is not None:
            found.append((p, name))
            return
        if not p.is_dir() or (p.is_symlink() and p != top):
            return
        try:
            children = sorted(p.iterdir())
        except OSError:
            return
        for child in children:
            if not child.name.startswith("."):
                walk(child)

    walk(top)
    return found
