"""Render validation :class:`~actfmt.report.Report` objects (``text``, ``json``, ``github``, ``junit``, ``sarif``)
and statistics (:class:`~actfmt.statistics.StatsResult`: ``text``, ``json``, ``csv``; the plot is
:mod:`actfmt.plot`).

Every renderer takes the list of reports of one run (one per PATH given on the command line) and returns, or
writes, the whole output.  Nothing here decides an exit code (see :meth:`Report.exit_code`) and nothing here
validates anything: the reporters only present what a Report holds.

Paths shown to the user are the PATH as given joined with the finding's ``location``, made relative to the
current directory when they lie under it (so GitHub annotates the offending file), always with ``/``.
The ``json`` output of one PATH is exactly ``report.to_dict()``; with several PATHs it is a JSON array of
those objects, in the order the PATHs were given.

Names come from the tree, so from whoever made it: every renderer shows them through :mod:`actfmt._escape` (one
rule: control characters and undecodable bytes written visibly, ``\\xff``; no line starting with ``::``; JSON,
SARIF, JUnit and CSV valid for any byte; an undecodable byte is ``\\xff`` in the JSON too).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol

from actfmt._escape import dumps, escape, escape_line, escape_lines, gh_data, gh_property, neutralise
from actfmt.report import ERROR, WARNING, Finding, Report, SkippedChecks
from actfmt.statistics import StatsResult

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = [
    "FORMATS",
    "STATS_FORMATS",
    "RuleInfo",
    "display_path",
    "group_by_split",
    "render",
    "render_github",
    "render_json",
    "render_junit",
    "render_sarif",
    "render_stats",
    "render_stats_text",
    "render_text",
    "sparkline",
    "summary_line",
]

FORMATS = ("text", "json", "github", "junit", "sarif")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1}


class RuleInfo(Protocol):
    """What a reporter needs to know about a rule (a :class:`~actfmt.checks.base.Rule` class fits)."""

    code: str
    name: str
    severity: str
    deep: bool

    @classmethod
    def title(cls) -> str: ...

    @classmethod
    def documentation(cls) -> str: ...


# --------------------------------------------------------------------------------------------- paths


def _norm_location(location: str) -> str:
    """``""`` for the PATH itself, else the location with ``/`` and no ``./`` prefix."""
    loc = location.replace("\\", "/").strip("/")
    return "" if loc in ("", ".") else str(PurePosixPath(loc))


def display_path(root: str, location: str = "") -> str:
    """``root`` joined with ``location``: relative to the cwd when under it, else as given, with ``/``."""
    loc = _norm_location(location)
    joined = os.path.normpath(os.path.join(root, loc) if loc else root)
    if os.path.isabs(joined):
        try:
            joined = os.path.relpath(joined, os.getcwd())
            if joined == ".." or joined.startswith(".." + os.sep):
                joined = os.path.normpath(os.path.join(root, loc) if loc else root)
        except ValueError:  # another drive on Windows
            pass
    return joined.replace(os.sep, "/")


def _split_of(location: str, splits: Sequence[str]) -> str | None:
    """The deepest split (as listed in the report) that contains ``location``, else ``None``."""
    loc = _norm_location(location)
    best: str | None = None
    best_len = -1
    for split in splits:
        norm = _norm_location(split)
        if (norm == "" or loc == norm or loc.startswith(norm + "/")) and len(norm) > best_len:
            best, best_len = split, len(norm)
    return best


def _within(location: str, split: str | None) -> str:
    """``location`` relative to ``split`` (``""`` for the split itself)."""
    loc = _norm_location(location)
    norm = _norm_location(split or "")
    if not norm:
        return loc
    return "" if loc == norm else loc[len(norm) + 1 :]


def group_by_split(report: Report) -> list[tuple[str | None, list[Finding]]]:
    """Findings grouped by split, in the report's split order; ``None`` groups findings outside every split.

    Every split appears, with an empty list when it is clean.
    """
    groups: dict[str | None, list[Finding]] = {split: [] for split in report.splits}
    for finding in report.sorted_findings():
        groups.setdefault(_split_of(finding.location, report.splits), []).append(finding)
    return list(groups.items())


def _all_findings(reports: Sequence[Report]) -> list[tuple[Report, Finding]]:
    """Every finding of every report, worst first, then by path and code."""
    pairs = [(r, f) for r in reports for f in r.findings]
    return sorted(
        pairs,
        key=lambda p: (
            _SEVERITY_ORDER.get(p[1].severity, 9),
            display_path(p[0].root, p[1].location),
            p[1].code,
        ),
    )


# --------------------------------------------------------------------------------------------- text helpers

_BAD_XML_CHARS = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: str) -> str:
    """One line of text output that holds names: control characters escaped visibly, undecodable file-name
    bytes written ``\\xff``, a leading ``::`` neutralised (:func:`actfmt._escape.escape_line`)."""
    return escape_line(text)


def _xml_clean(text: str, *, lines: bool = False) -> str:
    """Text that XML 1.0 can hold, names escaped like in the text output: on one line, or with ``lines``, each
    line of ``text`` (its line breaks kept)."""
    return _BAD_XML_CHARS.sub("\ufffd", escape_lines(text) if lines else escape_line(text))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _seconds(t: float) -> str:
    return f"{t:.2f} s" if t < 1 else f"{t:.1f} s"


def _totals(reports: Sequence[Report]) -> dict[str, Any]:
    return {
        "splits": sum(len(r.splits) for r in reports),
        "layers": sum(r.layers for r in reports),
        "shards": sum(r.shards for r in reports),
        "chunks": sum(r.chunks for r in reports),
        "layer_files": sum(r.layer_files for r in reports),
        "elapsed": sum(r.elapsed for r in reports),
        "errors": sum(r.errors for r in reports),
        "warnings": sum(r.warnings for r in reports),
        "ignored": sum(r.ignored for r in reports),
    }


def summary_line(reports: Sequence[Report], dot: str = "·", dash: str = "—") -> str:
    """``Checked 2 splits · 56 layers · 784 shards in 0.9 s — 3 errors, 1 warning`` (+ ``, 2 ignored``).

    What was checked is counted in the units of what was found: ``.pt`` shards, chunks of zarr / hdf5 stores,
    layer files of safetensors stores (``Checked 6 splits · 18 layers · 12 chunks · 6 layer files``); only
    the units with a count are named (``0 shards`` when there is none).
    """
    t = _totals(reports)
    counts = [_plural(t["errors"], "error"), _plural(t["warnings"], "warning")]
    if t["ignored"]:
        counts.append(f"{t['ignored']} ignored")
    units = [
        _plural(t[key], word)
        for key, word in (("shards", "shard"), ("chunks", "chunk"), ("layer_files", "layer file"))
        if t[key]
    ] or [_plural(0, "shard")]
    checked = f" {dot} ".join([_plural(t["splits"], "split"), _plural(t["layers"], "layer"), *units])
    return f"Checked {checked} in {_seconds(t['elapsed'])} {dash} {', '.join(counts)}"


# --------------------------------------------------------------------------------------------- text


#: Findings of one rule shown per split in text output (the rest are counted; JSON lists every one).
MAX_PER_RULE = 10


def _capped(findings: Sequence[Finding]) -> tuple[list[Finding], dict[str, int]]:
    """At most :data:`MAX_PER_RULE` findings of each rule, in order, and how many of each were left out."""
    seen: dict[str, int] = {}
    shown: list[Finding] = []
    rest: dict[str, int] = {}
    for f in findings:
        seen[f.code] = seen.get(f.code, 0) + 1
        if seen[f.code] <= MAX_PER_RULE:
            shown.append(f)
        else:
            rest[f.code] = rest.get(f.code, 0) + 1
    return shown, rest


_BREAK = re.compile(r"(?<=/)|(?= )")


def fit_lines(text: str, width: int | None, indent: str = "", first: str | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at a space or after a ``/`` (a path is cut
    between its components), a piece longer than a line cut where it must; the first line starts with ``first``
    (default ``indent``), the others with ``indent``.  ``width=None``: one line.  No line starts with ``::``.
    """
    first = indent if first is None else first
    if width is None or len(first) + len(text) <= width:
        return [neutralise(first + text)]
    lines: list[str] = []
    line, lead = "", first
    for piece in _BREAK.split(text):
        room = max(width - len(lead), 8)
        if line and len(line) + len(piece) > room:
            lines.append(lead + line.rstrip(" "))
            line, lead, piece = "", indent, piece.lstrip(" ")
            room = max(width - len(lead), 8)
        while len(line) + len(piece) > room:  # a piece longer than a line
            cut = room - len(line)
            lines.append(lead + line + piece[:cut])
            line, lead, piece = "", indent, piece[cut:]
            room = max(width - len(lead), 8)
        line += piece
    if line.strip(" ") or not lines:
        lines.append(lead + line)
    return [neutralise(x) for x in lines]


def render_text(
    reports: Sequence[Report], console: Console, *, strict: bool = False, quiet: bool = False
) -> None:
    """Rich text: findings grouped by split, skipped checks, one summary line, and a verdict.

    ``quiet`` keeps the findings and skipped checks only.  On a terminal every line fits its width (paths are
    broken between components, messages between words, under their indentation); elsewhere (a pipe, a file, a CI
    log) each item stays on one line.
    """
    from rich.text import Text

    encoding = (getattr(console.file, "encoding", None) or "utf-8").lower().replace("-", "")
    fancy = encoding.startswith("utf")
    dot, dash, tick, cross = ("·", "—", "✓", "✗") if fancy else ("-", "-", "OK:", "X")
    width = console.width if console.is_terminal else None

    def say(text: str, style: str = "", indent: str = "", first: str = "") -> None:
        """``text`` from ``first``, continued under ``indent``."""
        for line in fit_lines(text, width, indent, first):
            console.print(Text(line, style=style), soft_wrap=True)

    for report in reports:
        skipped_by_split: dict[str | None, list[SkippedChecks]] = {}
        for skipped in report.skipped:
            skipped_by_split.setdefault(_split_of(skipped.location, report.splits), []).append(skipped)
        groups = group_by_split(report)
        groups += [(split, []) for split in skipped_by_split if split not in dict(groups)]
        for split, findings in groups:
            skips = skipped_by_split.get(split, [])
            if not findings and not skips:
                continue
            header = display_path(report.root, split or "")
            say(_clean(header), "bold underline", "  ")
            shown, rest = _capped(findings)
            for f in shown:
                style = "red" if f.severity == ERROR else "yellow"
                where = _clean(_within(f.location, split))
                head = f"  {f.severity:<7} {f.code} {f.name}"
                line = Text.assemble(
                    "  ",
                    (f"{f.severity:<7}", style),
                    " ",
                    (f.code, "bold"),
                    " ",
                    (f.name, style),
                )
                if where and (width is None or len(head) + 2 + len(where) <= width):
                    line.append(f"  {where}", "cyan")
                    where = ""
                console.print(line, soft_wrap=True)
                if where:  # too long for the line: under it
                    say(where, "cyan", " " * 12, " " * 10)
                say(_clean(f.message), "", " " * 10, " " * 10)
            for code, n in rest.items():
                say(
                    f"... and {n} more {code} finding{'s' if n > 1 else ''} in this split "
                    f"(every finding: --output-format json)",
                    "dim",
                    "    ",
                    "  ",
                )
            for s in skips:
                where = _clean(_within(s.location, split))
                line = Text.assemble("  ", ("skipped", "magenta"), " ", (", ".join(s.codes), "bold"))
                if where and (width is None or line.cell_len + 2 + len(where) <= width):
                    line.append(f"  {where}")
                    where = ""
                console.print(line, soft_wrap=True)
                if where:
                    say(where, "", " " * 12, " " * 10)
                say(_clean(s.reason), "", " " * 10, " " * 10)
            console.print()

    if quiet:
        return
    t = _totals(reports)
    failed = t["errors"] > 0 or (strict and t["warnings"] > 0)
    say(summary_line(reports, dot, dash), "bold red" if failed else "bold", "  ")
    if any(r.partial for r in reports):
        say("Some checks were skipped (see above): fix what they depend on and run again.")
    if failed:
        if not t["errors"]:
            say(f"{cross} Failed {dash} warnings fail with --strict", "bold red")
        return
    if t["warnings"]:
        verdict = (
            f"{tick} OK {dash} no errors ({_plural(t['warnings'], 'warning')}; --strict makes them fail)"
        )
    else:
        verdict = f"{tick} OK {dash} no problems found"
    say(verdict, "bold green", "  ")


# --------------------------------------------------------------------------------------------- json


def _dumps(data: Any) -> str:
    """JSON valid for any name: an undecodable file-name byte is written ``\\xff`` (as in the text output), and no
    raw control character reaches the output (:func:`actfmt._escape.dumps`)."""
    return dumps(data) + "\n"


def render_json(reports: Sequence[Report]) -> str:
    """One PATH: exactly ``report.to_dict()``; several: a JSON array of them, in order (an undecodable byte of a
    name is written ``\\xff``, as in every output: :func:`actfmt._escape.dumps`)."""
    if len(reports) == 1:
        return _dumps(reports[0].to_dict())
    return _dumps([r.to_dict() for r in reports])


# --------------------------------------------------------------------------------------------- github


def render_github(reports: Sequence[Report]) -> str:
    """GitHub Actions workflow commands: ``::error file=…,title=ACT302 missing-shard::…``, worst first.

    Skipped checks follow as ``::notice`` lines.  Nothing else is printed.  Names are escaped
    (:func:`actfmt._escape.escape`), then encoded as GitHub decodes them (``%25 %0D %0A``, and ``%3A %2C`` in
    properties): a name can neither end a command nor start another.
    """
    lines = []
    for report, f in _all_findings(reports):
        level = "error" if f.severity == ERROR else "warning"
        path = display_path(report.root, f.location)
        lines.append(
            f"::{level} file={gh_property(path)},title={gh_property(f'{f.code} {f.name}')}::{gh_data(f.message)}"
        )
    for report in reports:
        for s in report.skipped:
            path = display_path(report.root, s.location)
            text = f"skipped {', '.join(s.codes)}: {s.reason}"
            lines.append(f"::notice file={gh_property(path)},title=actfmt skipped checks::{gh_data(text)}")
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------- junit


def _value(value: Any) -> str:
    """An expected / actual value on one line, as in the JSON output."""
    return escape(dumps(value, indent=None))


def _classname(path: str) -> str:
    # Jenkins splits a classname at its dots into package and class; keep a path in one piece.
    return "actfmt." + path.replace(".", "_")


def render_junit(reports: Sequence[Report], *, strict: bool = False) -> str:
    """JUnit XML for GitLab and Jenkins: one ``<testsuite>`` per split, one ``<testcase>`` per finding.

    Failures are exactly what makes the exit status 1: errors, and warnings under ``strict``; other warnings
    are passing test cases carrying their message in ``<system-out>``.  A clean split is one passing test case
    (``valid``); skipped checks are ``<skipped>`` test cases.
    """
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="actfmt validate")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for report in reports:
        skipped_by_split: dict[str | None, list[Any]] = {}
        for s in report.skipped:
            skipped_by_split.setdefault(_split_of(s.location, report.splits), []).append(s)
        groups = group_by_split(report)
        for split in skipped_by_split:
            if split not in dict(groups):
                groups.append((split, []))
        for split, findings in groups:
            suite_path = display_path(report.root, split or "")
            suite = ET.SubElement(root, "testsuite", name=_xml_clean(suite_path))
            counts = {"tests": 0, "failures": 0, "skipped": 0}
            for f in findings:
                path = display_path(report.root, f.location)
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=_xml_clean(_classname(suite_path)),
                    name=_xml_clean(f"{f.code} {f.name}: {_within(f.location, split) or '.'}"),
                    file=_xml_clean(path),
                )
                details = [f"{f.severity} {f.code} {f.name} at {escape(path)}", escape(f.message)]
                if f.expected is not None or f.actual is not None:
                    details += [f"expected: {_value(f.expected)}", f"actual: {_value(f.actual)}"]
                body = _xml_clean("\n".join(details), lines=True)
                counts["tests"] += 1
                if f.severity == ERROR or strict:
                    failure = ET.SubElement(case, "failure", type=f.code, message=_xml_clean(f.message))
                    failure.text = body
                    counts["failures"] += 1
                else:
                    ET.SubElement(case, "system-out").text = body
            for s in skipped_by_split.get(split, []):
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=_xml_clean(_classname(suite_path)),
                    name=_xml_clean(f"skipped {', '.join(s.codes)}"),
                    file=_xml_clean(display_path(report.root, s.location)),
                )
                ET.SubElement(case, "skipped", message=_xml_clean(s.reason))
                counts["tests"] += 1
                counts["skipped"] += 1
            if counts["tests"] == 0:
                ET.SubElement(suite, "testcase", classname=_xml_clean(_classname(suite_path)), name="valid")
                counts["tests"] += 1
            for key, value in counts.items():
                suite.set(key, str(value))
                totals[key] += value
            suite.set("errors", "0")
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("errors", "0")
    root.set("time", f"{sum(r.elapsed for r in reports):.3f}")
    tree = ET.ElementTree(root)
    ET.indent(tree)
    import io

    buf = io.StringIO()
    tree.write(buf, encoding="unicode", xml_declaration=True)
    return buf.getvalue() + "\n"


# --------------------------------------------------------------------------------------------- sarif


def _sarif_uri(path: str) -> str:
    """The file's URI: its bytes percent-encoded (an undecodable byte is ``%FF``, any control character too)."""
    if os.path.isabs(path):
        return Path(path).as_uri()
    return urllib.parse.quote_from_bytes(os.fsencode(path), safe="/")


def _sarif_level(severity: str) -> str:
    return "error" if severity == ERROR else "warning" if severity == WARNING else "note"


def render_sarif(reports: Sequence[Report], rules: Iterable[RuleInfo] | None = None) -> str:
    """SARIF 2.1.0: the rule catalogue as ``tool.driver.rules``; one result per finding."""
    from actfmt._version import __version__

    if rules is None:
        from actfmt.checks import RULES

        rules = RULES.values()
    rule_list = sorted(rules, key=lambda r: r.code)
    index = {r.code: i for i, r in enumerate(rule_list)}
    driver_rules = [
        {
            "id": r.code,
            "name": r.name,
            "shortDescription": {"text": r.title()},
            "fullDescription": {"text": r.documentation()},
            "help": {"text": r.documentation()},
            "defaultConfiguration": {"level": _sarif_level(r.severity)},
            "properties": {"deep": bool(r.deep)},
        }
        for r in rule_list
    ]
    results = []
    for report, f in _all_findings(reports):
        result: dict[str, Any] = {
            "ruleId": f.code,
            "level": _sarif_level(f.severity),
            "message": {"text": f.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": _sarif_uri(display_path(report.root, f.location))}
                    }
                }
            ],
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        if f.expected is not None or f.actual is not None:
            result["properties"] = {"expected": f.expected, "actual": f.actual}
        results.append(result)
    notifications = [
        {
            "level": "note",
            "message": {"text": f"skipped {', '.join(s.codes)}: {s.reason}"},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": _sarif_uri(display_path(r.root, s.location))}
                    }
                }
            ],
        }
        for r in reports
        for s in r.skipped
    ]
    sarif = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": "actfmt", "version": __version__, "rules": driver_rules}},
                "invocations": [{"executionSuccessful": True, "toolExecutionNotifications": notifications}],
                "results": results,
            }
        ],
    }
    return _dumps(sarif)


# --------------------------------------------------------------------------------------------- dispatch


def render(
    fmt: str,
    reports: Sequence[Report],
    out: IO[str],
    *,
    strict: bool = False,
    quiet: bool = False,
    color: bool | None = None,
) -> None:
    """Write ``reports`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "text":
        from rich.console import Console

        console = Console(file=out, highlight=False, no_color=None if color is None else not color)
        render_text(reports, console, strict=strict, quiet=quiet)
    elif fmt == "json":
        out.write(render_json(reports))
    elif fmt == "github":
        out.write(render_github(reports))
    elif fmt == "junit":
        out.write(render_junit(reports, strict=strict))
    elif fmt == "sarif":
        out.write(render_sarif(reports))
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------- statistics

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

    encoding = (getattr(console.file, "encoding", None) or "utf-8").lower().replace("-", "")
    fancy = encoding.startswith("utf")
    one_root = len(result.roots) == 1
    width = console.width if console.is_terminal else None

    def heading(title: str, about: str) -> None:
        """``title  (about)`` on one line, or on a terminal too narrow for it: the title broken after a ``/``,
        then ``(about)`` under it."""
        title, about = _clean(title), f"({escape(about)})"
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
        out.write(_dumps(result.to_dict()))
    elif fmt == "csv":
        out.write(_safe_csv(result.to_csv()))
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(STATS_FORMATS)}")


def _safe_csv(text: str) -> str:
    """CSV whose every field is :func:`actfmt._escape.escape`-d: a name cannot break a row, hold a control
    character or start a line (the first column is always ``kind``)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(text, newline="")):
        writer.writerow([escape(cell) for cell in row])
    return out.getvalue()
