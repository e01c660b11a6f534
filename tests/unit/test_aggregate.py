"""FedAvg arithmetic against hand-computed weighted means."""

import numpy as np
import pytest

from pyfed.federation.aggregate import WeightedSum, weighted_average
from pyfed.federation.strategy import FedAvg, FitResult, make_strategy
from pyfed.wire.protocol import FitPlan

pytestmark = pytest.mark.unit


def test_weighted_mean_matches_hand_computation_with_unequal_num_examples():
    a = [np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([10.0], np.float32)]
    b = [np.array([[3.0, 6.0], [9.0, 0.0]], np.float32), np.array([-2.0], np.float32)]
    c = [np.array([[0.0, 0.0], [0.0, 8.0]], np.float32), np.array([4.0], np.float32)]
    # weights 1, 3, 4 (total 8): e.g. first entry (1*1 + 3*3 + 4*0) / 8 = 1.25
    result = weighted_average([(a, 1), (b, 3), (c, 4)])
    np.testing.assert_allclose(result[0], [[1.25, 2.5], [3.75, 4.5]])
    np.testing.assert_allclose(result[1], [(10 - 6 + 16) / 8])


def test_equal_weights_give_the_plain_mean_and_one_update_is_returned_unchanged():
    arrays = [np.array([1.0, 5.0]), np.array([3.0, 7.0])]
    np.testing.assert_allclose(weighted_average([([arrays[0]], 7), ([arrays[1]], 7)])[0], [2.0, 6.0])
    np.testing.assert_array_equal(weighted_average([([arrays[0]], 123)])[0], arrays[0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_are_preserved_and_accumulated_precisely(dtype):
    a = np.full((4,), 1.0, dtype)
    b = np.full((4,), 2.0, dtype)
    result = weighted_average([([a], 1), ([b], 2)])[0]
    assert result.dtype == dtype
    np.testing.assert_allclose(result, np.full((4,), 5.0 / 3.0), rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_the_chunked_mean_is_the_float64_quotient_rounded_once_at_any_size():
    """Arrays smaller than, equal to and larger than one chunk (and empty ones) divide exactly as one
    float64 division cast to the array's dtype."""
    rng = np.random.default_rng(0)
    chunk = WeightedSum.CHUNK
    shapes = [(0,), (3, 0), (5,), (chunk,), (chunk + 7,), (3, chunk // 2 + 1)]
    updates = [([rng.normal(size=s).astype(np.float32) for s in shapes], n) for n in (96, 97, 95)]
    total = WeightedSum()
    for arrays, n in updates:
        total.add(arrays, n)
    exact = [(sum(np.float64(n) * a.astype(np.float64) for a, n in ((u[i], n) for u, n in updates))
              / np.float64(288)).astype(np.float32) for i in range(len(shapes))]
    result = total.mean()
    assert [r.shape for r in result] == shapes and all(r.dtype == np.float32 for r in result)
    assert all(np.array_equal(r, e) for r, e in zip(result, exact))


def test_integer_and_bool_arrays_are_rounded_back():
    ints = weighted_average([([np.array([1, 10], np.int32)], 1), ([np.array([2, 20], np.int32)], 3)])[0]
    assert ints.dtype == np.int32
    np.testing.assert_array_equal(ints, [2, 18])  # 1.75 -> 2, 17.5 -> 18 (round half to even)
    flags = weighted_average([([np.array([True, False])], 1), ([np.array([False, False])], 3)])[0]
    assert flags.dtype == bool
    np.testing.assert_array_equal(flags, [False, False])


def test_running_sum_does_not_keep_updates():
    total = WeightedSum()
    update = [np.ones((10, 10), np.float32)]
    total.add(update, 2)
    update[0][:] = 100.0  # mutating an update after adding it must not change the result
    total.add([np.zeros((10, 10), np.float32)], 2)
    np.testing.assert_allclose(total.mean()[0], 0.5)
    assert total.count == 2 and total.total_weight == 4


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_bad_weights_are_refused(weight):
    with pytest.raises(ValueError, match="weight must be a positive finite number"):
        WeightedSum().add([np.zeros(2)], weight)


def test_mismatched_updates_are_refused():
    total = WeightedSum()
    total.add([np.zeros(2), np.zeros(3)], 1)
    with pytest.raises(ValueError, match="expected 2 arrays, got 1"):
        total.add([np.zeros(2)], 1)
    with pytest.raises(ValueError, match="does not match"):
        total.add([np.zeros(2), np.zeros(4)], 1)


def test_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no updates"):
        WeightedSum().mean()


def test_fedavg_strategy_streams_results_and_selects_every_client():
    strategy = make_strategy("fedavg")
    assert isinstance(strategy, FedAvg)
    plan = FitPlan(epochs=2, batch_size=8, learning_rate=0.1)
    assert strategy.configure_fit(1, ["a", "b"], plan) == [("a", plan), ("b", plan)]
    aggregator = strategy.aggregator(1, [np.zeros(2)])
    aggregator.add(FitResult("a", [np.array([0.0, 4.0])], num_examples=3))
    aggregator.add(FitResult("b", [np.array([4.0, 0.0])], num_examples=1))
    np.testing.assert_allclose(aggregator.result()[0], [1.0, 3.0])
    assert strategy.state() == {}


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="unknown strategy 'fedfoo'; choose one of fedavg"):
        make_strategy("fedfoo")


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk"])
def test_the_clipped_change_is_folded_a_chunk_at_a_time_as_the_dense_change_would_be(codec):
    """What DP sums (each update's clipped change) from an update as it arrived, dense or encoded:
    the same norm and the same sum as the decoded update gives, with chunks smaller than the arrays."""
    from pyfed.federation.aggregate import EncodedUpdate, change_norm, fold_change, update_norm
    from pyfed.wire import compression
    from pyfed.wire.compression import UpdateCompression

    rng = np.random.default_rng(3)
    global_weights = [rng.normal(size=(70, 30)).astype(np.float32), np.arange(4, dtype=np.int64),
                      rng.normal(size=(1000,)).astype(np.float32)]
    trained = [global_weights[0] + rng.normal(0, 0.1, (70, 30)).astype(np.float32), global_weights[1] + 1,
               global_weights[2] + rng.normal(0, 0.1, 1000).astype(np.float32)]
    if codec == "none":
        update = trained
    else:
        frames = compression.encode_update(trained, global_weights, UpdateCompression(codec), rng, topk_fraction=0.1)
        specs = [(w.dtype.str.lstrip("<|="), w.shape) for w in global_weights]
        update = EncodedUpdate(global_weights, compression.split(frames, UpdateCompression(codec), specs, 0.1),
                               UpdateCompression(codec))
    dense = [np.asarray(update[i]) for i in range(3)]  # the update decoded, as before
    assert change_norm(update, global_weights) == pytest.approx(update_norm(dense, global_weights), rel=1e-6)
    totals = [np.zeros((70, 30)), None, np.ones(1000)]
    # dense: chunks of 128 elements; encoded: compression.fold's own chunks (test_compression.py)
    fold_change(totals, update, global_weights, 0.5, np.empty(128 if codec == "none" else compression.FOLD_CHUNK))
    np.testing.assert_allclose(totals[0], 0.5 * (dense[0].astype(np.float64) - global_weights[0]), atol=1e-6)
    np.testing.assert_allclose(totals[2], 1 + 0.5 * (dense[2].astype(np.float64) - global_weights[2]), atol=1e-6)
