"""A corpus of crafted trees and stores: one per attack family of issue 16 (the trust boundary), built by code.

    python -m tests.crafted OUTDIR          # or scripts/make_crafted.py OUTDIR

Every case is a *workspace* ``OUTDIR/<case>/``:

* ``tree/``    what the commands are run on (the crafted tree or store; ``Case.root``);
* ``outside/`` files outside the tree: ``sentinel.txt`` (the secret token) and the secret copies the crafted
  links, external datasets and chunk keys point at.  Their data bytes are the token repeated, so a copy of
  them is seen in any uncompressed output (``convert --to pt``, ``--to zarr --compression none``);
* ``pair/``    (some cases) a valid split to ``verify`` against.

The token is random per build (``Corpus.token``); it is never written inside a ``tree/`` except where a case
says so (``zarr_key_dotdot``: the file beside the store).  Valid trees are built with
:func:`tests._trees.make_split`, converted with :func:`actfmt.convert` and then damaged.

``Case.expect`` is the finding codes ``validate`` must report (any of them; ``None``: validate cannot see the
attack, exit 0 or 1 with any findings), ``Case.expect_deep`` the same for ``validate --deep``.  Codes not yet
decided elsewhere: ACT005 link leaving the tree, ACT007 external data (HDF5 external storage / virtual
dataset / external link, zarr key outside the store), ACT201 bad JSON, ACT605 store shape disagrees with its
metadata, ACT606 bad store header / implausible declared size, ACT602 checksum mismatch.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actfmt.conversion import convert as actfmt_convert

__all__ = ["CASES", "Case", "Corpus", "build", "build_case"]

ROWS, HIDDEN, LAYERS, SHARD, BATCH = 40, 8, 2, 16, 8  # shards of 16, 16, 8 rows
#: name -> Case
CASES: dict[str, Case] = {}


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    area: str  # whose branch fixes it: storage, sizes, output, convert (unassigned)
    doc: str
    build: Callable[[Path, Kit], None]
    expect: tuple[str, ...] | None  # validate (header-only) must report one of these codes
    expect_deep: tuple[str, ...] | None  # validate --deep must report one of these codes
    root: str = "tree"  # what validate / info / stats / convert run on, relative to the workspace
    split: str | None = None  # the split `actfmt.open` reads, relative to the workspace
    pair: str | None = None  # a split to verify `split` against
    limits: bool = False  # a bomb: run only as a subprocess under prlimit and timeout
    unprivileged: bool = False  # a link case: also run as an unprivileged user in a sticky directory
    kind: str = "tree"  # tree: the standard matrix; destination / lock / collision / remote: own scenario
    cwd: bool = False  # depends on the current directory (every run uses the workspace): relative HDF5 paths
    open_tree: bool = False  # `open` reads the tree (actfmt.open_tree): the split's own path is the link
    tags: tuple[str, ...] = field(default=())


def case(
    name: str, family: str, area: str, doc: str, expect: Any, expect_deep: Any = "same", **kw: Any
) -> Any:
    def deco(fn: Callable[[Path, Kit], None]) -> Callable[[Path, Kit], None]:
        exp = (expect,) if isinstance(expect, str) else expect
        deep = (
            exp
            if expect_deep == "same"
            else ((expect_deep,) if isinstance(expect_deep, str) else expect_deep)
        )
        CASES[name] = Case(name, family, area, doc, fn, exp, deep, **kw)
        return fn

    return deco


# -------------------------------------------------------------------------------------------------------------
# building blocks


def _torch() -> Any:
    import torch

    return torch


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def valid_split(path: Path, seed: int = 0, **kw: Any) -> None:
    """A small valid pt split: 2 layers of 40 x 8 bfloat16, shards of 16, 16, 8 rows."""
    from tests._trees import make_split

    args = {"total": ROWS, "hidden": HIDDEN, "layers": LAYERS, "shard_size": SHARD, "batch_size": BATCH}
    make_split(path, seed=seed, **{**args, **kw})


def convert_split(src: Path, dst_dir: Path, to: str, **kw: Any) -> Path:
    """``actfmt.convert`` of one split into ``dst_dir``; returns the store (``EM.zarr``, ``EM.h5``, ``EM/``)."""

    result = actfmt_convert(src, dst_dir, to=to, jobs=1, **kw)
    (job,) = result.splits
    return Path(str(job.destination))


def token_tensor(token: str, rows: int = ROWS, hidden: int = HIDDEN) -> Any:
    """bfloat16 values whose bytes are the token repeated (hex digits: every value finite)."""
    torch = _torch()
    raw = (token.encode() * (rows * hidden * 2 // len(token) + 1))[: rows * hidden * 2]
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch.bfloat16).reshape(rows, hidden).clone()
    )


class Kit:
    """Shared material of one corpus build: the token and the secret stores (built once, copied per case)."""

    def __init__(self, cache: Path, token: str) -> None:
        self.cache = cache
        self.token = token
        self._done: dict[str, Path] = {}

    # the secret: a valid split whose values are the token's bytes, in every format
    def secret(self, fmt: str) -> Path:
        key = f"secret-{fmt}"
        if key not in self._done:
            pt = self.cache / "secret-pt" / "EM"
            if "secret-pt" not in self._done:
                self._write_secret_pt(pt)
                self._done["secret-pt"] = pt
            if fmt != "pt":
                opts = {"compression": "none"} if fmt in ("zarr", "hdf5") else {}
                self._done[key] = convert_split(pt, self.cache / key, fmt, stats=False, **opts)
        return self._done[key]

    def _write_secret_pt(self, split: Path) -> None:
        from actfmt.layout import expected_shard_rows, layer_name, shard_name

        torch = _torch()
        split.mkdir(parents=True)
        meta = secret_meta(self.token)
        write_json(split / "metadata.json", meta)
        for i in range(LAYERS):
            full = token_tensor(self.token)
            start = 0
            (split / layer_name(i)).mkdir()
            for j, n in enumerate(expected_shard_rows(ROWS, SHARD, BATCH)):
                torch.save(full[start : start + n].clone(), split / layer_name(i) / shard_name(j))
                start += n
        # the secret split's metadata names the split as the crafted trees do: only its bytes differ
        meta["dataset_name"] = "tree"
        write_json(split / "metadata.json", meta)

    def valid(self, fmt: str, compression: str | None = None, zarr_format: int | None = None) -> Path:
        """A valid split ``EM`` (seed 0) in ``fmt``, built once."""
        key = f"valid-{fmt}-{compression}-{zarr_format}"
        if key not in self._done:
            pt = self.cache / "valid-pt" / "tree" / "EM"
            if "valid-pt" not in self._done:
                valid_split(pt)
                self._done["valid-pt"] = pt
            if fmt == "pt":
                return pt
            opts: dict[str, Any] = {}
            if compression:
                opts["compression"] = compression
            if zarr_format:
                opts["zarr_format"] = zarr_format
            self._done[key] = convert_split(pt, self.cache / key, fmt, **opts)
        return self._done[key]

    def copy(self, src: Path, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
        return dst

    def outside(self, ws: Path) -> Path:
        """``ws/outside`` with the sentinel file (the token)."""
        out = ws / "outside"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sentinel.txt").write_text(self.token + "\n")
        return out


def secret_meta(token: str) -> dict[str, Any]:
    return {
        "model_name": "org/Tiny-Model",
        "dataset_name": token,
        "split": "EM",
        "load_in_4bit": False,
        "total_examples": ROWS,
        "shard_size": SHARD,
        "batch_size": BATCH,
        "hidden_dim": HIDDEN,
        "num_layers": LAYERS,
        "secret": token,
    }


def link(at: Path, target: Path, relative: bool = True) -> None:
    """``at`` becomes a symlink to ``target`` (a relative link by default: it survives a moved corpus)."""
    if at.is_dir() and not at.is_symlink():
        shutil.rmtree(at)
    elif at.exists() or at.is_symlink():
        at.unlink()
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent) if relative else target)


def tree_pt(ws: Path, kit: Kit) -> Path:
    return kit.copy(kit.valid("pt"), ws / "tree" / "EM")


def tree_store(ws: Path, kit: Kit, fmt: str, **kw: Any) -> Path:
    src = kit.valid(fmt, **kw)
    return kit.copy(src, ws / "tree" / src.name)


def pair(ws: Path, kit: Kit) -> None:
    kit.copy(kit.valid("pt"), ws / "pair" / "EM")


def edit_array(store: Path, layer: str, fn: Callable[[dict[str, Any]], None]) -> None:
    path = store / layer / "zarr.json"
    doc = read_json(path)
    fn(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")


def edit_root(store: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    path = store / "zarr.json"
    doc = read_json(path)
    fn(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")


def h5_copy_without(src: Path, dst: Path, drop: str) -> Any:
    """``dst``: a copy of the store ``src`` without dataset ``drop`` (the file is returned open, r+)."""
    import h5py

    shutil.copy2(src, dst)
    f = h5py.File(dst, "r+")
    attrs = dict(f[drop].attrs)
    del f[drop]
    return f, attrs


# -------------------------------------------------------------------------------------------------------------
# 1. links out of the tree, inside every format (ACT005)

LINK = {"family": "link", "area": "storage", "unprivileged": True}


@case(
    "link_pt_shard",
    doc="layer_00/shard_001.pt -> a valid shard outside the tree",
    expect="ACT005",
    split="tree/EM",
    pair="pair/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    split = tree_pt(ws, kit)
    shard = kit.copy(kit.secret("pt") / "layer_00" / "shard_001.pt", out / "secret.pt")
    link(split / "layer_00" / "shard_001.pt", shard)
    pair(ws, kit)


@case(
    "link_pt_shard_abs",
    doc="layer_01/shard_002.pt -> an absolute link to a shard outside",
    expect="ACT005",
    split="tree/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    split = tree_pt(ws, kit)
    shard = kit.copy(kit.secret("pt") / "layer_01" / "shard_002.pt", out / "secret.pt")
    link(split / "layer_01" / "shard_002.pt", shard.resolve(), relative=False)


@case(
    "link_layer_dir",
    doc="layer_01/ -> a layer directory outside the tree",
    expect="ACT005",
    split="tree/EM",
    pair="pair/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    split = tree_pt(ws, kit)
    layer = kit.copy(kit.secret("pt") / "layer_01", out / "secret_layer")
    link(split / "layer_01", layer)
    pair(ws, kit)


@case(
    "link_metadata",
    doc="metadata.json -> a JSON file outside (valid metadata naming the token)",
    expect="ACT005",
    split="tree/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    split = tree_pt(ws, kit)
    meta = secret_meta(kit.token)
    meta["dataset_name"] = "tree"
    meta["model_name"] = f"org/{kit.token}"
    write_json(out / "secret.json", meta)
    link(split / "metadata.json", out / "secret.json")


@case(
    "link_split_dir",
    doc="the split EM/ -> a split directory outside",
    expect="ACT005",
    split="tree/EM",
    open_tree=True,
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    split = kit.copy(kit.secret("pt"), out / "secret_split")
    link(ws / "tree" / "EM", split)


@case(
    "link_zarr_chunk",
    doc="EM.zarr/layer_00/c.0.0 -> a raw chunk outside",
    expect="ACT005",
    split="tree/EM.zarr",
    pair="pair/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "zarr", compression="none")
    chunk = kit.copy(kit.secret("zarr") / "layer_00" / "c.0.0", out / "secret_chunk")
    link(store / "layer_00" / "c.0.0", chunk)
    pair(ws, kit)


@case(
    "link_zarr_json",
    doc="EM.zarr/zarr.json -> group metadata outside (attributes naming the token)",
    expect="ACT005",
    split="tree/EM.zarr",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "zarr", compression="none")
    doc = read_json(store / "zarr.json")
    doc["attributes"]["model_name"] = f"org/{kit.token}"
    write_json(out / "secret_zarr.json", doc)
    link(store / "zarr.json", out / "secret_zarr.json")


@case(
    "link_zarr_array_dir",
    doc="EM.zarr/layer_01/ -> an array directory outside",
    expect="ACT005",
    split="tree/EM.zarr",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "zarr", compression="none")
    arr = kit.copy(kit.secret("zarr") / "layer_01", out / "secret_array")
    link(store / "layer_01", arr)


@case(
    "link_zarr_store",
    doc="EM.zarr -> a whole store outside",
    expect="ACT005",
    split="tree/EM.zarr",
    open_tree=True,
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    store = kit.copy(kit.secret("zarr"), out / "secret.zarr")
    link(ws / "tree" / "EM.zarr", store)


@case(
    "link_safetensors_layer",
    doc="EM/layer_00.safetensors -> a layer file outside",
    expect="ACT005",
    split="tree/EM",
    pair="pair/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    f = kit.copy(kit.secret("safetensors") / "layer_00.safetensors", out / "secret.safetensors")
    link(store / "layer_00.safetensors", f)
    pair(ws, kit)


@case(
    "link_safetensors_metadata",
    doc="EM/metadata.json of a safetensors store -> a file outside",
    expect="ACT005",
    split="tree/EM",
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    doc = read_json(store / "metadata.json")
    doc["model_name"] = f"org/{kit.token}"
    write_json(out / "secret.json", doc)
    link(store / "metadata.json", out / "secret.json")


@case(
    "link_h5_file",
    doc="EM.h5 -> an HDF5 store outside",
    expect="ACT005",
    split="tree/EM.h5",
    pair="pair/EM",
    open_tree=True,
    **LINK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    f = kit.copy(kit.secret("hdf5"), out / "secret.h5")
    link(ws / "tree" / "EM.h5", f)
    pair(ws, kit)


# -------------------------------------------------------------------------------------------------------------
# 2. data from outside through the format itself (ACT007)

EXT = {"family": "external", "area": "storage"}


def _h5_external(ws: Path, kit: Kit, target: str | Path) -> None:
    """layer_00 of EM.h5 becomes a dataset whose bytes live in ``target`` (HDF5 external storage)."""
    src = kit.valid("hdf5", compression="none")
    (ws / "tree").mkdir(parents=True)
    f, attrs = h5_copy_without(src, ws / "tree" / "EM.h5", "layer_00")
    with f:
        d = f.create_dataset(
            "layer_00", shape=(ROWS, HIDDEN), dtype="<u2", external=[(str(target), 0, ROWS * HIDDEN * 2)]
        )
        d.attrs.update(attrs)


@case(
    "h5_external_abs",
    doc="layer_00 is HDF5 external storage: an absolute path to a file outside",
    expect="ACT007",
    split="tree/EM.h5",
    pair="pair/EM",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    (out / "secret.bin").write_bytes(token_tensor(kit.token).view(_torch().uint16).numpy().tobytes())
    _h5_external(ws, kit, (out / "secret.bin").resolve())
    pair(ws, kit)


@case(
    "h5_external_rel",
    doc="external storage with a relative path (HDF5 resolves it against the current directory)",
    expect="ACT007",
    split="tree/EM.h5",
    cwd=True,
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    (out / "secret.bin").write_bytes(token_tensor(kit.token).view(_torch().uint16).numpy().tobytes())
    _h5_external(ws, kit, "outside/secret.bin")


@case(
    "h5_external_passwd",
    doc="external storage at /etc/passwd (the issue's example; nothing to leak-check but the read)",
    expect="ACT007",
    split="tree/EM.h5",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    _h5_external(ws, kit, "/etc/passwd")


@case(
    "h5_external_fifo",
    doc="external storage on a FIFO outside (reading it blocks forever)",
    expect="ACT007",
    split="tree/EM.h5",
    limits=True,
    family="external",
    area="storage",
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    os.mkfifo(out / "fifo")
    _h5_external(ws, kit, (out / "fifo").resolve())


@case(
    "h5_virtual",
    doc="layer_00 is a virtual dataset mapping a dataset of an HDF5 file outside",
    expect="ACT007",
    split="tree/EM.h5",
    pair="pair/EM",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    import h5py

    out = kit.outside(ws)
    secret = kit.copy(kit.secret("hdf5"), out / "secret.h5")
    (ws / "tree").mkdir(parents=True)
    f, attrs = h5_copy_without(kit.valid("hdf5", compression="none"), ws / "tree" / "EM.h5", "layer_00")
    with f:
        layout = h5py.VirtualLayout(shape=(ROWS, HIDDEN), dtype="<u2")
        layout[:] = h5py.VirtualSource(str(secret.resolve()), "layer_00", shape=(ROWS, HIDDEN))
        d = f.create_virtual_dataset("layer_00", layout, fillvalue=0)
        d.attrs.update(attrs)
    pair(ws, kit)


@case(
    "h5_external_link",
    doc="layer_00 is an HDF5 external link to a dataset of a file outside",
    expect="ACT007",
    split="tree/EM.h5",
    pair="pair/EM",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    import h5py

    out = kit.outside(ws)
    secret = kit.copy(kit.secret("hdf5"), out / "secret.h5")
    (ws / "tree").mkdir(parents=True)
    f, _attrs = h5_copy_without(kit.valid("hdf5", compression="none"), ws / "tree" / "EM.h5", "layer_00")
    with f:
        f["layer_00"] = h5py.ExternalLink(str(secret.resolve()), "/layer_00")
    pair(ws, kit)


def _zarr_separator(ws: Path, kit: Kit, sep: str) -> Path:
    store = tree_store(ws, kit, "zarr", compression="none")
    edit_array(store, "layer_00", lambda d: d["chunk_key_encoding"]["configuration"].update(separator=sep))
    (store / "layer_00" / "c.0.0").unlink()
    key = sep.join(["c", "0", "0"])
    # the kernel resolves `c/..` only if `c` exists: make every directory the key walks through
    parts = key.split("/")
    here = store / "layer_00"
    for part in parts[:-1]:
        here = here / part
        if part not in ("..", ".", "") and not os.path.lexists(here):
            here.mkdir()
    return Path(os.path.normpath(store / "layer_00" / key))


@case(
    "zarr_key_dotdot",
    doc='chunk_key_encoding separator "/../../": the chunk key names a file beside the store',
    expect="ACT007",
    split="tree/EM.zarr",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    target = _zarr_separator(ws, kit, "/../../")
    assert target.parent == ws / "tree", target
    kit.copy(kit.secret("zarr") / "layer_00" / "c.0.0", target)


@case(
    "zarr_key_escape",
    doc="a separator whose chunk key leaves the tree for outside/",
    expect="ACT007",
    split="tree/EM.zarr",
    **EXT,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    target = _zarr_separator(ws, kit, "/../../../outside/")
    assert target.parent == ws / "outside", target
    kit.copy(kit.secret("zarr") / "layer_00" / "c.0.0", target)


# -------------------------------------------------------------------------------------------------------------
# 3. destinations, locks, journals (own scenarios: see tests/test_untrusted.py)


@case(
    "dst_documents",
    family="destination",
    area="storage",
    kind="destination",
    expect=None,
    doc="the source holds Documents.zarr; convert SRC HOME --to pt --overwrite must not touch HOME/Documents",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = kit.valid("zarr")
    kit.copy(store, ws / "tree" / "Documents.zarr")
    home = ws / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.txt").write_text(kit.token + "\n")


@case(
    "dst_user_file",
    family="destination",
    area="storage",
    kind="destination",
    expect=None,
    doc="the final path dst/EM is a plain user file; --overwrite must refuse",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst").mkdir()
    (ws / "dst" / "EM.zarr").write_text(kit.token + "\n")


@case(
    "dst_user_dir",
    family="destination",
    area="storage",
    kind="destination",
    expect=None,
    doc="dst/EM.zarr is a plain directory of user files (no actfmt block); --overwrite must refuse",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst" / "EM.zarr").mkdir(parents=True)
    (ws / "dst" / "EM.zarr" / "notes.txt").write_text(kit.token + "\n")


@case(
    "dst_other_format",
    family="destination",
    area="storage",
    kind="destination",
    expect=None,
    doc="dst/EM.zarr is a complete safetensors store (plus a user file): not a store of the target format",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    tree_pt(ws, kit)
    kit.copy(kit.valid("safetensors"), ws / "dst" / "EM.zarr")
    (ws / "dst" / "EM.zarr" / "notes.txt").write_text(kit.token + "\n")


@case(
    "dst_root",
    family="destination",
    area="storage",
    kind="destination",
    expect=None,
    doc="DST=/ (and DST=$HOME): refused at planning (checked dry: every write primitive is trapped)",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    tree_pt(ws, kit)


LOCK = {"family": "lock", "area": "storage", "kind": "lock", "unprivileged": True, "expect": None}


@case("lock_symlink", doc="dst/.EM.zarr.actfmt-lock is a symlink to a victim file outside", **LOCK)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst").mkdir()
    (out / "victim.txt").write_text(f"{kit.token} is the first word of this file\n")
    link(ws / "dst" / ".EM.zarr.actfmt-lock", out / "victim.txt", relative=False)


@case(
    "journal_tmp_symlink",
    doc="dst/.EM.zarr.actfmt-state.jsonl.actfmt-tmp (the journal's temporary name) -> a victim",
    **LOCK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst").mkdir()
    (out / "victim.txt").write_text(f"{kit.token} is the first word of this file\n")
    link(ws / "dst" / ".EM.zarr.actfmt-state.jsonl.actfmt-tmp", out / "victim.txt", relative=False)


@case("journal_symlink", doc="dst/.EM.zarr.actfmt-state.jsonl (the journal, appended to) -> a victim", **LOCK)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst").mkdir()
    (out / "victim.txt").write_text(f"{kit.token} is the first word of this file\n")
    link(ws / "dst" / ".EM.zarr.actfmt-state.jsonl", out / "victim.txt", relative=False)


@case(
    "partial_symlink",
    doc="dst/.EM.zarr.actfmt-partial -> a directory outside (the store would be written there)",
    **LOCK,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    tree_pt(ws, kit)
    (ws / "dst").mkdir()
    (out / "victim_dir").mkdir()
    (out / "victim_dir" / "keep.txt").write_text(kit.token + "\n")
    link(ws / "dst" / ".EM.zarr.actfmt-partial", out / "victim_dir", relative=False)


@case(
    "collision_em_zarr",
    family="collision",
    area="storage",
    kind="collision",
    expect=None,
    doc="the source holds EM/ and EM.zarr (different data); --to pt maps both to dst/EM",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    tree_pt(ws, kit)
    valid_split(ws / "other" / "EM", seed=7)
    convert_split(ws / "other" / "EM", ws / "tree", "zarr")
    shutil.rmtree(ws / "other")


@case(
    "remote_silent_endpoint",
    family="remote",
    area="storage",
    kind="remote",
    expect=None,
    doc="an S3 endpoint that accepts the connection and never answers (validate must end with a clear timeout)",
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    (ws / "tree").mkdir()


# -------------------------------------------------------------------------------------------------------------
# 4. memory and time bombs: a few kB declaring GBs (run under prlimit + timeout only)

BOMB = {"family": "bomb", "area": "sizes", "limits": True}


@case(
    "zarr_shape_1e12",
    doc="layer_00 declares shape [10**12, 8] (chunks [40, 8]: 2.5e10 chunks)",
    expect="ACT606",
    split="tree/EM.zarr",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    edit_array(store, "layer_00", lambda d: d.update(shape=[10**12, HIDDEN]))


@case(
    "h5_shape_2_40",
    doc="layer_00 is a chunked dataset of shape (2**40, 8), chunks (1024, 8)",
    expect="ACT606",
    split="tree/EM.h5",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    f, attrs = h5_copy_without(kit.valid("hdf5"), ws / "tree" / "EM.h5", "layer_00")
    with f:
        d = f.create_dataset(
            "layer_00", shape=(2**40, HIDDEN), dtype="<u2", chunks=(1024, HIDDEN), compression="gzip"
        )
        d.attrs.update(attrs)


@case(
    "h5_gzip_bomb",
    doc="layer_00's one gzip chunk (declared 40 x 8) is a 1 MB stream inflating to ~1.1 GB",
    expect=None,
    expect_deep=("ACT606", "ACT602"),
    split="tree/EM.h5",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    import h5py

    kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    f, attrs = h5_copy_without(kit.valid("hdf5"), ws / "tree" / "EM.h5", "layer_00")
    stream = zlib_of_zeros(1 << 24, 66)  # 66 x 16 MiB = 1.1 GB
    with f:
        d = f.create_dataset(
            "layer_00", shape=(ROWS, HIDDEN), dtype="<u2", chunks=(ROWS, HIDDEN), compression="gzip"
        )
        d.id.write_direct_chunk((0, 0), stream, 0)
        d.attrs.update(attrs)
    del h5py


@case(
    "zarr_shard_rows_1e6",
    doc="layer_00's actfmt_shard_rows (and the actfmt block's) list 10**6 entries",
    expect="ACT606",
    split="tree/EM.zarr",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    rows = [1] * 10**6
    edit_array(store, "layer_00", lambda d: d["attributes"].update(actfmt_shard_rows=rows))
    edit_root(store, lambda d: d["attributes"]["actfmt"]["shard_rows"].update(layer_00=rows))


@case(
    "meta_bigint",
    doc="metadata.json total_examples is a 5000-digit integer",
    expect=("ACT201", "ACT203"),
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    split = tree_pt(ws, kit)
    text = (
        (split / "metadata.json")
        .read_text()
        .replace('"total_examples": 40', '"total_examples": ' + "9" * 5000)
    )
    (split / "metadata.json").write_text(text)


@case(
    "meta_deep_json",
    doc="metadata.json holds a list nested 100,000 deep",
    expect="ACT201",
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    split = tree_pt(ws, kit)
    text = (
        (split / "metadata.json")
        .read_text()
        .replace('"load_in_4bit": false', '"load_in_4bit": ' + "[" * 100_000 + "]" * 100_000)
    )
    (split / "metadata.json").write_text(text)


@case(
    "zarr_json_deep",
    doc="the store's zarr.json holds an attribute nested 100,000 deep",
    expect=("ACT201", "ACT606"),
    split="tree/EM.zarr",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    text = (
        (store / "zarr.json")
        .read_text()
        .replace('"load_in_4bit": false', '"load_in_4bit": ' + "[" * 100_000 + "]" * 100_000)
    )
    (store / "zarr.json").write_text(text)


def zlib_of_zeros(block: int, count: int) -> bytes:
    """A zlib stream of ``block * count`` zero bytes, built from one deflated block repeated (a full flush
    resets the compressor, so every later block deflates to the same bytes): ~1 MB for 1.1 GB, in 0.1 s."""
    zeros = bytes(block)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    unit = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    end = co.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(zeros, adler)
    return b"\x78\xda" + first + unit * (count - 1) + end + struct.pack(">I", adler)


def _st_header(
    path: Path, fn: Callable[[dict[str, Any]], Any], raw: Callable[[str], str] | None = None
) -> None:
    """Rewrite a safetensors file's JSON header (the data is kept)."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    head = json.loads(b[8 : 8 + n])
    data = b[8 + n :]
    fn(head)
    text = json.dumps(head, separators=(",", ":"))
    if raw:
        text = raw(text)
    body = text.encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@case(
    "st_shape_1e400",
    doc="a safetensors header declaring shape [1e400, 8] (JSON parses it as inf)",
    expect="ACT606",
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    _st_header(
        store / "layer_00.safetensors",
        lambda h: None,
        raw=lambda t: t.replace('"shape":[40,8]', '"shape":[1e400,8]'),
    )


@case(
    "st_header_huge",
    doc="a safetensors header length of 2**62 bytes (a 1 kB file)",
    expect=("ACT606", "ACT002"),
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    p = store / "layer_00.safetensors"
    b = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**62) + b[8:])


@case(
    "st_shape_huge",
    doc="a safetensors header declaring shape [2**40, 8] with 640 bytes of data (ACT605: the shape is not "
    "the metadata's, a fair reading too)",
    expect=("ACT606", "ACT002", "ACT605"),
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    _st_header(
        store / "layer_00.safetensors",
        lambda h: h["activations"].update(shape=[2**40, HIDDEN], data_offsets=[0, 2**44]),
    )


@case(
    "zarr_chunk_2_40",
    doc="layer_00 declares chunks [2**40, 8] (one chunk of 16 TiB)",
    expect="ACT606",
    split="tree/EM.zarr",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    edit_array(
        store, "layer_00", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[2**40, HIDDEN])
    )


@case(
    "pt_shape_huge",
    doc="a pt shard whose pickle declares a (2**40, 8) tensor over a 256-byte storage",
    expect="ACT002",
    split="tree/EM",
    **BOMB,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    split = tree_pt(ws, kit)
    _pt_patch_ints(split / "layer_00" / "shard_000.pt", {16: 2**40}, only_first=True)


# -------------------------------------------------------------------------------------------------------------
# 5. names that write to the CI log or the terminal (output escaping)

NAMES = {"family": "names", "area": "output"}
WEIRD = {
    "name_gh_error": "EM\n::error file=ci.yml,line=1::pwned",
    "name_add_mask": "EM\n::add-mask::secret-mask",
    "name_stop_commands": "EM\n::stop-commands::pwntoken",
    "name_esc_clear": "EM\x1b[2J\x1b[H",
}


def _named(ws: Path, kit: Kit, name: str | bytes) -> None:
    """A dataset with a valid split EM (with a stray file named ``name``) and a split named ``name`` that lacks
    its last shard (ACT301, so the name is in an error finding), plus a stray file and layer names."""
    kit.outside(ws)
    base = ws / "tree"
    tree_pt(ws, kit)
    bname = os.fsencode(name) if isinstance(name, str) else name
    weird = os.path.join(os.fsencode(base), bname)
    shutil.copytree(kit.valid("pt"), os.fsdecode(weird))
    wpath = Path(os.fsdecode(weird))
    meta = read_json(wpath / "metadata.json")
    shown = bname.decode("utf-8", "replace")  # metadata.json stays valid UTF-8 JSON (the \xff case)
    meta["split"] = shown
    meta["model_name"] = "org/" + shown
    (wpath / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    (wpath / "layer_01" / "shard_002.pt").unlink()
    with open(os.path.join(os.fsencode(base / "EM"), b"notes" + bname + b".txt"), "wb") as fh:
        fh.write(b"stray\n")


for _name, _value in WEIRD.items():

    def _mk(value: str) -> Callable[[Path, Kit], None]:
        return lambda ws, kit: _named(ws, kit, value)

    case(_name, doc=f"a split and a file named {_value!r}", expect="ACT301", split=None, **NAMES)(_mk(_value))


@case("name_xff", doc="a split and a file named with a \\xff byte (not UTF-8)", expect="ACT301", **NAMES)
def _(ws: Path, kit: Kit) -> None:
    _named(ws, kit, b"EM\xff")


# -------------------------------------------------------------------------------------------------------------
# 6. say OK, then fail: headers the readers cannot honour (a finding, never an internal error)

HEAD = {"family": "say-ok", "area": "sizes"}


def _zarr_case(
    name: str, doc: str, expect: Any, fn: Callable[[dict[str, Any]], None], layer: str = "layer_00", **kw: Any
) -> None:
    def build(ws: Path, kit: Kit) -> None:
        kit.outside(ws)
        store = tree_store(ws, kit, "zarr")
        edit_array(store, layer, fn)

    case(name, doc=doc, expect=expect, split="tree/EM.zarr", **{**HEAD, **kw})(build)


def _chunk_shape(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=shape)


_zarr_case("zarr_chunks_0", "layer_00 declares chunks [0, 8]", "ACT606", _chunk_shape([0, HIDDEN]))
_zarr_case("zarr_chunks_neg", "layer_00 declares chunks [-1, 8]", "ACT606", _chunk_shape([-1, HIDDEN]))
_zarr_case(
    "zarr_shape_cols_0",
    "layer_00 declares shape [40, 0]",
    ("ACT606", "ACT402"),
    lambda d: d.update(shape=[ROWS, 0]),
)
_zarr_case(
    "zarr_shape_neg", "layer_00 declares shape [-5, 8]", "ACT606", lambda d: d.update(shape=[-5, HIDDEN])
)
_zarr_case(
    "zarr_shape_float",
    "layer_00 declares shape [40.0, 8]",
    "ACT606",
    lambda d: d.update(shape=[40.0, HIDDEN]),
)
_zarr_case(
    "zarr_shape_3d",
    "layer_00 declares shape [40, 8, 1]",
    ("ACT606", "ACT401"),
    lambda d: d.update(shape=[ROWS, HIDDEN, 1]),
)
_zarr_case(
    "zarr_codec_unknown",
    "layer_00's compressor is a codec nobody knows",
    "ACT606",
    lambda d: d["codecs"].__setitem__(1, {"name": "nosuchcodec", "configuration": {}}),
)
_zarr_case(
    "zarr_shard_rows_neg",
    "layer_00's actfmt_shard_rows is [16, -16, 40] (sums to 40)",
    ("ACT606", "ACT303", "ACT304"),
    lambda d: d["attributes"].update(actfmt_shard_rows=[16, -16, 40]),
)
_zarr_case(
    "zarr_shard_rows_str",
    'layer_00\'s actfmt_shard_rows is ["16", "16", "8"]',
    ("ACT606", "ACT203"),
    lambda d: d["attributes"].update(actfmt_shard_rows=["16", "16", "8"]),
)
_zarr_case(
    "zarr_dtype_unknown",
    "layer_00's data_type is complex128 with actfmt_dtype bfloat16",
    ("ACT606", "ACT403"),
    lambda d: d.update(data_type="complex128"),
)
_zarr_case(
    "zarr_layer_0_rows",
    "layer_01 declares shape [0, 8] (a 0-row layer beside a 40-row one)",
    ("ACT605", "ACT305", "ACT606"),
    lambda d: d.update(shape=[0, HIDDEN]),
    layer="layer_01",
)


@case(
    "zarr_codec_pickle",
    doc="a v2 array whose compressor is numcodecs' pickle (the chunk is a pickle that would write outside/PWNED)",
    expect="ACT606",
    split="tree/EM.zarr",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    out = kit.outside(ws)
    store = tree_store(ws, kit, "zarr", compression="none", zarr_format=2)
    zarray = store / "layer_00" / ".zarray"
    doc = read_json(zarray)
    doc["compressor"] = {"id": "pickle", "protocol": 2}
    write_json(zarray, doc)
    (store / "layer_00" / "0.0").write_bytes(pickle.dumps(_Pwn(str((out / "PWNED").resolve())), protocol=2))


class _Pwn:
    """Unpickles to a call of builtins.exec that writes a marker file (harmless, and seen by the tests)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@case(
    "st_shape_strings",
    doc='a safetensors header declaring shape ["40", "8"]',
    expect="ACT606",
    split="tree/EM",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    _st_header(store / "layer_00.safetensors", lambda h: h["activations"].update(shape=["40", "8"]))


@case(
    "st_shape_neg",
    doc="a safetensors header declaring shape [-40, -8] (same element count)",
    expect=("ACT606", "ACT002"),
    split="tree/EM",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    _st_header(store / "layer_00.safetensors", lambda h: h["activations"].update(shape=[-ROWS, -HIDDEN]))


@case(
    "st_offsets_outside",
    doc="safetensors data_offsets past the end of the file",
    expect=("ACT606", "ACT002"),
    split="tree/EM",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    _st_header(
        store / "layer_00.safetensors", lambda h: h["activations"].update(data_offsets=[10**6, 10**6 + 640])
    )


@case(
    "h5_softlink_cycle",
    doc="layer_01 is an HDF5 soft link to /loop, and /loop a soft link to /layer_01",
    expect=("ACT606", "ACT001"),
    split="tree/EM.h5",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    import h5py

    kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    f, _attrs = h5_copy_without(kit.valid("hdf5"), ws / "tree" / "EM.h5", "layer_01")
    with f:
        f["layer_01"] = h5py.SoftLink("/loop")
        f["loop"] = h5py.SoftLink("/layer_01")


@case(
    "h5_layer_group",
    doc="layer_01 is an HDF5 group, not a dataset (ACT102: the layer is missing, is a fair reading too)",
    expect=("ACT606", "ACT401", "ACT102"),
    split="tree/EM.h5",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    (ws / "tree").mkdir(parents=True)
    f, _attrs = h5_copy_without(kit.valid("hdf5"), ws / "tree" / "EM.h5", "layer_01")
    with f:
        f.create_group("layer_01")


@case(
    "pt_shard_rows_neg_meta",
    doc="metadata.json shard_size -16 and batch_size 0",
    expect="ACT203",
    split="tree/EM",
    **HEAD,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    split = tree_pt(ws, kit)
    doc = read_json(split / "metadata.json")
    doc.update(shard_size=-16, batch_size=0)
    write_json(split / "metadata.json", doc)


# -------------------------------------------------------------------------------------------------------------
# 7. pt shards the real libraries refuse (ACT002)

PT = {"family": "pt", "area": "sizes"}


def _pt_patch_ints(path: Path, repl: dict[int, int], only_first: bool = False) -> None:
    """Rewrite ints of a torch.save archive's data.pkl (BININT1/BININT2/BININT ops) and re-zip (stored)."""
    import io
    import pickletools

    with zipfile.ZipFile(path) as zf:
        entries = [(i, zf.read(i)) for i in zf.infolist()]
    out_entries = []
    for info, data in entries:
        if info.filename.endswith("data.pkl"):
            new = bytearray()
            last = 0
            done = False
            for op, arg, pos in pickletools.genops(io.BytesIO(data)):
                if op.name in ("BININT1", "BININT2", "BININT") and arg in repl and not done:
                    size = {"BININT1": 2, "BININT2": 3, "BININT": 5}[op.name]
                    new += data[last:pos]
                    value = repl[arg]
                    if -(2**31) <= value < 2**31:
                        new += b"J" + struct.pack("<i", value)
                    else:
                        enc = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                        new += b"\x8a" + bytes([len(enc)]) + enc  # LONG1
                    last = pos + size
                    done = only_first
            new += data[last:]
            data = bytes(new)
        out_entries.append((info, data))
    _rezip(path, out_entries, zipfile.ZIP_STORED)


def _rezip(
    path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]], compress: Callable[[str], int] | int
) -> None:
    tmp = path.with_name(path.name + ".new")
    with zipfile.ZipFile(tmp, "w") as zf:
        for info, data in entries:
            how = compress(info.filename) if callable(compress) else compress
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.compress_type = how
            zf.writestr(zi, data)
    tmp.replace(path)


@case(
    "pt_offset_neg",
    doc="layer_00/shard_001.pt: the tensor's storage offset is -32 (would read zip header bytes)",
    expect="ACT002",
    split="tree/EM",
    **PT,
)
def _(ws: Path, kit: Kit) -> None:
    torch = _torch()
    kit.outside(ws)
    split = tree_pt(ws, kit)
    p = split / "layer_00" / "shard_001.pt"
    t = torch.load(p)
    base = torch.cat([torch.zeros(4, HIDDEN, dtype=t.dtype), t])
    torch.save(base[4:], p)  # a view: storage offset 32 elements
    _pt_patch_ints(p, {32: -32}, only_first=True)


@case(
    "pt_deflated",
    doc="layer_00/shard_000.pt re-zipped with deflated records (the data record compressed)",
    expect="ACT002",
    split="tree/EM",
    **PT,
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    split = tree_pt(ws, kit)
    p = split / "layer_00" / "shard_000.pt"
    with zipfile.ZipFile(p) as zf:
        entries = [(i, zf.read(i)) for i in zf.infolist()]
    _rezip(p, entries, zipfile.ZIP_DEFLATED)


# -------------------------------------------------------------------------------------------------------------
# 8. launder damage: a converted copy must not hide it


@case(
    "zarr_flipped_byte",
    family="launder",
    area="convert",
    doc="one byte of layer_00's (uncompressed) chunk flipped after conversion",
    expect=None,
    expect_deep="ACT602",
    split="tree/EM.zarr",
    pair="pair/EM",
    tags=("refuse-convert",),
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr", compression="none")
    chunk = store / "layer_00" / "c.0.0"
    b = bytearray(chunk.read_bytes())
    b[100] ^= 0x01
    chunk.write_bytes(bytes(b))
    pair(ws, kit)


@case(
    "zarr_shape_vs_meta",
    family="launder",
    area="convert",
    doc="the store's metadata says hidden_dim 16, its arrays are [40, 8]",
    expect="ACT605",
    split="tree/EM.zarr",
    tags=("refuse-convert",),
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    edit_root(store, lambda d: d["attributes"].update(hidden_dim=16))


@case(
    "zarr_rows_vs_meta",
    family="launder",
    area="convert",
    doc="the store's metadata says total_examples 48, its arrays hold 40 rows",
    expect="ACT605",
    split="tree/EM.zarr",
    tags=("refuse-convert",),
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "zarr")
    edit_root(store, lambda d: d["attributes"].update(total_examples=48))


@case(
    "st_shape_vs_meta",
    family="launder",
    area="convert",
    doc="a safetensors store's metadata.json says hidden_dim 16, its tensors are [40, 8]",
    expect="ACT605",
    split="tree/EM",
    tags=("refuse-convert",),
)
def _(ws: Path, kit: Kit) -> None:
    kit.outside(ws)
    store = tree_store(ws, kit, "safetensors")
    doc = read_json(store / "metadata.json")
    doc["hidden_dim"] = 16
    write_json(store / "metadata.json", doc)


# -------------------------------------------------------------------------------------------------------------
# building


@dataclass
class Corpus:
    root: Path
    token: str
    cases: dict[str, Case]

    def ws(self, name: str) -> Path:
        return self.root / name


def build_case(root: Path, kit: Kit, c: Case) -> Path:
    ws = root / c.name
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    c.build(ws, kit)
    return ws


def build(root: Path, names: list[str] | None = None, token: str | None = None) -> Corpus:
    """Build every case (or ``names``) under ``root``; the cache of shared stores is ``root/.cache``."""
    root.mkdir(parents=True, exist_ok=True)
    token = token or "SENTINEL" + secrets.token_hex(12).upper()
    kit = Kit(root / ".cache", token)
    chosen = {n: CASES[n] for n in (names or list(CASES))}
    for c in chosen.values():
        build_case(root, kit, c)
    (root / "corpus.json").write_text(
        json.dumps(
            {
                "token": token,
                "cases": {
                    n: {
                        "family": c.family,
                        "area": c.area,
                        "doc": c.doc,
                        "expect": c.expect,
                        "expect_deep": c.expect_deep,
                        "root": c.root,
                        "split": c.split,
                        "kind": c.kind,
                    }
                    for n, c in chosen.items()
                },
            },
            indent=2,
        )
    )
    return Corpus(root, token, chosen)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    corpus = build(Path(argv[0]), argv[1:] or None)
    for name, c in corpus.cases.items():
        print(f"{name:28} {c.family:12} {c.area:8} {c.doc}")
    print(f"{len(corpus.cases)} cases in {corpus.root}; token {corpus.token}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
