"""All rendering: what the commands print, and nothing else (no command decides here, none validates).

One idea per module:

- :mod:`~actfmt.reporters.validation`: a validation's :class:`~actfmt.report.Report` as ``text``, ``json``,
  ``github``, ``junit``, ``sarif`` (:func:`render`);
- :mod:`~actfmt.reporters.stats`: statistics as ``text``, ``json``, ``csv`` (:func:`render_stats`);
- :mod:`~actfmt.reporters.plot`: the figure of ``actfmt stats --plot`` (matplotlib, imported when drawing);
- :mod:`~actfmt.reporters.info`: ``actfmt info`` fitted to the terminal;
- :mod:`~actfmt.reporters.convert`: ``actfmt convert``'s summary and ``--dry-run`` plan, ``actfmt verify``'s
  pairs and verdict;
- :mod:`~actfmt.reporters.rules`: ``actfmt rules`` and ``actfmt rule CODE``;
- :mod:`~actfmt.reporters.progress`: the progress bars on stderr;
- :mod:`~actfmt.reporters.common`: paths as shown, lines fitted to a width, sizes and rates, a command's JSON.

Every name printed goes through :mod:`actfmt._escape`.  Importing this package is light: rich and matplotlib
are imported when something is drawn.
"""

from __future__ import annotations

from actfmt.reporters.common import (
    JSON_SCHEMA_VERSION,
    display_path,
    fit_lines,
    format_rate,
    format_size,
    json_document,
    shorten_left,
)
from actfmt.reporters.convert import (
    convert_summary,
    pair_lines,
    plan_lines,
    verify_lines,
    write_convert,
    write_verify,
)
from actfmt.reporters.info import INFO_COLUMNS, info_fields, render_info, write_info
from actfmt.reporters.plot import DEFAULT_DPI, PlotError, check_plot, plot_stats
from actfmt.reporters.progress import PROGRESS_DELAY, ProgressRenderer, progress_renderer
from actfmt.reporters.rules import rule_dict, rule_lines, rules_table, write_rule, write_rules
from actfmt.reporters.stats import (
    PAIR_COLUMNS,
    SPLIT_COLUMNS,
    STATS_FORMATS,
    STATS_LEGEND,
    render_stats,
    render_stats_text,
    sparkline,
)
from actfmt.reporters.stream import stream_lines, write_stream
from actfmt.reporters.validation import (
    FORMATS,
    MAX_PER_RULE,
    SARIF_SCHEMA,
    RuleInfo,
    group_by_split,
    render,
    render_github,
    render_json,
    render_junit,
    render_sarif,
    render_text,
    summary_line,
)

__all__ = [
    "DEFAULT_DPI",
    "FORMATS",
    "INFO_COLUMNS",
    "JSON_SCHEMA_VERSION",
    "MAX_PER_RULE",
    "PAIR_COLUMNS",
    "PROGRESS_DELAY",
    "SARIF_SCHEMA",
    "SPLIT_COLUMNS",
    "STATS_FORMATS",
    "STATS_LEGEND",
    "PlotError",
    "ProgressRenderer",
    "RuleInfo",
    "check_plot",
    "convert_summary",
    "display_path",
    "fit_lines",
    "format_rate",
    "format_size",
    "group_by_split",
    "info_fields",
    "json_document",
    "pair_lines",
    "plan_lines",
    "plot_stats",
    "progress_renderer",
    "render",
    "render_github",
    "render_info",
    "render_json",
    "render_junit",
    "render_sarif",
    "render_stats",
    "render_stats_text",
    "render_text",
    "rule_dict",
    "rule_lines",
    "rules_table",
    "shorten_left",
    "sparkline",
    "stream_lines",
    "summary_line",
    "verify_lines",
    "write_convert",
    "write_info",
    "write_rule",
    "write_rules",
    "write_stream",
    "write_verify",
]
