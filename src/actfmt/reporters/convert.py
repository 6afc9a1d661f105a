"""The text of ``actfmt convert`` (the summary line, the ``--dry-run`` plan) and of ``actfmt verify`` (the pairs of
splits compared, the differences, the verdict).  Every line is escaped (:mod:`actfmt._escape`): it names the
tree's files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO, Any

import click

from actfmt._escape import escape, escape_line
from actfmt.reporters.common import display_path, format_rate, format_size, json_document, plural

__all__ = ["convert_summary", "pair_lines", "plan_lines", "verify_lines", "write_convert", "write_verify"]


def convert_summary(result: Any, dst: str) -> str:
    """``Converted 2 splits · 12 layers · 1.5 GB in 3.2 s (468.8 MB/s) -> out/`` (``, 1 already complete`` after
    the splits when some were kept)."""
    skipped = f", {len(result.skipped)} already complete" if result.skipped else ""
    n = len(result.splits)
    # a rate over less than a second is mostly start-up: say the size and the time only
    rate = f" ({format_rate(result.bytes, result.seconds)})" if result.seconds >= 1 else ""
    return (
        f"Converted {n} split{'' if n == 1 else 's'}{skipped} · {result.layers} layers · "
        f"{format_size(result.bytes)} in {result.seconds:.1f} s{rate} -> {escape(dst)}"
    )


def plan_lines(result: Any, dst: str) -> list[str]:
    """``convert --dry-run``: one line per split (source -> destination, layers, size, action), then a total;
    each line escaped."""
    return [escape_line(line) for line in _plan_lines(result, dst)]


def _plan_lines(result: Any, dst: str) -> list[str]:
    """:func:`plan_lines`, not escaped yet."""

    def shown(dest: Any) -> str:  # DST as the user typed it, then the mirrored part
        text, root = str(dest), os.path.abspath(dst)
        return dst.rstrip("/") + text[len(root) :] if text.startswith(root + "/") else text

    rows = [
        (p.job.label, shown(p.job.destination), p.layers, format_size(p.bytes), p.action)
        for p in result.planned
    ]
    wa = max((len(r[0]) for r in rows), default=0)
    wb = max((len(r[1]) for r in rows), default=0)
    lines = [f"{a:<{wa}}  -> {b:<{wb}}  {n:>3} layers  {size:>9}  {act}" for a, b, n, size, act in rows]
    n = len(rows)
    lines.append(
        f"Dry run: {n} split{'' if n == 1 else 's'} · {result.layers} layers · {format_size(result.bytes)} "
        f"-> {dst}; nothing written."
    )
    exists = [p for p in result.planned if p.action == "exists"]
    if exists:
        lines.append(
            f"{len(exists)} destination{'' if len(exists) == 1 else 's'} exist: a real run refuses them; "
            "add --overwrite (replace) or --resume (continue)."
        )
    if any(p.action == "refused" for p in result.planned):
        lines.append(
            "refused: not a complete actfmt store of this format; actfmt replaces only its own complete stores."
        )
    return lines


def pair_lines(a: str, b: str, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The pairs of splits ``verify`` compared: ``A: PATH`` and ``B: PATH``, then under ``compared in model/ds/:``
    one line per pair (``EM  with EM.zarr``), grouped by the directory both splits lie in."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for x, y in pairs:
        dx, _, nx = x.rpartition("/")
        dy, _, ny = y.rpartition("/")
        if dx and dx == dy:
            groups.setdefault(dx, []).append((nx, ny))
        else:
            groups.setdefault("", []).append(("A" if x == "." else f"A/{x}", "B" if y == "." else f"B/{y}"))
    a, b, pairs = escape(a), escape(b), [(escape(x), escape(y)) for x, y in pairs]  # names of the trees
    lines = [f"A: {a}", f"B: {b}"]
    for where, named in groups.items():
        lines.append(f"compared in {where}/:" if where else "compared:")
        width = max(len(x) for x, _ in named)
        lines += [f"  {x:<{width}}  with {y}" for x, y in named]
    return [escape_line(line) for line in lines]


def verify_lines(res: Any, a: str, b: str, *, quiet: bool = False) -> list[str]:
    """``actfmt verify``'s text: the pairs compared (:func:`pair_lines`), each difference, the verdict;
    ``quiet``: the differences only."""
    lines = []
    if not quiet:
        lines += pair_lines(display_path(a), display_path(b), res.pairs)
    lines += [escape_line(d) for d in res.differences]
    if not quiet:
        lines.append(
            f"✓ Same activations: {plural(res.splits, 'pair')} of splits, "
            f"{plural(res.layers, 'layer')}, {format_size(res.bytes)}."
            if res.equal
            else f"✗ Different: {plural(len(res.differences), 'difference')}."
        )
    return lines


def write_verify(
    res: Any, a: str, b: str, out: IO[str], *, as_json: bool = False, quiet: bool = False
) -> None:
    """``actfmt verify``'s output: :func:`verify_lines`, or the result's ``to_dict()`` as JSON."""
    if as_json:
        out.write(json_document(res.to_dict()) + "\n")
        return
    for line in verify_lines(res, a, b, quiet=quiet):
        click.echo(line, file=out)


def write_convert(result: Any, dst: str, out: IO[str], *, as_json: bool = False) -> None:
    """``actfmt convert``'s output to ``-o``: the result's ``to_dict()`` as JSON, or the ``--dry-run`` plan."""
    if as_json:
        out.write(json_document(result.to_dict()) + "\n")
        return
    for line in plan_lines(result, dst):
        out.write(line + "\n")
