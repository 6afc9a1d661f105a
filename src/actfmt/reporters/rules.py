"""The text and JSON of ``actfmt rules`` (one rule a line) and ``actfmt rule CODE`` (one rule's documentation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actfmt.reporters.validation import RuleInfo

__all__ = ["rule_dict", "rule_lines", "rules_table"]


def rule_dict(rule: RuleInfo) -> dict[str, Any]:
    """One rule as ``actfmt rules --output-format json`` lists it."""
    return {
        "code": rule.code,
        "name": rule.name,
        "severity": rule.severity,
        "deep": bool(rule.deep),
        "title": rule.title(),
        "documentation": rule.documentation(),
    }


def rules_table(rules: Sequence[RuleInfo]) -> str:
    """One rule a line: code, name, severity, ``--deep`` when it reads the values, title."""
    name_width = max((len(r.name) for r in rules), default=0)
    lines = []
    for r in rules:
        deep = "--deep" if r.deep else ""
        lines.append(f"{r.code}  {r.name:<{name_width}}  {r.severity:<7}  {deep:<6}  {r.title()}\n")
    return "".join(lines)


def rule_lines(rule: RuleInfo) -> list[str]:
    """``ACT302 missing-shard``, its severity and whether it reads the values, a blank line, its documentation."""
    deep = "yes (runs with --deep)" if rule.deep else "no"
    return [
        f"{rule.code} {rule.name}",
        f"default severity: {rule.severity}; reads the values: {deep}",
        "",
        rule.documentation(),
    ]
