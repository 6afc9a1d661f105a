"""The validation engine: the rule registry, rule selection and :func:`validate`.

Rules are classes (see :mod:`actfmt.checks.base`) collected from the modules ``io`` (ACT0xx), ``layout``
(ACT1xx), ``metadata`` (ACT2xx), ``shards`` (ACT3xx), ``tensors`` (ACT4xx), ``cross`` (ACT5xx) and ``stores``
(ACT6xx).  The tree is walked once (:func:`actfmt.formats.walk_splits`: what it cannot read is a finding
too), each split is scanned once into a :class:`~actfmt.checks.context.SplitContext` (listing, metadata,
shard headers; values with ``deep``) and every rule reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from actfmt.checks import cross, io, layout, metadata, shards, stores, tensors  # noqa: F401 - registers the rules
from actfmt.checks.base import Finding, Rule
from actfmt.checks.context import (
    SplitContext,
    SplitRule,
    TreeRule,
    WalkRule,
    deep_bytes,
    deep_read,
    scan_split,
)
from actfmt.checks.stores import store_units
from actfmt.errors import FormatError
from actfmt.formats import Walk, no_split_found, walk_splits
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.report import Report, SkippedChecks
from actfmt.storage import PathLike, resolve

__all__ = ["RULES", "UnknownRuleError", "get_rule", "resolve_selection", "validate"]


class UnknownRuleError(FormatError, KeyError):
    """A rule code, prefix or name that matches no rule (an :class:`~actfmt.errors.ActfmtError`)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _collect() -> dict[str, type[Rule]]:
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
    if ctx.inventory is None and ctx.metadata_state is not None:
        return f"the {ctx.format} store's metadata cannot be read: {ctx.metadata_detail}"
    if ctx.metadata_state == "missing":
        return "metadata.json is missing (ACT101)"
    if ctx.metadata_state == "unreadable":
        return f"metadata.json cannot be read: {ctx.metadata_detail} (ACT001)"
    if ctx.metadata_state == "special":
        return f"metadata.json is {ctx.metadata_detail} (ACT006)"
    if ctx.metadata_state == "outside":
        return "metadata.json is a link outside the tree, never read (ACT005)"
    if ctx.metadata_state == "unparseable":
        return f"metadata.json cannot be parsed: {ctx.metadata_detail} (ACT201)"
    bad = sorted(needed - set(ctx.good))
    code_of = {"missing-key": "ACT202", "missing-producer-key": "ACT205"}
    codes = sorted({code_of.get(p.kind, "ACT203") for p in ctx.problems if p.key in bad})
    return f"metadata.json has no usable {', '.join(bad)} ({', '.join(codes)})"


def validate(
    path: PathLike,
    deep: bool = False,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
    walk: Walk | None = None,
) -> Report:
    """Validate every split at or below ``path``; return a :class:`~actfmt.report.Report`.

    ``path`` may be an ``Activations`` root, a model or dataset directory, or one split.  Header-only by
    default; ``deep`` reads the values too (ACT406, ACT407, ACT501, ACT602), reporting progress through
    ``progress``.  ``jobs`` threads probe (and read) shards in parallel; the result does not depend on it.
    Raises :class:`~actfmt.errors.NotASplitError` when ``path`` does not exist or holds no split (and no part of
    it that could not be read), and :class:`UnknownRuleError` for an unknown ``select`` / ``ignore`` item.

    ``path`` may be an fsspec URL (``s3://bucket/Activations``, ``gs://...``, ``memory://...``), with
    ``storage_options`` for its filesystem: the tree is listed once and each shard's header is read with two
    small ranged reads.  ``walk``: the tree's :class:`~actfmt.formats.walk.Walk` when the caller has it
    (``convert`` validates the tree it has just walked: one walk).
    """
    start = time.perf_counter()
    selected = resolve_selection(select, ignore)
    root = resolve(path, storage_options)
    jobs = max(1, int(jobs))
    report = Report(root=str(path), deep=deep)
    walk = walk if walk is not None else walk_splits(root)
    if not walk.splits and not walk.problems:
        raise no_split_found(root, advice="point actfmt at an Activations tree or a split")
    contexts = [scan_split(split, root, jobs=jobs) for split in walk.splits]
    try:
        if deep:
            total = deep_bytes(contexts)
            emit(
                progress,
                ProgressEvent("start", "validate", total=total or None, description="reading values"),
            )

            def on_bytes(n: int) -> None:
                emit(progress, ProgressEvent("advance", "validate", advance=n, nbytes=n))

            deep_read(contexts, jobs, on_bytes)
            emit(progress, ProgressEvent("end", "validate"))
        found: list[Finding] = []
        for rule in RULES.values():
            if issubclass(rule, WalkRule):
                found.extend(rule.check_walk(walk.problems))
        for ctx in contexts:
            report.splits.append(ctx.location)
            report.layers += sum(layer.is_dir for layer in ctx.layers)
            report.shards += len(ctx.all_shards())
            if ctx.inventory is None:
                chunks, layer_files = store_units(ctx)
                report.chunks += chunks
                report.layer_files += layer_files
            skipped: list[str] = []
            needed: set[str] = set()
            for code, rule in RULES.items():
                if not issubclass(rule, SplitRule) or (rule.deep and not deep):
                    continue
                if rule.needs_inventory and ctx.inventory is None:
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
    finally:
        for ctx in contexts:
            ctx.close()
    once: set[tuple[str, str]] = set()
    for f in found:
        if (f.code, f.location) in once:  # one cause found twice (a link out of the tree: walk and scan)
            continue
        once.add((f.code, f.location))
        if f.code in selected:
            report.findings.append(f)
        else:
            report.ignored += 1
    report.elapsed = time.perf_counter() - start
    return report
