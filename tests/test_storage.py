"""The storage contract: one suite, :class:`LocationTests`, that every storage subclasses (as zarr-python's
``StoreTests`` is subclassed by each of its stores).  A new storage passes by adding a subclass with a ``root``
fixture; what a storage cannot do it declares with its ``supports_*`` flags, and the suite checks the flag's
promise (or the clean refusal) instead of skipping.
"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actfmt.errors import ActfmtError, ChangedError
from actfmt.storage import Kind, LocalLocation, Location, read_into, read_objects, resolve


def put(loc: Location, data: bytes) -> None:
    """Write as every writer does: make the directory first (a no-op on object storage), then the object."""
    loc.parent.mkdir()
    loc.write_bytes(data)


class LocationTests:
    """What every :class:`~actfmt.storage.Location` does, whatever the storage."""

    @pytest.fixture
    def root(self, tmp_path: Path) -> Location:  # pragma: no cover - every subclass gives its own
        raise NotImplementedError

    # -- path arithmetic ------------------------------------------------------------------------------
    def test_path_arithmetic(self, root: Location) -> None:
        f = root / "a" / "EM.zarr"
        assert f.name == "EM.zarr" and f.suffix == ".zarr" and f.stem == "EM"
        assert f.parent == root / "a" and f.with_name("EM.h5") == root / "a" / "EM.h5"
        assert root.joinpath("a/b", "c") == root / "a" / "b" / "c"
        assert f.relative_to(root) == "a/EM.zarr" and root.relative_to(root) == "."
        assert f.is_relative_to(root) and not root.is_relative_to(f)
        with pytest.raises(ValueError):
            root.relative_to(f)

    def test_equal_hashable_and_picklable(self, root: Location) -> None:
        a, b = root / "x", root.joinpath("x")
        assert a == b and hash(a) == hash(b) and len({a, b}) == 1
        back = pickle.loads(pickle.dumps(a))
        assert back == a and back.scheme == a.scheme

    def test_only_a_local_location_is_a_path(self, root: Location) -> None:
        if root.is_local:
            assert Path(root / "x") == Path(str(root / "x"))
        else:
            with pytest.raises(TypeError):
                Path(root / "x")  # type: ignore[call-overload]

    # -- writes and reads -----------------------------------------------------------------------------
    def test_write_then_read_whole_and_ranges(self, root: Location) -> None:
        f = root / "d" / "blob.bin"
        data = bytes(range(256)) * 40
        put(f, data)
        assert f.read_bytes() == data and f.size() == len(data) and f.is_file() and f.kind() == Kind.FILE
        assert f.read_range(10, 20) == data[10:20]
        bufs = [bytearray(7), bytearray(100), np.empty(3, dtype=np.uint8)]
        offsets = [0, 5000, len(data) - 3]
        assert read_into([(f, o, memoryview(b).cast("B")) for o, b in zip(offsets, bufs, strict=True)])
        assert bytes(bufs[0]) == data[:7] and bytes(bufs[1]) == data[5000:5100]
        assert bytes(bufs[2]) == data[-3:]

    def test_atomic_write_replaces_whole(self, root: Location) -> None:
        f = root / "meta.json"
        f.write_text('{"a": 1}')
        f.write_text('{"a": 2}', atomic=True)
        assert f.read_text() == '{"a": 2}'
        # nothing else left beside it (no temporary file)
        assert [e.name for e in root.list_dir()] == ["meta.json"]

    def test_streamed_output(self, root: Location) -> None:
        f = root / "out.bin"
        with f.open_output() as out:
            out.write(b"abc")
            out.write(memoryview(b"defg"))
            out.write(np.arange(4, dtype=np.uint8))
            assert out.tell() == 11
        assert f.read_bytes() == b"abcdefg" + bytes(range(4))

    def test_a_failed_output_leaves_nothing(self, root: Location) -> None:
        f = root / "torn.bin"
        with pytest.raises(RuntimeError), f.open_output() as out:
            out.write(b"x" * 100)
            raise RuntimeError("writer died")
        assert f.kind() is None

    def test_put_many_and_read_objects(self, root: Location) -> None:
        items = {root / f"k{i}": bytes([i]) * (i + 1) for i in range(5)}
        root.put_many(items)
        got = read_objects([*items, root / "missing"], missing_ok=True)
        assert got == [*items.values(), None]

    def test_short_read_is_an_error_naming_the_object(self, root: Location) -> None:
        f = root / "short.bin"
        f.write_bytes(b"12345")
        with pytest.raises((OSError, ActfmtError), match=r"short\.bin"):
            read_into([(f, 2, memoryview(bytearray(10)))])

    def test_missing_object(self, root: Location) -> None:
        f = root / "nope"
        assert f.kind() is None and not f.exists()
        with pytest.raises(FileNotFoundError):
            f.read_bytes()
        assert read_into([(f, 0, memoryview(bytearray(4)))], missing_ok=True) == [False]

    def test_create_exclusive_wins_once(self, root: Location) -> None:
        lock = root / ".lock"
        assert lock.create_exclusive(b"first") is True
        assert lock.create_exclusive(b"second") is False
        assert lock.read_bytes() == b"first"

    # -- listing and deleting -------------------------------------------------------------------------
    def test_list_find_du(self, root: Location) -> None:
        put(root / "s" / "layer_00" / "c0", b"ab")
        put(root / "s" / "layer_00" / "c1", b"cde")
        put(root / "s" / "metadata.json", b"{}")
        entries = {e.name: e for e in (root / "s").list_dir()}
        assert set(entries) == {"layer_00", "metadata.json"}
        assert entries["layer_00"].is_dir() and entries["metadata.json"].is_file()
        assert entries["metadata.json"].size == 2
        found = (root / "s").find()
        assert found == {"layer_00/c0": 2, "layer_00/c1": 3, "metadata.json": 2}
        assert (root / "s").du() == 7

    def test_delete_and_delete_tree(self, root: Location) -> None:
        put(root / "t" / "a" / "b", b"1")
        put(root / "t" / "c", b"2")
        (root / "t" / "c").delete()
        assert (root / "t" / "c").kind() is None
        (root / "t" / "c").delete(missing_ok=True)  # no error
        (root / "t").delete_tree()
        assert (root / "t").kind() is None and (root / "t" / "a" / "b").kind() is None

    # -- capabilities: each flag keeps its promise, or the refusal is clean -----------------------------
    def test_rename_as_declared(self, root: Location) -> None:
        a, b = root / "a.bin", root / "b.bin"
        a.write_bytes(b"payload")
        if root.supports_rename:
            a.rename(b)
            assert b.read_bytes() == b"payload" and a.kind() is None
        else:
            with pytest.raises(NotImplementedError, match="rename"):
                a.rename(b)

    def test_mmap_as_declared(self, root: Location) -> None:
        f = root / "m.bin"
        f.write_bytes(b"0123456789")
        m = f.mmap()
        if root.supports_mmap:
            assert m is not None and bytes(m[2:5]) == b"234"
        else:
            assert m is None

    def test_pwrite_and_copy_range_as_declared(self, root: Location) -> None:
        src = root / "src.bin"
        src.write_bytes(b"ABCDEFGHIJ")
        dst = root / "dst.bin"
        with dst.open_output() as out:
            out.write(b"0000000000")
            out.copy_range(src, 2, 3)  # appended: CDE
            if root.supports_pwrite:
                out.pwrite(b"xy", 4)
            else:
                with pytest.raises(NotImplementedError):
                    out.pwrite(b"xy", 4)
        want = b"0000xy0000CDE" if root.supports_pwrite else b"0000000000CDE"
        assert dst.read_bytes() == want

    def test_a_pinned_location_never_reads_a_replacement(self, root: Location) -> None:
        """Pinned to what it was opened as: a read after the object was replaced gives the pinned version's
        bytes (a local file stays readable through its open descriptor) or raises ChangedError, never the new
        object's bytes."""
        if not root.detects_replacement:
            pytest.skip(
                f"{root.scheme}:// declares detects_replacement = False (the formats check identities)"
            )
        f = root / "pinned.bin"
        f.write_bytes(b"first version")
        pinned = f.pinned(f.stat().identity)
        buf = bytearray(5)
        assert read_into([(pinned, 0, memoryview(buf))]) and bytes(buf) == b"first"
        f.delete()
        f.write_bytes(b"other content, longer")
        fresh = (root / "pinned.bin").pinned(pinned.expected)  # a reader opened later, with the old pin
        for loc in (pinned, fresh):
            buf = bytearray(5)
            try:
                read_into([(loc, 0, memoryview(buf))])
            except (ChangedError, FileNotFoundError):
                continue
            assert bytes(buf) == b"first", "read the replacement through a pinned location"


class TestLocal(LocationTests):
    @pytest.fixture
    def root(self, tmp_path: Path) -> Location:
        loc = LocalLocation(tmp_path / "store")
        loc.mkdir()
        return loc


class TestMemory(LocationTests):
    @pytest.fixture
    def root(self, tmp_path: Path) -> Location:
        return resolve(f"memory://actfmt-storage-{uuid.uuid4().hex[:12]}")


@pytest.mark.slow
class TestS3(LocationTests):
    @pytest.fixture
    def root(self, s3: dict[str, Any]) -> Location:
        return resolve(f"s3://{s3['bucket']}/storage", s3["options"])
