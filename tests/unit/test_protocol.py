"""The wire protocol: every message type round-trips; every malformed message is rejected with its reason."""

import json

import numpy as np
import pytest

from pyfed.wire import protocol
from pyfed.wire.protocol import Limits, Message, MessageType, ProtocolError, decode, encode

pytestmark = pytest.mark.unit

WEIGHTS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0.5, -1.5, 2.0], dtype=np.float32)]
SPECS = protocol.array_specs(WEIGHTS)
PLAN = {"epochs": 2, "batch_size": 16, "learning_rate": 0.01}
RUN = "0123456789abcdef"
KEY = protocol.b64(bytes(range(32)))
SHARE = protocol.b64(bytes(66))
BOX = protocol.b64(bytes(288))
SIGNATURE = protocol.b64(bytes(64))

EXAMPLES = {
    MessageType.JOIN: Message(MessageType.JOIN, client_id="site-a", body={"num_examples": 450, "wants_shard": False}),
    MessageType.WELCOME: Message(MessageType.WELCOME, round=0, client_id="client-1", arrays=WEIGHTS,
                                 body={"model_json": '{"class_name": "Sequential"}',
                                       "compile_config": {"loss": "mse"}, "plan": PLAN, "rounds": 3,
                                       "shard": "client-1.npz"}),
    MessageType.FIT: Message(MessageType.FIT, round=2, arrays=WEIGHTS,
                             body={"plan": {**PLAN, "proximal_mu": 0.1, "eval_fraction": 0.2}, "attempt": 1, "run": RUN}),
    MessageType.EVALUATE: Message(MessageType.EVALUATE, round=2, arrays=WEIGHTS, body={"run": RUN}),
    MessageType.EVALUATION: Message(MessageType.EVALUATION, round=2, client_id="client-1",
                                    body={"num_examples": 90, "loss": 0.4, "accuracy": None}),
    MessageType.UPDATE: Message(MessageType.UPDATE, round=2, client_id="client-1", arrays=WEIGHTS,
                                body={"attempt": 1, "num_examples": 450, "fit_s": 1.25,
                                      "history": {"loss": [0.9, 0.5], "accuracy": [0.7, None]}}),
    MessageType.STATS: Message(MessageType.STATS, body={"run": RUN, "kind": "features"}),
    MessageType.MOMENTS: Message(MessageType.MOMENTS, client_id="client-1",
                                 body={"count": 450, "mean": [1000.5, 0.1], "m2": [4.5e7, 0.0]}),
    MessageType.FINISH: Message(MessageType.FINISH, round=3, body={"reason": "the run is complete"}),
    MessageType.STOPPING: Message(MessageType.STOPPING, round=2, body={"reason": "SIGTERM"}),
    MessageType.ERROR: Message(MessageType.ERROR, body={"code": "id_taken", "reason": "client id taken"}),
    MessageType.LEAVE: Message(MessageType.LEAVE, client_id="client-1", body={"reason": "shutting down"}),
    MessageType.UPLOAD_READY: Message(MessageType.UPLOAD_READY, round=2, client_id="client-1",
                                      body={"attempt": 1, "bytes": 4096}),
    MessageType.UPLOAD_GRANT: Message(MessageType.UPLOAD_GRANT, round=2, body={"attempt": 1}),
    MessageType.UPDATE_CHUNK: Message(MessageType.UPDATE_CHUNK, round=2, client_id="client-1",
                                      arrays=[np.arange(16, dtype=np.uint8)], body={"attempt": 1, "index": 3}),
    MessageType.SECAGG_KEYS: Message(MessageType.SECAGG_KEYS, round=2, client_id="client-1",
                                     body={"attempt": 1, "mask_key": KEY, "share_key": KEY, "sign_key": KEY,
                                           "commitment": KEY, "num_examples": 450, "signature": SIGNATURE}),
    MessageType.SECAGG_ROSTER: Message(MessageType.SECAGG_ROSTER, round=2,
                                       body={"attempt": 1, "roster": {"client-1": [KEY, KEY, KEY], "site-b": [KEY, KEY, KEY]}}),
    MessageType.SECAGG_SHARES: Message(MessageType.SECAGG_SHARES, round=2, client_id="client-1",
                                       body={"attempt": 1, "boxes": {"site-b": BOX}}),
    MessageType.SECAGG_BOXES: Message(MessageType.SECAGG_BOXES, round=2, body={"attempt": 1, "boxes": {"site-b": BOX}}),
    MessageType.SECAGG_MASKED: Message(MessageType.SECAGG_MASKED, round=2, client_id="client-1",
                                       arrays=[np.arange(16, dtype=np.uint32)],
                                       body={"attempt": 1, "fit_s": 1.5, "history": {"loss": [0.3]}}),
    MessageType.SECAGG_UNMASK: Message(MessageType.SECAGG_UNMASK, round=2,
                                       body={"attempt": 1, "survivors": ["client-1", "site-b"], "dropped": []}),
    MessageType.SECAGG_REVEAL: Message(MessageType.SECAGG_REVEAL, round=2, client_id="client-1",
                                       body={"attempt": 1, "shares": {"client-1": ["b", SHARE, SIGNATURE],
                                                                      "site-c": ["s", SHARE, SIGNATURE]}}),
}


def header_of(frames):
    return json.loads(bytes(frames[0]))


def reframe(frames, **changes):
    """The frames with header fields replaced (None deletes a field)."""
    header = header_of(frames)
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    return [json.dumps(header).encode(), *frames[1:]]


@pytest.mark.parametrize("kind", list(MessageType))
def test_every_message_type_round_trips(kind):
    original = EXAMPLES[kind]
    decoded = decode(encode(original), expected_arrays=SPECS if original.arrays else None)
    assert decoded.type is kind
    assert decoded.round == original.round
    assert decoded.client_id == original.client_id
    assert decoded.body == original.body
    assert len(decoded.arrays) == len(original.arrays)
    for got, want in zip(decoded.arrays, original.arrays):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_every_message_type_has_an_example():
    assert set(EXAMPLES) == set(MessageType)


def test_arrays_are_zero_copy_views_of_the_frames():
    frames = encode(EXAMPLES[MessageType.FIT])
    buffers = [bytearray(f) for f in frames]
    decoded = decode(buffers)
    buffers[1][:4] = np.float32(42.0).tobytes()
    assert decoded.arrays[0][0, 0] == 42.0  # the array reads the frame's memory: no copy was made
    assert not decoded.arrays[0].flags.writeable or decoded.arrays[0].base is not None


def test_sending_does_not_copy_contiguous_arrays():
    frames = encode(EXAMPLES[MessageType.FIT])
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), WEIGHTS[0])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint32", "bool"])
def test_allowed_dtypes_round_trip(dtype):
    array = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    decoded = decode(encode(Message(MessageType.FIT, round=1, body={"plan": PLAN, "attempt": 1, "run": RUN}, arrays=[array])))
    assert decoded.arrays[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded.arrays[0], array)


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian_contiguous():
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    decoded = decode(encode(Message(MessageType.FIT, round=1, body={"plan": PLAN, "attempt": 1, "run": RUN}, arrays=[big, strided])))
    np.testing.assert_array_equal(decoded.arrays[0], big)
    np.testing.assert_array_equal(decoded.arrays[1], strided)


def test_zero_size_and_scalar_arrays():
    arrays = [np.zeros((0, 4), np.float32), np.array(3.5, np.float64)]
    decoded = decode(encode(Message(MessageType.FIT, round=1, body={"plan": PLAN, "attempt": 1, "run": RUN}, arrays=arrays)))
    assert decoded.arrays[0].shape == (0, 4)
    assert decoded.arrays[1].shape == () and decoded.arrays[1] == 3.5


def test_encode_refuses_a_disallowed_dtype_and_a_bad_body():
    with pytest.raises(ProtocolError, match="not allowed"):
        encode(Message(MessageType.FIT, round=1, body={"plan": PLAN, "attempt": 1, "run": RUN}, arrays=[np.array(["a"])]))
    with pytest.raises(ProtocolError, match="lacks required field 'plan'"):
        encode(Message(MessageType.FIT, round=1, body={}))


UPDATE = encode(EXAMPLES[MessageType.UPDATE])


@pytest.mark.parametrize("frames, reason", [
    ([], "empty message"),
    ([b"\xff\xfe garbage"], "not valid UTF-8 JSON"),
    ([b"{not json"], "not valid UTF-8 JSON"),
    ([b"[1, 2, 3]"], "must be a JSON object"),
    ([b'{"v": 1, "type": "fit", "round": 1, "body": {"plan": {"epochs": NaN}}}'], "not valid UTF-8 JSON"),
    ([b"[" * 100_000 + b"]" * 100_000], "nested too deeply|not valid"),
    ([b'{"v": 1, "type": "join", "round": ' + b"9" * 5000 + b"}"], "not valid UTF-8 JSON"),
    (reframe(UPDATE, v=1), "unsupported protocol version '1'; this peer speaks 3"),
    (reframe(UPDATE, v=None), "unsupported protocol version"),
    (reframe(UPDATE, v="1"), "unsupported protocol version"),
    (reframe(UPDATE, type="steal"), "unknown message type 'steal'"),
    (reframe(UPDATE, type=7), "unknown message type"),
    (reframe(UPDATE, round=-1), "header.round must be an integer"),
    (reframe(UPDATE, round=1.5), "header.round must be an integer"),
    (reframe(UPDATE, round=True), "header.round must be an integer"),
    (reframe(UPDATE, round=2**40), "header.round must be an integer"),
    (reframe(UPDATE, client_id="../../etc/passwd"), "header.client_id"),
    (reframe(UPDATE, client_id=5), "header.client_id"),
    (reframe(UPDATE, client_id="x" * 65), "header.client_id"),
    (reframe(UPDATE, extra=1), "unknown field"),
    (reframe(UPDATE, body=[]), "body must be an object"),
    (reframe(UPDATE, body={"attempt": 1, "fit_s": 1.0, "history": {}}), "lacks required field 'num_examples'"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 0, "fit_s": 1.0, "history": {}}), r"num_examples must be an integer in \[1"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": "10", "fit_s": 1.0, "history": {}}), "num_examples must be an integer in"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": -1.0, "history": {}}), "fit_s must be a number in"),
    ([bytes(UPDATE[0]).replace(b'"fit_s":1.25', b'"fit_s":1e400'), *UPDATE[1:]], "fit_s must be a number in"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": 1.0, "history": {"loss": "low"}}), "must be a list"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": 1.0, "history": {"loss": [1, "x"]}}), "not a finite number"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": 1.0, "history": {"bad name!": [1]}}), "metric name"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": 1.0, "history": {}, "pwn": 1}), "unknown field"),
    (reframe(UPDATE, arrays={}), "header.arrays must be a list"),
    (reframe(UPDATE, type="join", arrays=[], body={"wants_shard": "yes"}), "wants_shard must be true or false"),
    (reframe(UPDATE, arrays=[["float32"]]), r"must be \[dtype, shape\]"),
    (reframe(UPDATE, arrays=[["object", [3, 4]], ["float32", [3]]]), "dtype 'object' is not allowed"),
    (reframe(UPDATE, arrays=[["float32", [3, -4]], ["float32", [3]]]), "must hold non-negative integers"),
    (reframe(UPDATE, arrays=[["float32", "3x4"], ["float32", [3]]]), "shape must be a list"),
    (reframe(UPDATE, arrays=[["float32", [1] * 9], ["float32", [3]]]), "at most 8 sizes"),
    (reframe(UPDATE, arrays=[["float32", [3, 4]]]), "lists 1 arrays but 2 array frames"),
    (UPDATE[:2], "lists 2 arrays but 1 array frames"),
    ([*UPDATE, b"extra"], "lists 2 arrays but 3 array frames"),
    ([UPDATE[0], UPDATE[1][:-4], UPDATE[2]], "declares float32\\[3, 4\\] = 48 bytes but its frame has 44"),
    ([UPDATE[0], UPDATE[1], bytes(UPDATE[2]) + b"\0" * 4], "= 12 bytes but its frame has 16"),
    (reframe(UPDATE, type="fit", body={"plan": {**PLAN, "proximal_mu": -1}, "attempt": 1, "run": RUN}),
     "proximal_mu must be a number in"),
    (reframe(UPDATE, type="fit", body={"plan": {**PLAN, "eval_fraction": 0.95}, "attempt": 1, "run": RUN}),
     "eval_fraction must be a number in"),
    (reframe(UPDATE, type="fit", body={"plan": PLAN}), "lacks required field 'attempt'"),
    (reframe(UPDATE, body={"attempt": 0, "num_examples": 10, "fit_s": 1.0, "history": {}}), r"attempt must be an integer in \[1"),
    (reframe(UPDATE, client_id="site-1\n"), "header.client_id"),
    (reframe(UPDATE, type="join", body={"num_examples": 5}), "a join message carries no arrays, but this one lists 2"),
    (reframe(UPDATE, type="evaluation", body={"num_examples": 5, "loss": 0.1, "accuracy": 0.5}),
     "an? evaluation message carries no arrays"),
    (reframe(UPDATE, body={"attempt": 1, "num_examples": 10, "fit_s": 1.0,
                           "history": {f"m{i}": [1] for i in range(33)}}), "at most 32 metrics"),
    (reframe(UPDATE, type="evaluation", arrays=[], body={"num_examples": 5, "loss": 0.1}),
     "lacks required field 'accuracy'"),
    (reframe(UPDATE, type="evaluation", arrays=[], body={"num_examples": 5, "loss": 0.1, "accuracy": 1.5}),
     "accuracy must be a number in"),
    (reframe(UPDATE, type="evaluate", body={"plan": PLAN, "run": RUN}), "unknown field"),
    (reframe(UPDATE, type="fit", body={"plan": PLAN, "attempt": 1, "run": "NOT-HEX"}), "run must be 8-64 lowercase hex"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, expected_arrays=SPECS)


@pytest.mark.parametrize("arrays, reason", [
    ([WEIGHTS[0]], "expected 2 arrays"),
    ([WEIGHTS[0], WEIGHTS[1], WEIGHTS[1]], "expected 2 arrays"),
    ([WEIGHTS[0].reshape(4, 3), WEIGHTS[1]], r"array 0 has shape \[4, 3\]; the model's is \[3, 4\]"),
    ([WEIGHTS[0].astype(np.float64), WEIGHTS[1]], "array 0 has dtype float64; the model's is float32"),
])
def test_updates_must_match_the_model(arrays, reason):
    message = Message(MessageType.UPDATE, round=1, arrays=arrays,
                      body={"attempt": 1, "num_examples": 1, "fit_s": 0.1, "history": {}})
    with pytest.raises(ProtocolError, match=reason):
        decode(encode(message), expected_arrays=SPECS)


def test_limits_bound_header_array_count_and_sizes():
    frames = encode(EXAMPLES[MessageType.UPDATE])
    with pytest.raises(ProtocolError, match="header is .* bytes; at most 10"):
        decode(frames, limits=Limits(max_header_bytes=10))
    with pytest.raises(ProtocolError, match="lists 2 arrays; at most 1"):
        decode(frames, limits=Limits(max_arrays=1))
    with pytest.raises(ProtocolError, match="declares 48 bytes; at most 40"):
        decode(frames, limits=Limits(max_array_bytes=40))
    with pytest.raises(ProtocolError, match="declares 60 bytes of arrays; at most 50"):
        decode(frames, limits=Limits(max_total_bytes=50))
    huge = reframe(frames, arrays=[["float64", [2**30, 2**30]], ["float32", [3]]])
    with pytest.raises(ProtocolError, match="at most"):
        decode(huge)  # the declared size is refused before any frame is looked at


def test_check_finite_refuses_nan_and_inf():
    protocol.check_finite(WEIGHTS)
    protocol.check_finite([np.array([1, 2], np.int32)])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ProtocolError, match="array 1 holds NaN or Inf"):
            protocol.check_finite([WEIGHTS[0], np.array([1.0, bad], np.float32)])


def test_max_frame_bytes_covers_the_largest_array_and_the_header():
    overhead = protocol.FRAME_OVERHEAD_BYTES  # a CurveZMQ box around each frame
    assert protocol.max_frame_bytes(SPECS, Limits(max_header_bytes=10)) == 48 + overhead
    assert protocol.max_frame_bytes(SPECS, Limits(max_header_bytes=1000)) == 1000 + overhead
    # under secure aggregation a masked input holds every float of the model, and the weight, in one frame
    assert protocol.max_frame_bytes(SPECS, Limits(max_header_bytes=10), secure_aggregation=True) == 8 * 16 + overhead


def test_client_limits_fit_a_real_update_and_refuse_a_long_history_before_parsing_it():
    limits = protocol.client_limits(SPECS, epochs=5)
    honest = Message(MessageType.UPDATE, round=1, client_id="a" * 64, arrays=WEIGHTS, body={
        "attempt": 2**31 - 1, "num_examples": 2**53, "fit_s": 1e9,
        "history": {f"metric_{i:02d}_{'x' * 54}": [-1.2345678901234567e-05] * 5 for i in range(32)}})
    decode(encode(honest), expected_arrays=SPECS, limits=limits)  # the largest honest header fits
    padded = Message(MessageType.UPDATE, round=1, arrays=WEIGHTS, body={
        "attempt": 1, "num_examples": 1, "fit_s": 1.0, "history": {f"m{i}": [0.5] * 10_000 for i in range(32)}})
    with pytest.raises(ProtocolError, match="header is .* bytes; at most"):
        decode(encode(padded), expected_arrays=SPECS, limits=limits)
    assert (limits.max_arrays, limits.max_total_bytes) == (2, 60)
    assert protocol.message_budget(limits) > limits.max_header_bytes + 60


def test_history_longer_than_the_plan_is_refused():
    protocol.check_history({"loss": [1.0, 0.5]}, epochs=2)
    with pytest.raises(ProtocolError, match="'loss' has 3 values but the plan trains 2 epochs"):
        protocol.check_history({"loss": [1.0, 0.5, 0.2]}, epochs=2)


@pytest.mark.parametrize("value, ok", [("site-1", True), ("a" * 64, True), ("site-1\n", False), ("a" * 65, False),
                                       ("-lead", False), ("", False), ("x y", False), (7, False)])
def test_client_ids_match_in_full(value, ok):
    assert protocol.is_client_id(value) is ok
    assert protocol.is_shard_name("client-1.npz") and not protocol.is_shard_name("client-1.npz\n")


def test_errors_carry_a_known_code_and_a_trimmed_reason():
    decoded = decode(protocol.encode_error(protocol.ErrorCode.BUSY, "y" * 5000))
    assert decoded.type is MessageType.ERROR and decoded.body["code"] is protocol.ErrorCode.BUSY
    assert len(decoded.body["reason"]) == 2000
    with pytest.raises(ValueError):
        protocol.encode_error("no_such_code", "why")
    unknown = reframe(encode(EXAMPLES[MessageType.ERROR]), body={"code": "rm -rf", "reason": "x"})
    with pytest.raises(ProtocolError, match="code must be one of id_taken"):
        decode(unknown)


@pytest.mark.parametrize("shard", ["../etc/passwd.npz", "/data/client-1.npz", "client-1.npy", "a/b.npz", "..npz", ".hidden.npz", 5])
def test_a_welcome_cannot_point_a_client_outside_its_data_directory(shard):
    welcome = encode(EXAMPLES[MessageType.WELCOME])
    header = header_of(welcome)
    header["body"]["shard"] = shard
    with pytest.raises(ProtocolError, match="shard must be a bare file name ending in .npz"):
        decode([json.dumps(header).encode(), *welcome[1:]])


@pytest.mark.parametrize("kind, body, message", [
    (MessageType.SECAGG_KEYS, {"attempt": 1, "mask_key": "AAAA", "share_key": KEY}, "must be 32 bytes, got 3"),
    (MessageType.SECAGG_KEYS, {"attempt": 1, "mask_key": "not base64!", "share_key": KEY}, "not base64"),
    (MessageType.SECAGG_KEYS, {"attempt": 1, "mask_key": KEY * 3, "share_key": KEY}, "at most 32 bytes"),
    (MessageType.SECAGG_KEYS, {"attempt": 1, "mask_key": KEY, "share_key": KEY, "sign_key": KEY, "commitment": KEY,
                               "num_examples": 0, "signature": SIGNATURE}, "num_examples"),
    (MessageType.SECAGG_KEYS, {"attempt": 1, "mask_key": KEY, "share_key": KEY, "sign_key": KEY, "commitment": KEY,
                               "num_examples": 5, "signature": KEY}, "must be 64 bytes, got 32"),
    (MessageType.SECAGG_ROSTER, {"attempt": 1, "roster": {"../x": [KEY, KEY, KEY]}}, "not a client id"),
    (MessageType.SECAGG_ROSTER, {"attempt": 1, "roster": {"a": [KEY, KEY]}}, "must be a list of 3 values"),
    (MessageType.SECAGG_SHARES, {"attempt": 1, "boxes": {"a": protocol.b64(bytes(400))}}, "at most 360 bytes"),
    (MessageType.SECAGG_UNMASK, {"attempt": 1, "survivors": ["a", "a"], "dropped": []}, "names a client twice"),
    (MessageType.SECAGG_REVEAL, {"attempt": 1, "shares": {"a": ["x", SHARE, SIGNATURE]}}, "must be one of b, s"),
    (MessageType.SECAGG_REVEAL, {"attempt": 1, "shares": {"a": ["b", KEY, SIGNATURE]}}, "must be 66 bytes, got 32"),
    (MessageType.SECAGG_REVEAL, {"attempt": 1, "shares": {"a": ["b", SHARE]}}, "must be a list of 3 values"),
    (MessageType.FIT, {"plan": PLAN, "attempt": 1, "run": RUN,
                       "secagg": {"threshold": 1, "degree": 4, "quantisation_bits": 16, "ring_bits": 32, "clip": 1.0,
                                  "min_clients": 3}},
     "threshold"),
])
def test_malformed_secure_aggregation_bodies_are_refused_naming_the_field(kind, body, message):
    frames = [json.dumps({"v": protocol.PROTOCOL_VERSION, "type": kind.value, "round": 1, "client_id": "a",
                          "arrays": [], "body": body}).encode()]
    with pytest.raises(ProtocolError, match=message):
        decode(frames)


@pytest.mark.parametrize("arrays", [[], [np.zeros(4, np.float32)], [np.zeros((2, 2), np.uint32)],
                                    [np.zeros(4, np.uint32), np.zeros(4, np.uint32)]])
def test_a_masked_input_is_one_unsigned_vector(arrays):
    message = Message(MessageType.SECAGG_MASKED, round=1, client_id="a", arrays=arrays,
                      body={"attempt": 1, "fit_s": 0.1, "history": {}})
    with pytest.raises(ProtocolError, match="one vector of uint32 or uint64"):
        decode(encode(message))
    assert protocol.unb64(protocol.b64(b"\x00\xff")) == b"\x00\xff"


def test_a_batch_norm_stats_request_carries_the_model_and_names_its_layer():
    stats = Message(MessageType.STATS, round=3, arrays=WEIGHTS,
                    body={"run": RUN, "kind": "batch_norm", "layer": 1, "attempt": 2})
    decoded = decode(encode(stats), expected_arrays=SPECS)
    assert decoded.body["layer"] == 1 and decoded.body["attempt"] == 2
    assert all(np.array_equal(a, b) for a, b in zip(decoded.arrays, WEIGHTS))
    with pytest.raises(ProtocolError, match="names its layer and carries the weights"):
        decode(encode(Message(MessageType.STATS, arrays=WEIGHTS, body={"run": RUN, "kind": "batch_norm"})))
    with pytest.raises(ProtocolError, match="names its layer and carries the weights"):
        decode(encode(Message(MessageType.STATS, body={"run": RUN, "kind": "batch_norm", "layer": 0})))
    with pytest.raises(ProtocolError, match="expected 2 arrays"):
        decode(encode(Message(MessageType.STATS, arrays=WEIGHTS[:1], body={"run": RUN, "kind": "batch_norm",
                                                                           "layer": 0})), expected_arrays=SPECS)
    with pytest.raises(ProtocolError, match="for the features carries no arrays and names no layer"):
        decode(encode(Message(MessageType.STATS, arrays=WEIGHTS, body={"run": RUN, "kind": "features"})))
    with pytest.raises(ProtocolError, match="for the features carries no arrays and names no layer"):
        decode(encode(Message(MessageType.STATS, body={"run": RUN, "kind": "features", "layer": 0})))
    with pytest.raises(ProtocolError, match="a moments message carries no arrays"):
        decode(encode(Message(MessageType.MOMENTS, arrays=WEIGHTS, body={"count": 1, "mean": [0.0], "m2": [0.0]})))
