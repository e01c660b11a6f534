"""Who is in the federation, and the rules for letting a peer in: pure state, no sockets, no logs.

The server hands every JOIN to :meth:`Registry.admit` and logs or answers what comes back. The
rules: an id in use by a connected client is refused, and so is an id first used with another
CURVE key; new joins are rate-limited; a joined peer's repeated JOINs are answered at most every
``REWELCOME_EVERY_S``; a client that asks for data gets the lowest free shard, or the one it had;
after a resume, the shards of the clients in the checkpoint are kept for them for
``RESERVE_SHARDS_S``. Time comes from an injectable clock, so every rule is unit-tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .data import shard_name

RESERVE_SHARDS_S = 60.0  # after a resume, a returning client's shard is kept for it this long
REWELCOME_EVERY_S = 2.0  # a joined peer's repeated JOINs are answered at most this often


class JoinRefused(Exception):
    """A JOIN that is not admitted: ``code`` for the ERROR message, ``reason`` for people."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class ClientRecord:
    """A registered client: its id, its ZeroMQ peer id, and what it told us at join."""

    client_id: str
    peer: bytes
    num_examples: int
    shard: str | None = None
    key: str | None = None  # its CURVE public key, when the server encrypts


@dataclass(frozen=True)
class Admitted:
    """An admitted JOIN: the client, and whether it is new ("joined"), an id seen before
    ("rejoined"), or a joined peer asking again ("welcomed again")."""

    record: ClientRecord
    event: str


class TokenBucket:
    """At most ``rate`` events per second on average, in bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._stamp = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Registry:
    """The connected clients (by id and by peer) and every id ever admitted, with its shard and key."""

    def __init__(self, num_shards: int = 0, join_rate: float = 100.0, clock: Callable[[], float] = time.monotonic):
        self.num_shards = num_shards
        self.clock = clock
        self.clients: dict[str, ClientRecord] = {}  # connected now
        self.known: dict[str, dict[str, Any]] = {}  # every id ever admitted: {"shard", "key"}
        self.removed: dict[str, str] = {}  # client id -> why it was last removed
        self.next_client_number = 1
        self._by_peer: dict[bytes, str] = {}
        self._last_welcome: dict[bytes, float] = {}
        self._reserved_until = float("-inf")
        self._joins = TokenBucket(rate=join_rate, burst=max(1, int(10 * join_rate)), clock=clock)  # 10 s worth

    def client_of(self, peer: bytes) -> str | None:
        """The id of the client on this peer, if it joined."""
        return self._by_peer.get(peer)

    def admit(self, peer: bytes, wanted: str, *, wants_shard: bool, num_examples: int, key: str | None) -> Admitted:
        """Admit a JOIN from ``peer`` asking for id ``wanted`` ("" lets the registry pick), or raise
        :class:`JoinRefused` saying why not."""
        known = self._by_peer.get(peer)
        if known is not None:
            if wanted not in ("", known):
                raise JoinRefused("already_joined", f"peer already joined as {known}, now asks for {wanted!r}")
            if self.clock() - self._last_welcome[peer] < REWELCOME_EVERY_S:
                raise JoinRefused("join_flood", f"client {known} repeats JOIN more than once per "
                                                f"{REWELCOME_EVERY_S:g}s; ignored")
            self._last_welcome[peer] = self.clock()
            return Admitted(self.clients[known], "welcomed again")
        if wanted and wanted in self.clients:
            raise JoinRefused("id_taken", f"client id {wanted!r} is in use by a connected client; "
                                          "retry once that client is gone")
        if wanted and self.known.get(wanted, {}).get("key") not in (None, key):
            raise JoinRefused("id_bound_to_key", f"client id {wanted!r} belongs to another client's key")
        if not self._joins.take():
            raise JoinRefused("busy", "too many join requests; retry in a few seconds")
        client_id, shard = self._id_and_shard(wanted, wants_shard)
        record = ClientRecord(client_id, peer, num_examples, shard, key)
        event = "rejoined" if client_id in self.known else "joined"
        self.clients[client_id] = record
        self.known[client_id] = {"shard": shard, "key": key}
        self._by_peer[peer] = client_id
        self._last_welcome[peer] = self.clock()
        return Admitted(record, event)

    def remove(self, client_id: str, reason: str) -> bool:
        """Forget a connected client (it stays known); False if it was not connected."""
        record = self.clients.pop(client_id, None)
        if record is None:
            return False
        self._by_peer.pop(record.peer, None)
        self._last_welcome.pop(record.peer, None)
        self.removed[client_id] = reason
        return True

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: every id ever admitted, and the next id number to assign."""
        return {"known_clients": self.known, "next_client_number": self.next_client_number}

    @staticmethod
    def parse_known(raw: Any) -> dict[str, dict[str, Any]]:
        """A checkpoint's ``known_clients`` in the shape :meth:`restore` takes; raises TypeError or
        AttributeError if it is not a mapping of ids to {"shard", "key"} mappings."""
        return {str(cid): {"shard": entry.get("shard"), "key": entry.get("key")} for cid, entry in raw.items()}

    def restore(self, known: dict[str, dict[str, Any]], next_client_number: int) -> None:
        """Take back a checkpoint's clients; their shards are kept for them for RESERVE_SHARDS_S."""
        self.known = known
        self.next_client_number = next_client_number
        self._reserved_until = self.clock() + RESERVE_SHARDS_S

    def _id_and_shard(self, wanted: str, wants_shard: bool) -> tuple[str, str | None]:
        if not wants_shard:
            return wanted or self._new_client_id(), None
        previous = self.known.get(wanted, {}).get("shard") if wanted else None
        if previous and previous not in {r.shard for r in self.clients.values()}:
            return wanted, previous
        index = self._free_shard_index()
        if index is None:
            raise JoinRefused("no_shards", f"all {self.num_shards} data shards are taken; this client is not needed"
                              if self.num_shards else
                              "this server does not assign data shards; give the client its own data")
        return wanted or f"client-{index}", shard_name(index)

    def _free_shard_index(self) -> int | None:
        """The lowest shard not held by a client, whose conventional id no connected client uses and
        (shortly after a resume) that no returning client is expected to reclaim."""
        taken = {r.shard for r in self.clients.values()}
        if self.clock() < self._reserved_until:
            taken |= {entry["shard"] for entry in self.known.values()}
        for index in range(1, self.num_shards + 1):
            if shard_name(index) not in taken and f"client-{index}" not in self.clients:
                return index
        return None

    def _new_client_id(self) -> str:
        while f"client-{self.next_client_number}" in self.clients:
            self.next_client_number += 1
        client_id = f"client-{self.next_client_number}"
        self.next_client_number += 1
        return client_id
