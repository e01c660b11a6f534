"""One SecAgg+ round without a network: the server learns the weighted sum and nothing else, drop-outs
after key sharing are survived, too many drop-outs abandon the round, and malformed or inconsistent
messages are refused by both halves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pyfed.federation.secagg import SecAggError
from pyfed.federation.secure_aggregation import (Advertised, BadBoxes, ClientRound, PublicKeys, RoundSetup, SecAggAborted,
                                                 SecAggBlamed, SecAggRefused, ServerRound, left_out_after,
                                                 ring_bits_for)
from pyfed.wire.protocol import b64

pytestmark = pytest.mark.unit

LENGTH = 1000
ANY_WEIGHT = 10_000  # what a client declared when it joined, in these tests


def said(client: ClientRound, weight: int = 1) -> Advertised:
    """What ``client`` sends in stage 1, masking its update by ``weight``."""
    return client.advertised(weight)


def server_round(round_setup: RoundSetup, ids, length: int) -> ServerRound:
    return ServerRound(round_setup, ids, length, {cid: ANY_WEIGHT for cid in ids})


def setup(n: int, threshold: int, degree: int | None = None, quantisation_bits: int = 16, total_weight: int = 10_000,
          min_clients: int = 2):
    return RoundSetup(context=b"run-1|round-3|attempt-1", threshold=threshold, degree=degree or n - 1,
                      quantisation_bits=quantisation_bits, ring_bits=ring_bits_for(total_weight, quantisation_bits),
                      clip=0.5, min_clients=min_clients)


def run_round(n: int, threshold: int, *, degree: int | None = None, drop_before_keys=(), drop_before_masked=(),
              drop_before_unmask=(), seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"site-{i}" for i in range(n)]
    updates = {cid: rng.uniform(-0.4, 0.4, LENGTH) for cid in ids}
    weights = {cid: int(rng.integers(1, 100)) for cid in ids}
    round_setup = setup(n, threshold, degree)
    server = server_round(round_setup, ids, LENGTH)
    clients = {cid: ClientRound(cid, round_setup, np.random.default_rng(seed + i)) for i, cid in enumerate(ids)}
    for cid, client in clients.items():
        if cid not in drop_before_keys:
            server.add_keys(cid, said(client, weights[cid]))
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
    assert {owner: kind for owner, (kind, _, _) in shares.items()} == {"a": "b", "b": "b", "c": "s"}
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
        a.share_keys({"a": a.advertise(), "b": b.advertise(), "c": PublicKeys(b"x", b"y", b"z")})


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
    server = server_round(round_setup, ["a", "b", "c"], 4)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    with pytest.raises(SecAggError, match="not asked for"):
        server.add_keys("z", said(clients["a"]))
    for cid, client in clients.items():
        server.add_keys(cid, said(client, 3))
    with pytest.raises(SecAggError, match="twice"):
        server.add_keys("a", said(clients["a"]))
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
                                             ({"clip": 0}, "positive"), ({"degree": 1}, "at least 2"),
                                             ({"min_clients": 1}, "at least 2")])
def test_bad_setups_are_refused(kwargs, message):
    base = dict(context=b"x", threshold=2, degree=4, quantisation_bits=16, ring_bits=32, clip=1.0, min_clients=3)
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
    setup_body = {"threshold": 2, "degree": 2, "quantisation_bits": 20, "ring_bits": ring_bits_for(100, 20), "clip": 0.5,
                  "min_clients": 3}
    length = 18
    server = server_round(RoundSetup(context=round_context("0123abcd", 4, 2), **setup_body), list(trained), length)
    stages = {cid: ClientStages(cid) for cid in trained}
    for cid, stage in stages.items():
        keys = wire(MessageType.SECAGG_KEYS, stage.begin("0123abcd", 4, 2, setup_body,
                                                           flatten_change(trained[cid], global_weights), weights[cid],
                                                           {"fit_s": 0.5, "history": {"loss": [0.1]}})).body
        assert keys["num_examples"] == weights[cid]
        server.add_keys(cid, Advertised(PublicKeys(*(unb64(keys[k]) for k in ("mask_key", "share_key", "sign_key"))),
                                        unb64(keys["commitment"]), keys["num_examples"], unb64(keys["signature"])))
    roster = {cid: [b64(k.mask_key), b64(k.share_key), b64(k.sign_key)] for cid, k in server.roster().items()}
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
        server.add_unmask(cid, {owner: (k, unb64(share), unb64(sig)) for owner, (k, share, sig) in body["shares"].items()})
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
    server = server_round(round_setup, ["a", "b", "c"], 4)
    a, b = ClientRound("a", round_setup), ClientRound("b", round_setup)
    server.add_keys("a", said(a))
    mine = b.advertise()

    def keys(mask, share, sign):
        return Advertised(PublicKeys(mask, share, sign), b.commitment(), 1, said(b).signature)

    with pytest.raises(SecAggError, match="not its own"):
        server.add_keys("b", keys(a.advertise().mask_key, mine.share_key, mine.sign_key))  # copied from a
    with pytest.raises(SecAggError, match="not its own"):
        server.add_keys("b", keys(mine.mask_key, mine.share_key, a.advertise().sign_key))
    with pytest.raises(SecAggError, match="not its own"):
        server.add_keys("b", keys(mine.mask_key, mine.mask_key, mine.sign_key))
    with pytest.raises(SecAggError, match="not usable"):
        server.add_keys("b", keys(bytes(32), mine.share_key, mine.sign_key))
    with pytest.raises(SecAggError, match="do not carry its signature"):
        server.add_keys("b", keys(mine.mask_key, mine.share_key, bytes([2]) + bytes(31)))  # not a key it holds
    with pytest.raises(SecAggError, match="do not carry its signature"):
        server.add_keys("b", Advertised(mine, b.commitment(), 2, said(b, 1).signature))  # another weight than signed
    with pytest.raises(SecAggError, match="by at most 10000"):
        server.add_keys("b", said(b, ANY_WEIGHT + 1))
    server.add_keys("b", said(b))


def test_a_survivor_that_withholds_or_adds_shares_is_refused():
    round_setup = setup(3, 2)
    server = server_round(round_setup, ["a", "b", "c"], 4)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    for cid, client in clients.items():
        server.add_keys(cid, said(client))
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
        server.add_unmask("a", {**shares, "b": ("s", *shares["b"][1:])})
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


# --- Hardening II: what a client that lies at each stage can do to the server's result ------------------

def honest_round(n: int = 4, *, min_clients: int = 3, weight: int = 5):
    """n clients through stage 3 (keys, shares, masked inputs of 0.1 at ``weight``); the server, the
    clients, and the survivors' unmasking request."""
    round_setup = setup(n, 2, min_clients=min_clients)
    ids = [f"c{i}" for i in range(n)]
    server = server_round(round_setup, ids, 4)
    clients = {cid: ClientRound(cid, round_setup, np.random.default_rng(i)) for i, cid in enumerate(ids)}
    for cid, client in clients.items():
        server.add_keys(cid, said(client, weight))
    roster = server.roster()
    for cid, client in clients.items():
        server.add_shares(cid, client.share_keys(roster))
    return server, clients, round_setup


def mask_all(server, clients, skip=(), weight: int = 5, values: float = 0.1):
    for cid, client in clients.items():
        if cid not in skip:
            server.add_masked(cid, client.masked_input(server.boxes_for(cid), np.full(4, values), weight))


def test_a_share_its_owner_did_not_sign_is_refused_naming_the_client_that_sent_it():
    """The review's shares off by one rebuilt wrong seeds: the server summed 101,807,646 examples
    (true: 1,059) and accepted a chance-level model. Every revealed share now carries its owner's
    signature: an altered one is refused, and its sender named."""
    server, clients, _ = honest_round()
    mask_all(server, clients)
    survivors, dropped = server.unmask_request()
    shares = clients["c0"].unmask(survivors, dropped)
    kind, share, signature = shares["c1"]
    forged = (int.from_bytes(share, "big") + 1).to_bytes(len(share), "big")
    with pytest.raises(SecAggError, match="c0 sent a share of c1's b that c1 did not sign"):
        server.add_unmask("c0", {**shares, "c1": (kind, forged, signature)})
    for cid in ("c1", "c2", "c3"):  # the others' shares suffice: the round completes without c0's
        server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    total, weight = server.result()
    assert weight == 20 and np.allclose(total / weight, 0.1, atol=1e-4)


def test_an_owner_whose_signed_shares_rebuild_another_secret_than_it_committed_to_is_named():
    server, clients, _ = honest_round()
    cheat = clients["c2"]
    cheat._self_seed = bytes(32)  # after committing: its shares and its mask use another seed  # noqa: SLF001
    roster = server.roster()
    server._state.shared.clear(), server._state.boxes.clear()  # noqa: SLF001 - deal again with the new seed
    for client in clients.values():
        client._roster = None  # noqa: SLF001
        server.add_shares(client.client_id, client.share_keys(roster))
    mask_all(server, clients)
    survivors, dropped = server.unmask_request()
    for cid in survivors:
        server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    with pytest.raises(SecAggBlamed) as blamed:
        server.result()
    assert blamed.value.blamed == {"c2": "its self-mask seed, rebuilt from the shares it signed, is not the one it "
                                         "committed to"}


def test_a_dropped_owner_whose_signed_shares_rebuild_another_mask_key_is_named():
    server, clients, _ = honest_round()
    cheat = clients["c3"]
    from pyfed.federation.secagg import KeyPair

    roster = server.roster()
    server._state.shared.clear(), server._state.boxes.clear()  # noqa: SLF001
    cheat._mask_pair.private_bytes = KeyPair().private_bytes  # it deals shares of a key it did not advertise  # noqa: SLF001
    for client in clients.values():
        client._roster = None  # noqa: SLF001
        server.add_shares(client.client_id, client.share_keys(roster))
    mask_all(server, clients, skip=("c3",))  # ... and drops before its masked input
    survivors, dropped = server.unmask_request()
    assert dropped == ["c3"]
    for cid in survivors:
        server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    with pytest.raises(SecAggBlamed, match="c3: its mask key, rebuilt from the shares it signed, is not the one it "
                                          "advertised"):
        server.result()


def test_a_box_holding_a_share_its_sender_did_not_sign_is_named_instead_of_masked():
    from pyfed.federation.secagg import seal
    from pyfed.federation.secure_aggregation import _associated  # noqa: PLC2701

    round_setup = setup(3, 2)
    clients = {cid: ClientRound(cid, round_setup) for cid in "abc"}
    roster = {cid: c.advertise() for cid, c in clients.items()}
    boxes = {cid: c.share_keys(roster) for cid, c in clients.items()}
    b = clients["b"]
    key = b._share_pair.agree(roster["a"].share_key, round_setup.context + b"|shares")  # noqa: SLF001
    unsigned = seal(key, bytes(2 * 66 + 2 * 64), _associated(round_setup, "b", "a"))  # opens, but unsigned
    with pytest.raises(BadBoxes, match="the boxes from b did not open"):
        clients["a"].masked_input({"b": unsigned, "c": boxes["c"]["a"]}, np.zeros(4), 1)


def test_a_sum_whose_weight_is_not_the_survivors_declared_weights_is_refused():
    """The review forged the weight coordinate: the sum became "2 examples" and one coordinate moved
    by 535.7. The survivors declared their weights (signed) with their keys: the unmasked total must
    be theirs."""
    server, clients, _ = honest_round()
    mask_all(server, clients, skip=("c0",))
    forged = clients["c0"].masked_input(server.boxes_for("c0"), np.full(4, 0.1), 5)
    forged[-1] = (forged[-1] + np.uint64(2**20)) & np.uint64(2**server.setup.ring_bits - 1)
    server.add_masked("c0", forged)
    survivors, dropped = server.unmask_request()
    for cid in survivors:
        server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    with pytest.raises(SecAggRefused, match=r"total weight is 1048596, but the 4 clients in the sum declared 20"):
        server.result()


@pytest.mark.parametrize("shift, refused", [(2**26, True), (2**16, False)])
def test_a_masked_input_shifted_past_the_clipping_range_is_refused_and_within_it_cannot_be_seen(shift, refused):
    """The review added 2^26 to each masked coordinate: the model moved by up to 1.95 per coordinate
    with a clip of 1. Each coordinate of the unmasked sum must lie in [0, R W]: out of it, the result
    is refused. A shift that keeps the sum within range is what secure aggregation cannot see (no
    input-validity proof): it moves the mean by at most the clip, as the README says."""
    server, clients, round_setup = honest_round()
    mask_all(server, clients, skip=("c0",))
    shifted = clients["c0"].masked_input(server.boxes_for("c0"), np.full(4, 0.1), 5)
    shifted[:-1] = (shifted[:-1] + np.uint64(shift)) & np.uint64(2**round_setup.ring_bits - 1)
    server.add_masked("c0", shifted)
    survivors, dropped = server.unmask_request()
    for cid in survivors:
        server.add_unmask(cid, clients[cid].unmask(survivors, dropped))
    if refused:
        with pytest.raises(SecAggRefused, match="4 coordinate.* outside the clipping range \\[-0.5, 0.5\\]"):
            server.result()
    else:
        total, weight = server.result()
        assert np.all(np.abs(total / weight) <= round_setup.clip)  # moved, within the clip


def test_no_sum_of_fewer_than_the_minimum_is_unmasked_by_the_server_nor_revealed_by_a_client():
    server, clients, _ = honest_round(min_clients=3)
    mask_all(server, clients, skip=("c2", "c3"))
    with pytest.raises(SecAggAborted, match="2 masked inputs; no sum of fewer than 3 clients is unmasked"):
        server.unmask_request()
    with pytest.raises(SecAggError, match="unmask a sum of 2 clients; this round unmasks none of fewer than 3"):
        clients["c0"].unmask(["c0", "c1"], ["c2", "c3"])  # a server that tried: the client refuses
