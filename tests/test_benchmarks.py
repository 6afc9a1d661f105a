"""The benchmark runs end to end (``make bench`` on a small synthetic split): every section, every format, the
bit-for-bit checks it makes (reads against the seed loader, ``actfmt verify`` of the round trips) included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick_run(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--quick",
            "--repeat",
            "1",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = res.stdout
    for heading in ("### Convert", "### The demo fixture", "### Reads", "### Validate", "### Statistics"):
        assert heading in out, out
    for row in (
        "zarr uncompressed",
        "hdf5 default codec",
        "safetensors uncompressed --no-stats",
        "pt from zarr",
    ):
        assert f"| {row} |" in out, out
    assert "Traceback" not in res.stderr, res.stderr
