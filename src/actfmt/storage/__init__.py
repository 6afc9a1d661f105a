"""Where bytes live: one :class:`~actfmt.storage.base.Location` abstraction over the local file system and
object storage (any fsspec URL: ``s3://``, ``gs://``, ``memory://``; ``file://`` is local).

A path or URL given to the public API is resolved **once**, here, by :func:`resolve`, and travels down as a
location: nothing above this package knows local from remote except through a location's capability flags.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from actfmt.errors import ActfmtError
from actfmt.storage._local_io import read_pool
from actfmt.storage.base import (
    Entry,
    Kind,
    Location,
    OutputFile,
    Stat,
    read_into,
    read_objects,
    scan_runs,
    short_read,
)
from actfmt.storage.local import LocalLocation

__all__ = [
    "Entry",
    "Kind",
    "LocalLocation",
    "Location",
    "OutputFile",
    "PathLike",
    "Stat",
    "is_remote",
    "is_url",
    "parse_storage_options",
    "read_into",
    "read_objects",
    "read_pool",
    "resolve",
    "scan_runs",
    "short_read",
]

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = ("file", "local")

#: What the public API accepts as a place: a path, a URL, or a location.
PathLike = str | os.PathLike[str] | Location


def is_url(path: Any) -> bool:
    """Is ``path`` a URL (``s3://...``, ``memory://...``, ``file://...``) or a non-local location?"""
    if isinstance(path, Location):
        return not path.is_local
    return isinstance(path, str) and _URL_RE.match(path) is not None


def is_remote(path: Any) -> bool:
    """Is ``path`` on object storage (a URL other than ``file://``, or such a location)?"""
    if isinstance(path, Location):
        return not path.is_local
    m = _URL_RE.match(path) if isinstance(path, str) else None
    return m is not None and m.group(1).lower() not in _LOCAL_SCHEMES


def resolve(path: PathLike, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The location of ``path``: a :class:`LocalLocation` for a local path or a ``file://`` URL, an fsspec
    location for any other URL (``storage_options`` go to its filesystem; a local path ignores them).

    A local location is *confined* to itself (:meth:`LocalLocation.confined`; one given already confined keeps
    its root): nothing read through it or below it follows a link out of the tree it names."""
    if isinstance(path, LocalLocation):
        return path if path.root is not None else path.confined()
    if isinstance(path, Location):
        return path
    if isinstance(path, str):
        m = _URL_RE.match(path)
        if m is not None:
            if m.group(1).lower() in _LOCAL_SCHEMES:
                return LocalLocation(path[m.end() :] or "/").confined()
            # not at module level: 3.7 ms of every start-up (`actfmt --help`), for object storage only
            from actfmt.storage.fsspec_ import FsspecLocation

            return FsspecLocation.from_url(path, storage_options)
    return LocalLocation(path).confined()


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options JSON`` -> a dict (an :class:`~actfmt.errors.ActfmtError` that never echoes it)."""
    if text is None or not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ActfmtError(
            f"--storage-options is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"give an object such as '{{\"anon\": true}}'."
        ) from None
    if not isinstance(data, dict):
        raise ActfmtError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'.")
    return data
