"""The command line's plumbing: its errors (one clean line, exit 2), the group that turns any exception into one,
and the parameter types and options the commands share.  The commands are :mod:`actfmt.cli`."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import click

from actfmt._escape import escape, escape_line, escape_lines
from actfmt._version import __version__
from actfmt.errors import (
    ActfmtError,
    Interrupted,
    ValidationFailedError,
    os_error_from_text,
    os_error_message,
)
from actfmt.formats import ALIASES, FORMATS, formats, get_format
from actfmt.formats.options import option_flag
from actfmt.storage import is_url, parse_storage_options

__all__ = [
    "SINGLE_THREADED_BLAS",
    "TARGETS",
    "ActfmtGroup",
    "CliError",
    "FormatChoice",
    "InternalError",
    "PathOrURL",
    "check_selection",
    "compression_help",
    "escape_library_messages",
    "executor_options",
    "install_signal_handlers",
    "jobs_option",
    "on_signal",
    "output_file_option",
    "output_format_option",
    "output_stream",
    "parse_layers",
    "progress_options",
    "split_csv",
    "storage_options_option",
]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A clean one-line failure: ``actfmt: error: ...`` on stderr, exit 2."""

    exit_code = 2

    def __init__(self, message: str, *, lines: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.lines = list(lines) if lines is not None else None

    def show(self, file: IO[Any] | None = None) -> None:
        # A message names files of the tree: escaped (actfmt._escape) on one line, a newline in a name written
        # \n; with ``lines`` (a failed validation's findings, one a line) each line escaped on its own.
        text = (
            "\n".join(escape_line(line) for line in self.lines)
            if self.lines is not None
            else escape_line(self.format_message())
        )
        click.echo(f"actfmt: error: {text}", err=True)


class InternalError(click.ClickException):
    """An unexpected exception: a bug in actfmt.  Exit 2, no traceback unless ``ACTFMT_DEBUG=1``."""

    exit_code = 2

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"actfmt: internal error: {escape_lines(self.format_message())}", err=True)
        click.echo(
            f"This is a bug in actfmt {__version__}. Please report it with the command you ran "
            "(set ACTFMT_DEBUG=1 to print the traceback).",
            err=True,
        )


def _debug() -> bool:
    return os.environ.get("ACTFMT_DEBUG", "") not in ("", "0")


class ActfmtGroup(click.Group):
    """Translates errors raised by any command: ActfmtError / OSError -> CliError; the rest -> InternalError."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.ClickException as exc:  # `actfmt --bad-option`: the argument quoted, escaped
            exc.message = escape_line(exc.message)  # type: ignore[misc]  # Final in click's stubs
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as exc:  # click's own messages quote the arguments: escaped
            if not isinstance(exc, CliError):
                exc.message = escape_line(exc.message)  # type: ignore[misc]  # Final in click's stubs
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ActfmtError as exc:
            lines = exc.lines if isinstance(exc, ValidationFailedError) else None
            raise CliError(str(exc), lines=lines) from None
        except BrokenPipeError:  # `actfmt info ... | head`: click leaves quietly
            raise
        except OSError as exc:  # the environment's fault (full disk, permissions...): one line, exit 2
            raise CliError(os_error_message(exc)) from None
        except Interrupted as exc:
            name = signal.Signals(exc.signum).name
            kept = (
                f"; partial kept at {escape(', '.join(exc.partials))}; rerun with --resume to continue"
                if exc.partials
                else ""
            )
            click.echo(f"actfmt: interrupted ({name}){kept}", err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except Exception as exc:
            embedded = os_error_from_text(str(exc))
            if (
                embedded is not None
            ):  # a library's wrapped OS error (an HDF5 error stack): still the environment
                raise CliError(os_error_message(embedded)) from None
            if _debug():
                traceback.print_exc()
            raise InternalError(exc) from None


def split_csv(ctx: click.Context, param: click.Parameter, value: Sequence[str] | None) -> list[str]:
    """Click callback: repeated and comma-separated values -> one flat list (``--select A,B --select C``)."""
    items: list[str] = []
    for chunk in value or ():
        items.extend(part.strip() for part in chunk.split(",") if part.strip())
    return items


@contextlib.contextmanager
def output_stream(path: str | None) -> Iterator[IO[str]]:
    """stdout, or ``path`` opened for writing (UTF-8)."""
    if path is None:
        yield sys.stdout
        return
    try:
        fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CliError(f"cannot write the output file {path}: {exc.strerror or exc}") from None
    with fh:
        yield fh


output_file_option = click.option(
    "-o",
    "--output-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Write the output to FILE instead of stdout.",
)


class PathOrURL(click.ParamType):
    """A local path (checked like ``click.Path``) or an fsspec URL (``s3://bucket/key``, ``memory://...``)."""

    name = "path"

    def __init__(self, exists: bool = False) -> None:
        self._path = click.Path(exists=exists)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and is_url(value):
            return value
        return self._path.convert(value, param, ctx)


def _storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    try:
        return parse_storage_options(value)
    except ActfmtError as exc:
        raise click.BadParameter(
            str(exc).removeprefix("--storage-options "), param_hint="'--storage-options'"
        ) from None


storage_options_option = click.option(
    "--storage-options",
    "storage_options",
    metavar="JSON",
    callback=_storage_options,
    help="fsspec options for s3:// gs:// ... URLs, as a JSON object, e.g. "
    '\'{"endpoint_url": "http://127.0.0.1:9000"}\' or \'{"anon": true}\'. Credentials come from the '
    "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS ...) or from here; never "
    "printed.",
)


def progress_options(keeps: str) -> Callable[[F], F]:
    """``-q/--quiet`` and ``--no-progress``: one pair, one meaning, on every long-running command.

    ``--no-progress`` never draws a progress bar; ``--quiet`` draws none either and also drops the summary line,
    keeping ``keeps`` (what the command still prints: findings, differences, warnings).
    """

    def decorate(fn: F) -> F:
        fn = click.option(
            "--no-progress",
            is_flag=True,
            help="Never draw a progress bar (it is drawn on stderr, and only when stderr is a terminal).",
        )(fn)
        fn = click.option(
            "-q", "--quiet", is_flag=True, help=f"No progress bar, no summary line: print {keeps} only."
        )(fn)
        return fn

    return decorate


def jobs_option(default: int, help: str) -> Any:
    """``-j/--jobs N`` (0: one per CPU)."""
    return click.option(
        "-j", "--jobs", type=click.IntRange(min=0), default=default, show_default=True, metavar="N", help=help
    )


def executor_options(what: str) -> Any:
    """``--executor local|dask`` and ``--scheduler ADDRESS``; ``what``: what happens to layers ("written")."""

    def decorate(f: Any) -> Any:
        f = click.option(
            "--scheduler",
            metavar="ADDRESS",
            help="With --executor dask: the scheduler to use (tcp://host:8786); default: a local cluster.",
        )(f)
        return click.option(
            "--executor",
            type=click.Choice(["local", "dask"]),
            default="local",
            show_default=True,
            help=f"Where layers are {what}: this process, or tasks on dask.distributed (needs actfmt[dask]).",
        )(f)

    return decorate


def format_options_option(fn: F) -> F:
    """One flag per field of every registered format's options class (``zarr_format`` -> ``--zarr-format``;
    help and choices from the field's metadata; a field two formats share is one flag), handed to the command
    as one mapping ``format_options`` of the options given."""
    found: dict[str, tuple[dataclasses.Field[Any], list[str]]] = {}
    for fmt in formats():
        for f in dataclasses.fields(fmt.options_class):
            found.setdefault(f.name, (f, []))[1].append(fmt.name)
    params: dict[str, dict[str, Any]] = {}
    for name, (f, owners) in found.items():
        choices = f.metadata.get("choices")
        by_text = {str(c): c for c in choices} if choices else None
        params[f"_format_option_{name}"] = {"field": name, "choices": by_text}
        default = "" if f.default is dataclasses.MISSING else f"; default {f.default}"
        fn = click.option(
            option_flag(name),
            f"_format_option_{name}",
            type=click.Choice(list(by_text)) if by_text else type(f.default),
            default=None,
            help=f"{f.metadata.get('help', name)} ({', '.join(owners)} only{default}).",
        )(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {}
        for key, how in params.items():
            value = kwargs.pop(key)
            if value is not None:
                given[how["field"]] = how["choices"][value] if how["choices"] else value
        return fn(*args, format_options=given, **kwargs)

    return wrapper  # type: ignore[return-value]


def output_format_option(help: str) -> Callable[[F], F]:
    """``--output-format text|json`` and its older spelling ``--json`` (kept so that existing scripts work)."""

    def decorate(fn: F) -> F:
        fn = click.option(
            "--json", "as_json", is_flag=True, hidden=True, help="Same as --output-format json."
        )(fn)
        fn = click.option(
            "--output-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help=help,
        )(fn)
        return fn

    return decorate


# --------------------------------------------------------------------------------------------- the process

#: BLAS thread pools this process does not want: actfmt runs layers on threads of its own, so a pool per BLAS
#: call would only oversubscribe the cores (and OpenBLAS's start-up costs ~50 ms of every command).
SINGLE_THREADED_BLAS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


#: The process :func:`install_signal_handlers` ran in (the command's; its forked dask workers inherit the handlers).
_COMMAND_PID: int | None = None


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM to :func:`on_signal`, for this process."""
    global _COMMAND_PID
    _COMMAND_PID = os.getpid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def on_signal(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM: stop the command cleanly (locks released, partial stores kept); a second one quits at
    once.  In a process forked from the command (a dask worker of ``--executor dask``, which Ctrl-C reaches too)
    SIGINT is the command's to handle, and SIGTERM ends the process as it would have without a handler."""
    if _COMMAND_PID is not None and os.getpid() != _COMMAND_PID:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        _quit_now(signum, frame)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _quit_now)
    raise Interrupted(signum)


def _quit_now(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def escape_library_messages() -> None:
    """Python warnings and log records of the libraries actfmt uses (zarr, h5py, fsspec...) may quote a tree's
    names: printed escaped like every other output (actfmt._escape), in their usual form."""
    plain = warnings.formatwarning

    def formatwarning(*args: Any, **kwargs: Any) -> str:
        return escape_lines(plain(*args, **kwargs).rstrip("\n")) + "\n"

    class EscapedStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                click.echo(escape_lines(self.format(record)), err=True)
            except Exception:  # pragma: no cover - logging's own policy
                self.handleError(record)

    warnings.formatwarning = formatwarning
    logging.lastResort = EscapedStderr(logging.WARNING)


# --------------------------------------------------------------------------------------------- formats

#: What ``actfmt convert --to`` takes (aliases aside).
TARGETS = tuple(FORMATS)


class FormatChoice(click.Choice):
    """A format name, or one of its aliases (``h5``, ``st``, ``torch``); a near miss gets a did-you-mean."""

    def __init__(self) -> None:
        super().__init__(TARGETS, case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        key = str(value).lower()
        if key in ALIASES:
            return ALIASES[key]
        if key in TARGETS:
            return key
        close = difflib.get_close_matches(key, [*TARGETS, *ALIASES], n=1, cutoff=0.5)
        hint = f" Did you mean {ALIASES.get(close[0], close[0])!r}?" if close else ""
        aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items())
        self.fail(
            f"{value!r} is not a format; choose one of: {', '.join(TARGETS)} (aliases: {aliases}).{hint}",
            param,
            ctx,
        )


def compression_help() -> str:
    """The help of ``--compression``: every format's codecs, its default first."""
    parts = [
        f"{name}: {' '.join(get_format(name).compressions)}"
        for name in FORMATS
        if get_format(name).compressions != ("none",)
    ]
    return f"Codec ({'; '.join(parts)}). Default: each format's first, its measured default."


def parse_layers(text: str) -> int | list[int]:
    """``--layers`` of ``actfmt stream``: ``3`` -> 3 (``x`` is ``[batch, d]``), ``0,6,12`` or ``3,`` -> a list."""
    try:
        parts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give layer indices, e.g. 3 or 0,6,12", param_hint="--layers"
        ) from None
    if not parts:
        raise click.BadParameter("give at least one layer index", param_hint="--layers")
    return parts[0] if len(parts) == 1 and "," not in text else parts


def check_selection(resolve: Callable[..., Any], select: Sequence[str], ignore: Sequence[str]) -> None:
    """``--select`` / ``--ignore`` resolved (by ``resolve``, the rule table's) before anything is read: an unknown
    code or name is a usage error naming the options."""
    try:
        resolve(select or None, ignore or None)
    except (ActfmtError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise click.BadParameter(str(message), param_hint="'--select' / '--ignore'") from None
