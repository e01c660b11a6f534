"""The federated server: owns the model, admits clients, runs the rounds, aggregates, logs.

One thread, one ROUTER socket, no blocking on any client. The run reads top to bottom::

    resume from the newest checkpoint that loads (or start fresh)  ->  wait for --min-clients  ->
    for each round: sample clients, send them FIT, collect their UPDATEs (serving joins,
    noticing lost connections and rejecting bad messages meanwhile); with fewer than
    --min-fit-clients updates, retry the round; aggregate, check the new model, evaluate,
    checkpoint, then log  ->  tell every client the run is over.

A client is dropped from a round when it leaves, when its connection closes or misses ZeroMQ
heartbeats (~10 s), when its answer is refused, or when the round timeout expires; why is logged
and kept in summary.json. A dropped client that rejoins before the round ends is sent its FIT
again. A new global model that is not finite (or whose test loss is not) is refused: the round
keeps the previous model and names the clients that contributed. SIGTERM
(:meth:`Server.request_stop`) stops at the next wait, after the last checkpoint, and tells the
clients to wait for the server's return.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .aggregate import why_unusable
from .checkpoint import (CheckpointError, CheckpointMismatch, check_fingerprint, list_checkpoints, load_state,
                         save_checkpoint)
from .model import evaluate, evaluation_dataset, to_wire
from .protocol import Message, MessageType, ProtocolError
from .registry import ClientRecord, JoinRefused, Registry
from .security import Admission, CurveKeys
from .strategy import Aggregator, FedAvg, FitPlan, FitResult, Strategy, WeightedMeanStrategy, sample_clients
from .tracking import RoundRecord, RunLog, archive_previous_run, format_metric
from .training import weighted_evaluation
from .transport import (HEARTBEAT_TIMEOUT_MS, RateLimitedLog, ServerTransport, raise_open_file_limit,
                        trim_freed_memory)

log = logging.getLogger("pyfed.server")

PROGRESS_EVERY_S = 10.0
FINISH_GRACE_S = 15.0
FINISH_RESEND_S = 2.0
STOP_NOTICE_S = 1.5  # after SIGTERM, how long the STOPPING notice has before the socket closes
REVOCATION_CHECK_S = 1.0  # how often connected clients' keys are checked against the authorized directory
CHECKPOINT_RETRY_S = 60.0  # a checkpoint write that fails (no free descriptor, full disk) is retried this long
MAX_EXAMPLES = 10_000_000
CONNECTION_LOST = f"connection lost (closed, or no heartbeat for {HEARTBEAT_TIMEOUT_MS / 1000:g}s)"
AUTO = "auto"


class ServerStopping(Exception):
    """Raised inside the run when a stop was requested (SIGTERM); the run ends cleanly."""


class RoundTimeout:
    """How long a round waits for its answers. A fixed number of seconds, None (no limit), or "auto":

    * before any answer was measured: 300 s plus 60 s per local epoch of the plan;
    * after that: 3 x the slowest answer seen so far in the run (FIT sent to UPDATE received, so
      training and both transfers), at least 60 s;
    * an attempt in which no selected client answered in time doubles it for the retry, so a
      workload slower than the estimate still gets through.
    """

    FIRST_BASE_S, FIRST_PER_EPOCH_S, FACTOR, MINIMUM_S = 300.0, 60.0, 3.0, 60.0

    def __init__(self, setting: float | str | None, epochs: int):
        self.setting, self.epochs = setting, epochs
        self.slowest_answer_s: float | None = None
        self._backoff = 1.0

    @property
    def seconds(self) -> float | None:
        if self.setting != AUTO:
            return self.setting  # a number, or None for no limit
        if self.slowest_answer_s is None:
            base = self.FIRST_BASE_S + self.FIRST_PER_EPOCH_S * self.epochs
        else:
            base = max(self.MINIMUM_S, self.FACTOR * self.slowest_answer_s)
        return base * self._backoff

    def answered(self, seconds: float) -> None:
        self.slowest_answer_s = max(self.slowest_answer_s or 0.0, seconds)

    def attempt_ended(self, *, answered: int) -> None:
        """An attempt ended; with no answer in time, the next one waits twice as long."""
        self._backoff = 1.0 if answered else self._backoff * 2


@dataclass
class _Collection:
    """The answers one attempt waits for: who was asked, with what, and who still owes an answer."""

    kind: MessageType
    server_round: int
    attempt: int
    frames: dict[str, list] = field(default_factory=dict)  # client id -> what it was sent (resent on rejoin)
    pending: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)

    def drop(self, client_id: str, reason: str) -> bool:
        if client_id not in self.pending:
            return False
        self.pending.discard(client_id)
        self.dropped[client_id] = reason
        return True


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
        round_timeout_s: float | str | None = AUTO,
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
        max_examples: int = MAX_EXAMPLES,
        max_ids_per_key: int | None = None,
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
        self.round_timeout = RoundTimeout(round_timeout_s, plan.epochs)
        self.max_examples = max_examples
        self.weights: list[np.ndarray] = model.get_weights()
        self.specs = protocol.array_specs(self.weights)
        self.model_json, self.compile_config = to_wire(model)
        self.limits = protocol.client_limits(self.specs, plan.epochs)
        self.admission = Admission(authorized_keys, curve.public) if curve is not None else None
        self.transport = ServerTransport(address, max_frame_bytes=protocol.max_frame_bytes(self.specs, self.limits),
                                         curve=curve, admission=self.admission,
                                         max_message_bytes=protocol.message_budget(self.limits))
        self.endpoint: str | None = None
        self.registry = Registry(num_shards, join_rate, **({"max_ids_per_key": max_ids_per_key}
                                                           if max_ids_per_key else {}))
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
        self._collection: _Collection | None = None
        self._next_revocation_check = 0.0

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

        Raises :class:`CheckpointMismatch` if the checkpoint to resume from was written by a
        different run; nothing is loaded then. Corrupt checkpoints are skipped (see ``_open_run``).
        """
        before, after = raise_open_file_limit()
        if after > before:
            log.info("raised the open-file limit from %d to %d (one descriptor per connection)", before, after)
        try:
            self._open_run()
            self.endpoint = self.transport.bind()
        except BaseException:
            self.transport.close()
            raise
        timeout = self.round_timeout.seconds
        log.info("listening on %s%s; model has %d arrays, %.1f MB; waiting for %d clients; round timeout %s",
                 self.endpoint, " (CurveZMQ)" if self.transport.encrypted else " (NOT encrypted)", len(self.specs),
                 sum(a.nbytes for a in self.weights) / 1e6, self.min_clients,
                 "none" if timeout is None else f"{timeout:g}s" + (" (auto)" if self.round_timeout.setting == AUTO else ""))
        try:
            self._wait_for_clients(self.min_clients)
            for server_round in range(self.completed_rounds + 1, self.rounds + 1):
                self._run_round(server_round)
            # the global model was evaluated at the end of the last round; no need to do it again
            self.final_metrics = ((self.history[-1].test_loss, self.history[-1].test_accuracy)
                                  if self.history else self._evaluate(self.weights))
            self._checkpoint(finished=True)
            if self.run_log:
                self.run_log.finish(*self.final_metrics)
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
        """Resume from the newest checkpoint of an unfinished run that loads, or archive what is there
        and start. A checkpoint that does not load is renamed ``*.corrupt`` (kept for inspection)
        and the next older one is tried; one from a different run stops the start-up."""
        existing = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        state, source = None, None
        if existing and not self.fresh_start:
            state, source = self._newest_usable(existing)
            if state is not None and state["finished"]:
                log.info("the run in %s finished all its rounds; starting a new run", self.checkpoint_dir)
                state = None
        leftovers = ([*list_checkpoints(self.checkpoint_dir), *sorted(self.checkpoint_dir.glob("*.corrupt"))]
                     if self.checkpoint_dir else [])
        if state is None and leftovers and self.checkpoint_dir.parent != self.logdir:
            archived = archive_previous_run(self.checkpoint_dir, tuple(p.name for p in leftovers))
            log.info("moved the previous run's checkpoints to %s", archived)
        if state is not None:
            self._restore(state)
            log.info("resuming from %s: %d of %d rounds completed, %d known clients", source,
                     self.completed_rounds, self.rounds, len(self.registry.known))
        if self.logdir:
            self.run_log = RunLog(self.logdir, config=self.config_summary,
                                  resume=self.history if state is not None else None,
                                  clients=state["summary_clients"] if state is not None else None)
            if self.run_log.archived_to:
                log.info("moved the previous run's logs to %s", self.run_log.archived_to)

    def _newest_usable(self, checkpoints: Sequence[Path]) -> tuple[dict[str, Any] | None, Path | None]:
        for path in reversed(checkpoints):
            try:
                return self._load_checkpoint(path), path
            except CheckpointMismatch:
                raise
            except CheckpointError as error:
                aside = path.with_name(path.name + ".corrupt")
                path.rename(aside)
                log.warning("skipped a checkpoint that does not load (%s); kept it as %s", error, aside.name)
        log.warning("no checkpoint in %s could be loaded; starting a new run", self.checkpoint_dir)
        return None, None

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read and fully check a checkpoint; raise CheckpointError (naming it) before anything is used."""
        state = load_state(path)
        if state.get("finished") is True:
            return {"finished": True}  # nothing to resume: any settings may start the next run
        check_fingerprint(path, state.get("fingerprint"), self.fingerprint)
        try:
            completed = state["round"]
            if not isinstance(completed, int) or isinstance(completed, bool) or completed < 0:
                raise ValueError(f"round is {str(completed)[:20]!r}, not a count")
            if completed > self.rounds:
                raise CheckpointMismatch(f"{path}: {completed} rounds are already completed but --rounds is "
                                         f"{self.rounds}")
            weights = state["weights"]
            if not isinstance(weights, list) or not all(isinstance(w, np.ndarray) for w in weights):
                raise ValueError("weights are not a list of arrays")
            protocol.check_specs(protocol.array_specs(weights), self.specs)
            if why_unusable(weights):
                raise ValueError(f"the saved global model is unusable: {why_unusable(weights)}")
            if not isinstance(state["history"], list):
                raise ValueError("history is not a list")
            history = [RoundRecord.from_json(entry) for entry in state["history"]]
            if [r.round for r in history] != list(range(1, completed + 1)):
                raise ValueError(f"round {completed!r} does not match its history of {len(history)} rounds")
            strategy = self._restored_strategy(state["strategy"], weights)
            known = Registry.parse_known(state["known_clients"])
            summary_clients = _parse_summary_clients(state["summary_clients"])
            next_number = state["next_client_number"]
            if not isinstance(next_number, int) or isinstance(next_number, bool) or next_number < 1:
                raise ValueError(f"next_client_number is {str(next_number)[:20]!r}")
            slowest = state.get("slowest_answer_s")
            if slowest is not None and not (isinstance(slowest, (int, float)) and math.isfinite(slowest)
                                            and slowest >= 0):
                raise ValueError(f"slowest_answer_s is {str(slowest)[:20]!r}")
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ProtocolError, ArithmeticError) as error:
            raise CheckpointError(f"{path}: not a usable checkpoint of this run "
                                  f"({error.__class__.__name__}: {str(error)[:200]})") from None
        return {"round": completed, "finished": False, "weights": list(weights), "history": history,
                "strategy": strategy, "known": known, "summary_clients": summary_clients,
                "next_client_number": next_number, "slowest_answer_s": slowest}

    def _restored_strategy(self, saved: Any, weights: list[np.ndarray]) -> Strategy:
        """The strategy with ``saved`` state, after a trial aggregation on a copy shows the state fits
        the model (a wrong-shaped momentum, say, would otherwise fail mid-run)."""
        if not isinstance(saved, dict):
            raise ValueError("the strategy state is not a mapping")
        strategy = copy.deepcopy(self.strategy)
        strategy.load_state(saved)
        trial = getattr(copy.deepcopy(strategy), "inner", None) or copy.deepcopy(strategy)
        if isinstance(trial, WeightedMeanStrategy):  # the strategies that keep state between rounds
            reason = why_unusable(trial.server_update(weights, weights))
            if reason:
                raise ValueError(f"the strategy state does not fit the model: a trial step gives a model where "
                                 f"{reason}")
        return strategy

    def _restore(self, state: dict[str, Any]) -> None:
        self.completed_rounds = self.current_round = state["round"]
        self.weights = state["weights"]
        self.history = state["history"]
        self.strategy = state["strategy"]
        self.registry.restore(state["known"], state["next_client_number"])
        self.round_timeout.slowest_answer_s = state["slowest_answer_s"]

    def _checkpoint(self, *, finished: bool = False) -> bool:
        """Write the checkpoint (before any log of the round). A failed write (no free descriptor, a
        full disk) is retried for CHECKPOINT_RETRY_S; after that the run goes on and the next
        checkpoint covers this round. True if it was written."""
        if not self.checkpoint_dir:
            return True
        state = {"round": self.completed_rounds, "finished": finished, "fingerprint": self.fingerprint,
                 "weights": list(self.weights), "strategy": self.strategy.state(),
                 "summary_clients": self.run_log.clients if self.run_log else {},
                 "history": [record.to_json() for record in self.history],
                 "slowest_answer_s": self.round_timeout.slowest_answer_s, **self.registry.state()}
        deadline = time.monotonic() + CHECKPOINT_RETRY_S
        while True:
            try:
                path = save_checkpoint(self.checkpoint_dir, self.completed_rounds, state, keep=self.keep_checkpoints)
            except OSError as error:
                if time.monotonic() >= deadline:
                    log.error("could not write the checkpoint after round %d (%s); the run goes on and the next "
                              "checkpoint will cover this round", self.completed_rounds, error)
                    return False
                self._rejections.warning("could not write the checkpoint after round %d (%s); retrying",
                                         self.completed_rounds, error)
                time.sleep(1.0)
                continue
            log.info("%s checkpoint written: %s", "final" if finished else "round", path)
            return True

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
            self.round_timeout.attempt_ended(answered=len(results))
            if len(results) >= self.min_fit_clients:
                break
            failed_attempts.append({"attempt": attempt, "selected": [cid for cid, _ in selected],
                                    "answered": sorted(results), "dropped": dropped})
            log.warning("round %d attempt %d failed: %d update(s), fewer than --min-fit-clients %d; "
                        "retrying the round", server_round, attempt, len(results), self.min_fit_clients)
        eval_started = time.monotonic()
        refused, (test_loss, test_accuracy) = self._accept_new_model(server_round, aggregator, sorted(results))
        federated = None
        if self.plan.eval_fraction > 0 and not refused:
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
        record.refused = refused
        self.history.append(record)
        self.completed_rounds = server_round
        self._checkpoint()  # first: a failed log write must never cost the round
        if self.run_log:
            self.run_log.record_round(record)
        log.info("%s", record.describe(self.rounds))

    def _accept_new_model(self, server_round: int, aggregator: Aggregator,
                          contributors: list[str]) -> tuple[str | None, tuple[float | None, float | None]]:
        """Aggregate; keep the result as the global model unless it is unusable. Returns (why it was
        refused or None, test metrics of the global model now in force)."""
        saved_state = copy.deepcopy(self.strategy.state())
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is judged just below
                candidate = aggregator.result()
        except (ValueError, ArithmeticError) as error:
            candidate, reason = None, f"aggregation failed ({error})"
        else:
            reason = why_unusable(candidate)
        metrics: tuple[float | None, float | None] = (None, None)
        if candidate is not None and reason is None:
            metrics = self._evaluate(candidate)
            reason = why_unusable(candidate, metrics[0])
        if reason is None:
            self.weights = candidate
            return None, metrics
        self.strategy.load_state(saved_state)
        log.warning("round %d: refused the new global model: %s; kept the previous one. Contributing clients: %s",
                    server_round, reason, ", ".join(contributors))
        return reason, self._evaluate(self.weights)

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
        collection = _Collection(MessageType.UPDATE, server_round, attempt)
        encoded: dict[FitPlan, list] = {}
        for client_id, plan in selected:
            if plan not in encoded:  # one encoding per distinct plan: the weights are never copied
                encoded[plan] = protocol.encode(Message(MessageType.FIT, round=server_round,
                                                        body={"plan": plan.to_body(), "attempt": attempt},
                                                        arrays=self.weights))
            collection.frames[client_id] = encoded[plan]
        results: dict[str, FitResult] = {}

        def accept(client_id: str, message: Message) -> None:
            result = FitResult(client_id, message.arrays, message.body["num_examples"],
                               {"fit_s": message.body["fit_s"], "history": message.body["history"]})
            aggregator.add(result)
            result.weights = ()
            results[client_id] = result
            self.registry.record_contribution(client_id)
            if self.run_log:
                self.run_log.record_client(client_id, shard=self.clients[client_id].shard,
                                           num_examples=result.num_examples)
            log.info("round %d: update from %s (%d examples, fit %.2fs)%s", server_round, client_id,
                     message.body["num_examples"], message.body["fit_s"], _history_tail(message.body["history"]))

        dropped = self._collect(collection, accept)
        return selected, aggregator, results, dropped

    def _federated_evaluation(self, server_round: int) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Ask every connected client to evaluate the new global weights on its held-out data."""
        frames = protocol.encode(Message(MessageType.EVALUATE, round=server_round, arrays=self.weights))
        collection = _Collection(MessageType.EVALUATION, server_round, attempt=1,
                                 frames={cid: frames for cid in self.clients})
        results: dict[str, tuple[int, float | None, float | None]] = {}

        def accept(client_id: str, message: Message) -> None:
            results[client_id] = (message.body["num_examples"], message.body["loss"], message.body["accuracy"])

        dropped = self._collect(collection, accept)
        return weighted_evaluation(results), dropped

    def _send_to(self, collection: _Collection, client_id: str) -> bool:
        record = self.clients.get(client_id)
        if record is None or not self.transport.send(record.peer, collection.frames[client_id]):
            return False
        collection.pending.add(client_id)
        collection.dropped.pop(client_id, None)
        collection.sent_at[client_id] = time.monotonic()
        return True

    def _collect(self, collection: _Collection, accept: Callable[[str, Message], None]) -> dict[str, str]:
        """Send what ``collection`` holds and serve messages until every asked client has answered,
        been dropped, or the round timeout expired. Valid answers go to ``accept``; returns
        {client id: why it was dropped}."""
        server_round, what = collection.server_round, ("update" if collection.kind is MessageType.UPDATE
                                                       else collection.kind.value)
        for client_id in collection.frames:
            if not self._send_to(collection, client_id):
                collection.dropped[client_id] = "could not be reached"
                log.warning("round %d: could not reach client %s", server_round, client_id)
        timeout_s = self.round_timeout.seconds
        deadline = time.monotonic() + timeout_s if timeout_s else None
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        self._collection = collection
        try:
            while collection.pending:
                for client_id in sorted(collection.pending - set(self.clients)):
                    collection.drop(client_id, self.registry.removed.get(client_id, "left the federation"))
                    log.warning("round %d: dropped client %s before its %s: %s", server_round, client_id, what,
                                collection.dropped[client_id])
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    for client_id in sorted(collection.pending):
                        collection.drop(client_id, f"no {what} within {timeout_s:g}s")
                        log.warning("round %d: dropped client %s: no %s within %gs", server_round, client_id,
                                    what, timeout_s)
                    break
                if now >= next_progress:
                    log.info("round %d: waiting for %d %s(s): %s", server_round, len(collection.pending), what,
                             ", ".join(sorted(collection.pending)))
                    next_progress = now + PROGRESS_EVERY_S
                received = self._serve_one(timeout_s=min(1.0, deadline - now) if deadline else 1.0)
                if received is not None:
                    self._take_answer(collection, *received, accept)
        finally:
            self._collection = None
        return collection.dropped

    def _take_answer(self, collection: _Collection, client_id: str, message: Message,
                     accept: Callable[[str, Message], None]) -> None:
        """Judge an UPDATE or EVALUATION: stale and unasked ones are refused; a duplicate of an answer
        already taken (a client answering a resent FIT) is ignored; an unusable answer is refused and
        its client dropped from the round."""
        kind, server_round = collection.kind, collection.server_round
        attempt = message.body.get("attempt", 1) if message.type is MessageType.UPDATE else 1
        if message.type is not kind or message.round != server_round or attempt != collection.attempt:
            self._reject(self.clients[client_id].peer, "bad_reply",
                         f"client {client_id}: {message.type.value} for round {message.round} attempt {attempt}; "
                         f"the server waits for {kind.value} of round {server_round} attempt {collection.attempt} "
                         "(late or out of order)")
            return
        if client_id in collection.answered:
            log.debug("round %d: ignored a repeated %s from %s", server_round, kind.value, client_id)
            return
        if client_id not in collection.pending:
            self._reject(self.clients[client_id].peer, "bad_reply",
                         f"client {client_id}: no {kind.value} expected from it in round {server_round}")
            return
        problem = self._check_answer(client_id, message)
        if problem:
            self._reject(self.clients[client_id].peer, "bad_reply", f"client {client_id}: {problem}")
            collection.refused.add(client_id)
            collection.drop(client_id, f"answer refused: {problem}")
            log.warning("round %d: dropped client %s: its %s was refused (%s)", server_round, client_id,
                        kind.value, problem)
            return
        collection.pending.discard(client_id)
        collection.answered.add(client_id)
        if kind is MessageType.UPDATE:
            self.round_timeout.answered(time.monotonic() - collection.sent_at[client_id])
        accept(client_id, message)

    def _check_answer(self, client_id: str, message: Message) -> str | None:
        """Why this answer's content cannot be used, or None if it can."""
        try:
            protocol.check_finite(message.arrays)
            if message.type is MessageType.UPDATE:
                protocol.check_history(message.body["history"], self.plan.epochs)
        except ProtocolError as error:
            return str(error)
        if message.type is MessageType.UPDATE:
            claimed, declared = message.body["num_examples"], self.clients[client_id].num_examples
            if declared and claimed > declared:
                return f"claims {claimed} examples but declared {declared} when it joined"
            if claimed > self.max_examples:
                return f"claims {claimed} examples, more than --max-examples {self.max_examples}"
        return None

    def _evaluate(self, weights: list[np.ndarray]) -> tuple[float | None, float | None]:
        if self.test_data is None:
            return None, None
        self.model.set_weights(weights)
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
        """Receive one message; handle joins, leaves, lost connections, revoked keys and bad input
        here; return UPDATEs and EVALUATIONs to the caller. Raises ServerStopping once a stop was
        requested."""
        if self._stop_reason and not self._finishing:
            raise ServerStopping(self._stop_reason)
        self._drop_revoked_keys()
        received = self.transport.recv(timeout_s)
        for lost in self.transport.lost_peers(idle=received is None):
            lost_client = self.registry.client_of(lost)
            if lost_client is not None:
                self._remove_client(lost_client, CONNECTION_LOST, quiet=self._finishing)
        if received is None:
            return None
        peer, frames = received
        client_id = self.registry.client_of(peer)
        try:
            message = protocol.decode(frames, expected_arrays=self.specs, limits=self.limits)
        except ProtocolError as error:
            size = sum(len(f) for f in frames)
            del frames
            self._reject(peer, "bad_message", f"from {f'client {client_id}' if client_id else 'peer ' + peer.hex()[:12]}: "
                                              f"{error}")
            if client_id and self._collection is not None and self._collection.drop(
                    client_id, f"sent a malformed message: {error}"):
                self._collection.refused.add(client_id)
                log.warning("round %d: dropped client %s: it sent a malformed message", self.current_round, client_id)
            if size > 1 << 20:
                trim_freed_memory()  # give a large refused message's memory back to the system
            return None
        if self.admission is not None and not self.admission.is_authorized(
                (self.transport.peer_keys.get(peer) or "").encode()):
            self._reject(peer, "key_revoked", "this client's key is no longer authorized")
            self.transport.disconnect(peer)
            if client_id:
                self._remove_client(client_id, "key revoked (its .key file was removed)")
            return None
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

    def _drop_revoked_keys(self) -> None:
        """Every REVOCATION_CHECK_S: drop the connected clients whose key left the authorized directory,
        and close their connections (a new handshake with that key is then refused)."""
        if self.admission is None or self.admission.authorized_dir is None:
            return
        now = time.monotonic()
        if now < self._next_revocation_check:
            return
        self._next_revocation_check = now + REVOCATION_CHECK_S
        for client_id, record in list(self.clients.items()):
            if record.key is not None and not self.admission.is_authorized(record.key.encode()):
                self._remove_client(client_id, "key revoked (its .key file was removed)")
                self.transport.disconnect(record.peer)

    def _handle_join(self, peer: bytes, message: Message) -> None:
        num_examples = message.body.get("num_examples", 0)
        if num_examples > self.max_examples:
            self._reject(peer, "too_many_examples", f"a client may hold at most --max-examples {self.max_examples} "
                                                    f"examples; this one declares {num_examples}")
            return
        try:
            admitted = self.registry.admit(peer, message.client_id, wants_shard=bool(message.body.get("wants_shard")),
                                           num_examples=num_examples, key=self.transport.peer_keys.get(peer))
        except JoinRefused as refusal:
            self._reject(peer, refusal.code, refusal.reason)
            return
        record = admitted.record
        if admitted.event != "welcomed again":
            log.info("client %s %s (%s) [%d/%d]", record.client_id, admitted.event,
                     f"assigned shard {record.shard}" if record.shard else f"{record.num_examples} examples",
                     len(self.clients), self.min_clients)
        welcome = Message(MessageType.WELCOME, round=self.current_round, client_id=record.client_id,
                          arrays=self.weights,
                          body={"model_json": self.model_json, "compile_config": self.compile_config,
                                "plan": self.plan.to_body(), "rounds": self.rounds, "shard": record.shard})
        self.transport.send(peer, protocol.encode(welcome))
        collection = self._collection  # a client asked in this round that is back (or asks again): its
        if (collection is not None and record.client_id in collection.frames  # FIT may have been lost
                and record.client_id not in collection.answered and record.client_id not in collection.refused):
            if self._send_to(collection, record.client_id):
                log.info("round %d: client %s is back; sent its %s again", collection.server_round,
                         record.client_id, collection.kind.value if collection.kind is not MessageType.UPDATE
                         else "FIT")

    def _remove_client(self, client_id: str, reason: str, quiet: bool = False) -> None:
        if self.registry.remove(client_id, reason):
            (log.debug if quiet else log.info)("client %s dropped: %s [%d connected]", client_id, reason,
                                               len(self.clients))

    def _reject(self, peer: bytes, code: str, reason: str) -> None:
        """Log a rejected message (rate-limited) and tell the peer why, when it can be addressed."""
        self._rejections.warning("rejected message [%s] %s", code, reason)
        self.transport.send(peer, protocol.encode_error(code, reason))


def _parse_summary_clients(raw: Any) -> dict[str, dict[str, Any]]:
    """A checkpoint's table of the clients that took part, type-checked (ValueError otherwise)."""
    if not isinstance(raw, dict):
        raise ValueError("summary_clients is not a mapping")
    clients = {}
    for client_id, entry in raw.items():
        if not protocol.is_client_id(client_id) or not isinstance(entry, dict):
            raise ValueError(f"summary_clients entry {str(client_id)[:70]!r} is not a client id with a mapping")
        shard, count = entry.get("shard"), entry.get("num_examples", 0)
        if (shard is not None and not protocol.is_shard_name(shard)) or not isinstance(count, int) or count < 0:
            raise ValueError(f"summary_clients entry {client_id!r} has a bad shard or num_examples")
        clients[client_id] = {"shard": shard, "num_examples": count}
    return clients


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
