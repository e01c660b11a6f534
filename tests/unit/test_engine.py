"""The round engine against a fake pool and a fake clock: every failure path, no sockets, no TensorFlow."""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from pyfed.federation.engine import EngineStopping, RoundEngine, RoundTimeout
from pyfed.federation.pool import (Answer, Back, ClientInfo, EvaluateRequest, FitRequest, Gone, GrantRequest,
                                   StatsRequest, moments_body,
                                   InProcessPool, Misbehaved, PoolEvent)
from pyfed.federation.strategy import FedAvg, FedAvgM, FedMedian
from pyfed.persistence.store import Persister, RunStore
from pyfed.persistence.tracking import RoundRecord
from pyfed.wire.protocol import Delivery, FitPlan, MessageType

pytestmark = pytest.mark.unit

WEIGHTS = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
PLAN = FitPlan(epochs=2)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def update(client_id: str, request: FitRequest, value: float, examples: int = 10, **changes) -> Answer:
    body = {"num_examples": examples, "fit_s": 0.5, "history": {"loss": [1.0, 0.5]}}
    fields = {"round": request.round, "attempt": request.attempt, **changes}
    return Answer(client_id, MessageType.UPDATE, fields["round"], fields["attempt"], body,
                  [np.full_like(w, value) for w in request.weights])


Behaviour = Callable[[str, FitRequest], list[PoolEvent]]


def answers(value: float, examples: int = 10) -> Behaviour:
    return lambda cid, request: [update(cid, request, value, examples)]


@dataclass(frozen=True)
class Unannounced:
    """An UPDATE its client sends at once, without waiting for a grant (a misbehaving client)."""

    answer: Answer


class FakePool:
    """Clients scripted by behaviours: what each does when asked (events it causes). An UPDATE a
    behaviour gives is announced (UPLOAD_READY) and sent when the engine grants it, as a client
    does; ``on_grant`` scripts what a client does instead when granted (dies, stalls)."""

    bytes_sent = bytes_received = 0

    def __init__(self, behaviours: dict[str, Behaviour], clock: Clock, declared: int = 0,
                 on_grant: dict[str, Callable[[str, GrantRequest], list[PoolEvent]]] | None = None):
        self.behaviours, self.clock, self.declared = behaviours, clock, declared
        self.on_grant = on_grant or {}
        self.upload_first = True  # a granted update arrives before anything else (False: after what is queued)
        self.held: dict[tuple[str, int, int], Answer] = {}
        self.timeline: list[tuple[str, str]] = []  # ("grant" | "update", client id), in order
        self.present = set(behaviours)
        self.sent: list[tuple[str, object]] = []
        self.refused: list[tuple[str, str]] = []
        self.events: deque[PoolEvent] = deque()
        self.published: list[int] = []
        self.finished = self.stopped = False
        self.released: list[str] = []
        self.on_idle: Callable[[float], list[PoolEvent]] | None = None  # what clients do as time passes
        self.on_stats: dict[str, Callable[[str, StatsRequest], list[PoolEvent]]] = {}  # STATS: silent if unset

    def connected(self) -> list[str]:
        return sorted(self.present)

    def info(self, client_id: str) -> ClientInfo:
        return ClientInfo(None, self.declared)

    def publish(self, weights, server_round: int) -> None:
        self.published.append(server_round)

    def send(self, client_id: str, request) -> Delivery:
        if client_id not in self.present:
            return Delivery.CONGESTED  # not delivered, and not known to be gone (the engine says why)
        self.sent.append((client_id, request))
        if isinstance(request, FitRequest):
            for event in self.behaviours[client_id](client_id, request):
                if isinstance(event, Answer) and event.kind is MessageType.UPDATE:
                    self.held.setdefault((event.client_id, event.round, event.attempt), event)
                    event = Answer(event.client_id, MessageType.UPLOAD_READY, event.round, event.attempt,
                                   {"attempt": event.attempt, "bytes": sum(a.nbytes for a in event.arrays)})
                self.events.append(event.answer if isinstance(event, Unannounced) else event)
        elif isinstance(request, StatsRequest):
            self.events.extend(self.on_stats[client_id](client_id, request) if client_id in self.on_stats else [])
        elif isinstance(request, GrantRequest):
            self.timeline.append(("grant", client_id))
            if client_id in self.on_grant:  # what it does when granted comes next, before anything else
                self.events.extendleft(reversed(self.on_grant[client_id](client_id, request)))
            elif (held := self.held.pop((client_id, request.round, request.attempt), None)) is not None:
                (self.events.appendleft if self.upload_first else self.events.append)(held)
        return Delivery.SENT

    def poll(self, timeout_s: float) -> list[PoolEvent]:
        if self.events:
            event = self.events.popleft()
            if isinstance(event, Answer) and event.kind is MessageType.UPDATE:
                self.timeline.append(("update", event.client_id))
            if isinstance(event, Gone):
                self.present.discard(event.client_id)
            elif isinstance(event, Back):
                self.present.add(event.client_id)
            return [event]
        self.clock.now += timeout_s  # nothing happens: time passes
        return self.on_idle(self.clock.now) if self.on_idle is not None else []

    def refuse(self, client_id: str, reason: str) -> None:
        self.refused.append((client_id, reason))

    def accepted(self, client_id: str) -> None:
        pass

    def release(self, client_id: str) -> None:
        self.released.append(client_id)

    def state(self) -> dict:
        return {}

    def check_state(self, state):
        return state

    def restore(self, state) -> None:
        pass

    def finish(self, reason: str) -> None:
        self.finished = True

    def stop(self, reason: str) -> None:
        self.stopped = True


def engine(pool: FakePool, clock: Clock, **kwargs) -> RoundEngine:
    options = {"rounds": 1, "plan": PLAN, "strategy": FedAvg(), "min_clients": 1,
               "round_timeout": RoundTimeout(100.0, PLAN.epochs), **kwargs}
    return RoundEngine(pool, WEIGHTS, clock=clock, **options)


def fit_requests(pool: FakePool) -> list[tuple[str, int, int]]:
    return [(cid, r.round, r.attempt) for cid, r in pool.sent if isinstance(r, FitRequest)]


def test_a_round_averages_the_answers_by_examples_and_records_it():
    clock = Clock()
    pool = FakePool({"a": answers(1.0, 10), "b": answers(4.0, 30)}, clock)
    run = engine(pool, clock, evaluate=lambda weights: (float(weights[0][0, 0]), 0.5))
    history = run.run()
    np.testing.assert_allclose(run.weights[0], np.full((2, 2), 3.25))  # (1*10 + 4*30) / 40
    record = history[0]
    assert (record.clients, record.selected, record.test_loss, record.dropped) == (["a", "b"], ["a", "b"], 3.25, {})
    assert record.num_examples == {"a": 10, "b": 30} and record.train_history["a"] == {"loss": [1.0, 0.5]}
    assert run.summary_clients == {"a": {"shard": None, "num_examples": 10}, "b": {"shard": None, "num_examples": 30}}
    assert pool.published == [0, 1]  # joining clients get the model of the round that just ended


def test_a_client_that_goes_away_is_dropped_and_the_round_goes_on():
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "b": lambda cid, r: [Gone(cid, "connection lost")]}, clock)
    record = engine(pool, clock).run()[0]
    assert record.clients == ["a"] and record.dropped == {"b": "connection lost"}


def test_too_few_updates_retry_the_round_with_a_new_attempt():
    clock = Clock()
    flaky = iter([[Gone("b", "connection lost"), Back("b")], []])

    def b(cid, request):
        events = next(flaky, None)
        return events if events else [update(cid, request, 2.0)]

    pool = FakePool({"a": answers(1.0), "b": b}, clock)
    run = engine(pool, clock, min_fit_clients=2)
    record = run.run()[0]
    assert record.failed_attempts[0]["answered"] == ["a"]
    assert record.failed_attempts[0]["dropped"] == {"b": "connection lost"}
    assert record.clients == ["a", "b"]  # the retry, once b was back, took both
    assert fit_requests(pool) == [("a", 1, 1), ("b", 1, 1), ("a", 1, 2), ("b", 1, 2)]


def test_a_client_that_never_answers_is_dropped_when_the_round_times_out():
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "silent": lambda cid, r: []}, clock)
    record = engine(pool, clock, round_timeout=RoundTimeout(30.0, 2)).run()[0]
    assert record.dropped == {"silent": "no update within 30s"} and record.clients == ["a"]
    assert clock.now >= 30


def test_the_auto_timeout_doubles_after_an_attempt_nobody_answered():
    clock = Clock()
    calls = []

    def slow(cid, request):
        calls.append(request.attempt)
        return [] if request.attempt == 1 else [update(cid, request, 1.0)]

    pool = FakePool({"a": slow}, clock)
    timeout = RoundTimeout("auto", PLAN.epochs)
    record = engine(pool, clock, round_timeout=timeout).run()[0]
    assert calls == [1, 2] and record.failed_attempts[0]["dropped"] == {"a": "no update within 420s"}
    assert timeout.seconds == 60  # measured answers: 3 x the slowest, at least 60 s


def test_stale_unasked_and_repeated_answers():
    clock = Clock()

    def chatty(cid, request):
        return [update(cid, request, 9.0, round=request.round + 5),  # stale: refused, still pending
                update(cid, request, 9.0, attempt=request.attempt + 1),  # another attempt: refused
                update(cid, request, 2.0),  # the real one
                update(cid, request, 7.0)]  # a repeat (an answer sent again): ignored

    pool = FakePool({"a": chatty, "b": answers(2.0)}, clock)
    pool.events.append(update("nobody", FitRequest(1, 1, PLAN, WEIGHTS), 5.0))  # not asked
    run = engine(pool, clock)
    record = run.run()[0]
    np.testing.assert_allclose(run.weights[0], 2.0)
    assert record.clients == ["a", "b"]
    reasons = [reason for _, reason in pool.refused]
    assert any("round 6 attempt 1" in r for r in reasons) and any("round 1 attempt 2" in r for r in reasons)
    assert any(c == "nobody" and "no update expected" in r for c, r in pool.refused)
    assert len(pool.refused) == 3  # the repeat was not refused


def test_a_client_back_in_the_same_round_is_asked_again_and_its_answer_counts():
    clock = Clock()
    seen = []

    def comes_back(cid, request):  # gone and back while "a" still trains; "a" answers after that
        seen.append(request.attempt)
        if len(seen) == 1:
            return [Gone(cid, "connection lost"), Back(cid), update("a", request, 1.0)]
        return [update(cid, request, 3.0)]

    pool = FakePool({"a": lambda cid, r: [], "b": comes_back}, clock)
    record = engine(pool, clock).run()[0]
    assert record.clients == ["a", "b"] and record.dropped == {} and not record.failed_attempts
    assert seen == [1, 1]  # the same attempt's FIT, sent again


@pytest.mark.parametrize("bad, reason", [
    (lambda cid, r: [update(cid, r, np.nan)], "answer refused: array 0 holds NaN or Inf"),
    (lambda cid, r: [update(cid, r, 1.0, examples=500)], "answer refused: claims 500 examples but declared 100"),
    (lambda cid, r: [Misbehaved(cid, "header is 9 bytes too long")], "sent a malformed message: header is"),
])
def test_an_unusable_answer_drops_its_client_at_once(bad, reason):
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "bad": bad}, clock, declared=100)
    record = engine(pool, clock).run()[0]
    assert record.dropped["bad"].startswith(reason) and record.clients == ["a"]
    assert clock.now == 0  # nobody waited for it


def test_a_model_that_would_be_useless_is_refused_and_the_strategy_rolled_back():
    clock = Clock()
    pool = FakePool({"a": answers(3e38), "b": answers(3e38)}, clock)
    strategy = FedAvgM()
    losses = iter([float("nan"), 0.7])
    run = engine(pool, clock, strategy=strategy, evaluate=lambda w: (next(losses), 0.1))
    record = run.run()[0]
    assert record.refused == "its test loss is nan" and record.test_loss == 0.7
    assert all(np.array_equal(w, z) for w, z in zip(run.weights, WEIGHTS))
    assert strategy.state() == {"velocity": None}  # as before the round


class RecordingPersister:
    run_log = None

    def __init__(self) -> None:
        self.snapshots, self.finished = [], None

    def call(self, job) -> None:
        job()

    def close(self) -> None:
        pass

    def submit(self, snapshot, record, summary_clients, before=None) -> None:
        if before is not None:
            before()
        self.snapshots.append(snapshot)

    def wait(self) -> None:
        pass

    def finish(self, snapshot, final, ended_early=None) -> None:
        self.finished = (snapshot, final)
        self.ended_early = ended_early


def test_every_round_is_handed_to_the_persister_and_the_run_finishes_with_a_final_snapshot():
    clock = Clock()
    pool = FakePool({"a": answers(1.0)}, clock)
    persister = RecordingPersister()
    engine(pool, clock, rounds=3, persister=persister).run()
    assert [s["round"] for s in persister.snapshots] == [1, 2, 3]
    assert persister.finished[0]["finished"] is True and persister.finished[0]["round"] == 3


def test_the_persister_does_every_job_in_one_thread_in_order_and_reports_failures(tmp_path):
    """One thread for the whole run: TensorFlow opens /dev/urandom the first time a thread runs an
    op, which aborts the process once connections hold every descriptor; the engine runs the
    initial evaluation there before the server listens, and every later evaluation and write
    happens in that same, already initialised, thread."""
    import threading

    persister = Persister(RunStore(tmp_path, {"model": "m"}))
    threads, order = [], []
    persister.call(lambda: threads.append(threading.get_ident()))
    for number in range(3):
        persister.submit({"round": number + 1, "finished": False, "weights": list(WEIGHTS), "history": [{}]},
                         record=RoundRecord.build(number + 1, [], {}, duration_s=0.1, test=(None, None), eval_s=0.0,
                                                  dropped={}, federated=None), summary_clients={},
                         before=lambda n=number: (threads.append(threading.get_ident()), order.append(n)))
    persister.wait()
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident() and order == [0, 1, 2]

    def fails() -> None:
        raise OSError(24, "Too many open files")

    with pytest.raises(OSError, match="Too many open files"):
        persister.call(fails)
    persister.call(lambda: threads.append(threading.get_ident()))  # the thread survives a failed job
    assert len(set(threads)) == 1
    persister.close()
    assert not persister._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        persister.call(lambda: None)


def test_the_initial_model_is_evaluated_in_the_persisters_thread_before_any_round(tmp_path):
    import threading

    evaluated_in = []

    def evaluate(weights):
        evaluated_in.append(threading.get_ident())
        return 0.5, 0.25

    clock = Clock()
    run = engine(FakePool({"a": answers(1.0)}, clock), clock, rounds=2, evaluate=evaluate)
    run.open(RunStore(tmp_path, {"model": "m"}), logdir=None, config={})
    assert run.evaluate_initial_model() == (0.5, 0.25)
    run.run()
    run.close()
    assert len(evaluated_in) >= 3 and evaluated_in[0] != threading.get_ident()


def test_opening_a_run_removes_what_writes_killed_midway_left_in_its_directories(tmp_path, caplog):
    """Checkpoints, logs and model files: each killed write leaves up to a model's size on disk, and
    an out-of-memory kill (the point of a memory limit) can come in any round."""
    checkpoints, logdir, model_dir = tmp_path / "checkpoints", tmp_path / "logs", tmp_path / "logs" / "model"
    for directory, name in ((checkpoints, ".round-000002.npz.a1b2c3d4.tmp"), (logdir, ".summary.json.zzzzzzzz.tmp"),
                            (model_dir, ".latest.keras.k3_x9q0z.tmp")):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"half")
        (directory / "kept.txt").write_text("kept")
    export = RecordingExport()
    export.directory = model_dir
    clock = Clock()
    run = engine(FakePool({"a": answers(1.0)}, clock), clock, export=export)
    run.open(RunStore(checkpoints, {"model": "m"}), logdir=logdir, config={})
    run.close()
    assert not list(tmp_path.rglob(".*.tmp"))  # (a new run moves the last one's logs and model files aside)
    assert len(list(tmp_path.rglob("kept.txt"))) == 3
    assert caplog.text.count("that a write killed midway left") == 3


def test_a_stop_request_ends_the_run_at_the_next_wait():
    clock = Clock()
    pool = FakePool({"a": answers(1.0)}, clock)
    run = engine(pool, clock, rounds=5, min_clients=2)  # waits for a second client that never comes
    run.request_stop("SIGTERM")
    with pytest.raises(EngineStopping, match="SIGTERM"):
        run.run()


def test_a_crash_between_a_round_and_its_checkpoint_loses_that_round_only(tmp_path):
    """Round 2's checkpoint is never written (the process dies while writing it): a new engine on
    the same store resumes after round 1 and records rounds 2 and 3 once each."""

    class CrashingStore(RunStore):
        def save(self, state):
            if state["round"] == 2:
                raise KeyboardInterrupt("killed while writing round 2's checkpoint")
            return super().save(state)

    fingerprint = {"model": "m", "strategy": "fedavg"}
    clock = Clock()
    first = engine(FakePool({"a": answers(1.0)}, clock), clock, rounds=3)
    first.persister = Persister(CrashingStore(tmp_path, fingerprint))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert [p.name for p in RunStore(tmp_path, fingerprint).checkpoints()] == ["round-000001.npz"]

    second = engine(FakePool({"a": answers(2.0)}, clock), clock, rounds=3)
    second.open(RunStore(tmp_path, fingerprint), logdir=None, config={})
    assert second.completed_rounds == 1
    history = second.run()
    assert [r.round for r in history] == [1, 2, 3]
    assert [p.name for p in RunStore(tmp_path, fingerprint).checkpoints()] == [
        "round-000001.npz", "round-000002.npz", "round-000003.npz"]


def test_a_resumed_run_keeps_its_name_and_a_fresh_start_archives_it_under_it(tmp_path, caplog):
    """The name is in the checkpoint: a resume (even asked for another name) continues as the run it
    is, in TensorBoard and summary.json; a fresh start named otherwise archives it under its name."""

    class CrashingStore(RunStore):
        def save(self, state):
            if state["round"] == 2:
                raise KeyboardInterrupt("killed while writing round 2's checkpoint")
            return super().save(state)

    fingerprint, logdir, clock = {"model": "m", "strategy": "fedavg"}, tmp_path / "logs", Clock()
    first = engine(FakePool({"a": answers(1.0)}, clock), clock, rounds=3)
    first.open(CrashingStore(logdir / "checkpoints", fingerprint), logdir=logdir, config={}, run_name="alpha")
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert json.loads((logdir / "summary.json").read_text())["run_name"] == "alpha"

    second = engine(FakePool({"a": answers(2.0)}, clock), clock, rounds=3)
    with caplog.at_level(logging.WARNING, logger="pyfed.server"):
        second.open(RunStore(logdir / "checkpoints", fingerprint), logdir=logdir, config={}, run_name="beta")
    assert second.run_name == "alpha" and "resuming the run named 'alpha'" in caplog.text
    second.run()
    second.close()
    assert json.loads((logdir / "summary.json").read_text())["run_name"] == "alpha"
    assert (logdir / "alpha" / "server").is_dir() and not (logdir / "beta").exists()

    third = engine(FakePool({"a": answers(3.0)}, clock), clock, rounds=1)
    third.open(RunStore(logdir / "checkpoints", fingerprint), logdir=logdir, config={}, run_name="beta")
    third.run()
    third.close()
    archived = logdir / "archive" / "alpha"
    assert [r["round"] for r in json.loads((archived / "summary.json").read_text())["rounds"]] == [1, 2, 3]
    assert (archived / "server").is_dir() and (archived / "checkpoints").is_dir()
    assert json.loads((logdir / "summary.json").read_text())["run_name"] == "beta"


def test_the_engine_imports_no_tensorflow():
    assert "pyfed.federation.engine" in sys.modules
    import subprocess

    loaded = subprocess.run([sys.executable, "-c", "import sys, pyfed.federation.server, pyfed.federation.engine; "
                             "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


class Trainer:
    num_examples = 10

    def __init__(self, value: float):
        self.value = value

    def fit(self, weights, plan):
        return [np.full_like(w, self.value) for w in weights], 10, {"fit_s": 0.1, "history": {"loss": [0.5]}}

    def evaluate(self, weights):
        return 5, 0.25, 0.75


def test_the_in_process_pool_runs_rounds_with_injected_failures_reproducibly():
    def run(seed: int) -> list:
        pool = InProcessPool({f"c{i}": Trainer(float(i)) for i in range(10)}, drop_rate=0.3, seed=seed)
        return RoundEngine(pool, WEIGHTS, rounds=3, plan=PLAN, strategy=FedAvg(), min_fit_clients=5).run()

    def outcome(history):
        return [(r.clients, r.dropped) for r in history]

    history = run(0)
    assert outcome(history) == outcome(run(0))  # the same failures for the same seed
    dropped = [r.dropped for r in history]
    assert any(dropped) and all(reason == "dropped (simulated failure)" for d in dropped for reason in d.values())
    assert all(len(r.clients) >= 5 for r in history)
    assert outcome(run(1)) != outcome(history)


def test_federated_evaluation_goes_through_the_pool():
    pool = InProcessPool({"a": Trainer(1.0), "b": Trainer(2.0)})
    record = RoundEngine(pool, WEIGHTS, rounds=1, plan=FitPlan(eval_fraction=0.2), strategy=FedAvg()).run()[0]
    assert record.federated_evaluation["num_examples"] == 10 and record.federated_evaluation["accuracy"] == 0.75
    assert isinstance(EvaluateRequest(1, WEIGHTS), EvaluateRequest)


class RecordingExport:
    best_metric = "test_loss"
    directory = None  # writes nothing

    def __init__(self, fail_in_round: int | None = None) -> None:
        self.calls, self.fail_in_round = [], fail_in_round

    def __call__(self, weights, server_round, is_best) -> None:
        if server_round == self.fail_in_round:
            raise OSError(28, "No space left on device")
        self.calls.append((server_round, float(weights[0][0, 0]), is_best))

    def written(self) -> dict:
        return {}


def test_the_model_is_exported_after_each_evaluation_and_best_marks_the_best_round_so_far(caplog):
    clock = Clock()
    pool = FakePool({"a": answers(1.0)}, clock)
    losses = iter([0.9, 0.5, 0.7, 0.5, 0.3])  # before round 1, then rounds 1-4

    class Evaluate:
        def __call__(self, weights):
            return next(losses), None

        def probe(self, weights):
            return None  # usable

    export = RecordingExport(fail_in_round=3)
    run = engine(pool, clock, rounds=4, evaluate=Evaluate(), export=export, persister=RecordingPersister())
    run.evaluate_initial_model()
    run.run()
    # round 2's 0.7 is worse than round 1's 0.5; round 3 (0.5) only ties it: the earliest best stays best
    assert export.calls == [(1, 1.0, True), (2, 1.0, False), (4, 1.0, True)]
    assert "round 3: could not write the model files (OSError" in caplog.text  # the run went on
    assert run.completed_rounds == 4


class ProbingEvaluate:
    """A test-data evaluation whose probe finds weights of 9.0 unusable (their outputs not finite)."""

    def __init__(self):
        self.probed: list[float] = []

    def __call__(self, weights):
        return float(weights[0][0, 0]), None

    def probe(self, weights):
        self.probed.append(float(weights[0][0, 0]))
        return "its outputs on 64 test examples are not finite" if weights[0][0, 0] == 9.0 else None


def test_an_update_that_would_make_the_model_unusable_is_refused_before_it_is_folded():
    """Whatever would make the round's model refusable is looked for in each update: the one whose
    outputs are not finite is refused and its sender dropped; the round keeps the honest update,
    instead of the whole round's model being refused."""
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "bad": answers(9.0), "c": answers(3.0)}, clock)
    evaluate = ProbingEvaluate()
    run = engine(pool, clock, evaluate=evaluate)
    record = run.run()[0]
    assert record.clients == ["a", "c"] and record.refused is None
    assert record.dropped == {"bad": "answer refused: its update is unusable: its outputs on 64 test examples "
                                     "are not finite"}
    assert any(cid == "bad" and "unusable" in reason for cid, reason in pool.refused)
    np.testing.assert_allclose(run.weights[0], 2.0)
    assert sorted(evaluate.probed) == [1.0, 2.0, 3.0, 9.0]  # each update, then the new model


def test_an_int8_update_that_decodes_beyond_float32_is_refused_naming_the_element():
    from pyfed.wire.compression import int8_blocks

    def huge(cid, request):
        frames = [f for w in request.weights for f in (np.full(w.shape, 127, np.int8),
                                                        np.full(int8_blocks(w.size), 2.6e36, np.float32))]
        body = {"num_examples": 10, "fit_s": 0.5, "history": {"loss": [1.0, 0.5]}, "encoding": "int8"}
        return [Answer(cid, MessageType.UPDATE, request.round, request.attempt, body, frames)]

    def honest(cid, request):
        frames = [f for w in request.weights for f in (np.zeros(w.shape, np.int8),
                                                        np.zeros(int8_blocks(w.size), np.float32))]
        body = {"num_examples": 10, "fit_s": 0.5, "history": {"loss": [1.0, 0.5]}, "encoding": "int8"}
        return [Answer(cid, MessageType.UPDATE, request.round, request.attempt, body, frames)]

    clock = Clock()
    weights = [np.full((2, 2), 1e38, np.float32), np.zeros(2, np.float32)]  # 1e38 + 127 * 2.6e36 > float32
    pool = FakePool({"a": honest, "huge": huge}, clock)
    run = RoundEngine(pool, weights, clock=clock, rounds=1, plan=FitPlan(epochs=2, update_compression="int8"),
                      strategy=FedAvg(), round_timeout=RoundTimeout(100.0, 2))
    record = run.run()[0]
    assert record.clients == ["a"]
    assert record.dropped == {"huge": "answer refused: its update is unusable: its array 0: element 0 decodes to "
                                      "4.3e+38, beyond float32"}


def test_a_privacy_budget_ends_the_run_cleanly_and_every_round_records_its_epsilon():
    from pyfed.federation.privacy import PrivacyLedger, noise_for_target
    from pyfed.federation.strategy.dp import DifferentialPrivacy

    clock = Clock()
    pool = FakePool({cid: answers(1.0) for cid in ("a", "b", "c", "d")}, clock)
    z = noise_for_target(4.0, 1e-5, 3, 4, 2)  # the budget allows 3 rounds of 2 of 4 clients
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clip_norm=1.0, fraction=0.5, ledger=PrivacyLedger(1e-5, 4.0),
                             rng=np.random.default_rng(0))
    persister = RecordingPersister()
    run = engine(pool, clock, rounds=10, strategy=dp, persister=persister)
    history = run.run()
    assert [len(r.selected) for r in history] == [2, 2, 2]  # 3 rounds, each asking 2 of the 4
    assert run.ended_early and "round 4 may not run" in run.ended_early and "above the target 4" in run.ended_early
    epsilons = [r.privacy["epsilon"] for r in history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(4.0, rel=0.01)
    assert persister.finished[0]["finished"] is True and persister.ended_early == run.ended_early
    assert "epsilon spent" in history[-1].describe(10)


def test_requests_that_cannot_leave_the_server_do_not_spin_the_round_and_its_record_stays_bounded():
    """Both clients listed but every request undeliverable (their queues full) for 150 attempts: the
    engine lets the pool move (time passes) between attempts instead of retrying at once, and the
    round's record keeps its first 100 failed attempts."""
    from pyfed.federation.engine import MAX_FAILED_ATTEMPTS_KEPT, UNREACHED

    class Congested(FakePool):
        failing_sends = 300

        def send(self, client_id, request):
            if self.failing_sends > 0:
                self.failing_sends -= 1
                return Delivery.CONGESTED
            return super().send(client_id, request)

    clock = Clock()
    pool = Congested({"a": answers(1.0), "b": answers(3.0)}, clock)
    record = engine(pool, clock, min_fit_clients=2).run()[0]
    assert record.clients == ["a", "b"]
    assert len(record.failed_attempts) == MAX_FAILED_ATTEMPTS_KEPT < 150
    assert record.failed_attempts[0]["dropped"] == {"a": UNREACHED, "b": UNREACHED}
    assert clock.now >= 150 * 1.0  # a second of the pool's time after each attempt nothing left for


# --- flow control of uploads (federation/uploads.py) --------------------------------------------------

def in_flight_at_most(timeline: list[tuple[str, str]]) -> int:
    """The most grants outstanding at once (granted, update not yet arrived)."""
    outstanding, most = set(), 0
    for what, client_id in timeline:
        (outstanding.add if what == "grant" else outstanding.discard)(client_id)
        most = max(most, len(outstanding))
    return most


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_updates_are_granted_a_window_at_a_time_and_all_are_aggregated(slots):
    clock = Clock()
    pool = FakePool({cid: answers(float(i)) for i, cid in enumerate("abcde")}, clock)
    pool.upload_first = False  # every client is ready before the first update arrives
    run = engine(pool, clock, max_inflight_updates=slots)
    record = run.run()[0]
    assert record.clients == list("abcde") and record.dropped == {}
    np.testing.assert_allclose(run.weights[0], 2.0)  # mean of 0..4
    assert in_flight_at_most(pool.timeline) == slots
    assert [cid for what, cid in pool.timeline if what == "update"] == list("abcde")  # first ready, first granted
    assert clock.now == 0  # nobody waited on a clock: each grant went out as the previous update was folded


def test_an_update_sent_without_a_grant_is_refused_and_the_round_carries_on():
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "eager": lambda cid, r: [Unannounced(update(cid, r, 9.0))]}, clock)
    run = engine(pool, clock)
    record = run.run()[0]
    assert record.clients == ["a"] and record.dropped["eager"].startswith("answer refused: it sent its update "
                                                                          "without a grant")
    assert any(cid == "eager" and "without a grant" in reason for cid, reason in pool.refused)
    np.testing.assert_allclose(run.weights[0], 1.0)


def test_a_granted_client_that_dies_mid_upload_frees_its_slot():
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "b": answers(2.0), "c": answers(3.0)}, clock,
                    on_grant={"a": lambda cid, grant: [Gone(cid, "connection lost")]})
    run = engine(pool, clock, max_inflight_updates=1)
    record = run.run()[0]
    assert record.clients == ["b", "c"] and record.dropped == {"a": "connection lost"}
    assert pool.timeline == [("grant", "a"), ("grant", "b"), ("update", "b"), ("grant", "c"), ("update", "c")]
    assert clock.now == 0  # no deadlock, no wait for a timeout


def test_a_grant_that_cannot_be_delivered_frees_its_slot():
    clock = Clock()
    pool = FakePool({"a": answers(1.0), "b": answers(2.0)}, clock,
                    on_grant={"a": lambda cid, grant: []})
    original_send = pool.send

    def send(client_id, request):
        if isinstance(request, GrantRequest) and client_id == "a":
            pool.present.discard("a")  # its connection went away as it was granted
        return original_send(client_id, request)

    pool.send = send
    record = engine(pool, clock, max_inflight_updates=1).run()[0]
    assert record.clients == ["b"] and record.dropped == {"a": "could not be reached"}


def test_a_wait_for_a_slot_is_not_held_against_a_client_but_a_stalled_upload_is():
    """One slot, round timeout 30 s: "stall" is granted first and never sends; "b" waits in line past
    the timeout and is not dropped for it; "stall" is dropped 30 s after its grant and "b" gets its turn."""
    clock = Clock()
    pool = FakePool({"stall": answers(5.0), "b": answers(2.0)}, clock, on_grant={"stall": lambda cid, grant: []})

    run = engine(pool, clock, max_inflight_updates=1, round_timeout=RoundTimeout(30.0, 2),
                 min_upload_mbit_s=1e-6)  # 24 bytes take 192 s at this rate: the round timeout bounds it
    record = run.run()[0]
    assert record.clients == ["b"]
    assert record.dropped == {"stall": "its granted upload did not arrive within 30s of its grant"}
    assert 30 <= clock.now < 32
    np.testing.assert_allclose(run.weights[0], 2.0)


def test_saying_ready_again_never_extends_a_grant():
    """The review's attack: a granted client repeats UPLOAD_READY every second and never uploads.
    Each repeat is answered with the grant, due when it first was; it is dropped at its allowance
    (the round timeout, 30 s, here below the grace plus its size), and the one waiting gets the slot."""
    clock = Clock()
    pool = FakePool({"pest": answers(5.0), "b": answers(2.0)}, clock, on_grant={"pest": lambda cid, grant: []})
    ready = Answer("pest", MessageType.UPLOAD_READY, 1, 1, {"attempt": 1, "bytes": 24})
    pool.on_idle = lambda now: [ready]
    run = engine(pool, clock, max_inflight_updates=1, round_timeout=RoundTimeout(30.0, 2), min_upload_mbit_s=1e-6)
    record = run.run()[0]
    assert record.clients == ["b"]
    assert record.dropped == {"pest": "its granted upload did not arrive within 30s of its grant"}
    assert 30 <= clock.now < 32
    assert [what for what, cid in pool.timeline if cid == "pest"].count("grant") >= 29  # answered, not extended
    assert pool.released == ["pest"]  # what it sent of its upload is let go


def test_a_granted_upload_has_its_allowance_even_without_a_round_timeout():
    """No round timeout: a stalled upload is still dropped once the grace plus its size at the
    minimum upload rate has passed (here 15 s + 24 bytes at 2 Mbit/s)."""
    clock = Clock()
    pool = FakePool({"stall": answers(5.0), "b": answers(2.0)}, clock, on_grant={"stall": lambda cid, grant: []})
    record = engine(pool, clock, max_inflight_updates=1, round_timeout=RoundTimeout(None, 2)).run()[0]
    assert record.clients == ["b"]
    assert record.dropped == {"stall": "its granted upload did not arrive within 15.0001s of its grant"}
    assert 15 <= clock.now < 17


def test_a_client_back_after_its_grant_is_granted_again():
    clock = Clock()
    grants = []

    def flaky_upload(cid, grant):
        grants.append(grant.attempt)
        if len(grants) == 1:  # its connection dropped while uploading; it is back and asks again
            return [Back(cid)]
        return [pool.held.pop((cid, grant.round, grant.attempt))]

    pool = FakePool({"a": answers(1.0), "b": answers(3.0)}, clock, on_grant={"b": flaky_upload})
    record = engine(pool, clock, max_inflight_updates=1).run()[0]
    assert record.clients == ["a", "b"] and record.dropped == {} and grants == [1, 1]


@pytest.mark.parametrize("declared", [0, 47, 10**9])
def test_an_upload_request_of_the_wrong_size_is_refused(declared):
    clock = Clock()

    def liar(cid, request):
        return [Answer(cid, MessageType.UPLOAD_READY, request.round, request.attempt,
                       {"attempt": request.attempt, "bytes": declared})]

    pool = FakePool({"a": answers(1.0), "liar": liar}, clock)
    record = engine(pool, clock).run()[0]
    assert record.clients == ["a"]
    assert record.dropped["liar"] == (f"answer refused: it declares an update of {declared} bytes; an update of "
                                      f"this model encoded none is 24 bytes")


def test_the_window_needs_a_slot():
    with pytest.raises(ValueError, match="max_inflight_updates must be at least 1"):
        engine(FakePool({"a": answers(1.0)}, Clock()), Clock(), max_inflight_updates=0)


def test_a_strategy_that_holds_every_update_asks_no_more_clients_than_fit_in_memory():
    clock = Clock()
    pool = FakePool({cid: answers(float(i)) for i, cid in enumerate("abcdef")}, clock)
    history = engine(pool, clock, rounds=3, strategy=FedMedian(), max_clients_per_round=3).run()
    assert all(len(r.clients) == 3 for r in history)
    assert len({tuple(r.clients) for r in history}) > 1  # a fresh draw each round, not always the first three
    with pytest.raises(ValueError, match="max_clients_per_round 1 is below min_fit_clients 2"):
        engine(pool, clock, strategy=FedMedian(), min_fit_clients=2, max_clients_per_round=1)


def test_a_request_whose_client_is_gone_records_the_pools_reason_and_one_that_could_not_go_out_unreached():
    """The pool says why a request did not leave: a gone connection (it dropped the client and
    logged it) is "connection lost" in the attempt's record, like any lost connection; anything
    else is "could not be reached"."""
    from pyfed.federation.pool import CONNECTION_GONE, UNREACHED
    from pyfed.wire.protocol import Delivery

    clock = Clock()
    pool = FakePool({"a": answers(1.0), "gone": answers(2.0), "full": answers(3.0)}, clock)
    send = pool.send
    pool.send = lambda cid, request: (Delivery.UNREACHABLE if cid == "gone" else
                                      Delivery.CONGESTED if cid == "full" else send(cid, request))
    record = engine(pool, clock).run()[0]
    assert record.clients == ["a"]
    assert record.dropped == {"gone": CONNECTION_GONE, "full": UNREACHED}
    assert CONNECTION_GONE.startswith("connection lost")


# --- secure aggregation: a key is one party (Hardening II) -------------------------------------------------

class KeyedPool(InProcessPool):
    """In-process clients whose ids are held by keys: ``keys`` maps an id to its key (one key may hold many)."""

    def __init__(self, trainers, keys):
        super().__init__(trainers, seed=0)
        self.keys = keys

    def info(self, client_id: str) -> ClientInfo:
        return ClientInfo(None, 10, self.keys.get(client_id))


def test_under_secure_aggregation_one_id_of_each_key_is_asked_a_round():
    from pyfed.federation.secure_aggregation import SecureAggregation

    ids = ["a", "b", "c", "m1", "m2", "m3"]
    keys = {"a": "ka", "b": "kb", "c": "kc", "m1": "km", "m2": "km", "m3": "km"}
    pool = KeyedPool({cid: Trainer(0.1) for cid in ids}, keys)
    history = RoundEngine(pool, WEIGHTS, rounds=4, plan=PLAN, strategy=FedAvg(),
                          secure_aggregation=SecureAggregation(clip=1.0)).run()
    for record in history:
        assert [cid for cid in record.selected if cid.startswith("m")] in (["m1"], ["m2"], ["m3"])
        assert len(record.clients) == 4 and record.refused is None


def test_one_key_cannot_isolate_an_honest_client_or_unmask_a_sum_of_fewer_than_the_minimum():
    """The review's attacks with one key: two of its ids accused an honest client, which then left
    alone; or one id, sending zeros, had the others ejected until the sum was one site's update.
    Now one id of the key is asked; its lie costs it its place along with the one it named, and the
    two left are fewer than --secagg-min-clients 3: nothing is unmasked and the round ends without a
    new model (it does not wait forever); the next round starts afresh, and the same happens."""
    from pyfed.federation.answers import ClientAnswers
    from pyfed.federation.secure_aggregation import ClientStages, SecureAggregation

    class Accuser(ClientStages):
        def answer(self, kind, server_round, body):
            if kind is MessageType.SECAGG_BOXES:
                return MessageType.SECAGG_MASKED, {"attempt": body["attempt"], **self._input[2],
                                                   "bad_boxes": ["a"]}, []
            return super().answer(kind, server_round, body)

    ids = ["a", "b", "c", "m1", "m2"]
    pool = KeyedPool({cid: Trainer(0.1) for cid in ids}, {"a": "ka", "b": "kb", "c": "kc", "m1": "km", "m2": "km"})
    for cid in ("m1", "m2"):
        pool._answers[cid] = ClientAnswers(cid)  # noqa: SLF001
        pool._answers[cid].stages = Accuser(cid)  # noqa: SLF001
    run = RoundEngine(pool, WEIGHTS, rounds=2, plan=PLAN, strategy=FedAvg(),
                      secure_aggregation=SecureAggregation(clip=1.0))
    history = run.run()
    for record in history:
        (failed,) = record.failed_attempts
        (accuser,) = [cid for cid in failed["dropped"] if cid.startswith("m")]
        assert failed["dropped"]["a"].startswith(f"secure aggregation: {accuser} said its sealed shares did not open")
        assert record.clients == [] and record.refused.startswith(
            "secure aggregation: the 2 party(ies) left out of this round (misbehaving, or named by one that did) "
            "leave 2 to ask, fewer than the 3")
    assert all(np.array_equal(w, g) for w, g in zip(run.weights, WEIGHTS))  # nothing was unmasked or applied


def test_a_client_that_dealt_boxes_that_do_not_open_and_then_stays_silent_does_not_hold_the_round_to_its_timeout():
    """Mallory seals garbage for its neighbours, then never sends its masked input. Once every
    neighbour has named it, the stage stops waiting for it (it leaves the attempt whatever it says):
    the attempt is abandoned at once, and the round retried without it, long before the timeout."""
    import os

    from pyfed.federation.answers import ClientAnswers
    from pyfed.federation.pool import SecAggRequest
    from pyfed.federation.secure_aggregation import ClientStages, SecureAggregation
    from pyfed.wire.protocol import b64, unb64

    class GarbageDealer(ClientStages):
        def answer(self, kind, server_round, body):
            reply_kind, reply, arrays = super().answer(kind, server_round, body)
            if kind is MessageType.SECAGG_ROSTER:
                reply = {**reply, "boxes": {v: b64(os.urandom(len(unb64(box)))) for v, box in reply["boxes"].items()}}
            return reply_kind, reply, arrays

    clock = Clock()

    class SilentMallory(KeyedPool):
        def send(self, client_id, request):
            if client_id == "m" and isinstance(request, SecAggRequest) and request.kind is MessageType.SECAGG_BOXES:
                return Delivery.SENT  # taken, never answered
            return super().send(client_id, request)

        def poll(self, timeout_s):
            events = super().poll(timeout_s)
            if not events:
                clock.now += timeout_s  # nothing came: the wait took its time
            return events

    ids = ["a", "b", "c", "m"]
    pool = SilentMallory({cid: Trainer(0.1) for cid in ids}, {cid: f"k{cid}" for cid in ids})
    pool._answers["m"] = ClientAnswers("m")  # noqa: SLF001
    pool._answers["m"].stages = GarbageDealer("m")  # noqa: SLF001
    (record,) = RoundEngine(pool, WEIGHTS, rounds=1, plan=PLAN, strategy=FedAvg(), clock=clock,
                            round_timeout=RoundTimeout(1000.0, PLAN.epochs),
                            secure_aggregation=SecureAggregation(clip=1.0)).run()
    (failed,) = record.failed_attempts
    assert failed["dropped"] == {"m": "secure aggregation: its sealed shares did not open for a, b, c"}
    assert record.clients == ["a", "b", "c"] and record.refused is None
    assert record.duration_s < 1000  # never waited out the timeout for m


def test_with_the_test_evaluation_in_the_background_a_round_is_said_finished_before_the_next_starts(caplog):
    """The model is tested while the next round trains; the log still says each round finished
    before the next one started, and the test figures in a line of their own after."""
    import logging

    class DeferringPersister(RecordingPersister):  # runs each round's evaluation late, as its thread does
        def __init__(self):
            super().__init__()
            self.pending = []

        def submit(self, snapshot, record, summary_clients, before=None) -> None:
            self.wait()
            self.pending.append(before)
            self.snapshots.append(snapshot)

        def wait(self) -> None:
            while self.pending:
                job = self.pending.pop(0)
                if job is not None:
                    job()

        def finish(self, snapshot, final, ended_early=None) -> None:
            self.wait()
            super().finish(snapshot, final, ended_early)

    clock = Clock()
    caplog.set_level(logging.INFO, logger="pyfed.server")
    engine(FakePool({"a": answers(1.0)}, clock), clock, rounds=2, evaluate=lambda w: (0.25, 0.75),
           persister=DeferringPersister()).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    said = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in (
        "round 1/2 finished", "round 2/2 started", "round 1/2 tested: test loss 0.2500, accuracy 0.7500",
        "round 2/2 finished", "round 2/2 tested")]
    assert said == sorted(said), lines
    assert "testing the new model" in lines[said[0]]



# --- feature scaling: the sites' moments pooled before round 1 ----------------------------------

SCALED_WEIGHTS = [np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((3, 2), np.float32)]


def reports(x: np.ndarray, **lies) -> Callable[[str, StatsRequest], list[PoolEvent]]:
    """A site answering STATS with the moments of its examples ``x`` (or with ``lies`` in their place)."""
    from pyfed.federation.moments import Moments

    def answer(client_id: str, request: StatsRequest) -> list[PoolEvent]:
        return [Answer(client_id, MessageType.MOMENTS, request.round, 1, {**moments_body(Moments.of(x)), **lies})]
    return answer


def test_before_round_1_the_sites_moments_set_the_feature_scaling_to_the_pooled_mean_and_variance():
    from pyfed.federation.moments import FeatureScaling, SiteStatistics

    rng = np.random.default_rng(0)
    x_a = np.c_[rng.normal(1000, 300, 40), rng.normal(0.1, 0.02, 40), np.full(40, 5.0)]
    x_b = np.c_[rng.normal(1500, 100, 60), rng.normal(0.3, 0.05, 60), np.full(60, 5.0)]
    x_c = np.c_[rng.normal(1200, 200, 30), rng.normal(0.2, 0.05, 30), np.full(30, 5.0)]
    clock = Clock()
    sites = ("a", "b", "c", "silent", "liar", "greedy", "narrow", "far")
    pool = FakePool({cid: answers(1.0) for cid in sites}, clock, declared=100)
    pool.on_stats = {"a": reports(x_a), "b": reports(x_b), "c": reports(x_c),
                     "liar": reports(x_a, m2=[-1.0, 0.0, 0.0]), "greedy": reports(x_a, count=10**6),
                     "narrow": reports(x_a[:, :2]),
                     "far": reports(x_a, mean=[1e30, 0.1, 5.0])}  # within every bound, but no data gives it
    run = RoundEngine(pool, SCALED_WEIGHTS, clock=clock, rounds=1, plan=PLAN, strategy=FedAvg(),
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), statistics=SiteStatistics(FeatureScaling(0, 1)))
    first_fit = []
    pool.behaviours["a"] = lambda cid, request: first_fit.append(request.weights) or [update(cid, request, 1.0)]
    run.run()
    union = np.concatenate([x_a, x_b, x_c])
    assert np.allclose(first_fit[0][0], union.mean(axis=0), rtol=1e-6)  # round 1 trains on the scaled model
    assert np.allclose(first_fit[0][1], [union[:, 0].var(), union[:, 1].var(), 1.0], rtol=1e-5)  # no spread: 1
    assert {cid for cid, _ in pool.refused} == {"liar", "greedy", "narrow", "far"}
    reasons = dict(pool.refused)
    assert "negative" in reasons["liar"] and "more than the 100 examples" in reasons["greedy"]
    assert "not 3 float64 values" in reasons["narrow"]
    assert reasons["far"].startswith("its statistics cannot be true: feature 0's mean 1e+30 is")
    assert sum(isinstance(r, StatsRequest) for _, r in pool.sent) == 8  # asked once each; silent timed out


def test_no_usable_statistics_leave_the_model_unscaled_and_the_run_goes_on(caplog):
    from pyfed.federation.moments import FeatureScaling, SiteStatistics

    clock = Clock()
    pool = FakePool({"a": answers(1.0)}, clock)
    pool.on_stats = {"a": reports(np.ones((5, 3)), mean=[float("inf")] * 3)}  # not finite: refused (schema aside)
    run = RoundEngine(pool, SCALED_WEIGHTS, clock=clock, rounds=1, plan=PLAN, strategy=FedAvg(),
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), statistics=SiteStatistics(FeatureScaling(0, 1)))
    with caplog.at_level(logging.WARNING, logger="pyfed.server"):
        history = run.run()
    assert len(history) == 1 and "no site sent usable statistics" in caplog.text
    assert "not finite" in dict(pool.refused)["a"]


# --- BatchNorm recalibration: the sites' moments of each layer's inputs after the last round ------

#: a kernel, then two BatchNorm layers' moving means and variances: layer 0 normalises 2 channels
#: (one value per example), layer 1 3 channels (two values per example: a feature map)
BN_WEIGHTS = [np.ones((2, 2), np.float32), np.zeros(2, np.float32), np.ones(2, np.float32),
              np.zeros(3, np.float32), np.ones(3, np.float32)]


def bn_layers():
    from pyfed.federation.moments import BatchNormLayer

    return (BatchNormLayer("bn0", 1, 2, 2, 1), BatchNormLayer("bn1", 3, 4, 3, 2))


def layer_inputs(x: np.ndarray, weights, position: int) -> np.ndarray:
    """What a site's layer ``position`` receives: layer 1's inputs depend on layer 0's moving mean,
    as a real model's later layers depend on the earlier layers' statistics."""
    if position == 0:
        return x
    centred = x - weights[1]
    return np.repeat(np.c_[centred, centred.sum(axis=1)], 2, axis=0)  # two positions per example


def bn_site(x: np.ndarray, lies_at: int | None = None, **lies) -> Callable[[str, StatsRequest], list[PoolEvent]]:
    """A site answering with the moments of its layer's inputs (at layer ``lies_at``, or every one, with ``lies``)."""
    from pyfed.federation.moments import Moments

    def answer(client_id: str, request: StatsRequest) -> list[PoolEvent]:
        body = moments_body(Moments.of(layer_inputs(x, request.weights, request.layer)))
        told = lies if lies_at in (None, request.layer) else {}
        return [Answer(client_id, MessageType.MOMENTS, request.round, request.attempt, {**body, **told})]
    return answer


def test_after_the_last_round_each_batch_norm_layer_gets_the_pooled_statistics_of_its_inputs_in_order():
    from pyfed.federation.moments import SiteStatistics

    rng = np.random.default_rng(1)
    x_a, x_b = rng.normal(5, 2, (40, 2)), rng.normal(-1, 0.5, (70, 2))
    clock = Clock()
    pool = FakePool({cid: answers(1.0) for cid in ("a", "b", "odd", "wide")}, clock, declared=100)
    pool.on_stats = {"a": bn_site(x_a), "b": bn_site(x_b), "odd": bn_site(x_a, 1, count=3),  # not whole examples
                     "wide": bn_site(x_a, 0, mean=[0.0] * 5, m2=[1.0] * 5)}
    evaluated = []
    run = RoundEngine(pool, BN_WEIGHTS, clock=clock, rounds=2, plan=PLAN, strategy=FedAvg(),
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), statistics=SiteStatistics(batch_norm=bn_layers()),
                      evaluate=lambda weights: evaluated.append(weights) or (0.5, 0.9))
    run.run()
    union = np.concatenate([x_a, x_b, x_a])  # each liar lies at one layer only: a, b and one x_a in each pool
    assert np.allclose(run.weights[1], union.mean(axis=0)) and np.allclose(run.weights[2], union.var(axis=0))
    second = layer_inputs(union, run.weights, 1)  # under layer 0's pooled statistics
    assert np.allclose(run.weights[3], second.mean(axis=0)) and np.allclose(run.weights[4], second.var(axis=0))
    assert np.all(run.weights[0] == 1.0)  # every other array is the last round's model
    stats = [request for _, request in pool.sent if isinstance(request, StatsRequest)]
    assert [(r.layer, r.attempt, r.round) for r in stats] == [(0, 1, 2)] * 4 + [(1, 2, 2)] * 4
    assert all(np.allclose(r.weights[1], union.mean(axis=0)) for r in stats if r.layer == 1)  # layer 0 done first
    reasons = dict(pool.refused)
    assert "is not a whole number of examples of 2 values" in reasons["odd"]
    assert "its mean is not 2 float64 values" in reasons["wide"]
    assert run.final_metrics == (0.5, 0.9) and evaluated[-1] is run.weights  # the recalibrated model, tested


def test_a_layer_no_site_can_summarise_leaves_the_averaged_statistics_and_the_run_ends(caplog):
    from pyfed.federation.moments import SiteStatistics

    clock = Clock()
    pool = FakePool({"a": answers(1.0)}, clock, declared=100)
    pool.on_stats = {"a": bn_site(np.ones((5, 2)), count=10**6)}  # more than it declared: refused
    run = RoundEngine(pool, BN_WEIGHTS, clock=clock, rounds=1, plan=PLAN, strategy=FedAvg(),
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), statistics=SiteStatistics(batch_norm=bn_layers()))
    with caplog.at_level(logging.WARNING, logger="pyfed.server"):
        assert len(run.run()) == 1
    assert "BatchNorm recalibration of the final model (bn0): no site sent usable statistics" in caplog.text
    assert "the final model keeps its averaged moving statistics" in caplog.text
    assert np.all(run.weights[1] == 1.0) and np.all(run.weights[2] == 1.0)  # the last round's average
    assert "more than the 100 examples it may claim" in dict(pool.refused)["a"]


def test_best_keras_of_an_earlier_round_is_recalibrated_too():
    from pyfed.federation.moments import SiteStatistics

    clock = Clock()
    x = np.random.default_rng(2).normal(3, 1, (30, 2))
    pool = FakePool({"a": answers(1.0)}, clock, declared=100)
    pool.on_stats = {"a": bn_site(x)}
    losses = iter([0.2, 0.9, 0.5, 0.2])  # round 1 is best; after recalibration the final 0.5, the best 0.2

    class Evaluate:
        def __call__(self, weights):
            return next(losses), None

        def probe(self, weights):
            return None

    class Export(RecordingExport):
        best = None

        def best_weights(self):
            return [np.full_like(w, 7.0) for w in BN_WEIGHTS]

        def write_best(self, weights, server_round):
            self.best = (server_round, weights)

    export = Export()
    run = RoundEngine(pool, BN_WEIGHTS, clock=clock, rounds=2, plan=PLAN, strategy=FedAvg(), export=export,
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), evaluate=Evaluate(),
                      evaluate_in_background=False, statistics=SiteStatistics(batch_norm=bn_layers()))
    run.run()
    assert export.calls[-1] == (2, 1.0, False)  # latest: the recalibrated final model, not the best
    server_round, weights = export.best
    assert server_round == 1 and np.all(weights[0] == 7.0)  # best.keras's own weights...
    assert np.allclose(weights[1], x.mean(axis=0)) and np.allclose(weights[2], x.var(axis=0))  # ...recalibrated
    attempts = [r.attempt for _, r in pool.sent if isinstance(r, StatsRequest)]
    assert attempts == [1, 2, 3, 4]  # the best model's stages are not mistaken for the final one's


def test_recalibrated_statistics_that_score_worse_on_the_test_data_are_not_kept(caplog):
    """A site can report moments its count allows (a mean 100 of its standard deviations off, with two
    sites nothing says which lies): what can be checked is the model they make, on the test data."""
    from pyfed.federation.moments import SiteStatistics

    clock = Clock()
    x = np.random.default_rng(3).normal(1.0, 0.1, (50, 2))
    pool = FakePool({"a": answers(1.0), "liar": answers(1.0)}, clock, declared=100)
    pool.on_stats = {"a": bn_site(x), "liar": bn_site(x, 0, mean=[11.0, 11.0], count=50)}

    class Evaluate:  # the averaged model's moving mean (1.0) is right for the test data
        def __call__(self, weights):
            return 0.1 + abs(float(weights[1][0]) - 1.0), None

        def probe(self, weights):
            return None

    run = RoundEngine(pool, BN_WEIGHTS, clock=clock, rounds=1, plan=PLAN, strategy=FedAvg(), evaluate=Evaluate(),
                      round_timeout=RoundTimeout(100.0, PLAN.epochs), statistics=SiteStatistics(batch_norm=bn_layers()))
    with caplog.at_level(logging.INFO, logger="pyfed.server"):
        run.run()
    assert ("BatchNorm recalibration: the final model keeps its averaged moving statistics, which score better on "
            "the test data (loss 0.1000 against 5.1") in caplog.text
    assert np.all(run.weights[1] == 1.0) and run.final_metrics == (0.1, None)
