#!/usr/bin/env python
"""Speed-up of ``actfmt convert --executor dask`` with 1 and 2 workers (issue goal: >= 1.6x on 2 cores).

    python benchmarks/dask_scaling.py [SPLIT] [--work DIR] [--layers 8] [--to zarr safetensors] [--repeat 2]

Without SPLIT it makes a synthetic seed-like split (7049 x 4096 x --layers, bf16, the producer's 512-row
shards; ``make_seed_split`` from benchmarks/run.py) under --work.  For each format it times, page cache warm,
best of --repeat:

* ``local -j1`` / ``local -j2``: the default executor with one and two threads (for context);
* ``dask 1w`` / ``dask 2w``: ``--executor dask`` on a ``LocalCluster`` of 1 and 2 single-threaded worker
  processes, started (and warmed up: torch imported) before the clock starts, as a standing cluster would be;
* the parts of a run: the driver's verification pass (re-reading and hashing the written store, serial) and
  the same layer tasks without it (``--no-verify``), so the speed-up of the parallel part shows on its own;
* ``cp -r`` of the source (the I/O floor) and, for every run, the CPU seconds it used (driver + workers)
  divided by its wall time: "cores busy", and the bytes per CPU-second ("per-core throughput", dask against
  local: the issue's goal is >= 0.9x).  A 1-worker run that already keeps both cores busy (zarr's encode
  threads) cannot get faster with a second worker on a 2-core machine.

Prints one table and the speed-up ``dask 1w / dask 2w``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import du, make_seed_split

from actfmt.conversion import convert


def _cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], object], repeat: int, cpu: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of ``repeat`` runs."""
    runs = []
    for _ in range(repeat):
        c0, t0 = cpu(), time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0, cpu() - c0))
    return min(runs)


def _warm() -> None:
    """Import what a layer task needs in a worker (a standing cluster has done so long before)."""
    import actfmt.conversion
    import actfmt.formats

    for name in actfmt.formats.FORMATS:
        actfmt.formats.get_format(name)
    assert actfmt.conversion.run_layer_task


def _one_encode_thread() -> None:
    import actfmt.formats.zarr_

    actfmt.formats.zarr_.WRITE_THREADS = 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", nargs="?", type=Path, help="a split to convert (default: a synthetic one)")
    ap.add_argument("--work", type=Path, default=Path("bench-out"), help="scratch directory")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic split (default 8)")
    ap.add_argument("--total", type=int, default=7049, help="rows of the synthetic split (default 7049)")
    ap.add_argument(
        "--hidden", type=int, default=4096, help="hidden_dim of the synthetic split (default 4096)"
    )
    ap.add_argument(
        "--to", nargs="+", default=["zarr", "safetensors"], help="formats (default zarr safetensors)"
    )
    ap.add_argument("--compression", default=None, help="codec (default: each format's default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--single-thread-tasks",
        action="store_true",
        help="one encode thread per zarr writer in the workers (dask's one-task-one-core model), to measure "
        "how the layer tasks themselves scale",
    )
    args = ap.parse_args()

    from distributed import Client

    # actfmt's own cluster: no MALLOC_TRIM_THRESHOLD_ in the workers' environment
    from actfmt.conversion.executors import local_cluster

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = args.split or make_seed_split(
        work / f"seed-{args.total}x{args.hidden}x{args.layers}" / "EM", args.total, args.hidden, args.layers
    )
    size = du(src)
    print(f"split: {src} ({size / 1e6:.0f} MB), {os.cpu_count()} CPUs", file=sys.stderr, flush=True)
    out = work / "dask-out"

    def run(to: str, **kw: object) -> Callable[[], object]:
        def go() -> object:
            shutil.rmtree(out, ignore_errors=True)
            return convert(src, out, to=to, compression=args.compression, **kw)  # type: ignore[arg-type]

        return go

    def verify_only(to: str) -> Callable[[], object]:
        from actfmt.conversion import layer_checksum
        from actfmt.formats import find_splits, open_reader

        def go() -> None:
            for path, fmt in find_splits(out):
                with open_reader(path, fmt) as r:
                    for pos in range(len(r.layers)):
                        layer_checksum(r, pos)

        return go

    rows: list[tuple[str, str, float, float]] = []  # format, run, wall seconds, CPU seconds

    def add(fmt: str, what: str, wall: float, cpu: float) -> None:
        rows.append((fmt, what, wall, cpu))
        print(
            f"  {fmt:<12} {what:<22} {wall:6.2f} s {size / 1e6 / wall:6.0f} MB/s  cores busy {cpu / wall:4.2f}",
            file=sys.stderr,
            flush=True,
        )

    def cp() -> None:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["cp", "-r", str(src), str(out)], check=True)

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    run(args.to[0])()  # warm the page cache and the imports
    add("-", "cp -r (I/O floor)", *measure(cp, args.repeat, children_cpu))
    speedups: dict[str, tuple[float, float]] = {}
    for to in args.to:
        run(to)()
        add(to, "local -j1", *measure(run(to, jobs=1), args.repeat, _cpu))
        add(to, "local -j2", *measure(run(to, jobs=2), args.repeat, _cpu))
        add(to, "verify pass (driver)", *measure(verify_only(to), args.repeat, _cpu))
        timings = {}
        for n in (1, 2):
            with (
                local_cluster(n) as cl,
                Client(cl, set_as_default=False) as client,
            ):
                client.run(_warm)
                if args.single_thread_tasks:
                    client.run(_one_encode_thread)

                def cluster_cpu(client: Client = client) -> float:
                    return _cpu() + sum(client.run(_cpu).values())

                run(to, executor="dask", scheduler=client)()  # warm-up: worker imports, format modules
                t = measure(run(to, executor="dask", scheduler=client), args.repeat, cluster_cpu)
                tnv = measure(
                    run(to, executor="dask", scheduler=client, verify=False), args.repeat, cluster_cpu
                )
            add(to, f"dask {n}w", *t)
            add(to, f"dask {n}w --no-verify", *tnv)
            timings[n] = (t[0], tnv[0])
        speedups[to] = (timings[1][0] / timings[2][0], timings[1][1] / timings[2][1])
    shutil.rmtree(out, ignore_errors=True)

    print(f"\nsplit {size / 1e6:.0f} MB, {os.cpu_count()} CPUs, best of {args.repeat}, page cache warm")
    print(
        "\n| format | run | seconds | MB/s | cores busy (CPU s / wall s) | MB per CPU-s |\n|---|---|---|---|---|---|"
    )
    per_core: dict[tuple[str, str], float] = {}
    for fmt, what, wall, cpu in rows:
        per_core[(fmt, what)] = size / 1e6 / cpu if cpu else 0.0
        print(
            f"| {fmt} | {what} | {wall:.2f} | {size / 1e6 / wall:.0f} | {cpu / wall:.2f} | {per_core[(fmt, what)]:.0f} |"
        )
    print()
    for (
        fmt
    ) in args.to:  # per-core throughput (bytes per CPU-second: robust to a shared machine) against local
        for dask_run, local_run in (("dask 1w", "local -j1"), ("dask 2w", "local -j2")):
            local = per_core.get((fmt, local_run))
            if local:
                ratio = per_core[(fmt, dask_run)] / local
                print(f"{fmt}: per-core throughput {dask_run} / {local_run} {ratio:.2f}x (goal >= 0.9x)")
    for fmt, (sp, spnv) in speedups.items():
        verdict = "meets" if sp >= 1.6 else "misses"
        print(
            f"{fmt}: speed-up 1 -> 2 dask workers {sp:.2f}x ({verdict} the 1.6x goal); without the driver's "
            f"verify pass {spnv:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
