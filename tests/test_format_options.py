"""A format's own write options: declared once (``Format.options_class``), turned into flags by the CLI, checked,
recorded in the journal and given back as the flags that continue a conversion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from actfmt.cli import cli
from actfmt.conversion import convert
from actfmt.conversion.split import _flags, _merge
from actfmt.errors import ConversionError
from actfmt.formats import formats, get_format
from actfmt.formats.base import WriteOptions
from actfmt.formats.options import FormatOptions, option_flag
from actfmt.formats.zarr import ZarrOptions

from ._trees import make_split


def test_every_option_field_is_a_flag_of_convert() -> None:
    params = {p.opts[0]: p for p in cli.commands["convert"].params if p.opts}
    for fmt in formats():
        for f in dataclasses.fields(fmt.options_class):
            param = params[option_flag(f.name)]
            assert param.help and fmt.name in param.help
            if f.metadata.get("choices"):
                assert list(param.type.choices) == [str(c) for c in f.metadata["choices"]]


def test_options_check_themselves() -> None:
    assert ZarrOptions.from_mapping({"zarr_format": 2}, "zarr") == ZarrOptions(2)
    assert ZarrOptions.from_mapping({"zarr_format": None}, "zarr") == ZarrOptions()
    with pytest.raises(
        ConversionError, match=r"--zarr-format 4 is not available for zarr; choose one of: 2, 3"
    ):
        ZarrOptions.from_mapping({"zarr_format": 4}, "zarr")
    with pytest.raises(ConversionError, match=r"--zarr-format is not an option of the hdf5 format"):
        get_format("hdf5").options_class.from_mapping({"zarr_format": 2}, "hdf5")
    assert ZarrOptions(2).to_dict() == {"zarr_format": 2}
    assert ZarrOptions(2).flags() == ["--zarr-format 2"] and ZarrOptions().flags() == []
    assert ZarrOptions.of(WriteOptions()) == ZarrOptions()
    with pytest.raises(TypeError):
        ZarrOptions.of(WriteOptions(format_options=_Other()))


@dataclasses.dataclass(frozen=True)
class _Other(FormatOptions):
    shuffle: bool = True


def test_the_resume_flags_come_from_the_options_object() -> None:
    rec = {"to": "zarr", "compression": "none", "format_options": {"zarr_format": 2}, "dtype": None}
    assert _flags(rec) == "--to zarr --compression none --zarr-format 2"
    assert _flags({"to": "zarr", "format_options": {"zarr_format": 3}}) == "--to zarr"
    assert _flags({"to": "hdf5", "format_options": {}}) == "--to hdf5"
    given = {"to": "zarr", "level": None, "format_options": {"zarr_format": None}}
    recorded = {"to": "zarr", "level": 3, "format_options": {"zarr_format": 2}}
    assert _merge(given, recorded) == recorded


def test_convert_takes_the_format_options(tmp_path: Path) -> None:
    src = tmp_path / "ds" / "EM"
    make_split(src, total=40, hidden=8, layers=2)
    convert(src, tmp_path / "v2", to="zarr", format_options={"zarr_format": 2}, jobs=1)
    assert (tmp_path / "v2" / "EM.zarr" / ".zgroup").is_file()
    convert(src, tmp_path / "alias", to="zarr", zarr_format=2, jobs=1)
    assert (tmp_path / "alias" / "EM.zarr" / ".zgroup").is_file()
    with pytest.raises(ConversionError, match="--zarr-format is not an option of the hdf5 format"):
        convert(src, tmp_path / "h5", to="hdf5", format_options={"zarr_format": 2})
    assert not (tmp_path / "h5").exists()


def test_the_cli_refuses_an_option_of_another_format(tmp_path: Path) -> None:
    src = tmp_path / "ds" / "EM"
    make_split(src, total=40, hidden=8, layers=2)
    res = CliRunner().invoke(
        cli, ["convert", str(src), str(tmp_path / "o"), "--to", "hdf5", "--zarr-format", "2"]
    )
    assert res.exit_code == 2
    assert "--zarr-format is not an option of the hdf5 format" in res.output
    res = CliRunner().invoke(
        cli, ["convert", str(src), str(tmp_path / "z"), "--to", "zarr", "--zarr-format", "2"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "z" / "EM.zarr" / ".zgroup").is_file()
