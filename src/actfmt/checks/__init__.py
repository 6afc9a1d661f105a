"""The validation engine: the rule registry, rule selection and :func:`validate`.

Rules are classes (see :mod:`actfmt.checks.base`) collected from the modules ``io`` (ACT0xx), ``layout``
(ACT1xx), ``metadata`` (ACT2xx), ``shards`` (ACT3xx), ``tensors`` (ACT4xx) and ``cross`` (ACT5xx).  Each split
is scanned once into a :class:`~actfmt.checks.context.SplitContext` (listing, metadata, shard headers; values
with ``deep``) and every rule reads it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from actfmt.checks import cross, io, layout, metadata, shards, stores, tensors  # noqa: F401 - registers the rules
from actfmt.checks.base import Finding, Rule
from actfmt.checks.context import SplitContext, SplitRule, TreeRule, deep_pass, discover_splits, scan_split
from actfmt.errors import FormatError
from actfmt.progress import ProgressCallback
from actfmt.remote import as_path
from actfmt.report import Report, SkippedChecks

__all__ = ["RULES", "UnknownRuleError", "get_rule", "resolve_selection", "validate"]

_OPTIONAL_RULE_MODULES: tuple[str, ...] = ()


class UnknownRuleError(FormatError, KeyError):
    """A rule code, prefix or name that matches no rule (an :class:`~actfmt.errors.ActfmtError`)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _load_optional() -> None:
    import importlib

    for name in _OPTIONAL_RULE_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _collect() -> dict[str, type[Rule]]:
    _load_optional()
    found: dict[str, type[Rule]] = {}
    todo = list(Rule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "code" in vars(cls):
            other = found.get(cls.code)
            if other is not None and other is not cls:
                raise RuntimeError(
                    f"rule code {cls.code} is used by both {other.__name__} and {cls.__name__}"
                )
            found[cls.code] = cls
    return dict(sorted(found.items()))


#: Every rule, code -> class, sorted by code.
RULES: dict[str, type[Rule]] = _collect()
_BY_NAME = {rule.name: code for code, rule in RULES.items()}


def get_rule(code_or_name: str) -> type[Rule]:
    """The rule with this code (``ACT302``, any case) or name (``missing-shard``)."""
    key = code_or_name.strip()
    rule = RULES.get(key.upper()) or RULES.get(_BY_NAME.get(key.lower(), ""))
    if rule is None:
        raise UnknownRuleError(
            f"unknown rule {code_or_name!r}: give a code such as ACT302 or a name such as missing-shard "
            f"(`actfmt rules` lists them all)"
        )
    return rule


def _tokens(values: str | Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [t.strip() for v in values for t in str(v).split(",") if t.strip()]


def _match(token: str) -> set[str]:
    up = token.upper()
    if up == "ALL":
        return set(RULES)
    if up in RULES:
        return {up}
    if token.lower() in _BY_NAME:
        return {_BY_NAME[token.lower()]}
    if up.startswith("ACT") and (up[3:].isdigit() or up == "ACT"):
        matched = {code for code in RULES if code.startswith(up)}
        if matched:
            return matched
    raise UnknownRuleError(
        f"unknown rule selector {token!r}: use a code (ACT302), a prefix (ACT3) or a name (missing-shard); "
        f"`actfmt rules` lists them all"
    )


def resolve_selection(
    select: str | Iterable[str] | None = None, ignore: str | Iterable[str] | None = None
) -> set[str]:
    """The codes that run: ``select`` (default: all) minus ``ignore``.

    Each item is a code (``ACT302``), a prefix (``ACT3``), a name (``missing-shard``) or ``ALL``; items may
    also be comma-separated.  An unknown item raises :class:`UnknownRuleError` naming it.
    """
    chosen: set[str] = set()
    sel = _tokens(select)
    for token in sel:
        chosen |= _match(token)
    if not sel:
        chosen = set(RULES)
    for token in _tokens(ignore):
        chosen -= _match(token)
    return chosen


def _skip_reason(ctx: SplitContext, needed: set[str]) -> str:
    if ctx.format != "pt" and ctx.metadata_state is not None:
        return f"the {ctx.format} store's metadata cannot be read: {ctx.metadata_detail}"
    if ctx.metadata_state == "missing":
        return "metadata.json is missing (ACT101)"
    if ctx.metadata_state == "unreadable":
        return f"metadata.json cannot be read: {ctx.metadata_detail} (ACT001)"
    if ctx.metadata_state == "unparseable":
        return f"metadata.json cannot be parsed: {ctx.metadata_detail} (ACT201)"
    bad = sorted(needed - set(ctx.good))
    codes = sorted({"ACT202" if p.kind == "missing-key" else "ACT203" for p in ctx.problems if p.key in bad})
    return f"metadata.json has no usable {', '.join(bad)} ({', '.join(codes)})"


def validate(
    path: str | Path,
    deep: bool = False,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Report:
    """Validate every split at or below ``path``; return a :class:`~actfmt.report.Report`.

    ``path`` may be an ``Activations`` root, a model or dataset directory, or one split.  Header-only by
    default; ``deep`` reads the values too (ACT406, ACT407, ACT501), reporting progress through ``progress``.
    ``jobs`` threads probe (and read) shards in parallel; the result does not depend on it.  Raises
    :class:`~actfmt.errors.NotASplitError` when ``path`` does not exist or holds no split, and
    :class:`UnknownRuleError` for an unknown ``select`` / ``ignore`` item.

    ``path`` may be an fsspec URL (``s3://bucket/Activations``, ``gs://...``, ``memory://...``), with
    ``storage_options`` for its filesystem: the tree is listed once and each shard's header is read with two
    small ranged reads (``--deep`` downloads the shards).
    """
    start = time.perf_counter()
    selected = resolve_selection(select, ignore)
    root = as_path(path, storage_options)
    report = Report(root=str(path), deep=deep)
    contexts = [scan_split(p, root, fmt, jobs=max(1, int(jobs))) for p, fmt in discover_splits(root)]
    if deep:
        deep_pass(contexts, jobs=max(1, int(jobs)), progress=progress)
    found: list[Finding] = []
    for ctx in contexts:
        report.splits.append(ctx.location)
        report.layers += sum(layer.is_dir for layer in ctx.layers)
        report.shards += len(ctx.all_shards())
        skipped: list[str] = []
        needed: set[str] = set()
        for code, rule in RULES.items():
            if not issubclass(rule, SplitRule) or (rule.deep and not deep):
                continue
            if rule.pt_only and ctx.format != "pt":
                continue
            if not ctx.has(*rule.needs):
                if code in selected:
                    skipped.append(code)
                    needed |= set(rule.needs)
                continue
            found.extend(rule.check(ctx))
        if skipped:
            report.skipped.append(SkippedChecks(ctx.location, tuple(skipped), _skip_reason(ctx, needed)))
    for rule in RULES.values():
        if issubclass(rule, TreeRule) and not (rule.deep and not deep):
            found.extend(rule.check_tree(contexts))
    for f in found:
        if f.code in selected:
            report.findings.append(f)
        else:
            report.ignored += 1
    report.elapsed = time.perf_counter() - start
    return report
