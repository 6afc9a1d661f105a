"""Rule: the building block of validation (a rule makes :class:`~actfmt.report.Finding` objects; the finding
and the severities belong to the result, :mod:`actfmt.report`, and are re-exported here for the rules).

A rule is one class: a stable ``code`` (never reused), a kebab-case ``name``, a default ``severity``, and its
docstring, whose first line is its title and whole text its documentation (``actfmt rule CODE``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from actfmt.report import ERROR, SEVERITIES, WARNING, Finding

__all__ = ["ERROR", "SEVERITIES", "WARNING", "Finding", "Rule"]


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
