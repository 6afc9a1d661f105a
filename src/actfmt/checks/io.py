"""ACT0xx: files that cannot be read, or are not plain tensor files."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from actfmt.checks.base import ERROR, WARNING, Finding
from actfmt.checks.context import ShardEntry, ShardRule, SplitContext, SplitRule, WalkRule
from actfmt.checks.stores import REFUSED, refusal, refusal_message
from actfmt.errors import (
    CorruptShardError,
    ExternalDataError,
    NotATensorError,
    OutsideTreeError,
    UnsafeShardError,
)
from actfmt.formats import WalkProblem
from actfmt.storage import Kind

__all__ = [
    "CorruptShard",
    "ExternalData",
    "NotATensor",
    "SpecialFile",
    "UnfollowedLink",
    "UnreadableFile",
    "UnsafeShard",
]


def _short(exc: BaseException, entry: ShardEntry) -> str:
    """The error message without the absolute path prefix (the location already names the file)."""
    msg = str(exc)
    prefix = f"{entry.path}: "
    msg = msg[len(prefix) :] if msg.startswith(prefix) else msg
    # torch's zip reader appends a long generic hint; keep the cause
    return re.sub(r"\. This is an internal miniz error[^)]*", "", msg)


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class UnreadableFile(SplitRule, WalkRule):
    """A file or directory cannot be opened or read.

    Checks that every directory of the tree can be listed, that every shard file, every layer directory and
    `metadata.json` can be opened and read (permissions, I/O errors, a dangling symlink, a directory where a
    file is expected), and that a converted store (`.zarr`, `.h5`, safetensors) opens.

    Why: an unreadable file makes every reader fail halfway through a job, and a directory that cannot be
    listed hides the splits below it: a tree that cannot be read whole never validates as OK.  The rest of the
    file's checks are skipped (one root cause, one finding).

    Fix: restore read permission (`chmod a+r`), re-copy the file from a good source, or replace the
    directory / dangling link by the file it should be.
    """

    code = "ACT001"
    name = "unreadable-file"
    needs_inventory = False
    walk_kinds = ("unreadable", "dangling", "too-deep")

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.inventory is None:
            if ctx.reader_error is not None and not isinstance(
                ctx.reader_error, (OutsideTreeError, *REFUSED)
            ):
                yield cls.finding(ctx.loc(), f"cannot open the {ctx.format} store: {ctx.reader_error}")
            return
        if ctx.list_error is not None:
            yield cls.finding(ctx.loc(), f"cannot list the split directory: {_oserror_text(ctx.list_error)}")
        if ctx.metadata_state == "unreadable" and ctx.list_error is None:
            yield cls.finding(
                ctx.metadata_location,
                f"cannot read metadata.json: {ctx.metadata_detail}; the checks that need it are skipped",
            )
        for layer in ctx.layers:
            if layer.list_error is not None and not isinstance(layer.list_error, OutsideTreeError):
                yield cls.finding(
                    layer.location, f"cannot list {layer.name}/: {_oserror_text(layer.list_error)}"
                )
            for s in layer.shards:
                if isinstance(s.error, OutsideTreeError):  # ACT005's
                    continue
                if isinstance(s.error, OSError) and s.kind != Kind.SPECIAL:
                    yield cls.finding(s.location, f"cannot read {s.name}: {_oserror_text(s.error)}")


class _LoadError(ShardRule):
    """A shard whose loading failed with :attr:`error` (the message says how)."""

    error: ClassVar[type[Exception]]

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        if isinstance(s.error, cls.error):
            yield cls.finding(s.location, _short(s.error, s))


class CorruptShard(ShardRule):
    """A shard is not a loadable tensor file: empty, truncated or garbage.

    Checks that each `shard_XXX.pt` is a complete `torch.save` file (a zip archive, or the legacy
    pickle format) whose tensor loads.

    Why: a truncated shard (a full disk, an interrupted copy) fails only when a job reaches it.

    Fix: re-create the shard (re-run the producer for that split) or re-copy it from a good source.
    """

    code = "ACT002"
    name = "corrupt-shard"

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        if s.error is not None and not isinstance(s.error, (OSError, UnsafeShardError, NotATensorError)):
            yield cls.finding(
                s.location, _short(s.error, s) if isinstance(s.error, CorruptShardError) else f"{s.error}"
            )


class UnsafeShard(_LoadError):
    """A shard's pickle asks for more than plain tensors; refused, never executed.

    Checks, with `torch.load(weights_only=True)`, that a shard's pickle references nothing beyond tensors
    and their storages.  The file is refused before any of its code can run: actfmt never unpickles with
    `weights_only=False`.

    Why: a pickle can run arbitrary code when loaded; a shard that asks for `os.system` or `builtins.exec`
    is an attack or a badly made file, and anyone loading it the old way runs its payload.

    Fix: do not load the file with `weights_only=False`; delete it and re-create the shard from a trusted
    source with `torch.save(tensor, path)`.
    """

    code = "ACT003"
    name = "unsafe-shard"
    error = UnsafeShardError


class NotATensor(_LoadError):
    """A shard loads, but holds something other than a single tensor.

    Checks that each shard holds one `torch.Tensor` (not a dict, a list, a tuple or a number).

    Why: readers index a shard's rows directly; a `{"acts": tensor}` dict breaks them.

    Fix: save the tensor itself: `torch.save(tensor, path)`.
    """

    code = "ACT004"
    name = "not-a-tensor"
    error = NotATensorError


class UnfollowedLink(SplitRule, WalkRule):
    """A link that leaves the tree (never followed, never read), or a directory link back into it (a cycle).

    A tree is the directory given and nothing outside it.  A link to a file or directory inside the tree is
    followed like any entry; a link anywhere in the tree -- a split or layer directory, a shard, a
    `metadata.json`, a zarr chunk, a safetensors layer file, an `.h5` file -- that leads outside it is an
    error and is never read (not by validate, convert, verify, info, stats or `open`: storage refuses it).  A
    directory link back to a directory already walked (a loop) is not followed either, and is a warning.

    Why: a tree contributed by someone else could otherwise make actfmt read (and copy into a converted
    store) any file the user can read, such as `/etc/passwd` or a key; splits behind a loop would be checked
    twice or forever.

    Fix: replace the link by the file or directory it stands for (`cp --dereference`), or validate the link's
    target itself; remove a link that loops.
    """

    code = "ACT005"
    name = "unfollowed-link"
    severity = ERROR  # a cycle: a warning
    needs_inventory = False
    walk_kinds = ("outside", "cycle")

    @classmethod
    def check_walk(cls, problems: list[WalkProblem]) -> Iterable[Finding]:
        for p in problems:
            if p.kind in cls.walk_kinds:
                yield cls.finding(p.rel, p.detail, severity=WARNING if p.kind == "cycle" else None)

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        """What the split's scan met (the walk reports the same links first; a finding is kept once)."""
        detail = "a link outside the tree; not followed, never read"
        if ctx.metadata_state == "outside":
            yield cls.finding(ctx.metadata_location, detail)
        if isinstance(ctx.reader_error, OutsideTreeError):
            yield cls.finding(ctx.loc(), f"{ctx.reader_error}")
        for layer in ctx.layers:
            if isinstance(layer.list_error, OutsideTreeError):
                yield cls.finding(layer.location, detail)
            for s in layer.shards:
                if isinstance(s.error, OutsideTreeError):
                    yield cls.finding(s.location, detail)


class SpecialFile(SplitRule, WalkRule):
    """A FIFO, socket or device where a file or directory belongs (found with `stat`, never opened).

    Opening a FIFO blocks until something writes to it: actfmt looks at every entry's type first and never
    opens anything but regular files and directories.

    Why: such an entry is never a shard or a metadata file; a reader that opens it hangs.

    Fix: remove it, or replace it by the file it stands for.
    """

    code = "ACT006"
    name = "special-file"
    needs_inventory = False
    walk_kinds = ("special",)

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.metadata_state == "special":
            yield cls.finding(ctx.metadata_location, f"metadata.json is {ctx.metadata_detail}")
        for s in ctx.all_shards():
            if s.kind == Kind.SPECIAL:
                yield cls.finding(
                    s.location, f"{s.name} is not a regular file (a FIFO, socket or device); not opened"
                )


class ExternalData(SplitRule):
    """A store refers to data outside itself (HDF5 external or virtual storage, external links, Zarr keys).

    Checks every layer of an `.h5` file for external raw-data files (`create_dataset(..., external=...)`),
    virtual (VDS) layouts and external links, and every Zarr array for a chunk key separator other than `.` or
    `/` (one such as `/../../` names files beside the store).  Detected from the headers, never read: an external file may be any file on the machine (`/etc/passwd`), and a relative one resolves
    against the current directory (a FIFO there would hang the reader).

    Why: a store that validates while reading another file's bytes copies them into every conversion; the
    tree is not self-contained, and what it reads is whoever controls that path.

    Fix: re-create the store with its data inside it (`actfmt convert` writes none of these); do not trust it.
    """

    code = "ACT007"
    name = "external-data"
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.inventory is not None:
            return
        exc = refusal(ctx, (ExternalDataError,))
        if exc is not None:
            yield cls.finding(ctx.loc(), refusal_message(ctx, exc), "data inside the store", None)
