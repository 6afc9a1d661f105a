from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import actfmt
from actfmt.checks import validate
from actfmt.conversion import convert, info, verify
from actfmt.errors import BadHeaderError, ConversionError
from actfmt.formats import find_splits, guess_format, open_reader
from actfmt.formats.base import WriteOptions
from actfmt.formats.npy import MAGIC, MAX_HEADER, NpyFormat, NpyReader, build_header
from actfmt.statistics import stats
from actfmt.storage import Location, resolve

from .._trees import make_split
from .conformance import FormatConformance, bits, make_spec, write_split


def _npy(path: Path, header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> Path:
    """A .npy file with the header text given verbatim (padded as NumPy pads it)."""
    width = 2 if version[0] == 1 else 4
    text = header + " " * (-(6 + 2 + width + len(header) + 1) % 64) + "\n"
    raw = text.encode("latin1")
    path.write_bytes(MAGIC + bytes(version) + len(raw).to_bytes(width, "little") + raw + data)
    return path


class TestNpyFormat(FormatConformance):
    format_name = "npy"
    compressions = (None, "none")

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        arr = np.load(path / f"{layer_name}.npy", mmap_mode="r")  # NumPy alone, memory-mapped
        assert arr.dtype == np.dtype({"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}[dtype])
        recorded = json.loads((path / "metadata.json").read_text())["actfmt"]["dtype"][layer_name]
        assert recorded == dtype
        return np.asarray(arr).view(np.int32 if dtype == "float32" else np.int16)

    def a_piece_of(self, store: Location, layer_name: str) -> Location:
        return store / f"{layer_name}.npy"

    # -- the layout ------------------------------------------------------------------------------------------
    def test_the_split_keeps_its_name_and_is_detected(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(tmp_path, "bfloat16")
        assert (
            path == tmp_path / "EM"
            and NpyFormat.destination(resolve(tmp_path / "EM.zarr")) == tmp_path / "EM"
        )
        assert sorted(p.name for p in path.iterdir()) == [
            "layer_00.npy",
            "layer_01.npy",
            "layer_02.npy",
            "metadata.json",
        ]
        assert guess_format(path) == "npy" and find_splits(tmp_path) == [(resolve(path), "npy")]
        for p in path.glob("*.npy"):
            raw = p.read_bytes()
            with open(p, "rb") as fh:
                version = np.lib.format.read_magic(fh)  # NumPy's own header reader
            assert version == (1, 0) and (10 + int.from_bytes(raw[8:10], "little")) % 64 == 0
        doc = json.loads((path / "metadata.json").read_text())
        assert list(doc)[-1] == "actfmt" and list(doc["actfmt"])[-1] == "complete"

    def test_numpy_written_files_are_read(self, tmp_path: Path) -> None:
        """A split whose layer files NumPy wrote itself (np.save, format 2.0 too) is read, float16 and float32."""
        split = tmp_path / "EM"
        split.mkdir()
        a = np.arange(60, dtype="<f2").reshape(20, 3)
        b = np.arange(40, dtype="<f4").reshape(10, 4)
        np.save(split / "layer_00.npy", a)
        with open(split / "layer_01.npy", "wb") as fh:
            np.lib.format.write_array(fh, b, version=(2, 0))
        (split / "metadata.json").write_text(json.dumps({"model_name": "m"}))
        with open_reader(split) as r:
            assert r.format == "npy" and r.actfmt is None and r.metadata == {"model_name": "m"}
            assert [(li.rows, li.hidden_dim, li.dtype) for li in r.layers] == [
                (20, 3, "float16"),
                (10, 4, "float32"),
            ]
            np.testing.assert_array_equal(r.read_array(0), a)
            np.testing.assert_array_equal(r.read_array(1, 2, 7), b[2:7])

    @pytest.mark.parametrize(
        ("header", "data", "message"),
        [
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }", bytes(32), "dtype '<f8'"),
            ("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }", bytes(16), "dtype '>f4'"),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", bytes(16), "Fortran order"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 1), }", bytes(16), "2-D"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", bytes(16), "2-D"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 0), }", b"", "hidden_dim"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'x': 'y', }", bytes(16), "exactly"),
            ("{'descr': '<f4', 'descr': '<f4', 'shape': (2, 2), }", bytes(16), "twice"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 2), }", bytes(16), "cannot be parsed"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), } + __import__('os')", b"", "dict"),
            ("{'descr': <f4, 'fortran_order': False, 'shape': (2, 2), }", bytes(16), "cannot be parsed"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", bytes(17), "follow the data"),
            ("{'descr': '<u2', 'fortran_order': False, 'shape': (2, 2), }", bytes(8), "bfloat16"),
        ],
    )
    def test_crafted_headers_are_refused(
        self, tmp_path: Path, header: str, data: bytes, message: str
    ) -> None:
        split = tmp_path / "EM"
        split.mkdir()
        _npy(split / "layer_00.npy", header, data)
        (split / "metadata.json").write_text(json.dumps({"model_name": "m"}))
        with pytest.raises(BadHeaderError, match=message), NpyReader(resolve(split)) as r:
            r.layers  # noqa: B018 - parsing the headers is the test
        assert validate(split).errors > 0  # a finding, never a crash

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b"\x93NUMPX\x01\x00\x10\x00", "magic"),
            (MAGIC + b"\x04\x00\x10\x00" + b" " * 16, "version 4.0"),
            (
                MAGIC + b"\x01\x00" + (MAX_HEADER + 1).to_bytes(2, "little") + b" " * (MAX_HEADER + 1),
                "header",
            ),
            (MAGIC + b"\x02\x00" + (1 << 31).to_bytes(4, "little"), "more than"),
            (MAGIC + b"\x01\x00\xff\x00{'descr'", "truncated"),
            (MAGIC + b"\x03\x00\x04\x00\x00\x00\xff\xfe}\n", "UTF-8"),
        ],
    )
    def test_crafted_preambles_are_refused(self, tmp_path: Path, raw: bytes, message: str) -> None:
        split = tmp_path / "EM"
        split.mkdir()
        (split / "layer_00.npy").write_bytes(raw)
        (split / "metadata.json").write_text("{}")
        with pytest.raises(BadHeaderError, match=message), NpyReader(resolve(split)) as r:
            r.layers  # noqa: B018

    def test_a_truncated_layer_is_missing_rows_not_a_crash(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(tmp_path, "float16")
        f = path / "layer_01.npy"
        f.write_bytes(f.read_bytes()[:-100])
        with open_reader(path) as r:
            assert r.missing_chunks(1) and "layer_01.npy" in r.missing_chunks(1)[0]
        assert any(x.code == "ACT601" for x in validate(path).findings)

    def test_no_compression_and_the_header_refuses_other_dtypes(self, tmp_path: Path) -> None:
        spec, data = make_spec("float16")
        with pytest.raises(ConversionError, match="no compression"):
            write_split(NpyFormat.writer, tmp_path / "EM", spec, data, WriteOptions(compression="zstd"))
        with pytest.raises(ConversionError, match="int8"):
            build_header("int8", 1, 1)

    # -- what comes for free -------------------------------------------------------------------------------
    def test_pt_to_npy_and_back_is_bit_exact_with_info_stats_stream(self, tmp_path: Path) -> None:
        src = tmp_path / "Activations" / "org_M" / "ds" / "EM"
        data = make_split(src, total=203, hidden=16, layers=3, dtype=torch.bfloat16)
        make_split(src.parent / "Neutral", total=203, hidden=16, layers=3, dtype=torch.bfloat16, seed=1)
        res = convert(tmp_path / "Activations", tmp_path / "npy", to="npy", jobs=2)
        assert res.layers == 6 and not res.warnings
        store = tmp_path / "npy" / "org_M" / "ds" / "EM"
        assert verify(src, store).equal and verify(tmp_path / "Activations", tmp_path / "npy").equal
        assert validate(tmp_path / "npy", deep=True).errors == 0
        convert(tmp_path / "npy", tmp_path / "back", to="pt", jobs=2)
        back = tmp_path / "back" / "org_M" / "ds" / "EM"
        with actfmt.open(back) as split:
            for name, tensor in data.items():
                np.testing.assert_array_equal(bits(split.layer(int(name[-2:]))[:]), bits(tensor))
        for name in data:  # the original shard boundaries restored
            assert sorted(p.name for p in (back / name).iterdir()) == sorted(
                p.name for p in (src / name).iterdir()
            )
        assert verify(src, back).equal
        (only,) = info(store)
        assert only.format == "npy" and only.layers == 3
        got = stats(tmp_path / "npy")
        assert [s.format for s in got.splits] == ["npy", "npy"] and got.splits[0].source == "stored"
        assert got.pairs and {p.a for p in got.pairs} | {p.b for p in got.pairs} == {"EM", "Neutral"}
        st = actfmt.stream(str(store), layers=1, batch_size=50, shuffle=True, seed=3, world_size=1, rank=0)
        try:
            batches = list(st)
        finally:
            st.close()
        rows = torch.cat([torch.as_tensor(b["index"]) for b in batches])
        assert sorted(rows.tolist()) == list(range(203))
        x = torch.cat([torch.as_tensor(b["x"]) for b in batches])
        np.testing.assert_array_equal(bits(x), bits(data["layer_01"][rows]))

    def test_memory_storage_convert_and_validate(self, tmp_path: Path) -> None:
        src = tmp_path / "ds" / "EM"
        make_split(src, total=90, hidden=8, layers=2, dtype=torch.float16)
        url = "memory://actfmt-npy-convert"
        convert(src, url, to="npy", jobs=1)
        assert find_splits(url)[0][1] == "npy"
        assert verify(src, url + "/EM").equal and validate(url + "/EM", deep=True).errors == 0
