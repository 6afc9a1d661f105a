"""The ``actfmt`` command line: Click commands only.

Each command parses options, calls one API function, renders the result through :mod:`actfmt.reporters`, and
turns an ActfmtError into a clean message (exit 2 for usage / tool failures, never a traceback).  The API
modules (:mod:`actfmt.checks`, :mod:`actfmt.conversion`, :mod:`actfmt.statistics`, which import every format) are
imported inside the command that calls them, so that ``actfmt --help`` stays fast.

Exit codes: 0 no errors; 1 errors (or warnings with ``--strict``); 2 usage error, missing PATH, no split
found, the tool's own failure.  An unexpected exception prints ``actfmt: internal error: ...`` and exits 2;
``ACTFMT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

from actfmt._escape import escape, escape_lines
from actfmt._version import __version__
from actfmt.cli_base import (
    SINGLE_THREADED_BLAS,
    TARGETS,
    ActfmtGroup,
    CliError,
    FormatChoice,
    PathOrURL,
    check_selection,
    compression_help,
    escape_library_messages,
    executor_options,
    format_options_option,
    install_signal_handlers,
    jobs_option,
    output_file_option,
    output_format_option,
    output_stream,
    parse_layers,
    progress_options,
    split_csv,
    storage_options_option,
)
from actfmt.errors import ActfmtError
from actfmt.formats import all_compressions
from actfmt.layout import SUPPORTED_DTYPES
from actfmt.reporters import FORMATS as OUTPUT_FORMATS
from actfmt.reporters import (
    STATS_FORMATS,
    check_plot,
    convert_summary,
    plot_stats,
    progress_renderer,
    render,
    render_stats,
    write_convert,
    write_info,
    write_rule,
    write_rules,
    write_stream,
    write_verify,
)

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
@jobs_option(0, "Check N files in parallel (0: one per CPU).")
@click.option(
    "--output-format",
    type=click.Choice(OUTPUT_FORMATS),
    default="text",
    show_default=True,
    help="text for people; json (the API's report); github annotations; junit for GitLab/Jenkins; sarif.",
)
@output_file_option
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
    from actfmt.checks import RULES, resolve_selection, validate

    check_selection(resolve_selection, select, ignore)

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

    with output_stream(output_file) as out:
        render(output_format, reports, out, strict=strict, quiet=quiet, rules=RULES.values())

    failed = any(r.exit_code(strict=strict) for r in reports)
    click.get_current_context().exit(0 if exit_zero or not failed else 1)


# --------------------------------------------------------------------------------------------- rules / rule


@cli.command("rules")
@click.option(
    "--output-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one rule a line; json: {schema_version, tool, rules: [{code, name, severity, deep, title, "
    "documentation}]}.",
)
@output_file_option
def rules_command(output_format: str, output_file: str | None) -> None:
    """List every validation rule: code, name, default severity, title.

    Rules marked --deep read the values and run only with `actfmt validate --deep`.
    `actfmt rule CODE` prints one rule's documentation.
    """
    from actfmt.checks import RULES

    with output_stream(output_file) as out:
        write_rules([RULES[code] for code in sorted(RULES)], out, as_json=output_format == "json")


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
    write_rule(rule, as_json=output_format == "json")


# --------------------------------------------------------------------------------------------- convert


@cli.command("convert")
@click.argument("src", type=PathOrURL(exists=True))
@click.argument("dst", type=PathOrURL())
@storage_options_option
@click.option(
    "--to",
    "to",
    type=FormatChoice(),
    required=True,
    metavar="FORMAT",
    help=f"The destination format: {', '.join(TARGETS)} (or h5, st, torch).",
)
@click.option("--chunk-rows", type=click.IntRange(min=1), metavar="N", help="Rows per chunk (zarr, hdf5).")
@click.option("--compression", type=click.Choice(all_compressions()), help=compression_help())
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
@format_options_option
@click.option(
    "--dtype",
    type=click.Choice(SUPPORTED_DTYPES),
    help="Cast the values (explicit and warned: the result is no longer bit-exact).",
)
@click.option("--force", is_flag=True, help="Convert a source that fails validation.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (splits, destinations, layers, bytes, what happens at each destination) and write "
    "nothing.",
)
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
@output_file_option
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
    format_options: dict[str, Any],
    dtype: str | None,
    force: bool,
    dry_run: bool,
    stats: bool,
    output_format: str,
    output_file: str | None,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Convert SRC (any level of a tree, any format) to DST in another format, bit-exact.

    DST mirrors SRC: the split SRC/a/b/EM becomes DST/a/b/EM.zarr (zarr), EM.h5 (hdf5) or the directory EM/
    (safetensors, npy, pt).  Each split is written into a hidden temporary sibling, verified against the source's
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
    from actfmt.conversion import convert

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
            format_options=format_options,
            dtype=dtype,
            force=force,
            stats=stats,
            progress=progress,
            executor=executor,
            scheduler=scheduler,
            storage_options=storage_options,
            dry_run=dry_run,
        )
    for w in result.warnings:
        click.echo(f"actfmt: warning: {escape_lines(w)}", err=True)
    if output_format == "json" or dry_run:
        with output_stream(output_file) as out:
            write_convert(result, dst, out, as_json=output_format == "json")
    elif not quiet:
        click.echo(convert_summary(result, dst))


# --------------------------------------------------------------------------------------------- verify / info


@cli.command("verify")
@click.argument("a", type=PathOrURL(exists=True))
@click.argument("b", type=PathOrURL(exists=True))
@storage_options_option
@output_format_option(
    "text: the pairs of splits compared, the differences, a verdict; json: the API's VerifyResult.to_dict() "
    "(a, b, equal, pairs, splits, layers, bytes, differences, first)."
)
@output_file_option
@progress_options("the differences")
def verify_command(
    a: str,
    b: str,
    output_format: str,
    as_json: bool,
    output_file: str | None,
    quiet: bool,
    no_progress: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Do A and B (two splits or two trees, any two formats) hold the same activations, bit for bit?

    Splits are paired by location, a store's suffix aside (EM with EM.zarr).  When a side holds one split in
    several formats (EM.zarr and EM.h5), each of them is compared; every pair compared is listed.

    Exit 0 when they do, 1 when they differ (the first differing layer and row are shown).
    """
    from actfmt.conversion import verify

    with progress_renderer(quiet=quiet, no_progress=no_progress) as progress:
        res = verify(a, b, progress=progress, storage_options=storage_options)
    with output_stream(output_file) as out:
        write_verify(res, a, b, out, as_json=as_json or output_format == "json", quiet=quiet)
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
    type=click.Choice(STATS_FORMATS),
    default="text",
    show_default=True,
    help="text: tables with per-layer curves; json: the versioned document (see the README); csv: one row "
    "per split or pair and layer.",
)
@output_file_option
@click.option(
    "--plot",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also draw the figures across layers to FILE.png or FILE.svg (needs actfmt[plot]): one panel per "
    "quantity, datasets named, chance level and best layer marked.",
)
@click.option(
    "--plot-dpi",
    type=click.IntRange(min=20, max=1200),
    default=150,
    show_default=True,
    metavar="N",
    help="The PNG's resolution.",
)
@click.option(
    "--plot-size",
    type=(click.FloatRange(min=1, max=40), click.FloatRange(min=1, max=40)),
    metavar="W H",
    help="The figure's size in inches (default: 7 wide, 2.6 per panel).",
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
    plot_dpi: int,
    plot_size: tuple[float, float] | None,
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
        plot_stats(result, plot, dpi=plot_dpi, size=plot_size)
    with output_stream(output_file) as out:
        render_stats(output_format, result, out)
    if plot and not quiet:
        click.echo(f"actfmt: plot written to {escape(plot)}", err=True)


@cli.command("info")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=PathOrURL(exists=True))
@storage_options_option
@output_format_option(
    "text: fits the terminal (a table, or one block per split when it is narrow; what every split shares is "
    "said once); json: {schema_version, tool, splits: [...]} with every field of every split (the API's "
    "SplitInfo.to_dict())."
)
@output_file_option
def info_command(
    paths: tuple[str, ...],
    output_format: str,
    as_json: bool,
    output_file: str | None,
    storage_options: dict[str, Any] | None,
) -> None:
    """Describe every split under each PATH: format, layers, examples, hidden_dim, dtype, size, compression.

    Exit 2 when a PATH holds no split.
    """
    from actfmt.conversion import info

    found = [(path, info(path, storage_options=storage_options)) for path in paths]
    with output_stream(output_file) as out:
        write_info(found, out, as_json=as_json or output_format == "json")


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
@output_file_option
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
    output_file: str | None,
) -> None:
    """Stream PATH... (splits in any format) as actfmt.stream does for training, and print the throughput (GB/s
    of x delivered, rows/s) and how well the order is mixed, to measure a disk or choose a buffer size."""
    from actfmt.streaming import measure

    rep = measure(
        list(paths),
        parse_layers(layers),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=not no_shuffle,
        seed=seed,
        buffer_rows=buffer_rows,
        block_rows=block_rows,
        paired=paired,
    )
    with output_stream(output_file) as out:
        write_stream(rep, out, as_json=as_json or output_format == "json")


def main() -> None:
    for var in SINGLE_THREADED_BLAS:
        os.environ.setdefault(var, "1")
    install_signal_handlers()
    escape_library_messages()
    cli(prog_name="actfmt")
