"""Reporters on hand-built Reports: every output format parsed back and checked."""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from actfmt import __version__
from actfmt.progress import ProgressEvent
from actfmt.report import ERROR, WARNING, Finding, Report, SkippedChecks
from actfmt.reporters import (
    ProgressRenderer,
    display_path,
    format_rate,
    format_size,
    group_by_split,
    render,
    render_github,
    render_json,
    render_junit,
    render_sarif,
    render_text,
    summary_line,
)


class _FakeRule:
    """Duck-typed rule (not a Rule subclass, so it cannot leak into the real registry)."""

    def __init__(self, code: str, name: str, severity: str, deep: bool, doc: str) -> None:
        self.code, self.name, self.severity, self.deep, self._doc = code, name, severity, deep, doc

    def title(self) -> str:
        return self._doc.splitlines()[0]

    def documentation(self) -> str:
        return self._doc


FAKE_RULES = [
    _FakeRule("ACT302", "missing-shard", ERROR, False, "A gap in the shard numbering.\n\nMore text."),
    _FakeRule("ACT105", "stray-file", WARNING, False, "An unexpected file in a split.\n\nDetails."),
    _FakeRule("ACT406", "non-finite", ERROR, True, "NaN or Inf values.\n\nDeep."),
]


def _missing(loc: str = "model/ds/EM/layer_03/shard_013.pt") -> Finding:
    return Finding(
        "ACT302",
        "missing-shard",
        ERROR,
        loc,
        "layer_03: expected 14 shards = ceil(7049 / 512), found 13; missing shard_013.pt",
        14,
        13,
    )


def _stray(loc: str = "model/ds/Neutral/notes.txt") -> Finding:
    return Finding("ACT105", "stray-file", WARNING, loc, "unexpected file notes.txt, a, b: c", None, None)


def _report(root: str = "data", findings: list[Finding] | None = None, **kw: object) -> Report:
    defaults: dict[str, object] = {
        "splits": ["model/ds/EM", "model/ds/Neutral"],
        "layers": 12,
        "shards": 96,
        "elapsed": 0.42,
    }
    defaults.update(kw)
    return Report(root=root, findings=list(findings or []), **defaults)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- paths & grouping


def test_display_path_joins_root_and_location_with_slashes() -> None:
    assert display_path("data", "model/ds/EM/metadata.json") == "data/model/ds/EM/metadata.json"
    assert display_path("data/", ".") == "data"
    assert display_path("./data", "") == "data"


def test_display_path_absolute_under_cwd_becomes_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert display_path(str(tmp_path / "data"), "EM/layer_00") == "data/EM/layer_00"
    outside = tmp_path.parent / "elsewhere"
    assert display_path(str(outside), "x.pt") == str(outside / "x.pt").replace(os.sep, "/")


def test_group_by_split_deepest_split_wins_and_clean_splits_listed() -> None:
    outside = Finding("ACT502", "split-mismatch", WARNING, "model/ds", "EM and Neutral disagree")
    report = _report(
        findings=[_stray(), _missing(), outside], splits=["model/ds/EM", "model/ds/Neutral", "other"]
    )
    groups = dict(group_by_split(report))
    assert [f.code for f in groups["model/ds/EM"]] == ["ACT302"]
    assert [f.code for f in groups["model/ds/Neutral"]] == ["ACT105"]
    assert groups["other"] == []
    assert [f.code for f in groups[None]] == ["ACT502"]


def test_group_by_split_when_path_is_the_split() -> None:
    report = _report(findings=[_missing("layer_03/shard_013.pt")], splits=["."])
    assert [(k, [f.location for f in v]) for k, v in group_by_split(report)] == [
        (".", ["layer_03/shard_013.pt"])
    ]


# ------------------------------------------------------------------------------------- text


def _text(reports: list[Report], **kw: bool) -> str:
    buf = io.StringIO()
    render_text(reports, Console(file=buf, width=200, no_color=True), **kw)
    return buf.getvalue()


def test_summary_line_counts_and_plurals() -> None:
    report = _report(
        findings=[_missing(), _stray()], ignored=2, splits=["a"], layers=1, shards=1, elapsed=1.25
    )
    assert (
        summary_line([report])
        == "Checked 1 split · 1 layer · 1 shard in 1.2 s — 1 error, 1 warning, 2 ignored"
    )


def test_summary_line_names_the_units_of_what_was_checked() -> None:
    zarr = _report(splits=["a.zarr"], layers=3, shards=0, chunks=12)
    assert summary_line([zarr]) == "Checked 1 split · 3 layers · 12 chunks in 0.42 s — 0 errors, 0 warnings"
    mixed = [_report(), _report(shards=0, chunks=1, layer_files=6)]
    line = summary_line(mixed)
    assert line.startswith("Checked 4 splits · 24 layers · 96 shards · 1 chunk · 6 layer files in 0.84 s")
    nothing = _report(splits=["x"], layers=0, shards=0)
    assert summary_line([nothing]).startswith("Checked 1 split · 0 layers · 0 shards in ")


def test_json_summary_adds_chunks_and_layer_files_and_keeps_shards() -> None:
    summary = _report(shards=0, chunks=5, layer_files=2).to_dict()["summary"]
    assert (summary["shards"], summary["chunks"], summary["layer_files"]) == (0, 5, 2)
    assert list(summary)[:6] == ["errors", "warnings", "ignored", "splits", "layers", "shards"]


def test_text_groups_findings_by_split_with_code_name_location_message() -> None:
    out = _text([_report(findings=[_missing(), _stray()])])
    lines = out.splitlines()
    em = lines.index("data/model/ds/EM")
    assert (
        "ACT302" in lines[em + 1]
        and "missing-shard" in lines[em + 1]
        and "layer_03/shard_013.pt" in lines[em + 1]
    )
    assert lines[em + 1].split()[0] == "error"
    assert "expected 14 shards = ceil(7049 / 512)" in lines[em + 2]
    neutral = lines.index("data/model/ds/Neutral")
    assert neutral > em and "ACT105" in lines[neutral + 1] and lines[neutral + 1].split()[0] == "warning"
    assert "Checked 2 splits · 12 layers · 96 shards in 0.42 s — 1 error, 1 warning" in out
    assert "OK" not in out


def test_text_clean_run_says_ok() -> None:
    out = _text([_report()])
    assert out.splitlines()[-1] == "✓ OK — no problems found"
    assert "0 errors, 0 warnings" in out


def test_text_warnings_only_ok_unless_strict() -> None:
    report = _report(findings=[_stray()])
    assert "✓ OK — no errors (1 warning" in _text([report])
    strict = _text([report], strict=True)
    assert "OK" not in strict and "--strict" in strict


def test_text_quiet_prints_findings_only() -> None:
    quiet = _text([_report(findings=[_missing()])], quiet=True)
    assert "ACT302" in quiet and "Checked" not in quiet
    assert _text([_report()], quiet=True) == ""


def test_text_mentions_skipped_checks_and_ignored() -> None:
    report = _report(
        findings=[Finding("ACT201", "metadata-unparseable", ERROR, "model/ds/EM/metadata.json", "not JSON")],
        skipped=[SkippedChecks("model/ds/EM", ("ACT301", "ACT302"), "metadata.json cannot be parsed")],
        ignored=3,
    )
    out = _text([report])
    lines = out.splitlines()
    em = lines.index("data/model/ds/EM")
    assert lines[em + 3].split() == ["skipped", "ACT301,", "ACT302"]
    assert lines[em + 4].strip() == "metadata.json cannot be parsed"
    assert "3 ignored" in out


def test_text_escapes_markup_and_undecodable_names() -> None:
    f = Finding(
        "ACT104", "bad-name", ERROR, "model/ds/EM/layer_[bold]x\udcff", "name [red]layer_3[/red] is off"
    )
    out = _text([_report(findings=[f])])
    assert "layer_[bold]x\\xff" in out and "name [red]layer_3[/red] is off" in out


def test_render_text_no_color_when_not_a_tty() -> None:
    buf = io.StringIO()
    render("text", [_report(findings=[_missing()])], buf)
    assert "\x1b[" not in buf.getvalue() and "ACT302" in buf.getvalue()


def test_render_text_ascii_stream_falls_back() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    render("text", [_report()], stream)
    stream.flush()
    text = raw.getvalue().decode("ascii")
    assert "OK" in text and "Checked 2 splits - 12 layers" in text


# ------------------------------------------------------------------------------------- json


def test_json_single_report_is_to_dict() -> None:
    report = _report(findings=[_stray(), _missing()])
    data = json.loads(render_json([report]))
    assert data == report.to_dict()
    assert [i["code"] for i in data["issues"]] == ["ACT302", "ACT105"]  # worst first
    assert data["summary"]["errors"] == 1 and data["summary"]["warnings"] == 1


def test_json_several_reports_is_a_list_in_order() -> None:
    a, b = _report("a", findings=[_missing()]), _report("b")
    assert json.loads(render_json([a, b])) == [a.to_dict(), b.to_dict()]


def test_json_undecodable_name_stays_valid() -> None:
    # The undecodable byte is written as in the text output (\xff), so the JSON is valid UTF-8.
    report = _report(findings=[_missing("model/ds/EM/\udcffbad")])
    text = render_json([report])
    text.encode("utf-8")
    assert json.loads(text)["issues"][0]["location"] == "model/ds/EM/\\xffbad"


# ------------------------------------------------------------------------------------- github


def test_github_lines_worst_first_with_paths_and_escaping() -> None:
    report = _report(findings=[_stray(), _missing()])
    lines = render_github([report]).splitlines()
    assert lines == [
        "::error file=data/model/ds/EM/layer_03/shard_013.pt,title=ACT302 missing-shard::"
        "layer_03: expected 14 shards = ceil(7049 / 512), found 13; missing shard_013.pt",
        "::warning file=data/model/ds/Neutral/notes.txt,title=ACT105 stray-file::unexpected file notes.txt, a, b: c",
    ]


def test_github_escapes_properties_and_newlines() -> None:
    f = Finding("ACT201", "metadata-unparseable", ERROR, "a,b:c/metadata.json", "line 1\nline 2 100%")
    (line,) = render_github([_report(findings=[f])]).splitlines()
    assert (
        line
        == "::error file=data/a%2Cb%3Ac/metadata.json,title=ACT201 metadata-unparseable::line 1%0Aline 2 100%25"
    )


def test_github_orders_across_reports_and_notes_skips() -> None:
    a = _report("a", findings=[_stray()])
    b = _report(
        "b",
        findings=[_missing()],
        skipped=[SkippedChecks("model/ds/EM", ("ACT3",), "metadata.json unparseable")],
    )
    lines = render_github([a, b]).splitlines()
    assert [line.split(" ")[0] for line in lines] == ["::error", "::warning", "::notice"]
    assert lines[0].startswith("::error file=b/model/ds/EM/")
    assert lines[2].startswith("::notice file=b/model/ds/EM,")


def test_github_clean_run_prints_nothing() -> None:
    assert render_github([_report()]) == ""


# ------------------------------------------------------------------------------------- junit


def _suites(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    return root


def test_junit_one_suite_per_split_failures_for_errors() -> None:
    root = _suites(render_junit([_report(findings=[_missing(), _stray()])]))
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"data/model/ds/EM", "data/model/ds/Neutral"}
    (case,) = suites["data/model/ds/EM"].findall("testcase")
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "ACT302"
    assert failure.get("message", "").startswith("layer_03: expected 14 shards")
    assert "expected: 14" in (failure.text or "") and "actual: 13" in (failure.text or "")
    assert case.get("file") == "data/model/ds/EM/layer_03/shard_013.pt"
    (warn,) = suites["data/model/ds/Neutral"].findall("testcase")
    assert warn.find("failure") is None and "ACT105" in (warn.findtext("system-out") or "")
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    assert suites["data/model/ds/EM"].get("failures") == "1"


def test_junit_strict_makes_warnings_failures() -> None:
    root = _suites(render_junit([_report(findings=[_stray()])], strict=True))
    assert root.get("failures") == "1"
    assert root.find("testsuite[@name='data/model/ds/Neutral']/testcase/failure") is not None


def test_junit_clean_splits_are_passing_cases() -> None:
    root = _suites(render_junit([_report()]))
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["valid", "valid"]
    assert all(len(c) == 0 for c in cases)
    assert (root.get("tests"), root.get("failures")) == ("2", "0")


def test_junit_skipped_and_hostile_text_stay_well_formed() -> None:
    f = Finding("ACT104", "bad-name", ERROR, "model/ds/EM/<x>&\x01\udcff", 'bad "name" <&> \x00 here')
    report = _report(
        findings=[f], skipped=[SkippedChecks("model/ds/EM", ("ACT301",), "metadata.json <broken> & co")]
    )
    root = _suites(render_junit([report]))
    suite = root.find("testsuite[@name='data/model/ds/EM']")
    assert suite is not None and suite.get("skipped") == "1" and suite.get("tests") == "2"
    failure = suite.find("testcase/failure")
    assert failure is not None and failure.get("message") == 'bad "name" <&> \\x00 here'
    skipped = suite.find("testcase/skipped")
    assert skipped is not None and skipped.get("message") == "metadata.json <broken> & co"


# ------------------------------------------------------------------------------------- sarif


def test_sarif_rules_and_results() -> None:
    report = _report(findings=[_stray(), _missing()])
    data = json.loads(render_sarif([report], FAKE_RULES))
    assert data["version"] == "2.1.0" and "sarif-2.1.0" in data["$schema"]
    (run,) = data["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "actfmt" and driver["version"] == __version__
    assert [r["id"] for r in driver["rules"]] == ["ACT105", "ACT302", "ACT406"]
    r302 = driver["rules"][1]
    assert r302["name"] == "missing-shard"
    assert r302["shortDescription"]["text"] == "A gap in the shard numbering."
    assert r302["fullDescription"]["text"].endswith("More text.")
    assert r302["defaultConfiguration"]["level"] == "error"
    assert driver["rules"][0]["defaultConfiguration"]["level"] == "warning"
    first, second = run["results"]
    assert first["ruleId"] == "ACT302" and first["level"] == "error" and first["ruleIndex"] == 1
    assert first["message"]["text"].startswith("layer_03: expected 14")
    uri = first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "data/model/ds/EM/layer_03/shard_013.pt"
    assert second["ruleId"] == "ACT105" and second["level"] == "warning"


def test_sarif_uri_percent_encodes_and_absolute_paths_are_file_uris(tmp_path: Path) -> None:
    outside = tmp_path.parent / "x y"
    report = _report(str(outside), findings=[_missing("EM/a b.pt")], splits=["EM"])
    data = json.loads(render_sarif([report], FAKE_RULES))
    uri = data["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    if str(outside).startswith(os.getcwd()):
        assert uri.endswith("x%20y/EM/a%20b.pt")
    else:
        assert uri == (outside / "EM" / "a b.pt").as_uri()


# ------------------------------------------------------------------------------------- progress renderer


def _fake_tty() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=120), buf


def test_format_rate() -> None:
    assert format_rate(0, 1) == ""
    assert format_rate(10, 0) == ""
    assert format_rate(2_500_000, 1.0) == "2.5 MB/s"
    assert format_rate(3e9, 1.0) == "3.0 GB/s"


def test_progress_renderer_tracks_tasks_by_name_and_bytes() -> None:
    console, buf = _fake_tty()
    with ProgressRenderer(console=console, delay=0) as progress:
        progress(ProgressEvent("start", "convert", total=4, description="converting"))
        progress(ProgressEvent("start", "verify", total=2))
        progress(ProgressEvent("advance", "convert", advance=1, nbytes=1_000_000))
        progress(ProgressEvent("advance", "convert", advance=2, nbytes=3_000_000))
        progress(ProgressEvent("advance", "verify", advance=1))
        snap = progress.snapshot()
        assert progress.live
        assert snap["convert"]["completed"] == 3 and snap["convert"]["total"] == 4
        assert snap["convert"]["nbytes"] == 4_000_000 and snap["convert"]["rate"].endswith("/s")
        assert snap["verify"]["completed"] == 1 and snap["verify"]["rate"] == ""
        progress(ProgressEvent("end", "convert"))
        assert progress.snapshot()["convert"]["completed"] == 4
        progress(ProgressEvent("start", "convert", total=10))  # a new run of the same task restarts its bar
        assert progress.snapshot()["convert"]["completed"] == 0
    assert not progress.live
    assert "converting" in buf.getvalue()


def test_progress_renderer_shows_sizes_when_the_task_counts_bytes() -> None:
    console, buf = _fake_tty()
    assert (
        format_size(999) == "999 B"
        and format_size(1_500_000) == "1.5 MB"
        and format_size(2e12) == "2000.0 GB"
    )
    with ProgressRenderer(console=console, delay=0) as progress:
        progress(ProgressEvent("start", "validate", total=4_000_000, description="reading values"))
        progress(ProgressEvent("advance", "validate", advance=1_000_000, nbytes=1_000_000))
        progress(ProgressEvent("start", "convert", total=3))
        progress(ProgressEvent("advance", "convert", advance=1, nbytes=1_000_000))
        snap = progress.snapshot()
        assert snap["validate"]["in_bytes"] and not snap["convert"]["in_bytes"]
        progress._progress.refresh()  # type: ignore[union-attr]
    out = buf.getvalue()
    assert "1.0 MB/4.0 MB" in out and "1/3" in out


def test_progress_renderer_silent_when_disabled_or_not_a_tty() -> None:
    buf = io.StringIO()
    off = ProgressRenderer(console=Console(file=buf), delay=0)  # not a terminal
    off(ProgressEvent("start", "validate", total=3))
    disabled = ProgressRenderer(enabled=False)
    disabled(ProgressEvent("start", "validate", total=3))
    assert buf.getvalue() == "" and off.snapshot() == {} and not off.live and not disabled.live


def test_progress_renderer_waits_for_delay() -> None:
    console, buf = _fake_tty()
    with ProgressRenderer(console=console, delay=3600) as progress:
        progress(ProgressEvent("start", "validate", total=3))
        progress(ProgressEvent("advance", "validate", advance=3))
        assert not progress.live and progress.snapshot()["validate"]["completed"] == 3
    assert buf.getvalue() == ""
