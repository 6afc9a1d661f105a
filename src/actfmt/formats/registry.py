"""The format registry: the typed API over the table of formats (:mod:`~actfmt.formats.catalog`: name ->
``"module:Class"``, imported lazily so ``import actfmt`` stays light) and what is built from the formats'
declarations: detection, the store suffixes, split naming, the "no split found" message."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from actfmt.errors import FormatError, NotASplitError
from actfmt.formats.catalog import ALIASES, FORMATS, load, split_name, store_suffixes, strip_suffix
from actfmt.storage import Entry, Location, PathLike, resolve

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.formats.base import Format, Reader

__all__ = [
    "ALIASES",
    "FORMATS",
    "all_compressions",
    "formats",
    "get_format",
    "guess_format",
    "open_reader",
    "shared_reader",
    "split_name",
    "store_suffixes",
    "strip_suffix",
]


def get_format(name: str) -> type[Format]:
    """The Format class registered under ``name`` (``zarr``, ``hdf5``, ``safetensors``, ``pt``) or an alias."""
    return cast("type[Format]", load(name))


def formats() -> list[type[Format]]:
    """Every registered Format class, in detection order."""
    return [get_format(name) for name in FORMATS]


def all_compressions() -> tuple[str, ...]:
    """Every compression name some format accepts, in a stable order."""
    out: list[str] = []
    for name in FORMATS:
        out += [c for c in get_format(name).compressions if c not in out]
    return tuple(out)


def guess_format(location: PathLike, entries: Sequence[Entry] | None = None) -> str | None:
    """The name of the format whose split ``location`` is, or ``None`` when it is not a split."""
    loc = resolve(location)
    for name in FORMATS:
        if get_format(name).can_open(loc, entries):
            return name
    return None


def open_reader(
    path: PathLike, format: str | None = None, storage_options: dict[str, Any] | None = None
) -> Reader:
    """Open one split for reading, detecting its format unless given.

    ``path`` may be an fsspec URL (``s3://...``); ``storage_options`` go to its filesystem.
    """
    loc = resolve(path, storage_options)
    name = format or guess_format(loc)
    if name is None:
        if not loc.exists():
            raise NotASplitError(f"{loc}: no such file or directory; check the path.")
        raise NotASplitError(
            f"{loc}: not a split in any known format (expected metadata.json + layer_XX/, a .zarr, "
            f"a .h5 or layer_XX.safetensors files)."
        )
    fmt = get_format(name)
    if not loc.is_local and not fmt.remote_read:  # pragma: no cover - every format reads object storage
        raise FormatError(f"{loc}: {name} cannot be read from {loc.scheme}://; download it first.")
    return fmt.open_reader(loc)


#: Readers kept open per process by tasks (a dask task reads its split through it: opened once per worker, not
#: once per block).
_SHARED: OrderedDict[tuple[str, str, str], Reader] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_READERS = 8


def shared_reader(location: Location, format: str) -> Reader:
    """An open reader of ``location`` shared within this process (the :data:`_SHARED_READERS` most recently
    used stay open; readers are safe to use from several threads)."""
    key = (type(location).__name__, repr(location.__reduce__()), format)
    with _SHARED_LOCK:
        r = _SHARED.get(key)
        if r is not None:
            _SHARED.move_to_end(key)
            return r
    # opened at the location's absolute form (its key): a relative path must not follow a later chdir
    reduced = cast("tuple[Any, tuple[Any, ...]]", location.__reduce__())
    r = open_reader(reduced[0](*reduced[1]), format)
    with _SHARED_LOCK:
        _SHARED[key] = r
        while len(_SHARED) > _SHARED_READERS:
            _, old = _SHARED.popitem(last=False)
            old.close()
    return r
