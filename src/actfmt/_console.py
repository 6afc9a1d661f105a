"""Console helpers for the CLI: a rich progress renderer for :class:`~actfmt.progress.ProgressEvent`, and the
text of ``actfmt info`` fitted to the terminal's width.

The library emits events; :class:`ProgressRenderer` draws them on stderr, one bar per ``event.task``
("validate", "convert", "verify", ...).  It shows MB/s when events carry ``nbytes`` and an ETA when the total
is known.  It stays silent when stderr is not a terminal, and with ``delay`` it appears only once a run has
lasted that long (short runs print nothing).  rich is imported only when a renderer is created.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from actfmt._escape import escape, escape_line, markup
from actfmt.progress import ProgressEvent

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ProgressRenderer", "format_rate", "format_size", "info_fields", "render_info", "shorten_left"]


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


def _count_column() -> Any:
    """``done/total`` in units, or in sizes when the task counts bytes (``advance == nbytes``)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = task.total
            if task.fields.get("in_bytes") is None:  # unit not known before the first advance
                return Text("")
            if task.fields.get("in_bytes"):
                done = format_size(task.completed)
                return Text(
                    f"{done}/{format_size(total)}" if total is not None else done, style="progress.download"
                )
            done_units = f"{int(task.completed)}"
            return Text(
                f"{done_units}/{int(total)}" if total is not None else done_units, style="progress.download"
            )

    from rich.table import Column

    return CountColumn(table_column=Column(no_wrap=True))


#: What the columns after the description and the bar take at most: the spinner (1), the count
#: (``999.9 MB/999.9 MB``, 17), the rate (``999.9 MB/s``, 10), the elapsed time (7), ``ETA`` (3), the time
#: remaining (7), and the 7 spaces between the 8 columns.
FIXED_COLUMNS_WIDTH = 1 + 17 + 10 + 7 + 3 + 7 + 7


class ProgressRenderer:
    """A callable progress callback that draws rich bars on stderr; use it as a context manager.

    ``enabled=False`` (``--quiet``, ``--no-progress``) or a non-terminal console makes it a no-op.
    ``delay`` seconds pass before anything is drawn (0: at once, e.g. for ``--deep``).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        delay: float = 0.0,
        console: Console | None = None,
        transient: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._nbytes: dict[str, int] = {}
        self._started_at: float | None = None
        self._live = False
        self.delay = delay
        if not enabled:
            self.enabled = False
            return
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        self.enabled = console.is_terminal
        self.transient = transient

    # -- context manager
    def __enter__(self) -> ProgressRenderer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (a transient display is erased)."""
        with self._lock:
            if self._progress is not None and self._live:
                self._progress.stop()
            self._live = False

    # -- the callback
    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        with self._lock:
            progress = self._ensure_progress()
            now = time.monotonic()
            if self._started_at is None:
                self._started_at = now
            task_id = self._tasks.get(event.task)
            if event.kind == "start" or task_id is None:
                if task_id is not None:
                    progress.remove_task(task_id)
                self._nbytes[event.task] = 0
                task_id = progress.add_task(
                    self._describe(event.description or event.task), total=event.total, rate="", in_bytes=None
                )
                self._tasks[event.task] = task_id
            if event.kind != "start" and (event.advance or event.nbytes):
                self._nbytes[event.task] += event.nbytes
                task = progress.tasks[progress.task_ids.index(task_id)]
                elapsed = (task.elapsed or 0.0) if task.started else 0.0
                progress.update(
                    task_id, advance=event.advance, rate=format_rate(self._nbytes[event.task], elapsed)
                )
                # The unit is learnt from the first advance: a task that counts bytes shows sizes.
                if task.fields.get("in_bytes") is None:
                    progress.update(task_id, in_bytes=bool(event.nbytes and event.advance == event.nbytes))
                if event.description:
                    progress.update(task_id, description=self._describe(event.description))
            if event.kind == "end":
                total = progress.tasks[progress.task_ids.index(task_id)].total
                if total is not None:
                    progress.update(task_id, completed=total)
            if not self._live and now - self._started_at >= self.delay:
                progress.start()
                self._live = True

    def _widths(self) -> tuple[int, int]:
        """The description's and the bar's widths: one line per task, at the console's width (80 columns: 18 and
        10)."""
        room = max(self.console.width - FIXED_COLUMNS_WIDTH, 20)
        bar = 10 if room < 48 else min(30, room // 3)
        return room - bar, bar

    def _describe(self, text: str) -> str:
        """A task's description: escaped (it names a split or a layer), shortened from the left to fit
        (``…/SP_test/EM``), its markup printed as it is."""
        return markup(shorten_left(escape(text), self._widths()[0]))

    def _ensure_progress(self) -> Progress:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.table import Column

            described, bar = self._widths()

            def one_line(**kw: Any) -> Column:
                return Column(no_wrap=True, **kw)

            self._progress = Progress(
                SpinnerColumn(table_column=one_line()),
                TextColumn(
                    "[progress.description]{task.description}",
                    table_column=one_line(max_width=described, overflow="ellipsis"),
                ),
                BarColumn(bar_width=bar, table_column=one_line()),
                _count_column(),
                TextColumn("{task.fields[rate]}", table_column=one_line()),
                TimeElapsedColumn(table_column=one_line()),
                TextColumn("ETA", table_column=one_line()),
                TimeRemainingColumn(table_column=one_line()),
                console=self.console,
                transient=self.transient,
                redirect_stdout=False,
                redirect_stderr=False,
            )
        return self._progress

    # -- for tests and later commands
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per task: ``completed``, ``total``, ``nbytes``, ``description`` (what the bars show)."""
        with self._lock:
            if self._progress is None:
                return {}
            out = {}
            for name, task_id in self._tasks.items():
                task = self._progress.tasks[self._progress.task_ids.index(task_id)]
                out[name] = {
                    "completed": task.completed,
                    "total": task.total,
                    "nbytes": self._nbytes.get(name, 0),
                    "description": task.description,
                    "rate": task.fields.get("rate", ""),
                    "in_bytes": bool(task.fields.get("in_bytes")),
                }
            return out

    @property
    def live(self) -> bool:
        """Is the display drawing now?"""
        return self._live


# ------------------------------------------------------------------------------------------------ actfmt info

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
    """One :class:`~actfmt.convert.SplitInfo` as the text of each of :data:`INFO_COLUMNS` (``""``: unknown)."""

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


def _fit_labels(labels: Sequence[str], width: int, ellipsis: str) -> list[str]:
    """Each label shortened from the left to ``width``; from the middle when that would make two alike."""
    short = [shorten_left(label, width, ellipsis) for label in labels]
    if len(set(short)) < len(set(labels)):
        short = [_shorten_middle(label, width, ellipsis) for label in labels]
    return short


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
