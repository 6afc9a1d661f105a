"""The zarr format's own write options."""

from __future__ import annotations

from dataclasses import dataclass, field

from actfmt.formats.options import FormatOptions

__all__ = ["ZarrOptions"]


@dataclass(frozen=True)
class ZarrOptions(FormatOptions):
    """``zarr_format``: the Zarr specification version written (3, or 2 for older readers)."""

    zarr_format: int = field(default=3, metadata={"help": "The Zarr version written", "choices": (2, 3)})
