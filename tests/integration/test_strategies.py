"""Every strategy through the real CLI (one server, three client processes on loopback), with
federated evaluation on; and in-process simulation through ``pyfed simulate`` and FL_Experiment."""

import json
import sys

import pytest

from pyfed.federation.strategy import STRATEGIES
from tests.integration.support import free_port

pytestmark = pytest.mark.integration

# Krum's default f=1 needs 2f+3 = 5 clients; three client processes run it with f=0.
OPTIONS = {"krum": ["--num-byzantine", "0"], "multi-krum": ["--num-byzantine", "0", "--num-selected", "2"],
           "fedprox": ["--proximal-mu", "0.05"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyfed.learning.data import load_dataset, write_partitions

    out = tmp_path_factory.mktemp("shards")
    x, y = load_dataset("digits")
    write_partitions(x, y, out, 3, seed=0, scheme="dirichlet", alpha=1.0)
    return out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_through_server_and_clients(name, shards, tmp_path, processes):
    address, logdir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "logs"
    server = processes.pyfed("server", "--address", address, "--rounds", "2", "--min-clients", "3", "--epochs", "2",
                             "--learning-rate", "0.005", "--test-data", str(shards / "test.npz"),
                             "--logdir", str(logdir), "--strategy", name, "--client-eval-fraction", "0.2",
                             *OPTIONS.get(name, []), name="server")
    clients = [processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{i}.npz"),
                               "--client-id", f"site-{i}", name=f"client-{i}") for i in (1, 2, 3)]
    assert processes.wait(server, 240) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)

    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["strategy"] == name
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert record["clients"] == ["site-1", "site-2", "site-3"]
        federated = record["federated_evaluation"]
        assert set(federated["clients"]) == {"site-1", "site-2", "site-3"}
        sizes = {cid: c["num_examples"] for cid, c in federated["clients"].items()}
        assert federated["num_examples"] == sum(sizes.values()) > 0
        # each client held out a fifth of its shard and trained on the rest
        for cid, held_out in sizes.items():
            assert held_out == int(0.2 * (held_out + record["num_examples"][cid]) + 1e-9) or \
                abs(held_out - 0.2 * (held_out + record["num_examples"][cid])) < 1
        weighted = sum(c["num_examples"] * c["accuracy"] for c in federated["clients"].values()) / federated["num_examples"]
        assert federated["accuracy"] == pytest.approx(weighted)
    final = summary["final"]["test_accuracy"]
    assert final is not None and final > summary["rounds"][0]["test_accuracy"] - 0.1 and final > 0.3
    if name == "fedprox":
        assert "with proximal mu 0.05" in clients[0].log_path.read_text()
    if name in ("krum", "multi-krum"):
        assert f"{name} kept site-" in server.log_path.read_text()


def test_a_strategy_that_needs_more_clients_is_refused_at_start_up(tmp_path, processes):
    server = processes.pyfed("server", "--test-data", str(tmp_path / "missing.npz"), "--strategy", "krum",
                             "--min-clients", "3", name="server")
    assert processes.wait(server, 60) == 2
    assert "needs at least 5 clients per round, but --min-clients / MIN_CLIENTS is 3" in server.log_path.read_text()


def test_simulate_runs_100_clients_on_digits_with_federated_evaluation(tmp_path, processes):
    logdir = tmp_path / "logs"
    run = processes.pyfed("simulate", "--clients", "100", "--rounds", "3", "--epochs", "1", "--dataset", "digits",
                          "--scheme", "dirichlet", "--alpha", "0.5", "--seed", "4", "--strategy", "fedyogi",
                          "--client-eval-fraction", "0.3", "--logdir", str(logdir), name="simulate")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    output = run.log_path.read_text()
    assert "client-100" in output and "simulation finished: 3 rounds" in output
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["strategy"] == "fedyogi"
    assert len(summary["clients"]) == 100
    for record in summary["rounds"]:
        assert len(record["clients"]) == 100
        assert record["federated_evaluation"]["num_examples"] > 0
        assert sum(record["num_examples"].values()) + record["federated_evaluation"]["num_examples"] == 1797 - 359
    from tests.integration.support import run_dir, scalar_steps

    assert scalar_steps(run_dir(logdir) / "server")["federated/accuracy"] == [1, 2, 3]
    assert scalar_steps(run_dir(logdir) / "clients" / "client-100")["round/fit_s"] == [1, 2, 3]


def test_simulate_samples_injects_failures_retries_and_resumes_after_a_stop(tmp_path, processes):
    """The in-process pool runs on the same round engine as the server: sampled clients, injected
    failures, retries below --min-fit-clients, checkpoints; stopped mid-run (SIGTERM), the same
    command resumes after the last completed round and records every round once."""
    import signal

    from tests.integration.support import check_every_round_once

    from pyfed.persistence.store import list_checkpoints

    logdir = tmp_path / "logs"

    def simulate(rounds: int, name: str):
        # each request (a FIT, an upload grant) is lost 20% of the time: a client survives both 64% of the
        # time, and 7 of the 10 sampled answer in about half the attempts: retries happen
        return processes.pyfed("simulate", "--clients", "20", "--rounds", str(rounds), "--epochs", "6", "--dataset",
                               "digits", "--seed", "3", "--fraction-fit", "0.5", "--min-fit-clients", "7",
                               "--drop-rate", "0.2", "--logdir", str(logdir), "--progress", "false", name=name)

    first = simulate(30, "simulate-1")  # more rounds than it can reach before the stop lands
    processes.wait_for_line(first, "round-000003.npz", timeout_s=600)  # round 3's checkpoint (after any retries)
    first.send_signal(signal.SIGTERM)
    assert processes.wait(first, 120) == 0, processes.tail(first)
    assert "stopped (SIGTERM)" in first.log_path.read_text()
    stopped_at = int(list_checkpoints(logdir / "checkpoints")[-1].name[6:12])
    rounds = max(6, stopped_at + 2)  # the same run, resumed with rounds still to go
    second = simulate(rounds, "simulate-2")
    assert processes.wait(second, 600) == 0, processes.tail(second)
    log_text = second.log_path.read_text()
    assert f"resuming from {logdir / 'checkpoints'}/round-{stopped_at:06d}.npz: {stopped_at} of {rounds} rounds " \
           f"completed" in log_text
    summary = check_every_round_once(logdir, rounds)
    for record in summary["rounds"]:
        assert len(record["selected"]) == 10 and len(record["clients"]) >= 7
        assert all(reason == "dropped (simulated failure)" for reason in record["dropped"].values())
    assert any(record["dropped"] for record in summary["rounds"])
    assert any(record["failed_attempts"] for record in summary["rounds"])
    assert summary["final"]["test_accuracy"] > 0.8
    # a simulation writes the trained model as a server does, and the resumed process continued its record
    accuracies = {r["round"]: r["test_accuracy"] for r in summary["rounds"]}
    assert summary["model"]["latest"]["round"] == rounds
    assert summary["model"]["best"]["round"] == max(accuracies, key=lambda r: (accuracies[r], -r))
    assert (logdir / "model" / "latest.keras").is_file() and (logdir / "model" / "best.keras").is_file()


def test_simulate_is_deterministic_in_its_partition_and_refuses_bad_settings(tmp_path, processes):
    bad = processes.pyfed("simulate", "--clients", "3", "--scheme", "shards", "--classes-per-client", "2",
                          "--logdir", str(tmp_path), name="bad")
    assert processes.wait(bad, 60) == 2
    assert "3 clients x 2 classes cannot cover all 10 classes" in bad.log_path.read_text()
    bad = processes.pyfed("simulate", "--strategy", "fedadam", "--tau", "0", name="bad-tau")
    assert processes.wait(bad, 60) == 2
    assert "--tau / TAU: must be a positive number, got '0'" in bad.log_path.read_text()


FL_EXPERIMENT_SCRIPT = """
import numpy as np, tensorflow as tf
from pyfed.experiment import FL_Experiment
from pyfed.learning.data import load_digits

X, y = load_digits()
num_clients = 3
count = len(y) // (num_clients + 1)
clients_data = [X[count * i:count * (i + 1)] for i in range(num_clients)]
clients_target = [y[count * i:count * (i + 1)] for i in range(num_clients)]
server_data, server_target = X[count * num_clients:], y[count * num_clients:]

model = tf.keras.models.Sequential()
model.add(tf.keras.layers.InputLayer((64,)))
model.add(tf.keras.layers.Dense(128, activation="relu"))
model.add(tf.keras.layers.Dense(10, activation="softmax"))
exp = FL_Experiment(num_clients=num_clients, clients_data=clients_data, clients_target=clients_target,
                    server_data=server_data, server_target=server_target)
result = exp.run(model=model, rounds=3, epochs=5, batch_size=32, lr=3e-3, optimizer=tf.optimizers.Adam,
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"], logdir="logs")
assert result["accuracy"] >= 0.85, result
assert np.allclose(model.evaluate(server_data, server_target, verbose=0)[1], result["accuracy"], atol=1e-6)
print("FL_Experiment OK", result)
"""


def test_fl_experiment_runs_the_original_readme_usage(tmp_path, processes):
    script = tmp_path / "experiment.py"
    script.write_text(FL_EXPERIMENT_SCRIPT)
    run = processes.start("experiment", [sys.executable, str(script)], cwd=tmp_path)
    assert processes.wait(run, 300) == 0, processes.tail(run)
    output = run.log_path.read_text()
    assert "FL_Experiment OK" in output and "Test results: loss" in output and "round 3: client training loss" in output
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert summary["config"]["api"] == "FL_Experiment" and len(summary["rounds"]) == 3


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_through_simulate(name, tmp_path, capsys):
    """`pyfed simulate` in this process (the CLI's own entry point, without a new interpreter)."""
    from pyfed.cli import main

    logdir = tmp_path / "logs"
    args = ["simulate", "--clients", "5", "--rounds", "2", "--epochs", "1", "--scheme", "shards",
            "--classes-per-client", "2", "--strategy", name, "--logdir", str(logdir), "--progress", "false",
            *(["--num-byzantine", "1"] if "krum" in name else [])]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["client", "examples"]  # the partition table
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["config"]["strategy"] == name and summary["status"] == "finished"
    assert [len(r["clients"]) for r in summary["rounds"]] == [5, 5]
    assert summary["final"]["test_accuracy"] is not None
