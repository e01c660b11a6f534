"""One round of SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020), the protocol of SecAgg (Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, section 4) over a
sparse neighbour graph. Pure logic: a client's half (:class:`ClientRound`) and the server's
(:class:`ServerRound`), driven by whatever carries their messages; the primitives are in
:mod:`pyfed.federation.secagg`.

The stages, for the ``n`` clients asked (U0):

1. **Advertise keys.** Each client makes two X25519 key pairs for this round: one to agree
   pairwise mask seeds, one to agree the keys its shares travel under, and an Ed25519 key pair to
   sign the shares it deals; it draws its self-mask seed ``b`` and sends the three public keys, a
   commitment to ``b`` (SHA-256, bound to the round and its id) and the weight ``w`` (its examples)
   it will mask its update by, which the server holds to what it declared when it joined. Those that
   answer are U1. Fewer than ``threshold``: the round is abandoned.
2. **Share keys.** The server sends everyone U1's public keys. Each client works out its neighbours
   (the Harary graph over U1 put in an order every client derives from the round's context),
   Shamir-shares ``b`` and its mask private key with threshold ``t`` among its neighbours and itself,
   signs every share (round, owner, holder, kind, share), and sends each neighbour its two signed
   shares sealed under their pairwise key (ChaCha20-Poly1305, bound to sender, receiver and round).
   Those that send are U2.
3. **Masked input.** The server hands each client the boxes sealed for it; a box that does not open,
   or holds a share its sender did not sign, is named instead of masking (the sender is left out).
   The client quantises its clipped update (a fixed-point integer in [0, R], R =
   2^quantisation_bits - 1, by unbiased stochastic rounding), scales it by ``w`` and appends ``w``;
   adds its self-mask PRG(b) and, for each neighbour v in U2, +PRG(s_uv) if it comes first in the
   order, -PRG(s_uv) if second; all in the ring Z_{2^ring_bits}. The server adds the vectors as they
   arrive (memory: one vector). Those that send are U3; fewer than ``t``, or than the minimum of
   parties (``min_clients``), and nothing is unmasked.
4. **Unmask.** The server names the survivors U3 and the dropped U2 \\ U3; each survivor sends, for
   each neighbour (and itself) that survived, its share of that one's ``b``, and for each neighbour
   that dropped, its share of that one's mask private key, each with its owner's signature: never
   both for one client (a client refuses a request that names one client in both, names fewer
   survivors than ``min_clients``, or is otherwise inconsistent). The server checks every signature
   (a share its owner did not sign is refused, and its sender dropped), rebuilds each secret from
   ``t`` signed shares and checks it (``b`` against its commitment, a mask key against its public
   key: a wrong one names its owner, who dealt it, and the attempt is tried again without it),
   removes the masks, and is left with sum w_i q_i and sum w_i. That total weight must be the
   survivors' declared weights and every coordinate of the sum must lie in [0, R sum w_i] (a mean in
   [-clip, clip]), or the result is refused: the weighted mean of the updates, and nothing about any
   one of them.

What each side can learn (semi-honest server, a colluding minority below ``t``): see the README.
The ring must hold sum w_i * R: the server chooses ``ring_bits`` from the weights the clients
declared, and a client refuses to mask a weight the ring cannot hold.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pyfed.federation.secagg import (COMMITMENT_BYTES, MAX_RING_BITS, PUBLIC_KEY_BYTES, SECRET_BYTES, SHARE_BYTES,
                                     SIGNATURE_BYTES, KeyPair, SecAggError, SigningKey, check_signing_key, commit,
                                     dequantise, expand_mask, neighbours, open_sealed, quantise, rebuild_secret,
                                     ring_mask, seal, share_secret, signature_holds)

from pyfed.wire.protocol import SECAGG_MAX_BOX_BYTES as MAX_BOX_BYTES  # two signed shares, sealed, and room
from pyfed.wire.protocol import MessageType, b64, unb64


SECAGG_MAX_NEIGHBOURS = 1000  # what the server's message limits leave room for (a round of up to 1001 clients)


class BadBoxes(SecAggError):
    """Boxes of shares that did not open (altered, or sealed by a client that is not who it says):
    the client names their senders instead of sending a masked input."""

    def __init__(self, senders: Sequence[str]):
        self.senders = sorted(senders)
        super().__init__(f"the boxes from {', '.join(self.senders[:5])} did not open")


class SecAggAborted(RuntimeError):
    """The round cannot finish securely (too few clients left at some stage); nothing was revealed."""


class SecAggBlamed(SecAggAborted):
    """Secrets rebuilt from their owners' own signed shares did not check out: those owners dealt
    shares of something else than they committed to. The attempt ends; ``blamed`` (client -> why)
    are left out of the next."""

    def __init__(self, blamed: Mapping[str, str]):
        self.blamed = dict(sorted(blamed.items()))
        super().__init__("; ".join(f"{client_id}: {why}" for client_id, why in self.blamed.items()))


class SecAggRefused(SecAggError):
    """The unmasked sum cannot be the survivors' clipped updates (its total weight is not theirs, or
    a coordinate of its mean lies outside the clipping range): a client masked something else. Who
    cannot be told (that is what secure aggregation hides), so the round's result is refused."""


@dataclass(frozen=True)
class RoundSetup:
    """What the server fixes for one attempt at one round, sent with the FIT request."""

    context: bytes  # run, round and attempt: binds every key, box and mask to this attempt
    threshold: int
    degree: int  # neighbours in the graph; n - 1 or more: everyone
    quantisation_bits: int
    ring_bits: int
    clip: float  # each coordinate of an update is clipped to [-clip, clip] before quantisation
    min_clients: int = 2  # no sum of fewer survivors is unmasked (a client refuses to reveal for one)

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise SecAggError(f"the threshold must be at least 2, not {self.threshold}")
        if self.min_clients < 2:
            raise SecAggError(f"the fewest clients a sum is unmasked for must be at least 2, not {self.min_clients}")
        if not 1 <= self.quantisation_bits < self.ring_bits <= MAX_RING_BITS:
            raise SecAggError(f"need 1 <= quantisation bits ({self.quantisation_bits}) < ring bits "
                              f"({self.ring_bits}) <= {MAX_RING_BITS}")
        if not self.clip > 0:
            raise SecAggError(f"the clipping range must be positive, not {self.clip}")
        if self.degree < 2:
            raise SecAggError(f"the neighbour graph's degree must be at least 2, not {self.degree}")


@dataclass(frozen=True)
class PublicKeys:
    mask_key: bytes  # agrees pairwise mask seeds
    share_key: bytes  # agrees the keys shares are sealed under
    sign_key: bytes  # verifies the shares its owner deals (Ed25519)


@dataclass(frozen=True)
class Advertised:
    """What a client says in stage 1: its public keys, its commitment to its self-mask seed, the
    weight (examples) it will mask its update by, and its signature of all that with its new signing
    key (which shows it holds that key, so a neighbour can check the shares it deals)."""

    keys: PublicKeys
    commitment: bytes
    weight: int
    signature: bytes = b""

    def statement(self, context: bytes, client_id: str) -> bytes:
        return b"|".join([b"pyfed-secagg-keys", context, client_id.encode(), self.keys.mask_key, self.keys.share_key,
                          self.keys.sign_key, self.commitment, str(self.weight).encode()])


def share_statement(context: bytes, owner: str, holder: str, kind: str, share: bytes) -> bytes:
    """What an owner signs for each share it deals: the round, who dealt it, who holds it, which
    secret ("b": the self-mask seed, "s": the mask key), and the share."""
    return b"|".join([b"pyfed-secagg-share", context, owner.encode(), holder.encode(), kind.encode(), share])


def seed_binding(context: bytes, owner: str) -> bytes:
    return context + b"|" + owner.encode()


def ring_bits_for(total_weight: int, quantisation_bits: int) -> int:
    """The fewest ring bits that hold sum w_i * (2^quantisation_bits - 1) for weights summing to
    ``total_weight`` (and the sum of the weights themselves)."""
    needed = quantisation_bits + max(1, int(total_weight)).bit_length()
    if needed > MAX_RING_BITS:
        raise SecAggError(f"{total_weight} examples at {quantisation_bits} quantisation bits need a {needed}-bit ring; "
                          f"the most is {MAX_RING_BITS}")
    return needed


def graph_order_seed(context: bytes) -> bytes:
    return hashlib.sha256(b"pyfed-secagg-graph:" + context).digest()


def _indices(roster: Sequence[str]) -> dict[str, int]:
    """Each client's Shamir x coordinate: its place (from 1) in the sorted roster."""
    return {cid: index for index, cid in enumerate(sorted(roster), start=1)}


def _associated(setup: RoundSetup, sender: str, receiver: str) -> bytes:
    return b"|".join([setup.context, sender.encode(), receiver.encode()])


def _check_roster(roster: Mapping[str, PublicKeys], setup: RoundSetup) -> None:
    if len(roster) < setup.threshold:
        raise SecAggAborted(f"{len(roster)} clients advertised keys; the threshold is {setup.threshold}")
    keys = [k for entry in roster.values() for k in (entry.mask_key, entry.share_key, entry.sign_key)]
    if any(len(k) != PUBLIC_KEY_BYTES for k in keys):
        raise SecAggError(f"a public key in the roster is not {PUBLIC_KEY_BYTES} bytes")
    if len(set(keys)) != len(keys):
        raise SecAggError("the roster repeats a public key (every client's keys must be its own)")


class ClientRound:
    """A client's half of one attempt at one round."""

    def __init__(self, client_id: str, setup: RoundSetup, rng: np.random.Generator | None = None):
        self.client_id, self.setup = client_id, setup
        self._mask_pair, self._share_pair, self._signing = KeyPair(), KeyPair(), SigningKey()
        self._rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
        self._self_seed = os.urandom(SECRET_BYTES)  # drawn now: it is committed to with the keys
        self._roster: dict[str, PublicKeys] | None = None
        self._neighbours: list[str] = []
        self._own_shares: dict[str, tuple[bytes, bytes]] = {}  # kind -> (its own share, its signature)
        self._received: dict[str, dict[str, tuple[bytes, bytes]]] = {}  # neighbour -> kind -> (share, signature)
        self._masked_with: set[str] = set()
        self._unmasked = False

    def advertise(self) -> PublicKeys:
        return PublicKeys(self._mask_pair.public, self._share_pair.public, self._signing.public)

    def commitment(self) -> bytes:
        """The commitment to this client's self-mask seed, sent with its keys."""
        return commit(self._self_seed, seed_binding(self.setup.context, self.client_id))

    def advertised(self, weight: int) -> Advertised:
        """Stage 1: what this client says, signed."""
        unsigned = Advertised(self.advertise(), self.commitment(), int(weight))
        return Advertised(unsigned.keys, unsigned.commitment, unsigned.weight,
                          self._signing.sign(unsigned.statement(self.setup.context, self.client_id)))

    def share_keys(self, roster: Mapping[str, PublicKeys]) -> dict[str, bytes]:
        """Stage 2: this client's signed shares, sealed for each neighbour (neighbour -> box)."""
        if self._roster is not None:
            raise SecAggError("the roster came twice in one round")
        _check_roster(roster, self.setup)
        if roster.get(self.client_id) != self.advertise():
            raise SecAggError("the roster does not hold this client's own keys")
        self._roster = dict(roster)
        graph = neighbours(list(roster), self.setup.degree, graph_order_seed(self.setup.context))
        self._neighbours = graph[self.client_id]
        index = _indices(list(roster))
        holders = [index[cid] for cid in [*self._neighbours, self.client_id]]
        dealt = {"b": share_secret(self._self_seed, self.setup.threshold, holders),
                 "s": share_secret(self._mask_pair.private_bytes(), self.setup.threshold, holders)}

        def signed(holder: str, kind: str) -> tuple[bytes, bytes]:
            share = dealt[kind][index[holder]]
            return share, self._signing.sign(share_statement(self.setup.context, self.client_id, holder, kind, share))

        self._own_shares = {kind: signed(self.client_id, kind) for kind in ("b", "s")}
        boxes = {}
        for neighbour in self._neighbours:
            (b_share, b_sig), (s_share, s_sig) = signed(neighbour, "b"), signed(neighbour, "s")
            key = self._share_pair.agree(roster[neighbour].share_key, self.setup.context + b"|shares")
            boxes[neighbour] = seal(key, b_share + s_share + b_sig + s_sig,
                                    _associated(self.setup, self.client_id, neighbour))
        return boxes

    def masked_input(self, boxes: Mapping[str, bytes], update: np.ndarray, weight: int) -> np.ndarray:
        """Stage 3: the clipped, quantised, weighted update with its weight appended, masked; ``boxes``
        are the neighbours' sealed shares for this client (sender -> box), which name U2."""
        if self._roster is None or not self._own_shares:
            raise SecAggError("masked input asked before the keys were shared")
        if self._masked_with or self._unmasked:
            raise SecAggError("masked input asked twice in one round")
        strangers = set(boxes) - set(self._neighbours)
        if strangers:
            raise SecAggError(f"shares came from {sorted(strangers)[:3]}, who are not this client's neighbours")
        if len(boxes) + 1 < self.setup.threshold:
            raise SecAggAborted(f"only {len(boxes)} neighbours shared keys; the threshold is {self.setup.threshold}")
        setup = self.setup
        if not 0 < weight or weight * (2**setup.quantisation_bits - 1) >= 2**setup.ring_bits:
            raise SecAggError(f"a weight of {weight} does not fit the {setup.ring_bits}-bit ring")
        received, bad = {}, []
        for sender, box in boxes.items():
            try:
                received[sender] = self._open(sender, box)
            except SecAggError:
                bad.append(sender)
        if bad:  # name them rather than mask: a masked input would leave pairwise masks that never cancel
            raise BadBoxes(bad)
        self._received = received  # all or nothing: a refused stage leaves no half-kept shares
        ring = ring_mask(setup.ring_bits)
        values = np.append(quantise(np.ravel(update), setup.clip, setup.quantisation_bits, self._rng) * np.uint64(weight),
                           np.uint64(weight))
        values += expand_mask(self._self_seed, values.size, setup.ring_bits)
        index = _indices(list(self._roster))
        for neighbour in boxes:
            seed = self._mask_pair.agree(self._roster[neighbour].mask_key, setup.context + b"|masks")
            mask = expand_mask(seed, values.size, setup.ring_bits)
            if index[self.client_id] < index[neighbour]:
                values += mask
            else:
                values -= mask
        self._masked_with = set(boxes)
        return values & ring

    def _open(self, sender: str, box: bytes) -> dict[str, tuple[bytes, bytes]]:
        """The two signed shares in ``sender``'s box (SecAggError if it does not open, or a share in it
        does not carry ``sender``'s signature)."""
        setup = self.setup
        if len(box) > MAX_BOX_BYTES:
            raise SecAggError(f"the box from {sender} is {len(box)} bytes, more than a box of shares")
        key = self._share_pair.agree(self._roster[sender].share_key, setup.context + b"|shares")
        opened = open_sealed(key, box, _associated(setup, sender, self.client_id))
        if len(opened) != 2 * (SHARE_BYTES + SIGNATURE_BYTES):
            raise SecAggError(f"the box from {sender} does not hold two signed shares")
        b_share, s_share = opened[:SHARE_BYTES], opened[SHARE_BYTES:2 * SHARE_BYTES]
        b_sig, s_sig = opened[2 * SHARE_BYTES:2 * SHARE_BYTES + SIGNATURE_BYTES], opened[2 * SHARE_BYTES + SIGNATURE_BYTES:]
        shares = {"b": (b_share, b_sig), "s": (s_share, s_sig)}
        for kind, (share, signature) in shares.items():
            statement = share_statement(setup.context, sender, self.client_id, kind, share)
            if not signature_holds(self._roster[sender].sign_key, signature, statement):
                raise SecAggError(f"the share of {sender}'s {kind} does not carry {sender}'s signature")
        return shares

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, tuple[str, bytes, bytes]]:
        """Stage 4: for each survivor among this client's neighbours and itself, its share of that
        one's self-mask seed ("b"); for each dropped neighbour, its share of that one's mask key ("s");
        each with its owner's signature. A request that could reveal both for one client, that would
        unmask a sum of fewer than ``min_clients``, or that does not fit what this client saw, is refused."""
        if not self._masked_with or self._unmasked:
            raise SecAggError("unmasking asked before masked input, or twice")
        survivors_set, dropped_set = set(survivors), set(dropped)
        if survivors_set & dropped_set:
            raise SecAggError(f"the server names {sorted(survivors_set & dropped_set)[:3]} as both survived and dropped")
        if self.client_id not in survivors_set:
            raise SecAggError("the server names this client, which sent its masked input, as dropped")
        if len(survivors_set) < self.setup.threshold:
            raise SecAggAborted(f"{len(survivors_set)} survivors; the threshold is {self.setup.threshold}")
        if len(survivors_set) < self.setup.min_clients:
            raise SecAggError(f"the server asks to unmask a sum of {len(survivors_set)} clients; this round unmasks "
                              f"none of fewer than {self.setup.min_clients}")
        if dropped_set - self._masked_with - set(self._roster or {}):
            raise SecAggError("the server names as dropped a client that was not in the round")
        self._unmasked = True
        share, signature = self._own_shares["b"]
        shares: dict[str, tuple[str, bytes, bytes]] = {self.client_id: ("b", share, signature)}
        for neighbour, held in self._received.items():
            kind = "b" if neighbour in survivors_set else "s" if neighbour in dropped_set else None
            if kind is not None:
                shares[neighbour] = (kind, *held[kind])
        return shares


@dataclass
class _Collected:
    roster: dict[str, PublicKeys] = field(default_factory=dict)
    commitments: dict[str, bytes] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # what each client said it masks its update by
    boxes: dict[str, dict[str, bytes]] = field(default_factory=dict)  # receiver -> sender -> box
    shared: set[str] = field(default_factory=set)  # U2
    masked: set[str] = field(default_factory=set)  # U3
    shares: dict[str, dict[int, bytes]] = field(default_factory=dict)  # whose secret -> holder index -> share
    unmasked: set[str] = field(default_factory=set)


class ServerRound:
    """The server's half of one attempt at one round: it routes, sums, checks what it can, and
    unmasks only the sum. ``max_weights``: the most each client may mask its update by (what it
    declared when it joined)."""

    def __init__(self, setup: RoundSetup, asked: Sequence[str], length: int, max_weights: Mapping[str, int]):
        self.setup, self.asked, self.length = setup, set(asked), length  # length: the update's coordinates
        self.max_weights = dict(max_weights)
        self._state = _Collected()
        self._graph: dict[str, list[str]] = {}
        self._index: dict[str, int] = {}
        self._sum = np.zeros(length + 1, np.uint64)

    # stage 1
    def add_keys(self, client_id: str, advertised: Advertised) -> None:
        keys = advertised.keys
        if client_id not in self.asked or self._graph:
            raise SecAggError(f"{client_id} advertised keys it was not asked for")
        if client_id in self._state.roster:
            raise SecAggError(f"{client_id} advertised keys twice")
        if any(len(k) != PUBLIC_KEY_BYTES for k in (keys.mask_key, keys.share_key, keys.sign_key)):
            raise SecAggError(f"{client_id}'s public keys are not {PUBLIC_KEY_BYTES} bytes each")
        if len(advertised.commitment) != COMMITMENT_BYTES:
            raise SecAggError(f"{client_id}'s commitment is not {COMMITMENT_BYTES} bytes")
        if not 0 < advertised.weight <= self.max_weights.get(client_id, 0):
            raise SecAggError(f"{client_id} would mask its update by {advertised.weight} examples; it may by at most "
                              f"{self.max_weights.get(client_id, 0)} (what it declared when it joined)")
        mine = (keys.mask_key, keys.share_key, keys.sign_key)
        taken = {k for entry in self._state.roster.values() for k in (entry.mask_key, entry.share_key, entry.sign_key)}
        if len(set(mine)) != len(mine) or set(mine) & taken:
            raise SecAggError(f"{client_id} advertised a public key that is not its own (repeated)")
        probe = KeyPair()  # a key of small order would leave its neighbours no usable shared key
        for key in (keys.mask_key, keys.share_key):
            probe.agree(key, b"pyfed-secagg:key-check")
        check_signing_key(keys.sign_key)
        if not signature_holds(keys.sign_key, advertised.signature, advertised.statement(self.setup.context, client_id)):
            raise SecAggError(f"{client_id}'s keys do not carry its signature (a signing key it does not hold, or "
                              f"not an Ed25519 key)")
        self._state.roster[client_id] = keys
        self._state.commitments[client_id] = advertised.commitment
        self._state.weights[client_id] = advertised.weight

    def roster(self) -> dict[str, PublicKeys]:
        """Close stage 1: the keys of U1, for every client in it."""
        if not self._graph:
            _check_roster(self._state.roster, self.setup)
            self._graph = neighbours(list(self._state.roster), self.setup.degree, graph_order_seed(self.setup.context))
            self._index = _indices(list(self._state.roster))
        return dict(self._state.roster)

    # stage 2
    def add_shares(self, client_id: str, boxes: Mapping[str, bytes]) -> None:
        if not self._graph or client_id not in self._graph or self._state.masked:
            raise SecAggError(f"{client_id} sent shares it was not asked for")
        if client_id in self._state.shared:
            raise SecAggError(f"{client_id} sent its shares twice")
        if set(boxes) != set(self._graph[client_id]):
            raise SecAggError(f"{client_id} sent shares for other clients than its neighbours")
        if any(len(box) > MAX_BOX_BYTES for box in boxes.values()):
            raise SecAggError(f"{client_id} sent a box larger than a box of shares")
        for receiver, box in boxes.items():
            self._state.boxes.setdefault(receiver, {})[client_id] = bytes(box)
        self._state.shared.add(client_id)

    def boxes_for(self, client_id: str) -> dict[str, bytes]:
        """Close stage 2 (for ``client_id``): the boxes U2's members sealed for it."""
        if len(self._state.shared) < self.setup.threshold:
            raise SecAggAborted(f"{len(self._state.shared)} clients shared keys; the threshold is {self.setup.threshold}")
        return {sender: box for sender, box in self._state.boxes.get(client_id, {}).items()
                if sender in self._state.shared}

    # stage 3
    def add_masked(self, client_id: str, vector: np.ndarray) -> None:
        if client_id not in self._state.shared or self._state.unmasked:
            raise SecAggError(f"{client_id} sent a masked input it was not asked for")
        if client_id in self._state.masked:
            raise SecAggError(f"{client_id} sent its masked input twice")
        vector = np.asarray(vector)
        if vector.shape != (self.length + 1,) or vector.dtype.kind != "u":
            raise SecAggError(f"{client_id}'s masked input is {vector.dtype}{list(vector.shape)}, not "
                              f"unsigned [{self.length + 1}]")
        if self.setup.ring_bits < 64 and int(vector.max(initial=0)) >> self.setup.ring_bits:
            raise SecAggError(f"{client_id}'s masked input has values outside the {self.setup.ring_bits}-bit ring")
        self._sum += vector.astype(np.uint64)
        self._sum &= ring_mask(self.setup.ring_bits)
        self._state.masked.add(client_id)

    def shared(self) -> set[str]:
        """U2: the clients whose shares came (they are asked for masked inputs)."""
        return set(self._state.shared)

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """Close stage 3: (survivors U3, dropped U2 minus U3), the same for every survivor. Nothing is
        unmasked for fewer survivors than the threshold, or than ``min_clients``."""
        survivors = len(self._state.masked)
        if survivors < self.setup.threshold:
            raise SecAggAborted(f"{survivors} masked inputs; the threshold is {self.setup.threshold}")
        if survivors < self.setup.min_clients:
            raise SecAggAborted(f"{survivors} masked inputs; no sum of fewer than {self.setup.min_clients} clients is "
                                f"unmasked")
        return sorted(self._state.masked), sorted(self._state.shared - self._state.masked)

    # stage 4
    def add_unmask(self, client_id: str, shares: Mapping[str, tuple[str, bytes, bytes]]) -> None:
        """A survivor's shares, each checked against its owner's signature: a share its owner did not
        sign (a holder lying about what it was dealt) refuses them all, naming the client."""
        if client_id not in self._state.masked:
            raise SecAggError(f"{client_id} sent unmasking shares it was not asked for")
        if client_id in self._state.unmasked:
            raise SecAggError(f"{client_id} sent its unmasking shares twice")
        survivors, dropped = set(self._state.masked), self._state.shared - self._state.masked
        owed = {client_id} | {sender for sender in self._state.boxes.get(client_id, {})
                              if sender in survivors or sender in dropped}  # the boxes it was handed
        for owner, (kind, share, signature) in shares.items():
            expected = "b" if owner in survivors else "s" if owner in dropped else None
            if owner not in owed or kind != expected or len(share) != SHARE_BYTES:
                raise SecAggError(f"{client_id} sent a share it was not asked for ({kind!r} of {owner!r})")
            statement = share_statement(self.setup.context, owner, client_id, kind, share)
            if not signature_holds(self._state.roster[owner].sign_key, signature, statement):
                raise SecAggError(f"{client_id} sent a share of {owner}'s {kind} that {owner} did not sign")
        if set(shares) != owed:
            raise SecAggError(f"{client_id} withheld its shares of {sorted(owed - set(shares))[:3]}")
        for owner, (_, share, _) in shares.items():
            self._state.shares.setdefault(owner, {})[self._index[client_id]] = bytes(share)
        self._state.unmasked.add(client_id)

    def result(self) -> tuple[np.ndarray, int]:
        """The sum of the survivors' clipped updates, weighted (float64, dequantised), and their total
        weight. SecAggAborted if too few unmasking shares came; SecAggBlamed naming the clients whose
        rebuilt secrets do not check out; SecAggRefused if the unmasked sum cannot be the survivors'."""
        setup = self.setup
        survivors, dropped = sorted(self._state.masked), sorted(self._state.shared - self._state.masked)
        seeds = {owner: self._rebuild(owner) for owner in survivors}
        keys = {owner: self._rebuild(owner) for owner in dropped}
        blamed = {owner: "its self-mask seed, rebuilt from the shares it signed, is not the one it committed to"
                  for owner, seed in seeds.items()
                  if commit(seed, seed_binding(setup.context, owner)) != self._state.commitments[owner]}
        pairs = {}
        for owner, private in keys.items():
            try:
                pairs[owner] = KeyPair(private)
            except (SecAggError, ValueError):
                pairs[owner] = None
            if pairs[owner] is None or pairs[owner].public != self._state.roster[owner].mask_key:
                blamed[owner] = "its mask key, rebuilt from the shares it signed, is not the one it advertised"
        if blamed:
            raise SecAggBlamed(blamed)
        total = self._sum.copy()
        for owner in survivors:
            total -= expand_mask(seeds[owner], total.size, setup.ring_bits)
        for owner in dropped:
            for neighbour in self._graph[owner]:
                if neighbour not in self._state.masked:
                    continue
                seed = pairs[owner].agree(self._state.roster[neighbour].mask_key, setup.context + b"|masks")
                mask = expand_mask(seed, total.size, setup.ring_bits)
                if self._index[neighbour] < self._index[owner]:  # the survivor added it
                    total -= mask
                else:
                    total += mask
        total &= ring_mask(setup.ring_bits)
        self._check_unmasked(total, survivors)
        weight = int(total[-1])
        return dequantise(total[:-1], setup.clip, setup.quantisation_bits, weight), weight

    def _check_unmasked(self, total: np.ndarray, survivors: Sequence[str]) -> None:
        """What can be checked of a sum whose parts are hidden: its weight is the survivors' declared
        weights, and each coordinate lies in [0, R W], the range of W clipped, quantised updates (a
        mean in [-clip, clip]). SecAggRefused otherwise."""
        declared = sum(self._state.weights[owner] for owner in survivors)
        if int(total[-1]) != declared:
            raise SecAggRefused(f"the unmasked total weight is {int(total[-1])}, but the {len(survivors)} clients in the "
                                f"sum declared {declared} examples: a client masked another weight than it declared")
        top = (2**self.setup.quantisation_bits - 1) * declared
        values = total[:-1]
        if values.size and int(values.max()) > top:
            outside = int(np.count_nonzero(values > np.uint64(top)))
            raise SecAggRefused(f"{outside} coordinate(s) of the unmasked mean lie outside the clipping range "
                                f"[-{self.setup.clip:g}, {self.setup.clip:g}]: a client masked values it could not "
                                f"have clipped")

    def _rebuild(self, owner: str) -> bytes:
        shares = self._state.shares.get(owner, {})
        if len(shares) < self.setup.threshold:
            raise SecAggAborted(f"{len(shares)} shares came to unmask {owner}; the threshold is {self.setup.threshold}")
        try:
            return rebuild_secret(shares, self.setup.threshold)
        except SecAggError:  # signed shares that do not make a secret: its owner dealt them so
            return bytes(SECRET_BYTES)  # checked (and blamed) as any wrong secret is


# --- the stages as messages: one home for the networked client and the in-process pool -------------

def left_out_after(accusations: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Who leaves a round's next attempts after neighbours said their boxes did not open, and why.

    ``accusations`` maps each accuser to the clients it named. The server cannot open the boxes, so it
    cannot tell whether the named client sealed garbage or the accuser lied. A client named by two or
    more accusers leaves alone; a client named by one leaves with its accuser (one of the two
    misbehaved). A false accusation therefore costs the liar its own place, and only a pair of
    colluding liars can push an honest client out of a round without leaving too.
    """
    named_by: dict[str, set[str]] = {}
    for accuser, named in accusations.items():
        for client_id in named:
            if client_id != accuser:
                named_by.setdefault(client_id, set()).add(accuser)
    out: dict[str, str] = {}
    for client_id, accusers in sorted(named_by.items()):
        if len(accusers) > 1:
            out[client_id] = f"its sealed shares did not open for {', '.join(sorted(accusers))}"
        else:
            (accuser,) = accusers
            out.setdefault(client_id, f"{accuser} said its sealed shares did not open (only one said so: "
                                      f"both leave)")
            out.setdefault(accuser, f"said the sealed shares of {client_id} did not open (only it said so: both "
                                    f"leave)")
    return out


def round_context(run: str, server_round: int, attempt: int) -> bytes:
    """What binds an attempt's keys, boxes and masks to it: the run, the round and the attempt."""
    return f"{run}|{server_round}|{attempt}".encode()


def flatten_change(weights: Sequence[np.ndarray], global_weights: Sequence[np.ndarray]) -> np.ndarray:
    """A trained model's change from the global one, as one float64 vector over its floating-point
    arrays (integer arrays, say counters, are not averaged: the global value stays)."""
    parts = [np.ravel(np.asarray(w, np.float64) - np.asarray(g, np.float64))
             for w, g in zip(weights, global_weights) if np.dtype(g.dtype).kind == "f"]
    return np.concatenate(parts) if parts else np.zeros(0)


def apply_change(global_weights: Sequence[np.ndarray], change: np.ndarray) -> list[np.ndarray]:
    """The global weights moved by ``change`` (a vector as :func:`flatten_change` makes)."""
    moved, offset = [], 0
    for g in global_weights:
        if np.dtype(g.dtype).kind != "f":
            moved.append(g)
            continue
        size = int(np.size(g))
        moved.append((np.asarray(g, np.float64) + change[offset:offset + size].reshape(np.shape(g))).astype(g.dtype))
        offset += size
    if offset != change.size:
        raise SecAggError(f"a change of {change.size} values does not fit a model of {offset}")
    return moved


class ClientStages:
    """A client's secure aggregation across the stages of one attempt: each server message in, its
    answer out (kind, body, arrays). A message sent again (the client was away) gets the same answer."""

    def __init__(self, client_id: str, rng: np.random.Generator | None = None):
        self.client_id, self._rng = client_id, rng
        self._round: ClientRound | None = None
        self._attempt: tuple[int, int] | None = None  # (round, attempt) in progress
        self._input: tuple[np.ndarray, int, dict] | None = None  # change, weight, metrics
        self._last: tuple[tuple, tuple[MessageType, dict, list]] | None = None

    def begin(self, run: str, server_round: int, attempt: int, setup: Mapping[str, object], change: np.ndarray,
              weight: int, metrics: Mapping[str, object]) -> dict:
        """After training for a FIT with ``setup``: this attempt's SECAGG_KEYS body."""
        self._round = ClientRound(self.client_id, RoundSetup(context=round_context(run, server_round, attempt),
                                                             **setup), self._rng)
        self._attempt = (server_round, attempt)
        self._input = (change, int(weight), dict(metrics))
        said = self._round.advertised(weight)
        return {"attempt": attempt, "mask_key": b64(said.keys.mask_key), "share_key": b64(said.keys.share_key),
                "sign_key": b64(said.keys.sign_key), "commitment": b64(said.commitment), "num_examples": said.weight,
                "signature": b64(said.signature)}

    def answer(self, kind: MessageType, server_round: int, body: Mapping[str, object]) -> tuple[MessageType, dict, list]:
        key = (kind, server_round, repr(sorted(body.items())))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if self._round is None or self._attempt != (server_round, body["attempt"]):
            raise SecAggError(f"{kind.value} for round {server_round} attempt {body['attempt']}, which this client "
                              f"is not in")
        attempt = body["attempt"]
        if kind is MessageType.SECAGG_ROSTER:
            roster = {cid: PublicKeys(*(unb64(key) for key in keys)) for cid, keys in body["roster"].items()}
            boxes = self._round.share_keys(roster)
            reply = (MessageType.SECAGG_SHARES, {"attempt": attempt, "boxes": {v: b64(box) for v, box in boxes.items()}}, [])
        elif kind is MessageType.SECAGG_BOXES:
            change, weight, metrics = self._input
            try:
                vector = self._round.masked_input({s: unb64(box) for s, box in body["boxes"].items()}, change, weight)
            except BadBoxes as bad:
                reply = (MessageType.SECAGG_MASKED, {"attempt": attempt, **metrics, "bad_boxes": bad.senders}, [])
            else:
                dtype = np.uint32 if self._round.setup.ring_bits <= 32 else np.uint64
                reply = (MessageType.SECAGG_MASKED, {"attempt": attempt, **metrics}, [vector.astype(dtype)])
        elif kind is MessageType.SECAGG_UNMASK:
            shares = self._round.unmask(body["survivors"], body["dropped"])
            reply = (MessageType.SECAGG_REVEAL,
                     {"attempt": attempt, "shares": {owner: [k, b64(share), b64(signature)]
                                                     for owner, (k, share, signature) in shares.items()}}, [])
            self._input = None  # the update is no longer needed
        else:
            raise SecAggError(f"{kind.value} is not a secure aggregation stage a client answers")
        self._last = (key, reply)
        return reply


@dataclass(frozen=True)
class SecureAggregation:
    """The settings of secure aggregation for a run (``--secure-aggregation`` and ``--secagg-*``):
    each round's :class:`RoundSetup` follows from them and the clients asked.

    ``threshold_fraction`` f: a secret is rebuilt from more than f of its holders (a client's
    neighbours and itself): t = floor(f * (k + 1)) + 1, at least 2. ``degree`` k: 0 picks
    min(n - 1, 2 * ceil(1.5 * log2 n)), SecAgg+'s logarithmic neighbourhood; with n - 1 or more,
    every client is every other's neighbour (SecAgg). ``quantisation_bits``: fixed-point precision of
    each coordinate in [-clip, clip]. ``min_clients``: the fewest parties a sum is unmasked for (one
    party per key: the engine asks one id of each key a round); a sum of two would give each of them
    the other's update."""

    threshold_fraction: float = 0.5
    degree: int = 0
    quantisation_bits: int = 16
    clip: float = 1.0
    min_clients: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.threshold_fraction < 1:
            raise SecAggError(f"the threshold fraction must be in (0, 1), not {self.threshold_fraction}")
        if self.degree < 0 or self.degree == 1:
            raise SecAggError(f"the neighbour graph's degree must be 0 (automatic) or at least 2, not {self.degree}")
        if not 1 <= self.quantisation_bits <= 40:
            raise SecAggError(f"the quantisation bits must be between 1 and 40, not {self.quantisation_bits}")
        if not 0 < self.clip < float("inf"):
            raise SecAggError(f"the clipping range must be positive, not {self.clip}")
        if self.min_clients < 2:
            raise SecAggError(f"a sum must be unmasked for at least 2 clients, not {self.min_clients}")

    def setup(self, context: bytes, clients: int, total_weight: int) -> RoundSetup:
        if clients < self.min_clients:
            raise SecAggAborted(f"{clients} parties were asked; secure aggregation unmasks no sum of fewer than "
                                f"{self.min_clients}")
        degree = self.degree or min(clients - 1, 2 * int(np.ceil(1.5 * np.log2(max(clients, 2)))))
        degree = min(max(2, min(degree, clients - 1)) if clients > 2 else 2, SECAGG_MAX_NEIGHBOURS)
        threshold = max(2, int(self.threshold_fraction * (min(degree, clients - 1) + 1)) + 1)
        threshold = min(threshold, min(degree, clients - 1) + 1)
        return RoundSetup(context=context, threshold=threshold, degree=degree,
                          quantisation_bits=self.quantisation_bits,
                          ring_bits=ring_bits_for(total_weight, self.quantisation_bits), clip=self.clip,
                          min_clients=self.min_clients)
