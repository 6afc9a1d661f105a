"""ACT0xx: files that cannot be read, or are not plain tensor files."""

from __future__ import annotations

import re
from collections.abc import Iterable

from actfmt.checks.base import Finding
from actfmt.checks.context import ShardEntry, SplitContext, SplitRule
from actfmt.errors import CorruptShardError, NotATensorError, UnsafeShardError

__all__ = ["CorruptShard", "NotATensor", "UnreadableFile", "UnsafeShard"]


def _short(exc: BaseException, entry: ShardEntry) -> str:
    """The error message without the absolute path prefix (the location already names the file)."""
    msg = str(exc)
    prefix = f"{entry.path}: "
    msg = msg[len(prefix) :] if msg.startswith(prefix) else msg
    # torch's zip reader appends a long generic hint; keep the cause
    return re.sub(r"\. This is an internal miniz error[^)]*", "", msg)


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class UnreadableFile(SplitRule):
    """A file or directory cannot be opened or read.

    Checks that every shard file, every layer directory and `metadata.json` can be opened and read
    (permissions, I/O errors, a dangling symlink, a directory where a file is expected), and that a
    converted store (`.zarr`, `.h5`, safetensors) opens.

    Why: an unreadable file makes every reader fail halfway through a job; the rest of the file's checks are
    skipped (one root cause, one finding).

    Fix: restore read permission (`chmod a+r`), re-copy the file from a good source, or replace the
    directory / dangling link by the file it should be.
    """

    code = "ACT001"
    name = "unreadable-file"
    pt_only = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.format != "pt":
            err = ctx.cache.get("reader_error")
            if err is not None:
                yield cls.finding(ctx.loc(), f"cannot open the {ctx.format} store: {err}")
            return
        if ctx.list_error is not None:
            yield cls.finding(ctx.loc(), f"cannot list the split directory: {_oserror_text(ctx.list_error)}")
        if ctx.metadata_state == "unreadable" and ctx.format == "pt":
            yield cls.finding(
                ctx.metadata_location,
                f"cannot read metadata.json: {ctx.metadata_detail}; the checks that need it are skipped",
            )
        for layer in ctx.layers:
            if layer.list_error is not None:
                yield cls.finding(
                    layer.location, f"cannot list {layer.name}/: {_oserror_text(layer.list_error)}"
                )
            for s in layer.shards:
                if isinstance(s.error, OSError):
                    what = "is a directory, not a file" if s.path.is_dir() else _oserror_text(s.error)
                    if s.path.is_symlink() and not s.path.exists():
                        what = f"a dangling symlink (to {s.path.readlink()})"
                    yield cls.finding(s.location, f"cannot read {s.path.name}: {what}")


class CorruptShard(SplitRule):
    """A shard is not a loadable tensor file: empty, truncated or garbage.

    Checks that each `shard_XXX.pt` is a complete `torch.save` file (a zip archive, or the legacy
    pickle format) whose tensor loads.

    Why: a truncated shard (a full disk, an interrupted copy) fails only when a job reaches it.

    Fix: re-create the shard (re-run the producer for that split) or re-copy it from a good source.
    """

    code = "ACT002"
    name = "corrupt-shard"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for s in ctx.all_shards():
            if s.error is None or isinstance(s.error, (OSError, UnsafeShardError, NotATensorError)):
                continue
            detail = _short(s.error, s) if isinstance(s.error, CorruptShardError) else f"{s.error}"
            yield cls.finding(s.location, detail)


class UnsafeShard(SplitRule):
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

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for s in ctx.all_shards():
            if isinstance(s.error, UnsafeShardError):
                yield cls.finding(s.location, _short(s.error, s))


class NotATensor(SplitRule):
    """A shard loads, but holds something other than a single tensor.

    Checks that each shard holds one `torch.Tensor` (not a dict, a list, a tuple or a number).

    Why: readers index a shard's rows directly; a `{"acts": tensor}` dict breaks them.

    Fix: save the tensor itself: `torch.save(tensor, path)`.
    """

    code = "ACT004"
    name = "not-a-tensor"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for s in ctx.all_shards():
            if isinstance(s.error, NotATensorError):
                yield cls.finding(s.location, _short(s.error, s))
