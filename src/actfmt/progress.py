"""Progress events: the library reports, the CLI renders (rich, on stderr).  The library never prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ProgressCallback", "ProgressEvent", "emit"]


@dataclass(frozen=True)
class ProgressEvent:
    """``kind``: ``start`` (``total`` known), ``advance`` (``advance`` units done, ``nbytes`` moved), ``end``.

    ``task`` names the bar ("validate", "convert", "verify"); ``description`` is shown beside it.
    """

    kind: str
    task: str
    total: int | None = None
    advance: int = 0
    nbytes: int = 0
    description: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def emit(callback: ProgressCallback | None, event: ProgressEvent) -> None:
    """Send ``event`` to ``callback`` if there is one."""
    if callback is not None:
        callback(event)
