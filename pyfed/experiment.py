"""The original PyFed's ``FL_Experiment``: a whole federation on one machine in a few lines.

``FL_Experiment(num_clients, clients_data, clients_target, server_data, server_target)
.run(model, rounds, epochs, batch_size, lr, optimizer, loss, metrics)`` as in the original
README, now run in-process by :class:`pyfed.federation.simulation.Simulation` (no sockets, no subprocesses),
with any PyFed strategy and the same summary.json and TensorBoard logs as a networked run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.components import ensure_logging, make_optimizer
from pyfed.learning.data import check_examples
from pyfed.federation.simulation import Simulation
from pyfed.federation.strategy import make_strategy
from pyfed.wire.protocol import FitPlan
from pyfed.persistence.tracking import RoundRecord


class FL_Experiment:  # noqa: N801 - the original API's name
    """Federated learning over in-memory client datasets, evaluated on the server's data."""

    def __init__(self, num_clients: int, clients_data: Sequence[Any], clients_target: Sequence[Any],
                 server_data: Any, server_target: Any):
        ensure_logging()
        if not (int(num_clients) == len(clients_data) == len(clients_target)):
            raise ValueError(f"num_clients is {num_clients} but {len(clients_data)} data arrays and "
                             f"{len(clients_target)} target arrays were given")
        self.num_clients = int(num_clients)
        self.clients = [check_examples(np.asarray(x), np.asarray(y), f"client {i}'s data")
                        for i, (x, y) in enumerate(zip(clients_data, clients_target), start=1)]
        self.server_data = check_examples(np.asarray(server_data), np.asarray(server_target), "the server's data")
        self.history: list[RoundRecord] = []

    def run(self, model: Any, rounds: int, epochs: int, batch_size: int, lr: float, optimizer: Any, loss: Any,
            metrics: list[Any], *, strategy: str = "fedavg", logdir: str | Path | None = "logs",
            progress: bool = True, **strategy_options: Any) -> dict[str, float | None]:
        """Train ``model`` federatedly; print each round and the final test result, and return it.

        ``strategy`` (and its options, e.g. ``proximal_mu=0.1``) picks any PyFed strategy; the
        original API had FedAvg only. Afterwards ``model`` holds the global weights.
        """
        model.compile(optimizer=make_optimizer(optimizer, lr), loss=loss, metrics=metrics)
        simulation = Simulation(
            model, self.clients, rounds=int(rounds), plan=FitPlan(int(epochs), int(batch_size), float(lr)),
            strategy=make_strategy(strategy, **strategy_options), test_data=self.server_data,
            logdir=Path(logdir) if logdir is not None else None, progress=progress, fresh_start=True,
            config_summary={"api": "FL_Experiment", "num_clients": self.num_clients, "rounds": int(rounds),
                            "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
                            "strategy": strategy, **strategy_options})
        self.history = simulation.run()
        for record in self.history:
            losses = ", ".join(f"{cid} {series['loss'][-1]:.4f}" for cid, series in record.train_history.items()
                               if series.get("loss") and series["loss"][-1] is not None)
            print(f"round {record.round}: client training loss {losses}")
        test_loss, test_accuracy = simulation.final_metrics
        print(f"Test results: loss {test_loss:.4f}" + (f", accuracy {test_accuracy:.4f}" if test_accuracy is not None else ""))
        return {"loss": test_loss, "accuracy": test_accuracy}
