"""Render validation :class:`~actfmt.report.Report` objects: ``text``, ``json``, ``github``, ``junit``, ``sarif``.

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

import io
import os
import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from actfmt._escape import dumps, escape, escape_line, escape_lines, gh_data, gh_property
from actfmt._version import __version__
from actfmt.report import ERROR, WARNING, Finding, Report, SkippedChecks
from actfmt.reporters.common import clean, display_path, fit_lines, is_fancy, json_text, norm_location, plural

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = [
    "FORMATS",
    "MAX_PER_RULE",
    "RuleInfo",
    "group_by_split",
    "render",
    "render_github",
    "render_json",
    "render_junit",
    "render_sarif",
    "render_text",
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


# --------------------------------------------------------------------------------------------- findings


def _split_of(location: str, splits: Sequence[str]) -> str | None:
    """The deepest split (as listed in the report) that contains ``location``, else ``None``."""
    loc = norm_location(location)
    best: str | None = None
    best_len = -1
    for split in splits:
        norm = norm_location(split)
        if (norm == "" or loc == norm or loc.startswith(norm + "/")) and len(norm) > best_len:
            best, best_len = split, len(norm)
    return best


def _within(location: str, split: str | None) -> str:
    """``location`` relative to ``split`` (``""`` for the split itself)."""
    loc = norm_location(location)
    norm = norm_location(split or "")
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


def _xml_clean(text: str, *, lines: bool = False) -> str:
    """Text that XML 1.0 can hold, names escaped like in the text output: on one line, or with ``lines``, each
    line of ``text`` (its line breaks kept)."""
    return _BAD_XML_CHARS.sub("\ufffd", escape_lines(text) if lines else escape_line(text))


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
    counts = [plural(t["errors"], "error"), plural(t["warnings"], "warning")]
    if t["ignored"]:
        counts.append(f"{t['ignored']} ignored")
    units = [
        plural(t[key], word)
        for key, word in (("shards", "shard"), ("chunks", "chunk"), ("layer_files", "layer file"))
        if t[key]
    ] or [plural(0, "shard")]
    checked = f" {dot} ".join([plural(t["splits"], "split"), plural(t["layers"], "layer"), *units])
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


def render_text(
    reports: Sequence[Report], console: Console, *, strict: bool = False, quiet: bool = False
) -> None:
    """Rich text: findings grouped by split, skipped checks, one summary line, and a verdict.

    ``quiet`` keeps the findings and skipped checks only.  On a terminal every line fits its width (paths are
    broken between components, messages between words, under their indentation); elsewhere (a pipe, a file, a CI
    log) each item stays on one line.
    """
    from rich.text import Text

    fancy = is_fancy(console.file)
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
            say(clean(header), "bold underline", "  ")
            shown, rest = _capped(findings)
            for f in shown:
                style = "red" if f.severity == ERROR else "yellow"
                where = clean(_within(f.location, split))
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
                say(clean(f.message), "", " " * 10, " " * 10)
            for code, n in rest.items():
                say(
                    f"... and {n} more {code} finding{'s' if n > 1 else ''} in this split "
                    f"(every finding: --output-format json)",
                    "dim",
                    "    ",
                    "  ",
                )
            for s in skips:
                where = clean(_within(s.location, split))
                line = Text.assemble("  ", ("skipped", "magenta"), " ", (", ".join(s.codes), "bold"))
                if where and (width is None or line.cell_len + 2 + len(where) <= width):
                    line.append(f"  {where}")
                    where = ""
                console.print(line, soft_wrap=True)
                if where:
                    say(where, "", " " * 12, " " * 10)
                say(clean(s.reason), "", " " * 10, " " * 10)
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
        verdict = f"{tick} OK {dash} no errors ({plural(t['warnings'], 'warning')}; --strict makes them fail)"
    else:
        verdict = f"{tick} OK {dash} no problems found"
    say(verdict, "bold green", "  ")


# --------------------------------------------------------------------------------------------- json


def render_json(reports: Sequence[Report]) -> str:
    """One PATH: exactly ``report.to_dict()``; several: a JSON array of them, in order (an undecodable byte of a
    name is written ``\\xff``, as in every output: :func:`actfmt._escape.dumps`)."""
    if len(reports) == 1:
        return json_text(reports[0].to_dict())
    return json_text([r.to_dict() for r in reports])


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


def render_sarif(reports: Sequence[Report], rules: Iterable[RuleInfo]) -> str:
    """SARIF 2.1.0: the rule catalogue ``rules`` (every rule: ``actfmt.checks.RULES.values()``) as
    ``tool.driver.rules``; one result per finding."""
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
    return json_text(sarif)


# --------------------------------------------------------------------------------------------- dispatch


def render(
    fmt: str,
    reports: Sequence[Report],
    out: IO[str],
    *,
    strict: bool = False,
    quiet: bool = False,
    color: bool | None = None,
    rules: Iterable[RuleInfo] | None = None,
) -> None:
    """Write ``reports`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`); ``sarif`` lists the catalogue
    ``rules`` (the caller's: this package never imports the rules, which import every format)."""
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
        if rules is None:
            raise ValueError("the sarif output needs the rule catalogue (rules=actfmt.checks.RULES.values())")
        out.write(render_sarif(reports, rules))
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
