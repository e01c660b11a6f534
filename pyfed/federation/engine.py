"""The round engine: every round of every federation, networked or in-process, runs here.

It reads top to bottom, against a :class:`~pyfed.federation.pool.ClientPool`::

    wait for --min-clients  ->  (feature scaling: the sites' feature moments)  ->  for each round:
        sample clients, configure_fit (the strategy), send each its FIT, collect the answers
        (dropping clients that go away, are refused or time out; sending the FIT again to one that
        comes back); with fewer than --min-fit-clients updates, retry the round with a new attempt;
        aggregate (streamed), check the new model (finite, finite test loss) or keep the old one,
        evaluate (the injected function; federated evaluation through the pool), record,
        and hand the round to the persister, which checkpoints and logs it while the next round's
        clients already train
    ->  (BatchNorm recalibration: each layer's input moments at the sites, for the exported model)
    ->  tell every client the run is over.

No sockets and no TensorFlow here: the pool carries the messages and ``evaluate`` is a function
the caller builds, so the engine is unit-tested against a fake pool. The crash guarantee, given a
persister: a crash loses at most the round in flight, and, if it comes while the previous round's
evaluation or checkpoint is still under way (both start as the next round's FITs go out), that
round too; every other completed round is resumed from its checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pyfed.federation.pool import (CONNECTION_GONE, UNREACHED, Answer, Back, ClientPool, EvaluateRequest,
                                   FitRequest, Gone, GrantRequest, Misbehaved, Request, SecAggRequest, StatsRequest)
from pyfed.federation.moments import (TINY_VARIANCE, FeatureScaling, Moments, SiteStatistics, implausible,
                                      pool as pool_moments, report_of, scale_spread, why_report_unusable)
from pyfed.federation.secagg import SecAggError
from pyfed.federation.secure_aggregation import (Advertised, PublicKeys, SecAggAborted, SecAggBlamed, SecAggRefused,
                                                 SecureAggregation, ServerRound, apply_change, left_out_after,
                                                 round_context)
from pyfed.federation.uploads import (DEFAULT_INFLIGHT_UPDATES, DEFAULT_MIN_UPLOAD_MBIT_S, UploadWindow,
                                     upload_allowance_s)
from pyfed.federation.strategy import Aggregator, FitResult, Strategy, WeightedMeanStrategy, sample_clients
from pyfed.federation.aggregate import EncodedUpdate, weighted_evaluation, why_unusable
from pyfed.persistence.files import CheckpointError, CheckpointMismatch, remove_interrupted_writes
from pyfed.persistence.store import Persister, RunStore
from pyfed.persistence.tracking import (RoundRecord, RunDescription, RunLog, best_round, check_run_name,
                                       default_run_name, format_metric)
from pyfed.wire import compression, protocol
from pyfed.wire.compression import CompressionError, UpdateCompression
from pyfed.wire.protocol import Delivery, FitPlan, MessageType, ProtocolError, StatsKind

log = logging.getLogger("pyfed.server")

MAX_FAILED_ATTEMPTS_KEPT = 100  # a round's record keeps its first failed attempts, no more

PROGRESS_EVERY_S = 10.0
#: Why a client named by a neighbour (its boxes did not open) is not waited for in the masked-input stage
NAMED_NOT_AWAITED = "named by a neighbour whose boxes from it did not open; its masked input was not awaited"
MAX_EXAMPLES = 10_000_000
AUTO = "auto"

#: ``evaluate(weights) -> (loss, accuracy)`` on the server's test data (None when it has none). It may
#: offer ``evaluate.probe(weights) -> why the model is unusable, or None``: a quick look at a few test
#: examples that decides whether a new model is accepted, so the full evaluation can run in the
#: background, while the next round trains.
Evaluate = Callable[[Sequence[np.ndarray]], tuple[float | None, float | None]]


class ExportModel(Protocol):
    """Writes the global model out after each round (``latest``; ``best`` when ``is_best``), called
    right after the round's evaluation, in the thread that evaluates (see learning/export.py)."""

    best_metric: str  # one of tracking.BEST_METRICS
    directory: Path  # where it writes (what an interrupted write left there is removed at start-up)

    def __call__(self, weights: Sequence[np.ndarray], server_round: int, is_best: bool) -> None: ...

    def written(self) -> dict[str, Any]:
        """Which round each file holds (for summary.json)."""

    def best_weights(self) -> list[np.ndarray] | None:
        """What ``best`` holds (None if nothing, or it cannot be read)."""

    def write_best(self, weights: Sequence[np.ndarray], server_round: int) -> None:
        """Replace ``best`` with round ``server_round``'s model made over (its BatchNorm recalibrated)."""


class EngineStopping(Exception):
    """A stop was requested (SIGTERM): the run ends cleanly at the next wait."""


class RunOver(Exception):
    """The strategy ends the run before its planned rounds (a privacy budget spent): not an error."""


class RoundTimeout:
    """How long a round waits for its answers. A fixed number of seconds, None (no limit), or "auto":

    * before any answer was measured: 300 s plus 60 s per local epoch of the plan;
    * after that: 3 x the slowest answer seen so far in the run (request sent to answer received,
      so training and both transfers), at least 60 s;
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

    def describe(self) -> str:
        seconds = self.seconds
        return "none" if seconds is None else f"{seconds:g}s" + (" (auto)" if self.setting == AUTO else "")

    def answered(self, seconds: float) -> None:
        self.slowest_answer_s = max(self.slowest_answer_s or 0.0, seconds)

    def attempt_ended(self, *, answered: int) -> None:
        """An attempt ended; with no answer in time, the next one waits twice as long."""
        self._backoff = 1.0 if answered else self._backoff * 2


@dataclass
class Collection:
    """The answers one attempt waits for: who was asked, with what, and who still owes an answer."""

    kind: MessageType
    server_round: int
    attempt: int
    requests: dict[str, Request] = field(default_factory=dict)  # client id -> what it was asked (again on return)
    pending: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    window: UploadWindow | None = None  # uploads wait for a grant (federation/uploads.py)
    paced: int | None = None  # ask at most this many at a time (each answer is an upload: a masked input)
    unsent: list[str] = field(default_factory=list)  # paced: not yet asked, in order
    upload_allowance_s: float = float("inf")  # how long a granted upload has to arrive (federation/uploads.py)
    label: str = ""  # what the log calls it: "round N" unless a stage between rounds says otherwise
    moments: tuple[int, int] | None = None  # MOMENTS: (values per report, values per example at a site)

    @property
    def what(self) -> str:
        return "update" if self.kind is MessageType.UPDATE else self.kind.value

    @property
    def where(self) -> str:
        return self.label or f"round {self.server_round}"

    def drop(self, client_id: str, reason: str) -> bool:
        if client_id not in self.pending:
            return False
        self.pending.discard(client_id)
        self.dropped[client_id] = reason
        return True

    def waits_for_upload(self, client_id: str) -> bool:
        """Whether the client said its update is ready: its wait for a slot is not held against it."""
        return self.window is not None and self.window.knows(client_id)


class _SecureSum:
    """The aggregator of a securely aggregated round: the unmasked weighted mean change, stepped by
    the strategy's server update when the engine asks for the result (so a refused model rolls back)."""

    def __init__(self, strategy: WeightedMeanStrategy, global_weights: Sequence[np.ndarray], mean_change: np.ndarray):
        self._strategy, self._global, self._change = strategy, global_weights, mean_change

    def add(self, result: FitResult) -> None:
        raise ValueError("a securely aggregated round takes no individual update")

    def result(self) -> list[np.ndarray]:
        return self._strategy.server_update(self._global, apply_change(self._global, self._change))


class _NoResult:
    """An abandoned attempt's aggregator: it has nothing to give."""

    def __init__(self, reason: str):
        self._reason = reason

    def add(self, result: FitResult) -> None:
        raise ValueError(self._reason)

    def result(self) -> list[np.ndarray]:
        raise ValueError(self._reason)


@dataclass
class RunState:
    """Everything a checkpoint holds of a run, and what the engine resumes from."""

    completed_rounds: int
    weights: list[np.ndarray]
    history: list[RoundRecord]
    strategy: Strategy
    pool_state: dict[str, Any]
    summary_clients: dict[str, dict[str, Any]]
    slowest_answer_s: float | None
    run_id: str | None = None
    run_name: str | None = None  # None: a checkpoint from before runs had names


class RoundEngine:
    """Runs ``rounds`` rounds of ``strategy`` over ``pool``; returns the rounds' records."""

    def __init__(
        self,
        pool: ClientPool,
        weights: Sequence[np.ndarray],
        *,
        rounds: int,
        plan: FitPlan,
        strategy: Strategy,
        min_clients: int = 1,
        min_fit_clients: int = 1,
        fraction_fit: float = 1.0,
        seed: int = 0,
        round_timeout: RoundTimeout | None = None,
        evaluate: Evaluate | None = None,
        export: ExportModel | None = None,
        max_examples: int = MAX_EXAMPLES,
        persister: Any = None,
        evaluate_in_background: bool = True,
        on_round: Callable[[RoundRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str = "round",
        secure_aggregation: SecureAggregation | None = None,
        max_inflight_updates: int = DEFAULT_INFLIGHT_UPDATES,
        max_clients_per_round: int | None = None,
        min_upload_mbit_s: float = DEFAULT_MIN_UPLOAD_MBIT_S,
        statistics: SiteStatistics = SiteStatistics(),
    ):
        if not 1 <= min_fit_clients:
            raise ValueError(f"min_fit_clients must be at least 1, got {min_fit_clients}")
        if secure_aggregation is not None:  # a sum of one update is that update: never unmask fewer than the minimum
            min_fit_clients = max(min_fit_clients, secure_aggregation.min_clients)
            if not isinstance(strategy, WeightedMeanStrategy):
                raise ValueError(f"secure aggregation needs a FedAvg-family strategy; {type(strategy).__name__} "
                                 f"needs each client's update, which it hides")
        if max_inflight_updates < 1:
            raise ValueError(f"max_inflight_updates must be at least 1, got {max_inflight_updates}")
        self.pool = pool
        self.secure_aggregation = secure_aggregation
        self.max_inflight_updates = max_inflight_updates
        self.min_upload_mbit_s = min_upload_mbit_s
        self.feature_scaling = statistics.feature_scaling  # set: pool the sites' feature moments into it before round 1
        self.batch_norm = statistics.batch_norm  # recalibrate these layers' moving statistics after the last round
        if max_clients_per_round is not None and max_clients_per_round < min_fit_clients:
            raise ValueError(f"max_clients_per_round {max_clients_per_round} is below min_fit_clients "
                             f"{min_fit_clients}: no round could run")
        self.max_clients_per_round = max_clients_per_round  # a strategy that holds every update: what fits
        self.weights = list(weights)
        self.specs = protocol.array_specs(self.weights)
        self.model_bytes = sum(protocol.spec_bytes(spec) for spec in self.specs)
        self.update_bytes = compression.encoded_bytes_of(UpdateCompression(plan.update_compression), self.specs,
                                                         plan.topk_fraction)  # an UPDATE's arrays
        self.rounds, self.plan, self.strategy = rounds, plan, strategy
        self.min_clients, self.min_fit_clients, self.fraction_fit = min_clients, min_fit_clients, fraction_fit
        self.seed = seed
        self.round_timeout = round_timeout or RoundTimeout(None, plan.epochs)
        self.evaluate = evaluate
        self._probe = getattr(evaluate, "probe", None)  # a quick look at a few test examples, if offered
        self.export = export
        self.max_examples = max_examples
        self.persister = persister
        self.evaluate_in_background = evaluate_in_background
        self.on_round = on_round
        self.clock = clock
        self.run_id = secrets.token_hex(8)  # names the run in every FIT: a resumed run keeps it
        self.run_name: str | None = None  # names it to people (TensorBoard, summary.json): set by open()
        self.completed_rounds = 0
        self.current_round = 0
        self.history: list[RoundRecord] = []
        self.summary_clients: dict[str, dict[str, Any]] = {}
        self.final_metrics: tuple[float | None, float | None] = (None, None)
        self.ended_early: str | None = None  # why the run ended before its planned rounds (a privacy budget)
        self.recalibrated = False  # whether the final model holds BatchNorm statistics recalibrated from the sites
        self._stop_reason: str | None = None
        self._collection: Collection | None = None
        self._left_out: set[str] = set()  # secure aggregation: parties found misbehaving in this round, not asked again

    # --- the run, top to bottom ----------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop at the next wait (safe from a signal handler): the last checkpoint stays the resume point."""
        self._stop_reason = reason

    def restore(self, state: RunState) -> None:
        self.run_id = state.run_id or self.run_id
        self.run_name = state.run_name
        self.completed_rounds = self.current_round = state.completed_rounds
        self.weights = list(state.weights)
        self.history = list(state.history)
        self.strategy = state.strategy
        self.summary_clients = dict(state.summary_clients)
        self.round_timeout.slowest_answer_s = state.slowest_answer_s
        self.pool.restore(state.pool_state)

    def load_checkpoint(self, path: Any, state: dict[str, Any]) -> RunState:
        """A checkpoint's state, every field checked against this run (the model's arrays, the strategy,
        the pool's tables); CheckpointError naming the file and the field if it cannot be used."""
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
            strategy = restored_strategy(self.strategy, state["strategy"], weights)
            raw_pool = state["pool"] if "pool" in state else {  # checkpoints before the engine kept these on top
                "known_clients": state["known_clients"], "next_client_number": state["next_client_number"]}
            pool_state = dict(self.pool.check_state(raw_pool)) if raw_pool else {}
            summary_clients = _parse_summary_clients(state["summary_clients"])
            run_id = state.get("run_id")
            if run_id is not None and protocol.RUN_ID_PATTERN.fullmatch(str(run_id)) is None:
                raise ValueError(f"run_id is {str(run_id)[:40]!r}")
            run_name = state.get("run_name")
            if run_name is not None:
                check_run_name(run_name if isinstance(run_name, str) else repr(run_name))
            slowest = state.get("slowest_answer_s")
            if slowest is not None and not (isinstance(slowest, (int, float)) and np.isfinite(slowest) and slowest >= 0):
                raise ValueError(f"slowest_answer_s is {str(slowest)[:20]!r}")
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ProtocolError, ArithmeticError) as error:
            raise CheckpointError(f"{path}: not a usable checkpoint of this run "
                                  f"({error.__class__.__name__}: {str(error)[:200]})") from None
        return RunState(completed, list(weights), history, strategy, pool_state, summary_clients, slowest, run_id,
                        run_name)

    def open(self, store: RunStore, *, logdir: Path | None, config: dict[str, Any], fresh_start: bool = False,
             description: RunDescription = RunDescription(), run_name: str | None = None) -> RunLog | None:
        """Resume from ``store``'s newest usable checkpoint (unless ``fresh_start``) or archive the last
        run; open the run log (rewriting a resumed run's events); persist through ``store`` from now on.
        First, what writes killed midway left in the run's directories is removed. A new run is named
        ``run_name`` (default: its start time); a resumed one keeps its name."""
        for directory in (store.directory, logdir, self.export.directory if self.export is not None else None):
            removed = remove_interrupted_writes(directory)
            if removed:
                log.warning("removed %d temporary file(s) in %s that a write killed midway left (the process "
                            "was stopped while writing; the files they were to replace are intact): %s",
                            len(removed), directory, ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
        restored = None if fresh_start else store.resume(self.load_checkpoint)
        if restored is not None:
            state, source = restored
            self.restore(state)
            log.info("resuming from %s: %d of %d rounds completed, %d known clients", source, self.completed_rounds,
                     self.rounds, len(state.pool_state.get("known_clients", {})))
        # a private run's releases are in a ledger of their own, beside what a new run archives (privacy.py);
        # it is read before anything is archived, and may refuse the start
        self.run_id = self.strategy.open_privacy(logdir or store.directory, run=self.run_id,
                                                 completed_rounds=self.completed_rounds, resumed=restored is not None,
                                                 set_aside=store.set_aside, fresh_start=fresh_start)
        if restored is None:
            store.archive(logdir)
        elif run_name and self.run_name and run_name != self.run_name:
            log.warning("resuming the run named %r: a resumed run keeps its name (to start a new run named %r, "
                        "start it fresh)", self.run_name, run_name)
        self.run_name = (self.run_name if restored is not None else None) or run_name or default_run_name()
        run_log = None
        if logdir:
            run_log = RunLog(logdir, config=config, run_name=self.run_name,
                             resume=self.history if restored else None,
                             clients=self.summary_clients if restored else None,
                             model_files=self.export.written if self.export is not None else None,
                             description=description)
            if run_log.archived_to:
                log.info("moved the previous run's logs to %s", run_log.archived_to)
            log.info("run %s: TensorBoard shows it as %s/server and %s/clients/<client id>; its summary is %s",
                     self.run_name, self.run_name, self.run_name, run_log.summary_path)
        self.persister = Persister(store, run_log)
        return run_log

    def evaluate_initial_model(self) -> tuple[float | None, float | None]:
        """Evaluate the global model before the first round (or the resumed one), log it, and mark
        the start in TensorBoard; in the persister's thread, which evaluates and writes for the rest
        of the run, so that this thread has run TensorFlow before any client can connect."""
        metrics: tuple[float | None, float | None] = (None, None)
        if self.evaluate is None:
            return metrics

        def evaluate() -> None:
            nonlocal metrics
            metrics = self.evaluate(self.weights)
            log.info("global model %s: test loss %s, accuracy %s",
                     f"after round {self.completed_rounds}" if self.completed_rounds else "before round 1",
                     format_metric(metrics[0]), format_metric(metrics[1]))
            if self.persister is not None and self.persister.run_log is not None:
                self.persister.run_log.record_start(self.completed_rounds)

        if self.persister is not None:
            self.persister.call(evaluate)
        else:
            evaluate()
        if self._probe is not None:  # builds the probe's compiled function in this thread, before clients connect
            reason = self._probe(self.weights)
            if reason:
                log.warning("the global model %s is already unusable: %s", "as resumed" if self.completed_rounds
                            else "before round 1", reason)
        return metrics

    def run(self) -> list[RoundRecord]:
        """Every remaining round, then the end of the run. Raises :class:`EngineStopping` if stopped;
        the rounds already handed to the persister are then persisted before it propagates."""
        self.pool.publish(self.weights, self.completed_rounds)
        try:
            self._wait_for_clients(self.min_clients, to_ask=False)
            if self.feature_scaling is not None and self.completed_rounds == 0:
                self._scale_features(self.feature_scaling)
            for server_round in range(self.completed_rounds + 1, self.rounds + 1):
                self._run_round(server_round)
        except RunOver as over:
            self.ended_early = str(over)
            log.warning("ending the run after %d of %d rounds: %s", self.completed_rounds, self.rounds, over)
        finally:
            if self.persister is not None:
                self.persister.wait()
        self.strategy.close_privacy()  # not on a stop: the run resumes
        self.final_metrics = ((self.history[-1].test_loss, self.history[-1].test_accuracy)
                              if self.history else self._evaluate(self.weights))
        if self.batch_norm and self.history:
            self._recalibrate_final_models()
        if self.persister is not None:
            self.persister.finish(self.snapshot(finished=True), self.final_metrics, self.ended_early)
        return self.history

    def close(self) -> None:
        """The run is over or stopping: let the persister's thread end."""
        if self.persister is not None:
            self.persister.close()

    def snapshot(self, *, finished: bool = False) -> dict[str, Any]:
        """The run's state as a checkpoint holds it (arrays shared, never modified in place)."""
        return {"round": self.completed_rounds, "finished": finished, "run_id": self.run_id,
                "run_name": self.run_name, "weights": list(self.weights),
                "strategy": dict(self.strategy.state()), "summary_clients": copy.deepcopy(self.summary_clients),
                "history": [record.to_json() for record in self.history],
                "slowest_answer_s": self.round_timeout.slowest_answer_s, "pool": copy.deepcopy(self.pool.state())}

    def _wait_for_clients(self, needed: int, *, to_ask: bool = True) -> None:
        """Until ``needed`` clients are connected, or, with ``to_ask``, can be asked in this round (under
        secure aggregation: parties, one per key)."""
        def count() -> int:
            return len(self._askable()) if to_ask else len(self.pool.connected())

        next_progress = self.clock() + PROGRESS_EVERY_S
        while count() < needed:
            self._poll(timeout_s=1.0)
            if self.clock() >= next_progress:
                if to_ask and self.secure_aggregation is not None:
                    log.info("waiting for clients: %d/%d parties to ask (secure aggregation asks one id of each key; "
                             "%d ids connected%s)", count(), needed, len(self.pool.connected()),
                             f", {len(self._left_out)} party(ies) left out of this round" if self._left_out else "")
                else:
                    log.info("waiting for clients: %d/%d joined", count(), needed)
                next_progress = self.clock() + PROGRESS_EVERY_S

    def _askable(self) -> list[str]:
        """The connected clients this round may ask: secure aggregation leaves out the ones it found
        misbehaving in the round, and asks one id of each key (a key is one party, however many ids it
        holds: its ids could not otherwise be kept from outnumbering, accusing or isolating others)."""
        connected = self.pool.connected()
        if self._left_out:
            connected = [cid for cid in connected if self._party(cid) not in self._left_out]
        if self.secure_aggregation is None:
            return connected
        parties: dict[str, list[str]] = {}
        for client_id in sorted(connected):
            parties.setdefault(self._party(client_id), []).append(client_id)
        rng = np.random.default_rng((self.seed, self.current_round, len(self._left_out)))
        return sorted(ids[int(rng.integers(len(ids)))] for ids in parties.values())

    def _why_round_cannot_go_on(self) -> str | None:
        """Secure aggregation: why this round cannot complete, when the parties it left out (accused,
        or found dealing bad shares) are what keep it below --secagg-min-clients (it would otherwise wait
        for clients forever); None while it can, or while only missing clients hold it up."""
        if not self._left_out:
            return None
        askable = len(self._askable())
        connected = len({self._party(cid) for cid in self.pool.connected()})
        if askable >= self.min_fit_clients or connected < self.min_fit_clients:
            return None
        return (f"secure aggregation: the {len(self._left_out)} party(ies) left out of this round (misbehaving, or "
                f"named by one that did) leave {askable} to ask, fewer than the {self.min_fit_clients} a sum is "
                f"unmasked for")

    def _party(self, client_id: str) -> str:
        """Who a client is under secure aggregation: its key (one party, whatever ids it holds), or,
        without encryption, its id."""
        return self.pool.info(client_id).key or client_id

    def _leave_out(self, client_ids: Iterable[str]) -> None:
        """Secure aggregation: these clients' parties are not asked again in this round."""
        self._left_out.update(self._party(client_id) for client_id in client_ids)

    def _run_round(self, server_round: int) -> None:
        self.current_round = server_round
        self._left_out = set()
        started = self.clock()
        sent_before, received_before = self.pool.bytes_sent, self.pool.bytes_received
        failed_attempts: list[dict[str, Any]] = []
        abandoned: str | None = None
        for attempt in itertools.count(1):
            abandoned = self._why_round_cannot_go_on()
            if abandoned:
                log.warning("round %d: %s; the round ends without a new model", server_round, abandoned)
                selected, aggregator, results, dropped = [], _NoResult(abandoned), {}, {}
                break
            self._wait_for_clients(self.min_fit_clients)
            fit_attempt = self._secure_fit_attempt if self.secure_aggregation is not None else self._fit_attempt
            selected, aggregator, results, dropped = fit_attempt(server_round, attempt)
            self.round_timeout.attempt_ended(answered=len(results))
            if len(results) >= self.min_fit_clients:
                break
            if len(failed_attempts) < MAX_FAILED_ATTEMPTS_KEPT:  # the record stays bounded however long it takes
                failed_attempts.append({"attempt": attempt, "selected": [cid for cid, _ in selected],
                                        "answered": sorted(results), "dropped": dropped})
            log.warning("round %d attempt %d failed: %d update(s), fewer than --min-fit-clients %d; "
                        "retrying the round", server_round, attempt, len(results), self.min_fit_clients)
            if (selected and len(dropped) == len(selected)
                    and all(reason in (UNREACHED, CONNECTION_GONE) for reason in dropped.values())):
                self._poll(timeout_s=1.0)  # no request left the server: let joins, leaves and queues move first
        eval_started = self.clock()
        refused = abandoned or self._accept_new_model(server_round, aggregator, sorted(results))
        self.pool.publish(self.weights, server_round)
        federated = None
        if self.plan.eval_fraction > 0 and not refused:
            federated, eval_dropped = self._federated_evaluation(server_round)
            for client_id, reason in eval_dropped.items():
                dropped.setdefault(client_id, f"evaluation: {reason}")

        record = RoundRecord.build(
            server_round, [cid for cid, _ in selected], results, duration_s=self.clock() - started,
            test=(None, None), eval_s=self.clock() - eval_started, dropped=dropped, federated=federated,
            bytes_sent=self.pool.bytes_sent - sent_before, bytes_received=self.pool.bytes_received - received_before)
        record.failed_attempts = failed_attempts
        record.refused = refused
        record.privacy = self.strategy.privacy_report()
        self.history.append(record)
        self.completed_rounds = server_round
        weights, records = self.weights, list(self.history)
        in_background = self.persister is not None and self.evaluate_in_background
        tested_later = in_background and self.evaluate is not None
        if in_background:  # said now, in order: the next round starts before the test evaluation ends
            log.info("%s", record.describe(self.rounds, tested=not tested_later))

        def evaluate_and_report() -> None:
            """The global model on the test data, the round's log line (or its test line), and the
            model files (in the persister's thread when evaluation runs in the background: the next
            round's clients already train)."""
            started_s = self.clock()
            record.test_loss, record.test_accuracy = self._evaluate(weights)
            record.eval_s = round(record.eval_s + self.clock() - started_s, 4)
            if tested_later:
                log.info("%s", record.describe_test(self.rounds))
            elif not in_background:
                log.info("%s", record.describe(self.rounds))
            if self.export is not None:
                self._export(weights, record, best_round(records, self.export.best_metric) is record)

        if in_background:
            self.persister.submit(self.snapshot(), record, dict(self.summary_clients), before=evaluate_and_report)
        else:
            evaluate_and_report()
            if self.persister is not None:  # written while the next round's clients train
                self.persister.submit(self.snapshot(), record, dict(self.summary_clients))
        if self.on_round is not None:
            self.on_round(record)

    def _accept_new_model(self, server_round: int, aggregator: Aggregator, contributors: list[str]) -> str | None:
        """Aggregate; keep the result as the global model unless it is unusable (not finite, or its
        outputs or test loss are not). Returns why it was refused, or None."""
        if self.persister is not None and self.evaluate_in_background:
            self.persister.wait()  # the last round's evaluation is done with the model before it is probed
        saved_state = dict(self.strategy.state())  # arrays are replaced, never changed in place
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is judged just below
                candidate = aggregator.result()
        except (ValueError, ArithmeticError) as error:
            candidate, reason = None, f"aggregation failed ({error})"
        else:
            reason = why_unusable(candidate)
        if candidate is not None and reason is None and self.evaluate is not None:
            reason = (self._probe(candidate) if self._probe is not None
                      else why_unusable(candidate, self.evaluate(candidate)[0]))
        if reason is None:
            self.weights = candidate
            return None
        self.strategy.load_state(saved_state)
        log.warning("round %d: refused the new global model: %s; kept the previous one. Contributing clients: %s",
                    server_round, reason, ", ".join(contributors))
        return reason

    def _export(self, weights: Sequence[np.ndarray], record: RoundRecord, is_best: bool) -> None:
        try:
            self.export(weights, record.round, is_best)
        except Exception as error:  # noqa: BLE001 - like logs, model files never stop a run: the checkpoint has it
            log.warning("round %d: could not write the model files (%s: %s); `pyfed export` can write them from "
                        "the round's checkpoint", record.round, error.__class__.__name__, str(error)[:200])

    def _evaluate(self, weights: Sequence[np.ndarray]) -> tuple[float | None, float | None]:
        return self.evaluate(weights) if self.evaluate is not None else (None, None)

    def _start_attempt(self, server_round: int, attempt: int, how: str = "") -> list[tuple[str, FitPlan]]:
        """Whom an attempt asks, with which plan (the sample, then the strategy's say); RunOver if the
        strategy forbids the round (a privacy budget)."""
        connected = self._askable()
        reason = self.strategy.why_not_run(server_round, len(connected))
        if reason is not None:
            raise RunOver(f"round {server_round} may not run: {reason}")
        sampled = sample_clients(connected, self.fraction_fit, self.min_fit_clients,
                                 (self.seed, server_round, attempt))
        cap = self.max_clients_per_round
        if cap is not None and len(sampled) > cap:  # a strategy that holds every update: what fits in memory
            rng = np.random.default_rng((self.seed, server_round, attempt, cap))
            sampled = sorted(str(cid) for cid in rng.choice(sampled, cap, replace=False))
            how += f" (at most {cap} a round fit in memory: {self.strategy.name} holds every update)"
        selected = self.strategy.configure_fit(server_round, sampled, self.plan)
        log.info("round %d/%d started%s%s: %d of %d clients (%s)", server_round, self.rounds,
                 f" (attempt {attempt})" if attempt > 1 else "", how, len(selected), len(connected),
                 ", ".join(cid for cid, _ in selected))
        return selected

    def _fit_attempt(self, server_round: int, attempt: int) -> tuple[list[tuple[str, FitPlan]], Aggregator,
                                                                     dict[str, FitResult], dict[str, str]]:
        """One try at a round: sample clients, ask them to train, collect what arrives."""
        selected = self._start_attempt(server_round, attempt)
        aggregator = self.strategy.aggregator(server_round, self.weights)
        collection = Collection(MessageType.UPDATE, server_round, attempt,
                                {cid: FitRequest(server_round, attempt, plan, self.weights, self.run_id)
                                 for cid, plan in selected}, window=UploadWindow(self.max_inflight_updates))
        results: dict[str, FitResult] = {}

        def accept(answer: Answer) -> None:
            body = answer.body
            result = FitResult(answer.client_id, answer.arrays, body["num_examples"],
                               {"fit_s": body["fit_s"], "history": body["history"],
                                **({"within_clip": body["within_clip"]} if "within_clip" in body else {})})
            if isinstance(answer.arrays, EncodedUpdate):  # for the round's compression ratio
                result.metrics.update(encoded_bytes=answer.arrays.encoded_bytes(), dense_bytes=self.model_bytes)
            aggregator.add(result)
            result.weights = ()
            answer.arrays = []
            results[answer.client_id] = result
            self.pool.accepted(answer.client_id)
            self.summary_clients[answer.client_id] = {"shard": self.pool.info(answer.client_id).shard,
                                                      "num_examples": int(result.num_examples)}
            log.info("round %d: update from %s (%d examples, fit %.2fs)%s", server_round, answer.client_id,
                     body["num_examples"], body["fit_s"], _history_tail(body["history"]))

        dropped = self._collect(collection, accept)
        return selected, aggregator, results, dropped

    def _secure_fit_attempt(self, server_round: int, attempt: int) -> tuple[list[tuple[str, FitPlan]], Aggregator,
                                                                            dict[str, FitResult], dict[str, str]]:
        """One try at a round under secure aggregation (federation/secure_aggregation.py): FIT, then
        the key, share, masked-input and unmasking stages, each collected as a FIT's updates are; the
        server ends up with the weighted sum of the survivors' clipped changes and nothing else. Too
        few clients left at any stage: the attempt fails (nothing is unmasked) and is retried, without
        the clients it found dealing bad shares. A sum that cannot be the survivors' refuses the round."""
        selected = self._start_attempt(server_round, attempt, " under secure aggregation")
        ids = [cid for cid, _ in selected]
        results: dict[str, FitResult] = {}
        dropped: dict[str, str] = {}
        # the ring holds the weights the clients declared when they joined (or the most any may claim)
        max_weights = {cid: min(self.pool.info(cid).declared_examples or self.max_examples, self.max_examples)
                       for cid in ids}
        try:
            setup = self.secure_aggregation.setup(round_context(self.run_id, server_round, attempt), len(ids),
                                                  total_weight=sum(max_weights.values()))
        except SecAggAborted as error:
            return selected, _NoResult(str(error)), results, {cid: str(error) for cid in ids}
        global_weights = self.weights
        length = sum(int(np.size(w)) for w in global_weights if np.dtype(w.dtype).kind == "f")
        server = ServerRound(setup, ids, length, max_weights)
        metrics: dict[str, dict[str, Any]] = {}
        accusations: dict[str, set[str]] = {}  # a client -> the neighbours whose boxes did not open for it

        def stage(kind: MessageType, requests: dict[str, Request], accept: Callable[[Answer], None]) -> None:
            collection = Collection(kind, server_round, attempt, requests,  # masked inputs: uploads, paced
                                    paced=self.max_inflight_updates if kind is MessageType.SECAGG_MASKED else None)
            for client_id, why in self._collect(collection, accept).items():
                dropped.setdefault(client_id, f"{kind.value}: {why}")
            self._leave_out(collection.refused)  # a refused answer: not asked again in this round

        def keys(answer: Answer) -> None:
            body = answer.body
            server.add_keys(answer.client_id, Advertised(
                PublicKeys(*(protocol.unb64(body[k]) for k in ("mask_key", "share_key", "sign_key"))),
                protocol.unb64(body["commitment"]), body["num_examples"], protocol.unb64(body["signature"])))

        def shares(answer: Answer) -> None:
            server.add_shares(answer.client_id, {v: protocol.unb64(box) for v, box in answer.body["boxes"].items()})

        def masked(answer: Answer) -> None:
            if "bad_boxes" in answer.body:  # its neighbours' boxes did not open for it: name them, mask nothing
                accusations[answer.client_id] = set(answer.body["bad_boxes"]) & server.shared()
                self._stop_awaiting_the_named(set().union(*accusations.values()))
                return
            server.add_masked(answer.client_id, answer.arrays[0] if answer.arrays else np.zeros(0, np.uint64))
            metrics[answer.client_id] = {"fit_s": answer.body["fit_s"], "history": answer.body["history"]}
            answer.arrays = []

        def reveal(answer: Answer) -> None:
            server.add_unmask(answer.client_id, {owner: (kind, protocol.unb64(share), protocol.unb64(signature))
                                                 for owner, (kind, share, signature) in answer.body["shares"].items()})

        setup_body = {"threshold": setup.threshold, "degree": setup.degree, "quantisation_bits": setup.quantisation_bits,
                      "ring_bits": setup.ring_bits, "clip": setup.clip, "min_clients": setup.min_clients}
        try:
            stage(MessageType.SECAGG_KEYS, {cid: FitRequest(server_round, attempt, plan, global_weights, self.run_id,
                                                            secagg=setup_body) for cid, plan in selected}, keys)
            roster = {cid: [protocol.b64(k.mask_key), protocol.b64(k.share_key), protocol.b64(k.sign_key)]
                      for cid, k in server.roster().items()}
            stage(MessageType.SECAGG_SHARES, {cid: SecAggRequest(server_round, attempt, MessageType.SECAGG_ROSTER,
                                                                 {"attempt": attempt, "roster": roster})
                                              for cid in roster}, shares)
            log.info("round %d: secure aggregation: %d of %d clients shared their keys; asking for masked inputs",
                     server_round, len(server.shared()), len(ids))
            stage(MessageType.SECAGG_MASKED, {cid: SecAggRequest(server_round, attempt, MessageType.SECAGG_BOXES,
                                                                 {"attempt": attempt, "boxes": {
                                                                     s: protocol.b64(b)
                                                                     for s, b in server.boxes_for(cid).items()}})
                                              for cid in sorted(server.shared())}, masked)
            leaving = left_out_after(accusations)
            if leaving:  # pairwise masks that would never cancel: try again without them
                raise SecAggBlamed(leaving)
            survivors, gone = server.unmask_request()
            stage(MessageType.SECAGG_REVEAL, {cid: SecAggRequest(server_round, attempt, MessageType.SECAGG_UNMASK,
                                                                 {"attempt": attempt, "survivors": survivors,
                                                                  "dropped": gone})
                                              for cid in survivors}, reveal)
            total, weight = server.result()
        except SecAggRefused as refused:  # what the survivors masked is not their clipped updates: the round is refused
            log.warning("round %d attempt %d: secure aggregation: the unmasked sum of %s is refused: %s", server_round,
                        attempt, ", ".join(survivors), refused)
            return selected, _NoResult(f"secure aggregation: {refused}"), self._contributors(survivors, metrics), dropped
        except SecAggBlamed as blamed:
            self._leave_out(blamed.blamed)
            for client_id, why in blamed.blamed.items():
                dropped[client_id] = f"secure aggregation: {why}"
            log.warning("round %d attempt %d: secure aggregation abandoned (nothing was unmasked): %s; left out of this "
                        "round's next attempts", server_round, attempt, blamed)
            return selected, _NoResult(str(blamed)), results, dropped
        except (SecAggAborted, SecAggError) as error:  # too few left at a stage; never anything a client sent
            log.warning("round %d attempt %d: secure aggregation abandoned: %s (nothing was unmasked)",
                        server_round, attempt, error)
            return selected, _NoResult(str(error)), results, dropped
        log.info("round %d: secure aggregation: the weighted sum of %d updates (%d examples) unmasked; %d "
                 "dropped after sharing keys", server_round, len(survivors), weight, len(gone))
        return (selected, _SecureSum(self.strategy, global_weights, total / weight),
                self._contributors(survivors, metrics), dropped)

    def _stop_awaiting_the_named(self, named: set[str]) -> None:
        """The masked-input stage stops waiting once every client it still waits for was named by a
        neighbour whose boxes from it did not open: the attempt is abandoned and they leave it whatever
        they answer (a silent one, which dealt the bad boxes, would otherwise hold it to the timeout)."""
        collection = self._collection
        waiting = collection.pending | set(collection.unsent)
        if not waiting or not waiting <= named:
            return
        log.info("round %d: secure aggregation: every client still awaited (%s) was named by a neighbour; not "
                 "waiting for its masked input", collection.server_round, ", ".join(sorted(waiting)))
        collection.unsent.clear()
        for client_id in sorted(waiting):
            if not self._drop(collection, client_id, NAMED_NOT_AWAITED):
                collection.dropped[client_id] = NAMED_NOT_AWAITED

    def _contributors(self, survivors: Sequence[str], metrics: dict[str, dict[str, Any]]) -> dict[str, FitResult]:
        """The clients whose masked inputs are in a secure sum, as the round records them."""
        for client_id in survivors:
            self.pool.accepted(client_id)
        return {client_id: FitResult(client_id, (), 0, metrics[client_id]) for client_id in survivors}

    def _site_moments(self, request: StatsRequest, label: str, width: int,
                      values_per_example: int = 1) -> dict[str, Moments] | None:
        """Ask every connected site ``request``; their usable, plausible reports (each of ``width``
        values), or None (said why) if no site sent one. The same collection as a round's (timeouts,
        drops, refusals), and the sites whose reports cannot be true are refused."""
        collection = Collection(MessageType.MOMENTS, request.round, request.attempt,
                                {cid: request for cid in self.pool.connected()}, label=label,
                                moments=(width, values_per_example))
        reports: dict[str, Moments] = {}

        def accept(answer: Answer) -> None:
            reports[answer.client_id] = report_of(answer.body)

        dropped = self._collect(collection, accept)
        if not reports:
            log.warning("%s: no site sent usable statistics (%s)", label,
                        "; ".join(f"{cid}: {why}" for cid, why in sorted(dropped.items())) or "none asked")
            return None
        for client_id, why in sorted(implausible(reports).items()):
            reports.pop(client_id)
            self.pool.refuse(client_id, f"its statistics cannot be true: {why}")
            log.warning("%s: left out client %s's statistics: %s", label, client_id, why)
        return reports

    def _scale_features(self, scaling: FeatureScaling) -> None:
        """Before round 1: ask every connected site for its features' moments, pool them exactly
        (moments.py) and set the model's feature scaling to the pooled mean and variance. A feature
        with no spread keeps variance 1 (it is only centred). No usable report: the model starts
        unscaled, and the run goes on."""
        num_features = self.weights[scaling.mean_index].size
        log.info("feature scaling: asking %d site(s) for the mean and spread of each of the model's %d input "
                 "features", len(self.pool.connected()), num_features)
        reports = self._site_moments(StatsRequest(StatsKind.FEATURES, self.run_id), "feature scaling", num_features)
        if reports is None:
            log.warning("feature scaling: the model starts with its features unscaled")
            return
        pooled = pool_moments(reports.values())
        variance = np.where(pooled.variance > TINY_VARIANCE, pooled.variance, 1.0)
        for index, values in ((scaling.mean_index, pooled.mean), (scaling.variance_index, variance)):
            self.weights[index] = values.astype(self.weights[index].dtype).reshape(self.weights[index].shape)
        self.pool.publish(self.weights, self.completed_rounds)
        log.info("feature scaling: the model standardises its %d features by the pooled mean and variance of %d "
                 "examples at %d site(s) (%s); their scales spread %.3g-fold", num_features, pooled.count,
                 len(reports), ", ".join(sorted(reports)), scale_spread(pooled))

    def _recalibrate_batch_norm(self, weights: Sequence[np.ndarray], which: str,
                                first_attempt: int = 1) -> list[np.ndarray] | None:
        """After the last round: ``weights`` with each BatchNormalization layer's moving mean and
        variance replaced by the pooled moments of what the layer receives at the sites when these
        weights run over their training examples, or None if a layer got no usable report. One stage
        per layer, in the model's order, each run under the layers before it already recalibrated, so
        every layer's statistics are those of the inputs it will see (exact, not an average of the
        sites' variances). ``which`` names the model in the log."""
        weights = list(weights)
        for position, layer in enumerate(self.batch_norm):
            label = f"BatchNorm recalibration of {which} ({layer.name})"
            request = StatsRequest(StatsKind.BATCH_NORM, self.run_id, self.completed_rounds,
                                   first_attempt + position, position, tuple(weights))
            reports = self._site_moments(request, label, layer.channels, layer.values_per_example)
            if reports is None:
                return None
            pooled = pool_moments(reports.values())
            for index, values in ((layer.mean_index, pooled.mean), (layer.variance_index, pooled.variance)):
                weights[index] = values.astype(weights[index].dtype).reshape(weights[index].shape)
        return weights

    def _recalibrate_final_models(self) -> None:
        """The run's models people take home (the final one, and ``best`` if an earlier round's) with
        their BatchNorm statistics recalibrated from the sites (see :meth:`_recalibrate_batch_norm`);
        each keeps its averaged statistics if the sites cannot give them."""
        last = self.history[-1]
        log.info("BatchNorm recalibration: asking the sites for what each of the final model's %d BatchNorm "
                 "layer(s) receives (per channel: count, mean, spread)", len(self.batch_norm))
        weights = self._recalibrate_batch_norm(self.weights, "the final model")
        if weights is None:
            log.warning("BatchNorm recalibration: the final model keeps its averaged moving statistics")
            return
        metrics = self._judge_recalibrated(weights, self.final_metrics[0], "the final model")
        if metrics is None:
            return
        log.info("BatchNorm recalibration: the final model's moving statistics are now those of its layers' inputs "
                 "at %s site(s)%s", len(self.pool.connected()), "" if metrics[1] is None and metrics[0] is None else
                 f": test loss {format_metric(self.final_metrics[0])} -> {format_metric(metrics[0])}, accuracy "
                 f"{format_metric(self.final_metrics[1])} -> {format_metric(metrics[1])}")
        self.weights, self.final_metrics, self.recalibrated = weights, metrics, True
        if self.export is None:
            return
        best = best_round(self.history, self.export.best_metric)
        self._export(weights, last, best is last)
        if best is None or best is last:
            return
        best_weights = self.export.best_weights()
        recalibrated = None if best_weights is None else self._recalibrate_batch_norm(
            best_weights, f"round {best.round}'s best model", first_attempt=len(self.batch_norm) + 1)
        if recalibrated is None or self._judge_recalibrated(recalibrated, best.test_loss,
                                                            f"best.keras (round {best.round})") is None:
            log.warning("BatchNorm recalibration: best.keras (round %d) keeps its averaged moving statistics",
                        best.round)
            return
        try:
            self.export.write_best(recalibrated, best.round)
        except Exception as error:  # noqa: BLE001 - like logs, model files never stop a run
            log.warning("could not write the recalibrated best.keras (%s: %s)", error.__class__.__name__,
                        str(error)[:200])
        else:
            log.info("BatchNorm recalibration: best.keras (round %d) holds its recalibrated statistics too", best.round)

    def _judge_recalibrated(self, weights: Sequence[np.ndarray], loss_before: float | None,
                            which: str) -> tuple[float | None, float | None] | None:
        """The test metrics of ``weights`` with recalibrated statistics, or None (said why) if they
        must not be kept: not finite, or scoring worse on the server's test data than the averaged
        statistics did (what can be checked of the sites' hidden data: a lying site's moments show
        there; honest ones may also score a little worse by chance, and the better model is kept)."""
        metrics = self._evaluate(weights)
        reason = why_unusable(weights, metrics[0])
        if reason is not None:
            log.warning("BatchNorm recalibration: %s keeps its averaged moving statistics: with the sites' pooled "
                        "ones %s", which, reason)
            return None
        if loss_before is not None and metrics[0] is not None and metrics[0] > loss_before:
            log.info("BatchNorm recalibration: %s keeps its averaged moving statistics, which score better on the "
                     "test data (loss %s against %s with the sites' pooled ones; a wide gap can mean that a site's "
                     "statistics are not true, or that the sites' data differ from the test data)", which,
                     format_metric(loss_before), format_metric(metrics[0]))
            return None
        return metrics

    def _federated_evaluation(self, server_round: int) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Ask every connected client to evaluate the new global weights on its held-out data."""
        request = EvaluateRequest(server_round, self.weights, self.run_id)
        collection = Collection(MessageType.EVALUATION, server_round, 1,
                                {cid: request for cid in self.pool.connected()})
        results: dict[str, tuple[int, float | None, float | None]] = {}

        def accept(answer: Answer) -> None:
            results[answer.client_id] = (answer.body["num_examples"], answer.body["loss"], answer.body["accuracy"])

        dropped = self._collect(collection, accept)
        return weighted_evaluation(results), dropped

    # --- collecting answers ----------------------------------------------------------------------

    def _send(self, collection: Collection, client_id: str) -> Delivery:
        delivery = self.pool.send(client_id, collection.requests[client_id])
        if delivery:
            collection.pending.add(client_id)
            collection.dropped.pop(client_id, None)
            collection.sent_at[client_id] = self.clock()
        return delivery

    def _unsent(self, collection: Collection, client_id: str, delivery: Delivery) -> str:
        """Why a request did not leave, as the attempt records it; a gone client was logged by its pool."""
        if delivery is Delivery.UNREACHABLE:
            return CONNECTION_GONE
        log.warning("round %d: could not reach client %s", collection.server_round, client_id)
        return UNREACHED

    def _collect(self, collection: Collection, accept: Callable[[Answer], None]) -> dict[str, str]:
        """Send what ``collection`` holds and poll the pool until every asked client has answered,
        been dropped, or the round timeout expired. Returns {client id: why it was dropped}."""
        server_round, what = collection.server_round, collection.what
        collection.unsent = list(collection.requests)
        self._ask_next(collection)
        timeout_s = self.round_timeout.seconds
        deadline = self.clock() + timeout_s if timeout_s else None
        collection.upload_allowance_s = upload_allowance_s(self.update_bytes, self.min_upload_mbit_s, timeout_s)
        next_progress = self.clock() + PROGRESS_EVERY_S
        self._collection = collection
        try:
            while collection.pending:
                now = self.clock()
                if collection.paced and timeout_s:  # asked in turn: each has the round timeout from its request
                    for client_id in sorted(collection.pending):
                        if now - collection.sent_at[client_id] >= timeout_s:
                            self._drop(collection, client_id, f"no {what} within {timeout_s:g}s")
                            log.warning("%s: dropped client %s: no %s within %gs", collection.where, client_id,
                                        what, timeout_s)
                elif deadline is not None and now >= deadline:
                    for client_id in sorted(collection.pending):
                        if not collection.waits_for_upload(client_id):
                            self._drop(collection, client_id, f"no {what} within {timeout_s:g}s")
                            log.warning("%s: dropped client %s: no %s within %gs", collection.where, client_id,
                                        what, timeout_s)
                if collection.window is not None:  # a granted upload has its own allowance, from its grant
                    for client_id in collection.window.overdue(now):
                        self._drop(collection, client_id, f"its granted upload did not arrive within "
                                                          f"{collection.upload_allowance_s:g}s of its grant")
                        log.warning("%s: dropped client %s: its granted upload did not arrive within %gs of "
                                    "its grant", collection.where, client_id, collection.upload_allowance_s)
                if not collection.pending:
                    break
                if now >= next_progress:
                    slots = (f" ({len(collection.window.granted)} uploading, {len(collection.window.waiting)} "
                             f"waiting for an upload slot)" if collection.window is not None else "")
                    log.info("%s: waiting for %d %s(s)%s: %s", collection.where, len(collection.pending), what,
                             slots, ", ".join(sorted(collection.pending)))
                    next_progress = now + PROGRESS_EVERY_S
                wait_s = 1.0 if deadline is None or collection.paced else min(1.0, max(deadline - now, 0.05))
                for answer in self._poll(timeout_s=wait_s):
                    self._take_answer(collection, answer, accept)
        finally:
            self._collection = None
        return collection.dropped

    def _poll(self, timeout_s: float) -> list[Answer]:
        """Poll the pool; handle departures, returns and misbehaviour here; return the answers."""
        if self._stop_reason:
            raise EngineStopping(self._stop_reason)
        answers = []
        collection = self._collection
        for event in self.pool.poll(timeout_s):
            if isinstance(event, Answer):
                answers.append(event)
            elif collection is None:
                continue
            elif isinstance(event, Gone):
                if self._drop(collection, event.client_id, event.reason):
                    log.warning("%s: dropped client %s before its %s: %s", collection.where,
                                event.client_id, collection.what, event.reason)
            elif isinstance(event, Back):
                client_id = event.client_id  # asked in this round and back (or asking again): its request
                if (client_id in collection.requests and client_id not in collection.answered  # may be lost
                        and client_id not in collection.refused and client_id not in collection.unsent
                        and self._send(collection, client_id)):
                    log.info("%s: client %s is back; sent its %s again", collection.where, client_id,
                             {MessageType.UPDATE: "FIT", MessageType.MOMENTS: "STATS"}.get(collection.kind, "EVALUATE"))
            elif isinstance(event, Misbehaved) and self._drop(collection, event.client_id,
                                                              f"sent a malformed message: {event.reason}"):
                collection.refused.add(event.client_id)
                log.warning("%s: dropped client %s: it sent a malformed message", collection.where,
                            event.client_id)
        return answers

    def _take_answer(self, collection: Collection, answer: Answer, accept: Callable[[Answer], None]) -> None:
        """Judge an answer: stale and unasked ones are refused; a repeat of one already taken is
        ignored; an unusable one is refused and its client dropped from the round."""
        client_id, kind, server_round = answer.client_id, collection.kind, collection.server_round
        ready = answer.kind is MessageType.UPLOAD_READY and collection.window is not None
        if ((answer.kind is not kind and not ready) or answer.round != server_round
                or answer.attempt != collection.attempt):
            self.pool.refuse(client_id, f"{answer.kind.value} for round {answer.round} attempt {answer.attempt}; the "
                                        f"server waits for {kind.value} of round {server_round} attempt "
                                        f"{collection.attempt} (late or out of order)")
            return
        if client_id in collection.answered:
            log.debug("%s: ignored a repeated %s from %s", collection.where, kind.value, client_id)
            return
        if client_id not in collection.pending:
            self.pool.refuse(client_id, f"no {kind.value} expected from it in round {server_round}")
            return
        if ready:
            problem = self._upload_ready(collection, answer)
        elif collection.window is not None and not collection.window.holds(client_id):
            problem = "it sent its update without a grant (UPLOAD_READY first, then the UPDATE once granted)"
        else:
            problem = self._check_answer(answer)
        if problem:
            self._refuse(collection, client_id, problem, answer.kind)
            return
        if ready:
            return
        collection.pending.discard(client_id)
        collection.answered.add(client_id)
        if kind is MessageType.SECAGG_KEYS or (kind is MessageType.UPDATE and collection.window is None):
            self.round_timeout.answered(self.clock() - collection.sent_at[client_id])
        try:
            accept(answer)
        except SecAggError as error:  # a secure aggregation stage's answer that does not fit the round
            collection.answered.discard(client_id)
            collection.pending.add(client_id)
            self._refuse(collection, client_id, str(error), answer.kind)
        if collection.window is not None:  # folded (or refused): its slot goes to the next in line
            self._grant(collection, collection.window.done(client_id, self.clock()))
        self._ask_next(collection)

    def _ask_next(self, collection: Collection) -> None:
        """Send the requests not yet sent: all of them, or, for a paced collection, as many as keep
        ``paced`` outstanding."""
        while collection.unsent and (collection.paced is None or len(collection.pending) < collection.paced):
            client_id = collection.unsent.pop(0)
            delivery = self._send(collection, client_id)
            if not delivery:
                collection.dropped[client_id] = self._unsent(collection, client_id, delivery)

    def _refuse(self, collection: Collection, client_id: str, problem: str, kind: MessageType) -> None:
        """An answer that cannot be used: tell its client why and drop it from the attempt."""
        self.pool.refuse(client_id, problem)
        collection.refused.add(client_id)
        self._drop(collection, client_id, f"answer refused: {problem}")
        log.warning("%s: dropped client %s: its %s was refused (%s)", collection.where, client_id,
                    kind.value, problem)

    def _drop(self, collection: Collection, client_id: str, reason: str) -> bool:
        """Drop a client from the attempt; a slot it held or waited for goes to the next in line, and
        what it had sent of its upload is let go."""
        if not collection.drop(client_id, reason):
            return False
        if collection.window is not None:
            if collection.window.knows(client_id):
                self.pool.release(client_id)
            self._grant(collection, collection.window.done(client_id, self.clock()))
        self._ask_next(collection)
        return True

    def _upload_ready(self, collection: Collection, answer: Answer) -> str | None:
        """A client's update is ready: grant it a slot now or queue it (None), or say why not. A
        client that already holds a grant is sent it again, due when it was."""
        declared = answer.body["bytes"]
        if declared != self.update_bytes:
            return (f"it declares an update of {declared} bytes; an update of this model encoded "
                    f"{self.plan.update_compression} is {self.update_bytes} bytes")
        window, client_id = collection.window, answer.client_id
        if not window.knows(client_id):  # its training time, for the adaptive round timeout
            self.round_timeout.answered(self.clock() - collection.sent_at[client_id])
        self._grant(collection, window.ready(client_id, self.clock(), collection.upload_allowance_s))
        return None

    def _grant(self, collection: Collection, client_ids: Sequence[str]) -> None:
        """Send these clients their upload grants (one that cannot be reached frees its slot)."""
        for client_id in client_ids:
            delivery = self.pool.send(client_id, GrantRequest(collection.server_round, collection.attempt))
            if not delivery:
                self._drop(collection, client_id, self._unsent(collection, client_id, delivery))

    def _check_answer(self, answer: Answer) -> str | None:
        """Why an answer's content cannot be used, or None if it can."""
        try:
            if answer.kind is MessageType.UPDATE:
                encoding = answer.body.get("encoding", UpdateCompression.NONE.value)
                if encoding != self.plan.update_compression:
                    return f"its update is encoded {encoding}; the plan asks for {self.plan.update_compression}"
                if encoding == UpdateCompression.NONE.value:
                    protocol.check_specs(protocol.array_specs(answer.arrays), self.specs)
                    protocol.check_finite(answer.arrays)
                else:  # each array's frames checked against the model (finite values, indices in range)
                    codec = UpdateCompression(encoding)
                    answer.arrays = EncodedUpdate(self.weights, compression.split(
                        answer.arrays, codec, self.specs, self.plan.topk_fraction), codec)
                protocol.check_history(answer.body["history"], self.plan.epochs)
                unusable = self._why_update_unusable(answer.arrays)
                if unusable:
                    return f"its update is unusable: {unusable}"
            elif answer.kind is MessageType.MOMENTS:
                declared = self.pool.info(answer.client_id).declared_examples
                width, values_per_example = self._collection.moments if self._collection else (0, 1)
                return why_report_unusable(report_of(answer.body), num_features=width,
                                           max_count=min(declared or self.max_examples, self.max_examples),
                                           values_per_example=values_per_example)
            else:
                if answer.kind is MessageType.SECAGG_MASKED:
                    protocol.check_history(answer.body["history"], self.plan.epochs)
                protocol.check_finite(answer.arrays)
        except (ProtocolError, CompressionError) as error:
            return str(error)
        if answer.kind is MessageType.UPDATE:
            claimed, declared = answer.body["num_examples"], self.pool.info(answer.client_id).declared_examples
            if declared and claimed > declared:
                return f"claims {claimed} examples but declared {declared} when it joined"
            if claimed > self.max_examples:
                return f"claims {claimed} examples, more than --max-examples {self.max_examples}"
        return None


    def _why_update_unusable(self, arrays: Sequence[np.ndarray]) -> str | None:
        """What would make a new global model unusable, looked for in one update before it is folded:
        weights an encoded change decodes to beyond the model's dtypes (the review's int8 scale of
        3e38), or outputs that are not finite (the probe, on a few test examples). Such an update is
        refused and its sender dropped, and the round keeps the honest updates."""
        reason = arrays.why_unusable() if isinstance(arrays, EncodedUpdate) else None
        if reason is None and self._probe is not None:
            reason = self._probe(list(arrays))  # an encoded update is decoded for it: one model copy, then freed
        return reason


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


def restored_strategy(strategy: Strategy, saved: Any, weights: list[np.ndarray]) -> Strategy:
    """A copy of ``strategy`` holding ``saved`` state, after a trial server step on a copy shows the
    state fits the model (a wrong-shaped momentum, say, would otherwise fail mid-run). ValueError
    (or the TypeError the strategy raises) says why not."""
    if not isinstance(saved, dict):
        raise ValueError("the strategy state is not a mapping")
    restored = copy.deepcopy(strategy)
    restored.load_state(saved)
    kept = set(restored.state())
    if set(saved) - kept:  # state this strategy would silently drop
        if "privacy" in saved and "privacy" not in kept:
            raise ValueError("the checkpoint's run was differentially private; resuming it without the same --dp-* "
                             "settings would void its guarantee (give them, or start afresh with --fresh-start)")
        raise ValueError(f"the checkpoint's strategy kept {sorted(set(saved) - kept)}, which this strategy does not "
                         f"(was the run made with other --strategy settings?)")
    trial = getattr(copy.deepcopy(restored), "inner", None) or copy.deepcopy(restored)
    if isinstance(trial, WeightedMeanStrategy):  # the strategies that keep state between rounds
        with np.errstate(over="ignore", invalid="ignore"):
            reason = why_unusable(trial.server_update(weights, weights))
        if reason:
            raise ValueError(f"the strategy state does not fit the model: a trial step gives a model where {reason}")
    return restored


def _history_tail(history: dict[str, list]) -> str:
    parts = [f"{name} {series[-1]:.4f}" for name, series in history.items() if series and series[-1] is not None]
    return f": {', '.join(parts)}" if parts else ""


__all__ = ["AUTO", "Collection", "EngineStopping", "Evaluate", "RoundEngine", "RoundTimeout", "RunState",
           "restored_strategy"]
