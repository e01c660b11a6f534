"""Updates in chunks (wire/chunks.py, protocol.encode_update): the round trip, and every way a chunk
can fail to fit its upload."""

from __future__ import annotations

import numpy as np
import pytest

from pyfed.wire import protocol
from pyfed.wire.chunks import CHUNK_BYTES, Assembly, ChunkError, chunk_plan, needs_chunks, split
from pyfed.wire.protocol import Message, MessageType, ProtocolError

pytestmark = pytest.mark.unit

ARRAYS = [np.arange(25, dtype=np.float32).reshape(5, 5), np.zeros(0, np.float32), np.arange(7, dtype=np.int64),
          np.float16([1.5, -2.0, 3.25])]
SPECS = [(a.dtype.str, a.shape) for a in ARRAYS]


def test_chunks_never_span_arrays_and_cover_each_exactly():
    plan = chunk_plan(SPECS, 16)
    assert [(c.array, c.offset, c.size) for c in plan] == [
        (0, 0, 16), (0, 16, 16), (0, 32, 16), (0, 48, 16), (0, 64, 16), (0, 80, 16), (0, 96, 4),  # 100 bytes
        (1, 0, 0),  # an empty array is one empty chunk
        (2, 0, 16), (2, 16, 16), (2, 32, 16), (2, 48, 8),  # 56 bytes
        (3, 0, 6)]
    assert needs_chunks(SPECS, 16) and not needs_chunks(SPECS, 1000) and not needs_chunks(SPECS, 162)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 16, 100, 4096])
def test_split_and_assembled_give_the_arrays_back(chunk_bytes):
    pieces = split(ARRAYS, chunk_bytes)
    assembly = Assembly(SPECS, chunk_bytes)
    assert assembly.count == len(pieces)
    done = [assembly.add(index, piece) for index, piece in enumerate(pieces)]
    assert done == [False] * (len(pieces) - 1) + [True]
    for got, want in zip(assembly.arrays(), ARRAYS):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_split_copies_nothing():
    big = np.arange(1000, dtype=np.float32)
    piece = split([big], 400)[1]
    assert np.shares_memory(np.frombuffer(piece, np.uint8), big) and piece.readonly


def chunks_of(arrays, chunk_bytes=16):
    return split(arrays, chunk_bytes)


@pytest.mark.parametrize("sequence, message", [
    ([1], "chunk 1 arrived where chunk 0 of 13 was due"),                         # out of order
    ([0, 2], "chunk 2 arrived where chunk 1 of 13 was due"),                      # one missing
    ([0, 0], "chunk 0 arrived where chunk 1 of 13 was due"),                      # repeated
])
def test_chunks_out_of_order_missing_or_repeated_are_refused(sequence, message):
    pieces = chunks_of(ARRAYS)
    assembly = Assembly(SPECS, 16)
    with pytest.raises(ChunkError, match=message):
        for index in sequence:
            assembly.add(index, pieces[index])


@pytest.mark.parametrize("data, message", [
    (b"\0" * 17, "chunk 0 has 17 bytes; it must have 16"),  # oversized
    (b"\0" * 15, "chunk 0 has 15 bytes; it must have 16"),  # short
])
def test_a_chunk_of_the_wrong_size_is_refused(data, message):
    with pytest.raises(ChunkError, match=message):
        Assembly(SPECS, 16).add(0, data)


def test_a_chunk_after_the_last_and_arrays_before_the_last_are_refused():
    pieces = chunks_of(ARRAYS)
    assembly = Assembly(SPECS, 16)
    for index, piece in enumerate(pieces[:-1]):
        assembly.add(index, piece)
    with pytest.raises(ChunkError, match="12 of 13 chunks arrived"):
        assembly.arrays()
    assembly.add(12, pieces[12])
    with pytest.raises(ChunkError, match="after the update's 13 chunks"):
        assembly.add(13, b"")


def test_a_large_update_travels_as_its_header_and_chunks_that_decode_and_assemble():
    arrays = [np.random.default_rng(0).random((300, 10)).astype(np.float32), np.ones(10, np.float32)]
    update = Message(MessageType.UPDATE, round=3, client_id="site-1", arrays=arrays,
                     body={"attempt": 2, "num_examples": 10, "fit_s": 0.1, "history": {}})
    messages = protocol.encode_update(update, chunk_bytes=4096)
    head = protocol.decode(messages[0], expected_arrays=[(a.dtype.name, a.shape) for a in arrays])
    assert head.type is MessageType.UPDATE and head.arrays == [] and head.body["chunks"] == len(messages) - 1 == 4
    assembly = Assembly([(a.dtype.name, a.shape) for a in arrays], 4096)
    for frames in messages[1:]:
        chunk = protocol.decode(frames)
        assert chunk.type is MessageType.UPDATE_CHUNK and (chunk.round, chunk.body["attempt"]) == (3, 2)
        assembly.add(chunk.body["index"], chunk.arrays[0])
    assert all(np.array_equal(a, b) for a, b in zip(assembly.arrays(), arrays))
    small = Message(MessageType.UPDATE, round=3, client_id="site-1", arrays=[np.ones(3, np.float32)],
                    body={"attempt": 1, "num_examples": 1, "fit_s": 0.1, "history": {}})
    assert len(protocol.encode_update(small)) == 1  # below a chunk: one message, as always


def _with_body(frames, **body):
    import json
    head = json.loads(bytes(frames[0]))
    head["body"].update(body)
    return [json.dumps(head).encode(), *frames[1:]]


def _chunk(arrays, **body):
    return protocol.encode(Message(MessageType.UPDATE_CHUNK, round=1, client_id="site-1", arrays=arrays,
                                   body={"attempt": 1, "index": 0, **body}))


@pytest.mark.parametrize("frames, message", [
    (_chunk([np.zeros(4, np.float32)]), "an update_chunk carries one uint8 vector"),
    (_chunk([np.zeros(4, np.uint8), np.zeros(4, np.uint8)]), "an update_chunk carries one uint8 vector"),
    (_chunk([np.zeros((2, 2), np.uint8)]), "an update_chunk carries one uint8 vector"),
    (_chunk([]), "an update_chunk carries one uint8 vector"),
    (_with_body(_chunk([np.zeros(4, np.uint8)]), index=-1), "index must be an integer"),
    (protocol.encode(Message(MessageType.UPDATE, round=1, client_id="s", arrays=[np.zeros(3, np.float32)],
                             body={"attempt": 1, "num_examples": 1, "fit_s": 0.1, "history": {}, "chunks": 2})),
     "an update sent in chunks carries no arrays itself"),
])
def test_malformed_chunk_messages_are_refused(frames, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.decode(frames)


def test_an_oversized_chunk_message_is_refused():
    header = protocol.encode(Message(MessageType.UPDATE_CHUNK, round=1, client_id="s",
                                     arrays=[np.zeros(8, np.uint8)], body={"attempt": 1, "index": 0}))[0]
    import json
    head = json.loads(bytes(header))
    head["arrays"] = [["uint8", [CHUNK_BYTES + 1]]]
    with pytest.raises(ProtocolError):
        protocol.decode([json.dumps(head).encode(), bytes(CHUNK_BYTES + 1)],
                        limits=protocol.Limits(max_array_bytes=2 * CHUNK_BYTES, max_total_bytes=2 * CHUNK_BYTES))
