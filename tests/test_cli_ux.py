"""The small things a user trips over: one -q / --no-progress pair on every long-running command, the validate
summary counted in a store's own units, `info` on a path without a split, `verify` naming every pair it compared,
and `info` fitted to the terminal's width."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import actfmt.cli
from actfmt.checks import validate
from actfmt.cli import cli
from actfmt.conversion import info
from actfmt.reporters import ProgressRenderer, render_info, shorten_left

from ._trees import make_split, make_tree

LONG_RUNNING = ("validate", "convert", "verify")
SPLIT_DIR = "org_Tiny-Model/SP_test"


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-split, 2-layer, 120-row tree and its conversions: zarr (40-row chunks), hdf5 (50), safetensors."""
    base = tmp_path_factory.mktemp("stores")
    make_tree(base / "pt", total=120, hidden=8, layers=2)
    for to, extra in (
        ("zarr", ["--chunk-rows", "40"]),
        ("hdf5", ["--chunk-rows", "50"]),
        ("safetensors", []),
    ):
        res = run("convert", str(base / "pt"), str(base / to), "--to", to, "-q", *extra)
        assert res.exit_code == 0, res.output
    return {name: base / name for name in ("pt", "zarr", "hdf5", "safetensors")}


# ------------------------------------------------------------------------------------- -q / --no-progress


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_long_running_command_has_the_same_pair(name: str) -> None:
    options = {opt: p for p in cli.commands[name].params if isinstance(p, click.Option) for opt in p.opts}
    assert {"-q", "--quiet", "--no-progress"} <= set(options)
    assert options["-q"] is options["--quiet"] and options["--quiet"].is_flag
    reference = {opt: p for p in cli.commands["validate"].params for opt in p.opts}
    assert options["--no-progress"].help == reference["--no-progress"].help
    assert "no summary line" in (options["--quiet"].help or "")


def _record_renderers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bool]]:
    made: list[dict[str, bool]] = []

    def factory(**kwargs: bool) -> ProgressRenderer:
        made.append(kwargs)
        return ProgressRenderer(enabled=False)

    monkeypatch.setattr(actfmt.cli, "progress_renderer", factory)
    return made


def test_convert_no_progress_keeps_the_summary_and_quiet_drops_it(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _record_renderers(monkeypatch)
    res = run("convert", str(stores["pt"]), str(tmp_path / "a"), "--to", "zarr", "--no-progress")
    assert res.exit_code == 0, res.output
    assert made[-1] == {"quiet": False, "no_progress": True}
    assert res.stdout.startswith("Converted 2 splits")
    res = run("convert", str(stores["pt"]), str(tmp_path / "b"), "--to", "zarr", "-q")
    assert res.exit_code == 0 and res.stdout == "" and made[-1] == {"quiet": True, "no_progress": False}


def test_verify_no_progress_and_quiet(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _record_renderers(monkeypatch)
    res = run("verify", str(stores["pt"]), str(stores["zarr"]), "--no-progress")
    assert res.exit_code == 0 and made[-1] == {"quiet": False, "no_progress": True}
    assert "Same activations: 2 pairs of splits, 4 layers" in res.stdout
    quiet = run("verify", str(stores["pt"]), str(stores["zarr"]), "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and made[-1]["quiet"]
    a, b = tmp_path / "a" / "ds" / "EM", tmp_path / "b" / "ds" / "EM"
    make_split(a, total=30, hidden=4, layers=1, seed=1)
    make_split(b, total=30, hidden=4, layers=1, seed=2)
    differ = run("verify", str(a), str(b), "-q")
    assert differ.exit_code == 1
    assert differ.stdout.splitlines() == actfmt.verify(str(a), str(b)).differences != []
    assert "Different:" not in differ.stdout and "compared" not in differ.stdout


# ------------------------------------------------------------------------------------- validate: units


def test_validate_counts_chunks_and_layer_files_of_stores(stores: dict[str, Path]) -> None:
    zarr = run("validate", str(stores["zarr"]))
    assert zarr.exit_code == 0, zarr.output
    assert zarr.stdout.splitlines()[-2].startswith("Checked 2 splits · 4 layers · 12 chunks in ")
    hdf5 = run("validate", str(stores["hdf5"]))
    assert hdf5.stdout.splitlines()[-2].startswith("Checked 2 splits · 4 layers · 12 chunks in ")
    st = run("validate", str(stores["safetensors"]))
    assert st.stdout.splitlines()[-2].startswith("Checked 2 splits · 4 layers · 4 layer files in ")
    every = run("validate", *(str(stores[k]) for k in ("pt", "zarr", "safetensors")))
    line = every.stdout.splitlines()[-2]
    assert line.startswith("Checked 6 splits · 12 layers · 8 shards · 12 chunks · 4 layer files in "), line
    assert "0 shards" not in zarr.stdout + hdf5.stdout + st.stdout


def test_validate_json_summary_adds_units_and_keeps_shards(stores: dict[str, Path]) -> None:
    data = json.loads(run("validate", str(stores["zarr"]), "--output-format", "json").stdout)
    assert data["schema_version"] == 1
    summary = data["summary"]
    assert (summary["shards"], summary["chunks"], summary["layer_files"]) == (0, 12, 0)
    assert summary == validate(str(stores["zarr"])).to_dict()["summary"]
    pt = json.loads(run("validate", str(stores["pt"]), "--output-format", "json").stdout)["summary"]
    assert (pt["shards"], pt["chunks"], pt["layer_files"]) == (8, 0, 0)


def test_validate_counts_the_chunks_a_damaged_store_should_hold(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "zarr"
    shutil.copytree(stores["zarr"], copy)
    chunk = next(
        p
        for p in sorted((copy / SPLIT_DIR / "EM.zarr" / "layer_01").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.unlink()
    res = run("validate", str(copy))
    assert res.exit_code == 1 and "ACT601" in res.stdout
    assert "· 12 chunks in " in res.stdout


# ------------------------------------------------------------------------------------- info: no split


def test_info_without_a_split_is_an_error_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    for extra in ([], ["--output-format", "json"], ["--json"]):
        res = run("info", str(tmp_path / "empty"), *extra)
        assert res.exit_code == 2, res.output
        assert res.stdout == ""
        assert res.stderr.startswith("actfmt: error: ") and "no split found" in res.stderr
        assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------- verify: pairs


@pytest.fixture(scope="module")
def two_formats(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """B holds the EM split twice: EM.zarr and EM.h5."""
    base = tmp_path_factory.mktemp("twice")
    a = stores["pt"] / SPLIT_DIR / "EM"
    for to in ("zarr", "hdf5"):
        assert run("convert", str(a), str(base / "b"), "--to", to, "-q").exit_code == 0
    return {"a": a, "b": base / "b"}


def test_verify_compares_and_names_every_pair_text(two_formats: dict[str, Path]) -> None:
    res = run("verify", str(two_formats["a"]), str(two_formats["b"]))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"A: {two_formats['a']}" and lines[1] == f"B: {two_formats['b']}"
    assert any(line.split() == ["A", "with", "B/EM.zarr"] for line in lines)
    assert any(line.split() == ["A", "with", "B/EM.h5"] for line in lines)
    assert lines[-1].startswith("✓ Same activations: 2 pairs of splits, 4 layers")


def test_verify_pairs_in_json_and_the_old_flag(two_formats: dict[str, Path]) -> None:
    new = run("verify", str(two_formats["a"]), str(two_formats["b"]), "--output-format", "json")
    old = run("verify", str(two_formats["a"]), str(two_formats["b"]), "--json")
    assert new.exit_code == old.exit_code == 0
    data = json.loads(new.stdout)
    assert json.loads(old.stdout) == data
    assert sorted(map(tuple, data["pairs"])) == [(".", "EM.h5"), (".", "EM.zarr")]
    assert data["equal"] is True and data["splits"] == 2 and data["differences"] == []
    for key in ("a", "b", "equal", "splits", "layers", "bytes", "differences", "first"):  # the 0.1.0 keys
        assert key in data


def test_verify_trees_group_pairs_by_directory(stores: dict[str, Path]) -> None:
    res = run("verify", str(stores["pt"]), str(stores["hdf5"]))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert f"compared in {SPLIT_DIR}/:" in lines
    assert [line.split() for line in lines if "with" in line] == [
        ["EM", "with", "EM.h5"],
        ["Neutral", "with", "Neutral.h5"],
    ]


# ------------------------------------------------------------------------------------- info: fit the width


def test_shorten_left() -> None:
    path = "sentence-transformers_all-MiniLM-L6-v2/SP_stdlib_docs_sample/EM.zarr"
    assert shorten_left(path, 200) == path
    assert shorten_left(path, 40) == "…/SP_stdlib_docs_sample/EM.zarr"
    assert shorten_left(path, 20) == "…/EM.zarr"
    assert shorten_left("abcdefghij", 5) == "…ghij"
    assert shorten_left(path, 40, "...") == ".../SP_stdlib_docs_sample/EM.zarr"


def _info_text(path: Path, columns: int) -> list[str]:
    res = run("info", str(path), env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.stdout.splitlines()


@pytest.mark.parametrize("columns", [60, 80, 120])
@pytest.mark.parametrize("kind", ["zarr", "hdf5", "safetensors", "pt", "all"])
def test_info_fits_the_width_and_shows_every_field_whole(
    stores: dict[str, Path], kind: str, columns: int
) -> None:
    path = stores["pt"].parent if kind == "all" else stores[kind]
    lines = _info_text(path, columns)
    assert all(len(line) <= columns for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for row in info(str(path)):
        d = row.to_dict()
        for key in ("format", "dtype", "compression"):
            if d[key]:
                assert str(d[key]) in text, (key, d[key])
        for value in (row.layers, row.examples, row.hidden_dim):
            assert str(value) in text
        if row.chunks:
            assert "x".join(map(str, row.chunks)) in text
    name_lines = [line for line in lines if "EM" in line]
    assert name_lines, text


def test_info_at_80_columns_is_a_readable_table(stores: dict[str, Path]) -> None:
    lines = _info_text(stores["zarr"], 80)
    assert lines[0].endswith("zarr: 2 splits")  # PATH itself (shortened from the left only when too long)
    assert lines[1] == f"  in {SPLIT_DIR}/"
    assert lines[2].startswith("  every split: format zarr · layers 2 · examples 120 · hidden 8")
    rows = [line.split() for line in lines if line.startswith(("EM", "Neutral"))]
    assert [r[0] for r in rows] == ["EM.zarr", "Neutral.zarr"]
    assert "…" not in "".join(lines[1:])  # nothing cut: the split path lost only the shared directory


def test_info_one_block_per_split_when_narrow(stores: dict[str, Path]) -> None:
    lines = _info_text(stores["pt"].parent, 60)
    heads = [line for line in lines if line and not line.startswith(" ") and "splits" not in line]
    assert len(heads) == 8  # one block per split: its path, then indented fields
    assert all("/" in h and len(h) <= 60 for h in heads)
    assert len(set(heads)) == 8  # shortened paths stay distinct


def test_info_shortens_split_paths_from_the_left_and_keeps_them_distinct() -> None:
    @dataclasses.dataclass
    class Row:
        location: str
        format: str = "zarr"
        layers: int = 28
        examples: int | None = 7049
        hidden_dim: int | None = 3584
        dtype: str | None = "bfloat16"
        bytes_on_disk: int = 10**9
        chunks: list[int] | None = None
        compression: str | None = "blosc-zstd level 1 (shuffle)"
        complete: bool | None = True
        ratio: float | None = 1.46

    rows = [
        Row(f"{fmt}/unsloth_Qwen2.5-7B-Instruct/SP_bad_medical_advice/{s}", format=f, bytes_on_disk=n)
        for n, (fmt, f, s) in enumerate(
            [("a", "zarr", "EM.zarr"), ("b", "hdf5", "EM.zarr"), ("a", "zarr", "Neutral.zarr")]
        )
    ]
    lines = [line for line, _ in render_info(rows, "out", 80)]
    assert all(len(line) <= 80 for line in lines)
    split_cells = [
        line.split()[0] for line in lines[lines.index(next(x for x in lines if x.startswith("split"))) + 1 :]
    ]
    assert len(set(split_cells)) == 3
    assert all(c.endswith((".zarr",)) for c in split_cells)
    ascii_lines = [line for line, _ in render_info(rows, "out", 80, fancy=False)]
    assert all(line.isascii() for line in ascii_lines)


def test_info_piped_defaults_to_80_columns(stores: dict[str, Path]) -> None:
    res = CliRunner().invoke(cli, ["info", str(stores["pt"].parent)], env={"COLUMNS": ""})
    assert res.exit_code == 0
    assert max(len(line) for line in res.stdout.splitlines()) <= 80


def test_info_json_has_every_field_and_the_old_flag(stores: dict[str, Path]) -> None:
    new = run("info", str(stores["zarr"]), "--output-format", "json")
    old = run("info", str(stores["zarr"]), "--json")
    assert new.exit_code == old.exit_code == 0 and json.loads(new.stdout) == json.loads(old.stdout)
    doc = json.loads(new.stdout)
    assert doc["schema_version"] == 1 and doc["tool"]["name"] == "actfmt"
    data = doc["splits"]
    fields = {f.name for f in dataclasses.fields(type(info(str(stores["zarr"]))[0]))}
    for row in data:
        assert fields <= set(row) and "compression_ratio" in row
        assert row["model_name"] == "org/Tiny-Model" and row["split"] in ("EM", "Neutral")
    assert data == [r.to_dict() for r in info(str(stores["zarr"]))]


def test_a_closed_pipe_is_not_an_error(stores: dict[str, Path]) -> None:
    """`actfmt info PATH | head -1`: no `actfmt: error: [Errno 32] Broken pipe` (the reader is gone first)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        for argv in (["info", str(stores["zarr"])], ["rules"]):
            proc = subprocess.run(
                [sys.executable, "-m", "actfmt", *argv],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
                check=False,
            )
            assert "actfmt: error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    finally:
        os.close(write_end)


def test_readme_info_example_is_what_info_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```console\n\$ actfmt info demo-out/zarr\n(.*?)```", readme, flags=re.DOTALL)
    assert block, "README lacks the `actfmt info demo-out/zarr` example"
    shown = block.group(1).splitlines()
    fixture = Path(__file__).resolve().parent.parent / "fixtures/valid/real_minilm_bf16_slice/Activations"
    monkeypatch.chdir(tmp_path)
    assert run("convert", str(fixture), "demo-out/zarr", "--to", "zarr", "-q").exit_code == 0
    printed = run("info", "demo-out/zarr", env={"COLUMNS": "80"}).stdout.splitlines()
    assert printed[:6] == shown[:6]
    assert [line.split()[0] for line in printed[6:]] == [line.split()[0] for line in shown[6:]]
    assert all(len(line) <= 80 for line in shown)


# -- one CLI convention --------------------------------------------------------------------------------------
#: Every command that reports something: it takes -o/--output-file and --output-format (text first).
REPORTING = ("validate", "stats", "info", "verify", "convert", "rules")


def _opts(name: str) -> dict[str, click.Parameter]:
    return {o: p for p in cli.commands[name].params for o in getattr(p, "opts", [])}


def test_every_reporting_command_takes_the_same_output_options() -> None:
    for name in REPORTING:
        opts = _opts(name)
        assert {"-o", "--output-file", "--output-format"} <= set(opts), name
        fmt = opts["--output-format"]
        assert fmt.default == "text" and "json" in fmt.type.choices, name  # type: ignore[attr-defined]
        assert opts["-o"] is opts["--output-file"], name
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if "--json" in getattr(p, "opts", []):
                assert p.hidden, f"{name}: --json is the old spelling, kept hidden"  # type: ignore[attr-defined]
            if "--jobs" in getattr(p, "opts", []):
                assert p.default == 0 and "-j" in p.opts, f"{name}: one --jobs default (0: one per CPU)"


def test_several_paths_wherever_one_makes_sense() -> None:
    for name in ("validate", "stats", "info"):
        (arg,) = [p for p in cli.commands[name].params if isinstance(p, click.Argument)]
        assert arg.nargs == -1, name


def test_every_json_output_says_its_schema_and_tool(stores: dict[str, Path], tmp_path: Path) -> None:
    z = str(stores["zarr"])
    outputs = {
        "validate": run("validate", z, "--output-format", "json"),
        "stats": run("stats", z, "--output-format", "json", "-q"),
        "info": run("info", z, "--output-format", "json"),
        "verify": run("verify", str(stores["pt"]), z, "--output-format", "json", "-q"),
        "convert": run("convert", z, str(tmp_path / "c"), "--to", "st", "--output-format", "json", "-q"),
        "rules": run("rules", "--output-format", "json"),
        "rule": run("rule", "ACT302", "--output-format", "json"),
    }
    for name, res in outputs.items():
        assert res.exit_code == 0, (name, res.output)
        doc = json.loads(res.stdout)
        assert doc["schema_version"] == 1 and doc["tool"]["name"] == "actfmt", name
    # -o writes the same document to a file and nothing to stdout
    res = run("verify", str(stores["pt"]), z, "--output-format", "json", "-q", "-o", str(tmp_path / "v.json"))
    assert res.exit_code == 0 and res.stdout == ""
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(outputs["verify"].stdout)


def test_to_takes_aliases_and_suggests_a_near_miss(stores: dict[str, Path], tmp_path: Path) -> None:
    src = str(stores["pt"] / SPLIT_DIR / "EM")
    res = run("convert", src, str(tmp_path / "a"), "--to", "h5", "-q")
    assert res.exit_code == 0 and (tmp_path / "a" / "EM.h5").is_file()
    res = CliRunner().invoke(cli, ["convert", src, str(tmp_path / "b"), "--to", "safetensor"])
    assert res.exit_code == 2 and "Did you mean 'safetensors'?" in res.output
    assert not (tmp_path / "b").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(stores: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "plan"
    res = run("convert", str(stores["pt"]), str(dst), "--to", "zarr", "--dry-run")
    assert res.exit_code == 0, res.output
    assert not dst.exists()
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(line.endswith("create") for line in lines[:2])
    assert "EM.zarr" in lines[0] and "2 layers" in lines[0]
    assert lines[2].startswith("Dry run: 2 splits · 4 layers · ") and "nothing written" in lines[2]

    def plan(*extra: str) -> Any:
        args = ["convert", str(stores["pt"]), str(stores["zarr"]), "--to", "zarr", "--dry-run", *extra]
        return json.loads(run(*args, "--output-format", "json").stdout)

    doc = plan()
    assert doc["dry_run"] is True and {p["action"] for p in doc["planned"]} == {"exists"}
    assert sum(p["bytes"] for p in doc["planned"]) == 2 * 2 * 120 * 8 * 2  # splits x layers x rows x d x bf16
    replace = plan("--overwrite")
    assert {p["action"] for p in replace["planned"]} == {"replace"}


def test_info_never_shortens_two_stores_until_they_look_alike() -> None:
    from actfmt.reporters.info import _fit_labels

    a = "a" * 50 + "_model_one/EM.zarr"
    b = "a" * 50 + "_model_two/EM.zarr"
    short = _fit_labels([a, b], 40, "…")
    assert len(set(short)) == 2 and all(len(s) <= 40 for s in short)
    assert short[0].endswith("_model_one/EM.zarr") and short[1].endswith("_model_two/EM.zarr")
    # when no shortening keeps them apart, they stay whole
    c, d = "x" * 30 + "1" + "y" * 30, "x" * 30 + "2" + "y" * 30
    assert _fit_labels([c, d], 20, "…") == [c, d]
    # the usual case: shortened at a "/"
    assert _fit_labels(["very/long/path/to/EM.zarr", "short/Neutral.zarr"], 20, "…") == [
        "…/path/to/EM.zarr",
        "short/Neutral.zarr",
    ]
