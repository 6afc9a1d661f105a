"""The local file system: ``preadv`` straight into caller buffers, ``mmap``, ``os.copy_file_range``, rename.

Files are opened with ``O_NONBLOCK`` and checked to be regular files before anything is read, so a FIFO or a
device where a file belongs is an error naming it, never a hang.

**Confinement.**  A location may carry a *confinement root* (:meth:`LocalLocation.confined`; the public API
sets it once, in :func:`actfmt.storage.resolve`, to the tree it was given).  It travels with every location
derived from it (``/``, ``joinpath``, ``with_name``, ``parent``, ``pinned``, pickling).  Every read, listing and
``stat`` of a confined location resolves the path first and refuses one that leads outside the root
(:class:`~actfmt.errors.OutsideTreeError`, never read): on Linux the path is opened ``O_PATH`` (nothing read,
no device opened), the kernel says what it names (``/proc/self/fd``), and that very object is reopened for
reading.  Links that stay inside the root are followed.  Writes are not confined (a destination is not a tree
being read); they never go through a link at their own name (``O_NOFOLLOW``, temporary files ``O_EXCL``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import stat as stat_mod
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from actfmt.errors import OutsideTreeError
from actfmt.storage.base import SCAN_PIECE, Entry, Kind, Location, OutputFile, ReadRequest, Stat, short_read

__all__ = ["LocalLocation", "contained", "open_regular"]

#: Reads of at least this many bytes are split over two threads (one core copies ~5 GB/s from the cache).
PARALLEL_READ_BYTES = 16 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _restore_local(path: str, expected: tuple[Any, ...] | None, root: str | None = None) -> LocalLocation:
    loc = LocalLocation(path, root=root)
    loc.expected = expected
    return loc


def contained(real: str, root: str) -> bool:
    """Is the resolved path ``real`` the resolved ``root`` or below it?"""
    return real == root or real.startswith(root.rstrip("/") + "/")


def _outside(path: str, real: str, root: str) -> OutsideTreeError:
    return OutsideTreeError(
        f"{path}: a link to {real}, outside the tree {root}; refused, not read (actfmt never follows a "
        f"link out of the tree it is given). Replace the link by the file it stands for, or point actfmt "
        f"at its target itself.",
        path,
        real,
    )


def _kind(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return Kind.FILE
    if stat_mod.S_ISDIR(mode):
        return Kind.DIR
    return Kind.SPECIAL


def _special_name(mode: int) -> str:
    if stat_mod.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat_mod.S_ISSOCK(mode):
        return "a socket"
    if stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


#: Where the kernel says what an open descriptor is (Linux): a containment check of the very file opened, in
#: one ``readlink`` (``os.path.realpath`` costs an ``lstat`` per component, in Python).
_PROC_FD = "/proc/self/fd"
_HAVE_O_PATH = hasattr(os, "O_PATH") and os.path.isdir(_PROC_FD)


def _pin_path(path: str, root: str) -> tuple[int | None, str]:
    """``(O_PATH descriptor or None, resolved path)`` of ``path``, refused when it leads outside ``root``.

    The descriptor (Linux) names the object itself: nothing is opened for reading yet (a device is never
    opened), and reopening it through ``/proc/self/fd`` reads exactly what was checked, with no window for a
    link swapped in between."""
    if _HAVE_O_PATH:
        try:
            opath = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            real = os.path.realpath(path)  # a dangling link: out of the tree, or missing
            if not contained(real, root):
                raise _outside(path, real, root) from None
            raise
        try:
            real = os.readlink(f"{_PROC_FD}/{opath}")
        except OSError:
            real = os.path.realpath(path)
        if not contained(real, root):
            os.close(opath)
            raise _outside(path, real, root)
        return opath, real
    real = os.path.realpath(path)
    if not contained(real, root):
        raise _outside(path, real, root)
    return None, real


def open_regular(path: str, root: str | None = None) -> int:
    """``os.open`` for reading that never blocks (``O_NONBLOCK``) and refuses anything but a regular file.

    With a confinement ``root`` (a resolved path): a path that leads outside ``root`` is refused
    (:class:`~actfmt.errors.OutsideTreeError`), never opened; what is opened is the object checked."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if root is None:
        fd = os.open(path, flags)
    else:
        opath, real = _pin_path(path, root)
        try:
            if opath is not None:
                st = os.fstat(opath)
                if not stat_mod.S_ISREG(st.st_mode) and not stat_mod.S_ISDIR(st.st_mode):
                    raise OSError(errno.EINVAL, f"{_special_name(st.st_mode)}, not a regular file", path)
                try:
                    fd = os.open(f"{_PROC_FD}/{opath}", flags)
                except PermissionError as exc:
                    raise PermissionError(exc.errno, exc.strerror, path) from None
            else:
                fd = os.open(real, flags | os.O_NOFOLLOW)
        finally:
            if opath is not None:
                os.close(opath)
    try:
        mode = os.fstat(fd).st_mode
        if stat_mod.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory (a file was expected)", path)
        if not stat_mod.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_special_name(mode)}, not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_pool() -> ThreadPoolExecutor:
    """Two threads (the target machine has two cores) shared by every reader: the second half of a large local
    read, and formats' chunk decoding.  A job on it must never wait for another job on it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="actfmt-read")
        return _pool


class LocalLocation(Location):
    """A path on the local file system (``os.PathLike``: ``Path(loc)`` and ``open(loc)`` work)."""

    scheme = "file"
    is_local = True
    supports_rename = True
    supports_mmap = True
    supports_copy_range = True
    supports_pwrite = True
    detects_replacement = True
    merge_gap = 0

    def __init__(self, path: str | os.PathLike[str], root: str | None = None) -> None:
        super().__init__(os.fspath(path))
        #: The confinement root (a resolved path), or ``None``: see the module docstring.
        self.root = root

    def _with_path(self, path: str) -> LocalLocation:
        return LocalLocation(path, root=self.root)

    def joinpath(self, *parts: str) -> LocalLocation:
        """``self / part / ...``; below a confinement root a ``..`` piece (a name or key read from the tree
        that climbs out of it: a zarr separator ``/../``) is :class:`~actfmt.errors.OutsideTreeError`."""
        if self.root is not None:
            for part in parts:
                text = str(part)
                if ".." in text and ".." in text.split("/"):
                    raise OutsideTreeError(
                        f"{self._path}: {text!r} climbs out of the directory ('..'); refused, not read (a name "
                        f"or key in the tree must stay inside it).",
                        self._path,
                    )
        out = super().joinpath(*parts)
        assert isinstance(out, LocalLocation)
        return out

    def confined(self, root: str | os.PathLike[str] | None = None) -> LocalLocation:
        """This location, confined to ``root`` (default: itself, resolved): reads, listings and ``stat`` of it
        and of every location derived from it never leave ``root`` (see the module docstring)."""
        out = LocalLocation(
            self._path, root=os.path.realpath(os.fspath(root) if root is not None else self._path)
        )
        out.expected = self.expected
        return out

    def checked_path(self) -> str:
        """The path to hand a library that opens files itself (h5py, zarr-python, torch): the resolved path,
        checked to be inside the confinement root (:class:`~actfmt.errors.OutsideTreeError`); the path as it is
        without a root."""
        if self.root is None:
            return self._path
        opath, real = _pin_path(self._path, self.root)
        if opath is not None:
            os.close(opath)
        return real

    def escaping_links(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Every link at or below this location that leads outside the confinement root (or, without one,
        outside this location), as ``(relative path, resolved target)``, at most ``limit``.  Links that stay
        inside are followed (each directory once); nothing is opened but directories."""
        root = self.root or os.path.realpath(self._path)
        out: list[tuple[str, str]] = []
        real = os.path.realpath(self._path)
        if not contained(real, root):
            return [(".", real)]
        seen: set[str] = set()
        stack = [(self._path, real, ".")]
        while stack and len(out) < limit:
            path, real_dir, rel = stack.pop()
            if real_dir in seen or len(seen) > 1_000_000:
                continue
            seen.add(real_dir)
            try:
                it = os.scandir(path)
            except OSError:  # not a directory, unreadable: the format's own checks say so
                continue
            with it:
                for e in it:
                    child = e.name if rel == "." else f"{rel}/{e.name}"
                    try:
                        link = e.is_symlink()
                        if link:
                            target = os.path.realpath(e.path)
                            if not contained(target, root):
                                out.append((child, target))
                                continue
                            if os.path.isdir(target):
                                stack.append((e.path, target, child))
                        elif e.is_dir(follow_symlinks=False):
                            stack.append((e.path, os.path.join(real_dir, e.name), child))
                    except OSError:
                        continue
        out.sort()
        return out

    def __fspath__(self) -> str:
        return self._path

    def __str__(self) -> str:
        return self._path

    def __reduce__(self) -> Any:  # absolute: workers may start elsewhere; a pin travels with it
        return (_restore_local, (os.path.abspath(self._path), self.expected, self.root))

    def _norm(self) -> str:
        return os.path.abspath(self._path)

    @property
    def name(self) -> str:
        base = os.path.basename(self._path.rstrip("/"))
        return base if base not in ("", ".", "..") else os.path.basename(os.path.abspath(self._path))

    @property
    def parent(self) -> LocalLocation:
        base = os.path.basename(self._path.rstrip("/"))
        if base in ("", ".", ".."):
            return LocalLocation(os.path.dirname(os.path.abspath(self._path)), root=self.root)
        return LocalLocation(os.path.dirname(self._path.rstrip("/")) or ".", root=self.root)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, os.PathLike)) and not isinstance(other, Location):
            return self._norm() == os.path.abspath(os.fspath(other))
        return super().__eq__(other)

    def __hash__(self) -> int:
        return super().__hash__()

    def same_place(self, other: Location) -> bool:
        if not isinstance(other, LocalLocation):
            return False
        return os.path.realpath(self._path) == os.path.realpath(other._path)

    def resolved(self) -> LocalLocation:
        """The absolute path with every link resolved."""
        return LocalLocation(os.path.realpath(self._path), root=self.root)

    @property
    def local_path(self) -> Path:
        return Path(self._path)

    # -- questions --------------------------------------------------------------------------------------
    def stat(self) -> Stat:
        try:
            if self.root is not None:  # a link out of the tree: refused (never followed, not even by stat)
                opath, real = _pin_path(self._path, self.root)
                if opath is None:
                    st = os.stat(real)
                else:
                    try:
                        st = os.fstat(opath)
                    finally:
                        os.close(opath)
            else:
                st = os.stat(self._path)
        except FileNotFoundError:
            if os.path.islink(self._path):
                return Stat(Kind.MISSING, 0, link=True)
            raise
        link = os.path.islink(self._path)
        return Stat(_kind(st.st_mode), st.st_size, st.st_mtime_ns, identity_of(st), link)

    def list_dir(self) -> list[Entry]:
        out = []
        root = self.root
        if root is not None:
            self.checked_path()
        with os.scandir(self._path) as it:
            for e in it:
                link = e.is_symlink()
                if link and root is not None and not contained(os.path.realpath(e.path), root):
                    out.append(Entry(e.name, self._with_path(e.path), Kind.OUTSIDE, 0, True))
                    continue
                try:
                    st = e.stat(follow_symlinks=True)
                except OSError:  # dangling, a loop, or not permitted to look
                    out.append(Entry(e.name, self._with_path(e.path), Kind.MISSING, 0, link))
                    continue
                out.append(Entry(e.name, self._with_path(e.path), _kind(st.st_mode), st.st_size, link))
        out.sort(key=lambda e: e.name)
        return out

    def find(self) -> dict[str, int]:
        """Every file below (links that stay inside the confinement root are followed as files, directory
        links are not walked; one that leaves the root is :class:`~actfmt.errors.OutsideTreeError`)."""
        out: dict[str, int] = {}
        confine = self.root
        if confine is not None:
            self.checked_path()
        if os.path.isfile(self._path):
            return {".": os.stat(self._path).st_size}
        for root, _dirs, files in os.walk(self._path):
            rel = os.path.relpath(root, self._path)
            for f in files:
                full = os.path.join(root, f)
                if confine is not None and os.path.islink(full):
                    real = os.path.realpath(full)
                    if not contained(real, confine):
                        raise _outside(full, real, confine)
                with contextlib.suppress(OSError):
                    st = os.stat(full)
                    if stat_mod.S_ISREG(st.st_mode):
                        out[f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")] = st.st_size
        return out

    # -- reading ----------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        fd = open_regular(self._path, self.root)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            while True:
                data = os.read(fd, max(size, 1 << 16))
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks)
        finally:
            os.close(fd)

    @classmethod
    def _read_ranges(
        cls, requests: Sequence[tuple[Location, int, int]], missing_ok: bool
    ) -> list[bytes | None]:
        with _Files(missing_ok) as files:
            out: list[bytes | None] = []
            for loc, start, stop in requests:
                fd = files.fd(loc)
                out.append(None if fd is None else os.pread(fd, max(0, stop - start), start))
            return out

    @classmethod
    def _read_into(cls, requests: Sequence[ReadRequest], missing_ok: bool) -> list[bool]:
        views = [(loc, off, memoryview(buf).cast("B")) for loc, off, buf in requests]
        total = sum(len(v) for _, _, v in views)
        if (
            total >= PARALLEL_READ_BYTES
            and not missing_ok
            and threading.current_thread() is threading.main_thread()
        ):
            # two threads copy from the page cache (in a conversion, layer threads already run in parallel)
            half = (total // 2 + 4095) & ~4095
            pieces: list[list[tuple[Location, int, memoryview]]] = [[], []]
            acc = 0
            for loc, off, v in views:
                if acc < half < acc + len(v):
                    cut = half - acc
                    pieces[0].append((loc, off, v[:cut]))
                    pieces[1].append((loc, off + cut, v[cut:]))
                else:
                    pieces[0 if acc < half else 1].append((loc, off, v))
                acc += len(v)
            second = read_pool().submit(_pread_all, pieces[1], False)
            _pread_all(pieces[0], False)
            second.result()
            return [True] * len(views)
        return _pread_all(views, missing_ok)

    @classmethod
    def _scan(cls, runs: Sequence[tuple[Location, int, int]], visit: Callable[[memoryview], None]) -> None:
        buf = memoryview(bytearray(SCAN_PIECE))
        with _Files(False) as files:
            for loc, off, length in runs:
                fd = files.fd(loc)
                assert fd is not None
                done = 0
                while done < length:
                    want = min(SCAN_PIECE, length - done)
                    n = os.preadv(fd, [buf[:want]], off + done)
                    if n <= 0:
                        raise short_read(loc, off + done, off + length)
                    visit(buf[:n])
                    done += n

    def open_input(self) -> IO[bytes]:
        fd = open_regular(self._path, self.root)
        return os.fdopen(fd, "rb")

    def mmap(self) -> Any:
        fd = open_regular(self._path, self.root)
        try:
            if os.fstat(fd).st_size == 0:
                return None
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------------------------
    def write_bytes(self, data: Any, atomic: bool = False) -> None:
        """Create or replace the file (never through a link: ``O_NOFOLLOW``); ``atomic``: through a temporary
        sibling created exclusively (``O_EXCL | O_NOFOLLOW``: a file or link planted at its name is never
        written through) and a rename."""
        target = self._path
        if atomic:
            fd, path = _create_temporary(target)
        else:
            path = target
            fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        try:
            _write_all(fd, memoryview(data).cast("B"), path)
        except BaseException:
            os.close(fd)
            if atomic:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        os.close(fd)
        if atomic:
            os.replace(path, target)

    def open_output(self) -> LocalOutput:
        return LocalOutput(self)

    def open_update(self) -> LocalOutput:
        """An existing file, opened for writing at offsets (``pwrite``, ``copy_range(at=...)``), not truncated."""
        return LocalOutput(self, truncate=False)

    def append_line(self, text: str) -> None:
        """Append one line with a single ``write`` (``O_APPEND``: a concurrent reader sees whole lines)."""
        fd = _open_nofollow(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_all(fd, memoryview(text.encode("utf-8") + b"\n"), self._path)
        finally:
            os.close(fd)

    def create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(
                self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except FileExistsError:
            return False
        try:
            _write_all(fd, memoryview(data), self._path)
        finally:
            os.close(fd)
        return True

    def mkdir(self) -> None:
        os.makedirs(self._path, exist_ok=True)

    def delete(self, missing_ok: bool = True) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_tree(self) -> None:
        if os.path.isdir(self._path) and not os.path.islink(self._path):
            shutil.rmtree(self._path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def rename(self, target: Location) -> None:
        os.replace(self._path, target.path)

    def fsync_dir(self) -> None:
        """Make renames inside this directory durable (best effort)."""
        with contextlib.suppress(OSError):
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class _PinnedFds:
    """Descriptors of pinned files (a location with the identity a reader expects), kept open across reads: a
    reader asking for a few rows at a time pays one ``fstat`` per read, not an ``open`` + ``fstat`` + ``close``.
    Keyed by path and identity, so a file replaced since is opened again (and then fails its identity check);
    a descriptor in use is never closed; the least recently used beyond :attr:`size` are."""

    size = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: OrderedDict[tuple[str, tuple[Any, ...]], list[int]] = OrderedDict()  # key -> [fd, users]

    def acquire(self, loc: Location) -> int:
        key = (loc.path, tuple(loc.expected or ()))
        with self._lock:
            entry = self._fds.get(key)
            if entry is not None:
                entry[1] += 1
                self._fds.move_to_end(key)
        if entry is not None:
            try:
                _check_identity(loc, entry[0])  # rewritten in place since: an error, as on a fresh open
            except BaseException:
                self.release(loc, entry[0])
                raise
            return entry[0]
        fd = open_regular(loc.path, _root_of(loc))
        try:
            _check_identity(loc, fd)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            if key in self._fds:  # another thread opened it meanwhile: use theirs
                os.close(fd)
                entry = self._fds[key]
                entry[1] += 1
                return entry[0]
            self._fds[key] = [fd, 1]
            self._evict()
        return fd

    def release(self, loc: Location, fd: int) -> None:
        key = (loc.path, tuple(loc.expected or ()))
        with self._lock:
            entry = self._fds.get(key)
            if entry is not None and entry[0] == fd:
                entry[1] -= 1
            self._evict()

    def _evict(self) -> None:
        for key in list(self._fds):
            if len(self._fds) <= self.size:
                return
            fd, users = self._fds[key]
            if users <= 0:
                del self._fds[key]
                os.close(fd)


_PINNED = _PinnedFds()


class _Files:
    """The files of one batch of reads, each opened once (never blocking, regular files only, pins checked;
    pinned files through :data:`_PINNED`, kept open for the next batch)."""

    def __init__(self, missing_ok: bool) -> None:
        self.missing_ok = missing_ok
        self.fds: dict[str, int | None] = {}
        self.pinned: list[tuple[Location, int]] = []

    def fd(self, loc: Location) -> int | None:
        """The open descriptor of ``loc``, or ``None`` when it is missing (with ``missing_ok``)."""
        path = loc.path
        if path not in self.fds:
            if loc.expected is not None:
                fd = _PINNED.acquire(loc)  # FileNotFoundError of a pinned file: it was there, it is gone
                self.pinned.append((loc, fd))
                self.fds[path] = fd
                return fd
            try:
                self.fds[path] = open_regular(path, _root_of(loc))
            except FileNotFoundError:
                if not self.missing_ok:
                    raise
                self.fds[path] = None
        return self.fds[path]

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        kept = {fd for _, fd in self.pinned}
        for fd in self.fds.values():
            if fd is not None and fd not in kept:
                os.close(fd)
        for loc, fd in self.pinned:
            _PINNED.release(loc, fd)


def _pread_all(views: Sequence[tuple[Location, int, memoryview]], missing_ok: bool) -> list[bool]:
    out: list[bool] = []
    with _Files(missing_ok) as files:
        for loc, off, view in views:
            fd = files.fd(loc)
            if fd is None:
                out.append(False)
                continue
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], off + done)
                if n <= 0:
                    raise short_read(loc, off + done, off + len(view))
                done += n
            out.append(True)
    return out


def _root_of(loc: Location) -> str | None:
    return loc.root if isinstance(loc, LocalLocation) else None


def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _check_identity(loc: Location, fd: int | None) -> None:
    if fd is None:
        return
    if identity_of(os.fstat(fd)) != loc.expected:
        from actfmt.errors import ChangedError

        raise ChangedError(
            f"{loc}: the file changed (rewritten or replaced) after it was opened; reopen it and read again."
        )


def _open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` for writing that never writes through a symbolic link at ``path`` (``O_NOFOLLOW``)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP,
                "a symbolic link is in the way (actfmt never writes through a link: planted?); remove it, or "
                "choose another destination",
                path,
            ) from None
        raise


def _create_temporary(target: str) -> tuple[int, str]:
    """A new temporary sibling of ``target`` (``{target}.actfmt-tmp``), created with ``O_EXCL | O_NOFOLLOW``;
    one left there (a killed run, or planted: a file or a link) is removed first -- the link itself, never
    its target -- and where it cannot be (another user's, in a sticky directory) a unique name is used."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    path = f"{target}.actfmt-tmp"
    for attempt in range(3):
        try:
            return os.open(path, flags, 0o644), path
        except FileExistsError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:  # not ours to remove: another name, just as exclusive
                path = f"{target}.actfmt-tmp-{os.getpid()}-{os.urandom(4).hex()}"
            if attempt == 2:
                raise
    raise FileExistsError(errno.EEXIST, "cannot create a temporary file", path)  # pragma: no cover


def _write_all(fd: int, view: memoryview, path: str, offset: int | None = None) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.write(fd, view[done:]) if offset is None else os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:  # a write names no file: say which (a full disk, a quota...)
            raise OSError(exc.errno, exc.strerror, path) from None
        if n <= 0:  # pragma: no cover - write never returns 0 for a regular file
            raise OSError(errno.EIO, "short write", path)
        done += n


class LocalOutput(OutputFile):
    """A local file written sequentially (``write``), at offsets (``pwrite``), or by ``copy_file_range``."""

    def __init__(self, location: LocalLocation, truncate: bool = True) -> None:
        self.location = location
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if truncate else 0)
        self._fd: int | None = _open_nofollow(location.path, flags)
        self._pos = 0

    @property
    def fd(self) -> int:
        assert self._fd is not None, "closed"
        return self._fd

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        _write_all(self.fd, view, self.location.path)
        self._pos += len(view)

    def pwrite(self, data: Any, offset: int) -> None:
        _write_all(self.fd, memoryview(data).cast("B"), self.location.path, offset)

    def copy_range(self, source: Location, offset: int, length: int, at: int | None = None) -> None:
        """Append ``length`` bytes of ``source`` from ``offset`` (or write them at offset ``at``), with
        ``os.copy_file_range``: in the kernel, a reflink on XFS / btrfs; through user space across file systems."""
        if not isinstance(source, LocalLocation):
            super().copy_range(source, offset, length)
            return
        src = open_regular(source.path, source.root)
        try:
            done = 0
            while done < length:
                dst_at = None if at is None else at + done  # None: from (and advancing) our position
                try:
                    n = os.copy_file_range(src, self.fd, length - done, offset + done, dst_at)
                except OSError as exc:
                    if exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                        buf = bytearray(length - done)  # another file system, or no kernel support
                        _pread_all([(source, offset + done, memoryview(buf))], False)
                        if at is None:
                            self.write(buf)
                        else:
                            self.pwrite(buf, at + done)
                        return
                    if exc.filename is None:
                        exc.filename = self.location.path
                    raise
                if n <= 0:
                    raise short_read(source, offset + done, offset + length)
                done += n
                if at is None:
                    self._pos += n
        finally:
            os.close(src)

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.location.path) from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.location.path)
