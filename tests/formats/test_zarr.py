from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from actfmt.errors import ConversionError, NotASplitError
from actfmt.formats import get_format, guess_format
from actfmt.formats.base import WriteOptions
from actfmt.formats.zarr_ import ZarrFormat, ZarrReader, ZarrWriter, default_chunk_rows

from .conformance import FormatConformance, bits, make_spec, write_split

zarr = pytest.importorskip("zarr")

REAL = Path(__file__).resolve().parents[3] / "shared/data/real-minilm-bf16/Activations"

COMPRESSIONS = (None, "none", "zstd", "blosc-zstd", "lz4", "gzip")


def zarr_bits(path: Path, layer_name: str, dtype: str) -> np.ndarray:
    """The layer's raw bits as zarr-python reads them (bf16 arrives as its uint16 bits)."""
    arr = zarr.open_group(str(path), mode="r")[layer_name]
    raw = np.asarray(arr[:])
    return raw.view(np.int32 if dtype == "float32" else np.int16)


class TestZarrFormat(FormatConformance):
    format_name = "zarr"
    compressions: ClassVar[tuple[str | None, ...]] = COMPRESSIONS

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        return zarr_bits(path, layer_name, dtype)


class TestZarrV2Format(TestZarrFormat):
    """The same suite on Zarr v2 stores."""

    def roundtrip(self, tmp_path: Path, dtype: str, options: WriteOptions | None = None, **kw):
        options = options or WriteOptions()
        options.zarr_format = 2
        path, spec, data = super().roundtrip(tmp_path, dtype, options, **kw)
        assert (path / ".zgroup").is_file() and not (path / "zarr.json").exists()
        return path, spec, data


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_read_by_zarr_python(
    tmp_path: Path, zarr_format: int, compression: str | None
) -> None:
    spec, data = make_spec("bfloat16", rows=203, hidden=24, layers=2)
    path = tmp_path / "EM.zarr"
    write_split(
        ZarrWriter,
        path,
        spec,
        data,
        WriteOptions(compression=compression, chunk_rows=40, zarr_format=zarr_format),
    )
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == zarr_format
    for pos, info in enumerate(spec.layers):
        arr = group[info.name]
        assert arr.dtype == np.dtype("uint16")
        assert arr.attrs["actfmt_dtype"] == "bfloat16"
        np.testing.assert_array_equal(np.asarray(arr[:]).view(np.int16), bits(data[pos]))
    if compression != "none":
        codec_names = json.dumps(
            group["layer_00"].metadata.to_dict()["codecs" if zarr_format == 3 else "compressor"]
        )
        assert ("blosc" if compression in (None, "blosc-zstd", "lz4") else compression) in codec_names
    else:
        assert group["layer_00"].compressors == ()
        # uncompressed chunks are the raw bytes (edge chunk padded to the full chunk)
        chunk = path / "layer_00" / ("c/0/0" if zarr_format == 3 else "0.0")
        assert chunk.read_bytes() == bits(data[0][:40]).tobytes()
        last = path / "layer_00" / ("c/5/0" if zarr_format == 3 else "5.0")
        assert last.stat().st_size == 40 * 24 * 2


def test_default_compression_is_blosc_zstd_byte_shuffle(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    doc = json.loads((path / "layer_00" / "zarr.json").read_text())
    assert [c["name"] for c in doc["codecs"]] == ["bytes", "blosc"]
    conf = doc["codecs"][1]["configuration"]
    assert (conf["cname"], conf["clevel"], conf["shuffle"], conf["typesize"]) == ("zstd", 1, "shuffle", 2)


def test_level_overrides_and_bad_options_refused(tmp_path: Path) -> None:
    spec, data = make_spec("float32", layers=1)
    path = tmp_path / "a.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(compression="zstd", level=7))
    doc = json.loads((path / "layer_00" / "zarr.json").read_text())
    assert doc["codecs"][1] == {"name": "zstd", "configuration": {"level": 7, "checksum": False}}
    with pytest.raises(ConversionError, match="lzf"):
        ZarrWriter.create(tmp_path / "b.zarr", spec, WriteOptions(compression="lzf"))
    with pytest.raises(ConversionError, match="out of range"):
        ZarrWriter.create(tmp_path / "c.zarr", spec, WriteOptions(compression="gzip", level=12))
    with pytest.raises(ConversionError, match="zarr-format"):
        ZarrWriter.create(tmp_path / "d.zarr", spec, WriteOptions(zarr_format=4))
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_attrs_hold_metadata_verbatim_then_actfmt(tmp_path: Path, zarr_format: int) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    w = ZarrWriter.create(path, spec, WriteOptions(zarr_format=zarr_format))
    # before finalize: the producer's keys and no actfmt block (an interrupted conversion is not complete)
    assert dict(zarr.open_group(str(path), mode="r").attrs) == spec.metadata
    with ZarrReader(path) as r:
        assert r.actfmt is None
    for pos in range(len(spec.layers)):
        start = 0
        for n in w.block_rows(pos):
            w.write(pos, start, data[pos][start : start + n])
            start += n
    w.finalize({"version": "t", "checksums": {"layer_00": "x"}, "complete": True})
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    assert list(attrs) == [*spec.metadata, "actfmt"]
    assert {k: attrs[k] for k in spec.metadata} == spec.metadata
    block = attrs["actfmt"]
    assert block["complete"] is True and block["checksums"] == {"layer_00": "x"}
    assert block["dtype"] == {li.name: "bfloat16" for li in spec.layers}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_chunk_shape_is_rows_by_full_hidden(tmp_path: Path, zarr_format: int) -> None:
    spec, data = make_spec("float16", rows=203, hidden=24)
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(chunk_rows=32, zarr_format=zarr_format))
    group = zarr.open_group(str(path), mode="r")
    for info in spec.layers:
        assert group[info.name].shape == (203, 24)
        assert group[info.name].chunks == (32, 24)
        assert group[info.name].dtype == np.dtype("float16")
    with ZarrReader(path) as r:
        assert r.chunk_rows == [32, 32, 32]


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(7049, 4096, 2) == 256  # 2 MiB
    assert default_chunk_rows(7049, 4096, 4) == 128
    assert default_chunk_rows(7049, 384, 2) == 2048
    assert default_chunk_rows(600, 384, 2) == 600  # capped at the rows
    assert default_chunk_rows(0, 384, 2) == 1
    assert default_chunk_rows(5, 10**7, 4) == 1


def test_block_rows_are_whole_chunks(tmp_path: Path) -> None:
    from actfmt.formats.base import LayerInfo, SplitSpec

    spec = SplitSpec(metadata={}, layers=[LayerInfo("layer_00", 0, 10_000, 4096, "bfloat16")])
    w = ZarrWriter.create(tmp_path / "EM.zarr", spec, WriteOptions(chunk_rows=64))
    blocks = w.block_rows(0)
    assert sum(blocks) == 10_000
    # ~32 MiB blocks of whole 64-row chunks (512 KiB each): 64 chunks = 4096 rows; the last block the rest
    assert blocks == [4096, 4096, 1808]
    with pytest.raises(ValueError, match="whole chunks"):
        w.write(0, 10, torch.zeros(64, 4096, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="whole chunks"):
        w.write(0, 0, torch.zeros(100, 4096, dtype=torch.bfloat16))


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("compression", ["none", None])
def test_deleted_chunk_is_reported(tmp_path: Path, zarr_format: int, compression: str | None) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    write_split(
        ZarrWriter,
        path,
        spec,
        data,
        WriteOptions(chunk_rows=50, zarr_format=zarr_format, compression=compression),
    )
    with ZarrReader(path) as r:
        assert [r.missing_chunks(p) for p in range(3)] == [[], [], []]
    key = "layer_01/c/2/0" if zarr_format == 3 else "layer_01/2.0"
    (path / key).unlink()
    with ZarrReader(path) as r:
        assert r.missing_chunks(1) == [key]
        assert r.missing_chunks(0) == [] and r.missing_chunks(2) == []
        # like zarr-python, the missing rows read as the fill value; the other rows are intact
        got = r.read(1)
        assert bool((bits(got[100:150]) == 0).all())
        np.testing.assert_array_equal(bits(got[:100]), bits(data[1][:100]))
        np.testing.assert_array_equal(bits(got[150:]), bits(data[1][150:]))
        assert bool((bits(r.take(1, np.array([120, 3]))[0]) == 0).all())
    assert bool((np.asarray(zarr.open_group(str(path), mode="r")["layer_01"][100:150]) == 0).all())


def test_missing_array_metadata_drops_the_layer(tmp_path: Path) -> None:
    spec, data = make_spec("float32")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    shutil.rmtree(path / "layer_02")
    with ZarrReader(path) as r:
        assert [li.name for li in r.layers] == ["layer_00", "layer_01"]


def test_shard_rows_survive(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    with ZarrReader(path) as r:
        assert [li.shard_rows for li in r.layers] == [(80, 80, 43)] * 3


def test_damaged_chunk_raises(tmp_path: Path) -> None:
    spec, data = make_spec("float16", layers=1)
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(compression="none", chunk_rows=50))
    chunk = path / "layer_00/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    from actfmt.errors import FormatError

    with ZarrReader(path) as r, pytest.raises(FormatError, match="c/1/0"):
        r.read(0)


def test_can_open_and_destination(tmp_path: Path) -> None:
    spec, data = make_spec("float16", layers=1)
    for zf in (2, 3):
        path = tmp_path / f"v{zf}" / "EM.zarr"
        write_split(ZarrWriter, path, spec, data, WriteOptions(zarr_format=zf))
        assert ZarrFormat.can_open(path)
        assert guess_format(path) == "zarr"
        assert not ZarrFormat.can_open(path / "layer_00")  # an array is not a split
    assert not ZarrFormat.can_open(tmp_path)
    assert not ZarrFormat.can_open(tmp_path / "nope")
    assert ZarrFormat.destination(Path("a/b/EM")) == Path("a/b/EM.zarr")
    assert ZarrFormat.destination(Path("a/b/EM.h5")) == Path("a/b/EM.zarr")
    assert get_format("zarr") is ZarrFormat
    with pytest.raises(NotASplitError):
        ZarrReader(tmp_path)


def test_store_written_by_zarr_python_is_read(tmp_path: Path) -> None:
    """A store actfmt did not write (zarr's own codec pipeline, a transpose-free but filtered layout)."""
    t = torch.randn(70, 16).to(torch.bfloat16)
    g = zarr.create_group(str(tmp_path / "x.zarr"), attributes={"model_name": "m"})
    a = g.create_array(
        "layer_00", shape=(70, 16), chunks=(16, 8), dtype="uint16", attributes={"actfmt_dtype": "bfloat16"}
    )
    a[:] = t.view(torch.int16).numpy().view(np.uint16)
    b = g.create_array("layer_01", shape=(70, 16), chunks=(32, 16), dtype="float32")
    b[:] = np.arange(70 * 16, dtype=np.float32).reshape(70, 16)
    with ZarrReader(tmp_path / "x.zarr") as r:
        assert r.metadata == {"model_name": "m"} and r.actfmt is None
        assert [li.dtype for li in r.layers] == ["bfloat16", "float32"]
        np.testing.assert_array_equal(bits(r.read(0, 5, 60)), bits(t[5:60]))
        np.testing.assert_array_equal(bits(r.take(0, np.array([69, 0, 33, 0]))), bits(t[[69, 0, 33, 0]]))
        assert r.read(1, 10, 12)[1, 3].item() == 11 * 16 + 3


@pytest.mark.parametrize("compression", ["none", None])
def test_take_reads_rows_in_order_with_repeats(tmp_path: Path, compression: str | None) -> None:
    spec, data = make_spec("bfloat16", rows=203, hidden=24, layers=1)
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(chunk_rows=16, compression=compression))
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 203, size=300)
    with ZarrReader(path) as r:
        np.testing.assert_array_equal(bits(r.take(0, idx)), bits(data[0][torch.from_numpy(idx)]))
        with pytest.raises(IndexError):
            r.take(0, np.array([203]))


@pytest.mark.skipif(not REAL.is_dir(), reason="the shared real sample is not here")
def test_real_sample_roundtrip(tmp_path: Path) -> None:
    from actfmt.formats.pt import PtReader

    split = next(p for p in sorted(REAL.glob("*/*/*")) if p.is_dir())
    with PtReader(split) as src:
        from actfmt.formats.base import SplitSpec

        spec = SplitSpec(metadata=dict(src.metadata), layers=list(src.layers))
        data = [src.read(p) for p in range(len(spec.layers))]
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    with ZarrReader(path) as r:
        assert r.metadata == spec.metadata
        for p in range(len(spec.layers)):
            np.testing.assert_array_equal(bits(r.read(p)), bits(data[p]))
            np.testing.assert_array_equal(zarr_bits(path, spec.layers[p].name, "bfloat16"), bits(data[p]))
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.parent.name != "EM.zarr")
    assert sum(li.nbytes for li in spec.layers) / stored > 1.3  # the default codec compresses real bf16


def test_tensorstore_reads_it(tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore")
    spec, data = make_spec("bfloat16", layers=1)
    for zf, driver in ((3, "zarr3"), (2, "zarr")):
        for compression in COMPRESSIONS:
            path = tmp_path / f"{zf}-{compression}" / "EM.zarr"
            write_split(
                ZarrWriter,
                path,
                spec,
                data,
                WriteOptions(zarr_format=zf, compression=compression, chunk_rows=50),
            )
            arr = ts.open(
                {"driver": driver, "kvstore": {"driver": "file", "path": str(path / "layer_00")}}
            ).result()
            got = np.asarray(arr.read().result())
            np.testing.assert_array_equal(got.view(np.int16), bits(data[0]))


def test_layers_written_concurrently(tmp_path: Path) -> None:
    """convert writes different layers from different threads on one writer."""
    from concurrent.futures import ThreadPoolExecutor

    spec, data = make_spec("float16", rows=203, hidden=24, layers=4, shard_rows=(203,))
    path = tmp_path / "EM.zarr"
    w = ZarrWriter.create(path, spec, WriteOptions(chunk_rows=8))
    other = ZarrWriter.open(path, spec, WriteOptions(chunk_rows=8))  # as a worker would

    def one(pos: int) -> None:
        wr = w if pos % 2 else other
        start = 0
        for n in wr.block_rows(pos):
            wr.write(pos, start, data[pos][start : start + n])
            start += n
        wr.finish_layer(pos)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(4)))
    w.finalize({"complete": True})
    with ZarrReader(path) as r:
        for p in range(4):
            np.testing.assert_array_equal(bits(r.read(p)), bits(data[p]))
    assert os.path.isfile(path / "zarr.json")


@pytest.mark.parametrize(
    ("compression", "expected"),
    [
        (None, "blosc-zstd level 1 (shuffle)"),
        ("none", "none"),
        ("lz4", "blosc-lz4 level 5 (bitshuffle)"),
        ("zstd", "zstd level 1"),
        ("gzip", "gzip level 1"),
    ],
)
def test_describe_names_the_codec(tmp_path: Path, compression: str | None, expected: str) -> None:
    spec, data = make_spec("float32", layers=1)
    for zf in (2, 3):
        path = tmp_path / f"{zf}.zarr"
        write_split(
            ZarrWriter, path, spec, data, WriteOptions(compression=compression, chunk_rows=64, zarr_format=zf)
        )
        with ZarrReader(path) as r:
            assert r.describe() == {"chunks": [64, 24], "compression": expected, "zarr_format": zf}
