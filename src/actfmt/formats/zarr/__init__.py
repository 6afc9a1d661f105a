"""One split as one Zarr group (``EM`` -> ``EM.zarr``): Zarr v3 by default, v2 on request, on any storage.

Layout (the contract, readable by zarr-python, tensorstore and any Zarr v2/v3 reader):

* Group attributes: every key of the producer's metadata, verbatim and in order, then the ``actfmt`` block,
  written by ``finalize`` last (it holds ``complete: true``; until then the group has no ``actfmt`` key).
* Arrays ``layer_00`` ... of shape ``[total_examples, hidden_dim]``, chunks ``(chunk_rows, hidden_dim)`` (the
  full hidden dimension in every chunk), the default chunk key encoding with a ``.`` separator (v3 ``c.<i>.0``,
  v2 ``<i>.0``: every chunk a file of the array's directory, no directory per chunk to create), fill value 0
  (v2: null, which xarray does not take for a missing-value marker), C order, dimension names ``example`` /
  ``hidden`` (v3 ``dimension_names``, v2 the attribute ``_ARRAY_DIMENSIONS`` xarray reads).  float16 / float32
  are stored natively little-endian; bfloat16 as the ``bfloat16`` data type (zarr-extensions in v3, tensorstore's
  spelling in v2: the same little-endian bits as uint16), so tensorstore reads bfloat16 and zarr-python 3.1 /
  xarray refuse the array rather than show integers (stores of earlier versions, uint16 + ``actfmt_dtype``,
  are read too).  Every array carries the attribute ``actfmt_dtype`` (``"bfloat16"``, ...) and, when the
  source was sharded, ``actfmt_shard_rows``; the actfmt block records the dtypes too (``dtype``).
* Coordinate arrays ``example`` (0 .. rows-1) and ``hidden`` (0 .. hidden_dim-1), int64, one chunk each.
* Consolidated metadata, written by ``finalize`` after the actfmt block, for stores without a bfloat16 layer
  (zarr-python could not parse it, and would then not open the group at all): v3 inline in ``zarr.json``, v2
  ``.zmetadata``, in name order, so ``xr.open_zarr`` lists the layers in order and gives no warning.
* Only standard codecs: v3 ``bytes`` (little) + ``blosc`` / ``zstd`` / ``gzip``; v2 the same numcodecs ids.
  Every chunk is whole: the edge chunk is padded to the full chunk.

Compression names (:mod:`~actfmt.formats.zarr.codecs`): ``blosc-zstd`` (default: zstd level 1, byte shuffle,
512 KiB blosc blocks), ``none``, ``zstd``, ``lz4`` (blosc-lz4 + bitshuffle), ``gzip``; ``level`` overrides the
level.  Default ``chunk_rows``: the largest power of two whose chunk holds at most 2 MiB (256 rows at
4096 x bf16; 4 MiB uncompressed: its rows are read by offset whatever the chunk size, and fewer, larger chunks
are fewer files to write), capped at the layer's rows.

Neither the writer (:mod:`~actfmt.formats.zarr.writer`) nor the reader (:mod:`~actfmt.formats.zarr.reader`)
needs zarr-python: the metadata documents are written and parsed by :mod:`~actfmt.formats.zarr.meta`, chunks are
encoded and decoded with numcodecs and moved through :mod:`actfmt.storage` (one code path for a local
directory and object storage).  Only a store with codecs actfmt does not write (sharding, filters...) is read
through zarr-python.
"""

from __future__ import annotations

from collections.abc import Sequence

from actfmt.formats.base import Format
from actfmt.formats.zarr.codecs import COMPRESSIONS
from actfmt.formats.zarr.meta import probe_group
from actfmt.formats.zarr.options import ZarrOptions
from actfmt.formats.zarr.reader import ZarrReader
from actfmt.formats.zarr.writer import ZarrWriter, default_chunk_rows
from actfmt.storage import Entry, Location

__all__ = ["COMPRESSIONS", "ZarrFormat", "ZarrOptions", "ZarrReader", "ZarrWriter", "default_chunk_rows"]


class ZarrFormat(Format):
    reader = ZarrReader
    writer = ZarrWriter
    name = "zarr"
    suffixes = (".zarr",)
    compressions = COMPRESSIONS
    options_class = ZarrOptions
    remote_read = True
    remote_write = True
    parallel_layers = True

    looks_like = "a .zarr group"

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        """A directory holding a v3 group's ``zarr.json`` (``node_type`` not ``array``; a damaged one still
        counts: the reader says what is wrong) or a v2 ``.zgroup``.  zarr-python is not imported."""
        return entries is not None and probe_group(location, entries) is not None
