"""PyTorch integration: :class:`ActivationDataset` for probes and SAEs.

>>> from actfmt.torch import ActivationDataset                       # doctest: +SKIP
>>> ds = ActivationDataset(["…/EM", "…/Neutral"], layer=3, labels=[1, 0])
>>> loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, num_workers=2)

The dataset holds paths only and opens files lazily in each worker, so it pickles cleanly and works with
``num_workers > 0``.  ``__getitems__`` fetches a whole batch of rows in one read per split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from actfmt.dataset import Split, as_locations
from actfmt.dataset import open as open_split
from actfmt.storage import PathLike

__all__ = ["ActivationDataset"]


class ActivationDataset(Dataset):
    """Rows of one layer from one or more splits, each yielded as ``(x, label)``.

    ``labels``: one label per split (default: the split's position, so EM/Neutral become 0/1), or one
    label per row of each split (a sequence of sequences / tensors).
    """

    def __init__(
        self, splits: Sequence[PathLike | Split], layer: int, labels: Sequence[Any] | None = None
    ) -> None:
        self.paths = as_locations(splits)
        self.layer = layer
        self._splits: list[Split] | None = None
        sizes = []
        for p in self.paths:
            with open_split(p) as s:
                sizes.append(len(s.layer(layer)))
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
        return x, self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, Any]]:
        idx = np.asarray(indices, dtype=np.int64)
        splits = self._open()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        rows: list[torch.Tensor | None] = [None] * len(idx)
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            block = splits[k].layer(self.layer)[idx[sel] - self.offsets[k]]
            for j, s in enumerate(sel):
                rows[s] = block[j]
        return [(rows[j], self.labels[int(idx[j])]) for j in range(len(idx))]  # type: ignore[misc]

    def close(self) -> None:
        for s in self._splits or []:
            s.close()
        self._splits = None
