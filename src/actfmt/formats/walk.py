"""The one split walker: every split at or below a location, and every part of the tree it could not walk.

A directory (or file) is a split when a format recognises it (``Format.can_open``: a ``.zarr`` group, an HDF5
file, a directory of ``layer_XX.safetensors`` files, a directory with ``metadata.json`` or ``layer_XX``-like
subdirectories).  The walk stops descending at a split and skips hidden entries (actfmt's own partial stores,
locks and journals start with a dot).

Nothing is skipped silently.  Each of these is a :class:`WalkProblem`, which validation reports as a finding
(ACT001, ACT005, ACT006) and ``convert`` refuses unless forced:

* a directory that cannot be listed (permissions, I/O errors): ``unreadable``;
* a FIFO, socket or device: ``special`` -- found with ``stat``, never opened (opening a FIFO blocks);
* a dangling link: ``dangling``;
* a link that leaves the tree (``outside``: to a directory or a file, at any depth, inside a split too: a
  zarr chunk, a layer directory, a shard, a safetensors layer file, an ``.h5`` file, a ``metadata.json``) or a
  directory link back to a directory already walked (``cycle``): not followed, never read.  A link that stays
  inside the tree is followed, the same way at every level.

The tree is the location given, confined to itself by :func:`actfmt.storage.resolve`: storage itself refuses
any read through a link that leaves it (:class:`~actfmt.errors.OutsideTreeError`), so a split with such a link
can fail to read, never read outside; the walk reports each link once, here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from actfmt.errors import NotASplitError
from actfmt.formats.registry import guess_format
from actfmt.storage import Kind, LocalLocation, Location, PathLike, resolve

__all__ = ["FoundSplit", "WalkProblem", "find_splits", "walk_splits"]

#: Beyond this depth a tree is not walked further (an Activations tree is four levels deep).
MAX_DEPTH = 32


@dataclass(frozen=True)
class FoundSplit:
    """One split found by a walk: where, in which format, relative to the root (the read API's
    :class:`actfmt.Split` is an opened one)."""

    location: Location
    format: str
    rel: str  # relative to the walk's root, "/"-separated; "." for the root itself


@dataclass(frozen=True)
class WalkProblem:
    """A part of the tree the walk could not read, or chose not to follow."""

    rel: str
    kind: str  # unreadable | special | dangling | outside | cycle | too-deep
    detail: str


@dataclass
class Walk:
    splits: list[FoundSplit] = field(default_factory=list)
    problems: list[WalkProblem] = field(default_factory=list)


#: At most this many links out of the tree are reported per split.
MAX_LINKS = 1000


def _leaves(loc: Location, top: str) -> bool:
    real = os.path.realpath(loc.path)
    return not (real == top or real.startswith(top.rstrip("/") + "/"))


def _outside_detail(target: str) -> str:
    return f"a link to {target}, outside the tree; not followed, never read"


def _outside(rel: str, loc: Location) -> WalkProblem:
    return WalkProblem(rel, "outside", _outside_detail(os.path.realpath(loc.path)))


def _rel(child: str, parent: str) -> str:
    return child if parent == "." else f"{parent}/{child}"


def walk_splits(root: Location) -> Walk:
    """Walk ``root`` (see the module docstring).  Raises :class:`NotASplitError` when ``root`` does not exist."""
    kind = root.kind()
    if kind is None or kind == Kind.MISSING:
        why = "a dangling link" if kind == Kind.MISSING else "no such file or directory"
        raise NotASplitError(f"{root}: {why}; check the path.")
    if kind == Kind.SPECIAL:
        raise NotASplitError(f"{root}: not a file or directory (a FIFO, socket or device); check the path.")
    root.prefetch()  # object storage: one listing of the prefix, the walk then costs no request
    out = Walk()
    top = (root.root or os.path.realpath(root.path)) if isinstance(root, LocalLocation) else None
    seen: set[str] = set()

    def walk_dir(loc: Location, rel: str, depth: int) -> None:
        if top is not None:
            real = os.path.realpath(loc.path)
            if real in seen:
                out.problems.append(
                    WalkProblem(rel, "cycle", "a link back to a directory already walked; not followed")
                )
                return
            seen.add(real)
        try:
            entries = loc.list_dir()
        except OSError as exc:
            out.problems.append(
                WalkProblem(rel, "unreadable", f"cannot list the directory: {exc.strerror or exc}")
            )
            return
        fmt = guess_format(loc, entries)
        if fmt is not None:
            add_split(loc, fmt, rel)
            return
        if depth >= MAX_DEPTH:
            out.problems.append(
                WalkProblem(rel, "too-deep", f"more than {MAX_DEPTH} levels deep; not walked")
            )
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            child = _rel(e.name, rel)
            if e.kind == Kind.OUTSIDE or (e.link and top is not None and _leaves(e.location, top)):
                out.problems.append(_outside(child, e.location))
            elif e.kind == Kind.MISSING:
                out.problems.append(
                    WalkProblem(child, "dangling", "a dangling link (its target does not exist)")
                )
            elif e.kind == Kind.SPECIAL:
                out.problems.append(
                    WalkProblem(
                        child, "special", "not a file or directory (a FIFO, socket or device); not opened"
                    )
                )
            elif e.kind == Kind.DIR:
                walk_dir(e.location, child, depth + 1)
            elif e.kind == Kind.FILE and (fmt := guess_format(e.location, directory=False)) is not None:
                add_split(e.location, fmt, child)

    def add_split(loc: Location, fmt: str, rel: str) -> None:
        out.splits.append(FoundSplit(loc, fmt, rel))
        if top is None:
            return
        # inside a split: every link that leaves the tree is a finding (storage refuses to read through it)
        scoped = loc.confined(top) if isinstance(loc, LocalLocation) else loc
        for inner, target in scoped.escaping_links(limit=MAX_LINKS):
            where = rel if inner == "." else _rel(inner, rel)
            out.problems.append(WalkProblem(where, "outside", _outside_detail(target)))

    if kind == Kind.DIR:
        walk_dir(root, ".", 0)
    elif (fmt := guess_format(root, directory=False)) is not None:
        add_split(root, fmt, ".")
    out.splits.sort(key=lambda s: s.rel)
    return out


def find_splits(
    root: PathLike, storage_options: dict[str, object] | None = None
) -> list[tuple[Location, str]]:
    """Every split at or below ``root`` as ``(location, format name)``, sorted (the walk's problems are
    dropped: :func:`walk_splits` has them)."""
    return [(s.location, s.format) for s in walk_splits(resolve(root, storage_options)).splits]
