"""A shuffled training stream over one or more splits: :func:`stream`.

>>> s = actfmt.stream(["…/EM", "…/Neutral"], layers=15, batch_size=4096, seed=0)   # doctest: +SKIP
>>> for batch in s:                 # one epoch; the next ``for`` is the next epoch (a new order)
...     batch["x"], batch["index"], batch["label"]      # [4096, d] bf16, int64 rows, int64 split positions
>>> state = s.state_dict()          # after k batches; in a new process:
>>> s2 = actfmt.stream(...same arguments...); s2.load_state_dict(state)   # yields batch k+1, k+2, ...

**The order** is a pure function of ``(seed, epoch, the splits' geometry, block_rows, buffer_rows)``:

1. Every split is cut into *blocks* of ``block_rows`` consecutive rows, aligned to the store's chunks (a
   compressed chunk is never decoded twice).  The blocks of all splits are permuted with
   ``numpy.random.Generator(PCG64(seed + epoch))``.
2. The buffer holds ``W = buffer_rows // block_rows`` blocks.  Block ``j`` (in permuted order) has its rows
   permuted and dealt into ``W`` near-equal groups; group ``g`` goes to *slot* ``j + g``.  Slot ``s`` so holds a
   ``1/W`` share of each of the blocks ``s-W+1 .. s``, the blocks resident in the buffer while it is emitted;
   its rows are permuted once more.  (The first slot takes everything of the first ``W`` blocks that would go
   to earlier slots, the last one everything that would go to later ones, so the buffer is full at both ends.)
   The stream is the concatenation of the slots: every row exactly once per epoch, each batch drawn uniformly
   from the ``W`` blocks in the buffer.
3. Batches are consecutive slices of that global order.  A *step* takes ``batch_size * world_size`` rows;
   rank ``r`` takes the ``r``-th ``batch_size`` rows of it.  The global order does not depend on
   ``world_size``: a run resumed on another number of ranks continues the same sequence.

So the state is ``(epoch, position)`` -- rows of the epoch consumed -- and :meth:`Stream.load_state_dict`
jumps straight there: it recomputes the slot sizes (arithmetic, no data), and reads only the blocks resident at
that point.  Nothing is read from the start of the epoch.

**Reading**: two loader threads read whole blocks (``Reader.read_array`` of a row range: ``preadv`` into the
buffer for raw stores, chunk decoding straight into it otherwise) in the order the slots need them; an
assembler thread gathers each batch from the buffer with one ``numpy.take`` per batch (no Python work per
row, no OpenMP region) into output buffers recycled once the caller drops a batch, and puts it in a bounded
queue.

**Memory**: ``(W + span + 2)`` blocks of every requested layer (``span``: the blocks one batch can reach past
the buffer) plus the ``prefetch`` queue of batches.  More buffer, better mixing; see the README for figures.
"""

from __future__ import annotations

from actfmt.streaming.iterable import Stream, stream
from actfmt.streaming.plan import BLOCK_BYTES, BUFFER_BYTES, NORMALIZE, Geometry, Plan, StreamError
from actfmt.streaming.throughput import StreamReport, measure, mixing

__all__ = [
    "BLOCK_BYTES",
    "BUFFER_BYTES",
    "NORMALIZE",
    "Geometry",
    "Plan",
    "Stream",
    "StreamError",
    "StreamReport",
    "measure",
    "mixing",
    "stream",
]
