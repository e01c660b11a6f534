"""The original PyFed API (``FL_Server``, ``FL_Client``), kept so its example scripts run unchanged.

Both classes are thin wrappers over :class:`pyfed.federation.server.Server` and :class:`pyfed.federation.client.Client`,
so the original scripts get the ZeroMQ transport, streaming FedAvg and TensorBoard logging too.
Differences from the original: ``train()`` returns when the run is over instead of blocking on a
TensorBoard server (pass ``serve_tensorboard=True`` for the old behaviour), and the model travels
as JSON + raw arrays, so it must be built from Keras's own layers. Each ``train()`` starts a new run,
as the original did; the server still checkpoints every round, and ``resume=True`` continues an
interrupted run from its last checkpoint.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.federation.client import Client, ClientError
from pyfed.learning.data import check_examples
from pyfed.learning.model import compile_default, wire_model
from pyfed.federation.server import Server
from pyfed.wire.protocol import FitPlan

log = logging.getLogger("pyfed")


def ensure_logging() -> None:
    """Scripts written for the original PyFed configure no logging: show PyFed's progress lines."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")


def make_optimizer(optimizer: Any, lr: float) -> Any:
    """The original API passes an optimizer class (``tf.optimizers.Adam``) and a learning rate."""
    if isinstance(optimizer, type) or (callable(optimizer) and not hasattr(optimizer, "apply")):
        return optimizer(learning_rate=lr)
    return optimizer


class FL_Server:  # noqa: N801 - the original API's name
    """The federated server of the original API: ``FL_Server(model, num_clients, rounds).train()``."""

    def __init__(self, curr_model: Any, num_clients: int, rounds: int, port: int = 54321,
                 multi_system: bool = False, *, logdir: str | Path = "logs", serve_tensorboard: bool = False,
                 tensorboard_port: int = 6006, epochs: int = 1, batch_size: int = 32, resume: bool = False):
        ensure_logging()
        self.curr_model = curr_model
        self.num_clients = int(num_clients)
        self.rounds = int(rounds)
        self.port = int(port)
        self.multi_system = multi_system
        self.logdir = Path(logdir)
        self.serve_tensorboard = serve_tensorboard
        self.tensorboard_port = tensorboard_port
        self.plan = FitPlan(epochs=epochs, batch_size=batch_size)
        self.resume = resume
        self.history: list = []

    @property
    def address(self) -> str:
        host = "*" if self.multi_system else "127.0.0.1"
        return f"tcp://{host}:{self.port}"

    def train(self) -> None:
        """Run every round with ``num_clients`` clients; afterwards ``curr_model`` holds the global model."""
        if getattr(self.curr_model, "optimizer", None) is None:
            compile_default(self.curr_model, self.plan.learning_rate)
        server = Server(wire_model(self.curr_model), address=self.address, rounds=self.rounds,
                        min_clients=self.num_clients, plan=self.plan, logdir=self.logdir, fresh_start=not self.resume,
                        config_summary={"api": "FL_Server", "num_clients": self.num_clients,
                                        "rounds": self.rounds, "address": self.address})
        self.history = server.run()
        self.curr_model.set_weights(server.weights)
        if self.serve_tensorboard:
            log.info("serving TensorBoard for %s on port %d (Ctrl-C to stop)", self.logdir, self.tensorboard_port)
            subprocess.run([sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir),
                            "--port", str(self.tensorboard_port), "--bind_all"], check=False)

    def test(self, data: np.ndarray, target: np.ndarray, loss: Any, optimizer: Any, lr: float,
             metrics: list[Any]) -> dict[str, float]:
        """Evaluate the global model on (data, target), print the loss and accuracy, and return them."""
        x, y = check_examples(np.asarray(data), np.asarray(target), "FL_Server.test data")
        self.curr_model.compile(loss=loss, optimizer=make_optimizer(optimizer, lr), metrics=metrics)
        results = self.curr_model.evaluate(x, y, verbose=0, return_dict=True)
        print("Test results: " + ", ".join(f"{name} {value:.4f}" for name, value in results.items()))
        return {name: float(value) for name, value in results.items()}


class FL_Client:  # noqa: N801 - the original API's name
    """A client of the original API: ``FL_Client(name, data, target).train(epochs, batch_size, ...)``."""

    def __init__(self, name: str, data: np.ndarray, target: np.ndarray, server_ip: str = "127.0.0.1",
                 server_port: int = 54321):
        ensure_logging()
        self.name = name
        self.data, self.target = check_examples(np.asarray(data), np.asarray(target), f"client {name}'s data")
        self.server_ip = server_ip
        self.server_port = int(server_port)

    def train(self, epochs: int, batch_size: int, lr: float, loss: Any, optimizer: Any, metrics: list[Any]) -> None:
        """Take part in every round, training with these settings; return when the server is done."""
        client = Client(f"tcp://{self.server_ip}:{self.server_port}", self.data, self.target,
                        client_id=self.name, epochs=int(epochs), batch_size=int(batch_size),
                        compile_override={"loss": loss, "optimizer": make_optimizer(optimizer, lr), "metrics": metrics},
                        data_source=f"client {self.name}'s data")
        status = client.run()
        if status != 0:
            raise ClientError(f"client {self.name} could not complete the run (see the log above)")
