"""Secure aggregation end to end in a simulation: the same model as plain FedAvg within the
quantisation error, and clients lost at any stage either survived or the attempt retried."""

import keras
import numpy as np
import pytest

from pyfed.federation.secure_aggregation import SecureAggregation
from pyfed.federation.simulation import Simulation
from pyfed.learning.data import load_dataset, split_dataset
from pyfed.learning.model import default_model
from pyfed.wire.protocol import FitPlan

pytestmark = pytest.mark.integration


def simulate(secure_aggregation, clients=5, rounds=2, drop_rate=0.0):
    x, y = load_dataset("digits")
    shards, test = split_dataset(x, y, clients, seed=0)
    keras.utils.set_random_seed(0)
    model = default_model((64,), 10, 0.003)
    history = Simulation(model, shards, rounds=rounds, plan=FitPlan(1, 32, 0.003), test_data=test, seed=0,
                         progress=False, drop_rate=drop_rate, min_fit_clients=2,
                         secure_aggregation=secure_aggregation).run()
    return history, model.get_weights()


def test_a_securely_aggregated_simulation_ends_where_plain_fedavg_does():
    plain_history, plain = simulate(None)
    secure_history, secure = simulate(SecureAggregation(clip=1.0, quantisation_bits=24))
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, secure)) < 1e-5
    assert [r.clients for r in secure_history] == [r.clients for r in plain_history]


def test_clients_lost_at_any_stage_are_survived_or_the_attempt_retried():
    history, weights = simulate(SecureAggregation(clip=1.0), clients=8, rounds=3, drop_rate=0.08)
    assert [r.round for r in history] == [1, 2, 3]
    assert all(len(r.clients) >= 2 for r in history)
    assert all(np.isfinite(w).all() for w in weights)
    assert history[-1].test_accuracy > 0.5
    lost = [reason for r in history for reason in r.dropped.values()]
    assert lost and all("simulated failure" in reason for reason in lost), lost


def test_a_networked_server_aggregates_securely_and_learns(tmp_path, processes, shards):
    import json

    from tests.integration.support import free_port, start_client, start_server

    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "3", "--epochs", "5",
                          "--secure-aggregation", "--secagg-clip", "2")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    log = server.log_path.read_text()
    assert log.count("secure aggregation: the weighted sum of 3 updates") == 2
    assert "update from" not in log  # no individual update ever reached the server
    summary = json.loads((logdir / "summary.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [["site-1", "site-2", "site-3"]] * 2
    assert summary["rounds"][-1]["test_accuracy"] > 0.6
