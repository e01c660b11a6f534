"""Secure aggregation's building blocks, without a network: Shamir sharing, key agreement and
sealing, masks that cancel, stochastic quantisation, the neighbour graph."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from scipy import stats

from pyfed.federation import secagg
from pyfed.federation.secagg import (KeyPair, SecAggError, dequantise, expand_mask, neighbours, open_sealed, quantise,
                                     rebuild_secret, seal, share_secret)

pytestmark = pytest.mark.unit


def test_any_threshold_of_the_shares_rebuilds_the_secret_and_fewer_cannot():
    secret = os.urandom(32)
    shares = share_secret(secret, 3, [1, 2, 3, 4, 5])
    for chosen in itertools.combinations(shares, 3):
        assert rebuild_secret({x: shares[x] for x in chosen}, 3) == secret
    with pytest.raises(SecAggError, match="2 shares cannot rebuild a secret shared with threshold 3"):
        rebuild_secret({1: shares[1], 2: shares[2]}, 3)
    # two shares, whatever the secret, are uniform: the same pair of shares fits every secret
    other = share_secret(bytes(32), 3, [1, 2, 3, 4, 5])
    assert len({shares[1], other[1]}) == 2
    tampered = dict(shares)
    tampered[1] = (int.from_bytes(shares[1], "big") ^ 1).to_bytes(secagg.SHARE_BYTES, "big")
    # a wrong share rebuilds a wrong secret, not an error: shares are authenticated by their sealing
    assert rebuild_secret({x: tampered[x] for x in (1, 2, 3)}, 3) != secret


@pytest.mark.parametrize("holders, threshold, message", [
    ([1, 1, 2], 2, "distinct positive"), ([0, 1, 2], 2, "distinct positive"), ([1, 2], 3, "between 1 and 2"),
    ([1, 2], 0, "between 1 and 2")])
def test_sharing_refuses_bad_holders_and_thresholds(holders, threshold, message):
    with pytest.raises(SecAggError, match=message):
        share_secret(os.urandom(32), threshold, holders)
    with pytest.raises(SecAggError, match="32 bytes, not 31"):
        share_secret(os.urandom(31), 1, [1])


def test_bad_shares_are_refused_by_size_and_field():
    with pytest.raises(SecAggError, match="66 bytes, not 3"):
        rebuild_secret({1: b"abc"}, 1)
    with pytest.raises(SecAggError, match="not an element of the field"):
        rebuild_secret({1: (2**521 - 1).to_bytes(66, "big")}, 1)


def test_a_pair_agrees_on_one_key_per_context_and_a_third_party_cannot():
    a, b, c = KeyPair(), KeyPair(), KeyPair()
    assert a.agree(b.public, b"round 1 masks") == b.agree(a.public, b"round 1 masks")
    assert a.agree(b.public, b"round 1 masks") != a.agree(b.public, b"round 1 shares")
    assert c.agree(a.public, b"round 1 masks") != a.agree(b.public, b"round 1 masks")
    with pytest.raises(SecAggError, match="32 bytes, not 5"):
        a.agree(b"short", b"x")
    with pytest.raises(SecAggError, match="not usable"):
        a.agree(bytes(32), b"x")  # a small-order point: the all-zero shared secret


def test_a_sealed_box_opens_only_with_its_key_and_its_associated_data():
    key = os.urandom(32)
    box = seal(key, b"share", b"from a to b, round 3")
    assert open_sealed(key, box, b"from a to b, round 3") == b"share"
    for wrong_key, associated, altered in ((os.urandom(32), b"from a to b, round 3", box),
                                           (key, b"from a to c, round 3", box),
                                           (key, b"from a to b, round 3", box[:-1] + bytes([box[-1] ^ 1]))):
        with pytest.raises(SecAggError, match="does not verify"):
            open_sealed(wrong_key, altered, associated)
    with pytest.raises(SecAggError, match="at least 28 bytes"):
        open_sealed(key, b"tiny", b"")


def test_a_mask_is_a_deterministic_stream_any_slice_of_which_can_be_made_alone():
    seed = os.urandom(32)
    whole = expand_mask(seed, 1000, 64)
    assert np.array_equal(expand_mask(seed, 1000, 64), whole)
    for offset, count in ((0, 1), (1, 7), (8, 8), (13, 100), (999, 1)):
        assert np.array_equal(expand_mask(seed, count, 64, offset=offset), whole[offset:offset + count])
    assert np.array_equal(expand_mask(seed, 1000, 20), whole & np.uint64(2**20 - 1))
    assert not np.array_equal(expand_mask(os.urandom(32), 1000, 64), whole)


def test_a_mask_is_uniform_on_the_ring():
    values = expand_mask(os.urandom(32), 200_000, 16)
    counts = np.bincount((values >> np.uint64(12)).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert values.max() < 2**16


def test_pairwise_masks_cancel_in_the_sum_and_the_ring_wraps():
    rng = np.random.default_rng(0)
    bits, count = 32, 5000
    ring = secagg.ring_mask(bits)
    pairs = {(i, j): os.urandom(32) for i in range(4) for j in range(i + 1, 4)}
    plain = [rng.integers(0, 2**20, count, dtype=np.uint64) for _ in range(4)]
    masked = []
    for i in range(4):
        value = plain[i].copy()
        for (a, b), seed in pairs.items():
            if i == a:
                value += expand_mask(seed, count, bits)
            elif i == b:
                value -= expand_mask(seed, count, bits)
        masked.append(value & ring)
    total = np.zeros(count, np.uint64)
    for value in masked:
        total += value
    assert np.array_equal(total & ring, sum(plain) & ring)


def test_quantisation_is_unbiased_and_within_one_step_and_refuses_nan():
    rng = np.random.default_rng(1)
    values = rng.uniform(-0.3, 0.3, 20_000)
    q = quantise(values, 0.5, 8, rng)
    assert q.dtype == np.uint64 and q.max() <= 255
    back = dequantise(q, 0.5, 8, 1)
    step = 1.0 / 255
    assert np.abs(back - values).max() <= step + 1e-12
    assert abs(float(np.mean(back - values))) < step / 20  # stochastic rounding: no bias
    clipped = dequantise(quantise(np.array([5.0, -5.0]), 0.5, 8, rng), 0.5, 8, 1)
    assert clipped.tolist() == [0.5, -0.5]
    summed = dequantise(quantise(values, 0.5, 16, rng) + quantise(values, 0.5, 16, rng), 0.5, 16, 2)
    assert np.abs(summed - 2 * values).max() <= 2 / 65535 + 1e-12
    with pytest.raises(SecAggError, match="NaN"):
        quantise(np.array([0.0, np.nan]), 0.5, 8, rng)


def test_the_neighbour_graph_is_regular_symmetric_and_everyone_when_small():
    ids = [f"c{i}" for i in range(20)]
    graph = neighbours(ids, 6, b"round-seed")
    assert all(len(graph[cid]) == 6 for cid in ids)
    assert all(cid in graph[other] for cid in ids for other in graph[cid])
    assert neighbours(ids, 6, b"round-seed") == graph and neighbours(ids, 6, b"another") != graph
    small = neighbours(ids[:4], 6, b"s")
    assert all(sorted(small[cid]) == sorted(set(ids[:4]) - {cid}) for cid in ids[:4])
