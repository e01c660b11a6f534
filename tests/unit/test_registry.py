"""The admission rules, without a network: ids, keys, shards, rates, resume reservations."""

from __future__ import annotations

import pytest

from pyfed.federation.registry import RESERVE_SHARDS_S, REWELCOME_EVERY_S, JoinRefused, Registry, TokenBucket

pytestmark = pytest.mark.unit

KEY_A, KEY_B, KEY_C = "A" * 40, "B" * 40, "C" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(num_shards: int = 0, join_rate: float = 100.0, **kwargs) -> tuple[Registry, Clock]:
    clock = Clock()
    return Registry(num_shards, join_rate, clock=clock, **kwargs), clock


def admit(reg: Registry, peer: bytes, wanted: str = "", *, shard: bool = False, key: str | None = None,
          num_examples: int = 10):
    return reg.admit(peer, wanted, wants_shard=shard, num_examples=num_examples, key=key)


def refusal(reg: Registry, peer: bytes, wanted: str = "", **kwargs) -> str:
    with pytest.raises(JoinRefused) as error:
        admit(reg, peer, wanted, **kwargs)
    return error.value.code


def test_clients_without_an_id_get_the_next_free_number_in_their_own_namespace():
    reg, _ = registry()
    assert [admit(reg, bytes([i])).record.client_id for i in range(3)] == ["auto-1", "auto-2", "auto-3"]
    assert reg.client_of(b"\x01") == "auto-2" and reg.client_of(b"\x09") is None
    # a pinned auto-4 is skipped over by the numbering
    admit(reg, b"p", "auto-4")
    assert admit(reg, b"q").record.client_id == "auto-5"
    assert reg.state()["next_client_number"] == 6


def test_a_chosen_id_is_kept_and_a_live_id_is_refused():
    reg, _ = registry()
    admitted = admit(reg, b"a", "site-a", num_examples=42)
    assert (admitted.event, admitted.record.client_id, admitted.record.num_examples) == ("joined", "site-a", 42)
    assert refusal(reg, b"b", "site-a") == "id_taken"


def test_a_returning_id_rejoins_with_its_key_and_not_with_another():
    reg, _ = registry()
    admit(reg, b"a", "site-a", key="KEY-A")
    assert reg.remove("site-a", "connection lost")
    assert reg.removed["site-a"] == "connection lost" and reg.client_of(b"a") is None
    assert refusal(reg, b"b", "site-a", key="KEY-B") == "id_bound_to_key"
    assert refusal(reg, b"b", "site-a", key=None) == "id_bound_to_key"
    assert admit(reg, b"c", "site-a", key="KEY-A").event == "rejoined"
    assert not reg.remove("nobody", "x")


def test_without_encryption_ids_are_not_bound():
    reg, _ = registry()
    admit(reg, b"a", "site-a")
    reg.remove("site-a", "left")
    assert admit(reg, b"b", "site-a").event == "rejoined"


def test_a_joined_peer_is_welcomed_again_at_most_every_two_seconds_and_keeps_its_id():
    reg, clock = registry()
    first = admit(reg, b"a").record
    assert refusal(reg, b"a") == "join_flood"
    assert refusal(reg, b"a", "auto-1") == "join_flood"
    clock.now += REWELCOME_EVERY_S
    again = admit(reg, b"a", "auto-1")
    assert again.event == "welcomed again" and again.record is first
    assert refusal(reg, b"a", "other-id") == "already_joined"
    assert list(reg.clients) == ["auto-1"]


def test_new_joins_are_rate_limited_in_bursts_of_ten_seconds_worth():
    reg, clock = registry(join_rate=2.0)
    assert [admit(reg, bytes([i])).event for i in range(20)] == ["joined"] * 20
    assert refusal(reg, b"x") == "busy"
    clock.now += 1.0
    admit(reg, b"x")
    admit(reg, b"y")
    assert refusal(reg, b"z") == "busy"
    # refused joins took no id, and a re-welcome is not a new join
    assert len(reg.clients) == 22 and reg.state()["next_client_number"] == 23


def test_shards_go_lowest_first_and_id_k_gets_shard_k():
    reg, _ = registry(num_shards=3)
    records = [admit(reg, bytes([i]), shard=True).record for i in range(3)]
    assert [(r.client_id, r.shard) for r in records] == [(f"client-{k}", f"client-{k}.npz") for k in (1, 2, 3)]
    assert refusal(reg, b"x", shard=True) == "no_shards"
    # a client that brings its own data is still welcome, if it names itself
    assert admit(reg, b"y", "site-y").record.shard is None
    assert refusal(reg, b"z") == "no_id"


def test_a_server_without_shards_says_so():
    reg, _ = registry(num_shards=0)
    with pytest.raises(JoinRefused, match="does not assign data shards"):
        admit(reg, b"a", shard=True)


def test_a_freed_shard_goes_to_the_next_client_under_the_same_id():
    reg, _ = registry(num_shards=3)
    for i in range(3):
        admit(reg, bytes([i]), shard=True)
    reg.remove("client-2", "connection lost")
    again = admit(reg, b"new", shard=True)
    assert (again.record.client_id, again.record.shard, again.event) == ("client-2", "client-2.npz", "rejoined")


def test_a_named_client_gets_its_shard_back_and_a_pinned_id_keeps_its_number_free():
    reg, _ = registry(num_shards=3)
    assert admit(reg, b"a", "site-a", shard=True).record.shard == "client-1.npz"
    admit(reg, b"p", "client-2")  # pinned client-2, bringing its own data
    assert admit(reg, b"b", shard=True).record.shard == "client-3.npz"  # shard 2 is client-2's by convention
    reg.remove("site-a", "left")
    assert admit(reg, b"a2", "site-a", shard=True).record.shard == "client-1.npz"


def test_clients_back_at_a_server_that_forgot_them_get_their_own_shards_and_none_is_locked_out():
    """The server restarted before its first checkpoint: client-3 rejoins first; it must not take
    shard 1 (or client-2 would find shard 3 free but its id-by-convention taken, and wait forever)."""
    reg, _ = registry(num_shards=3)
    records = [admit(reg, bytes([k]), f"client-{k}", shard=True).record for k in (3, 1, 2)]
    assert [(r.client_id, r.shard) for r in records] == [(f"client-{k}", f"client-{k}.npz") for k in (3, 1, 2)]
    # a named client whose own shard is held by another still gets a free one, even client-k's
    reg, _ = registry(num_shards=3)
    admit(reg, b"a", shard=True)  # client-1
    admit(reg, b"s", "site-s", shard=True)  # shard 2
    assert refusal(reg, b"y", "client-1", shard=True) == "id_taken"
    assert admit(reg, b"z", "client-9", shard=True).record.shard == "client-3.npz"


def test_after_a_resume_known_clients_keep_their_shards_for_a_while():
    reg, clock = registry(num_shards=3)
    reg.restore({"client-1": {"shard": "client-1.npz", "key": None},
                 "site-b": {"shard": "client-2.npz", "key": None}}, next_client_number=4)
    assert admit(reg, b"x", shard=True).record.shard == "client-3.npz"  # 1 and 2 are reserved
    assert refusal(reg, b"y", shard=True) == "no_shards"
    assert admit(reg, b"b", "site-b", shard=True).record.shard == "client-2.npz"  # its own, reclaimed
    clock.now += RESERVE_SHARDS_S
    again = admit(reg, b"y", shard=True)
    assert (again.record.client_id, again.record.shard, again.event) == ("client-1", "client-1.npz", "rejoined")
    assert admit(reg, b"z", "site-z").record.client_id == "site-z"


def test_state_round_trips_through_restore():
    reg, _ = registry(num_shards=2)
    admit(reg, b"a", shard=True, key=KEY_A)
    admit(reg, b"b", "site-b", key=KEY_B)
    other, _ = registry(num_shards=2)
    state = reg.state()
    other.restore(Registry.parse_known(state["known_clients"]), state["next_client_number"])
    assert other.state() == state and not other.clients
    assert refusal(other, b"c", "site-b", key=KEY_C) == "id_bound_to_key"


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.25
    assert bucket.take() and bucket.take() and not bucket.take()
    clock.now += 100
    assert sum(bucket.take() for _ in range(10)) == 5  # never more than a burst


def test_parse_known_takes_a_checkpoint_table_and_refuses_anything_else():
    raw = {"client-1": {"shard": "client-1.npz", "key": KEY_A, "extra": 1}, "site-7": {"contributed": False}}
    assert Registry.parse_known(raw) == {"client-1": {"shard": "client-1.npz", "key": KEY_A, "contributed": True},
                                         "site-7": {"shard": None, "key": None, "contributed": False}}
    for bad, reason in [([1, 2], "must be a mapping"), ({"client-1": "not a mapping"}, "client id with a mapping"),
                        (None, "must be a mapping"), ({"site\n": {}}, "client id"),
                        ({7: {}}, "client id"), ({"a": {"shard": "../x.npz"}}, "shard file name"),
                        ({"a": {"key": "short"}}, "40-character"), ({"a": {"contributed": "yes"}}, "true or false")]:
        with pytest.raises(ValueError, match=reason):
            Registry.parse_known(bad)


def test_an_assigned_id_and_its_shard_stay_with_their_key():
    """Defect: a second key joining without an id was handed the first key's id and shard, took over
    the binding, and locked the first client out. Now every assigned id goes through the key check."""
    reg, _ = registry(num_shards=3)
    first = admit(reg, b"a1", shard=True, key=KEY_A).record
    assert (first.client_id, first.shard) == ("client-1", "client-1.npz")
    reg.remove("client-1", "connection lost")  # gone before it ever sent an update
    second = admit(reg, b"b1", shard=True, key=KEY_B).record
    assert (second.client_id, second.shard) == ("client-2", "client-2.npz")  # not A's id, not A's shard
    back = admit(reg, b"a2", "client-1", shard=True, key=KEY_A)
    assert (back.event, back.record.client_id, back.record.shard) == ("rejoined", "client-1", "client-1.npz")
    assert reg.known["client-1"]["key"] == KEY_A
    # the same key (Compose replicas share one) may take a free slot of its own
    reg.remove("client-2", "left")
    assert admit(reg, b"b2", shard=True, key=KEY_B).record.client_id == "client-2"
    assert admit(reg, b"c1", shard=True, key=KEY_C).record.client_id == "client-3"
    reg.remove("client-1", "connection lost")  # A is away again: its shard is free but stays A's
    assert refusal(reg, b"c2", shard=True, key=KEY_C) == "no_shards"


def test_auto_ids_never_collide_with_shard_ids_or_another_keys_ids():
    reg, _ = registry(num_shards=2)
    assert admit(reg, b"s", shard=True, key=KEY_A).record.client_id == "client-1"
    assert admit(reg, b"o", "site-o", key=KEY_A).record.client_id == "site-o"
    plain, _ = registry()
    assert admit(plain, b"a", key=KEY_A).record.client_id == "auto-1"
    plain.remove("auto-1", "left")
    assert admit(plain, b"b", key=KEY_B).record.client_id == "auto-2"  # auto-1 is A's


def test_leaving_and_joining_again_without_an_id_does_not_grow_the_table():
    """Defect: LEAVE then JOIN with an empty id, 200 times from one connection, left 202 ids."""
    reg, clock = registry()
    admit(reg, b"x", "site-x")
    for _ in range(200):
        admit(reg, b"loop")
        reg.remove(reg.client_of(b"loop"), "left")
        clock.now += 0.02
    assert sorted(reg.known) == ["auto-1", "site-x"]
    shards, _ = registry(num_shards=2)
    assert refusal(shards, b"anon") == "no_id"  # with shards handed out, an anonymous join names a shard


def test_one_key_holds_a_bounded_number_of_ids():
    reg, _ = registry(max_ids_per_key=3)
    for i in range(3):
        admit(reg, bytes([i]), f"site-{i}", key=KEY_A)
    reg.record_contribution("site-0")
    reg.remove("site-0", "left")
    reg.remove("site-1", "left")
    admit(reg, b"n", "site-new", key=KEY_A)  # site-1 (gone, never contributed) made room; site-0 stays
    assert sorted(reg.known) == ["site-0", "site-2", "site-new"]
    assert refusal(reg, b"m", "site-more", key=KEY_A) == "too_many_ids"  # the rest are connected or contributed
    assert admit(reg, b"k", "site-b", key=KEY_B).event == "joined"  # another key has its own room
