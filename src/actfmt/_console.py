"""Console helpers for the CLI: a rich progress renderer for :class:`~actfmt.progress.ProgressEvent`.

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

from actfmt.progress import ProgressEvent

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ProgressRenderer", "format_rate", "format_size"]


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

    return CountColumn()


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
                    event.description or event.task, total=event.total, rate="", in_bytes=None
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
                    progress.update(task_id, description=event.description)
            if event.kind == "end":
                total = progress.tasks[progress.task_ids.index(task_id)].total
                if total is not None:
                    progress.update(task_id, completed=total)
            if not self._live and now - self._started_at >= self.delay:
                progress.start()
                self._live = True

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

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                _count_column(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
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
