"""The client pool: how the round engine reaches its clients, whatever carries them.

The engine (:mod:`pyfed.federation.engine`) runs every round against this small interface; two
adapters implement it: :class:`~pyfed.federation.network.NetworkPool` (ZeroMQ: transport, registry,
joins, heartbeats) and :class:`InProcessPool` (local trainers called in this process, with injected
failures). A fake pool in the unit tests drives every failure path without sockets or TensorFlow.

The engine sends requests (:class:`FitRequest`, :class:`EvaluateRequest`) and polls for events:
an :class:`Answer`, a client :class:`Gone` (it left, its connection died, its key was revoked),
a client :class:`Back` (it joined or rejoined: if it owes the round an answer, the engine sends its
request again), or a client that :class:`Misbehaved` (sent a message that could not be decoded).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pyfed.federation.answers import ClientAnswers
from pyfed.federation.secagg import SecAggError
from pyfed.federation.secure_aggregation import SecAggAborted
from pyfed.wire.compression import as_received
from pyfed.federation.moments import Moments, pool as pool_moments
from pyfed.wire.protocol import Delivery, FitPlan, MessageType, StatsKind

log = logging.getLogger("pyfed.pool")

#: Why a request did not leave, as an attempt records it: the client's connection is gone (the pool
#: has dropped the client), or the way to it is full or unknown.
CONNECTION_GONE = "connection lost (a request to it could not be delivered)"
UNREACHED = "could not be reached"


@dataclass(frozen=True)
class FitRequest:
    """Train ``round`` (attempt ``attempt``) of run ``run`` from these global weights with this plan."""

    round: int
    attempt: int
    plan: FitPlan
    weights: Sequence[np.ndarray]
    run: str = "0" * 16
    secagg: Mapping[str, Any] | None = None  # secure aggregation's setup: answer SECAGG_KEYS, not UPDATE


@dataclass(frozen=True)
class EvaluateRequest:
    """Evaluate these global weights (of ``round`` of run ``run``) on the held-out part of your data."""

    round: int
    weights: Sequence[np.ndarray]
    run: str = "0" * 16


@dataclass(frozen=True)
class StatsRequest:
    """Summarise your training examples as ``kind`` says (a MOMENTS answer, of ``attempt``): before
    round 1 the features; after the last round (``round``) the inputs of BatchNormalization layer
    ``layer`` when ``weights`` run over them."""

    kind: StatsKind
    run: str = "0" * 16
    round: int = 0
    attempt: int = 1
    layer: int | None = None
    weights: Sequence[np.ndarray] | None = None


@dataclass(frozen=True)
class SecAggRequest:
    """A secure aggregation stage (SECAGG_ROSTER, SECAGG_BOXES or SECAGG_UNMASK) of one attempt."""

    round: int
    attempt: int
    kind: MessageType
    body: Mapping[str, Any]


@dataclass(frozen=True)
class GrantRequest:
    """Send your update for ``round`` (attempt ``attempt``) now: an upload slot is yours."""

    round: int
    attempt: int


Request = FitRequest | EvaluateRequest | SecAggRequest | GrantRequest | StatsRequest


@dataclass
class Answer:
    """A client's UPDATE or EVALUATION: its header fields, its body and its arrays (views, maybe)."""

    client_id: str
    kind: MessageType
    round: int
    attempt: int
    body: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class Gone:
    client_id: str
    reason: str


@dataclass(frozen=True)
class Back:
    client_id: str


@dataclass(frozen=True)
class Misbehaved:
    client_id: str
    reason: str


PoolEvent = Answer | Gone | Back | Misbehaved


@dataclass(frozen=True)
class ClientInfo:
    """What the pool knows of a client: its data shard (if it was handed one), the examples it
    declared when it joined (0: unknown), which bounds what it may claim in an update, and the key
    it holds (None without encryption, where nothing ties ids together)."""

    shard: str | None = None
    declared_examples: int = 0
    key: str | None = None  # the CurveZMQ key it authenticated with: one party, whatever ids it holds


class ClientPool(Protocol):
    """What the round engine needs from the clients' side."""

    bytes_sent: int
    bytes_received: int

    def connected(self) -> list[str]:
        """The ids of the clients that can be asked now."""

    def info(self, client_id: str) -> ClientInfo: ...

    def publish(self, weights: Sequence[np.ndarray], server_round: int) -> None:
        """The global model as of ``server_round``: what a client that joins now is given."""

    def send(self, client_id: str, request: Request) -> Delivery:
        """Ask a client: ``Delivery.SENT`` (true) if the request left; ``Delivery.UNREACHABLE`` if the
        client's connection is gone (the pool drops the client); ``Delivery.CONGESTED`` if it could not
        be sent now."""

    def poll(self, timeout_s: float) -> list[PoolEvent]:
        """Events since the last poll, waiting up to ``timeout_s`` for one."""

    def refuse(self, client_id: str, reason: str) -> None:
        """Tell a client its answer was refused."""

    def accepted(self, client_id: str) -> None:
        """A client's update counted (its id is kept for good)."""

    def release(self, client_id: str) -> None:
        """The client was dropped from what it was asked: forget any upload grant it holds and the
        part of an update it has sent (what it sends next for that request is not kept)."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the pool (JSON values)."""

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`state` from a checkpoint (validated by :meth:`check_state` first)."""

    def check_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """``state`` read back from a checkpoint, type-checked; ValueError names what is wrong."""

    def finish(self, reason: str) -> None:
        """The run is over: tell every client."""

    def stop(self, reason: str) -> None:
        """The server is stopping (it will resume): tell every client."""


class Trainer(Protocol):
    """A local trainer, as the in-process pool uses it (:class:`~pyfed.learning.training.LocalTrainer`)."""

    num_examples: int

    def fit(self, weights: list[np.ndarray], plan: FitPlan) -> tuple[list[np.ndarray], int, dict[str, Any]]: ...

    def evaluate(self, weights: list[np.ndarray]) -> tuple[int, float | None, float | None]: ...

    def training_examples(self) -> np.ndarray: ...


class InProcessPool:
    """Clients that are local trainers, called one at a time in this process (a simulation).

    ``drop_rate`` injects failures: each request is lost with that probability (the client is
    dropped from that attempt, as a crashed or unplugged client would be) and the client is back
    for the next request. Draws come from ``seed``, so a simulation with failures is reproducible, as are
    secure aggregation's stochastic roundings (a generator per client, from ``seed`` and its id).
    """

    bytes_sent = 0
    bytes_received = 0

    def __init__(self, trainers: Mapping[str, Trainer], *, drop_rate: float = 0.0, seed: int = 0,
                 on_answer: Any = None):
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.trainers = dict(trainers)
        self.drop_rate = drop_rate
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self._answers: dict[str, ClientAnswers] = {}  # each client's DP noise, top-k memory, secure aggregation
        self._queue: deque[tuple[str, Request]] = deque()
        self._grants: deque[tuple[str, Request]] = deque()  # answered before any training
        self._on_answer = on_answer  # on_answer(done, remaining): progress through the requests queued
        self._done = 0

    def connected(self) -> list[str]:
        return list(self.trainers)

    def info(self, client_id: str) -> ClientInfo:
        return ClientInfo(None, int(self.trainers[client_id].num_examples))

    def publish(self, weights: Sequence[np.ndarray], server_round: int) -> None:
        pass  # trainers are given the weights with each request

    def send(self, client_id: str, request: Request) -> Delivery:
        # A granted client sends the update it holds at once, as a networked one does; behind the
        # queued training of every other client it would wait minutes and outlive its allowance.
        (self._grants if isinstance(request, GrantRequest) else self._queue).append((client_id, request))
        return Delivery.SENT

    def poll(self, timeout_s: float) -> list[PoolEvent]:
        """Run the next queued request, grants first (all of the waiting happens here, as compute)."""
        if self._grants:
            return self._run(*self._grants.popleft())
        if not self._queue:
            return []
        client_id, request = self._queue.popleft()
        events = self._run(client_id, request)
        self._done += 1
        if self._on_answer is not None:
            self._on_answer(self._done, len(self._queue))
        if not self._queue:
            self._done = 0
        return events

    def _run(self, client_id: str, request: Request) -> list[PoolEvent]:
        if self.drop_rate and self._rng.random() < self.drop_rate:  # lost for this request; asked again later
            return [Gone(client_id, "dropped (simulated failure)")]
        trainer = self.trainers[client_id]
        if isinstance(request, SecAggRequest):  # what a networked client's ClientStages answers
            try:
                kind, body, arrays = self._answers[client_id].stages.answer(request.kind, request.round, request.body)
            except (KeyError, SecAggError, SecAggAborted) as error:
                return [Gone(client_id, f"secure aggregation: {error}")]
            return [Answer(client_id, kind, request.round, request.attempt, body, arrays)]
        if isinstance(request, GrantRequest):  # what a networked client does with UPLOAD_GRANT
            answers = self._answers.get(client_id)
            held = answers.granted(request.round, request.attempt) if answers is not None else None
            if held is None:
                return [Gone(client_id, f"granted an upload for round {request.round} attempt {request.attempt}, "
                                        f"which it holds no update for")]
            return [Answer(client_id, held[0], request.round, request.attempt, held[1], held[2])]
        if isinstance(request, StatsRequest):  # what a networked client answers (client.py)
            return [Answer(client_id, MessageType.MOMENTS, request.round, request.attempt,
                           moments_body(site_moments(trainer, request.kind, request.layer, request.weights)))]
        if isinstance(request, FitRequest):
            received = as_received(request.weights, request.plan.broadcast_compression)  # what the wire would give
            weights, num_examples, metrics = trainer.fit(list(received), request.plan)
            if client_id not in self._answers:  # its secure aggregation rounding drawn from the seed: repeatable
                self._answers[client_id] = ClientAnswers(client_id, np.random.default_rng(
                    [self._seed, *client_id.encode()]))
            kind, body, arrays = self._answers[client_id].after_training(
                run=request.run, server_round=request.round, attempt=request.attempt, plan=request.plan,
                secagg=request.secagg, weights=weights, received=received, num_examples=num_examples,
                metrics=metrics)
            answer = Answer(client_id, kind, request.round, request.attempt, body, arrays)
        else:
            num_examples, loss, accuracy = trainer.evaluate(list(request.weights))
            answer = Answer(client_id, MessageType.EVALUATION, request.round, 1,
                            {"num_examples": num_examples, "loss": loss, "accuracy": accuracy})
        return [answer]

    def refuse(self, client_id: str, reason: str) -> None:
        log.warning("client %s: %s", client_id, reason)

    def accepted(self, client_id: str) -> None:
        pass

    def release(self, client_id: str) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        pass

    def finish(self, reason: str) -> None:
        pass

    def stop(self, reason: str) -> None:
        pass


def site_moments(trainer: Any, kind: StatsKind, layer: int | None,
                 weights: Sequence[np.ndarray] | None) -> Moments:
    """What a site reports for a STATS of ``kind``: its features' moments, or the moments of what
    BatchNormalization layer ``layer`` receives when ``weights`` run over its training examples."""
    if kind is StatsKind.FEATURES:
        return Moments.of(trainer.training_examples())
    chunks: list[Moments] = []
    trainer.batch_norm_inputs(list(weights), layer, lambda values: chunks.append(Moments.of(values)))
    return pool_moments(chunks)


def moments_body(moments: Moments) -> dict[str, Any]:
    """A site's MOMENTS answer: its count and, per feature, its mean and m2, as JSON numbers (exact)."""
    return {"count": int(moments.count), "mean": moments.mean.tolist(), "m2": moments.m2.tolist()}
