"""PyTorch integration: :class:`ActivationDataset` for probes and SAEs.

>>> from actfmt.torch import ActivationDataset                       # doctest: +SKIP
>>> ds = ActivationDataset(["…/EM", "…/Neutral"], layer=3, labels=[1, 0])
>>> loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, num_workers=2)

The dataset holds paths only and opens files lazily in each worker, so it pickles cleanly and works with
``num_workers > 0``.  ``__getitems__`` fetches a whole batch of rows in one read per split.

``normalize="scale"`` multiplies every row by ``sqrt(hidden_dim) / mean row norm`` over all the splits (SAELens'
normalisation constant); ``normalize="standardize"`` subtracts the per-dimension mean and divides by the
per-dimension standard deviation (pooled over the splits).  Both use the statistics ``actfmt convert`` keeps
with a store, or compute them with one pass, once, when the dataset is built; normalised rows are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from actfmt.dataset import Split, as_locations
from actfmt.dataset import open as open_split
from actfmt.storage import PathLike

__all__ = ["NORMALIZE", "ActivationDataset"]

#: ``normalize=`` choices.
NORMALIZE = (None, "scale", "standardize")


class ActivationDataset(Dataset):
    """Rows of one layer from one or more splits, each yielded as ``(x, label)``.

    ``labels``: one label per split (default: the split's position, so EM/Neutral become 0/1), or one
    label per row of each split (a sequence of sequences / tensors).
    """

    def __init__(
        self,
        splits: Sequence[PathLike | Split],
        layer: int,
        labels: Sequence[Any] | None = None,
        normalize: str | None = None,
    ) -> None:
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(map(repr, NORMALIZE))}")
        self.paths = as_locations(splits)
        self.layer = layer
        self.normalize = normalize
        self._splits: list[Split] | None = None
        sizes = []
        figures: list[Any] = []
        width = 0
        for p in self.paths:
            with open_split(p) as s:
                view = s.layer(layer)
                sizes.append(len(view))
                width = view.shape[1]
                if normalize == "scale":
                    figures.append(view.stats())
                elif normalize == "standardize":
                    figures.append((len(view), view.mean().double(), view.std().double()))
        #: The normalisation applied to every row: ``scale`` (a float) or ``(mean, std)`` float32 tensors.
        self.scale: float | None = None
        self.center: torch.Tensor | None = None
        self.spread: torch.Tensor | None = None
        if normalize == "scale":
            rows = sum(f.rows for f in figures)
            norm = sum(f.row_norm_mean * f.rows for f in figures) / rows if rows else 0.0
            self.scale = math.sqrt(width) / norm if norm else 1.0
        elif normalize == "standardize":
            n = sum(f[0] for f in figures)
            mean = sum(f[0] * f[1] for f in figures) / max(n, 1)
            var = sum(f[0] * (f[2] ** 2 + (f[1] - mean) ** 2) for f in figures) / max(n, 1)
            std = var.sqrt()
            self.center = mean.float()
            self.spread = torch.where(
                std > 0, std, torch.ones_like(std)
            ).float()  # constant dimensions: centred
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if labels is None:
            labels = list(range(len(self.paths)))
        if len(labels) != len(self.paths):
            raise ValueError(f"labels: expected {len(self.paths)} entries (one per split), got {len(labels)}")
        per_row = []
        for lab, n in zip(labels, sizes, strict=True):
            if isinstance(lab, (list, tuple, np.ndarray, torch.Tensor)):
                t = torch.as_tensor(lab)
                if len(t) != n:
                    raise ValueError(f"labels: a per-row label list must have {n} entries, got {len(t)}")
                per_row.append(t)
            else:
                per_row.append(torch.full((n,), lab))
        self.labels = torch.cat(per_row) if per_row else torch.empty(0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_splits"] = None  # file handles are per process: reopened lazily
        return state

    def _open(self) -> list[Split]:
        if self._splits is None:
            self._splits = [open_split(p) for p in self.paths]
        return self._splits

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        i %= n
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        x = self._open()[k].layer(self.layer)[i - int(self.offsets[k])]
        return self._normalized(x), self.labels[i]

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return x.float() * self.scale
        if self.center is not None and self.spread is not None:
            return (x.float() - self.center) / self.spread
        return x

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, Any]]:
        idx = np.asarray(indices, dtype=np.int64)
        splits = self._open()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        rows: list[torch.Tensor | None] = [None] * len(idx)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            block = self._normalized(splits[k].layer(self.layer)[idx[sel] - self.offsets[k]])
            for j, s in enumerate(sel):
                rows[s] = block[j]
        return [(rows[j], self.labels[int(idx[j])]) for j in range(len(idx))]  # type: ignore[misc]

    def close(self) -> None:
        for s in self._splits or []:
            s.close()
        self._splits = None
