"""One split as one HDF5 file (``EM`` -> ``EM.h5``), written with h5py and read with h5py or by byte offset.

Layout (the contract, readable by stock ``h5ls`` / ``h5dump`` / h5py):

* Root attributes, in the source's key order (``track_order=True``): every key of the producer's metadata.
  Strings, ints, floats and bools are stored as native HDF5 scalars; ``None``, lists and dicts as JSON strings.
  Because a JSON string and a real string look alike, the exact metadata (types, ``None``, nesting, key order)
  is also kept as one JSON string attribute ``actfmt_metadata`` (written at creation), and that is what
  :attr:`HDF5Reader.metadata` returns.  Files without it (written by other tools) fall back to the individual
  attributes.
* ``actfmt``: the actfmt block as a JSON string attribute, written by ``finalize`` last (``complete: true``);
  it also carries ``requires_plugins`` (``[]`` for files stock HDF5 reads; ``["hdf5plugin"]`` for the plugin
  codecs; ``["lzf"]`` for LZF, a filter h5py bundles but other HDF5 tools need as a plugin).
* Datasets ``layer_00`` ... of shape ``[total_examples, hidden_dim]``, chunked ``(chunk_rows, hidden_dim)``.
  float16 / float32 are stored native little-endian; bfloat16 as its ``<u2`` bits.  Each dataset carries
  ``actfmt_dtype`` (``"bfloat16"``, ...), a bfloat16 one ``actfmt_encoding`` (how to decode the bits), and, when
  the source was sharded, ``actfmt_shard_rows``.  Dimensions labelled ``example`` / ``hidden``, with the
  dimension scales ``/example`` and ``/hidden`` (int64 ``0 .. n-1``) attached.
* ``actfmt_stats`` (written by ``actfmt convert`` unless ``--no-stats``): datasets ``mean`` and ``std``
  (float32) and ``mean_f64`` (float64), ``[layers, hidden_dim]``, and the JSON attribute ``layers`` naming the
  layer of each row.
* Compression: ``gzip`` (the default: level 1 with the shuffle filter), ``none``, ``lzf``, and the plugin codecs
  ``zstd``, ``blosc-zstd`` and ``lz4`` (through ``hdf5plugin``).

Defaults: ``chunk_rows`` is the largest power of two with a chunk of at most 1 MiB, capped at the layer's rows
(small chunks keep single-row reads from a compressed file cheap); gzip level 1 + shuffle because shuffle is
what compresses bf16 (its exponent bytes) and higher levels buy a few percent for several times the time.

Writing (local files only: ``convert`` writes HDF5 into a local staging directory and uploads it):

* uncompressed, without ``--chunk-rows``: *contiguous* datasets whose file space is allocated (not written) when
  the file is created, so every layer's bytes have a known offset and are written there with ``pwrite`` or
  ``os.copy_file_range``, layers in parallel (:meth:`HDF5Format.writes_in_parallel`); HDF5 writes only the
  metadata.  A contiguous layer has no chunks, so a hole in it cannot be told from zeros by looking
  (``actfmt validate --deep`` compares it with the checksum recorded at conversion, ACT602);
* otherwise chunked: uncompressed and gzip blocks are stored as whole chunks with ``write_direct_chunk``
  (actfmt shuffles + deflates the chunks itself on a thread pool, as HDF5's filters would); ``block_rows``
  hands out chunk-aligned blocks of about 48 MiB; one writer at a time (HDF5 is the writer of the file).

Reading, locally (``h5py.File(path)``) or from object storage (h5py over a file object of the storage): an
uncompressed layer whose chunks are all stored raw (the writer lays them back to back, in a few runs between
HDF5's own metadata blocks) is read by byte offset through :class:`~actfmt.formats.rowstore.RowStore` -- ``preadv``
locally, concurrent ranged GETs remotely, and byte runs a writer may copy as is; other layers with
``read_direct`` (compressed ones through a 64 MiB chunk cache each, a few datasets open at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

from actfmt.formats.base import Format, WriteOptions
from actfmt.formats.hdf5.codecs import COMPRESSIONS
from actfmt.formats.hdf5.layout import HDF5_SIGNATURE, REMOTE_SUFFIXES, SIGNATURE_OFFSETS, default_chunk_rows
from actfmt.formats.hdf5.reader import HDF5Reader
from actfmt.formats.hdf5.writer import HDF5Writer
from actfmt.storage import Entry, Location

__all__ = ["COMPRESSIONS", "HDF5_SIGNATURE", "HDF5Format", "HDF5Reader", "HDF5Writer", "default_chunk_rows"]


class HDF5Format(Format):
    reader = HDF5Reader
    writer = HDF5Writer
    name = "hdf5"
    suffixes = REMOTE_SUFFIXES  # (".h5", ".hdf5"): .h5 written
    compressions = COMPRESSIONS
    remote_read = True
    remote_write = False  # convert writes into a local staging directory and uploads the file
    parallel_layers = False  # chunked: HDF5 is the one writer of the file
    # a second open of a file this process has open shares HDF5's one open file (its chunk index included), and
    # h5py's lock orders the reader's and the writer's calls: a finished layer is verified while the next is written
    reads_while_writing = True
    single_file = True

    @classmethod
    def writes_in_parallel(cls, options: WriteOptions) -> bool:
        """Contiguous (uncompressed) layers are written at their own offsets, by any number of writers."""
        return HDF5Writer.contiguous(options)

    looks_like = "a .h5 file"

    @classmethod
    def recognises(cls, location: Location, entries: Sequence[Entry] | None) -> bool:
        """A regular file with the HDF5 signature (at 0, or after a user block).  Locally the name does not
        matter; on object storage only ``*.h5`` / ``*.hdf5`` objects are probed (one ranged read each)."""
        if entries is not None:  # a listed directory is not a file
            return False
        if not location.is_local and location.suffix.lower() not in REMOTE_SUFFIXES:
            return False
        try:
            head = location.read_range(0, SIGNATURE_OFFSETS[-1] + len(HDF5_SIGNATURE))
        except OSError:  # missing, a directory, a FIFO (never opened), unreadable
            return False
        return any(head[o : o + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE for o in SIGNATURE_OFFSETS)
