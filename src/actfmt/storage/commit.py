"""How a destination becomes complete: one interface, one strategy per kind of storage.

* **Local** (:class:`LocalCommit`): an exclusive ``flock`` on a hidden lock file beside the destination (the
  kernel releases it when the process dies, so a lock left by a killed run is stale, detected and replaced),
  the store written into a hidden sibling (``.EM.zarr.actfmt-partial``) and renamed into place when complete.
  Replacing an old store (``--overwrite``) renames it aside first: at every instant the final name holds the
  old complete store or the new one.
* **Object storage** (:class:`ObjectCommit`): no rename and no kernel lock.  The lock is an object created
  exclusively (``If-None-Match: *`` on S3) holding a unique token, checked again before the store's completeness
  mark, which the writer writes last; a partial store never looks complete.  ``--overwrite`` deletes the old
  store first.  A format that cannot write object storage in place (HDF5) is written into a local staging
  directory and uploaded when complete (:class:`StagedCommit`): the upload is the publication.

Each keeps a *journal* beside the destination (``.EM.zarr.actfmt-state.jsonl``): a header line with the options
and the source the partial store was started from, then one line per finished layer, appended (locally with
one ``O_APPEND`` write: no rename per layer).  ``--resume`` reads it back.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import tempfile
import uuid
from datetime import UTC, datetime
from typing import Any

from actfmt.errors import LockedError
from actfmt.storage.base import Location
from actfmt.storage.local import LocalLocation

__all__ = ["Commit", "LocalCommit", "ObjectCommit", "StagedCommit", "commit_for", "sibling"]

#: The longest file name most file systems accept.
NAME_MAX = 255


def sibling(final: Location, tag: str) -> Location:
    """``.{name}.actfmt-{tag}`` beside ``final``; a name too long for the file system is shortened with a
    hash of the full name (so a 250-character split name still gets its lock and its partial)."""
    name = f".{final.name}.actfmt-{tag}"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        digest = hashlib.sha256(final.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        name = f".actfmt-{digest}.{tag}"
    return final.with_name(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Commit(abc.ABC):
    """Lock, partial store, journal and publication of one destination.  A context manager (the lock)."""

    def __init__(self, final: Location) -> None:
        self.final = final
        self.journal = sibling(final, "state.jsonl")
        #: Things worth telling the user (a stale lock replaced, ...).
        self.notes: list[str] = []

    @property
    @abc.abstractmethod
    def work(self) -> Location:
        """Where the writer writes."""

    @abc.abstractmethod
    def __enter__(self) -> Commit: ...

    @abc.abstractmethod
    def __exit__(self, *exc: object) -> None: ...

    def final_exists(self) -> bool:
        return self.final.kind() is not None

    def has_partial(self) -> bool:
        """Is there an interrupted conversion (a partial store and its journal) to continue?"""
        return self.work.kind() is not None and self.journal.kind() is not None

    def check_owner(self) -> None:  # noqa: B027 - only object storage can lose its lock
        """Raise :class:`~actfmt.errors.LockedError` if another run took the destination over."""

    # -- journal ----------------------------------------------------------------------------------------
    def read_journal(self) -> list[dict[str, Any]]:
        """The journal's records (a torn last line is ignored); ``[]`` when there is none."""
        try:
            text = self.journal.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def start_journal(self, header: dict[str, Any]) -> None:
        self.journal.write_bytes((json.dumps(header, sort_keys=True) + "\n").encode(), atomic=True)

    def append_journal(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        if isinstance(self.journal, LocalLocation):
            self.journal.append_line(line)
            return
        records = self.read_journal()  # object storage: no append; one PUT replaces the object whole
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*records, record])
        self.journal.write_bytes(text.encode())

    # -- life cycle -------------------------------------------------------------------------------------
    def discard_partial(self) -> None:
        """Remove a partial store and its journal (a fresh start)."""
        self.work.delete_tree()
        self.journal.delete()

    @abc.abstractmethod
    def prepare(self, overwrite: bool) -> None:
        """Make ``work`` ready for a fresh store (it does not exist yet when this returns)."""

    @abc.abstractmethod
    def publish(self) -> None:
        """The complete store (its completeness mark already written) becomes the destination."""


class LocalCommit(Commit):
    """flock + hidden sibling + rename (see the module docstring)."""

    def __init__(self, final: LocalLocation) -> None:
        super().__init__(final)
        self.lock = sibling(final, "lock")
        self.partial = sibling(final, "partial")
        self._fd: int | None = None

    @property
    def work(self) -> Location:
        return self.partial

    def _open_lock(self) -> int:
        """The lock file's descriptor: created with ``O_EXCL | O_NOFOLLOW``, or an existing one opened with
        ``O_NOFOLLOW`` and checked to be a plain file with one link (a symlink or a hard link planted at the
        lock's name, in a shared directory, is refused: never written through, never truncated)."""
        path = self.lock.path
        nofollow = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(3):
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
            except FileExistsError:
                pass
            try:
                fd = os.open(path, os.O_RDWR | nofollow)
            except FileNotFoundError:  # removed meanwhile: create it again
                continue
            except PermissionError:
                try:  # a lock file left by another user: flock works on a read-only descriptor too
                    fd = os.open(path, os.O_RDONLY | nofollow)
                except FileNotFoundError:
                    continue
                except PermissionError:
                    os.unlink(path)  # unreadable: replace it (a live owner keeps its own descriptor)
                    continue
                except OSError as exc:
                    raise self._planted(exc) from None
            except OSError as exc:  # ELOOP: a symbolic link at the lock's name
                raise self._planted(exc) from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise self._planted(None)
            return fd
        raise LockedError(f"{self.final}: cannot take the lock {self.lock}; try again.")

    def _planted(self, exc: OSError | None) -> LockedError:
        why = (
            "is a symbolic link"
            if exc is not None and exc.errno == errno.ELOOP
            else "is not a plain lock file"
        )
        return LockedError(
            f"{self.lock}: the lock file {why} (left or planted by someone else?); actfmt never writes through "
            f"it. Remove it (rm {self.lock.name!r}) if you own the directory, or choose another destination."
        )

    def __enter__(self) -> LocalCommit:
        self.final.parent.mkdir()
        fd = self._open_lock()

        previous: int | None = None
        with contextlib.suppress(OSError):
            # only a pid is taken from the file (nothing else it holds is ever shown)
            head = os.pread(fd, 200, 0).split(maxsplit=1)
            if head and head[0].isdigit() and len(head[0]) <= 10:
                previous = int(head[0])
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = f" by process {previous}" if previous is not None else ""
            raise LockedError(
                f"{self.final}: another actfmt convert is writing this destination (locked{owner}, "
                f"{self.lock.name}); wait for it to finish, or choose another destination."
            ) from None
        if previous is not None and previous != os.getpid():
            self.notes.append(
                f"{self.final}: replaced a stale lock left by process {previous}, which is no longer running."
            )
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {_now()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock.path)
            os.close(self._fd)
            self._fd = None

    def prepare(self, overwrite: bool) -> None:
        self.discard_partial()

    def publish(self) -> None:
        final, partial = self.final, self.partial
        assert isinstance(final, LocalLocation)
        if final.kind() is not None or os.path.islink(final.path):
            old = sibling(final, "old")
            old.delete_tree()
            final.rename(old)
            partial.rename(final)
            old.delete_tree()
        else:
            partial.rename(final)
        LocalLocation(final.parent.path).fsync_dir()
        self.journal.delete()


class ObjectCommit(Commit):
    """Lock object + in-place writing + completeness mark last (see the module docstring)."""

    def __init__(self, final: Location) -> None:
        super().__init__(final)
        self.lock = sibling(final, "lock")
        self.token = uuid.uuid4().hex
        self._held = False

    @property
    def work(self) -> Location:
        return self.final

    def _body(self) -> bytes:
        return json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "created": _now()}
        ).encode()

    def _owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.lock.read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _refuse(self) -> LockedError:
        return LockedError(
            f"{self.final}: another actfmt convert is writing this destination (lock object {self.lock}); "
            f"wait for it to finish, or, if no conversion is running (a killed run on another machine), "
            f"delete that object."
        )

    def __enter__(self) -> ObjectCommit:
        if not self.lock.create_exclusive(self._body()):
            owner = self._owner() or {}
            stale = (
                owner.get("host") == socket.gethostname()
                and isinstance(owner.get("pid"), int)
                and not _pid_alive(owner["pid"])
            )
            if not stale:
                raise self._refuse()
            self.lock.delete()
            self.notes.append(
                f"{self.final}: replaced a stale lock object left by process {owner['pid']} on this machine, "
                f"which is no longer running."
            )
            if not self.lock.create_exclusive(self._body()):
                raise self._refuse()
        self.check_owner()  # read back: where the exclusive create is not atomic, the last writer wins
        self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            with contextlib.suppress(Exception):
                if (self._owner() or {}).get("token") == self.token:
                    self.lock.delete()
            self._held = False

    def check_owner(self) -> None:
        if (self._owner() or {}).get("token") != self.token:
            raise self._refuse()

    def prepare(self, overwrite: bool) -> None:
        if self.final.kind() is not None:  # no atomic replace on object storage: the old store goes first
            self.final.delete_tree()
        self.journal.delete()

    def publish(self) -> None:
        self.journal.delete()


class StagedCommit(ObjectCommit):
    """Written into a local staging directory, uploaded when complete (formats that cannot write object
    storage in place: HDF5).  The upload is the publication; ``--resume`` starts again."""

    def __init__(self, final: Location) -> None:
        super().__init__(final)
        self._stage = LocalLocation(tempfile.mkdtemp(prefix="actfmt-stage-"))
        self._work = self._stage / final.name

    @property
    def work(self) -> Location:
        return self._work

    def has_partial(self) -> bool:
        return False

    def __exit__(self, *exc: object) -> None:
        try:
            self._stage.delete_tree()
        finally:
            super().__exit__(*exc)

    def prepare(self, overwrite: bool) -> None:
        self._work.delete_tree()
        self.journal.delete()

    def publish(self) -> None:
        files = self._work.find()
        if self.final.kind() is not None:
            self.final.delete_tree()
        if self._work.is_file():
            self.final.write_bytes(self._work.read_bytes())
        else:
            self.final.put_many({self.final / key: (self._work / key).read_bytes() for key in files})
        self.journal.delete()


def commit_for(final: Location, in_place: bool = True) -> Commit:
    """The strategy for ``final``: local rename, or object storage (in place, or staged when the format
    cannot write there in place)."""
    if isinstance(final, LocalLocation):
        return LocalCommit(final)
    return ObjectCommit(final) if in_place else StagedCommit(final)
