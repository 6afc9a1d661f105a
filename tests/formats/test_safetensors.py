from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from actfmt.errors import ConversionError, CorruptShardError, MetadataError
from actfmt.formats import find_splits, get_format, guess_format, open_reader
from actfmt.formats.base import WriteOptions
from actfmt.formats.safetensors import TENSOR, SafetensorsFormat, SafetensorsReader, SafetensorsWriter
from actfmt.storage import Location, resolve

from .conformance import FormatConformance, bits, make_spec, write_split

REAL = Path("/work/shared/data/real-minilm-bf16/Activations")


class TestSafetensorsFormat(FormatConformance):
    format_name = "safetensors"
    compressions = (None, "none")

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        tensors = load_file(str(path / f"{layer_name}.safetensors"))
        assert list(tensors) == [TENSOR]
        t = tensors[TENSOR]
        assert t.dtype == getattr(torch, dtype)
        return bits(t)

    def a_piece_of(self, store: Location, layer_name: str) -> Location:
        return store / f"{layer_name}.safetensors"

    # -- the file as the safetensors library sees it -------------------------------------------------------
    @pytest.mark.parametrize(("dtype", "st"), [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
    def test_safe_open_one_tensor_right_dtype(self, tmp_path: Path, dtype: str, st: str) -> None:
        path, _, data = self.roundtrip(tmp_path, dtype)
        files = sorted(path.glob("*.safetensors"))
        assert [f.name for f in files] == [
            "layer_00.safetensors",
            "layer_01.safetensors",
            "layer_02.safetensors",
        ]
        for f, expected in zip(files, data, strict=True):
            with safe_open(str(f), framework="pt") as fh:
                assert list(fh.keys()) == [TENSOR]
                sl = fh.get_slice(TENSOR)
                assert sl.get_dtype() == st
                assert sl.get_shape() == [203, 24]
                np.testing.assert_array_equal(bits(sl[10:77]), bits(expected[10:77]))

    def test_header_alignment_and_metadata(self, tmp_path: Path) -> None:
        path, spec, _ = self.roundtrip(tmp_path, "bfloat16")
        for info in spec.layers:
            raw = (path / f"{info.name}.safetensors").read_bytes()
            n = int.from_bytes(raw[:8], "little")
            assert n % 8 == 0
            header_text = raw[8 : 8 + n].decode("utf-8")
            assert header_text.startswith("{")
            assert header_text.rstrip(" ") == header_text.strip()  # padded with spaces only, at the end
            header = json.loads(header_text)
            assert header[TENSOR] == {"dtype": "BF16", "shape": [203, 24], "data_offsets": [0, 203 * 24 * 2]}
            assert len(raw) == 8 + n + 203 * 24 * 2
            with safe_open(str(path / f"{info.name}.safetensors"), framework="pt") as fh:
                meta = fh.metadata()
            assert meta["format"] == "pt"
            assert meta["actfmt.layer"] == info.name
            embedded = json.loads(meta["metadata.json"])
            assert embedded == spec.metadata and list(embedded) == list(spec.metadata)

    def test_metadata_json_layout(self, tmp_path: Path) -> None:
        path, spec, _ = self.roundtrip(tmp_path, "float16")
        on_disk = json.loads((path / "metadata.json").read_text())
        assert list(on_disk) == [*spec.metadata, "actfmt"]  # producer keys verbatim, then the block last
        assert {k: on_disk[k] for k in spec.metadata} == spec.metadata
        assert on_disk["actfmt"]["complete"] is True
        with open_reader(path) as r:
            assert "actfmt" not in r.metadata
            assert r.format == "safetensors"

    def test_partial_store_is_not_complete(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16")
        path = tmp_path / "EM"
        w = SafetensorsWriter.create(resolve(path), spec, WriteOptions())
        w.write(0, 0, data[0][:80])  # killed after one block
        w.close()
        assert SafetensorsFormat.can_open(resolve(path))
        with SafetensorsReader(resolve(path)) as r:
            assert r.metadata == spec.metadata
            assert r.actfmt is None
            assert r.missing_chunks(0) == [
                f"layer_00.safetensors (rows 80-202: the file has {r.headers[0].data_start + 80 * 48} of "
                f"{r.headers[0].expected_file_nbytes} bytes)"
            ]
            assert [li.name for li in r.layers] == [
                "layer_00"
            ]  # the other layers' files come with their data
            with pytest.raises(CorruptShardError, match=r"layer_00\.safetensors: truncated"):
                r.read(0)
            with pytest.raises(CorruptShardError, match="truncated"):  # rows the file lacks
                r.take(0, np.array([3, 150]))
            np.testing.assert_array_equal(bits(r.read(0, 0, 80)), bits(data[0][:80]))

    def test_missing_chunks_empty_when_complete(self, tmp_path: Path) -> None:
        path, spec, _ = self.roundtrip(tmp_path, "float32")
        with SafetensorsReader(resolve(path)) as r:
            assert [r.missing_chunks(i) for i in range(len(spec.layers))] == [[], [], []]

    def test_resume_rewrites_a_layer_and_out_of_order_blocks(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16")
        path = tmp_path / "EM"
        w = SafetensorsWriter.create(resolve(path), spec, WriteOptions(chunk_rows=50))
        w.write(1, 0, torch.zeros(50, 24, dtype=torch.bfloat16))  # garbage from an interrupted run
        w.close()
        w = SafetensorsWriter.open(resolve(path), spec, WriteOptions(chunk_rows=50))
        for pos in range(3):
            sizes = w.block_rows(pos)
            assert sizes == [80, 80, 43]
            blocks = list(zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes, strict=True))
            for start, n in reversed(blocks):  # any order: each block lands at its own offset
                w.write(pos, start, data[pos][start : start + n])
            w.finish_layer(pos)
        w.finalize({"complete": True})
        w.close()
        for pos in range(3):
            t = load_file(str(path / f"layer_{pos:02d}.safetensors"))[TENSOR]
            np.testing.assert_array_equal(bits(t), bits(data[pos]))

    def test_open_rewrites_a_foreign_header(self, tmp_path: Path) -> None:
        spec, data = make_spec("float16", layers=1, rows=203, shard_rows=(203,))
        path = tmp_path / "EM"
        path.mkdir()
        (path / "layer_00.safetensors").write_bytes(b"garbage" * 100)
        w = SafetensorsWriter.open(resolve(path), spec, WriteOptions())
        w.write(0, 0, data[0])
        w.finish_layer(0)
        w.finalize({"complete": True})
        assert bits(load_file(str(path / "layer_00.safetensors"))[TENSOR]).tolist() == bits(data[0]).tolist()

    def test_finish_layer_detects_a_missing_block(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16")
        w = SafetensorsWriter.create(resolve(tmp_path / "EM"), spec, WriteOptions(chunk_rows=100))
        w.write(0, 0, data[0][:100])
        with pytest.raises(ConversionError, match="a block is missing"):
            w.finish_layer(0)

    def test_write_rejects_wrong_dtype_or_shape(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16")
        w = SafetensorsWriter.create(resolve(tmp_path / "EM"), spec, WriteOptions())
        with pytest.raises(ConversionError, match="does not fit"):
            w.write(0, 0, data[0].float())
        with pytest.raises(ConversionError, match="outside"):
            w.write(0, 200, data[0][:10])
        w.close()

    def test_block_rows(self, tmp_path: Path) -> None:
        spec, _ = make_spec("bfloat16")  # shard_rows (80, 80, 43) recorded
        w = SafetensorsWriter.create(resolve(tmp_path / "a"), spec, WriteOptions(chunk_rows=64))
        assert w.block_rows(0) == [80, 80, 43]
        spec2, _ = make_spec("bfloat16", shard_rows=(1,))  # no usable shard rows
        assert SafetensorsWriter.create(
            resolve(tmp_path / "b"), spec2, WriteOptions(chunk_rows=64)
        ).block_rows(0) == [
            64,
            64,
            64,
            11,
        ]
        assert SafetensorsWriter.create(resolve(tmp_path / "c"), spec2, WriteOptions()).block_rows(0) == [203]

    @pytest.mark.parametrize("compression", ["zstd", "gzip", "blosc-zstd"])
    def test_rejects_compression(self, tmp_path: Path, compression: str) -> None:
        spec, _ = make_spec("bfloat16")
        with pytest.raises(ConversionError, match="no compression"):
            SafetensorsWriter.create(resolve(tmp_path / "EM"), spec, WriteOptions(compression=compression))
        assert not (tmp_path / "EM").exists()

    # -- bad input: clean errors --------------------------------------------------------------------------
    @pytest.mark.parametrize(
        ("content", "match"),
        [
            (b"", "too short"),
            (b"\x00\x01", "too short"),
            (b"\xff" * 64, "header length"),
            ((40).to_bytes(8, "little") + b"{not json" + b" " * 31, "not valid JSON"),
            ((8).to_bytes(8, "little") + b"[1,2,3] ", "not a JSON object"),
        ],
    )
    def test_garbage_file_clean_error(self, tmp_path: Path, content: bytes, match: str) -> None:
        path, _, _ = self.roundtrip(tmp_path, "bfloat16")
        target = path / "layer_01.safetensors"
        target.write_bytes(content)
        with (
            open_reader(path) as r,
            pytest.raises(CorruptShardError, match=rf"layer_01\.safetensors: .*{match}"),
        ):
            r.read(1)

    def test_truncated_file_clean_error(self, tmp_path: Path) -> None:
        path, _, data = self.roundtrip(tmp_path, "bfloat16")
        target = path / "layer_02.safetensors"
        size = target.stat().st_size
        os.truncate(target, size - 100)
        with open_reader(path) as r:
            assert r.missing_chunks(2) == [
                f"layer_02.safetensors (rows 200-202: the file has {size - 100} of {size} bytes)"
            ]
            with pytest.raises(CorruptShardError, match=r"layer_02\.safetensors: truncated.*--resume"):
                r.read(2)
            with pytest.raises(CorruptShardError, match=r"layer_02\.safetensors: truncated"):
                r.take(2, np.array([0, 201]))
            np.testing.assert_array_equal(bits(r.read(2, 0, 150)), bits(data[2][:150]))
        # truncated inside the header: not even the header parses
        os.truncate(target, 40)
        with open_reader(path) as r, pytest.raises(CorruptShardError, match="header length"):
            _ = r.layers

    def test_foreign_file_two_tensors_and_unsupported_dtype(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        path, _, _ = self.roundtrip(tmp_path, "float32")
        save_file({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, str(path / "layer_00.safetensors"))
        with open_reader(path) as r, pytest.raises(CorruptShardError, match="holds 2 tensors"):
            _ = r.layers
        save_file({"activations": torch.zeros(2, 3, dtype=torch.int32)}, str(path / "layer_00.safetensors"))
        with open_reader(path) as r, pytest.raises(CorruptShardError, match="dtype 'I32'"):
            _ = r.layers
        save_file({"activations": torch.zeros(2, 3, 4)}, str(path / "layer_00.safetensors"))
        with open_reader(path) as r, pytest.raises(CorruptShardError, match=r"shape \[2, 3, 4\]"):
            _ = r.layers

    def test_library_written_file_is_read(self, tmp_path: Path) -> None:
        """A layer file written by safetensors' own save_file (other header layout) reads the same."""
        from safetensors.torch import save_file

        path, _, data = self.roundtrip(tmp_path, "bfloat16")
        save_file({"whatever": data[1].clone()}, str(path / "layer_01.safetensors"), metadata={"x": "y"})
        with open_reader(path) as r:
            np.testing.assert_array_equal(bits(r.read(1)), bits(data[1]))
            np.testing.assert_array_equal(bits(r.take(1, [7, 3])), bits(data[1][[7, 3]]))

    def test_metadata_missing_or_bad(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(tmp_path, "bfloat16")
        (path / "metadata.json").unlink()
        with open_reader(path) as r:
            with pytest.raises(MetadataError, match=r"metadata\.json: missing"):
                _ = r.metadata
            assert r.actfmt is None
        (path / "metadata.json").write_text("{oops")
        with open_reader(path) as r, pytest.raises(MetadataError, match="not valid JSON"):
            _ = r.metadata

    def test_take_bounds(self, tmp_path: Path) -> None:
        path, _, data = self.roundtrip(tmp_path, "float16")
        with open_reader(path) as r:
            with pytest.raises(IndexError):
                r.take(0, np.array([203]))
            with pytest.raises(IndexError):
                r.take(0, np.array([-1]))
            got = r.take(0, torch.tensor([[4, 1], [1, 4]]).reshape(-1))
            np.testing.assert_array_equal(bits(got), bits(data[0][[4, 1, 1, 4]]))

    def test_large_read_parallel_path(self, tmp_path: Path) -> None:
        """A read above the threading threshold (16 MiB) returns the same bits as the library."""
        spec, data = make_spec("bfloat16", rows=2100, hidden=4096, layers=1, shard_rows=(2100,))
        path = tmp_path / "EM"
        write_split(SafetensorsWriter, path, spec, data, WriteOptions())
        with open_reader(path) as r:
            got = r.read(0)
            assert got.is_contiguous() and got.dtype == torch.bfloat16
            np.testing.assert_array_equal(bits(got), bits(data[0]))
            np.testing.assert_array_equal(bits(r.read(0, 3, 2099)), bits(data[0][3:2099]))
        np.testing.assert_array_equal(
            bits(load_file(str(path / "layer_00.safetensors"))[TENSOR]), bits(data[0])
        )

    def test_detection(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(tmp_path, "bfloat16")
        assert guess_format(path) == "safetensors"
        assert get_format("st") is SafetensorsFormat
        assert SafetensorsFormat.destination(resolve(tmp_path / "x" / "EM")) == tmp_path / "x" / "EM"
        assert find_splits(tmp_path) == [(path, "safetensors")]
        assert not SafetensorsFormat.can_open(resolve(tmp_path / "nope"))
        assert not SafetensorsFormat.can_open(resolve(path / "metadata.json"))
        empty = tmp_path / "empty"
        empty.mkdir()
        assert not SafetensorsFormat.can_open(resolve(empty))

    def test_zero_row_layer(self, tmp_path: Path) -> None:
        spec, data = make_spec("bfloat16", rows=1, layers=1, shard_rows=(1,))
        spec.layers[0] = type(spec.layers[0])("layer_00", 0, 0, 24, "bfloat16", None)
        path = tmp_path / "EM"
        write_split(SafetensorsWriter, path, spec, [data[0][:0]], WriteOptions())
        assert load_file(str(path / "layer_00.safetensors"))[TENSOR].shape == (0, 24)
        with open_reader(path) as r:
            assert r.read(0).shape == (0, 24)
            assert r.missing_chunks(0) == []

    def test_real_sample_roundtrip(self, tmp_path: Path) -> None:
        splits = sorted(p for p in REAL.rglob("metadata.json")) if REAL.is_dir() else []
        if not splits:
            pytest.skip("real sample not present")
        from actfmt.conversion import convert

        src = splits[0].parent
        dst = tmp_path / "out"
        convert(src, dst, to="safetensors")
        (out,) = [p for p, _ in find_splits(dst)]
        with open_reader(src) as a, open_reader(out) as b:
            assert b.metadata == a.metadata
            for pos in range(len(a.layers)):
                raw = load_file(str(out / f"{a.layers[pos].name}.safetensors"))[TENSOR]
                np.testing.assert_array_equal(bits(raw), bits(a.read(pos)))
