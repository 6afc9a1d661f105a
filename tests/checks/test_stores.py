"""ACT6xx on converted stores (zarr, hdf5, safetensors), made from a valid fixture with `actfmt convert`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actfmt.checks import validate
from tests.conftest import VALID

SRC = VALID / "em_neutral_pair"
DS = "Activations/org_tiny-pair/pair_ds"
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5", "safetensors": ""}


def converted(tmp_path: Path, fmt: str) -> Path:
    from actfmt.convert import convert

    dst = tmp_path / fmt
    convert(SRC, dst, to=fmt, chunk_rows=16)
    return dst


def found(path: Path, deep: bool = False) -> list[tuple[str, str]]:
    return sorted((f.code, f.location) for f in validate(path, deep=deep).findings)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "safetensors"])
def test_converted_store_is_clean(tmp_path: Path, fmt: str) -> None:
    dst = converted(tmp_path, fmt)
    report = validate(dst, deep=True)
    assert report.findings == [] and report.skipped == []
    assert report.splits == [f"{DS}/EM{SUFFIX[fmt]}", f"{DS}/Neutral{SUFFIX[fmt]}"]
    assert report.layers == 4


def test_zarr_missing_chunk_is_act601_and_not_also_a_checksum_error(tmp_path: Path) -> None:
    dst = converted(tmp_path, "zarr")
    (dst / DS / "EM.zarr/layer_01/c.1.0").unlink()
    assert found(dst) == [("ACT601", f"{DS}/EM.zarr/layer_01")]
    assert found(dst, deep=True) == [("ACT601", f"{DS}/EM.zarr/layer_01")]


def test_zarr_changed_values_are_act602_with_deep(tmp_path: Path) -> None:
    import zarr

    dst = converted(tmp_path, "zarr")
    arr = zarr.open_array(str(dst / DS / "Neutral.zarr/layer_00"), mode="r+")
    arr[3, 2] = arr[3, 2] ^ 1  # one bit of one bf16 value (stored as uint16)
    assert found(dst) == []
    ((code, loc),) = found(dst, deep=True)
    assert (code, loc) == ("ACT602", f"{DS}/Neutral.zarr/layer_00")


def test_hdf5_changed_values_and_incomplete(tmp_path: Path) -> None:
    import h5py

    dst = converted(tmp_path, "hdf5")
    em = dst / DS / "EM.h5"
    with h5py.File(em, "r+") as f:
        f["layer_01"][0, 0] = f["layer_01"][0, 0] ^ 1
    assert found(dst, deep=True) == [("ACT602", f"{DS}/EM.h5/layer_01")]
    with h5py.File(em, "r+") as f:
        del f.attrs["actfmt"]
    assert ("ACT603", f"{DS}/EM.h5") in found(dst)


def test_safetensors_short_file_and_incomplete(tmp_path: Path) -> None:
    dst = converted(tmp_path, "safetensors")
    layer = dst / DS / "EM/layer_01.safetensors"
    layer.write_bytes(layer.read_bytes()[:-40])
    assert found(dst) == [("ACT601", f"{DS}/EM/layer_01")]
    md = dst / DS / "Neutral/metadata.json"
    data = json.loads(md.read_text())
    data["actfmt"]["complete"] = False
    md.write_text(json.dumps(data))
    assert found(dst) == [("ACT601", f"{DS}/EM/layer_01"), ("ACT603", f"{DS}/Neutral")]


def test_damaged_hdf5_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    dst = converted(tmp_path, "hdf5")
    em = dst / DS / "EM.h5"
    em.write_bytes(em.read_bytes()[:600])  # keeps the signature, loses the rest
    codes = {code for code, _ in found(dst)}
    assert codes & {"ACT001", "ACT603"}
    assert all(loc.startswith(f"{DS}/EM.h5") for _, loc in found(dst))
