#!/usr/bin/env python
"""The statistics kernel alone, in process, one core: GB/s of stored bytes on a block from cache, per means.

    python benchmarks/kernel.py [--rows 512] [--hidden 4096] [--repeat 20] [--real DIR]

* numpy: actfmt.kernel.numpy_block_moments (float64 sub-blocks, BLAS matrix-vector sums; the fallback);
* torch: bf16 -> float32 by a shift, float32 sums of x, x² per dimension and of x² per row over the block
  (merged in float64 after): fast, but NOT exact -- its relative error against float64 is printed;
* C: actfmt._kernel (float64; AVX-512 or AVX2 when the CPU has them, and the AVX2 version on its own on a CPU
  with AVX-512; "C portable" without either).

The error columns: the largest relative error of the per-dimension sums of squares and of the row norms against
a float64 reference, on gaussian values and, with --real, on a real bf16 split's shards.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actfmt import kernel

REAL = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-minilm-bf16"
)  # as run.py: beside the checkout


def torch_f32(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = torch.from_numpy(bits.view(np.int16))
    x = (t.to(torch.int32) << 16).view(torch.float32)
    sq = x * x
    return (
        x.sum(0).double().numpy(),
        sq.sum(0).double().numpy(),
        sq.sum(1).double().numpy(),
        x.abs().amax().double().numpy(),
    )


def reference(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = kernel.as_float64(bits, "bfloat16", np.empty(bits.shape))
    return (x * x).sum(0), (x * x).sum(1)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--real", type=Path, default=REAL)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    blocks = {
        dt: (torch.randn(args.rows, args.hidden, generator=g) * 2).to(getattr(torch, dt))
        for dt in ("bfloat16", "float16", "float32")
    }
    bits = {dt: t.view(torch.int32 if dt == "float32" else torch.int16).numpy() for dt, t in blocks.items()}
    level = kernel._c.simd() if kernel._c is not None else 0
    best_name = {2: "AVX-512", 1: "AVX2"}.get(level, "portable")
    means: dict[str, Any] = {
        "numpy (float64)": lambda b, dt: kernel.numpy_block_moments(b, dt),
        f"C (float64, {best_name})": lambda b, dt: kernel._compiled(b, dt, True),
    }
    if level == 2:  # the AVX2 version too, which CPUs without AVX-512 run
        means["C (float64, AVX2)"] = lambda b, dt: kernel._compiled(b, dt, True, simd=1)
    means["C portable (float64)"] = lambda b, dt: kernel._compiled(b, dt, True, simd=0)
    means[f"C row figures only ({best_name})"] = lambda b, dt: kernel._compiled(b, dt, False)
    print(
        f"block {args.rows} x {args.hidden}, from cache, one thread; GB/s of stored bytes (best of {args.repeat})\n"
    )
    print("| means | bfloat16 | float16 | float32 |")
    print("|---|---|---|---|")
    for name, fn in means.items():
        if name.startswith("C") and kernel._c is None:
            continue
        cells = []
        for dt, b in bits.items():
            seconds = best(lambda fn=fn, b=b, dt=dt: fn(b, dt), args.repeat)
            cells.append(f"{b.nbytes / 1e9 / seconds:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    tb = bits["bfloat16"].view(np.uint16)
    t_torch = best(lambda: torch_f32(tb), args.repeat)
    print(f"| torch float32 sums (bf16 only; inexact) | {tb.nbytes / 1e9 / t_torch:.2f} | | |")

    print("\nrelative error against float64 (sum of squares per dimension, squared row norm):\n")
    print("| data | torch float32 | C | numpy |")
    print("|---|---|---|---|")
    samples = [("gaussian bf16", tb)]
    if args.real.is_dir():
        shards = sorted(args.real.rglob("*.pt"))
        real = np.concatenate([torch.load(p).view(torch.int16).numpy().view(np.uint16) for p in shards[:16]])
        samples.append((f"real bf16 ({real.shape[0]} x {real.shape[1]})", real))
    for label, b in samples:
        ref_sq, ref_rows = reference(b)
        _, t_sq, t_rows, _ = torch_f32(b)
        f = kernel._compiled(b, "bfloat16", True) if kernel._c is not None else None
        n = kernel.numpy_block_moments(b, "bfloat16")
        cells = [f"{rel(t_sq, ref_sq):.1e} / {rel(t_rows, ref_rows):.1e}"]
        cells.append(f"{rel(f.col_sq, ref_sq):.1e} / {rel(f.rownorm2, ref_rows):.1e}" if f else "")
        cells.append(f"{rel(n.col_sq, ref_sq):.1e} / {rel(n.rownorm2, ref_rows):.1e}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
