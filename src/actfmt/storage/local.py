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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from actfmt.errors import OutsideTreeError
from actfmt.storage._local_io import (
    PARALLEL_READ_BYTES,
    Files,
    contained,
    create_temporary,
    identity_of,
    kind_of,
    open_nofollow,
    open_regular,
    outside_error,
    pin_path,
    pread_all,
    read_pool,
    write_all,
)
from actfmt.storage.base import SCAN_PIECE, Entry, Kind, Location, OutputFile, ReadRequest, Stat, short_read

__all__ = ["LocalLocation", "contained", "open_regular"]


def _restore_local(path: str, expected: tuple[Any, ...] | None, root: str | None = None) -> LocalLocation:
    loc = LocalLocation(path, root=root)
    loc.expected = expected
    return loc


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
        opath, real = pin_path(self._path, self.root)
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
                opath, real = pin_path(self._path, self.root)
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
        return Stat(kind_of(st.st_mode), st.st_size, st.st_mtime_ns, identity_of(st), link)

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
                out.append(Entry(e.name, self._with_path(e.path), kind_of(st.st_mode), st.st_size, link))
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
                        raise outside_error(full, real, confine)
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
        with Files(missing_ok) as files:
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
            second = read_pool().submit(pread_all, pieces[1], False)
            pread_all(pieces[0], False)
            second.result()
            return [True] * len(views)
        return pread_all(views, missing_ok)

    @classmethod
    def _scan(cls, runs: Sequence[tuple[Location, int, int]], visit: Callable[[memoryview], None]) -> None:
        buf = memoryview(bytearray(SCAN_PIECE))
        with Files(False) as files:
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
            fd, path = create_temporary(target)
        else:
            path = target
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        try:
            write_all(fd, memoryview(data).cast("B"), path)
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
        fd = open_nofollow(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            write_all(fd, memoryview(text.encode("utf-8") + b"\n"), self._path)
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
            write_all(fd, memoryview(data), self._path)
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


class LocalOutput(OutputFile):
    """A local file written sequentially (``write``), at offsets (``pwrite``), or by ``copy_file_range``."""

    def __init__(self, location: LocalLocation, truncate: bool = True) -> None:
        self.location = location
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if truncate else 0)
        self._fd: int | None = open_nofollow(location.path, flags)
        self._pos = 0

    @property
    def fd(self) -> int:
        assert self._fd is not None, "closed"
        return self._fd

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        write_all(self.fd, view, self.location.path)
        self._pos += len(view)

    def pwrite(self, data: Any, offset: int) -> None:
        write_all(self.fd, memoryview(data).cast("B"), self.location.path, offset)

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
                        pread_all([(source, offset + done, memoryview(buf))], False)
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
