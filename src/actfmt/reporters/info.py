"""The text of ``actfmt info``, fitted to the terminal's width: a table, or one block per split when it is
narrow; what every split shares is said once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import IO, Any

import click

from actfmt._escape import escape, escape_line
from actfmt.reporters.common import format_size, is_fancy, json_document, shorten_left

__all__ = ["INFO_COLUMNS", "MIN_SPLIT_WIDTH", "info_fields", "render_info", "write_info"]


#: The columns of ``actfmt info``, in order: (label, right-aligned).
INFO_COLUMNS = (
    ("format", False),
    ("layers", True),
    ("examples", True),
    ("hidden", True),
    ("dtype", False),
    ("on disk", True),
    ("ratio", True),
    ("chunks", False),
    ("compression", False),
    ("complete", False),
)
#: Below this many characters a split's path is too cut to read: one block per split instead of a table.
MIN_SPLIT_WIDTH = 24


def info_fields(row: Any) -> dict[str, str]:
    """One :class:`~actfmt.conversion.SplitInfo` as the text of each of :data:`INFO_COLUMNS` (``""``: unknown)."""

    def text(value: Any) -> str:
        return "" if value is None else escape(str(value))

    return {
        "format": escape(row.format),
        "layers": text(row.layers),
        "examples": text(row.examples),
        "hidden": text(row.hidden_dim),
        "dtype": text(row.dtype),
        "on disk": format_size(row.bytes_on_disk),
        "ratio": "" if row.ratio is None else f"{row.ratio:.2f}x",
        "chunks": "" if not row.chunks else "x".join(map(str, row.chunks)),
        "compression": text(row.compression),
        "complete": {None: "", True: "yes", False: "NO"}[row.complete],
    }


def _shorten_middle(text: str, width: int, ellipsis: str = "…") -> str:
    """``text`` with its middle components elided to fit ``width``: ``hdf5/…/SP_test/EM.h5``."""
    if len(text) <= width:
        return text
    parts = text.split("/")
    for i in range(2, len(parts)):
        candidate = f"{parts[0]}/{ellipsis}/{'/'.join(parts[i:])}"
        if len(candidate) <= width:
            return candidate
    return shorten_left(text, width, ellipsis)


def _cut_left(text: str, width: int, ellipsis: str = "…") -> str:
    """``text`` cut from the left to ``width`` characters, mid-name if need be."""
    return text if len(text) <= width else ellipsis + text[len(text) - max(1, width - len(ellipsis)) :]


def _fit_labels(labels: Sequence[str], width: int, ellipsis: str) -> list[str]:
    """Each label shortened to ``width``: from the left at a ``/``, else from the middle, else mid-name, taking
    the first way that keeps every label apart; when none does, the labels are kept whole (a wrapped line is
    better than two stores that look alike)."""
    for shorten in (shorten_left, _shorten_middle, _cut_left):
        short = [shorten(label, width, ellipsis) for label in labels]
        if len(set(short)) == len(set(labels)):
            return short
    return list(labels)


def _common_dir(labels: Sequence[str]) -> str:
    """The directory (``a/b``) every label lies in, or ``""``."""
    split = [label.split("/")[:-1] for label in labels]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


def _wrap(items: Sequence[str], width: int, indent: str, sep: str, first: str | None = None) -> list[str]:
    """``items`` joined by ``sep`` in lines of at most ``width`` characters (an item is never broken); the first
    line starts with ``first`` instead of ``indent``."""
    first = indent if first is None else first
    lines: list[str] = []
    line = ""
    for item in items:
        lead = first if not lines else indent
        if line and len(lead) + len(line) + len(sep) + len(item) > width:
            lines.append(lead + line)
            line = ""
        line = f"{line}{sep}{item}" if line else item
    if line:
        lines.append((first if not lines else indent) + line)
    return lines


def render_info(rows: Sequence[Any], root: str, width: int, *, fancy: bool = True) -> list[tuple[str, bool]]:
    """The text of ``actfmt info``: ``(line, is_heading)`` pairs, no line wider than ``width``.

    Names are escaped (:mod:`actfmt._escape`) before they are measured, and no line starts with ``::``.
    """
    return [(escape_line(line), heading) for line, heading in _info_lines(rows, escape(root), width, fancy)]


def _info_lines(rows: Sequence[Any], root: str, width: int, fancy: bool) -> list[tuple[str, bool]]:
    """:func:`render_info`'s lines, ``root`` escaped already.

    The heading names PATH, the directory every split lies in and what every split shares (format, dtype, chunks,
    ...); the rest is a table with one row per split, its path shortened from the left to fit; when even that
    does not fit (a narrow terminal, a single split), one block per split, the fields wrapped to the width.
    """
    sep, ellipsis = (" · ", "…") if fancy else (" - ", "...")
    width = max(width, 40)
    fields = [info_fields(r) for r in rows]
    names = [name for name, _ in INFO_COLUMNS]
    right = dict(INFO_COLUMNS)
    shared = [n for n in names if len(rows) > 1 and len({f[n] for f in fields}) == 1]
    varying = [n for n in names if n not in shared]

    labels = [escape(r.location).strip("/") for r in rows]
    if len(rows) == 1:  # one block, under the split's whole path
        path = root if labels[0] in ("", ".") else root.rstrip("/") + "/" + labels[0]
        items = [f"{n} {fields[0][n]}" for n in names if fields[0][n]]
        return [(shorten_left(path, width, ellipsis), True)] + [
            (line, False) for line in _wrap(items, width, "  ", sep)
        ]
    if all(label in ("", ".") for label in labels):
        base, labels = "", [root] * len(rows)
    else:
        base = _common_dir(labels)
        labels = [label[len(base) :].lstrip("/") if base else label for label in labels]
    count = f"{len(rows)} split{'' if len(rows) == 1 else 's'}"
    out = [(shorten_left(root, width - len(count) - 2, ellipsis) + ": " + count, True)]
    if base:
        out.append(("  in " + shorten_left(base + "/", width - 5, ellipsis), False))
    items = [f"{n} {fields[0][n]}" for n in shared if fields[0][n]]
    lead = "  every split: "
    out += [(line, False) for line in _wrap(items, width, " " * len(lead), sep, first=lead)]

    widths = {n: max(len(n), *(len(f[n]) for f in fields)) for n in varying}
    room = width - sum(widths[n] + 2 for n in varying)
    longest = max(len(label) for label in labels)
    if room >= min(longest, MIN_SPLIT_WIDTH):
        shown = _fit_labels(labels, room, ellipsis)
        split_width = max(len("split"), *(len(s) for s in shown))

        def cells(first: str, values: dict[str, str]) -> str:
            parts = [first.ljust(split_width)]
            for n in varying:
                parts.append(values[n].rjust(widths[n]) if right[n] else values[n].ljust(widths[n]))
            return "  ".join(parts).rstrip()

        out.append((cells("split", {n: n for n in varying}), True))
        out += [(cells(s, f), False) for s, f in zip(shown, fields, strict=True)]
        return out

    for label, f in zip(_fit_labels(labels, width, ellipsis), fields, strict=True):
        out.append(("", False))
        out.append((label, True))
        out += [(line, False) for line in _wrap([f"{n} {f[n]}" for n in varying if f[n]], width, "  ", sep)]
    return out


def write_info(found: Sequence[tuple[str, Sequence[Any]]], out: IO[str], *, as_json: bool = False) -> None:
    """``actfmt info``'s output for each ``(PATH, rows)`` to ``out``: with ``as_json``, every split's ``to_dict()``
    in one document; else text, a blank line between PATHs: as wide as the
    terminal (``COLUMNS`` first; 80 when stdout is a pipe or a file), ``·`` and ``…`` when ``out`` encodes UTF-8,
    headings bold on a terminal unless ``NO_COLOR`` is set."""
    if as_json:
        out.write(json_document([r.to_dict() for _, rows in found for r in rows], key="splits") + "\n")
        return
    width = shutil.get_terminal_size((80, 24)).columns
    fancy = is_fancy(out)
    styled = out.isatty() and not os.environ.get("NO_COLOR")
    for n, (path, rows) in enumerate(found):
        if n:
            click.echo("", file=out)
        for line, bold in render_info(rows, path, width, fancy=fancy):
            click.echo(click.style(line, bold=True) if bold and styled else line, file=out)
