#!/usr/bin/env python
"""Where a default-codec conversion's time goes: thread-seconds per GB against encode threads, jobs, chunk size,
level and codec (issue 19: "measure where the time goes ... report thread-seconds per GB").

    python benchmarks/codecs.py [SPLIT] [--work DIR] [--layers 8] [--repeat 3] [--to zarr hdf5]

Without SPLIT it makes the seed-like synthetic split of ``benchmarks/run.py`` with --layers layers (7049 x 4096,
bf16, 512-row shards; 8 layers: 462 MB).  Each configuration is ``actfmt.convert()`` in this process (statistics
and verification on, as the default), page cache warm; the figures are medians of --repeat runs, the
configurations interleaved round by round: CPU-seconds of the whole conversion per GB of the source, the
thread-seconds per GB of writing (encoding + writing) and of verification (decoding + hashing) from the
conversion's own timings, wall seconds, and the size of the output against the source.  "threads" is the
number of encode threads per layer writer (``WriteOptions.extra["threads"]``; default: zarr 2, hdf5
min(4, cores)), "jobs" the layers written at once (``--jobs``; default: the cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import du, load_average, make_seed_split, warm

from actfmt.conversion import convert
from actfmt.formats import base

#: (label, format, keyword arguments of convert, encode threads per layer or None for the default)
CONFIGS: dict[str, list[tuple[str, dict[str, Any], int | None]]] = {
    "zarr": [
        ("default: blosc-zstd 1 + shuffle, 2 MiB chunks, 2 threads, jobs 2", {}, None),
        ("1 encode thread per layer", {}, 1),
        ("jobs 1 (2 threads)", {"jobs": 1}, None),
        ("chunks 1 MiB (128 rows)", {"chunk_rows": 128}, None),
        ("chunks 4 MiB (512 rows)", {"chunk_rows": 512}, None),
        ("chunks 8 MiB (1024 rows)", {"chunk_rows": 1024}, None),
        ("level 3", {"level": 3}, None),
        ("lz4", {"compression": "lz4"}, None),
        ("zstd (no blosc)", {"compression": "zstd"}, None),
        ("uncompressed (for reference)", {"compression": "none"}, None),
    ],
    "hdf5": [
        ("default: gzip 1 + shuffle, threads min(4, cores), jobs 2", {}, None),
        ("2 encode threads", {}, 2),
        ("1 encode thread", {}, 1),
        ("chunks of 512 rows", {"chunk_rows": 512}, None),
        ("chunks of 128 rows", {"chunk_rows": 128}, None),
        ("lzf", {"compression": "lzf"}, None),
        ("uncompressed (for reference)", {"compression": "none"}, None),
    ],
}

_threads: list[int | None] = [None]
_init = base.WriteOptions.__init__


def _init_with_threads(self: Any, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    if _threads[0] is not None and hasattr(self, "extra"):
        self.extra = {**self.extra, "threads": _threads[0]}


base.WriteOptions.__init__ = _init_with_threads  # type: ignore[method-assign]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", nargs="?", type=Path)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "bench-out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--to", nargs="+", default=["zarr", "hdf5"])
    args = ap.parse_args()
    work = args.work.resolve()
    src = args.split or make_seed_split(
        work / f"seed-7049x4096x{args.layers}" / "EM", 7049, 4096, args.layers
    )
    size = du(src)
    out = work / "codec-out"
    warm(src)
    print(f"split {src} ({size / 1e6:.0f} MB); load {load_average()}", file=sys.stderr, flush=True)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    todo = [(to, label, kw, th) for to in args.to for label, kw, th in CONFIGS[to]]
    for r in range(args.repeat + 1):  # round 0 warms up
        for to, label, kw, th in todo:
            shutil.rmtree(out, ignore_errors=True)
            _threads[0] = th
            c0, t0 = _cpu(), time.perf_counter()
            res = convert(src, out, to=to, **kw)
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            if r:
                t = res.timings
                fig = {
                    "wall": wall,
                    "cpu": cpu,
                    "write": t.get("write", 0.0),
                    "verify": t.get("verify", 0.0),
                    "size": du(out) / size,
                }
                runs.setdefault((to, label), []).append(fig)
                print(
                    f"  {to:<5} {label:<62} {wall:5.2f} s {cpu / (size / 1e9):5.2f} CPU-s/GB  load "
                    f"{load_average().split()[0]}",
                    file=sys.stderr,
                    flush=True,
                )
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"\nsplit {size / 1e6:.0f} MB, {os.cpu_count()} cores, medians of {args.repeat} interleaved rounds; load "
        f"{load_average()} at the end\n"
    )
    print(
        "| format | configuration | CPU-s per GB (min-max) | write thread-s per GB | verify thread-s per GB "
        "| wall s | size / source |"
    )
    print("|---|---|---|---|---|---|---|")
    gb = size / 1e9
    for (to, label), figs in runs.items():
        cpu = [f["cpu"] / gb for f in figs]

        def med(key: str, figs: list[dict[str, float]] = figs) -> float:
            return statistics.median(f[key] for f in figs)

        print(
            f"| {to} | {label} | {statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | "
            f"{med('write') / gb:.2f} | {med('verify') / gb:.2f} | {med('wall'):.2f} | {med('size'):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
