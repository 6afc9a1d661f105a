"""Issue 18, the terminal: in a pseudo-terminal of 80 and 120 columns, with and without colour, validate's split
headers and messages break between path components and words (never mid-path, never past the width), and
convert's progress bar takes one line per task with its elapsed time and ETA whole."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ._pty import SRC, in_pty, lines_of
from ._trees import make_split

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")

MODEL = "org_Some-Quite-Long-Model-Name-v2"
DATASET = "SP_a_rather_long_dataset_name_for_testing_widths"
KW: dict[str, Any] = {"total": 600, "hidden": 64, "layers": 4, "shard_size": 100, "batch_size": 20}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    base = root / "Activations" / MODEL / DATASET
    for seed, split in enumerate(("EM", "Neutral")):
        make_split(base / split, seed=seed, **KW)
    (base / "EM" / "layer_02" / "shard_003.pt").unlink()
    (base / "Neutral" / "a_stray_file_with_a_rather_long_name_for_the_layout.txt").write_text("x")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("clean") / "Activations" / MODEL / DATASET
    for seed, split in enumerate(("EM", "Neutral")):
        make_split(base / split, seed=seed, **KW)
    return base


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("columns", [80, 120])
def test_validate_fits_the_terminal(tree: Path, columns: int, colour: bool) -> None:
    out = in_pty(
        [sys.executable, "-m", "actfmt", "validate", "Activations"], columns, colour=colour, cwd=tree
    )
    assert bool(re.search(r"\x1b\[[0-9;]*3[0-9]m", out)) == colour  # red / yellow, unless NO_COLOR
    shown = lines_of(out)
    assert all(len(line) <= columns for line in shown), [x for x in shown if len(x) > columns]
    text = "\n".join(shown)
    for split in ("EM", "Neutral"):
        header = f"Activations/{MODEL}/{DATASET}/{split}"
        if len(header) <= columns:
            assert header in shown
        else:  # broken after a "/", the rest indented under it
            assert any(
                a.endswith("/") and b.startswith("  ") and a + b.strip() == header
                for a, b in itertools.pairwise(shown)
            ), text
    # messages break between words: every word of each message is whole on some line
    for message in (
        "layer_02: shard_003.pt is missing",
        f"model_name = \"org/Tiny-Model\" but the directory is '{MODEL}' (expected 'org_Tiny-Model')",
        "unexpected file in a split (expected metadata.json and layer_XX/ only)",
    ):
        for word in message.split():
            assert any(word in line.split() for line in shown), (word, text)
    assert any(line.startswith("Checked 2 splits") for line in shown)


def test_validate_keeps_one_line_per_item_off_a_terminal(tree: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "actfmt", "validate", "Activations"],
        capture_output=True,
        text=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "80"},
        timeout=120,
        check=False,
    )
    assert f"Activations/{MODEL}/{DATASET}/EM" in proc.stdout.splitlines()  # grep finds it whole in a CI log


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("columns", [80, 120])
def test_convert_progress_is_one_line_per_task(
    clean: Path, columns: int, colour: bool, tmp_path: Path
) -> None:
    """The bar drawn at once (the usual 1 s delay set to 0), every redraw one line per task, each whole, though
    the tasks are named by long paths (Activations/model/dataset/split)."""
    code = (
        "import sys, actfmt.cli as c, actfmt.reporters.progress as p; p.PROGRESS_DELAY = 0.0; "
        f"sys.argv = ['actfmt', 'convert', {str(clean.parent.parent)!r}, 'out', '--to', 'zarr', '-j', '1']; c.main()"
    )
    out = in_pty([sys.executable, "-c", code], columns, colour=colour, cwd=tmp_path)
    shown = [line for line in lines_of(out) if line.strip()]
    assert all(len(line) <= columns for line in shown), [x for x in shown if len(x) > columns]
    tasks = [line for line in shown if not line.startswith("Converted ")]
    assert any("━" in line for line in tasks), out  # a bar was drawn
    # every line is one whole task: it ends with the elapsed time, "ETA" and the time remaining, none of them
    # cut (the last blank for a task of unknown size: verify); a line continued would end otherwise
    tail = re.compile(r"\d+:\d\d:\d\d ETA( +(\d+:\d\d:\d\d|-:--:--))?\s*$")
    assert all(tail.search(line) for line in tasks), [x for x in tasks if not tail.search(x)]
    assert any(line.startswith("Converted 2 splits") for line in shown)


@pytest.mark.parametrize("columns", [80, 120])
def test_stats_headings_fit_the_terminal(clean: Path, columns: int) -> None:
    out = in_pty(
        [sys.executable, "-m", "actfmt", "stats", "Activations"], columns, colour=True, cwd=clean.parents[2]
    )
    shown = lines_of(out)
    assert all(len(line) <= columns for line in shown), [x for x in shown if len(x) > columns]
    titles = []  # each split's title: on the line of its "(pt, ...)", or above it, broken after a "/"
    for j in (i for i, line in enumerate(shown) if "(pt, bfloat16" in line):
        if not shown[j].lstrip().startswith("("):
            titles.append(shown[j].split("  (")[0])
            continue
        i, parts = j - 1, [shown[j - 1].strip()]
        while shown[i - 1].endswith("/"):
            i -= 1
            parts.insert(0, shown[i].strip())
        titles.append("".join(parts))
    assert titles == [f"{MODEL}/{DATASET}/EM", f"{MODEL}/{DATASET}/Neutral"], shown


@pytest.mark.parametrize("columns", [80, 120])
def test_validate_deep_progress_fits_the_terminal(clean: Path, columns: int) -> None:
    """``--deep`` draws its bar at once: one line, within the width, its times whole."""
    out = in_pty(
        [sys.executable, "-m", "actfmt", "validate", "--deep", "Activations"],
        columns,
        colour=True,
        cwd=clean.parents[2],
    )
    shown = [line for line in lines_of(out) if line.strip()]
    assert all(len(line) <= columns for line in shown), [x for x in shown if len(x) > columns]
    tasks = [line for line in shown if "ETA" in line]
    assert tasks, out
    tail = re.compile(r"\d+:\d\d:\d\d ETA( +(\d+:\d\d:\d\d|-:--:--))?\s*$")
    assert all(tail.search(line) for line in tasks), [x for x in tasks if not tail.search(x)]
