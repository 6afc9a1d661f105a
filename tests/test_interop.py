"""Readers outside actfmt see the source's values: the README's "Reading without actfmt" runs as written.

The section's ``sh`` block converts the shipped MiniLM slice (real bfloat16 activations) into every format;
each ``python`` block is run as written (warnings are errors) and must leave ``x``, the layer ``layer_01``, which
is compared with the source bit for bit (bfloat16 results), or exactly (float32 results: every bfloat16 value is
a float32).  The other tests pin what each reader sees of each store: the bfloat16 data type refused loudly by
zarr-python and xarray, dimension names, coordinates, consolidated metadata, HDF5 dimension scales.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actfmt
from actfmt.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SLICE = (
    ROOT
    / "fixtures/valid/real_minilm_bf16_slice/Activations/sentence-transformers_all-MiniLM-L6-v2"
    / "SP_stdlib_docs_sample/EM"
)
SECTION = "## Reading without actfmt"

xr = pytest.importorskip("xarray")
ts = pytest.importorskip("tensorstore")
ml_dtypes = pytest.importorskip("ml_dtypes")
zarr = pytest.importorskip("zarr")
h5py = pytest.importorskip("h5py")


def section_blocks() -> list[tuple[str, str]]:
    """The (language, code) blocks of the README's section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(sh|python)\n(.*?)```", text[start:end], flags=re.S)


def run_cli(line: str) -> str:
    """One ``actfmt ...`` command line, run in process (CliRunner); its output (warnings)."""
    args = shlex.split(line.split("#", 1)[0])
    assert args[0] == "actfmt", line
    result = CliRunner().invoke(cli, [*args[1:], "-q"], catch_exceptions=False)
    assert result.exit_code == 0, (line, result.output)
    return result.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The section's conversions, run in a directory holding the slice's split ``EM``."""
    root = tmp_path_factory.mktemp("interop")
    shutil.copytree(SLICE, root / "EM")
    (sh,) = [code for lang, code in section_blocks() if lang == "sh"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for line in sh.splitlines():
            if line.strip():
                run_cli(line)
    return root


@pytest.fixture(scope="module")
def source() -> torch.Tensor:
    with actfmt.open(SLICE) as split:
        assert split.dtype == torch.bfloat16
        return split.layer(1)[:]


def as_torch(x: Any) -> torch.Tensor:
    """What a reader returned (numpy, ml_dtypes.bfloat16, torch) as a torch tensor of the same values."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def same_values(x: Any, ref: torch.Tensor) -> None:
    got = as_torch(x)
    assert tuple(got.shape) == tuple(ref.shape)
    if got.dtype == torch.bfloat16:  # bit for bit
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    else:  # float32: exactly the bfloat16 values, widened (NaN payloads included)
        assert got.dtype == torch.float32, got.dtype
        assert torch.equal(got.view(torch.int32), ref.float().view(torch.int32))


def python_blocks() -> list[str]:
    return [code for lang, code in section_blocks() if lang == "python"]


def test_the_section_has_a_block_per_library() -> None:
    blocks = python_blocks()
    for lib in ("tensorstore", "zarr", "xarray", "h5py", "safetensors", "torch", "actfmt"):
        assert any(re.search(rf"^(import|from) .*\b{lib}\b", b, flags=re.M) for b in blocks), lib
    assert len(blocks) >= 8


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_reader_gets_the_source_values(
    block: str, stores: Path, source: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(stores)
    ns: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. xarray's "consolidated metadata" warning
        exec(compile(block, "<README.md: Reading without actfmt>", "exec"), ns)
    assert "x" in ns, "the block must leave the layer in x"
    same_values(ns["x"], source)


@pytest.mark.parametrize("store", ["bf16/EM.zarr", "bf16-v2/EM.zarr"])
def test_bfloat16_zarr_is_refused_loudly_by_zarr_python_and_xarray(stores: Path, store: str) -> None:
    """Never the uint16 bits taken for numbers (the mean of real bf16 activations read as integers is ~32000)."""
    path = stores / store
    if not path.exists():  # the v2 bf16 store is not in the README: made here
        run_cli(f"actfmt convert {SLICE} {path.parent} --to zarr --zarr-format 2")
    with pytest.raises(ValueError, match="bfloat16"):
        zarr.open_group(str(path), mode="r")["layer_01"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconsolidated (see below): xarray warns, then refuses
        with pytest.raises(ValueError, match="bfloat16"):
            xr.open_zarr(str(path))
    # the group itself still opens in zarr-python: attributes, statistics, coordinates
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["split"] == "EM" and group.attrs["actfmt"]["complete"] is True
    assert list(np.asarray(group["example"][:])) == list(range(200))
    zf = 3 if (path / "zarr.json").exists() else 2
    driver = "zarr3" if zf == 3 else "zarr"
    with actfmt.open(path) as split:
        assert split.dtype == torch.bfloat16
        same_values(split.layer(1)[:], split.layer(1)[:])
    arr = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(path / "layer_01")}}).result()
    assert arr.dtype == ts.bfloat16
    with actfmt.open(SLICE) as src:
        same_values(arr.read().result(), src.layer(1)[:])


@pytest.mark.parametrize("store", ["f32/EM.zarr", "f32-v2/EM.zarr"])
def test_float32_zarr_in_xarray(stores: Path, store: str, source: torch.Tensor) -> None:
    path = stores / store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(str(path))
    assert list(ds.data_vars) == ["layer_00", "layer_01", "layer_02"]
    assert {name: ds[name].dims for name in ds.data_vars} == {
        name: ("example", "hidden") for name in ds.data_vars
    }
    assert ds["example"].dtype == np.int64 and list(ds["example"].values) == list(range(200))
    assert list(ds["hidden"].values) == list(range(384))
    assert ds.attrs["actfmt"]["cast_from"] == {f"layer_0{i}": "bfloat16" for i in range(3)}
    same_values(ds["layer_01"].values, source)
    # the true mean, not the mean of bit patterns
    assert float(ds["layer_01"].mean()) == pytest.approx(float(source.double().mean()), rel=1e-5)
    if (path / "zarr.json").exists():
        doc = json.loads((path / "zarr.json").read_text())
        meta = doc["consolidated_metadata"]["metadata"]
        assert [k for k in meta if "/" not in k] == [
            "actfmt_stats",
            "example",
            "hidden",
            "layer_00",
            "layer_01",
            "layer_02",
        ]
        assert meta["layer_01"]["dimension_names"] == ["example", "hidden"]
    else:
        meta = json.loads((path / ".zmetadata").read_text())["metadata"]
        assert meta["layer_01/.zattrs"]["_ARRAY_DIMENSIONS"] == ["example", "hidden"]
        assert meta[".zattrs"]["actfmt"]["complete"] is True


@pytest.mark.skipif(not shutil.which("h5dump"), reason="hdf5-tools (h5dump) not installed")
def test_h5dump_shows_the_encoding_and_the_dimensions(stores: Path) -> None:
    import subprocess

    out = subprocess.run(
        ["h5dump", "-A", "-d", "/layer_01", str(stores / "bf16/EM.h5")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'ATTRIBUTE "actfmt_encoding"' in out and "ml_dtypes.bfloat16" in out
    assert 'ATTRIBUTE "DIMENSION_LABELS"' in out and '"example"' in out and '"hidden"' in out


def test_hdf5_dimension_scales_and_marked_bits(stores: Path, source: torch.Tensor) -> None:
    with h5py.File(stores / "bf16/EM.h5", "r") as f:
        for name in ("layer_00", "layer_01", "layer_02"):
            d = f[name]
            assert [dim.label for dim in d.dims] == ["example", "hidden"]
            assert d.dims[0][0].name == "/example" and d.dims[1][0].name == "/hidden"
            assert d.attrs["actfmt_dtype"] == "bfloat16"
            assert "ml_dtypes.bfloat16" in d.attrs["actfmt_encoding"]
        assert list(f["example"][:]) == list(range(200)) and list(f["hidden"][:]) == list(range(384))
        assert f["example"].attrs["CLASS"] == b"DIMENSION_SCALE"


@pytest.mark.parametrize("lazy", [True, False])
def test_to_xarray_is_typed_and_ordered(stores: Path, source: torch.Tensor, lazy: bool) -> None:
    for store in ("bf16/EM.zarr", "bf16/EM.h5", "bf16/EM", "f32/EM.zarr"):
        with actfmt.open(stores / store) as split:
            ds = split.to_xarray(lazy=lazy)
            assert list(ds.data_vars) == ["layer_00", "layer_01", "layer_02"]
            assert ds["layer_01"].dims == ("example", "hidden")
            assert ds["layer_01"].dtype == np.float32
            assert ds["layer_01"].attrs["actfmt_dtype"] == ("float32" if "f32" in store else "bfloat16")
            assert ds.attrs["split"] == "EM"
            assert (type(ds["layer_01"].data).__module__.startswith("dask")) is lazy
            same_values(ds["layer_01"].values, source)


def test_to_xarray_float16_stays_float16(tmp_path: Path) -> None:
    out = run_cli(f"actfmt convert {SLICE} {tmp_path} --to zarr --dtype float16")
    assert "bfloat16 -> float16 (--dtype); not bit-exact" in out  # narrowing: said so
    with actfmt.open(tmp_path / "EM.zarr") as split:
        ds = split.to_xarray()
        assert ds["layer_00"].dtype == np.float16
        assert split.to_xarray(dtype="float32")["layer_00"].dtype == np.float32
        with pytest.raises(ValueError, match="float32"):
            split.to_xarray(dtype="float64")


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_zeros_stay_zeros_in_xarray(tmp_path: Path, zarr_format: int, dtype: str) -> None:
    """A v2 fill value is a missing-value marker to xarray: actfmt writes null, so a stored 0 is not NaN."""
    from actfmt.formats.base import WriteOptions
    from actfmt.formats.zarr import ZarrOptions, ZarrWriter
    from tests.formats.conformance import make_spec, write_split

    spec, data = make_spec(dtype, rows=50, hidden=8, layers=2, shard_rows=(50,))
    for t in data:
        t[::3] = 0.0
    path = tmp_path / "EM.zarr"
    write_split(
        ZarrWriter, path, spec, data, WriteOptions(format_options=ZarrOptions(zarr_format=zarr_format))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(str(path))
    for info, t in zip(spec.layers, data, strict=True):
        got = ds[info.name].values
        assert got.dtype == np.dtype(dtype) and bool((got[::3] == 0).all())
        as_int = np.int16 if dtype == "float16" else np.int32
        assert np.array_equal(got.view(as_int), t.numpy().view(as_int))  # bit for bit, zeros included
