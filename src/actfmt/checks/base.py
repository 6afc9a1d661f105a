"""Rule and Finding: the building blocks of validation.

A rule is one class: a stable ``code`` (never reused), a kebab-case ``name``, a default ``severity``, and its
docstring, whose first line is its title and whole text its documentation (``actfmt rule CODE``).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

__all__ = ["ERROR", "SEVERITIES", "WARNING", "Finding", "Rule"]

ERROR = "error"
WARNING = "warning"
SEVERITIES = (ERROR, WARNING)


@dataclass(frozen=True)
class Finding:
    """One problem at one place.  ``location`` is relative to the PATH validated, with ``/``."""

    code: str
    name: str
    severity: str
    location: str
    message: str
    expected: Any = None
    actual: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rule:
    """Base class of every rule; subclasses are collected into the registry automatically."""

    code: ClassVar[str]
    name: ClassVar[str]
    severity: ClassVar[str] = ERROR
    #: Needs the data values (runs only with ``--deep``).
    deep: ClassVar[bool] = False

    @classmethod
    def title(cls) -> str:
        return (inspect.getdoc(cls) or "").splitlines()[0].strip()

    @classmethod
    def documentation(cls) -> str:
        return inspect.getdoc(cls) or ""

    @classmethod
    def finding(
        cls,
        location: str,
        message: str,
        expected: Any = None,
        actual: Any = None,
        severity: str | None = None,
    ) -> Finding:
        return Finding(cls.code, cls.name, severity or cls.severity, location, message, expected, actual)
