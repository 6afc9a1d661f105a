"""``actfmt stream``: the throughput and mixing figures of a measured stream, one line each."""

from __future__ import annotations

from typing import IO, Any

import click

from actfmt.reporters.common import json_document, plural

__all__ = ["stream_lines", "write_stream"]


def stream_lines(rep: Any) -> list[str]:
    """What ``actfmt stream`` prints for a :class:`~actfmt.streaming.StreamReport`."""
    mix = rep.mixing
    batches = f"{rep.batches:,} batch" if rep.batches == 1 else f"{rep.batches:,} batches"
    return [
        f"{rep.rows:,} rows in {batches} over {plural(rep.epochs, 'epoch')}: {rep.seconds:.2f} s, "
        f"{rep.gb_per_s:.2f} GB/s of x, {rep.rows_per_s:,.0f} rows/s (first batch after "
        f"{rep.first_batch_seconds:.2f} s)",
        f"buffer {rep.buffer_rows:,} rows, blocks of {rep.block_rows:,} rows; mixing: |corr(position, row)| "
        f"{mix['corr']:.3f} (0 = no trace of storage order), same-block pairs per batch "
        f"{mix['same_block']:.2f}x a full shuffle's",
    ]


def write_stream(rep: Any, out: IO[str], *, as_json: bool = False) -> None:
    """``actfmt stream``'s output: :func:`stream_lines`, or the report's ``to_dict()`` as JSON."""
    if as_json:
        out.write(json_document(rep.to_dict()) + "\n")
        return
    for line in stream_lines(rep):
        click.echo(line, file=out)
