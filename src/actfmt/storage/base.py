"""The abstraction every reader and writer talks to: a :class:`Location` (a file or directory, local or remote).

A location is a path bound to one storage (the local file system, or one fsspec filesystem with its options).
It does path arithmetic (``loc / "layer_00"``, ``.name``, ``.parent``), answers questions (``stat``,
``list``, ``find``), reads (whole objects, byte ranges, batched ranged reads into caller buffers with
:func:`read_into`, an optional memory map) and writes (whole objects, streams, ``put_many``).  Each storage
declares what it can do with class flags (``supports_rename``, ``supports_mmap``, ``supports_copy_range``,
``supports_pwrite``) that callers consult instead of catching refusals -- as zarr-python's ``Store`` does.

Only a local location is ``os.PathLike``: ``Path(s3_location)`` raises ``TypeError`` instead of silently
making a local path.  Errors are ``OSError`` subclasses that name the location (``FileNotFoundError`` stays
itself); a remote storage never puts a secret into a message.

This module imports only the standard library.
"""

from __future__ import annotations

import abc
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar

from actfmt.errors import OutsideTreeError, TruncatedError

__all__ = [
    "Entry",
    "Kind",
    "Location",
    "OutputFile",
    "ReadRequest",
    "Stat",
    "read_into",
    "read_objects",
    "scan_runs",
]


class Kind:
    """What an entry is.  ``special``: a FIFO, socket or device (never opened: opening a FIFO blocks);
    ``missing``: a dangling symbolic link; ``outside``: a link that leaves the confinement root of the tree
    being listed (never followed, not even by ``stat``)."""

    FILE = "file"
    DIR = "dir"
    SPECIAL = "special"
    MISSING = "missing"
    OUTSIDE = "outside"


@dataclass(frozen=True)
class Stat:
    """What a storage says about one object.  ``identity`` changes when the content may have changed."""

    kind: str
    size: int
    mtime_ns: int = 0
    identity: tuple[Any, ...] = ()
    link: bool = False


@dataclass(frozen=True)
class Entry:
    """One child of a listed directory."""

    name: str
    location: Location
    kind: str
    size: int = 0
    link: bool = False  # a symbolic link (``kind`` is what it points to)

    def is_dir(self) -> bool:
        return self.kind == Kind.DIR

    def is_file(self) -> bool:
        return self.kind == Kind.FILE

    def followed(self) -> Entry:
        """This entry, or :class:`~actfmt.errors.OutsideTreeError` when it is a link out of the tree (a reader
        that needs it refuses it, never skips it silently)."""
        if self.kind == Kind.OUTSIDE:
            raise OutsideTreeError(
                f"{self.location}: a link outside the tree; refused, not read (replace the link by what it "
                f"stands for).",
                str(self.location),
            )
        return self


#: ``(location, byte offset, writable buffer)``: fill the buffer with the bytes at that offset.
ReadRequest = tuple["Location", int, Any]


class OutputFile(abc.ABC):
    """A file being written sequentially (a multipart upload on object storage).  A context manager:
    leaving it with an exception discards what was written where the storage can."""

    location: Location

    @abc.abstractmethod
    def write(self, data: Any) -> None:
        """Append ``data`` (bytes, memoryview, or a C-contiguous numpy array)."""

    def copy_range(self, source: Location, offset: int, length: int, at: int | None = None) -> None:
        """Append ``length`` bytes of ``source`` from ``offset`` (or write them at offset ``at``, where the
        storage can); in the kernel where it can (``os.copy_file_range``: no trip through user space, a
        reflink on XFS / btrfs)."""
        buf = bytearray(length)
        read_into([(source, offset, memoryview(buf))])
        if at is None:
            self.write(buf)
        else:
            self.pwrite(buf, at)

    def pwrite(self, data: Any, offset: int) -> None:
        """Write ``data`` at ``offset`` (storages with ``supports_pwrite`` only)."""
        raise NotImplementedError(f"{self.location}: {self.location.scheme}:// cannot write at an offset")

    @abc.abstractmethod
    def tell(self) -> int:
        """Bytes written so far (the position of the next :meth:`write`)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def abort(self) -> None:
        """Give up: close, and discard the object where that is possible."""
        self.close()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()


class Location(abc.ABC):
    """A file or directory on one storage.  Immutable, hashable, picklable (with its storage options)."""

    #: ``file`` for the local file system, else the URL scheme (``s3``, ``gs``, ``memory``, ...).
    scheme: str
    is_local: ClassVar[bool] = False
    supports_rename: ClassVar[bool] = False
    supports_mmap: ClassVar[bool] = False
    supports_copy_range: ClassVar[bool] = False
    supports_pwrite: ClassVar[bool] = False
    #: Does a read through a :meth:`pinned` location notice that the object was replaced (ChangedError, or
    #: the pinned version's bytes), at the storage level?  Where not (object storage, which would need a
    #: request per object and read), the formats compare identities at the points they re-open.
    detects_replacement: ClassVar[bool] = False
    #: Byte ranges of one object closer than this are fetched as one request (a round trip costs more).
    merge_gap: ClassVar[int] = 0

    def __init__(self, path: str) -> None:
        self._path = path
        #: What :meth:`pinned` expects the object to be; reads fail if it changed.
        self.expected: tuple[Any, ...] | None = None

    def pinned(self, identity: tuple[Any, ...] | None) -> Location:
        """This location, expecting the object to keep ``identity`` (:attr:`Stat.identity`): a read of an
        object that was replaced or rewritten since raises :class:`~actfmt.errors.ChangedError`."""
        out = self._with_path(self._path)
        out.expected = identity
        return out

    # -- identity and path arithmetic ----------------------------------------------------------------
    @property
    def path(self) -> str:
        """The path as the storage spells it (a local path; ``bucket/key`` on object storage)."""
        return self._path

    @abc.abstractmethod
    def _with_path(self, path: str) -> Location: ...

    @property
    def name(self) -> str:
        return posixpath.basename(self._path.rstrip("/"))

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        s = self.suffix
        return self.name[: -len(s)] if s else self.name

    @property
    def parent(self) -> Location:
        head = posixpath.dirname(self._path.rstrip("/"))
        return self._with_path(head or self._path)

    def joinpath(self, *parts: str) -> Location:
        out = self._path
        for part in parts:
            for piece in str(part).split("/"):
                if piece and piece != ".":
                    out = posixpath.join(out, piece) if out else piece
        return self._with_path(out)

    def __truediv__(self, part: str) -> Location:
        return self.joinpath(part)

    def with_name(self, name: str) -> Location:
        return self.parent.joinpath(name)

    def relative_to(self, other: Location) -> str:
        """``self`` below ``other`` as a ``/``-separated relative path (``.`` for the same place)."""
        a, b = self._norm(), other._norm()
        if a == b:
            return "."
        if not a.startswith(b.rstrip("/") + "/"):
            raise ValueError(f"{self} is not below {other}")
        return a[len(b.rstrip("/")) + 1 :]

    def is_relative_to(self, other: Location) -> bool:
        if type(self) is not type(other) or self._storage_key() != other._storage_key():
            return False
        try:
            self.relative_to(other)
        except ValueError:
            return False
        return True

    def _norm(self) -> str:
        return self._path.rstrip("/") or "/"

    def _storage_key(self) -> Any:
        """What makes two locations live on the same storage (scheme + options)."""
        return self.scheme

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Location):
            return NotImplemented
        return (
            type(self) is type(other)
            and self._storage_key() == other._storage_key()
            and self._norm() == other._norm()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._norm()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def same_place(self, other: Location) -> bool:
        """Do ``self`` and ``other`` name the same object (links resolved where the storage has them)?"""
        return self == other

    # -- where it is, for libraries that need it ------------------------------------------------------
    @property
    def local_path(self) -> Any:
        """A ``pathlib.Path`` for a local location, else ``None``."""
        return None

    def checked_path(self) -> str:
        """The path to hand a library that opens it itself (see :meth:`LocalLocation.checked_path`)."""
        return self._path

    def escaping_links(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Links at or below this location that leave its tree (none on object storage: no links)."""
        return []

    @property
    def url(self) -> str:
        """``s3://bucket/key``, or a local path."""
        return str(self)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {}

    # -- questions ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def stat(self) -> Stat:
        """Raise ``FileNotFoundError`` when nothing is there."""

    def kind(self) -> str | None:
        """``file``, ``dir``, ``special``, ``missing`` (a dangling link), or ``None`` (nothing there)."""
        try:
            return self.stat().kind
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self.kind() not in (None, Kind.MISSING)

    def is_dir(self) -> bool:
        return self.kind() == Kind.DIR

    def is_file(self) -> bool:
        return self.kind() == Kind.FILE

    def size(self) -> int:
        return self.stat().size

    @abc.abstractmethod
    def list_dir(self) -> list[Entry]:
        """The children of a directory, sorted by name (``OSError`` when it cannot be listed)."""

    @abc.abstractmethod
    def find(self) -> dict[str, int]:
        """Every file below this location, ``{relative key: size}`` (one paginated listing remotely)."""

    def du(self) -> int:
        """Bytes stored at or below this location."""
        st = self.stat()
        return sum(self.find().values()) if st.kind == Kind.DIR else st.size

    def prefetch(self) -> None:  # noqa: B027 - optional hook
        """A hint: this tree is about to be walked (object storage lists it once)."""

    # -- reading --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self) -> bytes: ...

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` (fewer at the end of the object)."""
        out = self._read_ranges([(self, start, stop)], missing_ok=False)[0]
        assert out is not None
        return out

    @classmethod
    @abc.abstractmethod
    def _read_ranges(
        cls, requests: Sequence[tuple[Location, int, int]], missing_ok: bool
    ) -> list[bytes | None]:
        """Many ranges of many objects of this storage, concurrently where it can."""

    @classmethod
    def _read_into(cls, requests: Sequence[ReadRequest], missing_ok: bool) -> list[bool]:
        """Fill each buffer; ``False`` for a missing object (with ``missing_ok``).  Default: ranged reads."""
        got = cls._read_ranges(
            [(loc, off, off + len(memoryview(buf).cast("B"))) for loc, off, buf in requests], missing_ok
        )
        out = []
        for (loc, off, buf), data in zip(requests, got, strict=True):
            if data is None:
                out.append(False)
                continue
            view = memoryview(buf).cast("B")
            if len(data) != len(view):
                raise short_read(loc, off + len(data), off + len(view))
            view[:] = data
            out.append(True)
        return out

    @classmethod
    def _scan(cls, runs: Sequence[tuple[Location, int, int]], visit: Callable[[memoryview], None]) -> None:
        """:func:`scan_runs` on this storage: batched ranged reads of up to 8 MiB, by default."""
        step = 8 << 20
        pieces = [
            (loc, off + a, min(length, a + step) - a)
            for loc, off, length in runs
            for a in range(0, length, step)
        ]
        for k in range(0, len(pieces), 8):
            batch = pieces[k : k + 8]
            bufs = [bytearray(n) for _, _, n in batch]
            cls._read_into(
                [(loc, off, memoryview(b)) for (loc, off, _), b in zip(batch, bufs, strict=True)], False
            )
            for b in bufs:
                visit(memoryview(b))

    @classmethod
    def _read_objects(cls, locations: Sequence[Location], missing_ok: bool) -> list[bytes | None]:
        out: list[bytes | None] = []
        for loc in locations:
            try:
                out.append(loc.read_bytes())
            except FileNotFoundError:
                if not missing_ok:
                    raise
                out.append(None)
        return out

    @abc.abstractmethod
    def open_input(self) -> IO[bytes]:
        """A seekable binary file object (for libraries such as h5py and zipfile)."""

    def mmap(self) -> Any:
        """A read-only memory map of the whole file, or ``None`` where the storage has none."""
        return None

    # -- writing --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def write_bytes(self, data: Any, atomic: bool = False) -> None:
        """Create or replace the object with ``data``.  ``atomic``: readers never see a partial object
        (object storage always works that way; a local file goes through a temporary sibling and a rename)."""

    def write_text(self, text: str, atomic: bool = False) -> None:
        self.write_bytes(text.encode("utf-8"), atomic=atomic)

    def put_many(self, items: Mapping[Location, Any]) -> None:
        """Write several objects (concurrently where the storage can)."""
        for loc, data in items.items():
            loc.write_bytes(data)

    @abc.abstractmethod
    def open_output(self) -> OutputFile:
        """Create or replace the object, to be written sequentially."""

    @abc.abstractmethod
    def create_exclusive(self, data: bytes) -> bool:
        """Write ``data`` only if nothing is there; ``False`` when something is."""

    def mkdir(self) -> None:  # noqa: B027 - nothing to do on object storage
        """Make this directory and its parents (object storage has no directories)."""

    @abc.abstractmethod
    def delete(self, missing_ok: bool = True) -> None: ...

    @abc.abstractmethod
    def delete_tree(self) -> None:
        """Remove everything at or below this location (a missing one is fine)."""

    def rename(self, target: Location) -> None:
        raise NotImplementedError(f"{self}: {self.scheme}:// cannot rename; check supports_rename")


def read_into(requests: Sequence[ReadRequest], missing_ok: bool = False) -> list[bool]:
    """Fill every buffer of ``requests`` with its bytes, batched per storage (``preadv`` locally, concurrent
    ranged reads on object storage).  Returns, per request, ``False`` where the object is missing (only with
    ``missing_ok``; else ``FileNotFoundError``).  A file that ends early raises
    :class:`~actfmt.errors.TruncatedError` naming it."""
    if not requests:
        return []
    by_type: dict[type[Location], list[int]] = {}
    for i, (loc, _, _) in enumerate(requests):
        by_type.setdefault(type(loc), []).append(i)
    out = [False] * len(requests)
    for cls, idx in by_type.items():
        got = cls._read_into([requests[i] for i in idx], missing_ok)
        for i, ok in zip(idx, got, strict=True):
            out[i] = ok
    return out


#: Bytes per piece when a run of bytes is scanned (hashed, and its statistics taken) rather than kept: small
#: enough to stay in a core's L2 cache (1-2 MiB on current x86 cores) between the copy out of the page cache,
#: the hash and the statistics kernel, large enough that the per-piece Python calls cost little (a conversion's
#: read + hash + statistics of a bf16 split: 3.5 GB/s per core at 128 KiB, 3.9 at 512 KiB).
SCAN_PIECE = 512 << 10


def scan_runs(runs: Sequence[tuple[Location, int, int]], visit: Callable[[memoryview], None]) -> None:
    """Call ``visit`` with every byte of ``runs`` ``(location, offset, length)``, in order, in pieces of a
    buffer that is reused (valid only during the call): nothing is kept in memory."""
    if runs:
        type(runs[0][0])._scan(runs, visit)


def read_objects(locations: Sequence[Location], missing_ok: bool = True) -> list[bytes | None]:
    """Whole objects, batched per storage (concurrent GETs on object storage); ``None`` for a missing one
    (with ``missing_ok``)."""
    out: list[bytes | None] = [None] * len(locations)
    by_type: dict[type[Location], list[int]] = {}
    for i, loc in enumerate(locations):
        by_type.setdefault(type(loc), []).append(i)
    for cls, idx in by_type.items():
        for i, data in zip(idx, cls._read_objects([locations[i] for i in idx], missing_ok), strict=True):
            out[i] = data
    return out


def short_read(loc: Location, got: int, want: int) -> Exception:
    return TruncatedError(
        f"{loc}: truncated (the file ends at byte {got}, before byte {want}: an interrupted copy or a full "
        f"disk?); re-copy it, or re-run what wrote it (actfmt convert ... --resume or --overwrite)."
    )
