"""A rich progress renderer for :class:`~actfmt.progress.ProgressEvent`.

The library emits events; :class:`ProgressRenderer` draws them on stderr, one bar per ``event.task``
("validate", "convert", "verify", ...).  It shows MB/s when events carry ``nbytes`` and an ETA when the total
is known.  It stays silent when stderr is not a terminal, and with ``delay`` it appears only once a run has
lasted that long (short runs print nothing).  rich is imported only when a renderer is created.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from actfmt._escape import escape, markup
from actfmt.progress import ProgressEvent
from actfmt.reporters.common import format_rate, format_size, shorten_left

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["FIXED_COLUMNS_WIDTH", "PROGRESS_DELAY", "ProgressRenderer", "progress_renderer"]


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


#: Without ``--deep``, a progress bar appears only once a run has lasted this long (seconds).
PROGRESS_DELAY = 1.0


def progress_renderer(
    *, quiet: bool = False, no_progress: bool = False, immediate: bool = False
) -> ProgressRenderer:
    """A :class:`ProgressRenderer` on stderr (a no-op when quiet or not a terminal).

    ``immediate`` draws at once (long jobs such as ``--deep``); otherwise the bar waits ``PROGRESS_DELAY``.
    """
    return ProgressRenderer(enabled=not (quiet or no_progress), delay=0.0 if immediate else PROGRESS_DELAY)
