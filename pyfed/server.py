"""The federated server: owns the model, admits clients, runs the rounds, aggregates, logs.

One thread, one ROUTER socket, no blocking on any client. The run reads top to bottom::

    resume from the last checkpoint (or start fresh)  ->  wait for --min-clients  ->
    for each round: sample clients, send them FIT, collect their UPDATEs (serving joins,
    noticing lost connections and rejecting bad messages meanwhile); with fewer than
    --min-fit-clients updates, retry the round; aggregate, evaluate, record, checkpoint
    ->  tell every client the run is over.

A client is dropped from a round when it leaves, when its connection closes or misses
ZeroMQ heartbeats (~10 s), or when --round-timeout expires; why is logged and kept in
summary.json. SIGTERM (:meth:`Server.request_stop`) stops at the next wait, after the last
checkpoint, and tells the clients to wait for the server's return.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .checkpoint import (CheckpointError, check_fingerprint, list_checkpoints, load_state, save_checkpoint)
from .model import evaluate, evaluation_dataset, to_wire
from .protocol import Message, MessageType, ProtocolError
from .registry import ClientRecord, JoinRefused, Registry
from .security import Admission, CurveKeys
from .strategy import Aggregator, FedAvg, FitPlan, FitResult, Strategy, sample_clients
from .tracking import RoundRecord, RunLog, archive_previous_run, format_metric
from .training import weighted_evaluation
from .transport import HEARTBEAT_TIMEOUT_MS, RateLimitedLog, ServerTransport

log = logging.getLogger("pyfed.server")

PROGRESS_EVERY_S = 10.0
FINISH_GRACE_S = 15.0
FINISH_RESEND_S = 2.0
STOP_NOTICE_S = 1.5  # after SIGTERM, how long the STOPPING notice has before the socket closes
CONNECTION_LOST = f"connection lost (closed, or no heartbeat for {HEARTBEAT_TIMEOUT_MS / 1000:g}s)"


class ServerStopping(Exception):
    """Raised inside the run when a stop was requested (SIGTERM); the run ends cleanly."""


class Server:
    """Runs a federation over ZeroMQ for ``rounds`` rounds and returns the rounds' records."""

    def __init__(
        self,
        model: Any,
        *,
        address: str,
        rounds: int,
        min_clients: int,
        plan: FitPlan,
        strategy: Strategy | None = None,
        test_data: tuple[np.ndarray, np.ndarray] | None = None,
        logdir: Path | None = None,
        round_timeout_s: float | None = None,
        num_shards: int = 0,
        config_summary: dict[str, Any] | None = None,
        min_fit_clients: int = 1,
        fraction_fit: float = 1.0,
        seed: int = 0,
        checkpoint_dir: Path | None = None,
        keep_checkpoints: int = 3,
        fresh_start: bool = False,
        curve: CurveKeys | None = None,
        authorized_keys: Path | None = None,
        join_rate: float = 100.0,
    ):
        if not 1 <= min_fit_clients:
            raise ValueError(f"min_fit_clients must be at least 1, got {min_fit_clients}")
        self.model = model
        self.rounds = rounds
        self.min_clients = min_clients
        self.min_fit_clients = min_fit_clients
        self.fraction_fit = fraction_fit
        self.seed = seed
        self.plan = plan
        self.strategy = strategy or FedAvg()
        self.test_data = test_data
        self._test_dataset = None
        self.round_timeout_s = round_timeout_s
        self.weights: list[np.ndarray] = model.get_weights()
        self.specs = protocol.array_specs(self.weights)
        self.model_json, self.compile_config = to_wire(model)
        model_bytes = sum(a.nbytes for a in self.weights)
        self.limits = protocol.Limits(max_header_bytes=1024 * 1024, max_arrays=max(1, len(self.specs)),
                                      max_array_bytes=max(1, model_bytes), max_total_bytes=max(1, model_bytes))
        admission = Admission(authorized_keys, curve.public) if curve is not None else None
        self.transport = ServerTransport(address, max_frame_bytes=protocol.max_frame_bytes(self.specs, self.limits),
                                         curve=curve, admission=admission)
        self.endpoint: str | None = None
        self.registry = Registry(num_shards, join_rate)
        self.current_round = 0
        self.completed_rounds = 0
        self.logdir = Path(logdir) if logdir else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else (self.logdir / "checkpoints" if logdir else None)
        self.keep_checkpoints = keep_checkpoints
        self.fresh_start = fresh_start
        self.config_summary = config_summary or {}
        self.fingerprint = {
            "model": model_fingerprint(self.model_json, self.compile_config, self.specs),
            "strategy": json.dumps(self.strategy.describe(), sort_keys=True, default=str),
            "num_shards": num_shards,
        }
        self.run_log: RunLog | None = None
        self.history: list[RoundRecord] = []
        self.final_metrics: tuple[float | None, float | None] = (None, None)
        self._rejections = RateLimitedLog(log)
        self._finishing = False
        self._stop_reason: str | None = None

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """The connected clients, by id."""
        return self.registry.clients

    def request_stop(self, reason: str) -> None:
        """Stop at the next wait (safe from a signal handler): the last checkpoint stays the resume point."""
        self._stop_reason = reason

    # --- the run, top to bottom ----------------------------------------------------------------

    def run(self) -> list[RoundRecord]:
        """Resume or start, wait for clients, run every round, tell the clients the run is over.

        Raises :class:`CheckpointError` if the checkpoint to resume from is corrupt or was written
        by a different run; nothing is loaded then.
        """
        try:
            self._open_run()
            self.endpoint = self.transport.bind()
        except BaseException:
            self.transport.close()
            raise
        log.info("listening on %s%s; model has %d arrays, %.1f MB; waiting for %d clients", self.endpoint,
                 " (CurveZMQ)" if self.transport.encrypted else " (NOT encrypted)", len(self.specs),
                 sum(a.nbytes for a in self.weights) / 1e6, self.min_clients)
        try:
            self._wait_for_clients(self.min_clients)
            for server_round in range(self.completed_rounds + 1, self.rounds + 1):
                self._run_round(server_round)
            # the global model was evaluated at the end of the last round; no need to do it again
            self.final_metrics = ((self.history[-1].test_loss, self.history[-1].test_accuracy)
                                  if self.history else self._evaluate())
            if self.run_log:
                self.run_log.finish(*self.final_metrics)
            self._checkpoint(finished=True)
            self._finishing = True
            self._finish_clients("the run is complete")
            log.info("run finished: %d rounds, final test loss %s, accuracy %s%s", self.rounds,
                     format_metric(self.final_metrics[0]), format_metric(self.final_metrics[1]),
                     f"; summary in {self.run_log.summary_path}" if self.run_log else "")
        except ServerStopping:
            frames = protocol.encode(Message(MessageType.STOPPING, round=self.completed_rounds,
                                             body={"reason": self._stop_reason}))
            for record in self.clients.values():
                self.transport.send(record.peer, frames)
            time.sleep(STOP_NOTICE_S)  # let idle clients read it before the connections close
            log.info("stopped (%s) after %d completed rounds; %s", self._stop_reason, self.completed_rounds,
                     "the same command resumes from the last checkpoint" if self.checkpoint_dir
                     else "no checkpoints are kept (no log or checkpoint directory)")
        finally:
            if self.run_log:
                self.run_log.close()
            self.transport.close()
        return self.history

    # --- checkpoints: resume, or start a new run -----------------------------------------------

    def _open_run(self) -> None:
        """Resume from the newest checkpoint of an unfinished run, or archive what is there and start."""
        existing = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        state = None
        if existing and not self.fresh_start:
            state = self._load_checkpoint(existing[-1])
            if state["finished"]:
                log.info("the run in %s finished all its rounds; starting a new run", self.checkpoint_dir)
                state = None
        if state is None and existing and self.checkpoint_dir.parent != self.logdir:
            archived = archive_previous_run(self.checkpoint_dir, tuple(p.name for p in existing))
            log.info("moved the previous run's checkpoints to %s", archived)
        if state is not None:
            self._restore(state)
            log.info("resuming from %s: %d of %d rounds completed, %d known clients", existing[-1],
                     self.completed_rounds, self.rounds, len(self.registry.known))
        if self.logdir:
            self.run_log = RunLog(self.logdir, config=self.config_summary,
                                  resume=self.history if state is not None else None,
                                  clients=state["summary_clients"] if state is not None else None)
            if self.run_log.archived_to:
                log.info("moved the previous run's logs to %s", self.run_log.archived_to)

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read and fully check a checkpoint; raise CheckpointError (naming it) before anything is used."""
        state = load_state(path)
        if state.get("finished") is True:
            return {"finished": True}  # nothing to resume: any settings may start the next run
        check_fingerprint(path, state.get("fingerprint"), self.fingerprint)
        try:
            completed = state["round"]
            weights = state["weights"]
            protocol.check_specs(protocol.array_specs(weights), self.specs)
            history = [RoundRecord(**entry) for entry in state["history"]]
            if not isinstance(completed, int) or [r.round for r in history] != list(range(1, completed + 1)):
                raise ValueError(f"round {completed!r} does not match its history of {len(history)} rounds")
            strategy = copy.deepcopy(self.strategy)
            strategy.load_state(state["strategy"])
            known = Registry.parse_known(state["known_clients"])
            restored = {"round": completed, "finished": False, "weights": list(weights),
                        "history": history, "strategy": strategy, "known": known,
                        "summary_clients": dict(state["summary_clients"]),
                        "next_client_number": int(state["next_client_number"])}
        except (KeyError, TypeError, ValueError, AttributeError, ProtocolError) as error:
            raise CheckpointError(f"{path}: not a usable checkpoint of this run "
                                  f"({error.__class__.__name__}: {str(error)[:200]})") from None
        if completed > self.rounds:
            raise CheckpointError(f"{path}: {completed} rounds are already completed but --rounds is {self.rounds}")
        return restored

    def _restore(self, state: dict[str, Any]) -> None:
        self.completed_rounds = self.current_round = state["round"]
        self.weights = state["weights"]
        self.history = state["history"]
        self.strategy = state["strategy"]
        self.registry.restore(state["known"], state["next_client_number"])

    def _checkpoint(self, *, finished: bool = False) -> None:
        if not self.checkpoint_dir:
            return
        state = {"round": self.completed_rounds, "finished": finished, "fingerprint": self.fingerprint,
                 "weights": list(self.weights), "strategy": self.strategy.state(),
                 "summary_clients": self.run_log.clients if self.run_log else {},
                 "history": [record.to_json() for record in self.history], **self.registry.state()}
        path = save_checkpoint(self.checkpoint_dir, self.completed_rounds, state, keep=self.keep_checkpoints)
        log.info("%s checkpoint written: %s", "final" if finished else "round", path)

    # --- rounds --------------------------------------------------------------------------------

    def _wait_for_clients(self, needed: int) -> None:
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while len(self.clients) < needed:
            self._serve_one(timeout_s=1.0)
            if time.monotonic() >= next_progress:
                log.info("waiting for clients: %d/%d joined", len(self.clients), needed)
                next_progress = time.monotonic() + PROGRESS_EVERY_S

    def _run_round(self, server_round: int) -> None:
        self.current_round = server_round
        started = time.monotonic()
        sent_before, received_before = self.transport.bytes_sent, self.transport.bytes_received
        failed_attempts: list[dict[str, Any]] = []
        for attempt in itertools.count(1):
            self._wait_for_clients(self.min_fit_clients)
            selected, aggregator, results, dropped = self._fit_attempt(server_round, attempt)
            if len(results) >= self.min_fit_clients:
                break
            failed_attempts.append({"attempt": attempt, "selected": [cid for cid, _ in selected],
                                    "answered": sorted(results), "dropped": dropped})
            log.warning("round %d attempt %d failed: %d update(s), fewer than --min-fit-clients %d; "
                        "retrying the round", server_round, attempt, len(results), self.min_fit_clients)
        self.weights = aggregator.result()
        eval_started = time.monotonic()
        test_loss, test_accuracy = self._evaluate()
        federated = None
        if self.plan.eval_fraction > 0:
            federated, eval_dropped = self._federated_evaluation(server_round)
            for client_id, reason in eval_dropped.items():
                dropped.setdefault(client_id, f"evaluation: {reason}")
        eval_s = time.monotonic() - eval_started

        record = RoundRecord.build(
            server_round, [cid for cid, _ in selected], results, duration_s=time.monotonic() - started,
            test=(test_loss, test_accuracy), eval_s=eval_s, dropped=dropped, federated=federated,
            bytes_sent=self.transport.bytes_sent - sent_before,
            bytes_received=self.transport.bytes_received - received_before)
        record.failed_attempts = failed_attempts
        self.history.append(record)
        self.completed_rounds = server_round
        if self.run_log:
            self.run_log.record_round(record)
        log.info("%s", record.describe(self.rounds))
        self._checkpoint()

    def _fit_attempt(self, server_round: int, attempt: int) -> tuple[list[tuple[str, FitPlan]], Aggregator,
                                                                     dict[str, FitResult], dict[str, str]]:
        """One try at a round: sample clients, send FIT, collect what arrives."""
        sampled = sample_clients(list(self.clients), self.fraction_fit, self.min_fit_clients,
                                 (self.seed, server_round, attempt))
        selected = self.strategy.configure_fit(server_round, sampled, self.plan)
        log.info("round %d/%d started%s: %d of %d clients (%s)", server_round, self.rounds,
                 f" (attempt {attempt})" if attempt > 1 else "", len(selected), len(self.clients),
                 ", ".join(cid for cid, _ in selected))
        aggregator = self.strategy.aggregator(server_round, self.weights)
        pending = self._send_fit(server_round, selected)
        unreached = {cid: "could not be reached" for cid, _ in selected if cid not in pending}
        results, dropped = self._collect_updates(server_round, pending, aggregator)
        return selected, aggregator, results, {**unreached, **dropped}

    def _send_fit(self, server_round: int, selected: Sequence[tuple[str, FitPlan]]) -> set[str]:
        """Send FIT (global weights + plan) to each selected client; return those reached."""
        encoded: dict[FitPlan, list] = {}
        reached = set()
        for client_id, plan in selected:
            if plan not in encoded:  # one encoding per distinct plan: the weights are never copied
                encoded[plan] = protocol.encode(Message(MessageType.FIT, round=server_round,
                                                        body={"plan": plan.to_body()}, arrays=self.weights))
            if self.transport.send(self.clients[client_id].peer, encoded[plan]):
                reached.add(client_id)
            else:
                log.warning("round %d: could not reach client %s", server_round, client_id)
        return reached

    def _collect_updates(self, server_round: int, pending: set[str],
                         aggregator: Aggregator) -> tuple[dict[str, FitResult], dict[str, str]]:
        """Collect the round's UPDATEs; each goes to ``aggregator`` as it arrives and its frames are
        released, so the server never holds more than one update at a time (for streaming rules)."""
        results: dict[str, FitResult] = {}

        def accept(client_id: str, message: Message) -> None:
            result = FitResult(client_id, message.arrays, message.body["num_examples"],
                               {"fit_s": message.body["fit_s"], "history": message.body["history"]})
            aggregator.add(result)
            result.weights = ()
            results[client_id] = result
            if self.run_log:
                self.run_log.clients.setdefault(client_id, {"shard": None})["num_examples"] = result.num_examples
            log.info("round %d: update from %s (%d examples, fit %.2fs)%s", server_round, client_id,
                     message.body["num_examples"], message.body["fit_s"], _history_tail(message.body["history"]))

        dropped = self._collect(server_round, pending, MessageType.UPDATE, accept)
        return results, dropped

    def _federated_evaluation(self, server_round: int) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Ask every connected client to evaluate the new global weights on its held-out data."""
        frames = protocol.encode(Message(MessageType.EVALUATE, round=server_round, arrays=self.weights))
        pending = {cid for cid, record in self.clients.items() if self.transport.send(record.peer, frames)}
        results: dict[str, tuple[int, float | None, float | None]] = {}

        def accept(client_id: str, message: Message) -> None:
            results[client_id] = (message.body["num_examples"], message.body["loss"], message.body["accuracy"])

        dropped = self._collect(server_round, pending, MessageType.EVALUATION, accept)
        return weighted_evaluation(results), dropped

    def _collect(self, server_round: int, pending: set[str], kind: MessageType,
                 accept: Callable[[str, Message], None]) -> dict[str, str]:
        """Serve messages until every pending client has answered with ``kind``, left, or timed out.

        Valid answers go to ``accept``; returns {client id: why it was dropped}.
        """
        dropped: dict[str, str] = {}
        what = "update" if kind is MessageType.UPDATE else kind.value
        deadline = time.monotonic() + self.round_timeout_s if self.round_timeout_s else None
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while pending:
            for client_id in sorted(pending - set(self.clients)):
                pending.discard(client_id)
                dropped[client_id] = self.registry.removed.get(client_id, "left the federation")
                log.warning("round %d: dropped client %s before its %s: %s", server_round, client_id, what,
                            dropped[client_id])
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                for client_id in sorted(pending):
                    dropped[client_id] = f"no {what} within {self.round_timeout_s:g}s"
                    log.warning("round %d: dropped client %s: no %s within %gs",
                                server_round, client_id, what, self.round_timeout_s)
                break
            if now >= next_progress:
                log.info("round %d: waiting for %d %s(s): %s", server_round, len(pending), what,
                         ", ".join(sorted(pending)))
                next_progress = now + PROGRESS_EVERY_S
            received = self._serve_one(timeout_s=min(1.0, deadline - now) if deadline else 1.0)
            if received is None:
                continue
            client_id, message = received
            rejection = self._check_reply(server_round, client_id, message, pending, kind)
            if rejection:
                self._reject(self.clients[client_id].peer, "bad_reply", f"client {client_id}: {rejection}")
                continue
            pending.discard(client_id)
            accept(client_id, message)
        return dropped

    def _check_reply(self, server_round: int, client_id: str, message: Message, pending: set[str],
                     kind: MessageType) -> str | None:
        """Why this UPDATE or EVALUATION cannot be used, or None if it can."""
        if message.type is not kind:
            return f"sent {message.type.value} while the server waits for {kind.value} (late or out of order)"
        if message.round != server_round:
            return f"{kind.value} is for round {message.round}, the current round is {server_round} (stale)"
        if client_id not in pending:
            return f"no {kind.value} expected from it in round {server_round} (duplicate or not asked)"
        try:
            protocol.check_finite(message.arrays)
        except ProtocolError as error:
            return str(error)
        return None

    def _evaluate(self) -> tuple[float | None, float | None]:
        if self.test_data is None:
            return None, None
        self.model.set_weights(self.weights)
        if self._test_dataset is None:
            self._test_dataset = evaluation_dataset(*self.test_data)
        return evaluate(self.model, self._test_dataset)

    def _finish_clients(self, reason: str) -> None:
        """Tell every client the run is over, repeating FINISH until each confirms with LEAVE.

        A single FINISH can be lost if a client's connection is being re-established at that
        moment; the confirmation makes the end of a run reliable (bounded by FINISH_GRACE_S).
        """
        frames = protocol.encode(Message(MessageType.FINISH, round=self.current_round, body={"reason": reason}))
        deadline = time.monotonic() + FINISH_GRACE_S
        next_send = 0.0
        while self.clients and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                for record in list(self.clients.values()):
                    self.transport.send(record.peer, frames)
                next_send = time.monotonic() + FINISH_RESEND_S
            self._serve_one(timeout_s=0.2)  # LEAVEs remove clients; late UPDATEs are dropped
        if self.clients:
            log.warning("no confirmation of the end of the run from: %s", ", ".join(sorted(self.clients)))

    # --- serving one message -------------------------------------------------------------------

    def _serve_one(self, timeout_s: float) -> tuple[str, Message] | None:
        """Receive one message; handle joins, leaves, lost connections and bad input here; return
        UPDATEs and EVALUATIONs to the caller. Raises ServerStopping once a stop was requested."""
        if self._stop_reason and not self._finishing:
            raise ServerStopping(self._stop_reason)
        received = self.transport.recv(timeout_s)
        for lost in self.transport.lost_peers(idle=received is None):
            lost_client = self.registry.client_of(lost)
            if lost_client is not None:
                self._remove_client(lost_client, CONNECTION_LOST, quiet=self._finishing)
        if received is None:
            return None
        peer, frames = received
        try:
            message = protocol.decode(frames, expected_arrays=self.specs, limits=self.limits)
        except ProtocolError as error:
            self._reject(peer, "bad_message", f"from peer {peer.hex()[:12]}: {error}")
            return None
        client_id = self.registry.client_of(peer)
        if message.type is MessageType.JOIN:
            self._handle_join(peer, message)
            return None
        if client_id is None:
            self._reject(peer, "not_joined", f"{message.type.value} from peer {peer.hex()[:12]} that has not joined")
            return None
        if message.client_id and message.client_id != client_id:
            self._reject(peer, "wrong_client_id",
                         f"peer of client {client_id} sent a message claiming id {message.client_id!r}")
            return None
        if self.transport.encrypted and self.transport.peer_keys.get(peer) != self.clients[client_id].key:
            self._reject(peer, "wrong_key", f"a message for client {client_id} came with another CURVE key")
            return None
        if message.type in (MessageType.UPDATE, MessageType.EVALUATION):
            return client_id, message
        if message.type is MessageType.LEAVE:
            self._remove_client(client_id, f"left ({message.body.get('reason') or 'no reason given'})",
                               quiet=self._finishing)
        elif message.type is MessageType.ERROR:
            log.warning("client %s reported an error [%s]: %s", client_id, message.body["code"], message.body["reason"])
            self._remove_client(client_id, f"error: {message.body['code']}")
        else:
            self._reject(peer, "unexpected_type", f"client {client_id} sent {message.type.value}, which only servers send")
        return None

    def _handle_join(self, peer: bytes, message: Message) -> None:
        try:
            admitted = self.registry.admit(peer, message.client_id, wants_shard=bool(message.body.get("wants_shard")),
                                           num_examples=message.body.get("num_examples", 0),
                                           key=self.transport.peer_keys.get(peer))
        except JoinRefused as refusal:
            self._reject(peer, refusal.code, refusal.reason)
            return
        record = admitted.record
        if admitted.event != "welcomed again":
            if self.run_log:
                self.run_log.clients[record.client_id] = {"shard": record.shard, "num_examples": record.num_examples}
            log.info("client %s %s (%s) [%d/%d]", record.client_id, admitted.event,
                     f"assigned shard {record.shard}" if record.shard else f"{record.num_examples} examples",
                     len(self.clients), self.min_clients)
        welcome = Message(MessageType.WELCOME, round=self.current_round, client_id=record.client_id,
                          arrays=self.weights,
                          body={"model_json": self.model_json, "compile_config": self.compile_config,
                                "plan": self.plan.to_body(), "rounds": self.rounds, "shard": record.shard})
        self.transport.send(peer, protocol.encode(welcome))

    def _remove_client(self, client_id: str, reason: str, quiet: bool = False) -> None:
        if self.registry.remove(client_id, reason):
            (log.debug if quiet else log.info)("client %s dropped: %s [%d connected]", client_id, reason,
                                               len(self.clients))

    def _reject(self, peer: bytes, code: str, reason: str) -> None:
        """Log a rejected message (rate-limited) and tell the peer why, when it can be addressed."""
        self._rejections.warning("rejected message [%s] %s", code, reason)
        self.transport.send(peer, protocol.encode_error(code, reason))


def model_fingerprint(model_json: str, compile_config: dict[str, Any], specs: Sequence[protocol.ArraySpec]) -> str:
    """A short hash of the model's structure: its layer classes, array shapes and compile settings.

    Names are left out on purpose: Keras numbers them per process (``dense_3``), so the same
    architecture built again after a restart must still match its checkpoint.
    """
    def without_names(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_names(v) for k, v in value.items() if k != "name"}
        if isinstance(value, list):
            return [without_names(v) for v in value]
        return value

    classes: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if "class_name" in value:
                classes.append(str(value["class_name"]))
            for child in value.values():
                collect(child)
        elif isinstance(value, list):
            for child in value:
                collect(child)

    collect(json.loads(model_json))
    document = [classes, [[dtype, list(shape)] for dtype, shape in specs], without_names(compile_config)]
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _history_tail(history: dict[str, list]) -> str:
    parts = [f"{name} {series[-1]:.4f}" for name, series in history.items() if series and series[-1] is not None]
    return f": {', '.join(parts)}" if parts else ""
