"""What every renderer shares: paths as the user reads them, lines fitted to a width, sizes and rates, and
the JSON of a command's output.

Names come from the tree, so from whoever made it: they go through :mod:`actfmt._escape` before they are printed.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from typing import IO, Any

from actfmt._escape import dumps, escape_line, neutralise
from actfmt._version import __version__

__all__ = [
    "JSON_SCHEMA_VERSION",
    "clean",
    "display_path",
    "fit_lines",
    "format_rate",
    "format_size",
    "is_fancy",
    "json_document",
    "json_text",
    "norm_location",
    "plural",
    "shorten_left",
]


def norm_location(location: str) -> str:
    """``""`` for the PATH itself, else the location with ``/`` and no ``./`` prefix."""
    loc = location.replace("\\", "/").strip("/")
    return "" if loc in ("", ".") else str(PurePosixPath(loc))


def display_path(root: str, location: str = "") -> str:
    """``root`` joined with ``location``: relative to the cwd when under it, else as given, with ``/``."""
    loc = norm_location(location)
    joined = os.path.normpath(os.path.join(root, loc) if loc else root)
    if os.path.isabs(joined):
        try:
            joined = os.path.relpath(joined, os.getcwd())
            if joined == ".." or joined.startswith(".." + os.sep):
                joined = os.path.normpath(os.path.join(root, loc) if loc else root)
        except ValueError:  # another drive on Windows
            pass
    return joined.replace(os.sep, "/")


def clean(text: str) -> str:
    """One line of text output that holds names: control characters escaped visibly, undecodable file-name
    bytes written ``\\xff``, a leading ``::`` neutralised (:func:`actfmt._escape.escape_line`)."""
    return escape_line(text)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


_BREAK = re.compile(r"(?<=/)|(?= )")


def fit_lines(text: str, width: int | None, indent: str = "", first: str | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at a space or after a ``/`` (a path is cut
    between its components), a piece longer than a line cut where it must; the first line starts with ``first``
    (default ``indent``), the others with ``indent``.  ``width=None``: one line.  No line starts with ``::``.
    """
    first = indent if first is None else first
    if width is None or len(first) + len(text) <= width:
        return [neutralise(first + text)]
    lines: list[str] = []
    line, lead = "", first
    for piece in _BREAK.split(text):
        room = max(width - len(lead), 8)
        if line and len(line) + len(piece) > room:
            lines.append(lead + line.rstrip(" "))
            line, lead, piece = "", indent, piece.lstrip(" ")
            room = max(width - len(lead), 8)
        while len(line) + len(piece) > room:  # a piece longer than a line
            cut = room - len(line)
            lines.append(lead + line + piece[:cut])
            line, lead, piece = "", indent, piece[cut:]
            room = max(width - len(lead), 8)
        line += piece
    if line.strip(" ") or not lines:
        lines.append(lead + line)
    return [neutralise(x) for x in lines]


def json_text(data: Any) -> str:
    """JSON valid for any name: an undecodable file-name byte is written ``\\xff`` (as in the text output), and no
    raw control character reaches the output (:func:`actfmt._escape.dumps`)."""
    return dumps(data) + "\n"


def format_rate(nbytes: float, seconds: float) -> str:
    """``"512.0 MB/s"`` (decimal units, like ``dd`` and ``cp``); ``""`` without data or time."""
    if nbytes <= 0 or seconds <= 0:
        return ""
    rate = nbytes / seconds
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if rate < 1000 or unit == "GB/s":
            return f"{rate:.1f} {unit}"
        rate /= 1000
    return ""  # pragma: no cover


def format_size(nbytes: float) -> str:
    """``"1.5 GB"`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # pragma: no cover


def shorten_left(text: str, width: int, ellipsis: str = "…") -> str:
    """``text`` cut from the left to ``width`` characters, at a ``/`` when one fits: ``…/SP_test/EM.zarr``."""
    if len(text) <= width:
        return text
    if width <= len(ellipsis):
        return text[len(text) - width :]
    parts = text.split("/")
    for i in range(1, len(parts)):
        tail = "/".join(parts[i:])
        if len(ellipsis) + 1 + len(tail) <= width:
            return f"{ellipsis}/{tail}"
    return ellipsis + text[len(text) - (width - len(ellipsis)) :]


def is_fancy(file: IO[str] | Any) -> bool:
    """Can ``file`` show the typographic characters (``·`` ``—`` ``✓`` ``…``)?  Only when it encodes UTF-8 (no
    encoding known: it is taken to)."""
    encoding = (getattr(file, "encoding", None) or "utf-8").lower().replace("-", "")
    return encoding.startswith("utf")


#: The version of every JSON document the commands print (validate's and stats' carry their own).
JSON_SCHEMA_VERSION = 1


def json_document(data: Any, key: str = "items") -> str:
    """A command's JSON output: ``schema_version`` and ``tool`` first, then the command's fields (a list is
    put under ``key``)."""
    head: dict[str, Any] = {
        "schema_version": JSON_SCHEMA_VERSION,
        "tool": {"name": "actfmt", "version": __version__},
    }
    body = {key: data} if isinstance(data, list) else data
    return dumps(head | body, ensure_ascii=True)
