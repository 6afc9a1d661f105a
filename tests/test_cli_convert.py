"""`actfmt convert`, `verify` and `info` as a user runs them (CliRunner and a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from actfmt.cli import cli
from actfmt.formats import FORMATS, get_format

from ._trees import bits, make_split, make_tree, seed_load


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path / "Activations", total=120, hidden=8, layers=2)
    return tmp_path / "Activations"


@pytest.mark.parametrize("to", [f for f in FORMATS if f != "pt"])
def test_convert_there_and_back_with_the_cli(tree: Path, tmp_path: Path, to: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(tree), str(tmp_path / "out"), "--to", to])
    assert res.exit_code == 0, res.output
    assert "Converted 2 splits" in res.output
    dest = get_format(to).destination(tmp_path / "out" / "org_Tiny-Model" / "SP_test" / "EM")
    assert dest.exists()
    back = runner.invoke(cli, ["convert", str(tmp_path / "out"), str(tmp_path / "back"), "--to", "pt", "-q"])
    assert back.exit_code == 0, back.output
    for split in ("EM", "Neutral"):
        a = tree / "org_Tiny-Model" / "SP_test" / split
        b = tmp_path / "back" / "org_Tiny-Model" / "SP_test" / split
        for layer in ("layer_00", "layer_01"):
            assert torch.equal(bits(seed_load(a, layer)), bits(seed_load(b, layer)))
        assert json.loads((a / "metadata.json").read_text()) == json.loads((b / "metadata.json").read_text())
    same = runner.invoke(cli, ["verify", str(tree), str(tmp_path / "out")])
    assert same.exit_code == 0 and "Same activations" in same.output


def test_convert_refuses_existing_destination_with_exit_2(tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["convert", str(tree), str(tmp_path / "o"), "--to", "zarr", "-q"]).exit_code == 0
    )
    res = runner.invoke(cli, ["convert", str(tree), str(tmp_path / "o"), "--to", "zarr"])
    assert res.exit_code == 2
    assert "already exists; pass --overwrite" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["convert", str(tree), str(tmp_path / "o"), "--to", "zarr", "--overwrite", "-q"])
    assert res.exit_code == 0


def test_convert_refuses_invalid_source_unless_forced(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM", total=200, hidden=8, layers=2)
    (tmp_path / "ds" / "EM" / "layer_01" / "shard_001.pt").unlink()
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(tmp_path / "ds"), str(tmp_path / "out"), "--to", "zarr"])
    assert res.exit_code == 2
    assert "fails validation" in res.output and "--force" in res.output and "ACT302" in res.output
    assert not (tmp_path / "out" / "EM.zarr").exists()


def test_convert_rejects_codec_the_format_lacks(tree: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["convert", str(tree), str(tmp_path / "o"), "--to", "safetensors", "--compression", "zstd"]
    )
    assert res.exit_code == 2
    assert "not available for safetensors" in res.output


def test_dtype_cast_warns(tree: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["convert", str(tree), str(tmp_path / "o"), "--to", "pt", "--dtype", "float32"]
    )
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "bfloat16 -> float32" in res.output
    assert "every value exact" in res.output  # widening: the values are the source's


def test_verify_exit_1_on_difference(tmp_path: Path) -> None:
    make_split(tmp_path / "a" / "EM", total=100, hidden=8, layers=2, seed=1)
    make_split(tmp_path / "b" / "EM", total=100, hidden=8, layers=2, seed=2)
    res = CliRunner().invoke(
        cli, ["verify", str(tmp_path / "a" / "EM"), str(tmp_path / "b" / "EM"), "--json"]
    )
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["equal"] is False and out["first"] == {"split": ".", "layer": "layer_00", "row": 0}


def test_info_json_and_table(tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(
        cli, ["convert", str(tree), str(tmp_path / "z"), "--to", "zarr", "--chunk-rows", "40", "-q"]
    )
    res = runner.invoke(cli, ["info", str(tmp_path / "z"), "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)["splits"]
    assert [r["location"] for r in rows] == [
        "org_Tiny-Model/SP_test/EM.zarr",
        "org_Tiny-Model/SP_test/Neutral.zarr",
    ]
    assert rows[0]["chunks"] == [40, 8] and rows[0]["complete"] is True and rows[0]["examples"] == 120
    table = runner.invoke(cli, ["info", str(tmp_path / "z")])
    assert table.exit_code == 0 and "EM.zarr" in table.output and "bfloat16" in table.output


def test_subprocess_convert_and_verify(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "h5"
    proc = subprocess.run(
        [sys.executable, "-m", "actfmt", "convert", str(tree), str(out), "--to", "hdf5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    proc = subprocess.run(
        [sys.executable, "-m", "actfmt", "verify", str(tree), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("to", ["zarr", "safetensors"])
def test_a_tree_without_the_producers_keys_converts_and_reads(tree: Path, tmp_path: Path, to: str) -> None:
    # load_in_4bit (and the other descriptive keys) are not needed to read the rows: a warning, not a refusal.
    import actfmt

    for split in ("EM", "Neutral"):
        md = tree / "org_Tiny-Model" / "SP_test" / split / "metadata.json"
        data = json.loads(md.read_text())
        del data["load_in_4bit"], data["model_name"]
        md.write_text(json.dumps(data))
    runner = CliRunner()
    checked = runner.invoke(cli, ["validate", str(tree), "--output-format", "json"])
    assert checked.exit_code == 0, checked.output
    codes = {f["code"] for f in json.loads(checked.output)["issues"]}
    assert codes == {"ACT205"}
    res = runner.invoke(cli, ["convert", str(tree), str(tmp_path / "out"), "--to", to, "-q"])
    assert res.exit_code == 0, res.output
    dest = get_format(to).destination(tmp_path / "out" / "org_Tiny-Model" / "SP_test" / "EM")
    src = tree / "org_Tiny-Model" / "SP_test" / "EM"
    assert torch.equal(bits(actfmt.open(dest).layer(1)[:]), bits(seed_load(src, "layer_01")))
