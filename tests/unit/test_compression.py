"""The update codecs: each round trip within its stated bound, top-k error feedback, malformed frames refused."""

import math

import numpy as np
import pytest

from pyfed.wire import compression
from pyfed.wire.compression import (INT8_BLOCK, CompressionError, ErrorFeedback, UpdateCompression, check, decode,
                                    encode, fold, frame_specs, topk_count)

pytestmark = pytest.mark.unit

SHAPES = [(3,), (64, 32), (INT8_BLOCK + 5,), (2, 3, 4, 5), (0,)]


def spec_of(array):
    return array.dtype.str.lstrip("<|="), array.shape


def delta(shape, seed=0, scale=0.01):
    return (np.random.default_rng(seed).normal(0, scale, shape)).astype(np.float32)


def round_trip(x, codec, fraction=0.01, seed=1):
    frames = encode(x, codec, np.random.default_rng(seed), fraction)
    spec = ("float32", x.shape)
    check(frames, codec, spec, fraction)
    return frames, decode(frames, codec, spec)


@pytest.mark.parametrize("shape", SHAPES)
def test_none_is_the_array_itself(shape):
    x = delta(shape)
    frames, back = round_trip(x, UpdateCompression.NONE)
    assert len(frames) == 1 and np.array_equal(back, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_is_within_half_precisions_relative_error(shape):
    x = delta(shape)
    frames, back = round_trip(x, UpdateCompression.FP16)
    assert frames[0].dtype == np.float16 and frames[0].nbytes == x.size * 2
    assert np.all(np.abs(back - x) <= 2.0**-11 * np.abs(x) + 6e-8)  # 6e-8: half precision's subnormal step


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_is_within_one_step_of_its_block_scale_and_unbiased(shape):
    x = delta(shape)
    frames, back = round_trip(x, UpdateCompression.INT8)
    q, scales = frames
    assert q.dtype == np.int8 and scales.size == -(-x.size // INT8_BLOCK)
    step = np.repeat(scales, INT8_BLOCK)[: x.size].reshape(shape)
    assert np.all(np.abs(back - x) <= step * (1 + 1e-6))
    if x.size > 1000:  # unbiased: the mean of many independent roundings approaches x
        mean = np.mean([round_trip(x, UpdateCompression.INT8, seed=s)[1] for s in range(64)], axis=0)
        assert np.abs(mean - x).mean() < np.abs(back - x).mean() / 4


def test_int8_cuts_bytes_about_four_fold():
    x = delta((5_402_010,))
    frames = encode(x, UpdateCompression.INT8, np.random.default_rng(0))
    assert x.nbytes / compression.encoded_bytes(frames) > 3.9


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_keeps_exactly_the_largest_elements(shape, fraction):
    x = delta(shape)
    frames, back = round_trip(x, UpdateCompression.TOPK, fraction)
    k = topk_count(x.size, fraction)
    assert frames[0].size == k and frames[0].dtype == np.uint32
    kept = np.flatnonzero(back.reshape(-1))
    if k:
        assert np.abs(x).reshape(-1)[kept].min() >= np.sort(np.abs(x).reshape(-1))[-k]
        assert np.array_equal(back.reshape(-1)[frames[0]], x.reshape(-1)[frames[0]])


def test_topk_at_one_percent_cuts_bytes_over_thirty_fold():
    x = delta((5_402_010,))
    frames = encode(x, UpdateCompression.TOPK, np.random.default_rng(0), 0.01)
    assert x.nbytes / compression.encoded_bytes(frames) > 30


def test_error_feedback_makes_the_sent_updates_add_up_to_the_true_ones():
    rng = np.random.default_rng(3)
    feedback, true_sum, sent_sum = ErrorFeedback(), np.zeros(1000), np.zeros(1000)
    gaps = []
    for round_ in range(200):
        x = rng.normal(0.0, 0.01, 1000).astype(np.float32) + 0.001  # a drift top-k alone would never send
        (frames,) = feedback.encode("run-1/site-1", [x], 0.05, rng)
        true_sum += x
        sent_sum += decode(frames, UpdateCompression.TOPK, ("float32", (1000,)))
        gaps.append(float(np.abs(true_sum - sent_sum).max()))
    # the gap is exactly the residual: bounded, while the sums grow without bound
    assert max(gaps[100:]) < 0.2 and np.abs(true_sum).mean() > 0.15
    assert np.allclose(true_sum - sent_sum, feedback._residual[0], atol=1e-4)  # noqa: SLF001


def test_error_feedback_starts_afresh_for_another_run_client_or_model():
    rng = np.random.default_rng(0)
    feedback = ErrorFeedback()
    x = np.ones(100, np.float32)
    feedback.encode("run-1/site-1", [x], 0.1, rng)
    assert np.abs(feedback._residual[0]).sum() == 90  # noqa: SLF001
    (frames,) = feedback.encode("run-2/site-1", [x], 0.1, rng)  # rejoined a new run: no old residual
    assert np.array_equal(frames[1], np.ones(10, np.float32))
    feedback.encode("run-2/site-1", [np.ones(50, np.float32)], 0.1, rng)  # another model
    assert feedback._residual[0].shape == (50,)  # noqa: SLF001


def test_integer_arrays_travel_as_they_are():
    counter = np.array([7, 8], np.int64)
    for codec in UpdateCompression:
        frames = encode(counter, codec, np.random.default_rng(0))
        assert len(frames) == 1 and frames[0] is counter
        check(frames, codec, ("int64", (2,)))


def test_fold_adds_the_weighted_decoded_array_to_the_running_sum_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(compression, "FOLD_CHUNK", 2 * INT8_BLOCK)  # several chunks
    x = delta((5 * INT8_BLOCK + 7,))
    for codec in (UpdateCompression.FP16, UpdateCompression.INT8, UpdateCompression.TOPK):
        frames = encode(x, codec, np.random.default_rng(0), 0.1)
        total = np.full(x.size, 1.0)
        fold(total, frames, codec, 3.0, np.empty(2 * INT8_BLOCK))
        assert np.allclose(total, 1.0 + 3.0 * decode(frames, codec, ("float32", x.shape)), atol=1e-6)


def bad(frames, codec, shape=(10, 10), fraction=0.1, match=""):
    with pytest.raises(CompressionError, match=match):
        check(frames, codec, ("float32", shape), fraction)


def test_malformed_frames_are_refused_naming_what_is_wrong():
    x = delta((10, 10))
    rng = np.random.default_rng(0)
    fp16 = encode(x, UpdateCompression.FP16, rng)
    int8 = encode(x, UpdateCompression.INT8, rng)
    topk = encode(x, UpdateCompression.TOPK, rng, 0.1)
    bad(fp16 + fp16, UpdateCompression.FP16, match="1 frame")
    bad([fp16[0].reshape(100)], UpdateCompression.FP16, match=r"needs float16\[10, 10\]")
    bad([x], UpdateCompression.FP16, match="got float32")
    bad([np.full((10, 10), np.inf, np.float16)], UpdateCompression.FP16, match="NaN or Inf")
    bad([int8[0]], UpdateCompression.INT8, match="2 frame")
    bad([int8[0], np.array([-1.0], np.float32)], UpdateCompression.INT8, match="negative")
    bad([int8[0], np.array([np.nan], np.float32)], UpdateCompression.INT8, match="NaN")
    bad([int8[0], np.array([3e38], np.float32)], UpdateCompression.INT8, match="beyond float32")
    bad([np.full((10, 10), -128, np.int8), int8[1]], UpdateCompression.INT8, match="-128")
    bad([int8[0], np.ones(2, np.float32)], UpdateCompression.INT8, match=r"float32\[1\]")
    bad([topk[0][:5], topk[1][:5]], UpdateCompression.TOPK, match=r"uint32\[10\]")  # k is fixed by the plan
    bad([topk[0].astype(np.int64), topk[1]], UpdateCompression.TOPK, match="uint32")
    outside = topk[0].copy()
    outside[-1] = 100
    bad([outside, topk[1]], UpdateCompression.TOPK, match="outside an array of 100")
    repeated = topk[0].copy()
    repeated[1] = repeated[0]
    bad([repeated, topk[1]], UpdateCompression.TOPK, match="strictly increasing")
    bad([topk[0][::-1].copy(), topk[1]], UpdateCompression.TOPK, match="strictly increasing")
    bad([topk[0], np.full(10, np.nan, np.float32)], UpdateCompression.TOPK, match="NaN")


def test_a_change_that_decodes_beyond_the_models_dtype_is_named_before_it_is_folded():
    """What an encoded change stands for (global + change) must be finite float32: the review's
    int8 scale of 3e38 is refused by the check; a scale just inside it or a top-k value that lands
    beyond float32 on a large global weight, by this scan, which names the element."""
    base = np.zeros(INT8_BLOCK + 10, np.float32)
    q = np.zeros(base.size, np.int8)
    q[INT8_BLOCK + 3] = 127
    scales = np.array([1.0, 2.6e36], np.float32)  # 127 * 2.6e36 = 3.3e38: within float32
    check([q, scales], UpdateCompression.INT8, ("float32", base.shape))
    assert compression.why_decoded_unusable(base, [q, scales], UpdateCompression.INT8) is None
    base[INT8_BLOCK + 3] = 3e37  # ... but not on top of this weight
    assert compression.why_decoded_unusable(base, [q, scales], UpdateCompression.INT8) == (
        f"element {INT8_BLOCK + 3} decodes to 3.6e+38, beyond float32")
    top = [np.array([2, INT8_BLOCK + 3], np.uint32), np.array([1.0, 3.3e38], np.float32)]
    assert compression.why_decoded_unusable(base, top, UpdateCompression.TOPK) == (
        f"element {INT8_BLOCK + 3} decodes to 3.6e+38, beyond float32")
    half = np.zeros(base.shape, np.float16)
    half[7] = 60000
    base[7] = np.finfo(np.float32).max  # half precision's largest change is lost in float32's largest value
    assert compression.why_decoded_unusable(base, [half], UpdateCompression.FP16) is None
    assert compression.why_decoded_unusable(np.zeros(3, np.float32), [np.zeros(3, np.float16)],
                                            UpdateCompression.FP16) is None


def test_what_cannot_be_encoded_is_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(CompressionError, match="beyond half precision"):
        encode(np.array([1e6], np.float32), UpdateCompression.FP16, rng)
    with pytest.raises(CompressionError, match="NaN or Inf"):
        encode(np.array([np.nan], np.float32), UpdateCompression.INT8, rng)
    with pytest.raises(CompressionError, match=r"fraction must be in \(0, 1\]"):
        topk_count(10, 0.0)


def test_the_frame_specs_are_what_the_encoder_makes():
    for shape in SHAPES:
        x = delta(shape)
        for codec in UpdateCompression:
            frames = encode(x, codec, np.random.default_rng(0), 0.05)
            assert [(f.dtype.name, f.shape) for f in frames] == [
                (np.dtype(d).name, tuple(s)) for d, s in frame_specs(codec, ("float32", shape), 0.05)]
    assert math.prod(frame_specs(UpdateCompression.TOPK, ("float32", (1000,)), 0.01)[0][1]) == 10


def test_an_encoded_update_folds_into_the_weighted_sum_as_its_decoded_weights_would():
    from pyfed.federation.aggregate import EncodedUpdate, WeightedSum
    from pyfed.wire.compression import split

    rng = np.random.default_rng(0)
    global_weights = [delta((64, 32), 1, 1.0), delta((32,), 2, 1.0), np.array([5, 6], np.int64)]
    specs = [spec_of(a) for a in global_weights]
    for codec in (UpdateCompression.FP16, UpdateCompression.INT8, UpdateCompression.TOPK):
        dense, encoded = WeightedSum(), WeightedSum()
        for client in range(3):
            trained = [g + delta(g.shape, 10 + client) if g.dtype.kind == "f" else g + client for g in global_weights]
            frames = [f for t, g in zip(trained, global_weights)
                      for f in encode(t - g if g.dtype.kind == "f" else t, codec, rng, 0.1)]
            update = EncodedUpdate(global_weights, split(frames, codec, specs, 0.1), codec)
            encoded.add(update, 10.0 + client)
            dense.add([update[i] for i in range(len(update))], 10.0 + client)
        for a, b in zip(encoded.mean(), dense.mean()):
            assert a.dtype == b.dtype and np.allclose(a, b, atol=1e-6)


def test_split_names_the_array_whose_frames_are_wrong():
    from pyfed.wire.compression import encoded_specs, split

    specs = [("float32", (4, 4)), ("int64", (2,)), ("float32", (8,))]
    frames = [np.zeros((4, 4), np.int8), np.ones(1, np.float32), np.zeros(2, np.int64),
              np.zeros(8, np.int8), np.ones(1, np.float32)]
    assert [(f.dtype.name, f.shape) for f in frames] == [
        (np.dtype(d).name, s) for d, s in encoded_specs(UpdateCompression.INT8, specs)]
    assert len(split(frames, UpdateCompression.INT8, specs)) == 3
    with pytest.raises(CompressionError, match=r"array 2: .*needs int8\[8\]"):
        split(frames[:3] + [np.zeros(8, np.float32), frames[4]], UpdateCompression.INT8, specs)
    with pytest.raises(CompressionError, match="is 5 frames, got 6"):
        split(frames + [frames[-1]], UpdateCompression.INT8, specs)


def test_a_broadcast_in_half_precision_decodes_to_the_models_dtypes_and_bad_ones_are_refused():
    from pyfed.wire.compression import BroadcastCompression, as_received, decode_broadcast, encode_broadcast

    weights = [delta((64, 32), 1, 1.0), np.array([3, 4], np.int64)]
    specs = [spec_of(a) for a in weights]
    sent = encode_broadcast(weights, BroadcastCompression.FP16)
    assert sent[0].dtype == np.float16 and sent[1] is weights[1]
    back = decode_broadcast(sent, "fp16", specs)
    assert back[0].dtype == np.float32 and np.allclose(back[0], weights[0], rtol=2.0**-11, atol=6e-8)
    assert all(np.array_equal(a, b) for a, b in zip(back, as_received(weights, "fp16")))
    assert encode_broadcast(weights, "none") == weights
    with pytest.raises(CompressionError, match=r"array 0: .*needs float16\[64, 32\]"):
        decode_broadcast([weights[0], weights[1]], "fp16", specs)
    with pytest.raises(CompressionError, match="expected 2 arrays"):
        decode_broadcast(sent[:1], "fp16", specs)
    with pytest.raises(CompressionError, match="array 0: fp16 values hold NaN"):
        decode_broadcast([np.full((64, 32), np.nan, np.float16), sent[1]], "fp16", specs)
    with pytest.raises(CompressionError, match="global array 0: .*beyond half precision"):
        encode_broadcast([np.array([1e6], np.float32)], "fp16")


def test_a_model_half_precision_cannot_hold_is_broadcast_as_it_is_saying_why():
    from pyfed.wire.compression import BroadcastCompression, as_received, broadcast

    small = [np.array([1.5, -2.0], np.float32)]
    arrays, used, why_not = broadcast(small, "fp16")
    assert used is BroadcastCompression.FP16 and arrays[0].dtype == np.float16 and why_not is None
    large = [np.array([1.5, 7e4], np.float32), np.array([3], np.int64)]
    arrays, used, why_not = broadcast(large, "fp16")
    assert used is BroadcastCompression.NONE and arrays[0] is large[0] and "beyond half precision" in why_not
    assert as_received(large, "fp16")[0] is large[0]  # an in-process client gets what the wire would carry
