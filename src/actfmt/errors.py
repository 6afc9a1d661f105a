"""Exceptions raised by actfmt.

Every exception derives from :class:`ActfmtError` and, where one fits, from the matching builtin, so
``except FileNotFoundError`` keeps working for callers who do not know actfmt.  Every message names the
file concerned and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "ActfmtError",
    "ChangedError",
    "ConversionError",
    "CorruptShardError",
    "DestinationExistsError",
    "FormatError",
    "LockedError",
    "MetadataError",
    "NotASplitError",
    "NotATensorError",
    "RemoteStorageError",
    "ShardNotFoundError",
    "StatsError",
    "TruncatedError",
    "UnsafeShardError",
    "ValidationFailedError",
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


class UnsafeShardError(ActfmtError, ValueError):
    """A pickle asks for more than plain tensors; refused by ``weights_only`` and never executed."""


class NotATensorError(ActfmtError, TypeError):
    """A file loads, but holds something other than one tensor (a dict, a list, ...)."""


class FormatError(ActfmtError, ValueError):
    """Unknown format name, or a store whose format cannot be recognised."""


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
    """A conversion source failed validation; ``report`` holds the findings."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
