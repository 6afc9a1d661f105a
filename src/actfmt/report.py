"""The result of a validation: a plain object, rendered by a reporter chosen by name.

It owns what a result is made of: :class:`Finding` (one problem at one place) and the severities
(:data:`ERROR`, :data:`WARNING`); the rules (:mod:`actfmt.checks`) make findings, this module never imports them.

Reporters: ``text`` (rich), ``json`` (the contract below), ``github``, ``junit``, ``sarif``.
JSON contract (``schema_version`` 1)::

    {"schema_version": 1, "tool": {"name", "version"}, "root",
     "summary": {"errors", "warnings", "ignored", "splits", "layers", "shards", "chunks", "layer_files",
                 "partial", "skipped_checks"},
     "issues": [{"code", "name", "severity", "location", "message", "expected", "actual"}]}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from actfmt._version import __version__

__all__ = ["ERROR", "SCHEMA_VERSION", "SEVERITIES", "WARNING", "Finding", "Report", "SkippedChecks"]

SCHEMA_VERSION = 1
ERROR = "error"
WARNING = "warning"
SEVERITIES = (ERROR, WARNING)
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1}


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


@dataclass(frozen=True)
class SkippedChecks:
    """Checks not run on one split, and why (one root cause, one finding: the rest are skipped)."""

    location: str
    codes: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "codes": list(self.codes), "reason": self.reason}


@dataclass
class Report:
    """Findings for everything under ``root``, plus what was checked and what was skipped."""

    root: str
    findings: list[Finding] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # locations of the splits checked
    layers: int = 0
    shards: int = 0  # .pt shard files
    chunks: int = 0  # chunks of converted zarr / hdf5 stores
    layer_files: int = 0  # one file per layer: safetensors stores
    ignored: int = 0
    skipped: list[SkippedChecks] = field(default_factory=list)
    elapsed: float = 0.0
    deep: bool = False

    @property
    def errors(self) -> int:
        return sum(f.severity == ERROR for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == WARNING for f in self.findings)

    @property
    def partial(self) -> bool:
        """Were some checks skipped (unparseable metadata, unreadable files)?"""
        return bool(self.skipped)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def sorted_findings(self) -> list[Finding]:
        """Worst first, then by location and code."""
        return sorted(self.findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.location, f.code))

    def exit_code(self, strict: bool = False, exit_zero: bool = False) -> int:
        """0 clean, 1 errors (or warnings with ``strict``); ``exit_zero`` forces 0."""
        if exit_zero:
            return 0
        if self.errors or (strict and self.warnings):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "actfmt", "version": __version__},
            "root": self.root,
            "summary": {
                "errors": self.errors,
                "warnings": self.warnings,
                "ignored": self.ignored,
                "splits": len(self.splits),
                "layers": self.layers,
                "shards": self.shards,
                "chunks": self.chunks,
                "layer_files": self.layer_files,
                "partial": self.partial,
                "skipped_checks": [s.to_dict() for s in self.skipped],
            },
            "issues": [f.to_dict() for f in self.sorted_findings()],
        }
