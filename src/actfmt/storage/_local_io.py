"""The local file system underneath :class:`~actfmt.storage.local.LocalLocation`: opening regular files without
blocking and without leaving the tree (``O_PATH`` pins), the descriptors of pinned files kept open across reads,
positional reads of many ranges, the shared read pool, and writes that never go through a link."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actfmt.errors import ChangedError, OutsideTreeError
from actfmt.storage.base import Kind, Location, short_read

#: Reads of at least this many bytes are split over two threads (one core copies ~5 GB/s from the cache).
PARALLEL_READ_BYTES = 16 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def contained(real: str, root: str) -> bool:
    """Is the resolved path ``real`` the resolved ``root`` or below it?"""
    return real == root or real.startswith(root.rstrip("/") + "/")


def outside_error(path: str, real: str, root: str) -> OutsideTreeError:
    return OutsideTreeError(
        f"{path}: a link to {real}, outside the tree {root}; refused, not read (actfmt never follows a "
        f"link out of the tree it is given). Replace the link by the file it stands for, or point actfmt "
        f"at its target itself.",
        path,
        real,
    )


def kind_of(mode: int) -> str:
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


def pin_path(path: str, root: str) -> tuple[int | None, str]:
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
                raise outside_error(path, real, root) from None
            raise
        try:
            real = os.readlink(f"{_PROC_FD}/{opath}")
        except OSError:
            real = os.path.realpath(path)
        if not contained(real, root):
            os.close(opath)
            raise outside_error(path, real, root)
        return opath, real
    real = os.path.realpath(path)
    if not contained(real, root):
        raise outside_error(path, real, root)
    return None, real


def open_regular(path: str, root: str | None = None) -> int:
    """``os.open`` for reading that never blocks (``O_NONBLOCK``) and refuses anything but a regular file.

    With a confinement ``root`` (a resolved path): a path that leads outside ``root`` is refused
    (:class:`~actfmt.errors.OutsideTreeError`), never opened; what is opened is the object checked."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if root is None:
        fd = os.open(path, flags)
    else:
        opath, real = pin_path(path, root)
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


class Files:
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

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        kept = {fd for _, fd in self.pinned}
        for fd in self.fds.values():
            if fd is not None and fd not in kept:
                os.close(fd)
        for loc, fd in self.pinned:
            _PINNED.release(loc, fd)


def pread_all(views: Sequence[tuple[Location, int, memoryview]], missing_ok: bool) -> list[bool]:
    out: list[bool] = []
    with Files(missing_ok) as files:
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
    """The confinement root of a local location (``None``: not confined, or not a local location)."""
    root = getattr(loc, "root", None)
    return root if isinstance(root, str) else None


def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _check_identity(loc: Location, fd: int | None) -> None:
    if fd is None:
        return
    if identity_of(os.fstat(fd)) != loc.expected:
        raise ChangedError(
            f"{loc}: the file changed (rewritten or replaced) after it was opened; reopen it and read again."
        )


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
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


def create_temporary(target: str) -> tuple[int, str]:
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


def write_all(fd: int, view: memoryview, path: str, offset: int | None = None) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.write(fd, view[done:]) if offset is None else os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:  # a write names no file: say which (a full disk, a quota...)
            raise OSError(exc.errno, exc.strerror, path) from None
        if n <= 0:  # pragma: no cover - write never returns 0 for a regular file
            raise OSError(errno.EIO, "short write", path)
        done += n
