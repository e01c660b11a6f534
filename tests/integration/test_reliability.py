"""Faults on loopback with real processes: SIGKILL, SIGSTOP, SIGTERM of clients and of the server.

Each test measures what the issue asks for (how long detection took, rounds lost) and asserts
that summary.json and TensorBoard show every round exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pyfed.checkpoint import list_checkpoints
from tests.conftest import free_port
from tests.integration.test_federation import scalar_steps

pytestmark = pytest.mark.integration


def start_server(processes, shards: Path, logdir: Path, address: str, *args: str, name: str = "server"):
    server = processes.pyfed("server", "--address", address, "--test-data", str(shards / "test.npz"),
                             "--logdir", str(logdir), *args, name=name)
    processes.wait_for_line(server, "listening on")
    return server


def start_client(processes, shards: Path, address: str, index: int, *args: str, name: str | None = None):
    return processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{index}.npz"),
                           "--client-id", f"site-{index}", *args, name=name or f"site-{index}")


def three_clients(processes, shards: Path, tmp_path: Path, rounds: int, min_fit_clients: int, epochs: int = 20):
    """A server waiting for three clients and the three clients (site-1..3)."""
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", str(rounds), "--min-clients", "3",
                          "--min-fit-clients", str(min_fit_clients), "--epochs", str(epochs))
    return logdir, address, server, {i: start_client(processes, shards, address, i) for i in (1, 2, 3)}


def seconds_until(process, text: str, timeout_s: float = 60) -> float:
    """Seconds from now until ``text`` appears in the process's log."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if text in process.log_path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen in {process.log_path.name} within {timeout_s}s")


def check_every_round_once(logdir: Path, rounds: int) -> dict:
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
    steps = scalar_steps(logdir / "server")
    for tag in ("test/accuracy", "round/participants"):
        assert steps[tag] == list(range(1, rounds + 1)), (tag, steps[tag])
    return summary


def test_killed_client_is_dropped_at_once_round_is_retried_and_the_restarted_client_rejoins(
        tmp_path, processes, shards):
    """SIGKILL one of three clients mid-round with --min-fit-clients 3: the server notices within
    seconds, retries the round, and the client restarted with the same id takes part in it."""
    logdir, address, server, clients = three_clients(processes, shards, tmp_path, rounds=3, min_fit_clients=3)
    processes.wait_for_line(server, "round 2/3 started")
    processes.wait_for_line(clients[3], "joined as site-3")
    time.sleep(0.5)  # site-3 is training now
    os.kill(clients[3].pid, signal.SIGKILL)
    detection_s = seconds_until(server, "client site-3 dropped: connection lost")
    print(f"\nSIGKILLed client detected in {detection_s:.2f}s")
    assert detection_s < 5
    processes.wait_for_line(server, "round 2 attempt 1 failed")
    restarted = start_client(processes, shards, address, 3, name="site-3-restarted")
    processes.wait_for_line(server, "client site-3 rejoined")
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in (clients[1], clients[2], restarted):
        assert processes.wait(client, 60) == 0, processes.tail(client)

    summary = check_every_round_once(logdir, 3)
    second = summary["rounds"][1]
    assert [a["dropped"] for a in second["failed_attempts"]] == [
        {"site-3": "connection lost (closed, or no heartbeat for 10s)"}]
    assert second["failed_attempts"][0]["answered"] == ["site-1", "site-2"]
    assert second["clients"] == ["site-1", "site-2", "site-3"]  # the retry included the restarted client
    assert "round 2/3 (attempt 2) finished" in server.log_path.read_text()


def test_stalled_client_is_dropped_by_heartbeat_and_an_id_conflict_waits_for_the_slot(tmp_path, processes, shards):
    """SIGSTOP a client mid-round: its missed heartbeats drop it (~10 s) and the round goes on with
    the other two. A second live process claiming the stalled client's id is refused and retries
    with backoff until the stalled one is gone; then it takes the slot. SIGTERM on a client makes
    it leave cleanly."""
    logdir, address, server, clients = three_clients(processes, shards, tmp_path, rounds=4, min_fit_clients=2,
                                                     epochs=80)  # rounds outlast the twin's join backoff (5 s)
    processes.wait_for_line(server, "round 1/4 started")
    processes.wait_for_line(clients[3], "joined as site-3")
    time.sleep(0.5)
    os.kill(clients[3].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    twin = start_client(processes, shards, address, 3, name="site-3-twin")
    processes.wait_for_line(twin, "[id_taken]")
    seconds_until(server, "client site-3 dropped: connection lost", timeout_s=40)
    detection_s = time.monotonic() - stopped_at
    print(f"\nstalled (SIGSTOPped) client detected in {detection_s:.1f}s")
    assert detection_s < 16
    processes.wait_for_line(server, "client site-3 rejoined", timeout_s=60)  # the twin, after its backoff
    os.kill(clients[3].pid, signal.SIGCONT)  # the stalled original comes back and finds its id taken
    assert processes.wait(clients[3], 120) == 1
    assert "gave this client's id to another client" in clients[3].log_path.read_text()

    processes.wait_for_line(server, "round 3/4 started")
    os.kill(clients[2].pid, signal.SIGTERM)
    assert processes.wait(clients[2], 60) == 0
    assert "stopping (SIGTERM); told the server" in clients[2].log_path.read_text()
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in (clients[1], twin):
        assert processes.wait(client, 60) == 0, processes.tail(client)

    server_log = server.log_path.read_text()
    assert "client site-2 dropped: left (SIGTERM)" in server_log
    summary = check_every_round_once(logdir, 4)
    stalled_round = next(r for r in summary["rounds"] if "site-3" in r["dropped"])
    assert stalled_round["dropped"]["site-3"].startswith("connection lost")
    assert len(stalled_round["clients"]) >= 2 and not stalled_round["failed_attempts"]
    assert "site-3" in summary["rounds"][-1]["clients"]  # the twin trained in the last rounds


def test_server_survives_sigterm_and_sigkill_and_resumes_with_every_round_once(tmp_path, processes, shards):
    """SIGTERM the server mid-run (it tells the clients, which wait), start it again with the same
    command; SIGKILL it mid-run, start it again: it resumes after the last completed round each
    time, the same client processes carry on, and every round is recorded exactly once."""
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    args = ("--rounds", "5", "--min-clients", "3", "--epochs", "10", "--keep-checkpoints", "2")
    server = start_server(processes, shards, logdir, address, *args, name="server-1")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]

    processes.wait_for_line(server, "round 2/5 started")
    os.kill(server.pid, signal.SIGTERM)
    assert processes.wait(server, 60) == 0, processes.tail(server)
    assert "stopped (SIGTERM) after 1 completed rounds" in server.log_path.read_text()
    for client in clients:  # an idle client also reads the server's STOPPING notice; a training one cannot
        processes.wait_for_line(client, "lost the connection to the server")

    server = start_server(processes, shards, logdir, address, *args, name="server-2")
    assert "resuming from" in server.log_path.read_text() and "1 of 5 rounds completed" in server.log_path.read_text()
    processes.wait_for_line(server, "round 4/5 started")
    killed_after = len(re.findall(r"round \d/5 finished", server.log_path.read_text())) + 1
    os.kill(server.pid, signal.SIGKILL)
    processes.wait(server, 30)
    started = time.monotonic()
    server = start_server(processes, shards, logdir, address, *args, name="server-3")
    processes.wait_for_line(server, f"round {killed_after + 1}/5 started", timeout_s=120)
    print(f"\nserver restarted after SIGKILL was running round {killed_after + 1} again "
          f"{time.monotonic() - started:.1f}s later")
    assert f"{killed_after} of 5 rounds completed" in server.log_path.read_text()
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:  # the very same client processes, never restarted
        assert processes.wait(client, 60) == 0, processes.tail(client)
        assert "rejoining as" in client.log_path.read_text()

    summary = check_every_round_once(logdir, 5)
    assert summary["final"]["test_accuracy"] >= 0.9
    assert all(r["clients"] == ["site-1", "site-2", "site-3"] for r in summary["rounds"])
    assert len(list_checkpoints(logdir / "checkpoints")) == 2  # --keep-checkpoints
    for client_id in ("site-1", "site-2", "site-3"):
        assert scalar_steps(logdir / "clients" / client_id)["round/loss"] == [1, 2, 3, 4, 5]


def test_sigterm_tells_idle_clients_which_wait_and_rejoin(tmp_path, processes, shards):
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "3", "--epochs", "1")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    processes.wait_for_line(server, "client site-2 joined")
    os.kill(server.pid, signal.SIGTERM)
    assert processes.wait(server, 60) == 0
    for client in clients:
        processes.wait_for_line(client, "the server is stopping (SIGTERM); waiting for it to come back")
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "3",
                          "--epochs", "1", name="server-2")
    clients.append(start_client(processes, shards, address, 3))
    assert processes.wait(server, 120) == 0, processes.tail(server)
    assert all(processes.wait(client, 60) == 0 for client in clients)
    assert json.loads((logdir / "summary.json").read_text())["rounds"][0]["clients"] == ["site-1", "site-2", "site-3"]


def test_checkpoints_that_are_corrupt_or_from_another_run_are_refused_and_fresh_start_archives(tmp_path):
    """Run the server in-process on a crafted checkpoint directory."""
    from pyfed.checkpoint import CheckpointError, checkpoint_path
    from pyfed.model import default_model
    from pyfed.server import Server
    from pyfed.strategy import FedAvg, FedAvgM, FitPlan

    def server(strategy=None, units=10, **kwargs):
        model = default_model((64,), units, 0.001)
        return Server(model, address="tcp://127.0.0.1:0", rounds=3, min_clients=1, plan=FitPlan(),
                      strategy=strategy or FedAvg(), logdir=tmp_path / "logs", **kwargs)

    first = server()
    first.completed_rounds = 1
    first.history = []  # round 1's record is missing: a checkpoint that does not add up
    first._checkpoint()
    with pytest.raises(CheckpointError, match="round 1 does not match its history of 0 rounds"):
        server().run()

    first.completed_rounds = 0
    first._checkpoint()  # an honest checkpoint after 0 rounds (well-formed)
    (tmp_path / "logs/checkpoints/round-000001.npz").unlink()
    with pytest.raises(CheckpointError, match="different strategy"):
        server(FedAvgM()).run()
    with pytest.raises(CheckpointError, match="different model"):
        server(units=12).run()

    path = checkpoint_path(tmp_path / "logs/checkpoints", 0)
    original = path.read_bytes()
    for corrupt in (original[: len(original) // 2], b"not a zip file", original.replace(b"pyfed-state/1", b"pyfed-state/9")):
        path.write_bytes(corrupt)
        refused = server()
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            refused.run()
        assert refused.completed_rounds == 0 and refused.history == []  # nothing half-loaded

    fresh = server(fresh_start=True, min_fit_clients=1)
    fresh._open_run()
    assert fresh.completed_rounds == 0
    assert not list_checkpoints(tmp_path / "logs/checkpoints")
    assert len(list((tmp_path / "logs/archive").glob("*/checkpoints/round-000000.npz"))) == 1
    fresh.transport.close()
