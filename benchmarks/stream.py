#!/usr/bin/env python
"""actfmt.stream against the loaders a user would pick instead, in one run, interleaved.

    python benchmarks/stream.py [--work DIR] [--repeat N] [--quick] [--formats pt,zarr,...] [--no-cold]

Two synthetic bf16 splits under --work (made by ``benchmarks/run.py``'s ``make_seed_split``, the producer's
512-row shards): the seed-sized one (7049 x 4096 x 28 layers, 1.6 GB; streamed with all 28 layers, x
``[512, 28, 4096]``: a batch of 4096 would be 0.94 GB) and a one-layer one (200,000 x 4096, 1.6 GB; batch 4096).
Each is converted to zarr (default codec and ``none``), hdf5 (``none``) and safetensors.  Every figure is one
epoch, shuffled with the default buffer, in a process of its own (peak RSS from ``getrusage``), with the page
cache warmed by ``cat`` first; the runs of all readers alternate, --repeat rounds, and the median (min-max) is
reported.  The readers:

* ``actfmt.stream`` on every format;
* the seed guide's loader: ``torch.load`` every shard, ``torch.cat``, ``torch.randperm``, index batches;
* ``ActivationDataset`` + ``DataLoader(shuffle=True, batch_size, num_workers=2)`` (one layer: it has no
  multi-layer rows; on the seed split its rate over one layer is reported);
* MosaicML streaming is not run: ``pip install mosaicml-streaming`` here pulls a CUDA torch build (2.14,
  ~3 GB of nvidia wheels) and downgrades numpy; see the README.

Cold cache (--no-cold skips it): ``posix_fadvise(DONTNEED)`` on every file of the store, then one epoch, against
``cat`` of the same files after the same drop.  GB/s counts the bytes of ``x`` delivered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import REPO, du, make_seed_split, warm  # noqa: E402

STORES = {  # label: (format, compression)
    "pt": None,
    "zarr": ("zarr", None),
    "zarr-raw": ("zarr", "none"),
    "hdf5": ("hdf5", "none"),
    "safetensors": ("safetensors", None),
}


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def drop(path: Path) -> None:
    """Drop the files' pages from the page cache (clean pages only: they were synced when written)."""
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the readers, each run in a child process ------------------------------------------------------------------


def child(kind: str, path: str, layers: list[int], batch: int) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    nbytes = rows = 0
    if kind == "actfmt":
        from actfmt.streaming import measure

        rep = measure([path], layers if len(layers) > 1 else layers[0], batch_size=batch)
        out = {"seconds": rep.seconds, "bytes": rep.bytes, "rows": rep.rows, "mixing": rep.mixing}
    elif kind == "seed":
        from actfmt.layout import layer_name

        def load(layer: int) -> torch.Tensor:
            shards = sorted((Path(path) / layer_name(layer)).glob("shard_*.pt"))
            return torch.cat([torch.load(f) for f in shards])

        x = load(layers[0]) if len(layers) == 1 else torch.stack([load(i) for i in layers], dim=1)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        for i in range(0, x.shape[0], batch):
            b = x[perm[i : i + batch]]
            nbytes += b.numel() * b.element_size()
            rows += b.shape[0]
        out = {"seconds": time.perf_counter() - t0, "bytes": nbytes, "rows": rows}
    elif kind == "dataset":
        from torch.utils.data import DataLoader

        from actfmt.torch import ActivationDataset

        ds = ActivationDataset([path], layer=layers[len(layers) // 2])
        for x, _ in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2):
            nbytes += x.numel() * x.element_size()
            rows += x.shape[0]
        out = {"seconds": time.perf_counter() - t0, "bytes": nbytes, "rows": rows}
    else:
        raise SystemExit(f"unknown reader {kind}")
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_child(kind: str, path: Path, layers: list[int], batch: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, str(path), ",".join(map(str, layers)), str(batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cat_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files_of(path))], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# -- the benchmark ---------------------------------------------------------------------------------------------


def stores_for(src: Path, work: Path, formats: list[str]) -> dict[str, Path]:
    import actfmt
    from actfmt.formats import find_splits

    out = {}
    for label in formats:
        spec = STORES[label]
        if spec is None:
            out[label] = src
            continue
        dst = work / f"{src.parent.name}-{label}"
        if not dst.exists():
            actfmt.convert(src, dst, to=spec[0], compression=spec[1], force=True)
        ((store, _),) = find_splits(dst)
        out[label] = Path(str(store))
    subprocess.run(["sync"], check=True)
    return out


def median_spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench(
    name: str,
    src: Path,
    work: Path,
    layers: list[int],
    batch: int,
    repeat: int,
    formats: list[str],
    cold: bool,
) -> None:
    stores = stores_for(src, work, formats)
    readers: list[tuple[str, str, Path]] = [("actfmt.streaming", label, p) for label, p in stores.items()]
    readers += [("seed loader", "pt", src), ("ActivationDataset+DataLoader", "pt", src)]
    kinds = {"actfmt.streaming": "actfmt", "seed loader": "seed", "ActivationDataset+DataLoader": "dataset"}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(repeat):
        for who, label, path in readers:
            warm(path) if path.is_dir() else cat_seconds(path)
            results.setdefault((who, label), []).append(run_child(kinds[who], path, layers, batch))
    peers = [k for k in results if k[0] != "actfmt.streaming"]
    best_peer = max(statistics.median(r["bytes"] / r["seconds"] for r in results[k]) for k in peers)
    print(f"\n### {name}: {src} ({du(src) / 1e9:.2f} GB), layers {layers[0]}..{layers[-1]}, batch {batch}\n")
    print("| reader | store | GB/s of x | rows/s | peak RSS | vs best peer |")
    print("|---|---|---|---|---|---|")
    for (who, label), runs in results.items():
        gbs = [r["bytes"] / r["seconds"] / 1e9 for r in runs]
        rows = [r["rows"] / r["seconds"] for r in runs]
        rss = max(r["rss"] for r in runs) / 1e9
        ratio = statistics.median(gbs) * 1e9 / best_peer
        print(
            f"| {who} | {label} | {median_spread(gbs)} | {statistics.median(rows):,.0f} | {rss:.2f} GB | {ratio:.1f}x |"
        )
    mix = results[("actfmt.streaming", formats[0])][0].get("mixing")
    if mix:
        print(
            f"\nactfmt.stream mixing (default buffer): |corr(position, row)| {mix['corr']:.3f}, same-block pairs "
            f"per batch {mix['same_block']:.2f}x a full shuffle's"
        )
    if cold:
        print("\nCold cache (posix_fadvise DONTNEED before each run), against cat of the same files:\n")
        print("| store | actfmt.stream GB/s | cat GB/s | ratio |")
        print("|---|---|---|---|")
        for label in ("pt", "safetensors"):
            if label not in stores:
                continue
            path = stores[label]
            size = sum(f.stat().st_size for f in files_of(path))
            ours, cats = [], []
            for _ in range(repeat):
                drop(path)
                r = run_child("actfmt", path, layers, batch)
                ours.append(r["bytes"] / r["seconds"] / 1e9)
                drop(path)
                cats.append(size / cat_seconds(path) / 1e9)
            ratio = statistics.median(ours) / statistics.median(cats)
            print(f"| {label} | {median_spread(ours)} | {median_spread(cats)} | {ratio:.2f}x |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, layers, batch = sys.argv[2:6]
        print(json.dumps(child(kind, path, [int(v) for v in layers.split(",")], int(batch))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO.parent / "bench-out", help="scratch directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small splits, for a smoke run")
    ap.add_argument("--formats", default=",".join(STORES), help="stores to stream from")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache figures")
    ap.add_argument("--only", default="seed,big", help="splits: seed, big")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    formats = args.formats.split(",")
    import actfmt

    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, actfmt "
        f"{actfmt.__version__}, load average {os.getloadavg()[0]:.1f} at the start (the machine is shared: "
        f"figures are noisy); {args.repeat} interleaved runs; work dir {work}"
    )
    only = set(args.only.split(","))
    if "seed" in only:
        total, layers, batch = (1000, 8, 128) if args.quick else (7049, 28, 512)
        src = make_seed_split(
            work / ("seed-quick" if args.quick else "seed") / "EM",
            total,
            1024 if args.quick else 4096,
            layers,
        )
        bench(
            "seed-sized split", src, work, list(range(layers)), batch, args.repeat, formats, not args.no_cold
        )
    if "big" in only:
        total, batch = (20_000, 1024) if args.quick else (200_000, 4096)
        src = make_seed_split(
            work / ("big-quick" if args.quick else "big") / "EM", total, 1024 if args.quick else 4096, 1
        )
        bench("one-layer split", src, work, [0], batch, args.repeat, formats, not args.no_cold)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
