"""The ``actfmt`` CLI: validate (every output format and exit code), rules, rule, error translation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

import actfmt.checks
from actfmt.checks import RULES, validate
from actfmt.cli import cli
from actfmt.reporters import display_path

from ._trees import make_split, make_tree

SPLITS = ["org_Tiny-Model/SP_test/EM", "org_Tiny-Model/SP_test/Neutral"]


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """valid: a clean EM + Neutral pair; broken: a missing middle shard; stray: a warning only; empty: no split."""
    base = tmp_path_factory.mktemp("trees")
    kw = {"total": 50, "hidden": 8, "layers": 2, "shard_size": 16, "batch_size": 8}
    make_tree(base / "valid", **kw)
    make_tree(base / "broken", **kw)
    (base / "broken" / SPLITS[0] / "layer_01" / "shard_001.pt").unlink()
    make_tree(base / "stray", **kw)
    (base / "stray" / SPLITS[1] / "notes.txt").write_text("hello")
    (base / "empty").mkdir()
    return {name: base / name for name in ("valid", "broken", "stray", "empty")}


def _codes(report_dict: dict) -> list[str]:  # type: ignore[type-arg]
    return [i["code"] for i in report_dict["issues"]]


# ------------------------------------------------------------------------------------- text + exit codes


def test_valid_tree_text_ok_exit_0(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["valid"]))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1] == "✓ OK — no problems found"
    assert lines[-2].startswith("Checked 2 splits · 4 layers · 16 shards in ")
    assert lines[-2].endswith(" — 0 errors, 0 warnings")
    assert "\x1b[" not in result.stdout  # no colour when not a terminal
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_broken_tree_text_exit_1_names_finding(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["broken"]))
    assert result.exit_code == 1, result.output
    out = result.stdout
    header = display_path(str(trees["broken"]), SPLITS[0])
    assert header in out.splitlines()
    assert "ACT302" in out and "missing-shard" in out and "shard_001.pt" in out
    assert "OK" not in out
    assert " — 1 error" in out.splitlines()[-1]


def test_exit_zero_keeps_report(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["broken"]), "--exit-zero")
    assert result.exit_code == 0
    assert "ACT302" in result.stdout


def test_warning_passes_unless_strict(trees: dict[str, Path]) -> None:
    plain = run("validate", str(trees["stray"]))
    assert plain.exit_code == 0 and "ACT105" in plain.stdout and "✓ OK — no errors" in plain.stdout
    assert run("validate", str(trees["stray"]), "--strict").exit_code == 1
    assert run("validate", str(trees["stray"]), "--strict", "--exit-zero").exit_code == 0


def test_quiet_prints_findings_only(trees: dict[str, Path]) -> None:
    broken = run("validate", "-q", str(trees["broken"]))
    assert broken.exit_code == 1 and "ACT302" in broken.stdout and "Checked" not in broken.stdout
    clean = run("validate", "--quiet", str(trees["valid"]))
    assert clean.exit_code == 0 and clean.stdout == ""


def test_ignore_and_select_accept_codes_prefixes_names_commas_and_repeats(trees: dict[str, Path]) -> None:
    path = str(trees["stray"])
    ignored = run("validate", path, "--strict", "--ignore", "stray-file", "--output-format", "json")
    assert ignored.exit_code == 0
    data = json.loads(ignored.stdout)
    assert _codes(data) == [] and data["summary"]["ignored"] == 1
    assert run("validate", path, "--strict", "--ignore", "ACT1").exit_code == 0
    assert run("validate", path, "--strict", "--select", "ACT3,ACT4", "--select", "ACT2").exit_code == 0
    selected = run("validate", path, "--strict", "--select", "ACT3", "--select", "ACT105")
    assert selected.exit_code == 1 and "ACT105" in selected.stdout


def test_unknown_rule_in_select_is_usage_error(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["valid"]), "--select", "ACT302,ACT999")
    assert result.exit_code == 2
    assert "ACT999" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_missing_path_and_no_split_exit_2(trees: dict[str, Path], tmp_path: Path) -> None:
    missing = run("validate", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr and missing.stdout == ""
    empty = run("validate", str(trees["empty"]))
    assert empty.exit_code == 2
    assert empty.stderr.startswith("actfmt: error: ") and str(trees["empty"]) in empty.stderr
    assert "Traceback" not in empty.output and empty.stdout == ""


def test_bad_option_values_exit_2(trees: dict[str, Path]) -> None:
    assert run("validate", str(trees["valid"]), "--output-format", "xml").exit_code == 2
    assert run("validate", str(trees["valid"]), "--jobs", "-1").exit_code == 2
    assert run("validate").exit_code == 2


def test_internal_error_is_clean_exit_2(trees: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(actfmt.checks, "validate", boom)
    result = run("validate", str(trees["valid"]))
    assert result.exit_code == 2
    assert result.stderr.startswith("actfmt: internal error: RuntimeError: kaboom")
    assert "ACTFMT_DEBUG=1" in result.stderr and "Traceback" not in result.stderr
    debug = run("validate", str(trees["valid"]), env={"ACTFMT_DEBUG": "1"})
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "kaboom" in debug.stderr


def test_jobs_give_the_same_report(trees: dict[str, Path]) -> None:
    one = json.loads(run("validate", str(trees["broken"]), "--output-format", "json").stdout)
    two = json.loads(run("validate", str(trees["broken"]), "--output-format", "json", "-j", "2").stdout)
    assert one == two


def test_progress_bar_wiring(trees: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--deep draws at once on a terminal and the engine's events reach the bar; --quiet turns it off."""
    import io

    from rich.console import Console

    import actfmt.cli
    from actfmt.reporters import ProgressRenderer

    made: list[tuple[dict[str, bool], ProgressRenderer, io.StringIO]] = []

    def factory(**kwargs: bool) -> ProgressRenderer:
        buf = io.StringIO()
        renderer = ProgressRenderer(
            enabled=not (kwargs["quiet"] or kwargs["no_progress"]),
            delay=0.0 if kwargs["immediate"] else 3600,
            console=Console(file=buf, force_terminal=True, width=120),
        )
        made.append((kwargs, renderer, buf))
        return renderer

    monkeypatch.setattr(actfmt.cli, "progress_renderer", factory)
    assert run("validate", str(trees["valid"]), "--deep").exit_code == 0
    kwargs, renderer, buf = made[-1]
    assert kwargs == {"quiet": False, "no_progress": False, "immediate": True}
    snap = renderer.snapshot()["validate"]
    assert snap["total"] and snap["completed"] == snap["total"] and snap["nbytes"] > 0
    assert buf.getvalue() != ""
    assert run("validate", str(trees["valid"]), "--deep", "-q").exit_code == 0
    assert made[-1][0]["quiet"] and made[-1][1].snapshot() == {} and made[-1][2].getvalue() == ""
    assert run("validate", str(trees["valid"]), "--no-progress").exit_code == 0
    assert made[-1][0] == {"quiet": False, "no_progress": True, "immediate": False}


# ------------------------------------------------------------------------------------- json


def test_json_equals_api_report(trees: dict[str, Path]) -> None:
    for name in ("valid", "broken", "stray"):
        path = str(trees[name])
        result = run("validate", path, "--output-format", "json")
        assert result.exit_code == (1 if name == "broken" else 0)
        assert json.loads(result.stdout) == validate(path).to_dict()


def test_json_deep_equals_api_deep(trees: dict[str, Path]) -> None:
    path = str(trees["valid"])
    result = run("validate", path, "--deep", "--output-format", "json")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout) == validate(path, deep=True).to_dict()


def test_json_several_paths_is_a_list_and_worst_exit(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["valid"]), str(trees["broken"]), "--output-format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 2
    assert _codes(data[0]) == [] and "ACT302" in _codes(data[1])
    assert data[1] == validate(str(trees["broken"])).to_dict()


def test_output_file(trees: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    result = run("validate", str(trees["broken"]), "--output-format", "json", "-o", str(target))
    assert result.exit_code == 1 and result.stdout == ""
    assert "ACT302" in _codes(json.loads(target.read_text()))
    bad = run("validate", str(trees["valid"]), "-o", str(tmp_path / "no" / "such" / "dir.txt"))
    assert bad.exit_code == 2 and bad.stderr.startswith("actfmt: error: cannot write the output file")


# ------------------------------------------------------------------------------------- github / junit / sarif


def test_github_annotations_point_at_files(trees: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trees["broken"].parent)
    result = run("validate", "broken", "--output-format", "github")
    assert result.exit_code == 1
    report = validate("broken")
    lines = result.stdout.splitlines()
    assert len(lines) == len(report.findings) >= 1
    for line, issue in zip(lines, report.to_dict()["issues"], strict=True):
        level = "error" if issue["severity"] == "error" else "warning"
        assert line.startswith(
            f"::{level} file=broken/{issue['location']},title={issue['code']} {issue['name']}::"
        )
    assert any("title=ACT302 missing-shard::" in line for line in lines)


def test_github_absolute_path_is_made_relative(
    trees: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(trees["broken"].parent)
    result = run("validate", str(trees["broken"]), "--output-format", "github")
    assert result.stdout.startswith("::error file=broken/")


def test_junit_parses_and_counts_match(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["broken"]), "--output-format", "junit")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout)
    report = validate(str(trees["broken"]))
    assert root.tag == "testsuites" and int(root.get("failures", "-1")) == report.errors
    names = {s.get("name") for s in root.findall("testsuite")}
    assert names == {display_path(str(trees["broken"]), s) for s in SPLITS}
    failing = root.findall("testsuite/testcase/failure")
    assert {f.get("type") for f in failing} == {i.code for i in report.findings if i.severity == "error"}
    clean = ET.fromstring(run("validate", str(trees["valid"]), "--output-format", "junit").stdout)
    assert clean.get("failures") == "0" and int(clean.get("tests", "0")) == 2


def test_sarif_parses_with_rule_catalogue(trees: dict[str, Path]) -> None:
    result = run("validate", str(trees["broken"]), "--output-format", "sarif")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    run_ = data["runs"][0]
    rules = run_["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted(RULES)
    for r in rules:
        assert r["shortDescription"]["text"] and r["fullDescription"]["text"]
        assert r["defaultConfiguration"]["level"] == RULES[r["id"]].severity
    results = run_["results"]
    assert any(res["ruleId"] == "ACT302" and res["level"] == "error" for res in results)
    for res in results:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        uri = res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri.startswith(("file://", display_path(str(trees["broken"]))))


# ------------------------------------------------------------------------------------- rules / rule


def test_rules_text_lists_every_rule() -> None:
    result = run("rules")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == len(RULES)
    for line, code in zip(lines, sorted(RULES), strict=True):
        rule = RULES[code]
        assert line.split()[:3] == [code, rule.name, rule.severity]
        assert line.endswith(rule.title())
        assert (line.split()[3] == "--deep") == bool(rule.deep)


def test_rules_json() -> None:
    doc = json.loads(run("rules", "--output-format", "json").stdout)
    assert doc["schema_version"] == 1 and doc["tool"]["name"] == "actfmt"
    data = doc["rules"]
    assert [d["code"] for d in data] == sorted(RULES)
    for d in data:
        assert d["name"] == RULES[d["code"]].name and d["documentation"] == RULES[d["code"]].documentation()


@pytest.mark.parametrize("ident", ["ACT302", "missing-shard"])
def test_rule_prints_documentation(ident: str) -> None:
    result = run("rule", ident)
    rule = RULES["ACT302"]
    assert result.exit_code == 0
    assert result.stdout.startswith("ACT302 missing-shard\n")
    assert rule.documentation() in result.stdout


def test_rule_unknown_exit_2() -> None:
    result = run("rule", "ACT999")
    assert result.exit_code == 2 and "ACT999" in result.stderr and "actfmt rules" in result.stderr


# ------------------------------------------------------------------------------------- subprocess


def _py(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ACTFMT_DEBUG"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


@pytest.mark.slow
def test_subprocess_validate_json_and_exit_codes(trees: dict[str, Path]) -> None:
    ok = _py("-m", "actfmt", "validate", str(trees["valid"]), "--output-format", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == validate(str(trees["valid"])).to_dict()
    assert ok.stderr == ""
    bad = _py("-m", "actfmt", "validate", str(trees["broken"]), "--output-format", "github")
    assert bad.returncode == 1 and bad.stdout.startswith("::error ") and bad.stderr == ""
    none = _py("-m", "actfmt", "validate", str(trees["empty"]))
    assert (
        none.returncode == 2 and none.stderr.startswith("actfmt: error: ") and "Traceback" not in none.stderr
    )


_HEAVY = ("torch", "zarr", "h5py", "safetensors")
_PROBE = """
import sys
sys.argv = {argv!r}
try:
    {stmt}
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "stmt"),
    [
        (["x"], "import actfmt"),
        (["actfmt", "--help"], "from actfmt.cli import main; main()"),
        (["actfmt", "validate", "--help"], "from actfmt.cli import main; main()"),
    ],
)
def test_light_imports(argv: list[str], stmt: str) -> None:
    result = _py("-c", _PROBE.format(argv=argv, stmt=stmt, heavy=_HEAVY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "HEAVY=", result.stdout


def test_make_split_helper_matches_layout(tmp_path: Path) -> None:
    """Guard for the fixtures above: one split at PATH is reported under '.' or ''."""
    make_split(tmp_path / "EM", total=9, hidden=4, layers=1, shard_size=4, batch_size=4)
    report = validate(str(tmp_path / "EM"))
    assert report.errors == 0 and len(report.splits) == 1


class _Payload:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_subprocess_malicious_shard_never_runs(tmp_path: Path) -> None:
    import torch

    split = tmp_path / "m" / "ds" / "EM"
    make_split(split, total=8, hidden=4, layers=1, shard_size=4, batch_size=4)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, split / "layer_00" / "shard_001.pt")
    for fmt in ("json", "text"):
        result = _py("-m", "actfmt", "validate", str(tmp_path), "--deep", "--output-format", fmt)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "ACT003" in result.stdout
    assert not marker.exists()


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-minilm-bf16"


@pytest.mark.skipif(not REAL.exists(), reason="the shared real-data sample is not in this checkout's parent")
def test_real_data_is_clean_in_every_format() -> None:
    text = run("validate", str(REAL))
    assert text.exit_code == 0 and text.stdout.splitlines()[-1] == "✓ OK — no problems found"
    data = json.loads(run("validate", str(REAL), "--output-format", "json").stdout)
    assert (
        data["summary"]["errors"] == 0 and data["summary"]["splits"] == 2 and data["summary"]["shards"] == 96
    )
    junit = ET.fromstring(run("validate", str(REAL), "--output-format", "junit").stdout)
    assert junit.get("failures") == "0" and junit.get("tests") == "2"
    assert run("validate", str(REAL), "--output-format", "github").stdout == ""
