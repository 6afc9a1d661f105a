from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from actfmt.checks import validate
from actfmt.errors import ChangedError, ConversionError, FormatError
from actfmt.formats import get_format
from actfmt.formats.base import WriteOptions
from actfmt.formats.hdf5 import HDF5Format, HDF5Reader, HDF5Writer, default_chunk_rows
from actfmt.storage import LocalLocation, Location, read_into, resolve

from .conformance import DTYPES, FormatConformance, bits, make_spec, upload, write_split

H5LS = shutil.which("h5ls")
H5DUMP = shutil.which("h5dump")
NO_TOOLS = "hdf5-tools (h5ls, h5dump) not installed: apt-get install hdf5-tools"


class TestHDF5Format(FormatConformance):
    format_name = "hdf5"
    compressions = (None, "none", "gzip", "lzf", "zstd")

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        with h5py.File(path, "r") as f:
            dset = f[layer_name]
            raw = dset[()]
            assert dset.attrs["actfmt_dtype"] == dtype
        expected = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}[dtype]
        assert raw.dtype == np.dtype(expected)
        return raw.view({"float16": np.int16, "bfloat16": np.int16, "float32": np.int32}[dtype])

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_independent_reader(self, root: Location, dtype: str, tmp_path: Path) -> None:
        # conformance.download writes a single-file store into tmp_path/downloaded/ without making it
        (tmp_path / "downloaded").mkdir(exist_ok=True)
        super().test_independent_reader(root, dtype, tmp_path)

    def test_missing_piece_is_noticed(self, root: Location) -> None:
        """An HDF5 split is one file, so no piece can be deleted: a chunk of layer_01 is never written instead
        (it would read back as zeros); validation must say so, at layer_01."""
        spec, data = make_spec("bfloat16")
        options = WriteOptions(chunk_rows=50)
        complete = self.write(root / "complete", spec, data, options)
        assert validate(complete).errors == 0
        path = self.dest(root / "gap")
        with tempfile.TemporaryDirectory() as tmp:  # written locally (and uploaded), as convert does
            local = path if root.is_local else self.dest(LocalLocation(tmp))
            w = HDF5Writer.create(local, spec, options)
            for pos, info in enumerate(spec.layers):
                for lo in range(0, info.rows, 50):
                    if (info.name, lo) != ("layer_01", 50):  # rows 50-99 of layer_01: never written
                        w.write(pos, lo, data[pos][lo : lo + 50])
                w.finish_layer(pos)
            w.finalize({"complete": True, "version": "test", "source_format": spec.source_format})
            w.close()
            if not root.is_local:
                upload(local, path)  # type: ignore[arg-type]
        with HDF5Format.open_reader(path) as r:
            assert r.missing_chunks(1) == ["layer_01/chunk 1 (rows 50-99)"]
        report = validate(path)
        assert report.errors > 0 and any("layer_01" in f.location for f in report.findings), report.findings

    def test_raw_rows_by_offset_on_every_storage(self, root: Location) -> None:
        """An uncompressed file is read by byte offset (ranged reads remotely), compressed through h5py."""
        for compression in ("none", "gzip"):
            path, _, data = self.roundtrip(
                root / compression, "float16", WriteOptions(compression=compression)
            )
            with HDF5Format.open_reader(path) as r:
                store = r._rows(1)
                assert (store is not None) == (compression == "none")
                if store is not None:
                    assert [s.location for s in store.segments] == [path]
                    runs = r.runs(1, 7, 9)
                    assert runs is not None and runs[0][0] == path
                idx = np.array([202, 7, 7, 0, 100])
                np.testing.assert_array_equal(bits(r.take(1, idx)), bits(data[1][torch.from_numpy(idx)]))
                np.testing.assert_array_equal(bits(r.read(1, 3, 170)), bits(data[1][3:170]))

    # -- layout ------------------------------------------------------------------------------------------
    def test_destination_and_detection(self, tmp_path: Path) -> None:
        root = LocalLocation(tmp_path)
        assert HDF5Format.destination(root / "EM") == root / "EM.h5"
        assert HDF5Format.destination(root / "EM.hdf5") == root / "EM.h5"
        path, _, _ = self.roundtrip(root, "float16")
        assert HDF5Format.can_open(path)
        other = path.with_name("copy.hdf5")
        shutil.copy(path, other)
        assert HDF5Format.can_open(other)
        unnamed = path.with_name("no_suffix")  # locally the name does not matter
        shutil.copy(path, unnamed)
        assert HDF5Format.can_open(unnamed)
        fake = root / "fake.h5"
        fake.write_bytes(b"not hdf5 at all")
        assert not HDF5Format.can_open(fake)
        assert not HDF5Format.can_open(root)
        assert not HDF5Format.can_open(root / "absent.h5")

    def test_detection_on_object_storage(self, tmp_path: Path) -> None:
        """Remotely only *.h5 / *.hdf5 objects are probed (a request per object would cost too much)."""
        path, _, _ = self.roundtrip(LocalLocation(tmp_path), "float16")
        remote = resolve(f"memory://actfmt-hdf5-{uuid.uuid4().hex[:12]}")
        raw = path.read_bytes()
        for name in ("EM.h5", "EM.HDF5", "EM.bin"):
            (remote / name).write_bytes(raw)
        (remote / "fake.h5").write_bytes(b"not hdf5 at all")
        assert HDF5Format.can_open(remote / "EM.h5") and HDF5Format.can_open(remote / "EM.HDF5")
        assert not HDF5Format.can_open(remote / "EM.bin")
        assert not HDF5Format.can_open(remote / "fake.h5")
        assert not HDF5Format.can_open(remote / "absent.h5")
        assert not HDF5Format.can_open(remote, remote.list_dir())
        with HDF5Format.open_reader(remote / "EM.h5") as r:
            assert r.actfmt is not None and r.actfmt["complete"] is True
        remote.delete_tree()

    def test_can_open_does_not_import_h5py(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(LocalLocation(tmp_path), "float16")
        code = (
            "import sys; from actfmt.storage import LocalLocation; from actfmt.formats.hdf5 import HDF5Format; "
            f"assert HDF5Format.can_open(LocalLocation({str(path)!r})); "
            "assert 'h5py' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)

    def test_root_attributes_and_datasets(self, tmp_path: Path) -> None:
        path, spec, _ = self.roundtrip(LocalLocation(tmp_path), "bfloat16", WriteOptions(chunk_rows=64))
        with h5py.File(path, "r") as f:
            keys = list(f.attrs)
            assert keys[: len(spec.metadata)] == list(spec.metadata)
            assert keys[-1] == "actfmt"  # written last
            assert f.attrs["model_name"] == "org/Model-1B"
            assert f.attrs["total_examples"] == 203
            flag = f.attrs["load_in_4bit"]
            assert isinstance(flag, np.bool_) and not flag
            assert json.loads(f.attrs["extra_key"]) == {"nested": [1, 2, 3]}
            block = json.loads(f.attrs["actfmt"])
            assert block["complete"] is True and block["requires_plugins"] == []
            for info in spec.layers:
                d = f[info.name]
                assert d.shape == (203, 24) and d.chunks == (64, 24)
                assert d.dtype == np.dtype("<u2") and d.attrs["actfmt_dtype"] == "bfloat16"
                assert list(d.attrs["actfmt_shard_rows"]) == [80, 80, 43]
                assert d.compression == "gzip" and d.compression_opts == 1 and d.shuffle
        with HDF5Reader(path) as r:
            assert [li.shard_rows for li in r.layers] == [(80, 80, 43)] * 3

    def test_metadata_exact_types(self, tmp_path: Path) -> None:
        spec, data = make_spec("float32", layers=1)
        spec.metadata.update(
            hidden_dim=None, note="null", ratio=0.5, flag=True, nested={"a": [None, 1.5, "x"]}, big=2**70
        )
        path = LocalLocation(tmp_path / "EM.h5")
        write_split(HDF5Writer, path, spec, data, WriteOptions())
        with HDF5Reader(path) as r:
            assert r.metadata == spec.metadata and list(r.metadata) == list(spec.metadata)
            assert r.metadata["hidden_dim"] is None and r.metadata["note"] == "null"
            assert r.metadata["flag"] is True
        # without the exact JSON copy (a file from another tool), the attributes still give the values
        with h5py.File(path, "r+") as f:
            del f.attrs["actfmt_metadata"]
        with HDF5Reader(path) as r:
            meta = r.metadata
        assert meta["flag"] is True and meta["ratio"] == 0.5 and meta["total_examples"] == 203
        assert meta["model_name"] == "org/Model-1B"

    def test_incomplete_without_finalize(self, tmp_path: Path) -> None:
        spec, data = make_spec("float16", layers=1)
        path = LocalLocation(tmp_path / "EM.h5")
        w = HDF5Writer.create(path, spec, WriteOptions())
        w.write(0, 0, data[0].numpy())  # a numpy array of the stored dtype, as convert hands over
        w.finish_layer(0)
        w.close()
        with HDF5Reader(path) as r:
            assert r.actfmt is None
            assert r.metadata == spec.metadata
            np.testing.assert_array_equal(bits(r.read(0)), bits(data[0]))

    def test_default_chunk_rows_and_blocks(self) -> None:
        assert default_chunk_rows(7049, 4096, 2) == 128  # 1 MiB
        assert default_chunk_rows(7049, 4096, 4) == 64
        assert default_chunk_rows(600, 384, 2) == 600  # capped at the rows
        assert default_chunk_rows(100_000, 384, 2) == 1024
        assert default_chunk_rows(0, 384, 2) == 1
        spec, _ = make_spec("bfloat16", rows=7049, hidden=4096, layers=1, shard_rows=(7049,))
        w = HDF5Writer(LocalLocation("unused.h5"), spec, WriteOptions())
        blocks = w.block_rows(0)
        assert sum(blocks) == 7049
        assert all(b % 128 == 0 for b in blocks[:-1])
        assert blocks[0] * 4096 * 2 == 48 << 20

    def test_blocks_not_chunk_aligned_still_exact(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16", layers=1)
        stored = bits(data[0]).view(np.uint16)  # the stored dtype: bfloat16 as its <u2 bits
        for compression in ("none", "gzip"):
            p = LocalLocation(tmp_path / f"{compression}.h5")
            w = HDF5Writer.create(p, spec, WriteOptions(chunk_rows=32, compression=compression))
            for k, (lo, hi) in enumerate([(0, 10), (10, 64), (64, 100), (100, 203)]):
                w.write(0, lo, data[0][lo:hi] if k % 2 else stored[lo:hi])  # torch tensors and numpy arrays
            w.finalize({"complete": True})
            with HDF5Reader(p) as r:
                np.testing.assert_array_equal(bits(r.read(0)), bits(data[0]))
                assert r.missing_chunks(0) == []

    def test_rejects_bad_options(self, tmp_path: Path) -> None:
        spec, _ = make_spec("float16", layers=1)
        root = LocalLocation(tmp_path)
        with pytest.raises(ConversionError, match="no compression 'brotli'"):
            HDF5Writer.create(root / "a.h5", spec, WriteOptions(compression="brotli"))
        with pytest.raises(ConversionError, match="out of range"):
            HDF5Writer.create(root / "b.h5", spec, WriteOptions(compression="gzip", level=12))
        with pytest.raises(ConversionError, match="takes no --level"):
            HDF5Writer.create(root / "c.h5", spec, WriteOptions(compression="lzf", level=3))
        bad, _ = make_spec("float16", layers=1)
        bad.layers[0] = type(bad.layers[0])("layer_00", 0, 203, 24, "int8")
        with pytest.raises(ConversionError, match="hdf5 stores only"):
            HDF5Writer.create(root / "d.h5", bad, WriteOptions())
        assert not any(tmp_path.iterdir())

    def test_write_path_does_not_import_torch(self, tmp_path: Path) -> None:
        code = (
            "import sys, numpy as np\n"
            "from actfmt.formats.base import LayerInfo, SplitSpec, WriteOptions\n"
            "from actfmt.formats.hdf5 import HDF5Writer\n"
            "from actfmt.storage import LocalLocation\n"
            "spec = SplitSpec({'a': 1}, [LayerInfo('layer_00', 0, 100, 8, 'bfloat16')])\n"
            "for c in ('gzip', 'none', 'lzf'):\n"
            f"    w = HDF5Writer.create(LocalLocation({str(tmp_path)!r} + f'/{{c}}.h5'), spec, WriteOptions(compression=c))\n"
            "    w.write(0, 0, np.arange(800, dtype='<u2').reshape(100, 8))\n"
            "    w.finalize({'complete': True})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        with HDF5Reader(LocalLocation(tmp_path / "lzf.h5")) as r:
            np.testing.assert_array_equal(r.read_array(0).reshape(-1), np.arange(800))

    def test_writer_refuses_object_storage(self) -> None:
        spec, _ = make_spec("float16", layers=1)
        remote = resolve(f"memory://actfmt-hdf5-{uuid.uuid4().hex[:12]}/EM.h5")
        with pytest.raises(ConversionError, match="local files only"):
            HDF5Writer.create(remote, spec, WriteOptions())
        assert not remote.exists()

    def test_writer_rejects_wrong_blocks(self, tmp_path: Path) -> None:
        spec, data = make_spec("float16", layers=1)
        w = HDF5Writer.create(LocalLocation(tmp_path / "EM.h5"), spec, WriteOptions())
        with pytest.raises(ConversionError, match="block of shape"):
            w.write(0, 0, np.zeros((3, 5), dtype="<f2"))
        with pytest.raises(ConversionError, match="outside"):
            w.write(0, 200, data[0][:10])
        with pytest.raises(ConversionError, match="layer_00"):
            w.write(0, 0, data[0].to(torch.float32))
        w.close()

    def test_gzip_level_recorded(self, tmp_path: Path) -> None:
        path, _, data = self.roundtrip(
            LocalLocation(tmp_path), "float32", WriteOptions(compression="gzip", level=4)
        )
        with h5py.File(path, "r") as f:
            assert f["layer_00"].compression_opts == 4
            np.testing.assert_array_equal(f["layer_02"][()].view(np.int32), bits(data[2]))

    def test_plugin_codec_is_recorded(self, tmp_path: Path) -> None:
        pytest.importorskip("hdf5plugin")
        root = LocalLocation(tmp_path)
        path, _, data = self.roundtrip(root, "bfloat16", WriteOptions(compression="blosc-zstd"))
        with HDF5Reader(path) as r:
            assert r.actfmt is not None and r.actfmt["requires_plugins"] == ["hdf5plugin"]
            np.testing.assert_array_equal(bits(r.read(1)), bits(data[1]))
        path2, _, _ = self.roundtrip(root / "lzf", "bfloat16", WriteOptions(compression="lzf"))
        with HDF5Reader(path2) as r:
            assert r.actfmt is not None and r.actfmt["requires_plugins"] == ["lzf"]

    def test_missing_hdf5plugin_message(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spec, _ = make_spec("float16", layers=1)
        monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # import fails
        with pytest.raises(ConversionError, match="pip install hdf5plugin"):
            HDF5Writer.create(LocalLocation(tmp_path / "z.h5"), spec, WriteOptions(compression="zstd"))

    # -- reads -------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("compression", ["none", "gzip"])
    def test_take_random_rows(self, tmp_path: Path, compression: str) -> None:
        path, _, data = self.roundtrip(
            LocalLocation(tmp_path), "bfloat16", WriteOptions(chunk_rows=16, compression=compression)
        )
        rng = np.random.default_rng(0)
        with HDF5Reader(path) as r:
            for idx in (rng.integers(0, 203, 50), np.arange(40, 90), np.array([7]), rng.permutation(203)):
                got = r.take(1, idx)
                assert got.dtype == torch.bfloat16 and got.is_contiguous()
                np.testing.assert_array_equal(bits(got), bits(data[1][torch.from_numpy(idx)]))
            with pytest.raises(IndexError):
                r.take(1, np.array([203]))

    def test_take_from_scattered_uncompressed_chunks(self, tmp_path: Path) -> None:
        spec, data = make_spec("float32", layers=1)
        path = LocalLocation(tmp_path / "EM.h5")
        w = HDF5Writer.create(path, spec, WriteOptions(chunk_rows=32, compression="none"))
        for lo in reversed(range(0, 203, 32)):  # chunks land in the file in reverse order
            w.write(0, lo, data[0][lo : lo + 32])
        w.finalize({"complete": True})
        idx = np.array([202, 0, 33, 33, 100, 5])
        with HDF5Reader(path) as r:
            store = r._rows(0)  # still read by offset, but chunk by chunk: not one run of the file
            assert store is not None and len(store.segments) == 7
            assert len(r.runs(0, 0, 203) or []) == 7
            np.testing.assert_array_equal(bits(r.take(0, idx)), bits(data[0][torch.from_numpy(idx)]))
            np.testing.assert_array_equal(bits(r.read(0, 20, 150)), bits(data[0][20:150]))
        path2, _, data2 = self.roundtrip(
            LocalLocation(tmp_path / "seq"), "float32", WriteOptions(chunk_rows=32, compression="none")
        )
        with HDF5Reader(path2) as r:
            store = r._rows(0)  # the writer lays chunks back to back: the layer is one run of the file
            assert store is not None and len(store.segments) == 1
            np.testing.assert_array_equal(bits(r.take(0, idx)), bits(data2[0][torch.from_numpy(idx)]))

    def test_runs_are_the_raw_rows(self, tmp_path: Path) -> None:
        root = LocalLocation(tmp_path)
        path, _, data = self.roundtrip(
            root / "none", "bfloat16", WriteOptions(chunk_rows=32, compression="none")
        )
        with HDF5Reader(path) as r:
            runs = r.runs(1, 10, 150)
            assert runs is not None and len(runs) == 1
            loc, offset, length = runs[0]
            assert loc == path and length == 140 * 24 * 2
            buf = np.empty((140, 24), dtype="<u2")
            read_into([(loc, offset, buf.reshape(-1).view(np.uint8))])
            np.testing.assert_array_equal(buf.view(np.int16), bits(data[1][10:150]))
            assert r.runs(1, 0, 0) == []
        gz, _, _ = self.roundtrip(root / "gzip", "bfloat16", WriteOptions(chunk_rows=32))
        with HDF5Reader(gz) as r:
            assert r.runs(1, 10, 150) is None and r._rows(1) is None

    def test_other_tools_layouts(self, tmp_path: Path) -> None:
        """Contiguous, compact, big-endian and partly chunked datasets read right (by offset where raw)."""
        g = np.random.default_rng(1)
        a = g.standard_normal((50, 8)).astype("<f4")
        path = tmp_path / "other.h5"
        with h5py.File(path, "w") as f:
            f["layer_00"] = a  # contiguous
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.COMPACT)  # stored inside the object header: no offset
            tid = h5py.h5t.py_create(np.dtype("<f2"))
            compact = h5py.h5d.create(f.id, b"layer_01", tid, h5py.h5s.create_simple((2, 8)), dcpl=dcpl)
            h5py.Dataset(compact)[...] = a[:2].astype("<f2")
            f["layer_02"] = a.astype(">f4")  # big endian: not the stored dtype
            f.create_dataset("layer_03", data=a, chunks=(8, 4))  # chunks of half rows
            f.attrs["model_name"] = "m"
        with HDF5Reader(LocalLocation(path)) as r:
            assert r._rows(0) is not None and r._rows(1) is None and r._rows(2) is None and r._rows(3) is None
            assert [li.dtype for li in r.layers] == ["float32", "float16", "float32", "float32"]
            assert r.metadata == {"model_name": "m"} and r.actfmt is None
            idx = np.array([49, 3, 3, 0])
            for pos, want in enumerate([a, a[:2].astype("<f2"), a, a]):
                np.testing.assert_array_equal(r.read_array(pos), want)
                np.testing.assert_array_equal(r.read_array(pos, 1, 2), want[1:2])
                sel = idx[idx < len(want)]
                np.testing.assert_array_equal(r.take_array(pos, sel), want[sel])

    def test_gzip_chunks_inflated_by_actfmt(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """gzip layers written by h5py itself (deflate alone, or shuffle + deflate; 2- and 4-byte values; a
        partial last chunk) are inflated by actfmt, not by HDF5's filter, and equal what h5py reads; layouts it
        does not decode itself (chunks of half rows, another filter in the pipeline) still read right."""
        import actfmt.formats.hdf5 as mod

        g = np.random.default_rng(2)
        a = g.standard_normal((203, 16)).astype("<f4")
        path = tmp_path / "gz.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("layer_00", data=a, chunks=(32, 16), compression="gzip", shuffle=True)
            f.create_dataset(
                "layer_01", data=a.astype("<f2"), chunks=(50, 16), compression="gzip", shuffle=False
            )
            f.create_dataset(
                "layer_02", data=a.astype("<f2"), chunks=(7, 16), compression="gzip", shuffle=True
            )
            f.create_dataset("layer_03", data=a, chunks=(32, 8), compression="gzip", shuffle=True)
            f.create_dataset("layer_04", data=a, chunks=(32, 16), compression="gzip", fletcher32=True)
        wants = [a, a.astype("<f2"), a.astype("<f2"), a, a]
        inflated: list[int] = []
        real = mod.HDF5Reader._inflate_rows

        def spy(self: HDF5Reader, layer: int, start: int, stop: int, out: np.ndarray) -> bool:
            done = real(self, layer, start, stop, out)
            if done:
                inflated.append(layer)
            return done

        monkeypatch.setattr(mod.HDF5Reader, "_inflate_rows", spy)
        with HDF5Reader(LocalLocation(path)) as r:
            for pos, want in enumerate(wants):
                for lo, hi in [(0, 203), (0, 1), (31, 33), (5, 200), (196, 203), (100, 100)]:
                    got = r.read_array(pos, lo, hi)
                    assert got.tobytes() == want[lo:hi].tobytes(), (pos, lo, hi)
        assert set(inflated) == {0, 1, 2}

    def test_corrupt_gzip_chunk_is_an_error_not_wrong_rows(self, tmp_path: Path) -> None:
        """A damaged gzip chunk is an error naming the layer, the rows and the damage, whether actfmt inflates
        it (a full read) or HDF5's filter does (a few random rows); it never said "install hdf5plugin"."""
        a = np.arange(64 * 16, dtype="<f4").reshape(64, 16)
        path = tmp_path / "bad.h5"
        with h5py.File(path, "w") as f:
            d = f.create_dataset("layer_00", data=a, chunks=(32, 16), compression="gzip", shuffle=True)
            offset = d.id.get_chunk_info(1).byte_offset
        with open(path, "r+b") as fh:
            fh.seek(offset + 10)
            fh.write(b"\xff" * 16)
        with HDF5Reader(LocalLocation(path)) as r:
            assert r.read_array(0, 0, 32).tobytes() == a[:32].tobytes()
            with pytest.raises(
                FormatError, match=r"layer_00: the chunk of rows 32-63 cannot be decoded.*damaged"
            ):
                r.read_array(0)
            with pytest.raises(FormatError, match=r"layer_00: a chunk cannot be decoded.*damaged") as info:
                r.take_array(0, [40, 3])
            assert "hdf5plugin" not in str(info.value)

    def test_file_replaced_after_open_gives_the_old_rows_or_an_error(self, tmp_path: Path) -> None:
        root = LocalLocation(tmp_path)
        path, _, data = self.roundtrip(root, "float16", WriteOptions(compression="none"))
        with HDF5Reader(path) as r:
            np.testing.assert_array_equal(bits(r.read(0, 0, 3)), bits(data[0][:3]))
            path.delete()
            self.roundtrip(root, "float16", WriteOptions(compression="none"), rows=150, shard_rows=(150,))
            try:
                got = r.read(1, 0, 3)
            except ChangedError as exc:
                assert "changed" in str(exc)
            else:  # the file it opened (kept open) still holds the old rows: those, never the new file's
                np.testing.assert_array_equal(bits(got), bits(data[1][:3]))

    @pytest.mark.parametrize("compression", ["none", "gzip"])
    def test_reader_pickles(self, tmp_path: Path, compression: str) -> None:
        path, _, data = self.roundtrip(
            LocalLocation(tmp_path), "bfloat16", WriteOptions(chunk_rows=32, compression=compression)
        )
        with HDF5Reader(path) as r:
            np.testing.assert_array_equal(bits(r.read(2, 0, 5)), bits(data[2][:5]))
            clone = pickle.loads(pickle.dumps(r))
        with clone:
            assert clone._file is None
            np.testing.assert_array_equal(bits(clone.read(2, 30, 90)), bits(data[2][30:90]))
            # the offsets of an uncompressed layer travel with the reader: no h5py in the worker for it
            assert (clone._file is None) == (compression == "none")
            np.testing.assert_array_equal(bits(clone.take(1, [5, 200, 5])), bits(data[1][[5, 200, 5]]))

    # -- missing chunks ----------------------------------------------------------------------------------
    def test_missing_chunks(self, tmp_path: Path) -> None:
        spec, data = make_spec("float16", layers=2)
        path = LocalLocation(tmp_path / "EM.h5")
        w = HDF5Writer.create(path, spec, WriteOptions(chunk_rows=32, compression="none"))
        w.write(0, 0, data[0])
        w.write(1, 0, data[1][:64])  # chunks 0, 1
        w.write(1, 96, data[1][96:])  # chunks 3..6; chunk 2 (rows 64-95) never written
        w.finalize({"complete": True})
        with HDF5Reader(path) as r:
            assert r.missing_chunks(0) == []
            assert r.missing_chunks(1) == ["layer_01/chunk 2 (rows 64-95)"]
            assert r._rows(0) is not None and r._rows(1) is None  # a missing chunk reads as zeros, via HDF5
            np.testing.assert_array_equal(bits(r.read(1, 60, 100))[4:36], 0)
            np.testing.assert_array_equal(bits(r.take(1, np.array([65, 3])))[1], bits(data[1][3]))
        partial = LocalLocation(tmp_path / "partial.h5")
        w = HDF5Writer.create(partial, spec, WriteOptions(chunk_rows=100))
        w.write(0, 0, data[0][:100])
        w.close()
        with HDF5Reader(partial) as r:
            assert r.missing_chunks(0) == [
                "layer_00/chunk 1 (rows 100-199)",
                "layer_00/chunk 2 (rows 200-202)",
            ]
            assert len(r.missing_chunks(1)) == 3

    # -- independent tools -------------------------------------------------------------------------------
    @pytest.mark.slow
    def test_default_file_needs_no_plugin(self, tmp_path: Path) -> None:
        path, spec, data = self.roundtrip(LocalLocation(tmp_path), "bfloat16")
        empty = tmp_path / "no_plugins"
        empty.mkdir()
        code = (
            "import sys, h5py, numpy as np\n"
            "assert 'hdf5plugin' not in sys.modules\n"
            f"f = h5py.File({str(path)!r}, 'r')\n"
            "for k in sorted(k for k in f if k.startswith('layer_')): sys.stdout.write(k + ' ' + str(int(f[k][()].astype(np.int64).sum())) + '\\n')\n"
        )
        env = {"HDF5_PLUGIN_PATH": str(empty), "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        expected = [
            f"{info.name} {int(bits(d).view(np.uint16).astype(np.int64).sum())}"
            for info, d in zip(spec.layers, data, strict=True)
        ]
        assert out.stdout.split("\n")[:-1] == expected

    @pytest.mark.slow
    def test_stock_hdf5_tools_read_default_file(self, tmp_path: Path) -> None:
        if not (H5LS and H5DUMP):
            pytest.skip(NO_TOOLS)
        path, _, data = self.roundtrip(
            LocalLocation(tmp_path), "float32", rows=100, layers=2, shard_rows=(100,)
        )
        ls = subprocess.run([H5LS, "-r", str(path)], capture_output=True, text=True, check=True).stdout
        assert "/layer_00" in ls and "/layer_01" in ls and "{100, 24}" in ls
        header = subprocess.run([H5DUMP, "-H", str(path)], capture_output=True, text=True, check=True).stdout
        assert 'ATTRIBUTE "actfmt"' in header and 'ATTRIBUTE "model_name"' in header
        assert header.count("H5T_IEEE_F32LE") == 2 and "H5T_STD_U16LE" not in header
        # the data itself, through stock HDF5's shuffle + deflate filters, as raw little-endian bytes
        out = tmp_path / "layer_01.bin"
        subprocess.run(
            [H5DUMP, "-d", "/layer_01", "-b", "LE", "-o", str(out), str(path)],
            capture_output=True,
            check=True,
        )
        np.testing.assert_array_equal(np.fromfile(out, dtype="<i4").reshape(100, 24), bits(data[1]))

    @pytest.mark.slow
    def test_h5dump_needs_plugin_for_lzf(self, tmp_path: Path) -> None:
        if not H5DUMP:
            pytest.skip(NO_TOOLS)
        spec, data = make_spec("float16", rows=200, layers=1)
        data = [torch.zeros_like(data[0])]  # compressible: LZF really applies
        path = tmp_path / "EM.h5"
        write_split(HDF5Writer, path, spec, data, WriteOptions(compression="lzf"))
        dump = subprocess.run(
            [H5DUMP, "-d", "/layer_00", str(path)],
            capture_output=True,
            text=True,
            env={"HDF5_PLUGIN_PATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        )
        assert (
            dump.returncode != 0 or "unable to print data" in dump.stderr
        )  # why the actfmt block records requires_plugins: ["lzf"]


def test_uncompressed_layers_are_contiguous_and_read_by_offset(tmp_path: Path) -> None:
    spec, data = make_spec("bfloat16")
    path = tmp_path / "EM.h5"
    write_split(HDF5Writer, path, spec, data, WriteOptions(compression="none"))
    with h5py.File(path, "r") as f:
        for info in spec.layers:
            d = f[info.name]
            assert d.chunks is None and d.compression is None and d.id.get_storage_size() == info.nbytes
    with HDF5Reader(LocalLocation(path)) as r:
        for pos in range(3):
            assert r.runs(pos, 0, 203) is not None  # by byte offset: a single run each
            assert len(r.runs(pos, 0, 203) or []) == 1
            np.testing.assert_array_equal(bits(r.read(pos)), bits(data[pos]))
    if H5DUMP:
        out = subprocess.run([H5DUMP, "-H", "-p", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "CONTIGUOUS" in out.stdout


def test_registered() -> None:
    assert get_format("hdf5") is HDF5Format and get_format("h5") is HDF5Format
    assert HDF5Format.compressions[0] == "gzip"
    assert HDF5Format.parallel_layers is False and HDF5Format.single_file is True
    # chunked layers go through HDF5, one writer; contiguous (uncompressed) ones are written at their offsets
    assert not HDF5Format.writes_in_parallel(WriteOptions()) and not HDF5Format.writes_in_parallel(
        WriteOptions(compression="none", chunk_rows=64)
    )
    assert HDF5Format.writes_in_parallel(WriteOptions(compression="none"))
    assert HDF5Format.remote_read is True and HDF5Format.remote_write is False
    assert HDF5Format.writer_class() is HDF5Writer


def test_real_sample_roundtrip(tmp_path: Path) -> None:
    src = Path(__file__).parents[3] / "shared/data/real-minilm-bf16/Activations"
    splits = sorted(src.glob("*/*/EM"))
    if not splits:
        pytest.skip("real sample ../shared/data/real-minilm-bf16 not present")
    from actfmt.formats.pt import PtReader

    with PtReader(LocalLocation(splits[0])) as r:
        from actfmt.formats.base import SplitSpec

        spec = SplitSpec(metadata=dict(r.metadata), layers=list(r.layers))
        data = [r.read(i) for i in range(len(r.layers))]
    path = LocalLocation(tmp_path / "EM.h5")
    write_split(HDF5Writer, path, spec, data, WriteOptions())
    with HDF5Reader(path) as h:
        assert h.metadata == spec.metadata
        for i, d in enumerate(data):
            np.testing.assert_array_equal(bits(h.read(i)), bits(d))
    raw = sum(d.numel() * 2 for d in data)
    assert raw / path.size() > 1.2  # gzip+shuffle on real bf16 activations (1.38x measured)
