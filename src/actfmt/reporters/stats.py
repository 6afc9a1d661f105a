"""Render statistics (:class:`~actfmt.statistics.StatsResult`): ``text`` (rich tables and curves), ``json``,
``csv``; the figure is :mod:`actfmt.reporters.plot`.  Names are escaped (:mod:`actfmt._escape`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from actfmt._escape import escape
from actfmt.reporters.common import clean, display_path, fit_lines, is_fancy, json_text

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from actfmt.statistics import StatsResult

__all__ = [
    "PAIR_COLUMNS",
    "SPLIT_COLUMNS",
    "STATS_FORMATS",
    "STATS_LEGEND",
    "render_stats",
    "render_stats_text",
    "sparkline",
]

#: ``actfmt stats --output-format`` choices.
STATS_FORMATS = ("text", "json", "csv")
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_ASCII = " .:-=+*#"


def sparkline(values: Sequence[float | None], fancy: bool = True) -> str:
    """One character per value, scaled from the lowest to the highest (``None``: a blank)."""
    marks = _SPARK if fancy else _SPARK_ASCII
    finite = [v for v in values if v is not None and v == v and abs(v) != float("inf")]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    out = []
    for v in values:
        if v is None or v != v or abs(v) == float("inf"):
            out.append(" ")
        else:
            out.append(marks[0] if hi == lo else marks[round((v - lo) / (hi - lo) * (len(marks) - 1))])
    return "".join(out)


def _num(v: Any) -> str:
    """A figure in a table: integers as is, floats with 4 significant digits, trailing zeros kept (``5.000``,
    ``0.7250``), so a column reads at one precision."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if v != v:
        return "nan"
    return f"{v:#.4g}"


#: Column headers of the text tables (short: a table fits 80 columns) and the JSON names they stand for.
SPLIT_COLUMNS = (
    ("|mean|", "mean_norm"),
    ("rms", "rms"),
    ("std", "std"),
    ("norm avg", "row_norm_mean"),
    ("norm max", "row_norm_max"),
    ("abs max", "abs_max"),
    ("scale", "scale_factor"),
    ("nan/inf", "nonfinite"),
    ("zero", "zero_rows"),
)
PAIR_COLUMNS = (
    ("diff norm", "diff_of_means_norm"),
    ("cosine", "cosine_of_means"),
    ("cohen d", "cohens_d"),
    ("accuracy", "midpoint_accuracy"),
)


def render_stats_text(result: StatsResult, console: Console) -> None:
    """Rich tables: per split, the figures of each layer and curves of the main ones across layers; per pair
    of sibling splits, the pair figures of each layer, and the layer where they separate best."""
    from rich.table import Table
    from rich.text import Text

    fancy = is_fancy(console.file)
    one_root = len(result.roots) == 1
    width = console.width if console.is_terminal else None

    def heading(title: str, about: str) -> None:
        """``title  (about)`` on one line, or on a terminal too narrow for it: the title broken after a ``/``,
        then ``(about)`` under it."""
        title, about = clean(title), f"({escape(about)})"
        if width is None or len(title) + 2 + len(about) <= width:
            console.print(Text.assemble((title, "bold"), f"  {about}"), soft_wrap=True)
            return
        for line in fit_lines(title, width, "  ", ""):
            console.print(Text(line, style="bold"), soft_wrap=True)
        for line in fit_lines(about, width, "  ", "  "):
            console.print(Text(line), soft_wrap=True)

    def table(columns: Sequence[tuple[str, str]]) -> Table:
        t = Table(box=None, padding=(0, 1, 0, 1), pad_edge=False, collapse_padding=True)
        t.add_column("layer", no_wrap=True)
        for header, _ in columns:
            t.add_column(header, justify="right", no_wrap=True)
        return t

    def curves(names: Sequence[str], rows: Sequence[Any], ranges: bool) -> None:
        for name in names:
            values = [getattr(r, name) for r in rows]
            shown = [v for v in values if v is not None]
            span = (
                f"  {_num(min(shown))} {'…' if fancy else '..'} {_num(max(shown))}"
                if ranges and shown
                else ""
            )
            console.print(
                Text.assemble(f"  {name:<18} ", (sparkline(values, fancy), "cyan"), span), soft_wrap=True
            )

    for s in result.splits:
        title = s.location if s.location != "." and one_root else display_path(s.path)
        about = ", ".join(
            x
            for x in (
                s.format,
                s.dtype or "",
                f"hidden {s.hidden_dim}" if s.hidden_dim else "",
                f"{s.layers[0].rows:,} rows" if s.layers else "",
                "kept by actfmt convert" if s.source == "stored" else "computed",
            )
            if x
        )
        heading(title, about)
        t = table(SPLIT_COLUMNS)
        for li in s.layers:
            # A store's layer names are the store's: Text, so that markup in them is printed as it is.
            cells: list[Any] = [
                Text(escape(li.layer)),
                *(_num(getattr(li, key)) for _, key in SPLIT_COLUMNS[:-2]),
            ]
            cells.append(Text(_num(li.nonfinite), style="red" if li.nonfinite else ""))
            cells.append(Text(_num(li.zero_rows), style="yellow" if li.zero_rows else ""))
            t.add_row(*cells)
        console.print(t)
        if len(s.layers) > 1:
            curves(("row_norm_mean", "std", "mean_norm"), s.layers, True)
        console.print()
    for p in result.pairs:
        where = p.location if p.location != "." and one_root else display_path(p.dataset)
        heading(where, f"{p.a} vs {p.b}")
        t = table(PAIR_COLUMNS)
        for pl in p.layers:
            style = "bold green" if pl.layer == p.best_layer else ""
            t.add_row(
                Text(escape(pl.layer), style=style),
                *(_num(getattr(pl, key)) for _, key in PAIR_COLUMNS[:-1]),
                Text(_num(pl.midpoint_accuracy), style=style),
            )
        console.print(t)
        if len(p.layers) > 1:
            curves(("midpoint_accuracy", "cohens_d"), p.layers, True)
        best = next((pl for pl in p.layers if pl.layer == p.best_layer), None)
        if best is not None:
            console.print(
                Text.assemble(
                    "  best layer: ",
                    (escape(best.layer), "bold green"),
                    f" (midpoint accuracy {_num(best.midpoint_accuracy)}, Cohen's d {_num(best.cohens_d)})",
                ),
                soft_wrap=True,
            )
        else:
            console.print("  best layer: none (the means do not differ)")
        console.print()


STATS_LEGEND = (
    "|mean|: norm of the mean; norm avg/max: of the row norms; scale: sqrt(hidden_dim) / norm avg (SAELens); "
    "pairs along the difference "
    "of the means; accuracy: of the midpoint probe. Full names: --output-format json or csv."
)


def render_stats(fmt: str, result: StatsResult, out: IO[str], *, color: bool | None = None) -> None:
    """Write ``result`` to ``out`` as ``text``, ``json`` or ``csv``."""
    if fmt == "text":
        from rich.console import Console

        console = Console(file=out, highlight=False, no_color=None if color is None else not color)
        render_stats_text(result, console)
        from rich.text import Text

        console.print(Text(STATS_LEGEND, style="dim"))
    elif fmt == "json":
        out.write(json_text(result.to_dict()))
    elif fmt == "csv":
        out.write(_safe_csv(result.to_csv()))
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(STATS_FORMATS)}")


def _safe_csv(text: str) -> str:
    """CSV whose every field is :func:`actfmt._escape.escape`-d: a name cannot break a row, hold a control
    character or start a line (the first column is always ``kind``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(text, newline="")):
        writer.writerow([escape(cell) for cell in row])
    return out.getvalue()
