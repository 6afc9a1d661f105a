"""Build small activation trees in the producer's layout for tests (the producer's shard arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from actfmt.layout import expected_shard_rows, layer_name, shard_name


def make_split(
    path: Path,
    *,
    total: int = 203,
    hidden: int = 16,
    layers: int = 3,
    shard_size: int = 64,
    batch_size: int = 20,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    split: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Write one split as the producer does; return {layer_name: full tensor} for comparisons."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    meta: dict[str, Any] = {
        "model_name": "org/Tiny-Model",
        "dataset_name": path.parent.name or "ds",
        "split": split or path.name,
        "load_in_4bit": False,
        "total_examples": total,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "hidden_dim": hidden,
        "num_layers": layers,
    }
    meta.update(extra or {})
    (path / "metadata.json").write_text(json.dumps(meta, indent=2))
    out = {}
    for i in range(layers):
        full = (torch.randn(total, hidden, generator=g) * (i + 1)).to(dtype)
        out[layer_name(i)] = full
        d = path / layer_name(i)
        d.mkdir(exist_ok=True)
        start = 0
        for j, n in enumerate(expected_shard_rows(total, shard_size, batch_size)):
            torch.save(full[start : start + n].clone(), d / shard_name(j))
            start += n
    return out


def make_tree(root: Path, **kw: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Activations/org_Tiny-Model/SP_test/{EM,Neutral} with the same number of examples."""
    base = root / "org_Tiny-Model" / "SP_test"
    return {
        f"org_Tiny-Model/SP_test/{s}": make_split(base / s, seed=k, **kw)
        for k, s in enumerate(("EM", "Neutral"))
    }


def seed_load(split: Path, layer: str) -> torch.Tensor:
    """The seed guide's loader: torch.load every shard (sorted) and torch.cat."""
    return torch.cat([torch.load(f) for f in sorted((split / layer).glob("shard_*.pt"))])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)
