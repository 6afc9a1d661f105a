"""The text and JSON of ``actfmt rules`` (one rule a line) and ``actfmt rule CODE`` (one rule's documentation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Any

import click

from actfmt.reporters.common import json_document
from actfmt.reporters.validation import RuleInfo

__all__ = ["rule_dict", "rule_lines", "rules_table", "write_rule", "write_rules"]


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


def write_rules(rules: Sequence[RuleInfo], out: IO[str], *, as_json: bool = False) -> None:
    """``actfmt rules``: :func:`rules_table`, or every rule's :func:`rule_dict` in one JSON document."""
    if as_json:
        out.write(json_document([rule_dict(r) for r in rules], key="rules") + "\n")
        return
    out.write(rules_table(rules))


def write_rule(rule: RuleInfo, out: IO[str] | None = None, *, as_json: bool = False) -> None:
    """``actfmt rule CODE``: :func:`rule_lines`, or :func:`rule_dict` as JSON (to stdout by default)."""
    if as_json:
        click.echo(json_document(rule_dict(rule)), file=out)
        return
    for line in rule_lines(rule):
        click.echo(line, file=out)
