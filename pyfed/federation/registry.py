"""Who is in the federation, and the rules for letting a peer in: pure state, no sockets, no logs.

The server hands every JOIN to :meth:`Registry.admit` and logs or answers what comes back. The
rules:

* an id in use by a connected client is refused, and so is an id first used with another CURVE
  key, whether the client asked for it or the server would assign it: an id (and its shard) bound
  to one key is never handed to another;
* new joins are rate-limited; a joined peer's repeated JOINs are answered at most every
  ``REWELCOME_EVERY_S``;
* a client that asks for data gets the lowest free shard and the id ``client-<k>`` that goes with
  it, or the shard it had; after a resume, the shards of the clients in the checkpoint are kept for
  them for ``RESERVE_SHARDS_S``;
* a client that brings its own data and no id gets ``auto-<n>``, a namespace of its own; when the
  server hands out shards, such an anonymous join is refused (a site with its own data names itself);
* the table of known ids stays bounded: an anonymous client gets back a free ``auto-<n>`` id its
  key already holds before a new one is made, so leaving and joining again does not grow the table;
  one key holds at most ``max_ids_per_key`` ids, and at that cap its oldest ids that are not
  connected and never sent an update are forgotten to make room (or the join is refused).

Time comes from an injectable clock, so every rule is unit-tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyfed.wire.protocol import AdmissionEvent, ErrorCode, is_client_id, is_shard_name, shard_name

RESERVE_SHARDS_S = 60.0  # after a resume, a returning client's shard is kept for it this long
REWELCOME_EVERY_S = 2.0  # a joined peer's repeated JOINs are answered at most this often
MAX_IDS_PER_KEY = 4096  # ids one key (or, without encryption, all clients together) may hold
AUTO_ID_PREFIX = "auto-"  # ids for anonymous clients that bring their own data
SHARD_ID_PREFIX = "client-"  # client-k holds shard client-k.npz


class JoinRefused(Exception):
    """A JOIN that is not admitted: ``code`` for the ERROR message, ``reason`` for people."""

    def __init__(self, code: ErrorCode, reason: str):
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
    """An admitted JOIN: the client, and whether it is new, an id seen before, or a joined peer asking again."""

    record: ClientRecord
    event: AdmissionEvent


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

    def __init__(self, num_shards: int = 0, join_rate: float = 100.0, clock: Callable[[], float] = time.monotonic,
                 max_ids_per_key: int = MAX_IDS_PER_KEY):
        self.num_shards = num_shards
        self.clock = clock
        self.max_ids_per_key = max_ids_per_key
        self.clients: dict[str, ClientRecord] = {}  # connected now
        #: every id admitted and still remembered: {"shard", "key", "contributed"}
        self.known: dict[str, dict[str, Any]] = {}
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
                raise JoinRefused(ErrorCode.ALREADY_JOINED, f"peer already joined as {known}, now asks for {wanted!r}")
            if self.clock() - self._last_welcome[peer] < REWELCOME_EVERY_S:
                raise JoinRefused(ErrorCode.JOIN_FLOOD, f"client {known} repeats JOIN more than once per "
                                                f"{REWELCOME_EVERY_S:g}s; ignored")
            self._last_welcome[peer] = self.clock()
            return Admitted(self.clients[known], AdmissionEvent.WELCOMED_AGAIN)
        if wanted and wanted in self.clients:
            raise JoinRefused(ErrorCode.ID_TAKEN, f"client id {wanted!r} is in use by a connected client; "
                                          "retry once that client is gone")
        if wanted and not self._available(wanted, key):
            raise JoinRefused(ErrorCode.ID_BOUND_TO_KEY, f"client id {wanted!r} belongs to another client's key")
        if not wanted and not wants_shard and self.num_shards:
            raise JoinRefused(ErrorCode.NO_ID, "this server hands out data shards; a client that brings its own data "
                                       "must name itself (--client-id / CLIENT_ID)")
        if not self._joins.take():
            raise JoinRefused(ErrorCode.BUSY, "too many join requests; retry in a few seconds")
        client_id, shard = self._id_and_shard(wanted, wants_shard, key)
        if client_id not in self.known:
            self._make_room(key)
        record = ClientRecord(client_id, peer, num_examples, shard, key)
        event = AdmissionEvent.REJOINED if client_id in self.known else AdmissionEvent.JOINED
        previous = self.known.get(client_id, {})
        self.clients[client_id] = record
        self.known[client_id] = {"shard": shard, "key": key, "contributed": previous.get("contributed", False)}
        self._by_peer[peer] = client_id
        self._last_welcome[peer] = self.clock()
        return Admitted(record, event)

    def record_contribution(self, client_id: str) -> None:
        """``client_id`` delivered an update: its id is never forgotten to make room."""
        if client_id in self.known:
            self.known[client_id]["contributed"] = True

    def remove(self, client_id: str, reason: str) -> bool:
        """Forget a connected client (its id stays known, bound to its key); False if it was not connected."""
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
        """A checkpoint's ``known_clients`` in the shape :meth:`restore` takes; raises ValueError
        naming the entry if it is not a mapping of client ids to {"shard", "key", ...} mappings."""
        if not isinstance(raw, dict):
            raise ValueError(f"known_clients must be a mapping, got {type(raw).__name__}")
        known = {}
        for client_id, entry in raw.items():
            if not is_client_id(client_id) or not isinstance(entry, dict):
                raise ValueError(f"known_clients entry {str(client_id)[:70]!r} is not a client id with a mapping")
            shard, key = entry.get("shard"), entry.get("key")
            if shard is not None and not is_shard_name(shard):
                raise ValueError(f"known_clients[{client_id!r}].shard {str(shard)[:70]!r} is not a shard file name")
            if key is not None and not (isinstance(key, str) and len(key) == 40):
                raise ValueError(f"known_clients[{client_id!r}].key is not a 40-character public key")
            contributed = entry.get("contributed", True)  # checkpoints before the flag: keep every id
            if not isinstance(contributed, bool):
                raise ValueError(f"known_clients[{client_id!r}].contributed is not true or false")
            known[client_id] = {"shard": shard, "key": key, "contributed": contributed}
        return known

    def restore(self, known: dict[str, dict[str, Any]], next_client_number: int) -> None:
        """Take back a checkpoint's clients; their shards are kept for them for RESERVE_SHARDS_S."""
        self.known = known
        self.next_client_number = next_client_number
        self._reserved_until = self.clock() + RESERVE_SHARDS_S

    def _available(self, client_id: str, key: str | None) -> bool:
        """Whether ``key`` may use ``client_id``: unknown, or bound to no key or to this one."""
        return self.known.get(client_id, {}).get("key") in (None, key)

    def _id_and_shard(self, wanted: str, wants_shard: bool, key: str | None) -> tuple[str, str | None]:
        if not wants_shard:
            return wanted or self._new_client_id(key), None
        previous = self.known.get(wanted, {}).get("shard") if wanted else None
        if previous and previous not in {r.shard for r in self.clients.values()}:
            return wanted, previous
        index = self._free_shard_index(key, wanted)
        if index is None:
            raise JoinRefused(ErrorCode.NO_SHARDS, f"all {self.num_shards} data shards are taken; this client is not needed"
                              if self.num_shards else
                              "this server does not assign data shards; give the client its own data")
        return wanted or f"{SHARD_ID_PREFIX}{index}", shard_name(index)

    def _free_shard_index(self, key: str | None, wanted: str) -> int | None:
        """The lowest shard that no connected client holds, that no id bound to another key holds,
        whose id ``client-<k>`` is free for this key (unless the client names itself) and that
        (shortly after a resume) no returning client is expected to reclaim."""
        taken = {r.shard for r in self.clients.values()}
        taken |= {entry["shard"] for entry in self.known.values() if entry["key"] not in (None, key)}
        if self.clock() < self._reserved_until:
            taken |= {entry["shard"] for entry in self.known.values()}
        own = wanted.removeprefix(SHARD_ID_PREFIX)
        if wanted.startswith(SHARD_ID_PREFIX) and own.isdigit() and 1 <= int(own) <= self.num_shards \
                and shard_name(int(own)) not in taken:
            return int(own)  # client-k back at a server that does not know it (say, it restarted before its first checkpoint)
        for index in range(1, self.num_shards + 1):
            if shard_name(index) in taken:
                continue
            if wanted:  # a client that names itself keeps its name, whatever shard it gets
                return index
            conventional = f"{SHARD_ID_PREFIX}{index}"
            if conventional not in self.clients and self._available(conventional, key):
                return index
        return None

    def _new_client_id(self, key: str | None) -> str:
        """A free ``auto-<n>`` this key held before (lowest n), else the next unused number."""
        own = [cid for cid, entry in self.known.items()
               if cid.startswith(AUTO_ID_PREFIX) and entry["key"] == key and cid not in self.clients]
        if own:
            return min(own, key=lambda cid: (len(cid), cid))
        while any(f"{AUTO_ID_PREFIX}{self.next_client_number}" in table for table in (self.known, self.clients)):
            self.next_client_number += 1
        client_id = f"{AUTO_ID_PREFIX}{self.next_client_number}"
        self.next_client_number += 1
        return client_id

    def _make_room(self, key: str | None) -> None:
        """Before ``key`` takes a new id: if it holds ``max_ids_per_key`` already, forget its oldest ids
        that are neither connected nor contributed anything; if none can go, refuse the join."""
        held = [cid for cid, entry in self.known.items() if entry["key"] == key]
        excess = len(held) - self.max_ids_per_key + 1
        if excess <= 0:
            return
        spare = [cid for cid in held if cid not in self.clients and not self.known[cid]["contributed"]]
        if len(spare) < excess:
            raise JoinRefused(ErrorCode.TOO_MANY_IDS, f"this key already holds {len(held)} client ids, the most one key may "
                                              f"hold ({self.max_ids_per_key}); reuse one of them")
        for cid in spare[:excess]:
            del self.known[cid]
