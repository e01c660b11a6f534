"""Every strategy against hand-computed results on small arrays, and its state across a checkpoint."""

import math

import numpy as np
import pytest

from pyfed.federation.aggregate import adaptive_step, coordinate_median, krum_scores, krum_select, momentum_step, trimmed_mean
from pyfed.persistence.files import CheckpointError, load_state, save_state
from pyfed.federation.strategy import (STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedYogi,
                            FitPlan, FitResult, Krum, MultiKrum, Strategy, TrimmedMean, make_strategy)

pytestmark = pytest.mark.unit


def results_of(values, num_examples=None):
    """FitResults whose single array is ``[v]`` (float32), one per value."""
    num_examples = num_examples or [1] * len(values)
    return [FitResult(f"c{i}", [np.array([v], np.float32)], n) for i, (v, n) in enumerate(zip(values, num_examples))]


def aggregate(strategy, values, num_examples=None, global_value=0.0, server_round=1):
    """Run one round through the strategy's streaming/collecting aggregator, as the server does."""
    aggregator = strategy.aggregator(server_round, [np.array([global_value], np.float32)])
    for result in results_of(values, num_examples):
        aggregator.add(result)
        result.weights = ()  # the server releases each update's frames once it is added
    return float(aggregator.result()[0][0])


# --- FedAvg family ----------------------------------------------------------------------------

def test_fedavg_weights_by_num_examples():
    # (1*1 + 3*2 + 4*10) / (1 + 2 + 10) = 47 / 13
    assert aggregate(FedAvg(), [1.0, 3.0, 4.0], [1, 2, 10]) == pytest.approx(47 / 13)


def test_fedprox_aggregates_like_fedavg_and_sends_mu_in_the_plan():
    strategy = FedProx(proximal_mu=0.5)
    assert aggregate(strategy, [1.0, 3.0], [1, 3]) == pytest.approx(2.5)
    plan = FitPlan(epochs=2, learning_rate=0.01)
    assert strategy.configure_fit(1, ["a", "b"], plan) == [("a", FitPlan(2, 32, 0.01, proximal_mu=0.5)),
                                                           ("b", FitPlan(2, 32, 0.01, proximal_mu=0.5))]


def test_fedavgm_applies_server_momentum_across_rounds():
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    # round 1: w=1, mean=0.5 -> delta 0.5, v=0.5, w = 1 - 0.5 = 0.5
    assert aggregate(strategy, [0.0, 1.0], global_value=1.0) == pytest.approx(0.5)
    # round 2: w=0.5, mean=0.25 -> delta 0.25, v = 0.9*0.5 + 0.25 = 0.7, w = 0.5 - 0.7 = -0.2
    assert aggregate(strategy, [0.0, 0.5], global_value=0.5, server_round=2) == pytest.approx(-0.2)


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg():
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    assert aggregate(strategy, [1.0, 3.0, 4.0], [1, 2, 10], global_value=7.0) == pytest.approx(47 / 13, rel=1e-6)


@pytest.mark.parametrize("cls, v1", [
    (FedAdagrad, 1e-6 + 1.0),                  # v = tau^2 + delta^2
    (FedAdam, 0.99 * 1e-6 + 0.01 * 1.0),       # v = beta2 tau^2 + (1 - beta2) delta^2
    (FedYogi, 1e-6 + 0.01 * 1.0),              # v = tau^2 - (1 - beta2) delta^2 sign(tau^2 - delta^2)
])
def test_adaptive_strategies_first_step_by_hand(cls, v1):
    strategy = cls(server_learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # w = 0, mean of the clients = 1 -> delta = 1, m = 0.1
    expected = 0 + 0.1 * 0.1 / (math.sqrt(v1) + 1e-3)
    assert aggregate(strategy, [0.5, 1.5], global_value=0.0) == pytest.approx(expected, rel=1e-5)


def test_yogi_and_adam_second_moments_differ_when_the_gradient_shrinks():
    w, big, small = [np.array([0.0])], [np.array([1.0])], [np.array([0.1])]
    kwargs = dict(learning_rate=0.1, beta1=0.9, beta2=0.5, tau=1e-3)
    _, m, v_adam = adaptive_step("adam", w, big, None, None, **kwargs)
    _, _, v_adam = adaptive_step("adam", w, small, m, v_adam, **kwargs)
    _, m, v_yogi = adaptive_step("yogi", w, big, None, None, **kwargs)
    _, _, v_yogi = adaptive_step("yogi", w, small, m, v_yogi, **kwargs)
    v1_adam, v1_yogi = 0.5 * 1e-6 + 0.5, 1e-6 + 0.5
    assert v_adam[0][0] == pytest.approx(0.5 * v1_adam + 0.5 * 0.01)
    assert v_yogi[0][0] == pytest.approx(v1_yogi - 0.5 * 0.01)  # sign(v - 0.01) = +1: Yogi decays additively


def test_server_optimisers_leave_integer_arrays_at_the_plain_mean():
    w = [np.array([1.0], np.float32), np.array([4], np.int64)]
    mean = [np.array([2.0], np.float32), np.array([6], np.int64)]
    new, _, _ = adaptive_step("adam", w, mean, None, None, learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    assert new[1].dtype == np.int64 and new[1][0] == 6 and new[0].dtype == np.float32
    new, _ = momentum_step(w, mean, None, learning_rate=1.0, momentum=0.9)
    assert new[1][0] == 6 and new[0][0] == pytest.approx(2.0)


# --- robust rules -----------------------------------------------------------------------------

def test_median_odd_even_and_ties():
    assert aggregate(FedMedian(), [1.0, 2.0, 100.0]) == 2.0
    assert aggregate(FedMedian(), [1.0, 2.0, 3.0, 100.0]) == 2.5  # even count: mean of the middle two
    assert aggregate(FedMedian(), [5.0, 5.0, 1.0]) == 5.0
    assert aggregate(FedMedian(), [5.0, 5.0, 1.0, 1.0]) == 3.0


def test_median_is_unweighted_and_coordinate_wise():
    updates = [[np.array([1.0, 10.0])], [np.array([2.0, 30.0])], [np.array([9.0, 20.0])]]
    np.testing.assert_array_equal(coordinate_median(updates)[0], [2.0, 20.0])
    # a client claiming a million examples gets no more say than the others
    assert aggregate(FedMedian(), [1.0, 2.0, 100.0], [1, 1, 1_000_000]) == 2.0


@pytest.mark.parametrize("strategy", [FedMedian(), TrimmedMean(trim_fraction=0.2)])
def test_a_poisoned_update_does_not_move_median_or_trimmed_mean(strategy):
    honest = [0.9, 1.0, 1.1, 1.0]
    assert abs(aggregate(strategy, [*honest, 1e6]) - 1.0) < 0.11
    assert abs(aggregate(FedAvg(), [*honest, 1e6]) - 1.0) > 1e5  # whereas FedAvg is dragged away


def test_trimmed_mean_by_hand():
    assert aggregate(TrimmedMean(trim_fraction=0.2), [1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(3.0)  # cut 1 each end
    assert aggregate(TrimmedMean(trim_fraction=0.1), [1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(22.0)  # cut 0
    assert aggregate(TrimmedMean(trim_fraction=0.4), [7.0, 1.0, 3.0, 5.0, 100.0]) == pytest.approx(5.0)  # cut 2
    np.testing.assert_allclose(trimmed_mean([[np.array([1.0, 9.0])], [np.array([2.0, 8.0])], [np.array([3.0, 7.0])]],
                                            0.0)[0], [2.0, 8.0])


def test_krum_scores_by_hand_and_the_byzantine_update_is_excluded():
    values = [0.0, 0.1, 0.2, 0.4, 100.0]  # n = 5, f = 1: each score sums the n - f - 2 = 2 nearest squared distances
    scores = krum_scores([[np.array([v])] for v in values], num_byzantine=1)
    np.testing.assert_allclose(scores[:4], [0.01 + 0.04, 0.01 + 0.01, 0.01 + 0.04, 0.04 + 0.09])
    assert scores[4] > 1e4
    assert aggregate(Krum(num_byzantine=1), values) == pytest.approx(0.1)
    # Multi-Krum keeps the n - f = 4 best (all honest) and averages them unweighted
    assert aggregate(MultiKrum(num_byzantine=1), values, [1, 1, 1, 1, 10**6]) == pytest.approx(0.175)
    # with m = 2: 0.1, then the tie 0.0/0.2 goes to the earlier update
    assert krum_select([[np.array([v])] for v in values], 1, 2) == [1, 0]
    assert aggregate(MultiKrum(num_byzantine=1, num_selected=2), values) == pytest.approx(0.05)


def test_krum_excludes_f_colluding_outliers_in_many_dimensions():
    rng = np.random.default_rng(0)
    honest = [[rng.normal(0, 0.1, (4, 3)), rng.normal(0, 0.1, 3)] for _ in range(7)]
    byzantine = [[np.full((4, 3), 5.0), np.full(3, 5.0)] for _ in range(2)]
    chosen = krum_select(honest + byzantine, num_byzantine=2, num_selected=5)
    assert all(index < 7 for index in chosen)


def test_krum_needs_2f_plus_3_clients_and_still_answers_with_fewer():
    assert Krum(num_byzantine=2).min_fit_clients() == 7
    assert aggregate(Krum(num_byzantine=2), [1.0, 1.1, 5.0]) in (pytest.approx(1.0), pytest.approx(1.1))
    assert aggregate(Krum(num_byzantine=1), [3.0]) == 3.0


def test_robust_rules_keep_dtypes():
    updates = [[np.array([1.0], np.float16), np.array([2], np.int32)], [np.array([3.0], np.float16), np.array([5], np.int32)]]
    for result in (coordinate_median(updates), trimmed_mean(updates, 0.0)):
        assert [a.dtype for a in result] == [np.float16, np.int32]
        assert result[1][0] == 4  # 3.5 rounds half to even


# --- the public interface -----------------------------------------------------------------------

def test_every_strategy_is_registered_by_name_and_cites_its_paper():
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "fedmedian",
                               "trimmed-mean", "krum", "multi-krum"}
    import sys
    for cls in STRATEGIES.values():
        doc = (sys.modules[cls.__module__].__doc__ or "") + (cls.__doc__ or "")
        assert any(str(year) in doc for year in range(2016, 2022)), cls.__name__


def test_make_strategy_passes_only_the_options_a_strategy_takes():
    strategy = make_strategy("fedadam", server_learning_rate=0.5, proximal_mu=0.3, num_byzantine=None)
    assert isinstance(strategy, FedAdam) and strategy.server_learning_rate == 0.5
    assert make_strategy("krum", num_byzantine=2).num_byzantine == 2
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")


@pytest.mark.parametrize("name, options, message", [
    ("fedavgm", {"server_momentum": 1.0}, "server_momentum must be a number in"),
    ("fedadam", {"tau": 0.0}, "tau must be a number in"),
    ("fedyogi", {"beta2": 1.5}, "beta2 must be a number in"),
    ("trimmed-mean", {"trim_fraction": 0.5}, "trim_fraction must be a number in"),
    ("fedprox", {"proximal_mu": -0.1}, "proximal_mu must be a number in"),
    ("krum", {"num_byzantine": -1}, "num_byzantine must be a non-negative integer"),
])
def test_bad_strategy_parameters_are_refused_by_name(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(name, **options)


def test_a_custom_strategy_needs_only_aggregate():
    class Maximum(Strategy):
        name = "maximum"

        def aggregate(self, server_round, global_weights, results):
            return [np.max(np.stack([r.weights[i] for r in results]), axis=0) for i in range(len(global_weights))]

    assert aggregate(Maximum(), [1.0, 7.0, 3.0]) == 7.0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_state_survives_a_checkpoint(tmp_path, name):
    """Three rounds uninterrupted equal two rounds, a save/load into a fresh instance, then the third."""
    rng = np.random.default_rng(1)
    rounds = [[rng.normal(size=(3, 2)).astype(np.float32) for _ in range(5)] for _ in range(3)]

    def run(strategy, round_values, start):
        w = [np.zeros((3, 2), np.float32)] if start is None else start
        for server_round, values in enumerate(round_values, start=1):
            aggregator = strategy.aggregator(server_round, w)
            for i, v in enumerate(values):
                aggregator.add(FitResult(f"c{i}", [v], i + 1))
            w = aggregator.result()
        return w

    uninterrupted = run(make_strategy(name), rounds, None)
    first = make_strategy(name)
    w2 = run(first, rounds[:2], None)
    save_state(tmp_path / "state.npz", first.state())
    resumed = make_strategy(name)
    resumed.load_state(load_state(tmp_path / "state.npz"))
    np.testing.assert_array_equal(run(resumed, rounds[2:], w2)[0], uninterrupted[0])


def test_a_corrupt_state_file_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "state.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="state.npz: corrupt state file"):
        load_state(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(CheckpointError, match="not a PyFed state file"):
        load_state(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        load_state(tmp_path / "missing.npz")


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_step_replaces_the_state_arrays_and_never_changes_a_returned_state(name):
    """The engine keeps a returned state (no copy) to roll back a refused round."""
    from pyfed.federation.strategy import make_strategy

    strategy = make_strategy(name)
    weights = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
    strategy.server_update(weights, [w + 0.5 for w in weights])
    before = strategy.state()
    frozen = {key: [a.copy() for a in value] for key, value in before.items()}
    strategy.server_update(weights, [w - 0.25 for w in weights])
    for key, arrays in frozen.items():
        assert all(np.array_equal(a, b) for a, b in zip(arrays, before[key]))
        assert any(not np.array_equal(a, b) for a, b in zip(arrays, strategy.state()[key]))
