"""One SecAgg+ round without a network: the server learns the weighted sum and nothing else, drop-outs
after key sharing are survived, too many drop-outs abandon the round, and malformed or inconsistent
messages are refused by both halves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pyfed.federation.secagg import SecAggError
from pyfed.federation.secure_aggregation import (BadBoxes, ClientRound, PublicKeys, RoundSetup, SecAggAborted, ServerRound,
                                                 left_out_after, ring_bits_for)
from pyfed.wire.protocol import b64

pytestmark = pytest.mark.unit

LENGTH = 1000


def setup(n: int, threshold: int, degree: int | None = None, quantisation_bits: int = 16, total_weight: int = 10_000):
    return RoundSetup(context=b"run-1|round-3|attempt-1", threshold=threshold, degree=degree or n - 1,
                      quantisation_bits=quantisation_bits, ring_bits=ring_bits_for(total_weight, quantisation_bits),
                      clip=0.5)


def run_round(n: int, threshold: int, *, degree: int | None = None, drop_before_keys=(), drop_before_masked=(),
              drop_before_unmask=(), seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"site-{i}" for i in range(n)]
    updates = {cid: rng.uniform(-0.4, 0.4, LENGTH) for cid in ids}
    weights = {cid: int(rng.integers(1, 100)) for cid in ids}
    round_setup = setup(n, threshold, degree)
    server = ServerRound(round_setup, ids, LENGTH)
    clients = {cid: ClientRound(cid, round_setup, np.random.default_rng(seed + i)) for i, cid in enumerate(ids)}
    for cid, client in clients.items():
        if cid not in drop_before_keys:
            server.add_keys(cid, client.advertise())
    roster = server.roster()
    for cid in roster:
        server.add_shares(cid, clients[cid].share_keys(roster))
    masked = {}
    for cid in roster:
        if cid not in drop_before_masked:
            masked[cid] = clients[cid].masked_input(server.boxes_for(cid), updates[cid], weights[cid])
            server.add_masked(cid, masked[cid])
    survivors, dropped = server.unmask_request()
    for cid in survivors:
        if cid not in drop_before_unmask:
            server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    total, weight = server.result()
    expected = sum(weights[c] * np.clip(updates[c], -0.5, 0.5) for c in survivors)
    run_round.server, run_round.weights = server, weights  # what the server holds, for the test that looks
    return total, weight, expected, sum(weights[c] for c in survivors), masked, round_setup


@pytest.mark.parametrize("n, threshold, degree", [(3, 2, None), (5, 3, None), (12, 4, 6)])
def test_the_server_gets_the_weighted_sum_within_the_quantisation_error(n, threshold, degree):
    total, weight, expected, expected_weight, _, round_setup = run_round(n, threshold, degree=degree)
    assert weight == expected_weight
    step = 2 * round_setup.clip / (2**round_setup.quantisation_bits - 1)
    assert np.abs(total - expected).max() <= step * weight + 1e-9
    assert np.abs(total / weight - expected / weight).mean() < step / 4


def test_clients_that_drop_after_sharing_keys_are_unmasked_and_the_sum_is_the_survivors():
    total, weight, expected, expected_weight, _, round_setup = run_round(
        12, 4, degree=6, drop_before_keys=["site-0"], drop_before_masked=["site-3", "site-5"],
        drop_before_unmask=["site-6"])  # each neighbourhood (7 holders) loses at most 3 of them
    assert weight == expected_weight
    step = 2 * round_setup.clip / (2**round_setup.quantisation_bits - 1)
    assert np.abs(total - expected).max() <= step * weight + 1e-9


def test_below_the_threshold_the_round_is_abandoned_and_nothing_is_unmasked():
    with pytest.raises(SecAggAborted, match="2 masked inputs; the threshold is 3"):
        run_round(4, 3, drop_before_masked=["site-1", "site-2"])
    with pytest.raises(SecAggAborted, match="2 clients advertised keys"):
        run_round(4, 3, drop_before_keys=["site-1", "site-2"])
    with pytest.raises(SecAggAborted, match="shares came to unmask"):
        run_round(4, 3, drop_before_unmask=["site-1", "site-2"])


def test_a_single_masked_input_looks_uniform_on_the_ring():
    *_, masked, round_setup = run_round(3, 2, seed=5)
    vector = masked["site-0"][:-1]
    top = (vector >> np.uint64(round_setup.ring_bits - 4)).astype(np.int64)  # 16 buckets by the top bits
    assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > 1e-4
    low = (vector & np.uint64(15)).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=16)).pvalue > 1e-4


def test_what_the_server_holds_after_the_round_does_not_give_one_clients_update_back():
    """The server knows each survivor's masked input and, after unmasking, its self-mask seed; what
    is left, w*q plus the pairwise masks with its surviving neighbours, still looks uniform."""
    from pyfed.federation.secagg import expand_mask, rebuild_secret

    *_, masked, round_setup = run_round(4, 2, seed=7)
    server = run_round.server
    owner = "site-0"
    seed = rebuild_secret(server._state.shares[owner], round_setup.threshold)  # noqa: SLF001 - the server's view
    unmasked = (masked[owner] - expand_mask(seed, masked[owner].size, round_setup.ring_bits)) & np.uint64(
        2**round_setup.ring_bits - 1)
    top = (unmasked[:-1] >> np.uint64(round_setup.ring_bits - 4)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > 1e-4  # a weighted update is far from uniform
    assert int(unmasked[-1]) != run_round.weights[owner]  # not even its weight shows (a 2^-30 chance)


def test_a_client_never_reveals_both_secrets_of_one_client_and_refuses_an_inconsistent_request():
    round_setup = setup(3, 2)
    ids = ["a", "b", "c"]
    clients = {cid: ClientRound(cid, round_setup) for cid in ids}
    roster = {cid: c.advertise() for cid, c in clients.items()}
    boxes = {cid: c.share_keys(roster) for cid, c in clients.items()}
    for cid, client in clients.items():
        client.masked_input({s: b[cid] for s, b in boxes.items() if s != cid}, np.zeros(10), 1)
    with pytest.raises(SecAggError, match="both survived and dropped"):
        clients["a"].unmask(["a", "b", "c"], ["b"])
    with pytest.raises(SecAggError, match="this client, which sent its masked input, as dropped"):
        clients["a"].unmask(["b", "c"], ["a"])
    with pytest.raises(SecAggAborted, match="1 survivors"):
        clients["a"].unmask(["a"], ["b", "c"])
    shares = clients["a"].unmask(["a", "b"], ["c"])
    assert {owner: kind for owner, (kind, _) in shares.items()} == {"a": "b", "b": "b", "c": "s"}
    with pytest.raises(SecAggError, match="twice"):
        clients["a"].unmask(["a", "b", "c"], [])


def test_a_roster_without_the_clients_own_keys_or_with_a_repeated_key_is_refused():
    round_setup = setup(3, 2)
    a, b, c = (ClientRound(cid, round_setup) for cid in "abc")
    with pytest.raises(SecAggError, match="does not hold this client's own keys"):
        a.share_keys({"a": b.advertise(), "b": c.advertise(), "c": a.advertise()})
    with pytest.raises(SecAggError, match="repeats a public key"):
        a.share_keys({"a": a.advertise(), "b": b.advertise(), "c": b.advertise()})
    with pytest.raises(SecAggError, match="not 32 bytes"):
        a.share_keys({"a": a.advertise(), "b": b.advertise(), "c": PublicKeys(b"x", b"y")})


def test_boxes_that_are_altered_misaddressed_or_from_strangers_are_refused():
    round_setup = setup(4, 2)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abcd"}
    roster = {cid: c.advertise() for cid, c in clients.items()}
    boxes = {cid: c.share_keys(roster) for cid, c in clients.items()}
    for_a = {s: b["a"] for s, b in boxes.items() if s != "a"}
    altered = dict(for_a, b=for_a["b"][:-1] + bytes([for_a["b"][-1] ^ 1]))
    with pytest.raises(BadBoxes, match="the boxes from b did not open") as bad:
        clients["a"].masked_input(altered, np.zeros(4), 1)
    assert bad.value.senders == ["b"]
    misaddressed = dict(for_a, b=boxes["b"]["c"], c=b"x" * 40)  # b's box for c, handed to a; and garbage
    with pytest.raises(BadBoxes) as bad:
        clients["a"].masked_input(misaddressed, np.zeros(4), 1)
    assert bad.value.senders == ["b", "c"]
    with pytest.raises(SecAggError, match="not this client's neighbours"):
        clients["a"].masked_input(dict(for_a, z=b"x" * 60), np.zeros(4), 1)
    with pytest.raises(SecAggError, match="before the keys were shared"):
        ClientRound("a", round_setup).masked_input(for_a, np.zeros(4), 1)


def test_the_server_refuses_what_it_did_not_ask_for_and_malformed_inputs():
    round_setup = setup(3, 2)
    server = ServerRound(round_setup, ["a", "b", "c"], 4)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    with pytest.raises(SecAggError, match="not asked for"):
        server.add_keys("z", clients["a"].advertise())
    for cid, client in clients.items():
        server.add_keys(cid, client.advertise())
    with pytest.raises(SecAggError, match="twice"):
        server.add_keys("a", clients["a"].advertise())
    roster = server.roster()
    boxes = {cid: c.share_keys(roster) for cid, c in clients.items()}
    with pytest.raises(SecAggError, match="other clients than its neighbours"):
        server.add_shares("a", {"b": boxes["a"]["b"]})
    with pytest.raises(SecAggError, match="larger than a box"):
        server.add_shares("a", {"b": b"x" * 10_000, "c": boxes["a"]["c"]})
    for cid in clients:
        server.add_shares(cid, boxes[cid])
    with pytest.raises(SecAggError, match="unsigned \\[5\\]"):
        server.add_masked("a", np.zeros(5, np.float32))
    with pytest.raises(SecAggError, match="unsigned \\[5\\]"):
        server.add_masked("a", np.zeros(7, np.uint64))
    with pytest.raises(SecAggError, match="outside the"):
        server.add_masked("a", np.full(5, 2**63, np.uint64))
    vector = clients["a"].masked_input(server.boxes_for("a"), np.zeros(4), 3)
    server.add_masked("a", vector)
    with pytest.raises(SecAggError, match="twice"):
        server.add_masked("a", vector)
    with pytest.raises(SecAggError, match="not asked for"):
        server.add_unmask("b", {})


def test_a_weight_the_ring_cannot_hold_is_refused_and_the_ring_is_sized_from_the_weights():
    assert ring_bits_for(1, 16) == 17 and ring_bits_for(10_000, 16) == 30
    with pytest.raises(SecAggError, match="need a 71-bit ring"):
        ring_bits_for(2**54, 16)
    round_setup = setup(3, 2, total_weight=100)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    roster = {cid: c.advertise() for cid, c in clients.items()}
    boxes = {cid: c.share_keys(roster) for cid, c in clients.items()}
    with pytest.raises(SecAggError, match="does not fit"):
        clients["a"].masked_input({s: b["a"] for s, b in boxes.items() if s != "a"}, np.zeros(4), 10**6)


@pytest.mark.parametrize("kwargs, message", [({"threshold": 1}, "at least 2"), ({"quantisation_bits": 40}, "ring bits"),
                                             ({"clip": 0}, "positive"), ({"degree": 1}, "at least 2")])
def test_bad_setups_are_refused(kwargs, message):
    base = dict(context=b"x", threshold=2, degree=4, quantisation_bits=16, ring_bits=32, clip=1.0)
    with pytest.raises(SecAggError, match=message):
        RoundSetup(**{**base, **kwargs})


def test_the_stages_as_wire_messages_give_the_weighted_mean_change_and_a_repeat_gets_the_same_answer():
    """ClientStages (what the networked client and the in-process pool run) against ServerRound, every
    message through the wire codec."""
    from pyfed.federation.secure_aggregation import ClientStages, apply_change, flatten_change, round_context
    from pyfed.wire.protocol import Message, MessageType, decode, encode, unb64

    def wire(kind, body, arrays=()):
        return decode(encode(Message(kind, round=4, client_id="x", body=body, arrays=list(arrays))))

    rng = np.random.default_rng(3)
    global_weights = [rng.normal(size=(5, 3)).astype(np.float32), np.array([7], np.int64),
                      rng.normal(size=3).astype(np.float32)]
    trained = {cid: [g + rng.normal(scale=0.05, size=g.shape).astype(g.dtype) if g.dtype.kind == "f" else g + 1
                     for g in global_weights] for cid in ("a", "b", "c")}
    weights = {"a": 10, "b": 30, "c": 60}
    setup_body = {"threshold": 2, "degree": 2, "quantisation_bits": 20, "ring_bits": ring_bits_for(100, 20), "clip": 0.5}
    length = 18
    server = ServerRound(RoundSetup(context=round_context("0123abcd", 4, 2), **setup_body), list(trained), length)
    stages = {cid: ClientStages(cid) for cid in trained}
    for cid, stage in stages.items():
        keys = wire(MessageType.SECAGG_KEYS, stage.begin("0123abcd", 4, 2, setup_body,
                                                           flatten_change(trained[cid], global_weights), weights[cid],
                                                           {"fit_s": 0.5, "history": {"loss": [0.1]}})).body
        server.add_keys(cid, PublicKeys(unb64(keys["mask_key"]), unb64(keys["share_key"])))
    roster = {cid: [b64(k.mask_key), b64(k.share_key)] for cid, k in server.roster().items()}
    for cid, stage in stages.items():
        request = wire(MessageType.SECAGG_ROSTER, {"attempt": 2, "roster": roster}).body
        kind, body, _ = stage.answer(MessageType.SECAGG_ROSTER, 4, request)
        assert stage.answer(MessageType.SECAGG_ROSTER, 4, request)[1] == body  # sent again: the same answer
        body = wire(kind, body).body
        server.add_shares(cid, {v: unb64(box) for v, box in body["boxes"].items()})
    for cid, stage in stages.items():
        request = wire(MessageType.SECAGG_BOXES, {"attempt": 2, "boxes": {
            s: b64(box) for s, box in server.boxes_for(cid).items()}}).body
        kind, body, arrays = stage.answer(MessageType.SECAGG_BOXES, 4, request)
        message = wire(kind, body, arrays)
        assert message.body["history"] == {"loss": [0.1]} and message.arrays[0].dtype == np.uint32
        server.add_masked(cid, message.arrays[0])
    survivors, dropped = server.unmask_request()
    for cid, stage in stages.items():
        request = wire(MessageType.SECAGG_UNMASK, {"attempt": 2, "survivors": survivors, "dropped": dropped}).body
        kind, body, _ = stage.answer(MessageType.SECAGG_UNMASK, 4, request)
        body = wire(kind, body).body
        server.add_unmask(cid, {owner: (k, unb64(s)) for owner, (k, s) in body["shares"].items()})
    total, weight = server.result()
    new = apply_change(global_weights, total / weight)
    expected = [sum(weights[c] * trained[c][i].astype(np.float64) for c in trained) / 100 for i in (0, 2)]
    assert weight == 100 and new[1].tolist() == [7]  # an integer array keeps the global value
    for got, want in zip((new[0], new[2]), expected):
        assert np.abs(got - want).max() < 1e-5
    with pytest.raises(SecAggError, match="which this client is not in"):
        stages["a"].answer(MessageType.SECAGG_BOXES, 4, {"attempt": 3, "boxes": {}})


def test_the_server_refuses_a_copied_a_reused_or_a_small_order_key():
    round_setup = setup(3, 2)
    server = ServerRound(round_setup, ["a", "b", "c"], 4)
    a, b = ClientRound("a", round_setup), ClientRound("b", round_setup)
    server.add_keys("a", a.advertise())
    with pytest.raises(SecAggError, match="not its own"):
        server.add_keys("b", PublicKeys(a.advertise().mask_key, b.advertise().share_key))  # copied from a
    with pytest.raises(SecAggError, match="not its own"):
        server.add_keys("b", PublicKeys(b.advertise().mask_key, b.advertise().mask_key))
    with pytest.raises(SecAggError, match="not usable"):
        server.add_keys("b", PublicKeys(bytes(32), b.advertise().share_key))
    server.add_keys("b", b.advertise())


def test_a_survivor_that_withholds_or_adds_shares_is_refused():
    round_setup = setup(3, 2)
    server = ServerRound(round_setup, ["a", "b", "c"], 4)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    for cid, client in clients.items():
        server.add_keys(cid, client.advertise())
    roster = server.roster()
    for cid, client in clients.items():
        server.add_shares(cid, client.share_keys(roster))
    for cid, client in clients.items():
        server.add_masked(cid, client.masked_input(server.boxes_for(cid), np.zeros(4), 1))
    survivors, dropped = server.unmask_request()
    shares = clients["a"].unmask(survivors, dropped)
    with pytest.raises(SecAggError, match="withheld its shares of \\['b'\\]"):
        server.add_unmask("a", {k: v for k, v in shares.items() if k != "b"})
    with pytest.raises(SecAggError, match="not asked for"):
        server.add_unmask("a", {**shares, "b": ("s", shares["b"][1])})
    server.add_unmask("a", shares)


@pytest.mark.parametrize("accusations, leaving", [
    ({}, set()),
    ({"a": set()}, set()),                                  # named nobody the server knows
    ({"a": {"a"}}, set()),                                  # named itself
    ({"a": {"m"}, "b": {"m"}}, {"m"}),                      # two said so: the named one leaves alone
    ({"a": {"m"}, "b": {"m"}, "c": {"m"}}, {"m"}),
    ({"liar": {"b"}}, {"liar", "b"}),                       # only one said so: both leave
    ({"liar": {"b", "c"}}, {"liar", "b", "c"}),             # a lie about each costs the liar its place too
    ({"a": {"b"}, "b": {"a"}}, {"a", "b"}),                 # they name each other
    ({"a": {"m"}, "b": {"m"}, "liar": {"c"}}, {"m", "liar", "c"}),
])
def test_who_leaves_after_boxes_did_not_open(accusations, leaving):
    out = left_out_after(accusations)
    assert set(out) == leaving
    if "m" in leaving:
        assert out["m"].startswith("its sealed shares did not open for a, b")
    if "liar" in leaving:
        assert "(only it said so: both leave)" in out["liar"]
