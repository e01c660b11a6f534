"""Large updates in chunks: an UPDATE larger than :data:`CHUNK_BYTES` travels as a header (the
UPDATE, with ``"chunks": n`` and no arrays) and ``n`` UPDATE_CHUNK messages, each one frame of at
most :data:`CHUNK_BYTES`, in order.

So no message the server receives from a client is larger than a chunk (or a small update): the
server's per-connection receive budget (wire/transport.py: ``MAXMSGSIZE`` and the receive guard)
is a chunk, not a model, and what libzmq buffers for a connection is bounded by its receive
high-water mark in chunks. The receiver copies each chunk into the update's one buffer, allocated
when the upload starts (only for a client granted an upload slot, federation/uploads.py), and frees
the chunk; the update's arrays are views of that buffer.

Chunks never span arrays: array ``i`` of ``b_i`` bytes is chunks of :data:`CHUNK_BYTES` and a last
one of the rest (an empty array is one empty chunk), array after array. Sender and receiver derive
the same list from the update's array specs, so a chunk out of order, missing, repeated or of the
wrong size is refused by its index and length alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 16 * 1024 * 1024

ArraySpec = tuple[str, tuple[int, ...]]


class ChunkError(ValueError):
    """A chunk that does not fit its upload; the message says how."""


@dataclass(frozen=True)
class Chunk:
    array: int  # which array of the update
    offset: int  # byte offset in it
    size: int  # bytes


def array_bytes(spec: ArraySpec) -> int:
    dtype, shape = spec
    return np.dtype(dtype).itemsize * math.prod(shape)


def chunk_plan(specs: Sequence[ArraySpec], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The chunks of an update whose arrays are ``specs``, in the order they travel."""
    chunks = []
    for index, spec in enumerate(specs):
        size = array_bytes(spec)
        for offset in range(0, max(size, 1), chunk_bytes):
            chunks.append(Chunk(index, offset, min(chunk_bytes, size - offset)))
    return chunks


def needs_chunks(specs: Sequence[ArraySpec], chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Whether an update of ``specs`` must travel in chunks (it is larger than one)."""
    return sum(array_bytes(spec) for spec in specs) > chunk_bytes


def split(arrays: Sequence[np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> list[memoryview]:
    """The chunks of ``arrays`` as read-only views (nothing is copied)."""
    views = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays]
    specs = [(a.dtype.str, a.shape) for a in arrays]
    return [views[c.array][c.offset:c.offset + c.size].toreadonly() for c in chunk_plan(specs, chunk_bytes)]


class Assembly:
    """One update arriving in chunks: its buffer (allocated here, once), the next chunk it takes,
    and, once complete, its arrays."""

    def __init__(self, specs: Sequence[ArraySpec], chunk_bytes: int = CHUNK_BYTES):
        self.specs = [(str(dtype), tuple(shape)) for dtype, shape in specs]
        self.plan = chunk_plan(self.specs, chunk_bytes)
        self._buffers = [np.empty(array_bytes(spec), np.uint8) for spec in self.specs]
        self.next = 0

    @property
    def count(self) -> int:
        return len(self.plan)

    @property
    def complete(self) -> bool:
        return self.next == len(self.plan)

    def add(self, index: int, data: object) -> bool:
        """Take chunk ``index`` (its bytes: any buffer); whether the update is now complete."""
        if self.complete:
            raise ChunkError(f"chunk {index} arrived after the update's {self.count} chunks")
        if index != self.next:
            raise ChunkError(f"chunk {index} arrived where chunk {self.next} of {self.count} was due "
                             f"(out of order, repeated or one missing)")
        chunk = self.plan[index]
        view = memoryview(data).cast("B")
        if len(view) != chunk.size:
            raise ChunkError(f"chunk {index} has {len(view)} bytes; it must have {chunk.size}")
        self._buffers[chunk.array][chunk.offset:chunk.offset + chunk.size] = np.frombuffer(view, np.uint8)
        self.next += 1
        return self.complete

    def arrays(self) -> list[np.ndarray]:
        """The update's arrays, views of the buffer (once complete)."""
        if not self.complete:
            raise ChunkError(f"the update is not complete: {self.next} of {self.count} chunks arrived")
        return [buffer.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)
                for buffer, (dtype, shape) in zip(self._buffers, self.specs)]
