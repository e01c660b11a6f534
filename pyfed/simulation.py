"""In-process experiments: a whole federation on one machine, without sockets.

The same strategies, local training (:class:`~pyfed.training.LocalTrainer`) and records
(summary.json, TensorBoard) as a networked run; only the transport is gone. All clients share one
compiled Keras model and take turns on it, so 100 clients cost 100 small ``fit`` calls per round
and one model's memory, not 100 processes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .model import evaluate, evaluation_dataset
from .protocol import ProtocolError, check_finite
from .strategy import FedAvg, FitPlan, FitResult, Strategy
from .tracking import RoundRecord, RunLog, format_metric
from .training import LocalTrainer, weighted_evaluation

log = logging.getLogger("pyfed.simulation")


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when output is not a terminal."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                          f"{elapsed:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + self.width + 30) + "\r")
            self.stream.flush()


class Simulation:
    """Runs ``rounds`` rounds of ``strategy`` over in-memory clients; returns the rounds' records."""

    def __init__(
        self,
        model: Any,
        clients: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        rounds: int,
        plan: FitPlan,
        strategy: Strategy | None = None,
        test_data: tuple[np.ndarray, np.ndarray] | None = None,
        logdir: Path | None = None,
        config_summary: dict[str, Any] | None = None,
        client_ids: Sequence[str] | None = None,
        seed: int = 0,
        progress: bool = True,
        use_plan_learning_rate: bool = True,
    ):
        if not clients:
            raise ValueError("a simulation needs at least one client")
        self.model = model
        self.rounds = rounds
        self.plan = plan
        self.strategy = strategy or FedAvg()
        self.client_ids = list(client_ids or [f"client-{i}" for i in range(1, len(clients) + 1)])
        if len(self.client_ids) != len(clients) or len(set(self.client_ids)) != len(clients):
            raise ValueError("client_ids must name each client once")
        self.trainers = {cid: LocalTrainer(model, x, y, seed=seed + index, use_plan_learning_rate=use_plan_learning_rate)
                         for index, (cid, (x, y)) in enumerate(zip(self.client_ids, clients))}
        for trainer in self.trainers.values():
            trainer.use_eval_fraction(plan.eval_fraction)
        self.test_dataset = evaluation_dataset(*test_data) if test_data is not None else None
        self.weights: list[np.ndarray] = model.get_weights()
        self.progress = progress
        self.run_log = RunLog(logdir, config=config_summary or {}) if logdir else None
        if self.run_log:
            self.run_log.clients.update({cid: {"shard": None, "num_examples": int(len(t.y))}
                                         for cid, t in self.trainers.items()})
        self.history: list[RoundRecord] = []
        self.final_metrics: tuple[float | None, float | None] = (None, None)

    def run(self) -> list[RoundRecord]:
        """Run every round; afterwards ``model`` holds the global weights."""
        log.info("simulating %d clients for %d rounds with %s", len(self.trainers), self.rounds, self.strategy.name)
        try:
            for server_round in range(1, self.rounds + 1):
                self._run_round(server_round)
            self.final_metrics = (self.history[-1].test_loss, self.history[-1].test_accuracy)
            if self.run_log:
                self.run_log.finish(*self.final_metrics)
        finally:
            if self.run_log:
                self.run_log.close()
        self.model.set_weights(self.weights)
        log.info("simulation finished: %d rounds, final test loss %s, accuracy %s%s", self.rounds,
                 format_metric(self.final_metrics[0]), format_metric(self.final_metrics[1]),
                 f"; summary in {self.run_log.summary_path}" if self.run_log else "")
        return self.history

    def _run_round(self, server_round: int) -> None:
        started = time.monotonic()
        selected = self.strategy.configure_fit(server_round, list(self.trainers), self.plan)
        aggregator = self.strategy.aggregator(server_round, self.weights)
        results: dict[str, FitResult] = {}
        dropped: dict[str, str] = {}
        bar = ProgressBar(len(selected), f"round {server_round}/{self.rounds}", enabled=self.progress)
        for done, (client_id, plan) in enumerate(selected, start=1):
            weights, num_examples, metrics = self.trainers[client_id].fit(self.weights, plan)
            try:
                check_finite(weights)
            except ProtocolError as error:
                dropped[client_id] = f"diverged: {error}"
                log.warning("round %d: client %s diverged (%s); its update is left out", server_round, client_id, error)
                continue
            result = FitResult(client_id, weights, num_examples, metrics)
            aggregator.add(result)
            result.weights = ()
            results[client_id] = result
            bar.update(done)
        bar.close()
        if results:
            self.weights = aggregator.result()
        eval_started = time.monotonic()
        test = (None, None)
        if self.test_dataset is not None:
            self.model.set_weights(self.weights)
            test = evaluate(self.model, self.test_dataset)
        federated = None
        if self.plan.eval_fraction > 0:
            federated = weighted_evaluation({cid: t.evaluate(self.weights) for cid, t in self.trainers.items()})
        record = RoundRecord.build(server_round, [cid for cid, _ in selected], results,
                                   duration_s=time.monotonic() - started, test=test,
                                   eval_s=time.monotonic() - eval_started, dropped=dropped, federated=federated)
        self.history.append(record)
        if self.run_log:
            self.run_log.record_round(record)
        log.info("%s", record.describe(self.rounds))


def rounds_to_reach(history: Sequence[RoundRecord], accuracy: float) -> int | None:
    """The first round whose global test accuracy reached ``accuracy`` (None if none did)."""
    return next((r.round for r in history if r.test_accuracy is not None and r.test_accuracy >= accuracy), None)
