"""The format registry: the typed API over the table of formats (:mod:`~actfmt.formats.catalog`: name ->
``"module:Class"``, imported lazily so ``import actfmt`` stays light) and what is built from the formats'
declarations: detection, the store suffixes, split naming, the "no split found" message."""

from __future__ import annotations

import os
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
    "no_split_found",
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
    """Every registered Format class, in detection order: registry order, the fallback formats
    (:attr:`Format.fallback`, pt) last."""
    found = [get_format(name) for name in FORMATS]
    return [f for f in found if not f.fallback] + [f for f in found if f.fallback]


def all_compressions() -> tuple[str, ...]:
    """Every compression name some format accepts, in a stable order."""
    out: list[str] = []
    for name in FORMATS:
        out += [c for c in get_format(name).compressions if c not in out]
    return tuple(out)


def guess_format(
    location: PathLike, entries: Sequence[Entry] | None = None, *, directory: bool | None = None
) -> str | None:
    """The name of the format whose split ``location`` is, or ``None`` when it is not a split.

    ``entries``: its listing when the caller has it (a walk); else ``location`` is listed here, once, and the
    listing handed to every format (``directory=False``: the caller knows it is a file, nothing is listed)."""
    loc = resolve(location)
    if entries is None and directory is not False:
        entries = _listing(loc)
    for fmt in formats():
        if fmt.recognises(loc, entries):
            return fmt.name
    return None


def _listing(location: Location) -> Sequence[Entry] | None:
    """The listing of ``location``, ``None`` when it is no listable directory (a file, nothing there)."""
    try:
        return location.list_dir()
    except OSError:
        return None


def no_split_found(
    location: object, details: Sequence[str] = (), advice: str = "check the path"
) -> NotASplitError:
    """The one "no split found" error: what a split of each registered format looks like (each format's
    :attr:`~actfmt.formats.base.Format.looks_like`, so a new format appears here by itself), then ``details``
    (what a walk could not read, say) and ``advice``."""
    kinds = [fmt.looks_like for fmt in formats()]
    shapes = ", ".join(kinds[:-1]) + f" or {kinds[-1]}" if len(kinds) > 1 else "".join(kinds)
    extra = "".join(f"; {d}" for d in details)
    return NotASplitError(f"{location}: no split found (a split is {shapes}){extra}; {advice}.")


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
        raise no_split_found(loc)
    fmt = get_format(name)
    if not loc.is_local and not fmt.remote_read:  # pragma: no cover - every format reads object storage
        raise FormatError(f"{loc}: {name} cannot be read from {loc.scheme}://; download it first.")
    return fmt.open_reader(loc)


#: Readers kept open per process by tasks (a dask task reads its split through it: opened once per worker, not
#: once per block).
_SHARED: OrderedDict[tuple[str, str, str], Reader] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_READERS = 8


#: Readers a forked process inherited from its parent: kept (never used, never closed: closing an HDF5 file
#: would write to a file the parent has open) until the process ends.
_INHERITED: list[Reader] = []


def _forget_inherited_readers() -> None:
    """In a forked child (a dask worker started by fork): the parent's shared readers are its own, not ours."""
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # the parent's may have been held by one of its threads
    _INHERITED.extend(_SHARED.values())
    _SHARED.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_inherited_readers)


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
