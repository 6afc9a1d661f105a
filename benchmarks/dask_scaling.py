#!/usr/bin/env python
"""``actfmt convert --executor dask`` against the local engine, per core and from 1 to 2 workers (issue 19: per-core
throughput >= 0.9x local; 2 workers >= 1.8x one).

    python benchmarks/dask_scaling.py [SPLIT] [--work DIR] [--layers 28] [--to zarr safetensors] [--repeat 5]
                                      [--modes standing,cli]
    make bench-dask                        # the same, defaults

Without SPLIT it makes the seed-sized synthetic split of ``benchmarks/run.py`` (7049 x 4096 x --layers, bf16, the
producer's 512-row shards; ``make_seed_split``) under --work.  Every figure is a median with its spread (min-max)
over --repeat rounds; within a round every run of every format runs once, one after the other (interleaved, so a
busy moment of a shared machine hits them all alike), page cache warm, ``sync`` before each run.  Two modes:

* ``standing``: ``convert()`` in this process, on a ``LocalCluster`` of 1 and 2 single-threaded worker
  processes (``actfmt._dask.local_cluster``: the one ``--executor dask`` starts) started and warmed before the
  clock, as a standing cluster is; against ``convert(jobs=1)`` / ``jobs=2`` (the local engine's threads).
  CPU-seconds: this process (the driver, which also hosts the cluster's scheduler and nannies) plus the workers.
* ``cli``: ``actfmt convert SRC OUT --to FMT -j N [--executor dask]`` as a process, as a user runs it (the
  cluster's start-up included); wall time and the CPU-seconds of the process and its children (the worker
  processes) from ``wait4``.

Per-core throughput is the MB converted per CPU-second (user + system, every thread and process of the run):
robust to a shared machine, where wall times are not.  "dask nw / local -jn" is the ratio of those medians.
The speed-up is the ratio of the median wall times of 1 and 2 workers (and of each round's own pair: spread).
On a 2-core machine the speed-up is at most 2 / (the cores a 1-worker run keeps busy), and needs both cores
free: the load average (``/proc/loadavg``, 1 minute) is printed with every round and figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ACTFMT, du, make_seed_split, warm

RUNS = ("local -j1", "local -j2", "dask 1w", "dask 2w")


def workers(what: str) -> int:
    """Threads or workers of a run: ``local -j2`` -> 2, ``dask 1w`` -> 1."""
    return int(what.split()[-1].strip("-jw"))


def load() -> float:
    """The 1-minute load average (what ``uptime`` says first)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _warm() -> None:
    """Import what a layer task needs in a worker (a standing cluster has done so long before)."""
    import actfmt.conversion
    import actfmt.formats

    for name in actfmt.formats.FORMATS:
        actfmt.formats.get_format(name)
    assert actfmt.conversion.run_layer_task


def process(cmd: Sequence[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the process and of the children it waited for) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime


class Figures:
    """(wall, CPU, load) of every run, by (format, run)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def add(self, fmt: str, what: str, wall: float, cpu: float) -> None:
        ld = load()
        self.runs.setdefault((fmt, what), []).append((wall, cpu, ld))
        print(
            f"  {fmt:<12} {what:<10} {wall:6.2f} s  {cpu:6.2f} CPU-s  {self.size / 1e6 / cpu:5.0f} MB/CPU-s  "
            f"cores busy {cpu / wall:4.2f}  load {ld:.2f}",
            file=sys.stderr,
            flush=True,
        )

    def per_core(self, fmt: str, what: str) -> list[float]:
        return [self.size / 1e6 / cpu for _, cpu, _ in self.runs.get((fmt, what), [])]

    def walls(self, fmt: str, what: str) -> list[float]:
        return [w for w, _, _ in self.runs.get((fmt, what), [])]

    def loads(self, fmt: str) -> list[float]:
        return [ld for (f, _), v in self.runs.items() if f == fmt for _, _, ld in v]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(mode: str, figs: Figures, formats: Sequence[str], repeat: int) -> None:
    print(
        f"\n### {mode}: split {figs.size / 1e6:.0f} MB, {os.cpu_count()} CPUs, medians (min-max) of {repeat} "
        f"interleaved rounds, page cache warm\n"
    )
    print("| format | run | wall s | cores busy | MB per CPU-s | per core / local | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for fmt in formats:
        for what in RUNS:
            runs = figs.runs.get((fmt, what))
            if not runs:
                continue
            pc = figs.per_core(fmt, what)
            busy = [cpu / wall for wall, cpu, _ in runs]
            rel = ""
            if what.startswith("dask"):
                local = figs.per_core(fmt, f"local -j{workers(what)}")
                if local:
                    rel = f"{statistics.median(pc) / statistics.median(local):.2f}x"
            print(
                f"| {fmt} | {what} | {spread(figs.walls(fmt, what))} | {spread(busy)} | {spread(pc, '{:.0f}')} "
                f"| {rel} | {spread([ld for _, _, ld in runs])} |"
            )
    print()
    for fmt in formats:
        loads = spread(figs.loads(fmt))
        for n in (1, 2):
            d, loc = figs.per_core(fmt, f"dask {n}w"), figs.per_core(fmt, f"local -j{n}")
            if d and loc:
                ratio = statistics.median(d) / statistics.median(loc)
                rounds = [a / b for a, b in zip(d, loc, strict=False)]
                verdict = "meets" if ratio >= 0.9 else "misses"
                print(
                    f"{mode} {fmt}: per-core throughput dask {n}w / local -j{n} {ratio:.2f}x (rounds "
                    f"{min(rounds):.2f}-{max(rounds):.2f}; {verdict} the 0.9x goal; load {loads})"
                )
        w1, w2 = figs.walls(fmt, "dask 1w"), figs.walls(fmt, "dask 2w")
        if w1 and w2:
            sp = statistics.median(w1) / statistics.median(w2)
            rounds = [a / b for a, b in zip(w1, w2, strict=False)]
            busy1 = statistics.median(cpu / wall for wall, cpu, _ in figs.runs[(fmt, "dask 1w")])
            verdict = "meets" if sp >= 1.8 else "misses"
            print(
                f"{mode} {fmt}: 2 workers / 1 worker {sp:.2f}x (rounds {min(rounds):.2f}-{max(rounds):.2f}; "
                f"{verdict} the 1.8x goal; 1 worker keeps {busy1:.2f} cores busy, so at most "
                f"{min(2.0, (os.cpu_count() or 2)) / busy1:.2f}x on this machine; load {loads})"
            )


def standing(src: Path, out: Path, formats: Sequence[str], repeat: int, size: int) -> Figures:
    from distributed import Client

    from actfmt._dask import local_cluster
    from actfmt.conversion import convert

    figs = Figures(size)
    with local_cluster(1) as c1, local_cluster(2) as c2:
        clients = {1: Client(c1, set_as_default=False), 2: Client(c2, set_as_default=False)}
        try:
            for client in clients.values():
                client.run(_warm)

            def run(to: str, n: int, dask: bool) -> tuple[float, float]:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no run pays for another's writeback
                client = clients[n] if dask else None
                w0 = sum(client.run(_cpu).values()) if client else 0.0
                c0, t0 = _cpu(), time.perf_counter()
                if client is not None:
                    convert(src, out, to=to, executor="dask", scheduler=client)
                else:
                    convert(src, out, to=to, jobs=n)
                wall = time.perf_counter() - t0
                w1 = sum(client.run(_cpu).values()) if client else 0.0
                return wall, _cpu() - c0 + w1 - w0

            for to in formats:  # warm-up: imports, format modules, the page cache
                run(to, 1, False)
                run(to, 1, True)
                run(to, 2, True)
            for r in range(repeat):
                print(f"round {r + 1}/{repeat}, load {load():.2f}", file=sys.stderr, flush=True)
                for to in formats:
                    for what in RUNS:
                        figs.add(to, what, *run(to, workers(what), what.startswith("dask")))
        finally:
            for client in clients.values():
                client.close()
    return figs


def cli(src: Path, out: Path, formats: Sequence[str], repeat: int, size: int) -> Figures:
    figs = Figures(size)

    def cmd(to: str, what: str) -> list[str]:
        extra = ["--executor", "dask"] if what.startswith("dask") else []
        return [*ACTFMT, "convert", str(src), str(out), "--to", to, "-j", str(workers(what)), "-q", *extra]

    def run(to: str, what: str) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # no run pays for another's writeback
        return process(cmd(to, what))

    for to in formats:
        run(to, "local -j1")
        run(to, "dask 1w")
    for r in range(repeat):
        print(f"round {r + 1}/{repeat}, load {load():.2f}", file=sys.stderr, flush=True)
        for to in formats:
            for what in RUNS:
                figs.add(to, what, *run(to, what))
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", nargs="?", type=Path, help="a split to convert (default: a synthetic one)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[2] / "bench-out")
    ap.add_argument("--layers", type=int, default=28, help="layers of the synthetic split (default 28)")
    ap.add_argument("--total", type=int, default=7049, help="rows of the synthetic split (default 7049)")
    ap.add_argument(
        "--hidden", type=int, default=4096, help="hidden_dim of the synthetic split (default 4096)"
    )
    ap.add_argument(
        "--to", nargs="+", default=["zarr", "safetensors"], help="formats (default zarr safetensors)"
    )
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--modes", default="standing,cli", help="standing, cli or both (default both)")
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.split:
        src = args.split.resolve()
    elif (args.total, args.hidden, args.layers) == (7049, 4096, 28):
        src = make_seed_split(work / "seed" / "EM", 7049, 4096, 28)  # the split benchmarks/run.py measures
    else:
        src = make_seed_split(
            work / f"seed-{args.total}x{args.hidden}x{args.layers}" / "EM",
            args.total,
            args.hidden,
            args.layers,
        )
    size = du(src)
    out = work / "dask-out"
    warm(src)
    print(
        f"split {src} ({size / 1e6:.0f} MB), {os.cpu_count()} CPUs, load {load():.2f} at the start",
        file=sys.stderr,
        flush=True,
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("standing", "cli"):
            ap.error(f"--modes: unknown mode {mode!r} (standing, cli)")
    results = []
    for mode in modes:
        fn: Callable[[Path, Path, Sequence[str], int, int], Figures] = standing if mode == "standing" else cli
        results.append((mode, fn(src, out, args.to, args.repeat, size)))
    shutil.rmtree(out, ignore_errors=True)
    for mode, figs in results:
        report(mode, figs, args.to, args.repeat)
    print(f"\nload average at the end: {load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
