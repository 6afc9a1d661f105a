"""The conversion engine: atomicity, locking, resume, verification, tree mirroring (format-neutral)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actfmt.formats as formats_registry
from actfmt.conversion import convert, info, verify
from actfmt.errors import ConversionError, DestinationExistsError, LockedError
from actfmt.formats import find_splits, open_reader

from ._trees import bits, make_split, make_tree, seed_load

ALL_FORMATS = list(formats_registry.FORMATS)


def test_pt_roundtrip_is_bit_exact_and_mirrors_the_tree(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "src", dtype=torch.bfloat16)
    res = convert(tmp_path / "src", tmp_path / "dst", to="pt", force=True, jobs=2)
    assert sorted(j.location for j in res.splits) == sorted(data)
    for loc, layers in data.items():
        out = tmp_path / "dst" / loc
        for name, full in layers.items():
            assert torch.equal(bits(seed_load(out, name)), bits(full))
        assert json.loads((out / "metadata.json").read_text()) == json.loads(
            (tmp_path / "src" / loc / "metadata.json").read_text()
        )
    assert verify(tmp_path / "src", tmp_path / "dst").equal


def test_split_as_source_goes_to_dst_slash_name(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM")
    res = convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True)
    assert [j.destination for j in res.splits] == [tmp_path / "out" / "EM"]
    assert (tmp_path / "out" / "EM" / "layer_02" / "shard_002.pt").is_file()


def test_refuses_existing_destination_without_overwrite(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM")
    convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True)
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True)
    res = convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True, overwrite=True)
    assert len(res.splits) == 1
    assert not list((tmp_path / "out").glob(".*")), "no temporary or lock file is left behind"


def test_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    import fcntl

    make_split(tmp_path / "ds" / "EM")
    (tmp_path / "out").mkdir()
    lock = tmp_path / "out" / ".EM.actfmt-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LockedError, match="another actfmt convert"):
            convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True)
    finally:
        os.close(fd)
    assert not (tmp_path / "out" / "EM").exists()


def test_source_is_never_modified(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    convert(tmp_path / "ds", tmp_path / "out", to="pt", force=True)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    assert before == after


def test_rejects_bad_options(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM")
    with pytest.raises(ConversionError, match="compression"):
        convert(tmp_path / "ds", tmp_path / "out", to="pt", compression="zstd", force=True)
    with pytest.raises(ConversionError, match="dtype"):
        convert(tmp_path / "ds", tmp_path / "out", to="pt", dtype="int8", force=True)
    with pytest.raises(ConversionError, match="source"):
        convert(tmp_path / "ds", tmp_path / "ds", to="pt", force=True)
    with pytest.raises(ConversionError, match="inside the source"):
        convert(tmp_path / "ds", tmp_path / "ds" / "zarr", to="zarr", force=True)
    assert not (tmp_path / "ds" / "zarr").exists()


def test_explicit_dtype_cast_is_recorded_and_warned(tmp_path: Path) -> None:
    data = make_split(tmp_path / "ds" / "EM", dtype=torch.float32)
    res = convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", dtype="float16", force=True)
    assert res.warnings and "float32 -> float16" in res.warnings[0]
    got = seed_load(tmp_path / "out" / "EM", "layer_01")
    assert got.dtype == torch.float16
    assert torch.equal(got, data["layer_01"].to(torch.float16))
    with open_reader(tmp_path / "out" / "EM") as r:
        assert r.actfmt["cast_from"]["layer_01"] == "float32"


def test_verify_reports_first_differing_row(tmp_path: Path) -> None:
    make_split(tmp_path / "a" / "EM")
    convert(tmp_path / "a" / "EM", tmp_path / "b", to="pt", force=True)
    shard = tmp_path / "b" / "EM" / "layer_01" / "shard_001.pt"
    t = torch.load(shard)
    t[5, 3] = t[5, 3] + 1
    torch.save(t.clone(), shard)
    res = verify(tmp_path / "a" / "EM", tmp_path / "b" / "EM")
    assert not res.equal
    assert res.first == {"split": ".", "layer": "layer_01", "row": 80 + 5}


def test_info_describes_each_split(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", total=50, hidden=8, layers=2)
    rows = info(tmp_path / "src")
    assert [r.location for r in rows] == ["org_Tiny-Model/SP_test/EM", "org_Tiny-Model/SP_test/Neutral"]
    assert all(
        (r.format, r.layers, r.examples, r.hidden_dim, r.dtype) == ("pt", 2, 50, 8, "bfloat16") for r in rows
    )
    assert all(r.bytes_on_disk > 0 for r in rows)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from actfmt.conversion import convert
    def slow(event):
        if event.kind == "advance" and event.task == "convert":
            time.sleep(0.02)
    convert(sys.argv[1], sys.argv[2], to=sys.argv[3], force=True, jobs=1, chunk_rows=64, progress=slow)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("to", ALL_FORMATS)
def test_sigkill_then_resume_is_bit_exact(tmp_path: Path, to: str) -> None:
    data = make_split(tmp_path / "ds" / "EM", total=400, hidden=32, layers=6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "ds" / "EM"), str(out), to])
    fmt = formats_registry.get_format(to)
    final = fmt.destination(out / "EM")
    journal = final.with_name(f".{final.name}.actfmt-state.jsonl")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if sum('"layer"' in line for line in journal.read_text().splitlines()) >= 2:
                break
        except OSError:
            pass
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("the conversion never recorded two layers")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # nothing looks complete: no final store, no split found, the partial is hidden
    assert not final.exists()
    assert find_splits(out) == []
    res = convert(tmp_path / "ds" / "EM", out, to=to, force=True, resume=True)
    assert 0 < res.layers < 6, "resume continued where the killed run stopped"
    with open_reader(final) as r:
        assert r.actfmt["complete"] is True
        for pos, li in enumerate(r.layers):
            assert torch.equal(bits(r.read(pos)), bits(data[li.name]))
    assert verify(tmp_path / "ds" / "EM", final).equal


@pytest.mark.parametrize("jobs", [1, 2])
def test_verification_catches_a_bad_write_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    from actfmt.formats.pt import PtWriter

    make_split(tmp_path / "ds" / "EM", total=200, hidden=8, layers=3)
    real_write = PtWriter.write

    def corrupting_write(
        self: PtWriter, layer: int, start: int, data: np.ndarray | None, runs: Any = None
    ) -> None:
        if layer == 2 and start == 0:
            if data is None:  # a block copied from the source's bytes: take them, to damage them
                raw = b"".join(loc.read_range(off, off + n) for loc, off, n in runs)
                data = np.frombuffer(raw, dtype=np.uint16).reshape(-1, self.spec.layers[layer].hidden_dim)
            data = data.copy()
            data[3, 1] = data[3, 1] + 1  # what a flaky disk or a buggy writer would do
            runs = None
        real_write(self, layer, start, data, runs)

    monkeypatch.setattr(PtWriter, "write", corrupting_write)
    with pytest.raises(ConversionError, match="layer_02: checksum of the written data"):
        convert(tmp_path / "ds" / "EM", tmp_path / "out", to="pt", force=True, jobs=jobs)
    assert not (tmp_path / "out" / "EM").exists()
    assert find_splits(tmp_path / "out") == []


def test_hdf5_gzip_verifies_each_layer_while_the_next_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDF5's chunked split is one task: layer k is verified on a helper thread, from a second open of the file
    the writer still holds, while layer k+1 is copied; every layer is verified once, in order, and reported
    (journalled) only once verified; the store is bit-exact."""
    import threading

    from actfmt.conversion import tasks

    data = make_split(tmp_path / "ds" / "EM", total=200, hidden=8, layers=4)
    events: list[tuple[str, str, str]] = []
    real_check, real_copy = tasks._check, tasks.copy_layer

    def slow_check(task: Any, res: Any, on_bytes: Any) -> None:
        events.append(("verify", res.name, threading.current_thread().name))
        time.sleep(0.2)  # the next layer's copy starts meanwhile
        real_check(task, res, on_bytes)
        events.append(("verified", res.name, ""))

    def spy_copy(reader: Any, writer: Any, pos: int, *a: Any, **k: Any) -> Any:
        events.append(("copy", f"layer_{pos:02d}", ""))
        return real_copy(reader, writer, pos, *a, **k)

    monkeypatch.setattr(tasks, "_check", slow_check)
    monkeypatch.setattr(tasks, "copy_layer", spy_copy)
    res = convert(tmp_path / "ds" / "EM", tmp_path / "out", to="hdf5", compression="gzip")
    assert res.layers == 4
    verified = [e for e in events if e[0] == "verify"]
    assert [e[1] for e in verified] == [f"layer_{i:02d}" for i in range(4)]
    assert all(e[2].startswith("actfmt-verify") for e in verified)
    for i in range(3):  # layer i+1 was being copied while layer i was being verified
        kinds = [e[:2] for e in events]
        assert kinds.index(("copy", f"layer_{i + 1:02d}")) < kinds.index(("verified", f"layer_{i:02d}"))
    with open_reader(tmp_path / "out" / "EM.h5") as r:
        assert r.actfmt["complete"] is True
        for pos, li in enumerate(r.layers):
            assert torch.equal(bits(r.read(pos)), bits(data[li.name]))


def test_hdf5_gzip_verification_on_its_thread_catches_a_bad_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actfmt.formats.hdf5.writer import HDF5Writer

    make_split(tmp_path / "ds" / "EM", total=200, hidden=8, layers=4)
    real_write = HDF5Writer.write

    def corrupting_write(self: HDF5Writer, layer: int, start: int, data: Any, runs: Any = None) -> None:
        if layer == 1 and start == 0:
            data = np.array(data, copy=True)
            data[3, 1] = data[3, 1] + 1  # what a flaky disk or a buggy writer would do
        real_write(self, layer, start, data, runs)

    monkeypatch.setattr(HDF5Writer, "write", corrupting_write)
    with pytest.raises(ConversionError, match="layer_01: checksum of the written data"):
        convert(tmp_path / "ds" / "EM", tmp_path / "out", to="hdf5", compression="gzip")
    assert not (tmp_path / "out" / "EM.h5").exists()
    assert find_splits(tmp_path / "out") == []


def test_the_source_is_walked_once_and_each_shard_probed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert validates the tree it has walked (one walk), and its reader reuses the headers the validation
    probed (one probe per shard)."""
    import actfmt.checks
    import actfmt.conversion
    import actfmt.formats.pt.header as header

    make_tree(tmp_path / "src", total=50, hidden=8, layers=2, shard_size=20, batch_size=10)
    shards = len(list((tmp_path / "src").rglob("shard_*.pt")))
    walks: list[Any] = []
    probes: list[Any] = []
    real_walk, real_probe = actfmt.conversion.walk_splits, header.probe_zip

    def counting_walk(*a: Any, **k: Any) -> Any:
        walks.append(a)
        return real_walk(*a, **k)

    def counting_probe(fh: Any, size: int) -> Any:
        probes.append(fh._loc)
        return real_probe(fh, size)

    monkeypatch.setattr(actfmt.conversion, "walk_splits", counting_walk)
    monkeypatch.setattr(actfmt.checks, "walk_splits", counting_walk)
    monkeypatch.setattr(header, "probe_zip", counting_probe)
    convert(tmp_path / "src", tmp_path / "dst", to="zarr")
    assert len(walks) == 1
    assert len(probes) == len(set(map(str, probes))) == shards  # parsed once each (then the cache)
