"""Exceptions raised by actfmt.

Every exception derives from :class:`ActfmtError` and, where one fits, from the matching builtin, so
``except FileNotFoundError`` keeps working for callers who do not know actfmt.  Every message names the
file concerned and, where there is one, the fix.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = [
    "ActfmtError",
    "BadHeaderError",
    "ChangedError",
    "ConversionError",
    "CorruptShardError",
    "DestinationExistsError",
    "ExternalDataError",
    "FormatError",
    "Interrupted",
    "LockedError",
    "MetadataError",
    "NotASplitError",
    "NotATensorError",
    "OutsideTreeError",
    "RemoteStorageError",
    "ShardNotFoundError",
    "StatsError",
    "TruncatedError",
    "UnsafeShardError",
    "ValidationFailedError",
    "os_error_from_text",
    "os_error_message",
]


class ActfmtError(Exception):
    """Root of every error actfmt raises on purpose."""


class NotASplitError(ActfmtError, FileNotFoundError):
    """A path holds no split (no ``metadata.json``, no ``layer_XX`` directories, no known store)."""


class ShardNotFoundError(ActfmtError, FileNotFoundError):
    """A shard file the layout promises is not there."""


class MetadataError(ActfmtError, ValueError):
    """``metadata.json`` (or a store's attributes) cannot be parsed or lacks what is needed."""


class CorruptShardError(ActfmtError, ValueError):
    """A file is not a loadable tensor file (empty, truncated, garbage)."""


class TruncatedError(CorruptShardError):
    """A file ends before the bytes its header (or the plan) promises: a partial copy, a full disk."""


class ChangedError(ActfmtError, OSError):
    """A file changed (rewritten, replaced, resized) while actfmt was reading it, or since it was opened."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OutsideTreeError(ActfmtError, OSError):
    """A path under a tree leads (through a symbolic link) outside it: refused, never read (ACT005).

    ``filename`` is the path inside the tree; ``target`` where the link leads."""

    def __init__(self, message: str, path: str = "", target: str = "") -> None:
        super().__init__(message)
        self.filename = path
        self.target = target

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsafeShardError(ActfmtError, ValueError):
    """A pickle asks for more than plain tensors; refused by ``weights_only`` and never executed."""


class NotATensorError(ActfmtError, TypeError):
    """A file loads, but holds something other than one tensor (a dict, a list, ...)."""


class FormatError(ActfmtError, ValueError):
    """Unknown format name, or a store whose format cannot be recognised."""


class BadHeaderError(FormatError):
    """A store's header declares what actfmt refuses to act on: a size beyond sane bounds or beyond the file
    (shapes, chunk shapes, chunk counts, shard rows), an unknown or unsafe codec, a malformed structure."""


class ExternalDataError(FormatError):
    """A store refers to data outside itself (HDF5 external storage, virtual datasets or external links; a Zarr
    chunk key that leaves the store): refused, never read."""


class DestinationExistsError(ActfmtError, FileExistsError):
    """The destination exists and neither ``--overwrite`` nor ``--resume`` was given."""


class LockedError(ActfmtError, BlockingIOError):
    """Another process holds the destination's lock."""


class ConversionError(ActfmtError, RuntimeError):
    """A conversion failed (verification mismatch, unsupported option, ...)."""


class RemoteStorageError(ActfmtError, OSError):
    """Object storage (``s3://``, ``gs://``, ...) refused or failed a request; the message never holds secrets."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StatsError(ActfmtError, ValueError):
    """``actfmt stats`` cannot do what was asked (an unknown layer, input that cannot be read)."""


class ValidationFailedError(ActfmtError, ValueError):
    """A conversion source failed validation; ``report`` holds the findings, ``lines`` the message's lines (a
    name inside a line may hold any character: a renderer escapes each line on its own)."""

    def __init__(self, message: str, report: object = None, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.report = report
        self.lines = lines if lines is not None else message.split("\n")


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command line tool (raised by its signal handlers, like KeyboardInterrupt).

    ``partials``: partial stores an interrupted ``convert`` kept for ``--resume``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.partials: list[str] = []

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: Per errno: what the user can do about it.
_OS_HINTS = {
    errno.ENOSPC: "free some space or choose another destination",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another destination",
    errno.EACCES: "check the permissions of the path and its directories, or choose another location",
    errno.EPERM: "check the permissions of the path and its directories, or choose another location",
    errno.EROFS: "the file system is mounted read-only: choose a writable destination",
    errno.ENAMETOOLONG: "shorten the path or the file names",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --jobs",
    errno.ENFILE: "the system's open-file table is full: close other programs or use fewer --jobs",
    errno.EIO: "an input/output error: check the disk or the network file system",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "the path is a directory where a file was expected",
    errno.EXDEV: "source and destination are on different file systems",
}
#: ``errno = N`` as HDF5 and other C libraries print it inside their own messages.
_EMBEDDED_ERRNO = re.compile(r"errno\s*=\s*(\d+)")


def os_error_from_text(message: str, path: str | None = None) -> OSError | None:
    """An ``OSError`` for a library's message that embeds an ``errno = N`` (HDF5's, for one), else ``None``."""
    m = _EMBEDDED_ERRNO.search(message)
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), path)


def os_error_message(exc: OSError, path: str | None = None) -> str:
    """One line for an operating-system error: the path, the cause and what to do.  Library internals (an
    HDF5 error stack, a C++ assertion) are reduced to their errno when they carry one."""
    code = exc.errno
    where = exc.filename if exc.filename is not None else path
    cause = exc.strerror
    if code is None:
        found = os_error_from_text(str(exc))
        if found is not None:
            code, cause = found.errno, found.strerror
    if code is None or cause is None:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{where}: {text}" if where is not None else text
    hint = _OS_HINTS.get(code)
    head = f"{where}: {cause}" if where is not None else cause
    if exc.filename2 is not None:
        head = f"{where} -> {exc.filename2}: {cause}"
    return (
        f"{head} ({errno.errorcode.get(code, code)}); {hint}."
        if hint
        else f"{head} ({errno.errorcode.get(code, code)})."
    )
