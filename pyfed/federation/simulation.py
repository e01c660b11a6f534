"""In-process experiments: a whole federation on one machine, without sockets.

The same round engine as a networked run (:class:`~pyfed.federation.engine.RoundEngine`), over an
:class:`~pyfed.federation.pool.InProcessPool` of local trainers: the same strategies, sampling
(``fraction_fit``), retries below ``min_fit_clients``, injected failures (``drop_rate``), records
(summary.json, TensorBoard) and checkpoints, so an interrupted simulation resumes. All clients
share one compiled Keras model and take turns on it, so 100 clients cost 100 small ``fit`` calls
per round and one model's memory, not 100 processes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pyfed.federation.moments import SiteStatistics
from pyfed.federation.engine import ExportModel, RoundEngine, RoundTimeout
from pyfed.federation.uploads import DEFAULT_INFLIGHT_UPDATES
from pyfed.federation.pool import InProcessPool
from pyfed.federation.secure_aggregation import SecureAggregation
from pyfed.federation.strategy import FedAvg, Strategy
from pyfed.learning.model import describe_model, evaluator, to_wire
from pyfed.learning.training import LocalTrainer
from pyfed.persistence.store import RunStore, model_fingerprint
from pyfed.persistence.tracking import RoundRecord, RunLog, format_metric
from pyfed.wire import protocol
from pyfed.wire.protocol import FitPlan

log = logging.getLogger("pyfed.simulation")


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when output is not a terminal."""

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True, width: int = 30):
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.started = time.monotonic()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(total, 1))
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
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
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        drop_rate: float = 0.0,
        checkpoint_dir: Path | None = None,
        keep_checkpoints: int = 3,
        fresh_start: bool = False,
        run_name: str | None = None,
        statistics: SiteStatistics = SiteStatistics(),
        export: ExportModel | None = None,
        histograms: bool = False,
        secure_aggregation: SecureAggregation | None = None,
        max_inflight_updates: int = DEFAULT_INFLIGHT_UPDATES,
    ):
        if not clients:
            raise ValueError("a simulation needs at least one client")
        self.model = model
        self.rounds = rounds
        strategy = strategy or FedAvg()
        self.client_ids = list(client_ids or [f"client-{i}" for i in range(1, len(clients) + 1)])
        if len(self.client_ids) != len(clients) or len(set(self.client_ids)) != len(clients):
            raise ValueError("client_ids must name each client once")
        self.trainers = {cid: LocalTrainer(model, x, y, seed=seed + index, use_plan_learning_rate=use_plan_learning_rate)
                         for index, (cid, (x, y)) in enumerate(zip(self.client_ids, clients))}
        for trainer in self.trainers.values():
            trainer.use_eval_fraction(plan.eval_fraction)
        self.progress = progress
        self._bar: ProgressBar | None = None
        self.pool = InProcessPool(self.trainers, drop_rate=drop_rate, seed=seed, on_answer=self._answered)
        self.engine = RoundEngine(self.pool, model.get_weights(), rounds=rounds, plan=plan, strategy=strategy,
                                  min_fit_clients=min_fit_clients, fraction_fit=fraction_fit, seed=seed,
                                  round_timeout=RoundTimeout(None, plan.epochs),  # local trainers cannot stall
                                  evaluate=evaluator(model, *test_data) if test_data is not None else None,
                                  export=export if logdir else None,
                                  evaluate_in_background=False,  # the trainers share the evaluated model
                                  on_round=self._round_done, secure_aggregation=secure_aggregation,
                                  max_inflight_updates=max_inflight_updates, statistics=statistics)
        self.logdir = Path(logdir) if logdir else None
        model_json, compile_config = to_wire(model)
        self.description = describe_model(model, histograms=histograms)
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else (self.logdir / "checkpoints" if logdir else None)
        self.store = RunStore(checkpoint_dir, {
            "model": model_fingerprint(model_json, compile_config, protocol.array_specs(model.get_weights())),
            "strategy": json.dumps(strategy.describe(), sort_keys=True, default=str),
            "clients": len(self.trainers),
        }, keep=keep_checkpoints)
        self.config_summary = config_summary or {}
        self.fresh_start = fresh_start
        self.run_name = run_name  # None: named by its start time
        self.run_log: RunLog | None = None

    @property
    def history(self) -> list[RoundRecord]:
        return self.engine.history

    @property
    def weights(self) -> list[np.ndarray]:
        return self.engine.weights

    @property
    def final_metrics(self) -> tuple[float | None, float | None]:
        return self.engine.final_metrics

    def _answered(self, done: int, remaining: int) -> None:
        if self._bar is None:
            self._bar = ProgressBar(f"round {self.engine.current_round}/{self.rounds}", enabled=self.progress)
        self._bar.update(done, done + remaining)

    def _round_done(self, record: RoundRecord) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def run(self) -> list[RoundRecord]:
        """Run every remaining round (resuming an interrupted run); afterwards ``model`` holds the global weights."""
        self.run_log = self.engine.open(self.store, logdir=self.logdir, config=self.config_summary,
                                        fresh_start=self.fresh_start, description=self.description,
                                        run_name=self.run_name)
        log.info("simulating %d clients for %d rounds with %s", len(self.trainers), self.rounds,
                 self.engine.strategy.name)
        try:
            self.engine.run()
        finally:
            self.engine.close()
        self.model.set_weights(self.engine.weights)
        loss, accuracy = self.engine.final_metrics
        log.info("simulation finished: %d rounds, final test loss %s, accuracy %s%s", self.rounds,
                 format_metric(loss), format_metric(accuracy),
                 f"; summary in {self.run_log.summary_path}" if self.run_log else "")
        return self.engine.history


def rounds_to_reach(history: Sequence[RoundRecord], accuracy: float) -> int | None:
    """The first round whose global test accuracy reached ``accuracy`` (None if none did)."""
    return next((r.round for r in history if r.test_accuracy is not None and r.test_accuracy >= accuracy), None)
