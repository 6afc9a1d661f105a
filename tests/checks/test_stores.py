"""ACT6xx on converted stores (zarr, hdf5, safetensors), made from a valid fixture with `actfmt convert`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actfmt.checks import validate
from tests.conftest import VALID

SRC = VALID / "em_neutral_pair"
DS = "Activations/org_tiny-pair/pair_ds"
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5", "safetensors": ""}


def converted(tmp_path: Path, fmt: str) -> Path:
    from actfmt.conversion import convert

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
    ts = pytest.importorskip("tensorstore")  # zarr-python 3.1 has no bfloat16 data type

    dst = converted(tmp_path, "zarr")
    where = {"driver": "file", "path": str(dst / DS / "Neutral.zarr/layer_00")}
    arr = ts.open({"driver": "zarr3", "kvstore": where}, open=True).result()
    value = np.asarray(arr[3, 2].read().result())
    arr[3, 2].write((value.view(np.uint16) ^ 1).view(value.dtype)).result()  # one bit of one bf16 value
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


def _edit_block(split: Path, fmt: str, edit: object) -> None:
    """Apply ``edit(block)`` to the actfmt block of a converted split, in place."""
    if fmt == "zarr":
        doc = split / "zarr.json"
        data = json.loads(doc.read_text())
        edit(data["attributes"]["actfmt"])  # type: ignore[operator]
        doc.write_text(json.dumps(data))
    elif fmt == "hdf5":
        import h5py

        with h5py.File(split, "r+") as f:
            block = json.loads(f.attrs["actfmt"])
            edit(block)  # type: ignore[operator]
            f.attrs["actfmt"] = json.dumps(block)
    else:
        md = split / "metadata.json"
        data = json.loads(md.read_text())
        edit(data["actfmt"])  # type: ignore[operator]
        md.write_text(json.dumps(data))


def _scale_vector(split: Path, fmt: str, name: str, factor: float) -> None:
    """Multiply the kept vector ``name`` (every layer's row) by ``factor``, in place."""
    if fmt == "zarr":
        import zarr

        arr = zarr.open_array(str(split / "actfmt_stats" / name), mode="r+")
        arr[:] = arr[:] * factor
    elif fmt == "hdf5":
        import h5py

        with h5py.File(split, "r+") as f:
            f["actfmt_stats"][name][...] = f["actfmt_stats"][name][()] * factor
    else:
        from actfmt.formats.vectors import STATS_FILE, read_tensors, write_tensors
        from actfmt.storage import resolve

        loc = resolve(split / STATS_FILE)
        found_ = read_tensors(loc)
        assert found_ is not None
        arrays, meta = found_
        arrays = dict(arrays)
        arrays[name] = arrays[name] * factor
        write_tensors(loc, arrays, meta)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "safetensors"])
def test_kept_statistics_that_disagree_with_the_data_are_act604_with_deep(tmp_path: Path, fmt: str) -> None:
    dst = converted(tmp_path, fmt)
    em = dst / DS / f"EM{SUFFIX[fmt]}"

    def edit(block: dict) -> None:  # type: ignore[type-arg]
        block["stats"]["layers"]["layer_01"]["std"] *= 1.0001

    _edit_block(em, fmt, edit)
    assert found(dst) == []  # a deep rule: nothing without --deep
    assert found(dst, deep=True) == [("ACT604", f"{DS}/EM{SUFFIX[fmt]}/layer_01")]
    report = validate(dst, deep=True)
    assert "std" in report.findings[0].message

    neutral = dst / DS / f"Neutral{SUFFIX[fmt]}"
    _scale_vector(neutral, fmt, "mean", 1.001)
    got = found(dst, deep=True)
    assert ("ACT604", f"{DS}/Neutral{SUFFIX[fmt]}/layer_00") in got
    assert ("ACT604", f"{DS}/Neutral{SUFFIX[fmt]}/layer_01") in got


def test_norm_outlier_and_identical_splits_in_stores(tmp_path: Path) -> None:
    import shutil

    import torch

    from actfmt.conversion import convert
    from tests._trees import make_split

    src = tmp_path / "src"
    make_split(src / "m" / "ds" / "EM", total=300, hidden=8, layers=2, shard_size=100, batch_size=20)
    shutil.copytree(src / "m" / "ds" / "EM", src / "m" / "ds" / "Neutral")
    meta = src / "m" / "ds" / "Neutral" / "metadata.json"
    meta.write_text(meta.read_text().replace('"split": "EM"', '"split": "Neutral"'))
    shard = src / "m" / "ds" / "EM" / "layer_01" / "shard_001.pt"
    t = torch.load(shard)
    t[5] = t[5] * 2000
    torch.save(t.clone(), shard)
    for fmt in ("zarr", "hdf5", "safetensors"):
        dst = tmp_path / fmt
        convert(src, dst, to=fmt, force=True)
        got = found(dst, deep=True)
        assert ("ACT408", f"m/ds/EM{SUFFIX[fmt]}/layer_01") in got, got
        assert ("ACT503", f"m/ds/Neutral{SUFFIX[fmt]}") in got, got  # layer_00 is still identical
        report = validate(dst, deep=True)
        outlier = next(f for f in report.findings if f.code == "ACT408")
        assert "row 105" in outlier.message


def _edit_array(split: Path, layer: str, edit: object) -> None:
    """Apply ``edit(doc)`` to a zarr layer's ``zarr.json``, in place."""
    doc = split / layer / "zarr.json"
    data = json.loads(doc.read_text())
    edit(data)  # type: ignore[operator]
    doc.write_text(json.dumps(data))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "safetensors"])
def test_store_whose_metadata_disagrees_with_its_layers_is_act605(tmp_path: Path, fmt: str) -> None:
    dst = converted(tmp_path, fmt)
    em = dst / DS / f"EM{SUFFIX[fmt]}"
    if fmt == "zarr":
        doc = em / "zarr.json"
        data = json.loads(doc.read_text())
        data["attributes"]["total_examples"] += 1
        doc.write_text(json.dumps(data))
    elif fmt == "hdf5":
        import h5py

        with h5py.File(em, "r+") as f:
            meta = json.loads(f.attrs["actfmt_metadata"])
            meta["total_examples"] += 1
            f.attrs["actfmt_metadata"] = json.dumps(meta)
    else:
        md = em / "metadata.json"
        data = json.loads(md.read_text())
        data["total_examples"] += 1
        md.write_text(json.dumps(data))
    got = [f for f in validate(dst, deep=True).findings if f.code == "ACT605"]
    assert [(f.code, f.location) for f in got] == [
        ("ACT605", f"{DS}/EM{SUFFIX[fmt]}/layer_00"),
        ("ACT605", f"{DS}/EM{SUFFIX[fmt]}/layer_01"),
    ]
    assert "total_examples" in got[0].message


def test_zarr_header_declaring_a_trillion_rows_is_act606_at_once(tmp_path: Path) -> None:
    import time

    dst = converted(tmp_path, "zarr")
    em = dst / DS / "EM.zarr"

    def huge(doc: dict) -> None:  # type: ignore[type-arg]
        doc["shape"][0] = 10**12

    _edit_array(em, "layer_01", huge)
    t0 = time.perf_counter()
    assert found(dst) == [("ACT606", f"{DS}/EM.zarr")]
    assert time.perf_counter() - t0 < 5
    (f,) = [f for f in validate(dst).findings if f.code == "ACT606"]
    assert "chunks" in f.message and "layer_01" in f.message
