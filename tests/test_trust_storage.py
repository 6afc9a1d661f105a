"""The storage side of the trust boundary (issue 16): a tree is the directory given and nothing outside it; a
destination is replaced only when it is a complete actfmt store; lock, journal and temporary files never write
through a planted link; a pt reader never mixes two trees; object storage has a timeout.

Every attack tree is built here, in ``tmp_path``: a *secret* store outside the tree holds values whose bytes
spell ``SECRET!!``; the tree links one of its parts (a shard, a layer directory, metadata.json, a zarr chunk, a
safetensors layer file, the ``.h5`` itself) to the matching part of the secret store.  Those bytes must never
appear in any output or any converted file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from actfmt.checks import validate
from actfmt.cli import cli
from actfmt.conversion import convert
from actfmt.errors import ActfmtError, OutsideTreeError
from actfmt.storage import LocalLocation, resolve

from ._faults import actfmt_cmd, as_user_prefix, run, world_readable
from ._trees import make_split

MARKER = b"SECRET!!"


def _marker_split(path: Path) -> None:
    """A split whose every value's bytes are ``SECRET!!``, and whose metadata.json holds the marker too."""
    make_split(
        path, total=40, hidden=8, layers=2, shard_size=20, batch_size=10, extra={"note": MARKER.decode()}
    )
    for layer in ("layer_00", "layer_01"):
        for shard in sorted((path / layer).iterdir()):
            rows = torch.load(shard).shape[0]
            data = torch.frombuffer(bytearray(MARKER * (rows * 8 * 2 // len(MARKER))), dtype=torch.bfloat16)
            torch.save(data.reshape(rows, 8).clone(), shard)


def _plain_split(path: Path) -> None:
    make_split(path, total=40, hidden=8, layers=2, shard_size=20, batch_size=10)


def _store(pt_split: Path, out: Path, to: str) -> Path:
    """``pt_split`` converted to ``to`` under ``out``; the store's path."""
    convert(pt_split, out, to, compression="none" if to in ("zarr", "hdf5") else None, force=True)
    (found,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return found


def _first_chunk(store: Path) -> Path:
    files = sorted(
        p
        for p in (store / "layer_00").rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"
    )
    assert files, list((store / "layer_00").rglob("*"))
    return files[0]


def _link(place: Path, target: Path) -> None:
    if place.is_dir() and not place.is_symlink():
        import shutil

        shutil.rmtree(place)
    else:
        place.unlink()
    place.symlink_to(target)


#: attack name -> (format of the tree, how to plant the link: (tree split, secret split) -> None)
ATTACKS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "pt-shard": ("pt", lambda t, s: _link(t / "layer_00" / "shard_000.pt", s / "layer_00" / "shard_000.pt")),
    "pt-layer-dir": ("pt", lambda t, s: _link(t / "layer_01", s / "layer_01")),
    "pt-metadata": ("pt", lambda t, s: _link(t / "metadata.json", s / "metadata.json")),
    "zarr-chunk": ("zarr", lambda t, s: _link(_first_chunk(t), _first_chunk(s))),
    "safetensors-layer": (
        "safetensors",
        lambda t, s: _link(t / "layer_00.safetensors", s / "layer_00.safetensors"),
    ),
    "h5-file": ("hdf5", lambda t, s: _link(t, s)),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per format: (a clean store, the secret store), built once."""
    base = tmp_path_factory.mktemp("stores")
    _plain_split(base / "pt-plain" / "EM")
    _marker_split(base / "pt-secret" / "EM")
    out = {"pt": (base / "pt-plain" / "EM", base / "pt-secret" / "EM")}
    for to in ("zarr", "safetensors", "hdf5"):
        out[to] = (
            _store(base / "pt-plain" / "EM", base / f"{to}-plain", to),
            _store(base / "pt-secret" / "EM", base / f"{to}-secret", to),
        )
    return out


def _attack_tree(tmp_path: Path, stores: dict[str, tuple[Path, Path]], attack: str) -> tuple[Path, Path]:
    """A tree ``tmp_path/tree/ds/<split>`` with the attack planted; (tree, secret store)."""
    import shutil

    fmt, plant = ATTACKS[attack]
    plain, secret_src = stores[fmt]
    secret = tmp_path / "elsewhere" / secret_src.name
    if secret_src.is_dir():
        shutil.copytree(secret_src, secret)
    else:
        secret.parent.mkdir(parents=True)
        shutil.copy(secret_src, secret)
    split = tmp_path / "tree" / "ds" / plain.name
    split.parent.mkdir(parents=True)
    if plain.is_dir():
        shutil.copytree(plain, split)
    else:
        shutil.copy(plain, split)
    plant(split, secret)
    return tmp_path / "tree", secret


def _snapshot(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def _no_marker_below(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.exists() else []:
        if p.is_file() and not p.is_symlink():
            assert MARKER not in p.read_bytes(), p


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_link_out_of_the_tree_is_act005_and_never_read(
    tmp_path: Path, stores: dict[str, tuple[Path, Path]], attack: str
) -> None:
    tree, secret = _attack_tree(tmp_path, stores, attack)
    before = _snapshot(secret)
    runner = CliRunner()
    outputs = []
    for fmt in ("text", "json", "sarif", "junit"):
        res = runner.invoke(cli, ["validate", str(tree), "--output-format", fmt])
        outputs.append(res.output)
        assert res.exit_code == 1, res.output
        assert "ACT005" in res.output, res.output
    deep = runner.invoke(cli, ["validate", str(tree), "--deep", "--output-format", "json"])
    assert deep.exit_code == 1, deep.output
    codes = {f["code"] for f in json.loads(deep.output)["issues"]}
    assert "ACT005" in codes
    report = validate(tree)
    act005 = [f for f in report.findings if f.code == "ACT005"]
    assert act005 and all(f.severity == "error" for f in act005)
    # every command: a finding or a clean error, never the secret's bytes, never an internal error
    for args in (
        ["info", str(tree)],
        ["stats", str(tree)],
        ["convert", str(tree), str(tmp_path / "out-pt"), "--to", "pt"],
        ["convert", str(tree), str(tmp_path / "out-force"), "--to", "pt", "--force"],
        ["convert", str(tree), str(tmp_path / "out-zarr"), "--to", "zarr", "--force"],
        ["verify", str(tree), str(tree)],
    ):
        res = runner.invoke(cli, args)
        outputs.append(res.output)
        # info and stats may describe what is inside the tree (exit 0); the rest refuse
        assert res.exit_code in ((0, 1, 2) if args[0] in ("info", "stats") else (1, 2)), (args, res.output)
        assert "internal error" not in res.output, (args, res.output)
        assert not isinstance(res.exception, AssertionError)
    for text in outputs:
        assert MARKER.decode() not in text
    for out in ("out-pt", "out-force", "out-zarr"):
        _no_marker_below(tmp_path / out)
    assert _snapshot(secret) == before  # nothing outside the tree changed


@pytest.mark.parametrize("attack", ["pt-shard", "pt-layer-dir", "zarr-chunk", "safetensors-layer", "h5-file"])
def test_the_reader_refuses_a_link_out_of_the_tree(
    tmp_path: Path, stores: dict[str, tuple[Path, Path]], attack: str
) -> None:
    import actfmt

    tree, _ = _attack_tree(tmp_path, stores, attack)
    got: list[bytes] = []
    try:
        for split in actfmt.open_tree(tree).values():  # the .h5 link is no split of the tree: not opened
            with split:
                for i in split.layers:
                    got.append(split.layer(i)[0:40].contiguous().view(torch.uint8).numpy().tobytes())
    except ActfmtError as exc:
        assert "outside the tree" in str(exc)
        assert MARKER.decode() not in str(exc)
    assert not any(MARKER in b for b in got)  # a layer behind the link is refused or left out, never read


def test_a_link_that_stays_inside_the_tree_is_followed(tmp_path: Path) -> None:
    _plain_split(tmp_path / "tree" / "ds" / "EM")
    _plain_split(tmp_path / "tree" / "ds" / "Neutral")
    inner = tmp_path / "tree" / "ds" / "Neutral" / "layer_01"
    keep = tmp_path / "tree" / "ds" / "EM" / "layer_01"
    import shutil

    shutil.rmtree(inner)
    shutil.copytree(keep, tmp_path / "tree" / "kept_layer")
    inner.symlink_to(tmp_path / "tree" / "kept_layer")
    report = validate(tmp_path / "tree")
    assert not [f for f in report.findings if f.code in ("ACT001", "ACT005")], report.findings


def test_confinement_travels_with_a_location(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "tree").mkdir()
    (tmp_path / "secret").write_bytes(MARKER)
    (tmp_path / "tree" / "inside").write_bytes(b"ok")
    (tmp_path / "tree" / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "tree" / "good-link").symlink_to(tmp_path / "tree" / "inside")
    root = resolve(str(tmp_path / "tree"))
    assert isinstance(root, LocalLocation) and root.root == os.path.realpath(tmp_path / "tree")
    for loc in (
        root / "link",
        root.joinpath("x").parent / "link",
        (root / "inside").with_name("link"),
        pickle.loads(pickle.dumps(root / "link")),
        (root / "link").pinned((1, 2, 3, 4)),
    ):
        assert isinstance(loc, LocalLocation) and loc.root == root.root
        for op in (loc.read_bytes, loc.stat, loc.open_input, loc.mmap, lambda loc=loc: loc.read_range(0, 4)):
            with pytest.raises(OutsideTreeError, match="outside the tree"):
                op()
    assert (root / "good-link").read_bytes() == b"ok"
    for climbing in ("..", "a/../../secret", "c/../.."):
        with pytest.raises(OutsideTreeError, match="climbs out"):
            root / climbing
    assert (root / "a..b").name == "a..b"  # a name with dots is a name
    kinds = {e.name: e.kind for e in root.list_dir()}
    assert kinds == {"inside": "file", "link": "outside", "good-link": "file"}
    with pytest.raises(OutsideTreeError):
        root.find()
    assert root.escaping_links() == [("link", os.path.realpath(tmp_path / "secret"))]
    # without a root (an internal location), nothing changes
    assert LocalLocation(tmp_path / "tree" / "link").read_bytes() == MARKER


# -- destinations ----------------------------------------------------------------------------------------------
def _sentinel_dir(path: Path) -> bytes:
    path.mkdir(parents=True)
    data = b"a user's own file, not an actfmt store\n"
    (path / "notes.txt").write_bytes(data)
    return data


@pytest.fixture
def zarr_named_documents(tmp_path: Path) -> Path:
    """A source tree holding ``Documents.zarr`` (converted --to pt, it maps to ``DST/Documents``)."""
    _plain_split(tmp_path / "pt" / "Documents")
    convert(tmp_path / "pt" / "Documents", tmp_path / "crafted", "zarr")
    assert (tmp_path / "crafted" / "Documents.zarr").is_dir()
    return tmp_path / "crafted"


def test_overwrite_never_deletes_a_home_directory_that_is_not_a_store(
    tmp_path: Path, zarr_named_documents: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home" / "user"
    data = _sentinel_dir(home / "Documents")
    monkeypatch.setenv("HOME", str(home))
    res = CliRunner().invoke(
        cli, ["convert", str(zarr_named_documents), str(home), "--to", "pt", "--overwrite"]
    )
    assert res.exit_code == 2, res.output
    assert "not a complete actfmt pt store" in res.output and "Documents" in res.output
    assert (home / "Documents" / "notes.txt").read_bytes() == data
    assert sorted(p.name for p in (home / "Documents").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in home.iterdir()) == ["Documents"]  # no lock, partial or journal left


def test_the_home_directory_itself_is_never_a_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home" / "user"
    data = _sentinel_dir(home)
    monkeypatch.setenv("HOME", str(home))
    _plain_split(tmp_path / "pt" / "user")
    convert(tmp_path / "pt" / "user", tmp_path / "crafted", "zarr")  # crafted/user.zarr -> home/user
    for dst in (home.parent, tmp_path / "home" / "." / "user" / ".."):
        res = CliRunner().invoke(
            cli, ["convert", str(tmp_path / "crafted"), str(dst), "--to", "pt", "--overwrite"]
        )
        assert res.exit_code == 2, res.output
        assert "never writes or replaces" in res.output
    assert (home / "notes.txt").read_bytes() == data
    assert sorted(p.name for p in home.parent.iterdir()) == ["user"]


def test_the_root_directory_is_never_a_destination(tmp_path: Path) -> None:
    _plain_split(tmp_path / "pt" / "etc")
    before = sorted(os.listdir("/"))
    for args in (["--overwrite"], []):
        res = CliRunner().invoke(cli, ["convert", str(tmp_path / "pt"), "/", "--to", "zarr", *args])
        assert res.exit_code == 2, res.output
        assert "root directory" in res.output
    assert sorted(os.listdir("/")) == before


@pytest.mark.parametrize("what", ["directory", "file", "other-format"])
def test_overwrite_replaces_only_a_complete_store_of_the_target_format(tmp_path: Path, what: str) -> None:
    _plain_split(tmp_path / "src" / "EM")
    final = tmp_path / "dst" / "EM.h5"
    if what == "directory":
        data = _sentinel_dir(final)
        keep = final / "notes.txt"
    elif what == "file":
        final.parent.mkdir(parents=True)
        data = b"my thesis\n"
        final.write_bytes(data)
        keep = final
    else:  # a complete zarr store, renamed to the .h5 name: not an hdf5 store
        convert(tmp_path / "src", tmp_path / "z", "zarr")
        final.parent.mkdir(parents=True)
        os.rename(tmp_path / "z" / "EM.zarr", final)
        keep = final / "zarr.json"
        data = keep.read_bytes()
    res = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hdf5", "--overwrite"]
    )
    assert res.exit_code == 2, res.output
    assert str(final) in res.output and "not a complete actfmt hdf5 store" in res.output
    assert keep.read_bytes() == data
    assert sorted(p.name for p in final.parent.iterdir()) == ["EM.h5"]


def test_overwrite_still_replaces_a_complete_store(tmp_path: Path) -> None:
    _plain_split(tmp_path / "src" / "EM")
    convert(tmp_path / "src", tmp_path / "dst", "zarr")
    res = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "zarr", "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    assert validate(tmp_path / "dst").exit_code() == 0


def test_two_sources_for_one_destination_are_refused_when_planning(tmp_path: Path) -> None:
    _plain_split(tmp_path / "src" / "EM")
    convert(tmp_path / "src" / "EM", tmp_path / "zarr", "zarr")
    os.rename(tmp_path / "zarr" / "EM.zarr", tmp_path / "src" / "EM.zarr")
    res = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "pt", "--overwrite"]
    )
    assert res.exit_code == 2, res.output
    assert "two sources convert to this one destination" in res.output
    assert "EM.zarr" in res.output
    assert not (tmp_path / "dst").exists()


# -- lock, journal, partial and temporary files ------------------------------------------------------------------
@pytest.fixture
def shared(open_tmp: Path) -> Path:
    """A sticky, world-writable directory (like /tmp) holding a source split and a victim file."""
    open_tmp.chmod(0o1777)
    _plain_split(open_tmp / "src" / "EM")
    world_readable(open_tmp / "src")
    (open_tmp / "out").mkdir()
    (open_tmp / "out").chmod(0o1777)
    victim = open_tmp / "out" / "victim.txt"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o666)
    return open_tmp


PLANTED = {
    "lock": ".EM.zarr.actfmt-lock",
    "journal-temporary": ".EM.zarr.actfmt-state.jsonl.actfmt-tmp",
    "journal": ".EM.zarr.actfmt-state.jsonl",
    "partial": ".EM.zarr.actfmt-partial",
}


def _plant(shared: Path, which: str, owner: int | None) -> Path:
    link = shared / "out" / PLANTED[which]
    link.symlink_to(shared / "out" / "victim.txt")
    if owner is not None:
        os.lchown(link, owner, owner)
    return link


@pytest.mark.parametrize("unprivileged", [False, True], ids=["as-root-or-self", "as-nobody"])
@pytest.mark.parametrize("which", sorted(PLANTED))
def test_a_planted_link_is_never_written_through(shared: Path, which: str, unprivileged: bool) -> None:
    if unprivileged:
        as_user_prefix()  # skips without setpriv
        if os.geteuid() != 0:
            pytest.skip("needs root to run as another user")
    # the attacker is the other user: the victim runs the conversion
    attacker = None if os.geteuid() != 0 else (0 if unprivileged else 65534)
    _plant(shared, which, attacker)
    res = run(
        actfmt_cmd("convert", str(shared / "src"), str(shared / "out"), "--to", "zarr"),
        unprivileged=unprivileged,
    )
    assert (shared / "out" / "victim.txt").read_bytes() == b"precious\n", res.stderr
    assert "internal error" not in res.stderr
    if which == "lock":
        assert res.returncode == 2, res.stderr
        assert "symbolic link" in res.stderr and ".EM.zarr.actfmt-lock" in res.stderr
    elif res.returncode == 0:  # the planted link was removed (the link, not its target), or avoided
        assert validate(shared / "out").exit_code() == 0
    else:  # refused, saying where
        assert res.returncode == 2 and PLANTED[which] in res.stderr, res.stderr


def test_the_stale_lock_warning_shows_only_a_process_number(tmp_path: Path) -> None:
    _plain_split(tmp_path / "src" / "EM")
    (tmp_path / "out").mkdir()
    for content, shown in (("4000000 host 2026", "process 4000000"), ("::error file=x::pwned\n", None)):
        (tmp_path / "out" / ".EM.zarr.actfmt-lock").write_text(content)
        res = run(
            actfmt_cmd("convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "zarr", "--overwrite")
        )
        assert res.returncode == 0, res.stderr
        assert "pwned" not in res.stderr and "::error" not in res.stderr
        if shown:
            assert shown in res.stderr
        else:
            assert "stale lock" not in res.stderr


def test_write_bytes_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "f.actfmt-tmp").symlink_to(victim)
    (tmp_path / "g").symlink_to(victim)
    LocalLocation(tmp_path / "f").write_bytes(b"new", atomic=True)
    assert (tmp_path / "f").read_bytes() == b"new" and not (tmp_path / "f").is_symlink()
    with pytest.raises(OSError, match="symbolic link"):
        LocalLocation(tmp_path / "g").write_bytes(b"new")
    with pytest.raises(OSError, match="symbolic link"):
        LocalLocation(tmp_path / "g").append_line("new")
    assert not LocalLocation(tmp_path / "g").create_exclusive(b"new")
    assert victim.read_bytes() == b"precious"


# -- a pt tree replaced under its reader -------------------------------------------------------------------------
def _constant_split(path: Path, value: float) -> None:
    """A 2-layer split whose every value is ``value``."""
    _plain_split(path)
    for layer in ("layer_00", "layer_01"):
        for shard in sorted((path / layer).iterdir()):
            rows = torch.load(shard).shape[0]
            torch.save(torch.full((rows, 8), value, dtype=torch.bfloat16), shard)


def test_the_pt_reader_notices_a_tree_renamed_into_its_place(tmp_path: Path) -> None:
    import actfmt
    from actfmt.errors import ChangedError

    _constant_split(tmp_path / "EM", 1.0)
    _constant_split(tmp_path / "B", 2.0)
    with actfmt.open(tmp_path / "EM") as split:
        assert float(split.layer(0)[0:40].float().mean()) == 1.0
        os.rename(tmp_path / "EM", tmp_path / "A")
        os.rename(tmp_path / "B", tmp_path / "EM")
        with pytest.raises(ChangedError, match="replaced"):
            split.layer(1)[0:40]


def test_a_pt_reader_never_mixes_two_trees_swapped_under_it(tmp_path: Path) -> None:
    """``convert --overwrite`` as a reader sees it: the split's name alternately holds two trees (renames);
    each open reads all of one tree, or fails cleanly -- never rows of both."""
    import threading
    import time

    import actfmt
    from actfmt.errors import ChangedError

    _constant_split(tmp_path / "EM", 1.0)
    _constant_split(tmp_path / "hold", 2.0)
    stop = threading.Event()

    def swap() -> None:
        names = ["hold", "spare"]
        while not stop.is_set():
            os.rename(tmp_path / "EM", tmp_path / names[1])
            os.rename(tmp_path / names[0], tmp_path / "EM")
            names.reverse()
            stop.wait(0.002)  # a pause now and then, so that some opens complete between two swaps

    swapper = threading.Thread(target=swap)
    swapper.start()
    whole = changed = gone = 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                with actfmt.open(tmp_path / "EM") as split:
                    layers = list(split.layers)
                    values = {float(v) for i in layers for v in split.layer(i)[0:40].float().unique()}
            except ChangedError:
                changed += 1
                continue
            except (ActfmtError, FileNotFoundError):  # between the two renames, nothing is there
                gone += 1
                continue
            assert len(values) == 1, f"rows of two trees in one read: {values} (layers {layers})"
            whole += 1
    finally:
        stop.set()
        swapper.join()
    assert whole > 0, (whole, changed, gone)


# -- object storage that never answers ---------------------------------------------------------------------------
@pytest.fixture
def silent_endpoint() -> Any:
    """A loopback TCP server that accepts every connection and never sends a byte."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_silent_endpoint_times_out_with_a_clear_message(silent_endpoint: str) -> None:
    import time

    pytest.importorskip("s3fs")
    secret = "very-secret-key-0123456789"
    options = {
        "endpoint_url": silent_endpoint,
        "key": "AKIAEXAMPLEKEY",
        "secret": secret,
        "connect_timeout": 0.5,
        "read_timeout": 0.5,
    }
    t0 = time.monotonic()
    res = CliRunner().invoke(
        cli, ["validate", "s3://bucket/Activations", "--storage-options", json.dumps(options)]
    )
    elapsed = time.monotonic() - t0
    assert res.exit_code == 2, res.output
    assert "did not answer in time" in res.output and "read timeout 0.5 s" in res.output, res.output
    assert "s3://bucket/Activations" in res.output
    assert secret not in res.output and "internal error" not in res.output
    assert elapsed < 20, elapsed


def test_timeouts_have_defaults_and_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from actfmt.storage.fsspec_ import _with_timeouts, timeouts

    monkeypatch.delenv("ACTFMT_CONNECT_TIMEOUT", raising=False)
    monkeypatch.delenv("ACTFMT_READ_TIMEOUT", raising=False)
    assert timeouts(None) == (10.0, 30.0)
    monkeypatch.setenv("ACTFMT_READ_TIMEOUT", "7")
    assert timeouts({}) == (10.0, 7.0)
    assert timeouts({"read_timeout": 2, "connect_timeout": "1.5"}) == (1.5, 2.0)
    for bad in ("soon", 0, -1, "nan", "inf"):
        with pytest.raises(ActfmtError, match="positive number of seconds"):
            timeouts({"read_timeout": bad})
    s3 = _with_timeouts("s3://b/k", {"read_timeout": 3, "anon": True})
    assert "read_timeout" not in s3 and s3["anon"] is True
    assert s3["config_kwargs"]["read_timeout"] == 3 and s3["config_kwargs"]["connect_timeout"] == 10.0
    mine = _with_timeouts("s3://b/k", {"config_kwargs": {"read_timeout": 99}})
    assert mine["config_kwargs"]["read_timeout"] == 99  # the filesystem's own option wins
    assert _with_timeouts("memory://x", {"read_timeout": 3}) == {}


def test_links_out_of_the_tree_as_an_unprivileged_user_in_a_shared_directory(shared: Path) -> None:
    """The symlink cases in a sticky, world-writable directory, run by an unprivileged user (root drops its
    privileges with setpriv; any other user runs as itself)."""
    _marker_split(shared / "elsewhere" / "EM")
    tree = shared / "tree"
    _plain_split(tree / "ds" / "EM")
    _link(
        tree / "ds" / "EM" / "layer_00" / "shard_001.pt",
        shared / "elsewhere" / "EM" / "layer_00" / "shard_001.pt",
    )
    (tree / "ds" / "Neutral").symlink_to(shared / "elsewhere" / "EM")  # a whole split out of the tree
    world_readable(shared / "elsewhere")
    world_readable(tree)
    res = run(actfmt_cmd("validate", str(tree), "--output-format", "json"), unprivileged=os.geteuid() == 0)
    assert res.returncode == 1, res.stderr
    found = {(f["code"], f["location"], f["severity"]) for f in json.loads(res.stdout)["issues"]}
    assert ("ACT005", "ds/EM/layer_00/shard_001.pt", "error") in found, found
    assert ("ACT005", "ds/Neutral", "error") in found, found
    out = shared / "out" / "conv"
    res2 = run(
        actfmt_cmd("convert", str(tree), str(out), "--to", "pt", "--force"), unprivileged=os.geteuid() == 0
    )
    assert res2.returncode == 2 and "outside the tree" in res2.stderr, res2.stderr
    for text in (res.stdout, res.stderr, res2.stdout, res2.stderr):
        assert MARKER.decode() not in text
    _no_marker_below(shared / "out")
