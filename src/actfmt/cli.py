"""The ``actfmt`` command line: Click commands only.

Each command parses options, calls one API function, renders the result, and turns an ActfmtError into a
clean message (exit 2 for usage / tool failures, never a traceback).  Heavy imports happen inside commands so
that ``actfmt --help`` stays fast.
"""

from __future__ import annotations

import click

from actfmt import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="actfmt")
def cli() -> None:
    """Validate, convert and read sharded model-activation trees.

    A tree is Activations/{model}/{dataset}/{EM|Neutral}/ with metadata.json and layer_XX/shard_XXX.pt.
    """


def main() -> None:
    cli(prog_name="actfmt")
