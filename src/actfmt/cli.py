"""The ``actfmt`` command line: Click commands only.

Each command parses options, calls one API function, renders the result, and turns an ActfmtError into a
clean message (exit 2 for usage / tool failures, never a traceback).  Heavy imports happen inside commands so
that ``actfmt --help`` stays fast.

Exit codes: 0 no errors; 1 errors (or warnings with ``--strict``); 2 usage error, missing PATH, no split
found, the tool's own failure.  An unexpected exception prints ``actfmt: internal error: ...`` and exits 2;
``ACTFMT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import click

from actfmt._version import __version__
from actfmt.errors import ActfmtError, Interrupted, os_error_from_text, os_error_message
from actfmt.formats import FORMATS, all_compressions, get_format
from actfmt.layout import SUPPORTED_DTYPES

OUTPUT_FORMATS = ("text", "json", "github", "junit", "sarif")
F = TypeVar("F", bound=Callable[..., Any])
#: Without ``--deep``, a progress bar appears only once a run has lasted this long (seconds).
PROGRESS_DELAY = 1.0


# --------------------------------------------------------------------------------------------- shared helpers


class CliError(click.ClickException):
    """A clean one-line failure: ``actfmt: error: ...`` on stderr, exit 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"actfmt: error: {self.format_message()}", err=True)


class InternalError(click.ClickException):
    """An unexpected exception: a bug in actfmt.  Exit 2, no traceback unless ``ACTFMT_DEBUG=1``."""

    exit_code = 2

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"actfmt: internal error: {self.format_message()}", err=True)
        click.echo(
            f"This is a bug in actfmt {__version__}. Please report it with the command you ran "
            "(set ACTFMT_DEBUG=1 to print the traceback).",
            err=True,
        )


def _debug() -> bool:
    return os.environ.get("ACTFMT_DEBUG", "") not in ("", "0")


class ActfmtGroup(click.Group):
    """Translates errors raised by any command: ActfmtError / OSError -> CliError; the rest -> InternalError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ActfmtError as exc:
            raise CliError(str(exc)) from None
        except BrokenPipeError:  # `actfmt info ... | head`: click leaves quietly
            raise
        except OSError as exc:  # the environment's fault (full disk, permissions...): one line, exit 2
            raise CliError(os_error_message(exc)) from None
        except Interrupted as exc:
            name = signal.Signals(exc.signum).name
            kept = (
                f"; partial kept at {', '.join(exc.partials)}; rerun with --resume to continue"
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
                import traceback

                traceback.print_exc()
            raise InternalError(exc) from None


def split_csv(ctx: click.Context, param: click.Parameter, value: Sequence[str] | None) -> list[str]:
    """Click callback: repeated and comma-separated values -> one flat list (``--select A,B --select C``)."""
    items: list[str] = []
    for chunk in value or ():
        items.extend(part.strip() for part in chunk.split(",") if part.strip())
    return items


def progress_renderer(*, quiet: bool = False, no_progress: bool = False, immediate: bool = False) -> Any:
    """A :class:`~actfmt._console.ProgressRenderer` on stderr (a no-op when quiet or not a terminal).

    ``immediate`` draws at once (long jobs such as ``--deep``); otherwise the bar waits ``PROGRESS_DELAY``.
    """
    from actfmt._console import ProgressRenderer

    return ProgressRenderer(enabled=not (quiet or no_progress), delay=0.0 if immediate else PROGRESS_DELAY)


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


class PathOrURL(click.ParamType):
    """A local path (checked like ``click.Path``) or an fsspec URL (``s3://bucket/key``, ``memory://...``)."""

    name = "path"

    def __init__(self, exists: bool = False) -> None:
        self._path = click.Path(exists=exists)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from actfmt.storage import is_url

        if isinstance(value, str) and is_url(value):
            return value
        return self._path.convert(value, param, ctx)


def _storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    from actfmt.storage import parse_storage_options

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


# --------------------------------------------------------------------------------------------- the group


@click.group(
    cls=ActfmtGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, "-V", "--version", prog_name="actfmt")
def cli() -> None:
    """Validate, convert and read sharded model-activation trees.

    A tree is Activations/{model}/{dataset}/{EM|Neutral}/ with metadata.json and layer_XX/shard_XXX.pt.
    """


# --------------------------------------------------------------------------------------------- validate


@cli.command("validate")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=PathOrURL(exists=True))
@click.option("--deep", is_flag=True, help="Also read the values: NaN/Inf, all-zero rows, duplicate layers.")
@jobs_option(1, "Check N files in parallel (0: one per CPU).")
@click.option(
    "--output-format",
    type=click.Choice(OUTPUT_FORMATS),
    default="text",
    show_default=True,
    help="text for people; json (the API's report); github annotations; junit for GitLab/Jenkins; sarif.",
)
@click.option(
    "-o", "--output-file", type=click.Path(dir_okay=False), help="Write the report to this file, not stdout."
)
@click.option(
    "--select",
    multiple=True,
    callback=split_csv,
    metavar="RULES",
    help="Run only these rules: codes (ACT302), prefixes (ACT3) or names (missing-shard); comma-separated "
    "or repeated.",
)
@click.option(
    "--ignore",
    multiple=True,
    callback=split_csv,
    metavar="RULES",
    help="Do not report these rules (same syntax as --select); counted as ignored in the summary.",
)
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option(
    "--exit-zero", is_flag=True, help="Exit 0 even when there are errors (the report is unchanged)."
)
@progress_options("the findings")
@storage_options_option
def validate_command(
    paths: tuple[str, ...],
    deep: bool,
    jobs: int,
    output_format: str,
    output_file: str | None,
    select: list[str],
    ignore: list[str],
    strict: bool,
    exit_zero: bool,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Check split trees against the seed layout; report every problem with a rule code.

    PATH may be an Activations root, a model directory, a dataset directory or one split; every directory
    with a metadata.json or layer_XX subdirectories below it is a split.  Locations are relative to PATH.
    With several PATHs each is validated on its own (json: a list of reports, one per PATH).

    \b
    Examples:
      actfmt validate Activations/
      actfmt validate Activations/model/ds --deep --jobs 4
      actfmt validate data/ --select ACT3,ACT4 --ignore stray-file
      actfmt validate data/ --output-format github
      actfmt validate data/ --output-format junit -o actfmt-junit.xml
      actfmt validate s3://bucket/Activations     # headers read with ranged GETs

    Exit status: 0 no errors, 1 errors (or warnings with --strict), 2 usage error or no split found.
    """
    from actfmt.checks import resolve_selection, validate

    try:
        resolve_selection(select or None, ignore or None)
    except (ActfmtError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise click.BadParameter(str(message), param_hint="'--select' / '--ignore'") from None

    workers = jobs or (os.cpu_count() or 1)
    reports = []
    with progress_renderer(quiet=quiet, no_progress=no_progress, immediate=deep) as progress:
        for path in paths:
            started = time.perf_counter()
            report = validate(
                path,
                deep=deep,
                select=select or None,
                ignore=ignore or None,
                jobs=workers,
                progress=progress,
                storage_options=storage_options,
            )
            if not report.elapsed:
                report.elapsed = time.perf_counter() - started
            reports.append(report)

    from actfmt.reporters import render

    with output_stream(output_file) as out:
        render(output_format, reports, out, strict=strict, quiet=quiet)

    failed = any(r.exit_code(strict=strict) for r in reports)
    click.get_current_context().exit(0 if exit_zero or not failed else 1)


# --------------------------------------------------------------------------------------------- rules / rule


def _rule_dict(rule: Any) -> dict[str, Any]:
    return {
        "code": rule.code,
        "name": rule.name,
        "severity": rule.severity,
        "deep": bool(rule.deep),
        "title": rule.title(),
        "documentation": rule.documentation(),
    }


@cli.command("rules")
@click.option(
    "--output-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one rule a line; json: a list of {code, name, severity, deep, title, documentation}.",
)
def rules_command(output_format: str) -> None:
    """List every validation rule: code, name, default severity, title.

    Rules marked --deep read the values and run only with `actfmt validate --deep`.
    `actfmt rule CODE` prints one rule's documentation.
    """
    from actfmt.checks import RULES

    rules = [RULES[code] for code in sorted(RULES)]
    if output_format == "json":
        click.echo(json.dumps([_rule_dict(r) for r in rules], indent=2))
        return
    name_width = max((len(r.name) for r in rules), default=0)
    for r in rules:
        deep = "--deep" if r.deep else ""
        click.echo(f"{r.code}  {r.name:<{name_width}}  {r.severity:<7}  {deep:<6}  {r.title()}")


@cli.command("rule")
@click.argument("rule_id", metavar="CODE|NAME")
@click.option(
    "--output-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: the documentation; json: {code, name, severity, deep, title, documentation}.",
)
def rule_command(rule_id: str, output_format: str) -> None:
    """Explain one rule: `actfmt rule ACT302` or `actfmt rule missing-shard`."""
    from actfmt.checks import get_rule

    try:
        rule = get_rule(rule_id)
    except (KeyError, ActfmtError):
        raise CliError(f"unknown rule {rule_id!r}; `actfmt rules` lists every code and name") from None
    if output_format == "json":
        click.echo(json.dumps(_rule_dict(rule), indent=2))
        return
    deep = "yes (runs with --deep)" if rule.deep else "no"
    click.echo(f"{rule.code} {rule.name}")
    click.echo(f"default severity: {rule.severity}; reads the values: {deep}")
    click.echo()
    click.echo(rule.documentation())


# --------------------------------------------------------------------------------------------- convert

TARGETS = tuple(FORMATS)


def _compression_help() -> str:
    parts = [
        f"{name}: {' '.join(get_format(name).compressions)}"
        for name in FORMATS
        if get_format(name).compressions != ("none",)
    ]
    return f"Codec ({'; '.join(parts)}). Default: each format's first, its measured default."


@cli.command("convert")
@click.argument("src", type=PathOrURL(exists=True))
@click.argument("dst", type=PathOrURL())
@storage_options_option
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="The destination format.")
@click.option("--chunk-rows", type=click.IntRange(min=1), metavar="N", help="Rows per chunk (zarr, hdf5).")
@click.option("--compression", type=click.Choice(all_compressions()), help=_compression_help())
@click.option("--level", type=int, metavar="N", help="Compression level (the codec's own scale).")
@jobs_option(
    0,
    "Layers converted in parallel (0: one per CPU); with --executor dask and no --scheduler, the number of "
    "local worker processes.",
)
@executor_options("written")
@click.option("--overwrite", is_flag=True, help="Replace a destination that exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion (complete splits are kept).")
@click.option("--no-verify", is_flag=True, help="Skip re-reading the destination to check its checksums.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), help="Zarr version (default 3).")
@click.option(
    "--dtype",
    type=click.Choice(SUPPORTED_DTYPES),
    help="Cast the values (explicit and warned: the result is no longer bit-exact).",
)
@click.option("--force", is_flag=True, help="Convert a source that fails validation.")
@click.option(
    "--stats/--no-stats",
    default=True,
    show_default=True,
    help="Compute each layer's statistics while converting and keep them with the store "
    "(`actfmt stats` then reads them instantly); --no-stats skips that work.",
)
@click.option(
    "--output-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one summary line; json: the result (splits, layers, bytes, checksums, where the time went).",
)
@progress_options("warnings and errors")
def convert_command(
    src: str,
    dst: str,
    to: str,
    chunk_rows: int | None,
    compression: str | None,
    level: int | None,
    jobs: int,
    executor: str,
    scheduler: str | None,
    overwrite: bool,
    resume: bool,
    no_verify: bool,
    zarr_format: str | None,
    dtype: str | None,
    force: bool,
    stats: bool,
    output_format: str,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Convert SRC (any level of a tree, any format) to DST in another format, bit-exact.

    DST mirrors SRC: the split SRC/a/b/EM becomes DST/a/b/EM.zarr (zarr), EM.h5 (hdf5) or the directory EM/
    (safetensors, pt).  Each split is written into a hidden temporary sibling, verified against the source's
    checksums and renamed into place when complete.

    \b
    Examples:
      actfmt convert Activations/ out/ --to zarr
      actfmt convert Activations/model/ds/EM out/ --to hdf5 --compression gzip --level 1
      actfmt convert out/ back/ --to pt
      actfmt convert Activations/ out/ --to zarr --resume      # after an interruption
      actfmt convert Activations/ out/ --to zarr --executor dask --scheduler tcp://10.0.0.5:8786
      actfmt convert s3://bucket/Activations s3://bucket/zarr --to zarr

    Into object storage (s3://, gs://, ...) there is no rename: each store is written in place (HDF5: written
    locally, then uploaded) and its completeness mark is written last, so an interrupted store never validates
    as complete (ACT603).
    """
    from actfmt.convert import convert

    with progress_renderer(quiet=quiet, no_progress=no_progress) as progress:
        result = convert(
            src,
            dst,
            to=to,
            chunk_rows=chunk_rows,
            compression=compression,
            level=level,
            jobs=jobs or None,
            overwrite=overwrite,
            resume=resume,
            verify=not no_verify,
            zarr_format=int(zarr_format) if zarr_format else None,
            dtype=dtype,
            force=force,
            stats=stats,
            progress=progress,
            executor=executor,
            scheduler=scheduler,
            storage_options=storage_options,
        )
    for w in result.warnings:
        click.echo(f"actfmt: warning: {w}", err=True)
    if output_format == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        from actfmt._console import format_rate, format_size

        skipped = f", {len(result.skipped)} already complete" if result.skipped else ""
        n = len(result.splits)
        # a rate over less than a second is mostly start-up: say the size and the time only
        rate = f" ({format_rate(result.bytes, result.seconds)})" if result.seconds >= 1 else ""
        click.echo(
            f"Converted {n} split{'' if n == 1 else 's'}{skipped} · {result.layers} layers · "
            f"{format_size(result.bytes)} in {result.seconds:.1f} s{rate} -> {dst}"
        )


# --------------------------------------------------------------------------------------------- verify / info


def output_format_option(help: str) -> Callable[[F], F]:
    """``--output-format text|json`` and its older spelling ``--json`` (kept so that existing scripts work)."""

    def decorate(fn: F) -> F:
        fn = click.option("--json", "as_json", is_flag=True, help="Same as --output-format json.")(fn)
        fn = click.option(
            "--output-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help=help,
        )(fn)
        return fn

    return decorate


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pair_lines(a: str, b: str, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The pairs of splits ``verify`` compared: ``A: PATH`` and ``B: PATH``, then under ``compared in model/ds/:``
    one line per pair (``EM  with EM.zarr``), grouped by the directory both splits lie in."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for x, y in pairs:
        dx, _, nx = x.rpartition("/")
        dy, _, ny = y.rpartition("/")
        if dx and dx == dy:
            groups.setdefault(dx, []).append((nx, ny))
        else:
            groups.setdefault("", []).append(("A" if x == "." else f"A/{x}", "B" if y == "." else f"B/{y}"))
    lines = [f"A: {a}", f"B: {b}"]
    for where, named in groups.items():
        lines.append(f"compared in {where}/:" if where else "compared:")
        width = max(len(x) for x, _ in named)
        lines += [f"  {x:<{width}}  with {y}" for x, y in named]
    return lines


@cli.command("verify")
@click.argument("a", type=PathOrURL(exists=True))
@click.argument("b", type=PathOrURL(exists=True))
@storage_options_option
@output_format_option(
    "text: the pairs of splits compared, the differences, a verdict; json: the API's VerifyResult.to_dict() "
    "(a, b, equal, pairs, splits, layers, bytes, differences, first)."
)
@progress_options("the differences")
def verify_command(
    a: str,
    b: str,
    output_format: str,
    as_json: bool,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Do A and B (two splits or two trees, any two formats) hold the same activations, bit for bit?

    Splits are paired by location, a store's suffix aside (EM with EM.zarr).  When a side holds one split in
    several formats (EM.zarr and EM.h5), each of them is compared; every pair compared is listed.

    Exit 0 when they do, 1 when they differ (the first differing layer and row are shown).
    """
    from actfmt.convert import verify
    from actfmt.reporters import display_path

    with progress_renderer(quiet=quiet, no_progress=no_progress) as progress:
        res = verify(a, b, progress=progress, storage_options=storage_options)
    if as_json or output_format == "json":
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        if not quiet:
            for line in _pair_lines(display_path(a), display_path(b), res.pairs):
                click.echo(line)
        for d in res.differences:
            click.echo(d)
        if not quiet:
            from actfmt._console import format_size

            click.echo(
                f"✓ Same activations: {_plural(res.splits, 'pair')} of splits, "
                f"{_plural(res.layers, 'layer')}, {format_size(res.bytes)}."
                if res.equal
                else f"✗ Different: {_plural(len(res.differences), 'difference')}."
            )
    click.get_current_context().exit(0 if res.equal else 1)


@cli.command("stats")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=PathOrURL(exists=True))
@click.option(
    "--layers",
    metavar="LIST",
    help="Only these layers: indices and ranges, e.g. 0,5,10-12 (default: every layer).",
)
@click.option(
    "--output-format",
    type=click.Choice(["text", "json", "csv"]),
    default="text",
    show_default=True,
    help="text: tables with per-layer curves; json: the versioned document (see the README); csv: one row "
    "per split or pair and layer.",
)
@click.option(
    "-o", "--output-file", type=click.Path(dir_okay=False), help="Write the output to this file, not stdout."
)
@click.option(
    "--plot",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also draw the figures across layers to FILE.png or FILE.svg (needs actfmt[plot]).",
)
@click.option(
    "--no-pairs", is_flag=True, help="Skip the pair figures of sibling splits (and their second pass)."
)
@click.option(
    "--recompute", is_flag=True, help="Read the values even where `actfmt convert` kept the figures."
)
@jobs_option(
    0,
    "Layers read in parallel (0: one per CPU); with --executor dask and no --scheduler, the number of local "
    "worker processes.",
)
@executor_options("read")
@progress_options("the output")
@storage_options_option
def stats_command(
    paths: tuple[str, ...],
    layers: str | None,
    output_format: str,
    output_file: str | None,
    plot: str | None,
    no_pairs: bool,
    recompute: bool,
    jobs: int,
    executor: str,
    scheduler: str | None,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Per-layer statistics of every split, and where sibling splits (EM / Neutral) separate.

    Per split and layer: rows, mean_norm, rms, std, row_norm_mean, row_norm_max, abs_max, nonfinite, zero_rows
    and scale_factor (sqrt(hidden_dim) / row_norm_mean, SAELens' normalisation constant).  Per pair of sibling
    splits and layer, along the difference of their means: diff_of_means_norm, cosine_of_means, cohens_d and
    midpoint_accuracy (the diff-in-means probe); the text output names the best layer.  Stores written by
    `actfmt convert` keep the per-split figures: they are read at once (--recompute reads the values).

    \b
    Examples:
      actfmt stats Activations/model/ds
      actfmt stats Activations/ --layers 10-20 --no-pairs
      actfmt stats out.zarr/ --output-format json -o stats.json --plot stats.png
      actfmt stats s3://bucket/Activations --executor dask --scheduler tcp://10.0.0.5:8786

    Exit status: 0 done, 2 usage error, no split found or input that cannot be read.
    """
    from actfmt.reporters import check_plot, plot_stats, render_stats
    from actfmt.statistics import stats

    if plot:
        check_plot(plot)
    with progress_renderer(quiet=quiet, no_progress=no_progress) as progress:
        result = stats(
            list(paths),
            layers=layers,
            pairs=not no_pairs,
            recompute=recompute,
            jobs=jobs or None,
            executor=executor,
            scheduler=scheduler,
            progress=progress,
            storage_options=storage_options,
        )

    if plot:
        plot_stats(result, plot)
    with output_stream(output_file) as out:
        render_stats(output_format, result, out)
    if plot and not quiet:
        click.echo(f"actfmt: plot written to {plot}", err=True)


@cli.command("info")
@click.argument("path", type=PathOrURL(exists=True))
@storage_options_option
@output_format_option(
    "text: fits the terminal (a table, or one block per split when it is narrow; what every split shares is "
    "said once); json: a list with every field of every split (the API's SplitInfo.to_dict())."
)
def info_command(
    path: str, output_format: str, as_json: bool, storage_options: dict[str, Any] | None
) -> None:
    """Describe every split under PATH: format, layers, examples, hidden_dim, dtype, size, compression.

    Exit 2 when PATH holds no split.
    """
    import shutil

    from actfmt._console import render_info
    from actfmt.convert import info

    rows = info(path, storage_options=storage_options)
    if as_json or output_format == "json":
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    # The terminal's width (COLUMNS first); 80 when stdout is a pipe or a file.
    width = shutil.get_terminal_size((80, 24)).columns
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "")
    styled = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for line, bold in render_info(rows, path, width, fancy=encoding.startswith("utf")):
        click.echo(click.style(line, bold=True) if bold and styled else line)


# --------------------------------------------------------------------------------------------- stream


@cli.command("stream")
@click.argument("paths", nargs=-1, required=True, type=PathOrURL(exists=True))
@click.option(
    "--layers", required=True, help="A layer index (x is [batch, d]) or a comma list (x is [batch, n, d])."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Rows per batch."
)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Epochs to stream.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the order (epoch e: seed + e).")
@click.option(
    "--buffer-rows", type=click.IntRange(min=1), help="Rows in the shuffle buffer [default: 256 MiB]."
)
@click.option(
    "--block-rows", type=click.IntRange(min=1), help="Rows per read [default: 8 MiB, whole chunks]."
)
@click.option("--no-shuffle", is_flag=True, help="Storage order.")
@click.option("--paired", is_flag=True, help="Row i of every split together.")
@output_format_option("text: one line per figure; json: the API's StreamReport.to_dict().")
def stream_command(
    paths: tuple[str, ...],
    layers: str,
    batch_size: int,
    epochs: int,
    seed: int,
    buffer_rows: int | None,
    block_rows: int | None,
    no_shuffle: bool,
    paired: bool,
    output_format: str,
    as_json: bool,
) -> None:
    """Stream PATH... (splits in any format) as actfmt.stream does for training, and print the throughput (GB/s
    of x delivered, rows/s) and how well the order is mixed, to measure a disk or choose a buffer size."""
    from actfmt.stream import measure

    try:
        parts = [int(v) for v in layers.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{layers!r}: give layer indices, e.g. 3 or 0,6,12", param_hint="--layers"
        ) from None
    if not parts:
        raise click.BadParameter("give at least one layer index", param_hint="--layers")
    rep = measure(
        list(paths),
        parts[0] if len(parts) == 1 and "," not in layers else parts,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=not no_shuffle,
        seed=seed,
        buffer_rows=buffer_rows,
        block_rows=block_rows,
        paired=paired,
    )
    if as_json or output_format == "json":
        click.echo(json.dumps(rep.to_dict(), indent=2))
        return
    mix = rep.mixing
    click.echo(
        f"{rep.rows:,} rows in {_plural(rep.batches, 'batch').replace('batchs', 'batches')} over "
        f"{_plural(rep.epochs, 'epoch')}: {rep.seconds:.2f} s, {rep.gb_per_s:.2f} GB/s of x, "
        f"{rep.rows_per_s:,.0f} rows/s (first batch after {rep.first_batch_seconds:.2f} s)"
    )
    click.echo(
        f"buffer {rep.buffer_rows:,} rows, blocks of {rep.block_rows:,} rows; mixing: |corr(position, row)| "
        f"{mix['corr']:.3f} (0 = no trace of storage order), same-block pairs per batch "
        f"{mix['same_block']:.2f}x a full shuffle's"
    )


#: BLAS thread pools this process does not want: actfmt runs layers on threads of its own, so a pool per BLAS
#: call would only oversubscribe the cores (and OpenBLAS's start-up costs ~50 ms of every command).
_SINGLE_THREADED_BLAS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM: stop the command cleanly (locks released, partial stores kept); a second one quits at
    once."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _quit_now)
    raise Interrupted(signum)


def _quit_now(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def main() -> None:
    for var in _SINGLE_THREADED_BLAS:
        os.environ.setdefault(var, "1")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    cli(prog_name="actfmt")
