"""The registry owns naming: suffixes, split names, detection with one listing, the one "no split found"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actfmt.errors import NotASplitError
from actfmt.formats import (
    FORMATS,
    formats,
    get_format,
    guess_format,
    no_split_found,
    open_reader,
    split_name,
    store_suffixes,
)
from actfmt.formats.base import WriteOptions
from actfmt.storage import Location, resolve

from .conformance import make_spec, write_split


def test_the_suffixes_are_the_formats_declarations() -> None:
    declared = {s for name in FORMATS for s in get_format(name).suffixes}
    assert set(store_suffixes()) == declared >= {".zarr", ".h5", ".hdf5"}
    for fmt in formats():
        assert fmt.destination(resolve("/a/b/EM")).name == "EM" + (fmt.suffixes[0] if fmt.suffixes else "")
        for suffix in fmt.suffixes:
            assert fmt.split_name(resolve(f"/a/b/EM{suffix}")) == "EM"
            assert split_name(f"EM{suffix}") == "EM"
    assert split_name("EM") == "EM" and split_name(".zarr") == ".zarr"
    assert split_name("EM.safetensors") == "EM.safetensors"  # safetensors splits are directories named EM/


def test_the_no_split_message_names_every_registered_format(monkeypatch: pytest.MonkeyPatch) -> None:
    message = str(no_split_found("/x", ["a: unreadable"], "look elsewhere"))
    assert message.startswith("/x: no split found (a split is ")
    assert message.endswith("; a: unreadable; look elsewhere.")
    for fmt in formats():
        assert fmt.looks_like in message
    zarr = get_format("zarr")
    monkeypatch.setattr(zarr, "looks_like", "a brand new thing")
    assert "a brand new thing" in str(no_split_found("/x"))


def test_open_reader_and_the_walk_say_the_same(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotASplitError) as one:
        open_reader(tmp_path / "empty")
    assert str(one.value) == str(no_split_found(resolve(tmp_path / "empty")))


@pytest.mark.parametrize("url", [None, "memory://actfmt-registry-listing"])
def test_guess_format_lists_a_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str | None
) -> None:
    root = resolve(url) if url else resolve(tmp_path)
    spec, data = make_spec("float16", layers=2)
    path = get_format("pt").destination(root / "EM")
    write_split(get_format("pt").writer_class(), path, spec, data, WriteOptions())
    calls: list[str] = []
    cls: Any = type(path)
    real = cls.list_dir

    def counting(self: Location) -> Any:
        calls.append(str(self))
        return real(self)

    monkeypatch.setattr(cls, "list_dir", counting)
    assert guess_format(path) == "pt"
    assert calls == [str(path)]
    calls.clear()
    assert guess_format(path / "metadata.json") is None  # a file: one failed listing, no more
    assert len(calls) <= 1


def test_a_remote_file_is_not_a_directory() -> None:
    f = resolve("memory://actfmt-registry-file/x.h5")
    f.write_bytes(b"not hdf5")
    with pytest.raises(NotADirectoryError):
        f.list_dir()
    assert guess_format(f) is None


def test_pt_is_asked_last_wherever_it_is_listed(tmp_path: Path) -> None:
    """pt takes any directory with a metadata.json (fallback): a store that keeps one is still itself."""
    spec, data = make_spec("float16", layers=1)
    st = tmp_path / "st"
    write_split(get_format("safetensors").writer_class(), st, spec, data, WriteOptions())
    saved = dict(FORMATS)
    try:
        FORMATS.clear()
        FORMATS.update({"pt": saved["pt"], **{k: v for k, v in saved.items() if k != "pt"}})
        assert formats()[-1].name == "pt"
        assert guess_format(st) == "safetensors"
    finally:
        FORMATS.clear()
        FORMATS.update(saved)
    assert get_format("pt").can_open(resolve(st))  # on its own, pt would take it
