"""The conformance suite every format subclasses (in the style of zarr-python's StoreTests), over every storage.

Each test runs on a local directory, on ``memory://`` and on an S3 server on loopback (moto; ``slow``).  A
subclass sets ``format_name`` and implements ``independent_read`` with the format's *own* library (zarr-python,
h5py, safetensors, torch), so writers are checked by a reader that is not actfmt's; a store written to object
storage is downloaded for that reader.  Formats that cannot write object storage in place (HDF5) are written
locally and uploaded, as ``actfmt convert`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import actfmt
from actfmt.checks import validate
from actfmt.formats import get_format
from actfmt.formats.base import LayerInfo, SplitSpec, WriteOptions, Writer
from actfmt.storage import LocalLocation, Location, resolve

DTYPES = ["float16", "bfloat16", "float32"]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
STORAGES = ["local", "memory", pytest.param("s3", marks=pytest.mark.slow)]

# Special bit patterns that must survive bit for bit: NaN payloads (quiet and signalling, both signs),
# infinities, negative zero and subnormals.
SPECIAL_BITS = {
    "float16": [0x7E01, 0xFE55, 0x7C01, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x03FF],
    "bfloat16": [0x7FC1, 0xFFAB, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x007F],
    "float32": [0x7FC00001, 0xFFC0ABCD, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001],
}


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as a numpy integer array (for exact comparison, NaN included)."""
    return t.contiguous().view(INT_VIEW[t.dtype]).numpy()


def make_layer(rows: int, hidden: int, dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(rows, hidden, generator=g) * 3).to(getattr(torch, dtype))
    special = SPECIAL_BITS[dtype]
    iv = t.view(INT_VIEW[t.dtype])
    for k, b in enumerate(special):
        width = 16 if dtype != "float32" else 32
        signed = b - (1 << width) if b >= 1 << (width - 1) else b
        iv[(k * 7) % rows, (k * 5) % hidden] = signed
    return t


def make_spec(
    dtype: str, rows: int = 203, hidden: int = 24, layers: int = 3, shard_rows: tuple[int, ...] = (80, 80, 43)
) -> tuple[SplitSpec, list[torch.Tensor]]:
    metadata: dict[str, Any] = {
        "model_name": "org/Model-1B",
        "dataset_name": "SP_conformance",
        "split": "EM",
        "load_in_4bit": False,
        "total_examples": rows,
        "shard_size": 64,
        "batch_size": 20,
        "hidden_dim": hidden,
        "num_layers": layers,
        "extra_key": {"nested": [1, 2, 3]},
    }
    infos = [
        LayerInfo(f"layer_{i:02d}", i, rows, hidden, dtype, shard_rows if sum(shard_rows) == rows else None)
        for i in range(layers)
    ]
    data = [make_layer(rows, hidden, dtype, seed=i + 17) for i in range(layers)]
    return SplitSpec(metadata=metadata, layers=infos, source_format="pt"), data


def write_split(
    writer_cls: type[Writer],
    path: Location | Path,
    spec: SplitSpec,
    data: list[torch.Tensor],
    options: WriteOptions,
    finalize: bool = True,
    layers: int | None = None,
) -> None:
    """Drive a writer through its life cycle, one block at a time, as ``convert`` does."""
    loc = resolve(path)
    w = writer_cls.create(loc, spec, options)
    for pos in range(len(spec.layers) if layers is None else layers):
        start = 0
        for n in w.block_rows(pos):
            w.write(pos, start, data[pos][start : start + n])
            start += n
        assert start == spec.layers[pos].rows
        w.finish_layer(pos)
    if finalize:
        w.finalize({"complete": True, "version": "test", "source_format": spec.source_format})
    w.close()


def upload(local: LocalLocation, remote: Location) -> None:
    """Copy a local store (a directory or one file) to object storage."""
    if local.is_file():
        remote.write_bytes(local.read_bytes())
        return
    remote.put_many({remote / key: (local / key).read_bytes() for key in local.find()})


def download(remote: Location, local: Path) -> Path:
    """Copy a store from any storage into a local path (for the format's own library)."""
    if remote.is_local:
        return Path(remote.path)
    if remote.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(remote.read_bytes())
        return local
    for key in remote.find():
        target = local / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((remote / key).read_bytes())
    return local


class FormatConformance:
    """Subclass with ``format_name`` set and ``independent_read`` implemented."""

    format_name: ClassVar[str]
    #: Options a subclass may add for extra parametrisation (compression names to test).
    compressions: ClassVar[tuple[str | None, ...]] = (None,)

    # -- hooks -------------------------------------------------------------------------------------------
    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        """The layer's raw bits read by the format's own library (not actfmt), from a local path."""
        raise NotImplementedError

    def a_piece_of(self, store: Location, layer_name: str) -> Location:
        """One object holding data of ``layer_name`` (a chunk, a shard): deleting it must be noticed."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------
    def fmt(self) -> Any:
        return get_format(self.format_name)

    def dest(self, root: Location) -> Location:
        return self.fmt().destination(root / "EM")

    def write(
        self, root: Location, spec: SplitSpec, data: list[torch.Tensor], options: WriteOptions, **kw: Any
    ) -> Location:
        root = resolve(root)
        path = self.dest(root)
        if root.is_local or self.fmt().remote_write:
            write_split(self.fmt().writer_class(), path, spec, data, options, **kw)
            return path
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # written locally and uploaded, as convert does
            local = self.dest(LocalLocation(tmp))
            write_split(self.fmt().writer_class(), local, spec, data, options, **kw)
            upload(local, path)  # type: ignore[arg-type]
        return path

    def roundtrip(self, root: Location | Path, dtype: str, options: WriteOptions | None = None, **kw: Any):
        """Write a split made by :func:`make_spec` under ``root``; its location comes back as a ``Path`` when
        ``root`` is one (format-specific tests look at the files)."""
        spec, data = make_spec(dtype, **kw)
        out = self.write(resolve(root), spec, data, options or WriteOptions())
        return (Path(out) if isinstance(root, Path) else out), spec, data

    # -- tests -------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_roundtrip_bit_exact(self, root: Location, dtype: str) -> None:
        for compression in self.compressions:
            sub = root / str(compression)
            path, spec, data = self.roundtrip(
                sub, dtype, WriteOptions(compression=compression, chunk_rows=50)
            )
            assert self.fmt().can_open(path)
            with self.fmt().open_reader(path) as r:
                assert [li.name for li in r.layers] == [li.name for li in spec.layers]
                for pos, info in enumerate(r.layers):
                    assert (info.rows, info.hidden_dim, info.dtype) == (203, 24, dtype)
                    got = r.read(pos)
                    assert got.dtype == getattr(torch, dtype)
                    np.testing.assert_array_equal(bits(got), bits(data[pos]))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_independent_reader(self, root: Location, dtype: str, tmp_path: Path) -> None:
        path, spec, data = self.roundtrip(root, dtype, WriteOptions(chunk_rows=64))
        local = download(path, tmp_path / "downloaded" / path.name)
        for pos, info in enumerate(spec.layers):
            raw = self.independent_read(local, info.name, dtype)
            np.testing.assert_array_equal(raw, bits(data[pos]))

    def test_metadata_verbatim_and_complete(self, root: Location) -> None:
        path, spec, _ = self.roundtrip(root, "bfloat16")
        with self.fmt().open_reader(path) as r:
            assert r.metadata == spec.metadata
            assert list(r.metadata) == list(spec.metadata)
            assert r.actfmt is not None and r.actfmt["complete"] is True

    def test_read_slices_and_take(self, root: Location) -> None:
        path, _, data = self.roundtrip(root, "bfloat16", WriteOptions(chunk_rows=32))
        with self.fmt().open_reader(path) as r:
            for start, stop in [(0, 1), (31, 33), (63, 130), (150, 203), (202, 203), (0, 203)]:
                np.testing.assert_array_equal(bits(r.read(1, start, stop)), bits(data[1][start:stop]))
            idx = np.array([5, 202, 5, 0, 64, 63, 150, 149, 31, 32, 5])
            np.testing.assert_array_equal(bits(r.take(2, idx)), bits(data[2][torch.from_numpy(idx)]))
            assert r.take(0, np.array([], dtype=np.int64)).shape == (0, 24)

    def test_single_row_split(self, root: Location) -> None:
        path, _, data = self.roundtrip(root, "float16", rows=1, layers=1, shard_rows=(1,))
        with self.fmt().open_reader(path) as r:
            np.testing.assert_array_equal(bits(r.read(0)), bits(data[0]))

    def test_interrupted_write_never_looks_complete(self, root: Location) -> None:
        spec, data = make_spec("bfloat16")
        path = self.write(root, spec, data, WriteOptions(chunk_rows=50), finalize=False, layers=1)
        report = validate(path)
        assert report.errors > 0, "a store without its completeness mark validates as OK"

    def test_missing_piece_is_noticed(self, root: Location) -> None:
        path, _, _ = self.roundtrip(root, "bfloat16", WriteOptions(chunk_rows=50))
        assert validate(path).errors == 0
        self.a_piece_of(path, "layer_01").delete(missing_ok=False)
        report = validate(path)
        assert report.errors > 0 and any("layer_01" in f.location for f in report.findings), report.findings

    def test_open_take_example_and_to_dask(self, root: Location) -> None:
        pytest.importorskip("dask.array")
        path, _, data = self.roundtrip(root, "bfloat16", WriteOptions(chunk_rows=32))
        with actfmt.open(path) as split:
            assert split.format == self.format_name and split.layers == [0, 1, 2]
            rows = [200, 3, 3, 64]
            np.testing.assert_array_equal(bits(split.layer(1)[rows]), bits(data[1][rows]))
            np.testing.assert_array_equal(bits(split.example(7)), bits(torch.stack([d[7] for d in data])))
            lazy = split.layer(2).to_dask(chunk_rows=70)
            np.testing.assert_array_equal(lazy.compute().view(np.int16), bits(data[2]))
