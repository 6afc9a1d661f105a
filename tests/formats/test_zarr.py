from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from actfmt.errors import ConversionError, NotASplitError
from actfmt.formats import get_format, guess_format
from actfmt.formats.base import LayerInfo, SplitSpec, WriteOptions
from actfmt.formats.zarr import COMPRESSIONS as NAMES
from actfmt.formats.zarr import ZarrFormat, ZarrOptions, ZarrReader, ZarrWriter, default_chunk_rows
from actfmt.storage import LocalLocation, Location

from .conformance import FormatConformance, bits, download, make_spec, upload, write_split

zarr = pytest.importorskip("zarr")

REAL = Path(__file__).resolve().parents[3] / "shared/data/real-minilm-bf16/Activations"

COMPRESSIONS = (None, "none", "zstd", "blosc-zstd", "lz4", "gzip")
METADATA_NAMES = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}


def zarr_bits(path: Path, layer_name: str, dtype: str) -> np.ndarray:
    """The layer's raw bits as an independent reader reads them: zarr-python, or for bfloat16 (the
    zarr-extensions data type, which zarr-python 3.1 refuses) tensorstore, which returns ``bfloat16``."""
    if dtype == "bfloat16":
        ts = pytest.importorskip("tensorstore")
        driver = "zarr3" if (path / "zarr.json").exists() else "zarr"
        spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path / layer_name)}}
        arr = ts.open(spec, open=True, read=True).result()
        assert arr.dtype == ts.bfloat16
        return np.asarray(arr.read().result()).view(np.int16)
    arr = zarr.open_group(str(path), mode="r")[layer_name]
    raw = np.asarray(arr[:])
    return raw.view(np.int32 if dtype == "float32" else np.int16)


def drop_async_filesystems() -> None:
    """zarr-python's ``FsspecStore.from_url`` makes an asynchronous S3 filesystem, which fsspec caches and
    nothing closes (s3fs closes only synchronous instances when they are collected).  The s3 fixture clears
    fsspec's cache after each test; collect the instance here, quietly, rather than in whichever later test
    the garbage collector happens to run in (where its unclosed-session warning would be an error)."""
    import gc
    import warnings

    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    s3fs.S3FileSystem.clear_instance_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def fill(writer: ZarrWriter, spec: SplitSpec, data: list[torch.Tensor]) -> None:
    for pos in range(len(spec.layers)):
        start = 0
        for n in writer.block_rows(pos):
            writer.write(pos, start, data[pos][start : start + n])
            start += n


class TestZarrFormat(FormatConformance):
    format_name = "zarr"
    compressions: ClassVar[tuple[str | None, ...]] = COMPRESSIONS

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        return zarr_bits(path, layer_name, dtype)

    def a_piece_of(self, store: Location, layer_name: str) -> Location:
        """The first chunk object of the layer."""
        keys = sorted(k for k in (store / layer_name).find() if k.rsplit("/", 1)[-1] not in METADATA_NAMES)
        assert keys, f"{store / layer_name} has no chunk"
        return store / layer_name / keys[0]

    @pytest.mark.parametrize("compression", ["none", None])
    def test_deleted_chunk_is_reported(self, root: Location, compression: str | None, tmp_path: Path) -> None:
        path, _, data = self.roundtrip(root, "bfloat16", WriteOptions(chunk_rows=50, compression=compression))
        with ZarrReader(path) as r:
            assert [r.missing_chunks(p) for p in range(3)] == [[], [], []]
            v3 = r.describe()["zarr_format"] == 3
        key = "layer_01/c.2.0" if v3 else "layer_01/2.0"
        (path / key).delete(missing_ok=False)
        with ZarrReader(path) as r:
            assert r.missing_chunks(1) == [key]
            assert r.missing_chunks(0) == [] and r.missing_chunks(2) == []
            # like zarr-python, the missing rows read as the fill value; the other rows are intact
            got = r.read(1)
            assert bool((bits(got[100:150]) == 0).all())
            np.testing.assert_array_equal(bits(got[:100]), bits(data[1][:100]))
            np.testing.assert_array_equal(bits(got[150:]), bits(data[1][150:]))
            assert bool((bits(r.take(1, np.array([120, 3]))[0]) == 0).all())
            np.testing.assert_array_equal(bits(r.take(1, np.array([120, 3]))[1]), bits(data[1][3]))
        local = download(path, tmp_path / "downloaded" / path.name)
        assert bool((zarr_bits(local, "layer_01", "bfloat16")[100:150] == 0).all())

    def test_damaged_chunk_raises(self, root: Location) -> None:
        from actfmt.errors import FormatError

        path, _, _ = self.roundtrip(
            root, "float16", WriteOptions(compression="none", chunk_rows=50), layers=1
        )
        with ZarrReader(path) as r:
            v3 = r.describe()["zarr_format"] == 3
        chunk = path / ("layer_00/c.1.0" if v3 else "layer_00/1.0")
        chunk.write_bytes(chunk.read_bytes()[:100])
        with ZarrReader(path) as r, pytest.raises(FormatError, match="c.1.0" if v3 else "1.0"):
            r.read(0)
        path, _, _ = self.roundtrip(root / "blosc", "float16", WriteOptions(chunk_rows=50), layers=1)
        chunk = path / ("layer_00/c.1.0" if v3 else "layer_00/1.0")
        chunk.write_bytes(chunk.read_bytes()[:30])
        with ZarrReader(path) as r, pytest.raises(FormatError, match="c.1.0" if v3 else "1.0"):
            r.read(0)

    @pytest.mark.parametrize("compression", ["none", None])
    def test_take_reads_rows_in_order_with_repeats(self, root: Location, compression: str | None) -> None:
        path, _, data = self.roundtrip(
            root, "bfloat16", WriteOptions(chunk_rows=16, compression=compression), layers=1
        )
        rng = np.random.default_rng(0)
        idx = rng.integers(0, 203, size=300)
        with ZarrReader(path) as r:
            np.testing.assert_array_equal(bits(r.take(0, idx)), bits(data[0][torch.from_numpy(idx)]))
            np.testing.assert_array_equal(bits(r.take(0, np.sort(idx))), bits(data[0][np.sort(idx)]))
            with pytest.raises(IndexError):
                r.take(0, np.array([203]))

    def test_layers_written_concurrently(self, root: Location) -> None:
        """convert writes different layers from different threads on one writer (or one per worker)."""
        from concurrent.futures import ThreadPoolExecutor

        spec, data = make_spec("float16", rows=203, hidden=24, layers=4, shard_rows=(203,))
        options = self.options(WriteOptions(chunk_rows=8))
        path = self.dest(root)
        w = ZarrWriter.create(path, spec, options)
        other = ZarrWriter.open(path, spec, options)  # as a worker would

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
        w.close()
        other.close()
        with ZarrReader(path) as r:
            assert r.actfmt == {"complete": True, "dtype": {li.name: "float16" for li in spec.layers}}
            for p in range(4):
                np.testing.assert_array_equal(bits(r.read(p)), bits(data[p]))
        assert (path / ("zarr.json" if ZarrOptions.of(options).zarr_format == 3 else ".zgroup")).is_file()

    def test_store_written_by_zarr_python_is_read(self, root: Location, tmp_path: Path) -> None:
        """A store actfmt did not write (zarr's own codec pipeline, chunks not spanning the hidden dimension)
        is read through zarr-python, locally and from object storage."""
        t = torch.randn(70, 16).to(torch.bfloat16)
        local = tmp_path / "x.zarr"
        zf = ZarrOptions.of(self.options(WriteOptions())).zarr_format
        g = zarr.create_group(str(local), attributes={"model_name": "m"}, zarr_format=zf)
        a = g.create_array(
            "layer_00",
            shape=(70, 16),
            chunks=(16, 8),
            dtype="uint16",
            attributes={"actfmt_dtype": "bfloat16"},
        )
        a[:] = t.view(torch.int16).numpy().view(np.uint16)
        b = g.create_array("layer_01", shape=(70, 16), chunks=(32, 16), dtype="float32")
        b[:] = np.arange(70 * 16, dtype=np.float32).reshape(70, 16)
        if root.is_local:
            path: Location = LocalLocation(local)
        else:
            path = root / "x.zarr"
            upload(LocalLocation(local), path)
        with ZarrReader(path) as r:
            assert r.metadata == {"model_name": "m"} and r.actfmt is None
            assert [li.dtype for li in r.layers] == ["bfloat16", "float32"]
            assert r.describe()["compression"] == "other"
            np.testing.assert_array_equal(bits(r.read(0, 5, 60)), bits(t[5:60]))
            np.testing.assert_array_equal(bits(r.take(0, np.array([69, 0, 33, 0]))), bits(t[[69, 0, 33, 0]]))
            assert r.read(1, 10, 12)[1, 3].item() == 11 * 16 + 3
            assert r.runs(0, 0, 10) is None
        if not root.is_local:
            drop_async_filesystems()

    def options(self, options: WriteOptions) -> WriteOptions:
        return options


class TestZarrV2Format(TestZarrFormat):
    """The same suite on Zarr v2 stores."""

    def options(self, options: WriteOptions) -> WriteOptions:
        options.format_options = ZarrOptions(zarr_format=2)
        return options

    def roundtrip(self, root: Location | Path, dtype: str, options: WriteOptions | None = None, **kw):
        options = self.options(options or WriteOptions())
        path, spec, data = super().roundtrip(root, dtype, options, **kw)
        assert (path / ".zgroup").is_file() and not (path / "zarr.json").exists()
        return path, spec, data


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_read_by_zarr_python(
    tmp_path: Path, zarr_format: int, compression: str | None
) -> None:
    spec, data = make_spec("float16", rows=203, hidden=24, layers=2)
    path = tmp_path / "EM.zarr"
    write_split(
        ZarrWriter,
        path,
        spec,
        data,
        WriteOptions(
            compression=compression, chunk_rows=40, format_options=ZarrOptions(zarr_format=zarr_format)
        ),
    )
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == zarr_format
    for pos, info in enumerate(spec.layers):
        arr = group[info.name]
        assert arr.dtype == np.dtype("float16")
        assert arr.attrs["actfmt_dtype"] == "float16"
        np.testing.assert_array_equal(np.asarray(arr[:]).view(np.int16), bits(data[pos]))
    # bfloat16 is the zarr-extensions data type: zarr-python 3.1 refuses it loudly, never reads integers
    bf = tmp_path / "bf.zarr"
    bf_spec, bf_data = make_spec("bfloat16", rows=203, hidden=24, layers=1)
    write_split(
        ZarrWriter,
        bf,
        bf_spec,
        bf_data,
        WriteOptions(
            compression=compression, chunk_rows=40, format_options=ZarrOptions(zarr_format=zarr_format)
        ),
    )
    with pytest.raises(ValueError, match="bfloat16"):
        zarr.open_group(str(bf), mode="r")["layer_00"]
    np.testing.assert_array_equal(zarr_bits(bf, "layer_00", "bfloat16"), bits(bf_data[0]))
    if compression != "none":
        codec_names = json.dumps(
            group["layer_00"].metadata.to_dict()["codecs" if zarr_format == 3 else "compressor"]
        )
        assert ("blosc" if compression in (None, "blosc-zstd", "lz4") else compression) in codec_names
    else:
        assert group["layer_00"].compressors == ()
        # uncompressed chunks are the raw bytes (edge chunk padded to the full chunk)
        chunk = path / "layer_00" / ("c.0.0" if zarr_format == 3 else "0.0")
        assert chunk.read_bytes() == bits(data[0][:40]).tobytes()
        last = path / "layer_00" / ("c.5.0" if zarr_format == 3 else "5.0")
        assert last.stat().st_size == 40 * 24 * 2


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_metadata_documents_are_what_zarr_python_writes(
    tmp_path: Path, zarr_format: int, compression: str | None
) -> None:
    """Every document actfmt writes is byte for byte the one zarr-python 3.1 writes for the same group and
    arrays (made here with zarr-python's own API)."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    spec, _ = make_spec("bfloat16", layers=1)
    spec.metadata["nan"] = float("nan")
    spec.layers += [
        LayerInfo("layer_01", 1, 203, 24, "float16"),
        LayerInfo("layer_02", 2, 203, 24, "float32"),
    ]
    ours = tmp_path / "ours.zarr"
    ZarrWriter.create(
        LocalLocation(ours),
        spec,
        WriteOptions(compression=compression, format_options=ZarrOptions(zarr_format=zarr_format)),
    )
    theirs = tmp_path / "theirs.zarr"
    group = zarr.create_group(str(theirs), zarr_format=zarr_format, attributes=spec.metadata)
    for info in spec.layers:
        size = info.itemsize
        comp: object = {
            None: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=size, blocksize=512 << 10),
            "blosc-zstd": BloscCodec(
                cname="zstd", clevel=1, shuffle="shuffle", typesize=size, blocksize=512 << 10
            ),
            "lz4": BloscCodec(
                cname="lz4", clevel=5, shuffle="bitshuffle", typesize=size, blocksize=512 << 10
            ),
            "zstd": ZstdCodec(level=1),
            "gzip": GzipCodec(level=1),
            "none": None,
        }[compression]
        if zarr_format == 2 and comp is not None:
            import numcodecs

            comp = {
                BloscCodec: lambda c: numcodecs.Blosc(
                    cname=c.cname.value,
                    clevel=c.clevel,
                    shuffle=1 if c.shuffle.value == "shuffle" else 2,
                    blocksize=c.blocksize,
                ),
                ZstdCodec: lambda c: numcodecs.Zstd(level=c.level),
                GzipCodec: lambda c: numcodecs.GZip(level=c.level),
            }[type(comp)](comp)
        attrs: dict[str, object] = {"actfmt_dtype": info.dtype}
        if info.shard_rows:
            attrs["actfmt_shard_rows"] = list(info.shard_rows)
        if zarr_format == 2:
            attrs["_ARRAY_DIMENSIONS"] = ["example", "hidden"]
        extra: dict[str, object] = (
            {
                "dimension_names": ("example", "hidden"),
                "chunk_key_encoding": {"name": "default", "separator": "."},
            }
            if zarr_format == 3
            else {"order": "C"}
        )
        group.create_array(
            info.name,
            shape=(info.rows, info.hidden_dim),
            chunks=(default_chunk_rows(info.rows, info.hidden_dim, info.itemsize), info.hidden_dim),
            dtype={"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}[info.dtype],
            compressors=comp,
            filters=None,
            fill_value=None if zarr_format == 2 else 0,
            attributes=attrs,
            **extra,
        )
    for dim, n in (("example", 203), ("hidden", 24)):  # the coordinates, for xarray
        coord = group.create_array(
            dim,
            shape=(n,),
            chunks=(n,),
            dtype="<i8",
            compressors=None,
            filters=None,
            fill_value=None if zarr_format == 2 else 0,
            attributes={"_ARRAY_DIMENSIONS": [dim]} if zarr_format == 2 else {},
            **(
                {"dimension_names": (dim,), "chunk_key_encoding": extra["chunk_key_encoding"]}
                if zarr_format == 3
                else {"order": "C"}
            ),
        )
        coord[:] = np.arange(n)
    files = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    for f in files:
        expected = (theirs / f).read_bytes()
        if f.startswith("layer_00/.zarray"):  # bfloat16: zarr-python 3.1 has no such data type (made as <u2)
            expected = expected.replace(b'"dtype": "<u2"', b'"dtype": "bfloat16"')
        elif f.startswith("layer_00/zarr.json"):
            expected = expected.replace(b'"data_type": "uint16"', b'"data_type": "bfloat16"')
            expected = expected.replace(b'"fill_value": 0,', b'"fill_value": 0.0,')
        assert (ours / f).read_bytes() == expected, f


def test_default_compression_is_blosc_zstd_byte_shuffle(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    doc = json.loads((path / "layer_00" / "zarr.json").read_text())
    assert [c["name"] for c in doc["codecs"]] == ["bytes", "blosc"]
    conf = doc["codecs"][1]["configuration"]
    assert (conf["cname"], conf["clevel"], conf["shuffle"], conf["typesize"]) == ("zstd", 1, "shuffle", 2)
    assert NAMES[0] == "blosc-zstd" and ZarrFormat.compressions == NAMES


def test_level_overrides_and_bad_options_refused(tmp_path: Path) -> None:
    spec, data = make_spec("float32", layers=1)
    path = tmp_path / "a.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(compression="zstd", level=7))
    doc = json.loads((path / "layer_00" / "zarr.json").read_text())
    assert doc["codecs"][1] == {"name": "zstd", "configuration": {"level": 7, "checksum": False}}
    with pytest.raises(ConversionError, match="lzf"):
        ZarrWriter.create(LocalLocation(tmp_path / "b.zarr"), spec, WriteOptions(compression="lzf"))
    with pytest.raises(ConversionError, match="out of range"):
        ZarrWriter.create(
            LocalLocation(tmp_path / "c.zarr"), spec, WriteOptions(compression="gzip", level=12)
        )
    with pytest.raises(ConversionError, match="zarr-format"):
        ZarrWriter.create(
            LocalLocation(tmp_path / "d.zarr"), spec, WriteOptions(format_options=ZarrOptions(zarr_format=4))
        )
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "d.zarr").exists()
    with pytest.raises(ConversionError, match="already exists"):
        ZarrWriter.create(LocalLocation(path), spec, WriteOptions())


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_attrs_hold_metadata_verbatim_then_actfmt(tmp_path: Path, zarr_format: int) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    w = ZarrWriter.create(
        LocalLocation(path), spec, WriteOptions(format_options=ZarrOptions(zarr_format=zarr_format))
    )
    # before finalize: the producer's keys and no actfmt block (an interrupted conversion is not complete)
    assert dict(zarr.open_group(str(path), mode="r").attrs) == spec.metadata
    with ZarrReader(LocalLocation(path)) as r:
        assert r.actfmt is None
    fill(w, spec, data)
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
    write_split(
        ZarrWriter,
        path,
        spec,
        data,
        WriteOptions(chunk_rows=32, format_options=ZarrOptions(zarr_format=zarr_format)),
    )
    group = zarr.open_group(str(path), mode="r")
    for info in spec.layers:
        assert group[info.name].shape == (203, 24)
        assert group[info.name].chunks == (32, 24)
        assert group[info.name].dtype == np.dtype("float16")
    with ZarrReader(LocalLocation(path)) as r:
        assert r.chunk_rows == [32, 32, 32]
        assert [r.chunk_rows_of(p) for p in range(3)] == [32, 32, 32]


@pytest.mark.parametrize("compression", ["none", None])
def test_fingerprint_changes_when_a_chunk_does(root: Location, compression: str | None) -> None:
    spec, data = make_spec("float16", layers=2)
    path = root / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions(chunk_rows=32, compression=compression))
    with ZarrReader(path) as r:
        before = [r.fingerprint(p) for p in range(2)]
        assert before == [r.fingerprint(p) for p in range(2)] and before[0] != before[1]
    chunk = path / "layer_01" / "c.3.0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with ZarrReader(path) as r:
        assert r.fingerprint(0) == before[0] and r.fingerprint(1) != before[1]
    chunk.delete()
    with ZarrReader(path) as r:
        assert r.fingerprint(1) not in before


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(7049, 4096, 2) == 256  # 2 MiB
    assert default_chunk_rows(7049, 4096, 4) == 128
    assert default_chunk_rows(7049, 384, 2) == 2048
    assert default_chunk_rows(600, 384, 2) == 600  # capped at the rows
    assert default_chunk_rows(0, 384, 2) == 1
    assert default_chunk_rows(5, 10**7, 4) == 1


def test_block_rows_are_whole_chunks(tmp_path: Path) -> None:
    spec = SplitSpec(metadata={}, layers=[LayerInfo("layer_00", 0, 10_000, 4096, "bfloat16")])
    w = ZarrWriter.create(LocalLocation(tmp_path / "EM.zarr"), spec, WriteOptions(chunk_rows=64))
    blocks = w.block_rows(0)
    assert sum(blocks) == 10_000
    # ~32 MiB blocks of whole 64-row chunks (512 KiB each): 64 chunks = 4096 rows; the last block the rest
    assert blocks == [4096, 4096, 1808]
    with pytest.raises(ValueError, match="whole chunks"):
        w.write(0, 10, torch.zeros(64, 4096, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="whole chunks"):
        w.write(0, 0, torch.zeros(100, 4096, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="whole chunks"):
        w.write(0, 0, np.zeros((100, 4096), dtype=np.uint16))
    with pytest.raises(ValueError, match="float16"):  # a block of another dtype
        w.write(0, 0, torch.zeros(64, 4096, dtype=torch.float16))


def test_block_rows_follow_source_shards(tmp_path: Path) -> None:
    """When the chunks divide every source shard but the last, each block is one source shard."""
    spec = SplitSpec(metadata={}, layers=[LayerInfo("layer_00", 0, 203, 24, "bfloat16", (80, 80, 43))])
    for chunk_rows, expected in ((16, [80, 80, 43]), (40, [80, 80, 43]), (80, [80, 80, 43]), (50, [203])):
        w = ZarrWriter.create(
            LocalLocation(tmp_path / f"{chunk_rows}.zarr"), spec, WriteOptions(chunk_rows=chunk_rows)
        )
        assert w.block_rows(0) == expected, chunk_rows
    # the shard boundaries are written as blocks, and read back right
    _, data = make_spec("bfloat16", layers=1)
    path = LocalLocation(tmp_path / "EM.zarr")
    w = ZarrWriter.create(path, spec, WriteOptions(chunk_rows=16, compression="none"))
    fill(w, spec, data)
    with ZarrReader(path) as r:
        assert r.layers[0].shard_rows == (80, 80, 43)
        np.testing.assert_array_equal(bits(r.read(0)), bits(data[0]))


def test_writer_takes_numpy_blocks(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16", layers=1)
    path = LocalLocation(tmp_path / "EM.zarr")
    w = ZarrWriter.create(path, spec, WriteOptions(chunk_rows=32))
    raw = bits(data[0]).view(np.uint16)
    start = 0
    for n in w.block_rows(0):
        w.write(0, start, raw[start : start + n])
        start += n
    with ZarrReader(path) as r:
        got = r.read_array(0)
        assert got.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(got, raw)
        np.testing.assert_array_equal(bits(r.read(0)), bits(data[0]))


@pytest.mark.parametrize("target", ["local", "memory"])
@pytest.mark.parametrize("source", ["local", "memory"])
def test_runs_are_copied_into_uncompressed_chunks(
    tmp_path: Path, source: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uncompressed store copies the source's raw byte runs into its whole chunks (in the kernel locally)
    when it is handed them; object storage (no copy_range) writes the block from memory instead."""
    import uuid

    from actfmt.storage import OutputFile, resolve
    from actfmt.storage.local import LocalOutput

    def place(kind: str, name: str) -> Location:
        if kind == "local":
            return LocalLocation(tmp_path / name)
        return resolve(f"memory://actfmt-runs-{uuid.uuid4().hex[:12]}/{name}")

    copied: list[tuple[str, int, int]] = []
    real_copy = LocalOutput.copy_range

    def spy(self: OutputFile, src: Location, offset: int, length: int, at: int | None = None) -> None:
        copied.append((str(src), offset, length))
        real_copy(self, src, offset, length, at)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalOutput, "copy_range", spy)
    spec, data = make_spec("float16", layers=1)
    src = place(source, "src.zarr")
    write_split(ZarrWriter, src, spec, data, WriteOptions(chunk_rows=16, compression="none"))
    dst = place(target, "dst.zarr")
    w = ZarrWriter.create(dst, spec, WriteOptions(chunk_rows=40, compression="none"))
    assert w.block_rows(0) == [80, 80, 43]  # the source's shards: 2 chunks each
    with ZarrReader(src) as r:
        start = 0
        for n in w.block_rows(0):
            runs = r.runs(0, start, start + n)
            assert runs is not None and sum(length for _, _, length in runs) == n * 24 * 2
            w.write(0, start, r.read_array(0, start, start + n), runs=runs)
            start += n
        assert r.runs(0, 200, 203) == [(src / "layer_00" / "c.12.0", 8 * 48, 3 * 48)]
    w.finalize({"complete": True})
    if dst.supports_copy_range:
        # chunks 0-4 (rows 0-199) are copies of the source's 16-row chunks, cut at 40-row boundaries, and the
        # edge chunk 5 holds a copy of the last 3 rows, padded with zeros
        assert sum(length for _, _, length in copied) == 203 * 48
        assert copied[:4] == [
            (str(src / "layer_00/c.0.0"), 0, 16 * 48),
            (str(src / "layer_00/c.1.0"), 0, 16 * 48),
            (str(src / "layer_00/c.2.0"), 0, 8 * 48),
            (str(src / "layer_00/c.2.0"), 8 * 48, 8 * 48),
        ]
    else:
        assert copied == []
    with ZarrReader(dst) as r2:
        np.testing.assert_array_equal(bits(r2.read(0)), bits(data[0]))
    assert (dst / "layer_00" / "c.5.0").size() == 40 * 24 * 2  # the edge chunk padded


def test_missing_array_metadata_drops_the_layer(tmp_path: Path) -> None:
    spec, data = make_spec("float32")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    LocalLocation(path / "layer_02").delete_tree()
    with ZarrReader(LocalLocation(path)) as r:
        assert [li.name for li in r.layers] == ["layer_00", "layer_01"]


def test_shard_rows_survive(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    with ZarrReader(LocalLocation(path)) as r:
        assert [li.shard_rows for li in r.layers] == [(80, 80, 43)] * 3


def test_can_open_and_destination(tmp_path: Path) -> None:
    spec, data = make_spec("float16", layers=1)
    for zf in (2, 3):
        path = LocalLocation(tmp_path / f"v{zf}" / "EM.zarr")
        write_split(ZarrWriter, path, spec, data, WriteOptions(format_options=ZarrOptions(zarr_format=zf)))
        assert ZarrFormat.can_open(path)
        assert ZarrFormat.can_open(path, path.list_dir())
        assert guess_format(path) == "zarr"
        assert not ZarrFormat.can_open(path / "layer_00")  # an array is not a split
    assert not ZarrFormat.can_open(LocalLocation(tmp_path))
    assert not ZarrFormat.can_open(LocalLocation(tmp_path / "nope"))
    assert not ZarrFormat.can_open(LocalLocation(tmp_path / "v3" / "EM.zarr" / "zarr.json"))
    damaged = LocalLocation(tmp_path / "damaged.zarr")
    damaged.mkdir()
    (damaged / "zarr.json").write_bytes(b"{not json")
    assert ZarrFormat.can_open(damaged)  # a damaged store is still a store
    from actfmt.errors import MetadataError

    with ZarrReader(damaged) as r, pytest.raises(MetadataError, match="not valid JSON"):
        _ = r.metadata
    assert ZarrFormat.destination(LocalLocation("a/b/EM")) == Path("a/b/EM.zarr")
    assert ZarrFormat.destination(LocalLocation("a/b/EM.h5")) == Path("a/b/EM.zarr")
    assert get_format("zarr") is ZarrFormat
    assert (ZarrFormat.remote_read, ZarrFormat.remote_write, ZarrFormat.parallel_layers) == (True, True, True)
    with pytest.raises(NotASplitError):
        ZarrReader(LocalLocation(tmp_path))
    with pytest.raises(NotASplitError):
        ZarrReader(LocalLocation(tmp_path / "nope"))


@pytest.mark.skipif(not REAL.is_dir(), reason="the shared real sample is not here")
def test_real_sample_roundtrip(tmp_path: Path) -> None:
    from actfmt.formats.pt import PtReader

    split = next(p for p in sorted(REAL.glob("*/*/*")) if p.is_dir())
    with PtReader(LocalLocation(split)) as src:
        spec = SplitSpec(metadata=dict(src.metadata), layers=list(src.layers))
        data = [src.read(p) for p in range(len(spec.layers))]
    path = tmp_path / "EM.zarr"
    write_split(ZarrWriter, path, spec, data, WriteOptions())
    with ZarrReader(LocalLocation(path)) as r:
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
                WriteOptions(
                    format_options=ZarrOptions(zarr_format=zf), compression=compression, chunk_rows=50
                ),
            )
            arr = ts.open(
                {"driver": driver, "kvstore": {"driver": "file", "path": str(path / "layer_00")}}
            ).result()
            got = np.asarray(arr.read().result())
            np.testing.assert_array_equal(got.view(np.int16), bits(data[0]))


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
            ZarrWriter,
            path,
            spec,
            data,
            WriteOptions(compression=compression, chunk_rows=64, format_options=ZarrOptions(zarr_format=zf)),
        )
        with ZarrReader(LocalLocation(path)) as r:
            assert r.describe() == {"chunks": [64, 24], "compression": expected, "zarr_format": zf}


def test_neither_writer_nor_reader_imports_zarr_python(tmp_path: Path) -> None:
    """``import actfmt.formats.zarr`` imports neither numpy nor zarr; writing and reading a store actfmt wrote
    never imports zarr-python."""
    script = f"""
import sys
import actfmt.formats.zarr as z
assert "numpy" not in sys.modules and "zarr" not in sys.modules, sorted(sys.modules)
import numpy as np
from actfmt.formats.base import LayerInfo, SplitSpec, WriteOptions
from actfmt.storage import LocalLocation
spec = SplitSpec(metadata={{"a": 1}}, layers=[LayerInfo("layer_00", 0, 100, 8, "bfloat16")])
for zf in (2, 3):
    for compression in ("none", None):
        loc = LocalLocation({str(tmp_path)!r}) / f"{{zf}}-{{compression}}.zarr"
        w = z.ZarrWriter.create(loc, spec, WriteOptions(chunk_rows=16, format_options=z.ZarrOptions(zarr_format=zf), compression=compression))
        rows = np.arange(800, dtype=np.uint16).reshape(100, 8)
        start = 0
        for n in w.block_rows(0):
            w.write(0, start, rows[start : start + n])
            start += n
        w.finalize({{"complete": True}})
        w.close()
        with z.ZarrFormat.open_reader(loc) as r:
            assert (r.read_array(0) == rows).all() and (r.take_array(0, [99, 3]) == rows[[99, 3]]).all()
            assert r.missing_chunks(0) == []
assert "zarr" not in sys.modules and "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_stores_of_earlier_versions_bf16_as_uint16_still_read(tmp_path: Path, zarr_format: int) -> None:
    """Before the ``bfloat16`` data type, bf16 layers were ``uint16`` + ``actfmt_dtype``: still read bit for bit."""
    spec, data = make_spec("bfloat16", rows=203, hidden=24, layers=2)
    path = tmp_path / "EM.zarr"
    write_split(
        ZarrWriter,
        path,
        spec,
        data,
        WriteOptions(chunk_rows=64, format_options=ZarrOptions(zarr_format=zarr_format)),
    )
    for info in spec.layers:
        doc_path = path / info.name / ("zarr.json" if zarr_format == 3 else ".zarray")
        doc = json.loads(doc_path.read_text())
        if zarr_format == 3:
            assert doc["data_type"] == "bfloat16"
            doc["data_type"], doc["fill_value"] = "uint16", 0
        else:
            assert doc["dtype"] == "bfloat16"
            doc["dtype"] = "<u2"
        doc_path.write_text(json.dumps(doc, indent=2))
    with ZarrReader(LocalLocation(path)) as r:
        assert [li.dtype for li in r.layers] == ["bfloat16", "bfloat16"]
        for pos in range(2):
            np.testing.assert_array_equal(bits(r.read(pos)), bits(data[pos]))
    arr = zarr.open_group(str(path), mode="r", use_consolidated=False)["layer_01"]
    assert arr.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(np.asarray(arr[:]).view(np.int16), bits(data[1]))
