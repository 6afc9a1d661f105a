"""The dtypes of a split: what each is stored as (bfloat16 as its ``uint16`` bits, numpy having none), its torch
spelling, and the row blocks handed between readers and writers (stored-dtype arrays, torch tensors).

This module imports neither torch nor numpy at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

__all__ = [
    "ITEMSIZE",
    "STORED",
    "as_array",
    "dtype_name",
    "scratch",
    "stored_dtype",
    "to_torch",
    "torch_dtype",
]

#: Stored numpy dtype of each supported dtype (little-endian; bfloat16 as its bits).
STORED = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def stored_dtype(name: str) -> np.dtype:
    """The numpy dtype a layer of dtype ``name`` is stored and handed around as (bfloat16: ``<u2``)."""
    import numpy as np

    try:
        return np.dtype(STORED[name])
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; actfmt stores {', '.join(STORED)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array as a torch tensor of its real dtype, sharing memory (bfloat16 bits viewed back)."""
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def scratch(out: np.ndarray | None, rows: int, hidden: int, dtype: np.dtype) -> np.ndarray:
    """A ``[rows, hidden]`` array of ``dtype``: a view of the caller's buffer ``out`` (any C-contiguous array of
    enough bytes: conversions reuse two buffers instead of faulting in fresh pages for every block), else new."""
    import numpy as np

    if out is not None:
        flat = out.reshape(-1).view(np.uint8)
        n = rows * hidden * dtype.itemsize
        if flat.size >= n:
            return flat[:n].view(dtype).reshape(rows, hidden)
    return np.empty((rows, hidden), dtype=dtype)


def as_array(data: Any, dtype: str) -> np.ndarray:
    """A row block as a C-contiguous array of the stored dtype: a numpy array as is (bits reinterpreted when
    needed), a torch tensor without a copy when it is contiguous."""
    import numpy as np

    want = stored_dtype(dtype)
    if type(data).__module__.startswith("torch"):
        import torch

        t = data.detach()
        if dtype_name(t.dtype) != dtype:
            raise ValueError(f"a {dtype_name(t.dtype)} block for a {dtype} layer")
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return np.ascontiguousarray(t.numpy()).view(want)
    arr = np.ascontiguousarray(data)
    if arr.dtype != want:
        if arr.dtype.itemsize != want.itemsize or arr.dtype.kind not in "fiu":
            raise ValueError(f"a {arr.dtype} block for a {dtype} layer (stored as {want})")
        arr = arr.view(want)
    return arr
