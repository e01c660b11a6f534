"""The federated server: the round engine over the ZeroMQ pool, with a run store.

:class:`Server` wires three pieces and runs them: a :class:`~pyfed.federation.network.NetworkPool`
(the socket, the registry, joins and leaves), a :class:`~pyfed.federation.engine.RoundEngine` (the
rounds) and a :class:`~pyfed.persistence.store.RunStore` (checkpoints, resume). The model comes in
its wire form (:class:`~pyfed.wire.protocol.WireModel`) and evaluation as a function, so this
module imports no TensorFlow; :func:`pyfed.learning.model.wire_model` and
:func:`pyfed.learning.model.evaluator` make both from a Keras model.

SIGTERM (:meth:`Server.request_stop`) stops at the next wait, after the last round handed to the
run store is written, and tells the clients to wait for the server's return.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.federation.moments import SiteStatistics
from pyfed.federation.engine import (AUTO, MAX_EXAMPLES, EngineStopping, Evaluate, ExportModel, RoundEngine,
                                    RoundTimeout)
from pyfed.federation.network import NetworkPool
from pyfed.federation.registry import ClientRecord
from pyfed.federation.secure_aggregation import SECAGG_MAX_NEIGHBOURS, SecureAggregation
from pyfed.federation.strategy import FedAvg, Strategy
from pyfed.persistence.store import RunStore, model_fingerprint
from pyfed.federation.uploads import DEFAULT_INFLIGHT_UPDATES, DEFAULT_MIN_UPLOAD_MBIT_S
from pyfed.persistence.tracking import RoundRecord, RunDescription, RunLog, format_metric
from pyfed.wire.protocol import FitPlan, WireModel
from pyfed.wire.security import CurveKeys
from pyfed.wire.transport import raise_open_file_limit

log = logging.getLogger("pyfed.server")


class Server:
    """Runs a federation over ZeroMQ for ``rounds`` rounds and returns the rounds' records."""

    def __init__(
        self,
        model: WireModel,
        *,
        address: str,
        rounds: int,
        min_clients: int,
        plan: FitPlan,
        strategy: Strategy | None = None,
        evaluate: Evaluate | None = None,
        export: ExportModel | None = None,
        description: RunDescription | None = None,
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
        run_name: str | None = None,
        statistics: SiteStatistics = SiteStatistics(),
        curve: CurveKeys | None = None,
        authorized_keys: Path | None = None,
        join_rate: float = 100.0,
        max_examples: int = MAX_EXAMPLES,
        max_ids_per_key: int | None = None,
        secure_aggregation: SecureAggregation | None = None,
        max_inflight_updates: int = DEFAULT_INFLIGHT_UPDATES,
        max_clients_per_round: int | None = None,
        min_upload_mbit_s: float = DEFAULT_MIN_UPLOAD_MBIT_S,
    ):
        strategy = strategy or FedAvg()
        self.pool = NetworkPool(address, model, plan=plan, rounds=rounds, min_clients=min_clients, curve=curve,
                                authorized_keys=authorized_keys, num_shards=num_shards, join_rate=join_rate,
                                max_examples=max_examples, max_ids_per_key=max_ids_per_key,
                                secagg_neighbours=SECAGG_MAX_NEIGHBOURS if secure_aggregation is not None else 0)
        self.engine = RoundEngine(self.pool, model.weights, rounds=rounds, plan=plan, strategy=strategy,
                                  min_clients=min_clients, min_fit_clients=min_fit_clients, fraction_fit=fraction_fit,
                                  seed=seed, round_timeout=RoundTimeout(round_timeout_s, plan.epochs),
                                  evaluate=evaluate, export=export if logdir else None,
                                  max_examples=max_examples, secure_aggregation=secure_aggregation,
                                  max_inflight_updates=max_inflight_updates,
                                  max_clients_per_round=max_clients_per_round, min_upload_mbit_s=min_upload_mbit_s,
                                  statistics=statistics)
        self.logdir = Path(logdir) if logdir else None
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else (self.logdir / "checkpoints" if logdir else None)
        self.store = RunStore(checkpoint_dir, {
            "model": model_fingerprint(model.model_json, model.compile_config, self.pool.specs),
            "strategy": json.dumps(strategy.describe(), sort_keys=True, default=str),
            "num_shards": num_shards,
        }, keep=keep_checkpoints)
        self.fresh_start = fresh_start
        self.run_name = run_name  # None: named by its start time
        self.config_summary = config_summary or {}
        self.description = description or RunDescription(model_json=model.model_json)
        self.rounds = rounds
        self.run_log: RunLog | None = None

    # what callers read after a run
    @property
    def weights(self) -> list[np.ndarray]:
        return self.engine.weights

    @property
    def history(self) -> list[RoundRecord]:
        return self.engine.history

    @property
    def completed_rounds(self) -> int:
        return self.engine.completed_rounds

    @property
    def final_metrics(self) -> tuple[float | None, float | None]:
        return self.engine.final_metrics

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """The connected clients, by id."""
        return self.pool.clients

    def request_stop(self, reason: str) -> None:
        """Stop at the next wait (safe from a signal handler): the last checkpoint stays the resume point."""
        self.engine.request_stop(reason)

    def open(self) -> None:
        """Resume from the newest usable checkpoint, or archive the last run and start a new one."""
        self.run_log = self.engine.open(self.store, logdir=self.logdir, config=self.config_summary,
                                        fresh_start=self.fresh_start, description=self.description,
                                        run_name=self.run_name)

    def run(self) -> list[RoundRecord]:
        """Resume or start, wait for clients, run every round, tell the clients the run is over.

        Raises :class:`~pyfed.persistence.files.CheckpointMismatch` if the checkpoint to resume from
        was written by a different run; nothing is loaded then.
        """
        before, after = raise_open_file_limit()
        if after > before:
            log.info("raised the open-file limit from %d to %d (one descriptor per connection)", before, after)
        try:
            self.open()
            self.engine.evaluate_initial_model()  # before listening: see Persister
            endpoint = self.pool.bind()
        except BaseException:
            self._close()
            raise
        log.info("listening on %s%s; model has %d arrays, %.1f MB; waiting for %d clients; round timeout %s",
                 endpoint, " (CurveZMQ)" if self.pool.encrypted else " (NOT encrypted)", len(self.pool.specs),
                 sum(a.nbytes for a in self.engine.weights) / 1e6, self.engine.min_clients,
                 self.engine.round_timeout.describe())
        try:
            self.engine.run()
            self.pool.finish("the run is complete")
            loss, accuracy = self.engine.final_metrics
            log.info("run finished: %d rounds, final test loss %s, accuracy %s%s", self.engine.completed_rounds,
                     format_metric(loss),
                     format_metric(accuracy), f"; summary in {self.run_log.summary_path}" if self.run_log else "")
        except EngineStopping as stopping:
            self.pool.stop(str(stopping))
            log.info("stopped (%s) after %d completed rounds; %s", stopping, self.engine.completed_rounds,
                     "the same command resumes from the last checkpoint" if self.store.directory
                     else "no checkpoints are kept (no log or checkpoint directory)")
        finally:
            self._close()
        return self.engine.history

    def _close(self) -> None:
        self.engine.close()
        self.pool.close()
