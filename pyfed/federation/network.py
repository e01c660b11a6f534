"""The ZeroMQ client pool: clients on other processes and machines, as the round engine sees them.

One ROUTER socket (:class:`~pyfed.wire.transport.ServerTransport`), the :class:`Registry` of who is
in, and the handling of every message that is not an answer: JOINs (admitted by the registry's
rules, answered with the current global model), LEAVEs, ERRORs, lost connections (closed, or no
heartbeat), revoked keys and malformed messages. Each becomes a pool event for the engine; only
UPDATEs and EVALUATIONs from joined clients reach it as answers. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.federation.pool import (CONNECTION_GONE, Answer, Back, ClientInfo, FitRequest, Gone, GrantRequest,
                                   Misbehaved, PoolEvent, Request, SecAggRequest, StatsRequest)
from pyfed.federation.registry import ClientRecord, JoinRefused, Registry
from pyfed.wire import chunks, compression, protocol
from pyfed.wire.compression import UpdateCompression
from pyfed.wire.protocol import (AdmissionEvent, Delivery, ErrorCode, FitPlan, Message, MessageType, ProtocolError,
                                 WireModel)
from pyfed.wire.security import Admission, CurveKeys
from pyfed.wire.transport import HEARTBEAT_TIMEOUT_MS, RateLimitedLog, ServerTransport, trim_freed_memory

log = logging.getLogger("pyfed.server")

#: What a client sends in answer to the engine's requests.
CLIENT_ANSWERS = frozenset({MessageType.UPLOAD_READY, MessageType.UPDATE, MessageType.EVALUATION, MessageType.SECAGG_KEYS,
                            MessageType.SECAGG_SHARES, MessageType.SECAGG_MASKED, MessageType.SECAGG_REVEAL,
                            MessageType.MOMENTS})

FINISH_GRACE_S = 15.0
FINISH_RESEND_S = 2.0
STOP_NOTICE_S = 1.5  # after SIGTERM, how long the STOPPING notice has before the socket closes
REVOCATION_CHECK_S = 1.0  # how often connected clients' keys are checked against the authorized directory
CONNECTION_LOST = f"connection lost (closed, or no heartbeat for {HEARTBEAT_TIMEOUT_MS / 1000:g}s)"


class NetworkPool:
    """Clients over ZeroMQ: bind, serve joins and leaves, carry requests and answers."""

    def __init__(self, address: str, model: WireModel, *, plan: FitPlan, rounds: int, min_clients: int = 1,
                 curve: CurveKeys | None = None, authorized_keys: Path | None = None, num_shards: int = 0,
                 join_rate: float = 100.0, max_examples: int = 10_000_000, max_ids_per_key: int | None = None,
                 secagg_neighbours: int = 0):
        self.model, self.plan, self.rounds, self.min_clients = model, plan, rounds, min_clients
        self.specs = protocol.array_specs(model.weights)
        self.limits = protocol.client_limits(self.specs, plan.epochs, secagg_neighbours=secagg_neighbours,
                                             update_compression=UpdateCompression(plan.update_compression),
                                             topk_fraction=plan.topk_fraction)
        self.max_examples = max_examples
        self.admission = Admission(authorized_keys, curve.public) if curve is not None else None
        self.transport = ServerTransport(address, max_frame_bytes=protocol.max_frame_bytes(
                                             self.specs, self.limits, secure_aggregation=bool(secagg_neighbours)),
                                         curve=curve, admission=self.admission,
                                         max_message_bytes=protocol.message_budget(self.limits))
        self.registry = Registry(num_shards, join_rate, **({"max_ids_per_key": max_ids_per_key}
                                                           if max_ids_per_key else {}))
        self.endpoint: str | None = None
        self._round = 0
        self._full_precision = False  # the plan's broadcast compression cannot hold the current model
        self._published: Sequence[np.ndarray] = model.weights
        # as sent: WELCOME, FIT, EVALUATE, and the body field that says how ({} in full precision)
        self._weights, self._encoding = self._broadcast(model.weights)
        self._encoded: dict[tuple, list] = {}
        self._rejections = RateLimitedLog(log)
        self._finishing = False
        self._next_revocation_check = 0.0
        self._granted: dict[str, tuple[int, int]] = {}  # client -> the (round, attempt) it may upload
        self._uploads: dict[str, tuple[int, int, dict, chunks.Assembly]] = {}  # updates arriving in chunks

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.transport.encrypted

    @property
    def bytes_sent(self) -> int:
        return self.transport.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.transport.bytes_received

    @property
    def clients(self) -> dict[str, ClientRecord]:
        return self.registry.clients

    def bind(self) -> str:
        self.endpoint = self.transport.bind()
        return self.endpoint

    def close(self) -> None:
        self.transport.close()

    # --- the pool interface -----------------------------------------------------------------------

    def connected(self) -> list[str]:
        return list(self.registry.clients)

    def info(self, client_id: str) -> ClientInfo:
        record = self.registry.clients.get(client_id)
        return ClientInfo(record.shard, record.num_examples, record.key) if record else ClientInfo()

    def publish(self, weights: Sequence[np.ndarray], server_round: int) -> None:
        self._published, self._round = weights, server_round
        self._weights, self._encoding = self._broadcast(weights)
        self._encoded.clear()
        self._granted.clear()  # a round is over: its grants, and the buffers of unfinished uploads, go
        self._uploads.clear()

    def _broadcast(self, weights: Sequence[np.ndarray]) -> tuple[list[np.ndarray], dict[str, str]]:
        """The global model as clients get it (the plan's broadcast_compression), made once per round,
        and the body field that declares its encoding. A model half precision cannot hold goes out in
        full precision that round (said once), never stopping the server."""
        arrays, used, why_not = compression.broadcast(weights, self.plan.broadcast_compression)
        if (why_not is not None) != self._full_precision:
            self._full_precision = why_not is not None
            if why_not is not None:
                log.warning("the global model of round %d cannot travel in %s (%s): it is sent in full precision "
                            "until it can", self._round, self.plan.broadcast_compression, why_not)
            else:
                log.info("the global model of round %d is sent in %s again", self._round,
                         self.plan.broadcast_compression)
        return arrays, ({"encoding": used.value} if used is not compression.BroadcastCompression.NONE else {})

    def send(self, client_id: str, request: Request) -> Delivery:
        record = self.registry.clients.get(client_id)
        if record is None:
            return Delivery.UNREACHABLE
        if isinstance(request, GrantRequest):  # the one kind of client whose update in chunks is taken
            self._granted[client_id] = (request.round, request.attempt)
        delivery = self.transport.send(record.peer, self._encode(request))
        if delivery is Delivery.UNREACHABLE:  # its connection is gone: not a client to wait for or ask again
            self._remove(client_id, CONNECTION_GONE)
        return delivery

    def _encode(self, request: Request) -> list:
        """One encoding per distinct request: the weights are wrapped, never copied."""
        if isinstance(request, SecAggRequest):  # small, and different for each client: not kept
            return protocol.encode(Message(request.kind, round=request.round, body=dict(request.body)))
        if isinstance(request, GrantRequest):
            return protocol.encode(Message(MessageType.UPLOAD_GRANT, round=request.round,
                                           body={"attempt": request.attempt}))
        if isinstance(request, StatsRequest):  # the weights, if any, in full precision: what is exported
            body = {"run": request.run, "kind": request.kind.value}
            if request.layer is not None:
                body.update(layer=request.layer, attempt=request.attempt)
            key = ("stats", request.round, request.attempt, request.kind)
            if key not in self._encoded:
                self._encoded[key] = protocol.encode(Message(MessageType.STATS, round=request.round, body=body,
                                                             arrays=list(request.weights or ())))
            return self._encoded[key]
        if isinstance(request, FitRequest):
            key: tuple = ("fit", request.round, request.attempt, request.plan)
        else:
            key = ("evaluate", request.round)
        if key not in self._encoded:
            arrays, encoding = ((self._weights, self._encoding) if request.weights is self._published
                                else self._broadcast(request.weights))
            if isinstance(request, FitRequest):
                message = Message(MessageType.FIT, round=request.round, arrays=arrays,
                                  body={"plan": request.plan.to_body(), "attempt": request.attempt, "run": request.run,
                                        **({"secagg": dict(request.secagg)} if request.secagg is not None else {}),
                                        **encoding})
            else:
                message = Message(MessageType.EVALUATE, round=request.round, arrays=arrays,
                                  body={"run": request.run, **encoding})
            self._encoded[key] = protocol.encode(message)
        return self._encoded[key]

    def refuse(self, client_id: str, reason: str) -> None:
        record = self.registry.clients.get(client_id)
        if record is not None:
            self._reject(record.peer, ErrorCode.BAD_REPLY, f"client {client_id}: {reason}")

    def accepted(self, client_id: str) -> None:
        self.registry.record_contribution(client_id)

    def release(self, client_id: str) -> None:
        self._granted.pop(client_id, None)
        self._uploads.pop(client_id, None)  # the buffer of an upload that will not be taken

    def state(self) -> dict[str, Any]:
        return self.registry.state()

    def check_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        known = Registry.parse_known(state["known_clients"])
        number = state["next_client_number"]
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise ValueError(f"next_client_number is {str(number)[:20]!r}")
        return {"known_clients": known, "next_client_number": number}

    def restore(self, state: Mapping[str, Any]) -> None:
        if state:
            self.registry.restore(dict(state["known_clients"]), state["next_client_number"])

    def poll(self, timeout_s: float) -> list[PoolEvent]:
        """Serve one message (or none within ``timeout_s``): joins, leaves, lost connections, revoked
        keys and bad input are handled here and reported as events; answers are returned as such."""
        events: list[PoolEvent] = self._drop_revoked_keys()
        received = self.transport.recv(timeout_s)
        for lost in self.transport.lost_peers(idle=received is None):
            lost_client = self.registry.client_of(lost)
            if lost_client is not None and self._remove(lost_client, CONNECTION_LOST):
                events.append(Gone(lost_client, CONNECTION_LOST))
        if received is None:
            return events
        peer, frames = received
        client_id = self.registry.client_of(peer)
        try:
            message = protocol.decode(frames, expected_arrays=self.specs, limits=self.limits)
        except ProtocolError as error:
            size = sum(len(f) for f in frames)
            del frames
            self._reject(peer, ErrorCode.BAD_MESSAGE,
                         f"from {f'client {client_id}' if client_id else 'peer ' + peer.hex()[:12]}: {error}")
            if client_id:
                events.append(Misbehaved(client_id, str(error)))
            if size > 1 << 20:
                trim_freed_memory()  # give a large refused message's memory back to the system
            return events
        if self.admission is not None and not self.admission.is_authorized(
                (self.transport.peer_keys.get(peer) or "").encode()):
            self._reject(peer, ErrorCode.KEY_REVOKED, "this client's key is no longer authorized")
            self.transport.disconnect(peer)
            if client_id and self._remove(client_id, "key revoked (its .key file was removed)"):
                events.append(Gone(client_id, "key revoked (its .key file was removed)"))
            return events
        if message.type is MessageType.JOIN:
            admitted = self._join(peer, message)
            if admitted is not None:
                events.append(Back(admitted))
            return events
        if client_id is None:
            self._reject(peer, ErrorCode.NOT_JOINED, f"{message.type.value} from peer {peer.hex()[:12]} that has not joined")
            return events
        if message.client_id and message.client_id != client_id:
            self._reject(peer, ErrorCode.WRONG_CLIENT_ID,
                         f"peer of client {client_id} sent a message claiming id {message.client_id!r}")
            return events
        if self.transport.encrypted and self.transport.peer_keys.get(peer) != self.registry.clients[client_id].key:
            self._reject(peer, ErrorCode.WRONG_KEY, f"a message for client {client_id} came with another CURVE key")
            return events
        if message.type is MessageType.UPDATE and "chunks" in message.body:
            events.extend(self._start_upload(peer, client_id, message))
        elif message.type is MessageType.UPDATE_CHUNK:
            events.extend(self._take_chunk(peer, client_id, message))
        elif message.type in CLIENT_ANSWERS:
            events.append(Answer(client_id, message.type, message.round, message.body.get("attempt", 1),
                                 message.body, message.arrays))
        elif message.type is MessageType.LEAVE:
            reason = f"left ({message.body.get('reason') or 'no reason given'})"
            if self._remove(client_id, reason):
                events.append(Gone(client_id, reason))
        elif message.type is MessageType.ERROR:
            log.warning("client %s reported an error [%s]: %s", client_id, message.body["code"], message.body["reason"])
            if self._remove(client_id, f"error: {message.body['code']}"):
                events.append(Gone(client_id, f"error: {message.body['code']}"))
        else:
            self._reject(peer, ErrorCode.UNEXPECTED_TYPE,
                         f"client {client_id} sent {message.type.value}, which only servers send")
        return events

    # --- updates in chunks (wire/chunks.py) ----------------------------------------------------------

    def _start_upload(self, peer: bytes, client_id: str, header: Message) -> list[PoolEvent]:
        """The header of an update sent in chunks: its buffer is made only for a client granted an
        upload of that round and attempt; anyone else's header goes to the engine, which refuses it."""
        attempt = header.body["attempt"]
        if self._granted.get(client_id) != (header.round, attempt):
            return [Answer(client_id, MessageType.UPDATE, header.round, attempt, header.body, [])]
        codec = UpdateCompression(header.body.get("encoding", UpdateCompression.NONE.value))  # checked by decode
        assembly = chunks.Assembly(compression.encoded_specs(codec, self.specs, self.plan.topk_fraction))
        if header.body["chunks"] != assembly.count:
            reason = (f"its update announces {header.body['chunks']} chunks; an update of this model encoded "
                      f"{codec.value} travels in {assembly.count}")
            self._reject(peer, ErrorCode.BAD_REPLY, f"client {client_id}: {reason}")
            return [Misbehaved(client_id, reason)]
        body = {key: value for key, value in header.body.items() if key != "chunks"}
        self._uploads[client_id] = (header.round, attempt, body, assembly)
        return []

    def _take_chunk(self, peer: bytes, client_id: str, chunk: Message) -> list[PoolEvent]:
        upload = self._uploads.get(client_id)
        if upload is None or upload[:2] != (chunk.round, chunk.body["attempt"]):
            reason = (f"a chunk of round {chunk.round} attempt {chunk.body['attempt']}, which it has no update in "
                      f"chunks under way for")
            self._reject(peer, ErrorCode.BAD_REPLY, f"client {client_id}: {reason}")
            return [Misbehaved(client_id, reason)]
        server_round, attempt, body, assembly = upload
        try:
            complete = assembly.add(chunk.body["index"], chunk.arrays[0])
        except chunks.ChunkError as error:
            del self._uploads[client_id]
            self._reject(peer, ErrorCode.BAD_REPLY, f"client {client_id}: {error}")
            return [Misbehaved(client_id, str(error))]
        if not complete:
            return []
        del self._uploads[client_id]
        self._granted.pop(client_id, None)
        return [Answer(client_id, MessageType.UPDATE, server_round, attempt, body, assembly.arrays())]

    def finish(self, reason: str) -> None:
        """Tell every client the run is over, repeating FINISH until each confirms with LEAVE.

        A single FINISH can be lost if a client's connection is being re-established at that
        moment; the confirmation makes the end of a run reliable (bounded by FINISH_GRACE_S).
        """
        self._finishing = True
        frames = protocol.encode(Message(MessageType.FINISH, round=self._round, body={"reason": reason}))
        deadline = time.monotonic() + FINISH_GRACE_S
        next_send = 0.0
        while self.registry.clients and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                for record in list(self.registry.clients.values()):
                    self.transport.send(record.peer, frames)
                next_send = time.monotonic() + FINISH_RESEND_S
            self.poll(timeout_s=0.2)  # LEAVEs remove clients; late answers are dropped
        if self.registry.clients:
            log.warning("no confirmation of the end of the run from: %s", ", ".join(sorted(self.registry.clients)))

    def stop(self, reason: str) -> None:
        """The server is stopping and will resume: tell the clients to wait for it."""
        frames = protocol.encode(Message(MessageType.STOPPING, round=self._round, body={"reason": reason}))
        for record in self.registry.clients.values():
            self.transport.send(record.peer, frames)
        time.sleep(STOP_NOTICE_S)  # let idle clients read it before the connections close

    # --- joins, departures, refusals ----------------------------------------------------------------

    def _join(self, peer: bytes, message: Message) -> str | None:
        num_examples = message.body.get("num_examples", 0)
        if num_examples > self.max_examples:
            self._reject(peer, ErrorCode.TOO_MANY_EXAMPLES, f"a client may hold at most --max-examples "
                                                            f"{self.max_examples} examples; this one declares {num_examples}")
            return None
        try:
            admitted = self.registry.admit(peer, message.client_id, wants_shard=bool(message.body.get("wants_shard")),
                                           num_examples=num_examples, key=self.transport.peer_keys.get(peer))
        except JoinRefused as refusal:
            self._reject(peer, refusal.code, refusal.reason)
            return None
        record = admitted.record
        if admitted.event is not AdmissionEvent.WELCOMED_AGAIN:
            log.info("client %s %s (%s) [%d/%d]", record.client_id, admitted.event.value,
                     f"assigned shard {record.shard}" if record.shard else f"{record.num_examples} examples",
                     len(self.registry.clients), self.min_clients)
        welcome = Message(MessageType.WELCOME, round=self._round, client_id=record.client_id, arrays=self._weights,
                          body={"model_json": self.model.model_json, "compile_config": self.model.compile_config,
                                "plan": self.plan.to_body(), "rounds": self.rounds, "shard": record.shard,
                                **self._encoding})
        self.transport.send(peer, protocol.encode(welcome))
        return record.client_id

    def _drop_revoked_keys(self) -> list[PoolEvent]:
        """Every REVOCATION_CHECK_S: drop the connected clients whose key left the authorized directory,
        and close their connections (a new handshake with that key is then refused)."""
        if self.admission is None or self.admission.authorized_dir is None:
            return []
        now = time.monotonic()
        if now < self._next_revocation_check:
            return []
        self._next_revocation_check = now + REVOCATION_CHECK_S
        events: list[PoolEvent] = []
        for client_id, record in list(self.registry.clients.items()):
            if record.key is not None and not self.admission.is_authorized(record.key.encode()):
                reason = "key revoked (its .key file was removed)"
                if self._remove(client_id, reason):
                    events.append(Gone(client_id, reason))
                self.transport.disconnect(record.peer)
        return events

    def _remove(self, client_id: str, reason: str) -> bool:
        self._uploads.pop(client_id, None)  # a buffer for an upload that will not finish
        self._granted.pop(client_id, None)
        if not self.registry.remove(client_id, reason):
            return False
        (log.debug if self._finishing else log.info)("client %s dropped: %s [%d connected]", client_id, reason,
                                                     len(self.registry.clients))
        return True

    def _reject(self, peer: bytes, code: ErrorCode, reason: str) -> None:
        """Log a rejected message (rate-limited) and tell the peer why, when it can be addressed."""
        self._rejections.warning("rejected message [%s] %s", code.value, reason)
        self.transport.send(peer, protocol.encode_error(code, reason))
