"""Client-level differential privacy: the mechanism (clipping, noise, the normaliser), the budget,
and the accounting, checked against dp-accounting called directly."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from pyfed.federation.privacy import PrivacyLedger, RoundEvent, epsilon, local_epsilon, noise_for_target
from pyfed.federation.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FitPlan, FitResult, Krum, TrimmedMean
from pyfed.federation.strategy.dp import AdaptiveClipping, DifferentialPrivacy

pytestmark = pytest.mark.unit

DELTA = 1e-5
PLAN = FitPlan(epochs=1, batch_size=32, learning_rate=0.01)


def private(inner=None, *, z=1.0, clip=1.0, fraction=1.0, target=None, adaptive=None, seed=0, minimum=1):
    return DifferentialPrivacy(inner or FedAvg(), noise_multiplier=z, clip_norm=clip, fraction=fraction,
                               ledger=PrivacyLedger(DELTA, target), adaptive=adaptive, minimum=minimum,
                               rng=np.random.default_rng(seed))


def one_round(dp, global_weights, updates, available=None):
    ids = available or [f"c{i}" for i in range(len(updates))]
    chosen = [cid for cid, _ in dp.configure_fit(1, ids, PLAN)]
    aggregator = dp.aggregator(1, global_weights)
    for cid, weights in zip(chosen, updates):
        aggregator.add(FitResult(cid, weights, num_examples=10))
    return aggregator.result()


def test_every_update_counts_at_most_the_clip_norm_and_the_mean_divides_by_the_clients_asked():
    base = [np.zeros(50, np.float32), np.zeros((3, 4), np.float32)]
    huge = [np.full(50, 100.0, np.float32), np.full((3, 4), -100.0, np.float32)]
    small = [np.full(50, 0.01, np.float32), np.zeros((3, 4), np.float32)]
    dp = private(z=1e-9, clip=2.0)
    new = one_round(dp, base, [huge, small, small, huge])
    change = np.concatenate([(n - b).ravel() for n, b in zip(new, base)])
    expected = (2 * 2.0 * np.concatenate([a.ravel() for a in huge]) / np.linalg.norm(
        np.concatenate([a.ravel() for a in huge]).astype(np.float64)) + 2 * np.concatenate(
        [a.ravel() for a in small])) / 4
    np.testing.assert_allclose(change, expected, atol=1e-5)
    # a client asked but silent adds nothing, and the divisor stays the number asked
    dp = private(z=1e-9, clip=2.0)
    new = one_round(dp, base, [huge], available=["a", "b", "c", "d"])
    assert np.linalg.norm(np.concatenate([(n - b).ravel() for n, b in zip(new, base)])) == pytest.approx(2.0 / 4, rel=1e-5)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_the_noise_has_the_stated_standard_deviation(scale):
    """z * C on the sum, so z * C / m on the mean; a test at half or twice the scale fails."""
    z, clip, clients = 2.0, 0.5, 4
    base = [np.zeros(200_000, np.float32)]
    dp = private(z=z, clip=clip, seed=7)
    new = one_round(dp, base, [base] * clients)
    measured = float(np.std(new[0].astype(np.float64)))
    stated = z * clip / clients * scale
    # 200,000 draws: the sample standard deviation is within 1% of the true one with overwhelming probability
    assert (abs(measured - stated) / stated < 0.01) == (scale == 1.0), (measured, stated)


def test_integer_arrays_keep_the_global_value_and_the_inner_strategys_server_step_applies():
    base = [np.zeros(4, np.float32), np.array([7, 7], np.int64)]
    update = [np.ones(4, np.float32), np.array([1000, -5], np.int64)]
    new = one_round(private(z=1e-9, clip=10.0), base, [update])
    assert new[1].tolist() == [7, 7] and new[0].dtype == np.float32
    np.testing.assert_allclose(new[0], 1.0, atol=1e-6)
    momentum = one_round(private(FedAvgM(server_learning_rate=1.0, server_momentum=0.9), z=1e-9, clip=10.0), base,
                         [update])
    np.testing.assert_allclose(momentum[0], 1.0, atol=1e-6)  # first step: no momentum yet


@pytest.mark.parametrize("strategy", [FedMedian(), TrimmedMean(), Krum()])
def test_robust_strategies_are_refused_with_central_dp(strategy):
    with pytest.raises(ValueError, match=f"{strategy.name} is not one"):
        private(strategy)


def test_the_ledger_reports_what_dp_accounting_computes_directly():
    ledger = PrivacyLedger(DELTA)
    for _ in range(30):
        ledger.record(RoundEvent(100, 10, 1.3))
    for _ in range(5):
        ledger.record(RoundEvent(80, 10, 1.3))  # fewer clients connected: a larger sampling rate
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.65)), 30)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(80, 10, dp_accounting.GaussianDpEvent(0.65)), 5)
    assert ledger.spent() == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
    every_client = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    every_client.compose(dp_accounting.GaussianDpEvent(0.65), 7)
    assert epsilon([(RoundEvent(5, 5, 1.3), 7)], DELTA) == pytest.approx(every_client.get_epsilon(DELTA), rel=1e-12)
    local = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    local.compose(dp_accounting.GaussianDpEvent(2.0), 12)
    assert local_epsilon(4.0, 12, DELTA) == pytest.approx(local.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize("target, rounds, population, sampled", [(1.0, 100, 100, 10), (3.0, 50, 100, 10),
                                                                   (8.0, 200, 1000, 50), (3.0, 20, 3, 3)])
def test_calibration_reaches_the_target_epsilon_within_one_percent(target, rounds, population, sampled):
    z = noise_for_target(target, DELTA, rounds, population, sampled)
    reached = epsilon([(RoundEvent(population, sampled, z), rounds)], DELTA)
    assert reached <= target * 1.0001 and reached == pytest.approx(target, rel=0.01), (z, reached)


def test_a_round_that_would_exceed_the_target_is_refused_and_the_ledger_survives_a_checkpoint():
    z = noise_for_target(2.0, DELTA, 10, 50, 5)
    dp = private(z=z, clip=1.0, fraction=0.1, target=2.0)
    base = [np.zeros(3, np.float32)]
    ids = [f"c{i}" for i in range(50)]
    for round_number in range(1, 11):
        assert dp.why_not_run(round_number, 50) is None
        one_round(dp, base, [base] * 5, available=ids)
    assert dp.ledger.spent() == pytest.approx(2.0, rel=0.01)
    reason = dp.why_not_run(11, 50)
    assert reason and "above the target 2" in reason
    resumed = private(z=z, clip=1.0, fraction=0.1, target=2.0)
    resumed.load_state(dp.state())
    assert resumed.ledger.spent() == dp.ledger.spent() and resumed.why_not_run(11, 50) == reason


def test_rolling_a_refused_round_back_does_not_forget_its_release():
    dp = private(z=1.0, clip=1.0)
    base = [np.zeros(3, np.float32)]
    saved = dp.state()
    one_round(dp, base, [base])
    spent = dp.ledger.spent()
    dp.load_state(saved)  # what the engine does when it refuses the new model
    assert dp.ledger.spent() == spent > 0


@pytest.mark.parametrize("state, message", [({}, "was not differentially private"),
                                            ({"inner": {}, "privacy": {"clip_norm": -1, "ledger": {}}}, "clip norm"),
                                            ({"inner": {}, "privacy": {"clip_norm": 1.0, "ledger": {"rounds": "x"}}},
                                             "malformed"),
                                            ({"inner": {}, "privacy": {"clip_norm": 1.0,
                                                                       "ledger": {"delta": 0.1, "rounds": []}}},
                                             "delta 0.1")])
def test_a_bad_privacy_state_in_a_checkpoint_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        private().load_state(state)


def test_sampling_asks_the_fraction_of_the_connected_clients_and_the_accountant_counts_that():
    dp = private(fraction=0.1, z=1e-9)
    chosen = dp.configure_fit(1, [f"c{i}" for i in range(95)], PLAN)
    assert len(chosen) == 10 and len({cid for cid, _ in chosen}) == 10
    aggregator = dp.aggregator(1, [np.zeros(2, np.float32)])
    aggregator.add(FitResult(chosen[0][0], [np.zeros(2, np.float32)], 1))
    aggregator.result()
    assert dp.ledger.rounds == {RoundEvent(95, 10, 1e-9): 1}


def test_adaptive_clipping_moves_the_clip_norm_to_the_target_quantile():
    """Updates of norms 1..10 each round: the median (target 0.5) is between 5 and 6."""
    dp = private(z=0.5, clip=0.1, adaptive=AdaptiveClipping(quantile=0.5, learning_rate=0.2, bit_noise_fraction=0.05),
                 seed=3)
    base = [np.zeros(1, np.float32)]
    ids = [f"c{i}" for i in range(10)]
    for _ in range(200):
        one_round(dp, base, [[np.array([float(k)], np.float32)] for k in range(1, 11)], available=ids)
    assert 4.0 < dp.clip_norm < 7.0, dp.clip_norm


def test_adaptive_clipping_takes_its_share_of_the_noise_and_refuses_too_little():
    dp = private(z=1.0, adaptive=AdaptiveClipping(bit_noise_fraction=0.05))
    sigma_b = 0.05 * 100
    assert dp.update_noise_multiplier(100) == pytest.approx((1.0 - (2 * sigma_b) ** -2) ** -0.5)
    with pytest.raises(ValueError, match="leaves no room for adaptive clipping with 10 clients"):
        private(z=5.0, adaptive=AdaptiveClipping(bit_noise_fraction=0.05)).update_noise_multiplier(10)


def test_dp_wraps_the_adaptive_optimisers():
    base = [np.zeros(4, np.float32)]
    new = one_round(private(FedAdam(), z=1e-9, clip=10.0), base, [[np.ones(4, np.float32)]])
    assert np.all(np.isfinite(new[0])) and np.all(new[0] > 0)
    assert math.isfinite(private(FedAdam()).describe()["differential_privacy"]["noise_multiplier"])


def test_a_clients_half_clips_its_change_and_local_dp_adds_noise_of_the_stated_scale():
    from pyfed.federation.aggregate import clip_and_noise, update_norm

    base = [np.zeros(100_000, np.float32), np.array([3], np.int64)]
    big = [np.full(100_000, 0.1, np.float32), np.array([9], np.int64)]
    clipped, within = clip_and_noise(big, base, 2.0, 0.0, np.random.default_rng(0))
    assert not within and update_norm(clipped, base) == pytest.approx(2.0, rel=1e-5) and clipped[1].tolist() == [9]
    small, within = clip_and_noise(base, base, 2.0, 0.0, np.random.default_rng(0))
    assert within and update_norm(small, base) == 0.0
    noisy, _ = clip_and_noise(base, base, 2.0, 0.5, np.random.default_rng(0))
    assert float(np.std(noisy[0])) == pytest.approx(1.0, rel=0.02) and noisy[1].tolist() == [3]


def test_client_side_clipping_puts_the_clip_norm_in_the_plan_and_counts_the_clients_bits():
    dp = private(z=0.1, clip=3.0, adaptive=AdaptiveClipping(quantile=0.5, bit_noise_fraction=0.5), seed=1)
    dp.clipping = "client"
    selected = dp.configure_fit(1, ["a", "b"], PLAN)
    assert {plan.clip_norm for _, plan in selected} == {3.0} and PLAN.clip_norm == 0.0
    aggregator = dp.aggregator(1, [np.zeros(1, np.float32)])
    for cid, _ in selected:  # the clients say they were within (their norm here is 0.5): the server takes their word
        aggregator.add(FitResult(cid, [np.array([0.5], np.float32)], 1, {"within_clip": False}))
    aggregator.result()
    assert dp.clip_norm > 3.0  # both reported outside: the clip norm grows
    with pytest.raises(ValueError, match="clipping must be server or client"):
        DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, fraction=1.0, ledger=PrivacyLedger(DELTA),
                            clipping="both")


def test_a_within_clip_bit_the_update_itself_belies_is_not_taken(caplog):
    """Adaptive clipping with client-side clipping counts the clients' bits. A client that says it
    was within the clip norm but sends an update beyond it (so it did not clip, as the plan asked) is
    not believed: the server counts what it sees, and says so. What it cannot check: the bit of an
    update the client did clip (it moves the count by one, as any client's bit does)."""
    dp = private(z=0.1, clip=1.0, adaptive=AdaptiveClipping(quantile=0.5, bit_noise_fraction=0.5), seed=1)
    dp.clipping = "client"
    selected = dp.configure_fit(1, ["liar", "b"], PLAN)
    aggregator = dp.aggregator(1, [np.zeros(1, np.float32)])
    for cid, _ in selected:  # both beyond the clip norm (5.0 > 1.0), both claiming to be within it
        aggregator.add(FitResult(cid, [np.array([5.0], np.float32)], 1, {"within_clip": True}))
    assert aggregator._within == 0  # noqa: SLF001 - neither bit was taken
    assert caplog.text.count("its within_clip bit is not taken") == 2


def test_the_in_process_pool_clips_as_a_networked_client_does():
    from pyfed.federation.pool import FitRequest, GrantRequest, InProcessPool
    from pyfed.wire.protocol import MessageType

    class Trainer:
        num_examples = 5

        def fit(self, weights, plan):
            return [w + 10.0 for w in weights], 5, {"fit_s": 0.0, "history": {}}

    pool = InProcessPool({"a": Trainer()}, seed=0)
    pool.send("a", FitRequest(1, 1, FitPlan(1, 32, 0.01, clip_norm=1.0), [np.zeros(4, np.float32)], "run"))
    (ready,) = pool.poll(0.1)  # the update waits for its upload slot, as a networked client's does
    assert ready.kind is MessageType.UPLOAD_READY and ready.body == {"attempt": 1, "bytes": 16}
    pool.send("a", GrantRequest(1, 1))
    answer = next(event for event in pool.poll(0.1))
    assert np.linalg.norm(answer.arrays[0]) == pytest.approx(1.0, rel=1e-5) and answer.body["within_clip"] is False


def test_a_private_checkpoint_is_not_resumed_without_dp_nor_a_plain_one_with_it():
    from pyfed.federation.engine import restored_strategy

    weights = [np.zeros(3, np.float32)]
    dp = private(FedAvgM(), z=1.0)
    one_round(dp, weights, [weights])
    with pytest.raises(ValueError, match="was differentially private; resuming it without the same --dp-"):
        restored_strategy(FedAvgM(), dp.state(), weights)
    with pytest.raises(ValueError, match="was not differentially private"):
        restored_strategy(private(FedAvgM()), FedAvgM().state(), weights)
    resumed = restored_strategy(private(FedAvgM(), z=1.0), dp.state(), weights)
    assert resumed.ledger.spent() == dp.ledger.spent()


def test_local_dp_sends_its_noise_in_the_plan_and_accounts_each_clients_updates_apart():
    from pyfed.federation.privacy import local_epsilon_of

    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=2.0, fraction=1.0, ledger=PrivacyLedger(DELTA),
                             clipping="client", local_noise_multiplier=3.0, rng=np.random.default_rng(0))
    base = [np.zeros(2, np.float32)]
    for _ in range(3):
        selected = dp.configure_fit(1, ["a", "b"], PLAN)
        assert {(p.clip_norm, p.local_noise, p.local_delta) for _, p in selected} == {(2.0, 3.0, DELTA)}
        aggregator = dp.aggregator(1, base)
        for cid in (["a", "b"] if not dp.local_releases else ["a"]):  # b misses rounds 2 and 3
            aggregator.add(FitResult(cid, base, 1, {"within_clip": True}))
        aggregator.result()
    assert dict(dp.local_releases) == {"a": 3, "b": 1}
    report = dp.privacy_report()
    assert report["local_epsilon"] == pytest.approx(local_epsilon(3.0, 3, DELTA), abs=1e-6)
    assert report["local_epsilon"] > 0 and report["local_noise_multiplier"] == 3.0
    assert local_epsilon_of({3.0: 3}, DELTA) == pytest.approx(local_epsilon(3.0, 3, DELTA), rel=1e-12)
    assert local_epsilon_of({3.0: 0}, DELTA) == 0.0
    # the counts are in the checkpoint, and rolling a round back does not forget one
    saved = dp.state()
    fresh = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=2.0, fraction=1.0,
                                ledger=PrivacyLedger(DELTA), clipping="client", local_noise_multiplier=3.0)
    fresh.load_state(saved)
    assert fresh.local_releases == dp.local_releases
    dp.local_releases["b"] += 5
    dp.load_state(saved)
    assert dp.local_releases["b"] == 6
    for bad in ({"a": -1}, {"a": "3"}, [1], {"a": 1.5}):
        with pytest.raises(ValueError, match="local_releases"):
            fresh.load_state({**saved, "privacy": {**saved["privacy"], "local_releases": bad}})
    # without local noise the plan stays as it was, and local noise needs the clients to clip
    plain = private(z=1.0, clip=2.0)
    assert {(p.local_noise, p.local_delta) for _, p in plain.configure_fit(1, ["a"], PLAN)} == {(0.0, 0.0)}
    assert "local_epsilon" not in plain.privacy_report()
    with pytest.raises(ValueError, match="needs client-side clipping"):
        DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, fraction=1.0, ledger=PrivacyLedger(DELTA),
                            local_noise_multiplier=1.0)
