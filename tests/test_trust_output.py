"""Issue 16, output: a crafted tree cannot write to the CI log or the terminal.

Real trees whose names (model, dataset, split and layer directories, shards, stray files, an undecodable byte,
``metadata.json`` values) carry newlines followed by GitHub workflow commands, terminal escape sequences, C1
controls and rich markup go through every command and output format, in-process (CliRunner) and as
``python -m actfmt``.  Every output line is checked: no line starts (after blanks) with ``::`` unless it is a
command the github reporter means to emit, and then its properties and data decode to the escaped names only;
no control character but the line break; JSON, SARIF and JUnit parse; a name looks the same in every output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import actfmt
from actfmt._escape import dumps, escape, escape_line, escape_lines, gh_data, gh_property, json_safe
from actfmt.cli import cli

from ._trees import make_split

#: Names an attacker would choose (no ``/``: they are single path components).
EVIL = [
    "a\n::error file=x::pwned",
    "b\n::add-mask::hunter2",
    "c\r\n::stop-commands::tok",
    "d\n  ::warning title=t::w",
    "e\x1b[2J\x1b]0;title\x07\x9b2J\x7f\tx",
    "f##[add-mask]y##vso[task.setvariable]z",
    "g[bold red]x[link=https:example.com]y",
    "h\u2028::error::ls\u202eevil",
]
#: The model and dataset directories, a split named to start a line with a command, a layer directory.
MODEL = "org_m\n::error file=README.md::model"
DATASET = "::notice::ds\x1b[31m"
LINE_SPLIT = "::error file=x,line=1::split"
UNDECODABLE = b"stray\xff\xfe"
KW: dict[str, Any] = {"total": 40, "hidden": 8, "layers": 2, "shard_size": 16, "batch_size": 8}
SRC = str(Path(actfmt.__file__).resolve().parent.parent)

_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _crafted_dataset(base: Path) -> Path:
    """MODEL/DATASET/{EM, LINE_SPLIT} with every kind of crafted name; returns the dataset directory."""
    ds = base / MODEL / DATASET
    make_split(ds / "EM", extra={"model_name": "org/" + EVIL[0], "note": EVIL[4]}, **KW)
    make_split(ds / LINE_SPLIT, seed=1, **KW)
    em = ds / "EM"
    for i, name in enumerate(EVIL):  # stray files, in both splits (the text output shows 10 a rule and split)
        (em / name if i < 5 else ds / LINE_SPLIT / name).write_text("x")
    (em / "layer_00" / (EVIL[1] + ".pt")).write_text("x")  # a stray shard
    (em / ("layer_07" + EVIL[0])).mkdir()  # a stray layer directory
    with open(os.path.join(os.fsencode(em), UNDECODABLE), "wb") as fh:
        fh.write(b"x")
    return ds


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _crafted_dataset(tmp_path_factory.mktemp("crafted") / "root")


# ------------------------------------------------------------------------------------------------ the checks


def github_command(line: str) -> tuple[str, dict[str, str], str] | None:
    """What a GitHub runner reads in ``line`` (its v2 parser: trim the start, ``::cmd k=v,k=v::data``), else
    ``None``."""
    message = line.lstrip()
    if not message.startswith("::"):
        return None
    end = message.find("::", 2)
    if end < 0:
        return None
    info, data = message[2:end], message[end + 2 :]
    name, _, props = info.partition(" ")

    def unescape(text: str, prop: bool) -> str:
        pairs = [("%0D", "\r"), ("%0A", "\n")] + ([("%3A", ":"), ("%2C", ",")] if prop else [])
        for token, char in [*pairs, ("%25", "%")]:
            text = text.replace(token, char)
        return text

    properties = {}
    for item in filter(None, props.split(",")):
        key, _, value = item.partition("=")
        properties[key] = unescape(value, True)
    return name, properties, unescape(data, False)


def assert_safe(text: str, *, genuine: int = 0) -> list[tuple[str, dict[str, str], str]]:
    """No control character but ``\\n`` (rich's colour codes aside), no ``##[``, and no line a CI runner reads as
    a command except ``genuine`` of them; returns those."""
    plain = _SGR.sub("", text)
    bad = _CONTROL.findall(plain)
    assert not bad, f"control characters {bad!r} in {plain!r}"
    assert not re.search(r"##(vso)?\[", plain, re.IGNORECASE), plain
    commands = [c for c in map(github_command, plain.split("\n")) if c is not None]
    assert len(commands) == genuine, commands
    return commands


def run_in_process(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``actfmt ARGS`` through CliRunner: exit code, stdout, stderr."""
    before = os.getcwd()
    os.chdir(cwd or before)
    try:
        res = CliRunner().invoke(cli, list(args), env={"NO_COLOR": "1", "COLUMNS": "80"})
    finally:
        os.chdir(before)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.stdout, res.stderr


def run_subprocess(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``python -m actfmt ARGS``, not on a terminal: exit code, stdout, stderr (decoded strictly)."""
    env = {**os.environ, "PYTHONPATH": SRC, "NO_COLOR": "1", "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "actfmt", *args],
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def cli_run(*args: str, cwd: Path | None = None) -> Iterator[tuple[int, str, str]]:
    """``args`` in-process, then as ``python -m actfmt``, in ``cwd`` when given."""
    yield run_in_process(*args, cwd=cwd)
    yield run_subprocess(*args, cwd=cwd)


def json_locations(dataset: Path) -> list[str]:
    res = CliRunner().invoke(cli, ["validate", str(dataset), "--output-format", "json"])
    return [issue["location"] for issue in json.loads(res.stdout)["issues"]]


# ------------------------------------------------------------------------------------------------ the rule


def test_escape_writes_every_unsafe_character_visibly() -> None:
    assert escape("a\n::error::x") == "a\\n::error::x"
    assert escape("\x1b[2J\t\r\x00\x7f\x9b\u2028\u202e") == "\\x1b[2J\\t\\r\\x00\\x7f\\x9b\\u2028\\u202e"
    assert escape(os.fsdecode(b"x\xff")) == "x\\xff"  # the undecodable byte, as `ls -b` writes it
    assert escape("##[add-mask]s ##VSO[x]") == "##\\x5badd-mask]s ##VSO\\x5bx]"
    assert escape("[bold]é ünïcode \\ kept") == "[bold]é ünïcode \\ kept"
    assert (
        escape_line("::error::x") == "\\x3a:error::x" and escape_line(" \u00a0 ::x::") == " \u00a0 \\x3a:x::"
    )
    assert escape_line("a::b") == "a::b"
    assert escape_lines("one\n::two\n  ::three") == "one\n\\x3a:two\n  \\x3a:three"
    for name in [*EVIL, MODEL, DATASET, LINE_SPLIT, os.fsdecode(UNDECODABLE)]:
        once = escape_line(name)
        assert escape_line(once) == once and not _CONTROL.search(once) and "\n" not in once


def test_json_keeps_names_and_stays_valid_utf8_without_raw_controls() -> None:
    name = os.fsdecode(b"EM\xff") + "\n::error::x\x1b[2J\x9b\u2028"
    text = dumps({"location": name, name: [name]})
    text.encode("utf-8")  # no lone surrogate
    assert not _CONTROL.search(text.replace("\n", ""))
    assert json.loads(text) == {"location": json_safe(name), json_safe(name): [json_safe(name)]}
    assert json_safe(name) == "EM\\xff\n::error::x\x1b[2J\x9b\u2028"
    assert escape(json_safe(name)) == escape(name)  # the JSON value, escaped, is what the text output shows


def test_github_encodings() -> None:
    assert gh_property("a:b,c%d\ne") == "a%3Ab%2Cc%25d\\ne"
    assert gh_data("line 1\nline 2\r100%\x1b") == "line 1%0Aline 2%0D100%25\\x1b"


# ------------------------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("where", ["absolute", "cwd"])
@pytest.mark.parametrize("fmt", ["text", "json", "github", "junit", "sarif"])
def test_validate_every_format_is_safe(crafted: Path, fmt: str, where: str) -> None:
    """PATH absolute (names mid-line), or ``.`` in the dataset (a split's path starts its header line)."""
    locations = json_locations(crafted)
    assert len(locations) >= len(EVIL) + 3
    path, cwd = (str(crafted), None) if where == "absolute" else (".", crafted)
    for code, out, err in cli_run("validate", path, "--output-format", fmt, cwd=cwd):
        assert code == 0, err  # warnings only
        assert_safe(err)
        if fmt == "github":
            commands = assert_safe(out, genuine=len(locations))
            assert {c[0] for c in commands} == {"warning"}
            files = sorted(c[1]["file"] for c in commands)
            # each property is the escaped name: it neither ends the command nor holds a control character
            assert all(set(c[1]) == {"file", "title"} for c in commands)
            assert files == sorted(escape(os.path.normpath(os.path.join(path, loc))) for loc in locations)
            assert any(f.endswith("EM/stray\\xff\\xfe") for f in files)
            continue
        assert_safe(out)
        if fmt == "text":
            assert "more ACT105" not in out
            for loc in locations:
                assert escape(loc.rpartition("EM/")[2].rpartition("split/")[2]) in out
            assert "stray\\xff\\xfe" in out and "[bold red]x[link=https:example.com]y" in out
            if where == "cwd":  # the split named to start a line
                assert "\\x3a:error file=x,line=1::split" in out.splitlines()
        elif fmt == "json":
            data = json.loads(out)
            assert [i["location"] for i in data["issues"]] == locations
            assert any(loc.endswith("EM/stray\\xff\\xfe") for loc in locations)
            assert any(EVIL[0] in loc for loc in locations)  # JSON keeps the real name
        elif fmt == "junit":
            root = ET.fromstring(out.split("\n", 1)[1])
            names = [case.get("name", "") for case in root.iter("testcase")]
            assert any(n.endswith("stray\\xff\\xfe") for n in names)
            for loc in locations:
                assert any(n.endswith(escape(loc.rpartition("/")[2])) for n in names), loc
        elif fmt == "sarif":
            data = json.loads(out)
            uris = [
                r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                for r in data["runs"][0]["results"]
            ]
            assert len(uris) == len(locations) and any(u.endswith("EM/stray%FF%FE") for u in uris)


def test_validate_text_in_colour_prints_only_rich_colour_codes(crafted: Path) -> None:
    from rich.console import Console

    from actfmt.checks import validate
    from actfmt.reporters import render_text

    out = StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", highlight=False, width=80)
    render_text([validate(str(crafted))], console)
    text = out.getvalue()
    assert "\x1b[" in text  # coloured
    assert_safe(text)  # and only SGR codes: no ESC[2J, no OSC, no C1


def test_github_output_cannot_be_stopped_or_masked(crafted: Path) -> None:
    """The runner parses each of our lines as exactly one command whose data is ours."""
    code, out, _ = run_in_process("validate", ".", "--output-format", "github", cwd=crafted)
    assert code == 0
    for name, props, data in assert_safe(out, genuine=len(json_locations(crafted))):
        assert name == "warning" and props["title"].startswith("ACT")
        assert "stop-commands" not in props["title"] and "add-mask" not in props["title"]
        assert not _CONTROL.search(data) and not _CONTROL.search(props["file"])


# ------------------------------------------------------------------------------------------------ the other commands


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_info_is_safe(crafted: Path, fmt: str) -> None:
    for code, out, err in cli_run("info", str(crafted), "--output-format", fmt):
        assert code == 0, err
        assert_safe(out + err)
        if fmt == "json":
            rows = json.loads(out)["splits"]
            assert {r["location"] for r in rows} == {"EM", LINE_SPLIT}
        else:
            # the split's row starts its line: neutralised
            assert any(line.startswith("\\x3a:error file=x,line=1") for line in out.splitlines()), out


@pytest.mark.parametrize("fmt", ["text", "json", "csv"])
def test_stats_is_safe(crafted: Path, fmt: str) -> None:
    for code, out, err in cli_run("stats", str(crafted), "--output-format", fmt, "-j", "1"):
        assert code == 0, err
        assert_safe(out + err)
        if fmt == "json":
            json.loads(out)
        elif fmt == "csv":
            assert all(line.split(",")[0] in ("kind", "split", "pair") for line in out.splitlines())
            assert escape(LINE_SPLIT) in out
        else:
            assert escape(LINE_SPLIT) in out


def test_verify_pairs_and_differences_are_safe(crafted: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(crafted, other, symlinks=True)
    shutil.rmtree(other / LINE_SPLIT)  # "<LINE_SPLIT>: only in A" starts a difference line
    for code, out, err in cli_run("verify", str(crafted), str(other)):
        assert code == 1, err
        assert_safe(out + err)
        assert f"{escape_line(LINE_SPLIT)}: only in" in out
    for code, out, err in cli_run("verify", str(crafted), str(other), "--output-format", "json"):
        assert code == 1 and json.loads(out)["differences"]
        assert_safe(out + err)


def test_convert_summary_warnings_and_json_are_safe(crafted: Path, tmp_path: Path) -> None:
    for i, run in enumerate((run_in_process, run_subprocess)):
        code, out, err = run("convert", str(crafted), str(tmp_path / f"{i}{EVIL[0]}"), "--to", "zarr")
        assert code == 0, err
        assert_safe(out + err)
        assert escape(EVIL[0]) in out and "Converted 2 splits" in out
        dst = str(tmp_path / f"j{i}{EVIL[5]}")
        code, out, err = run("convert", str(crafted), dst, "--to", "safetensors", "--output-format", "json")
        assert code == 0, err
        assert_safe(out + err)
        assert json.loads(out)


def test_error_messages_are_safe(crafted: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(crafted, broken, symlinks=True)
    (broken / "EM" / "layer_01" / "shard_001.pt").unlink()  # an error: convert refuses the source
    nothing = tmp_path / EVIL[2]
    nothing.mkdir()
    cases = [  # (arguments, what the message says, the name it quotes: shown escaped, on the message's line)
        (["convert", str(broken), str(tmp_path / "out"), "--to", "zarr"], "fails validation", None),
        (["info", str(nothing)], "no split", EVIL[2]),
        (["validate", str(tmp_path / ("missing" + EVIL[0]))], "does not exist", EVIL[0]),
        (["validate", str(crafted), "--select", EVIL[1]], "--select", EVIL[1]),
        (["--bad" + EVIL[1], "validate", str(crafted)], "No such option", EVIL[1]),
        (["validate" + EVIL[3], str(crafted)], "No such command", EVIL[3]),
    ]
    for args, expected, name in cases:
        for code, out, err in cli_run(*args):
            assert code == 2, (args, out, err)
            assert "internal error" not in err and "Traceback" not in err
            assert_safe(out + err)
            if name is None:  # a failed validation: its findings one a line, each escaped on its own
                assert expected in err and len(err.splitlines()) > 2, err
                # every line is the head or a finding ("  ACT..."): a newline in a name broke none of them
                assert all(
                    line.startswith(("actfmt: error:", "  ACT", "  ...")) for line in err.splitlines()
                ), err
            else:
                assert any(expected in line and escape(name) in line for line in err.splitlines()), err


def test_a_refused_conversion_lists_each_finding_on_its_own_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_split(src / "ds" / "EM", total=40, hidden=8, layers=1, shard_size=20, batch_size=10)
    (src / "ds" / "EM" / "layer_00" / "shard_001.pt").unlink()  # an error: convert refuses the source
    (src / "ds" / "EM" / "layer_00" / f"{EVIL[0]}.pt").write_bytes(b"x")  # a finding naming a newline
    for code, out, err in cli_run("convert", str(src), str(tmp_path / "out"), "--to", "zarr"):
        assert code == 2 and "fails validation" in err, err
        assert_safe(out + err)
        lines = err.splitlines()
        assert all(line.startswith(("actfmt: error:", "  ACT", "  ...")) for line in lines), err
        assert any(line.startswith("  ACT105") and escape(EVIL[0]) in line for line in lines), err


def test_progress_descriptions_are_escaped_and_not_markup() -> None:
    from rich.console import Console

    from actfmt.progress import ProgressEvent
    from actfmt.reporters import ProgressRenderer

    buf = StringIO()
    console = Console(file=buf, force_terminal=True, width=200, color_system="standard")  # names whole
    with ProgressRenderer(console=console, transient=False) as progress:
        for name in EVIL:
            progress(ProgressEvent("start", name, total=2, description=f"{name}/layer_00"))
            progress(ProgressEvent("advance", name, advance=1, nbytes=10, description=f"{name}/layer_01"))
            progress(ProgressEvent("end", name))
        shown = [task["description"] for task in progress.snapshot().values()]
    text = buf.getvalue()
    assert "\x1b[2J" not in text and "\x9b" not in text and "\x1b]0;" not in text and "\x07" not in text
    assert "\x1b]8;" not in text  # no hyperlink from [link=...]
    assert "g[bold red]x[link=https:example.com]y/layer_01" in text
    assert len(shown) == len(EVIL) and not any(_CONTROL.search(d) for d in shown)


def test_library_warnings_and_log_records_are_escaped() -> None:
    """A zarr / h5py / fsspec warning or log record quoting a name prints escaped, in its usual form."""
    code = (
        "import logging, warnings; from actfmt.cli import escape_library_messages; escape_library_messages(); "
        f"warnings.warn({EVIL[0]!r} + {EVIL[4]!r}); logging.getLogger('zarr').warning('stray %s', {EVIL[1]!r})"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120, check=True)
    err = proc.stderr.decode("utf-8")
    assert_safe(err)
    assert "UserWarning: a" in err and "\\x3a:error file=x::pwned" in err and "stray b" in err


def test_lines_broken_to_fit_never_start_a_command() -> None:
    from actfmt.reporters import fit_lines

    text = "word " * 13 + "::error file=x::pwned and ::add-mask::secret and ##[add-mask]s /::warning::x"
    for width in range(20, 90):
        lines = fit_lines(escape(text), width, " " * 10, " " * 10)
        assert len(lines) > 1 or width >= len(text) + 10
        assert all(github_command(line) is None for line in lines), (width, lines)
        assert all(len(line) <= max(width, 18) + 3 for line in lines)  # (+3: a neutralised "::")


@pytest.mark.parametrize("command", ["validate", "info", "stats"])
@pytest.mark.parametrize("columns", [80, 120])
def test_text_on_a_terminal_is_safe(crafted: Path, columns: int, command: str) -> None:
    """On a terminal the text is fitted to the width (and coloured): still no command, no control character."""
    from ._pty import in_pty

    for path, cwd in ((str(crafted), crafted.parent), (".", crafted)):
        out = in_pty([sys.executable, "-m", "actfmt", command, path], columns, colour=True, cwd=cwd)
        assert "\x1b[" in out  # styled: rich's SGR codes, which assert_safe allows
        assert_safe(out.replace("\r\n", "\n"))
        assert "error file=x,line=1::split" in out  # the split named to start a line is shown
