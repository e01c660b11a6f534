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

import pytest

from pyfed.persistence.store import list_checkpoints
from tests.integration.support import (check_every_round_once, free_port, freeze_mid_training, run_dir,
                                       scalar_steps, seconds_until, start_client, start_server, three_clients)

pytestmark = pytest.mark.integration


def test_killed_client_is_dropped_at_once_round_is_retried_and_the_restarted_client_rejoins(
        tmp_path, processes, shards):
    """SIGKILL one of three clients mid-round with --min-fit-clients 3: the server notices within
    seconds, retries the round, and the client restarted with the same id takes part in it. The
    client is stopped mid-training before it is killed (freeze_mid_training): it cannot have sent its
    update first, however fast the machine."""
    rounds = 4
    logdir, address, server, clients = three_clients(processes, shards, tmp_path, rounds=rounds, min_fit_clients=3)
    killed_in = freeze_mid_training(processes, clients[3], (2, 3))
    os.kill(clients[3].pid, signal.SIGKILL)
    detection_s = seconds_until(server, "client site-3 dropped: connection lost")
    print(f"\nSIGKILLed client detected in {detection_s:.2f}s (round {killed_in})")
    assert detection_s < 5
    processes.wait_for_line(server, f"round {killed_in} attempt 1 failed")
    restarted = start_client(processes, shards, address, 3, name="site-3-restarted")
    processes.wait_for_line(server, "client site-3 rejoined")
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in (clients[1], clients[2], restarted):
        assert processes.wait(client, 60) == 0, processes.tail(client)

    summary = check_every_round_once(logdir, rounds)
    hit = summary["rounds"][killed_in - 1]
    assert [a["dropped"] for a in hit["failed_attempts"]] == [
        {"site-3": "connection lost (closed, or no heartbeat for 10s)"}]
    assert hit["failed_attempts"][0]["answered"] == ["site-1", "site-2"]
    assert hit["clients"] == ["site-1", "site-2", "site-3"]  # the retry included the restarted client
    assert f"round {killed_in}/{rounds} (attempt 2) finished" in server.log_path.read_text()


def test_stalled_client_is_dropped_by_heartbeat_and_an_id_conflict_waits_for_the_slot(tmp_path, processes, shards):
    """A second live process claiming a connected client's id is refused and retries with backoff.
    SIGSTOP the original mid-round: its missed heartbeats drop it (~10 s), the round goes on with
    the other two, and the waiting twin takes the slot. The stalled original, resumed, finds its id
    taken and exits 1. SIGTERM on a client makes it leave cleanly.

    The twin is refused *before* the original is stopped: a new process needs seconds to import
    TensorFlow on a loaded machine, and it must not arrive only after the heartbeat drop."""
    rounds = 8  # the stall, the twin's return and the SIGTERM all fall before the last round, on a fast machine too
    logdir, address, server, clients = three_clients(processes, shards, tmp_path, rounds=rounds, min_fit_clients=2,
                                                     epochs=80)  # rounds outlast the twin's join backoff (5 s)
    processes.wait_for_line(clients[3], "joined as site-3")
    twin = start_client(processes, shards, address, 3, name="site-3-twin")
    processes.wait_for_line(twin, "[id_taken]")
    deadline = time.monotonic() + 120  # stop the original while it trains (its last line says so)
    while not clients[3].log_path.read_text().rstrip().endswith(": training") and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(clients[3].pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    seconds_until(server, "client site-3 dropped: connection lost", timeout_s=40)
    detection_s = time.monotonic() - stopped_at
    print(f"\nstalled (SIGSTOPped) client detected in {detection_s:.1f}s")
    assert detection_s < 16
    processes.wait_for_line(server, "client site-3 rejoined", timeout_s=60)  # the twin, after its backoff
    os.kill(clients[3].pid, signal.SIGCONT)  # the stalled original comes back and finds its id taken
    assert processes.wait(clients[3], 120) == 1
    assert "gave this client's id to another client" in clients[3].log_path.read_text()

    # SIGTERM site-2 while it trains a round before the last two: the run cannot end without its answer
    # or its leave, and the twin trains after it. (Waiting for "round 3/4 started" raced the run's end:
    # on a fast machine rounds 3 and 4 were done while the stalled original still found its id taken.)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        training = re.search(r"round (\d+): training$", clients[2].log_path.read_text().rstrip())
        if training and int(training.group(1)) < rounds - 1:
            break
        assert clients[2].poll() is None, "site-2 ended before it could be stopped: " + processes.tail(clients[2])
        time.sleep(0.02)
    else:
        raise AssertionError("site-2 never trained a round before the last: " + processes.tail(clients[2]))
    os.kill(clients[2].pid, signal.SIGTERM)
    assert processes.wait(clients[2], 60) == 0
    assert "stopping (SIGTERM); told the server" in clients[2].log_path.read_text()
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in (clients[1], twin):
        assert processes.wait(client, 60) == 0, processes.tail(client)

    server_log = server.log_path.read_text()
    assert "client site-2 dropped: left (SIGTERM)" in server_log
    summary = check_every_round_once(logdir, rounds)
    stalled = re.search(r"round (\d): dropped client site-3 before its update: connection lost", server_log)
    assert stalled, server_log  # the original was stopped while training (round 1, or later if the twin was slow)
    stalled_number = int(stalled.group(1))
    stalled_round = summary["rounds"][stalled_number - 1]
    assert len(stalled_round["clients"]) >= 2 and not stalled_round["failed_attempts"]
    if "site-3" in stalled_round["clients"]:  # the twin joined while the round still waited: it was sent the FIT
        assert f"round {stalled_number}: client site-3 is back; sent its FIT again" in server_log
    else:
        assert stalled_round["dropped"]["site-3"].startswith("connection lost")
    assert "site-3" in summary["rounds"][-1]["clients"]  # the twin trained in the last rounds


def test_server_survives_sigterm_and_sigkill_and_resumes_with_every_round_once(tmp_path, processes, shards):
    """SIGTERM the server mid-run (it tells the clients, which wait), start it again with the same
    command; SIGKILL it mid-run, start it again: it resumes after the last completed round each
    time, the same client processes carry on, and every round is recorded exactly once."""
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    args = ("--rounds", "5", "--min-clients", "3", "--epochs", "10", "--keep-checkpoints", "2")
    server = start_server(processes, shards, logdir, address, *args, name="server-1")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]

    stopped_in = freeze_mid_training(processes, clients[0], (2, 3))  # the round cannot end before the SIGTERM
    os.kill(server.pid, signal.SIGTERM)
    assert processes.wait(server, 60) == 0, processes.tail(server)
    os.kill(clients[0].pid, signal.SIGCONT)
    assert f"stopped (SIGTERM) after {stopped_in - 1} completed rounds" in server.log_path.read_text()
    for client in clients:  # an idle client also reads the server's STOPPING notice; a training one cannot
        processes.wait_for_line(client, "lost the connection to the server")

    server = start_server(processes, shards, logdir, address, *args, name="server-2")
    assert "resuming from" in server.log_path.read_text()
    assert f"{stopped_in - 1} of 5 rounds completed" in server.log_path.read_text()
    processes.wait_for_line(server, "round-000003.npz")  # round 3's checkpoint, written while round 4 trains
    os.kill(server.pid, signal.SIGKILL)
    processes.wait(server, 30)
    killed_after = max(int(n) for n in re.findall(r"round checkpoint written: .*round-(\d+)\.npz",
                                                   server.log_path.read_text()))
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
        assert scalar_steps(run_dir(logdir) / "clients" / client_id)["round/loss"] == [1, 2, 3, 4, 5]


def test_sigterm_tells_idle_clients_which_wait_and_rejoin(tmp_path, processes, shards):
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "3", "--epochs", "1")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    for client_id in ("site-1", "site-2"):  # only admitted clients are told; a JOIN still queued is not
        processes.wait_for_line(server, f"client {client_id} joined")
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


def test_checkpoints_from_another_run_are_refused_corrupt_ones_skipped_and_fresh_start_archives(tmp_path, caplog):
    """Open the server's run in-process on a crafted checkpoint directory."""
    from pyfed.federation.server import Server
    from pyfed.federation.strategy import FedAvg, FedAvgM
    from pyfed.learning.model import default_model, wire_model
    from pyfed.persistence.files import CheckpointMismatch
    from pyfed.persistence.store import checkpoint_path
    from pyfed.wire.protocol import FitPlan

    checkpoints = tmp_path / "logs/checkpoints"

    def server(strategy=None, units=10, **kwargs) -> Server:
        model = default_model((64,), units, 0.001)
        return Server(wire_model(model), address="tcp://127.0.0.1:0", rounds=3, min_clients=1, plan=FitPlan(),
                      strategy=strategy or FedAvg(), logdir=tmp_path / "logs", **kwargs)

    def opened(**kwargs) -> Server:
        instance = server(**kwargs)
        instance.open()
        instance._close()
        return instance

    first = server()
    first.store.save(first.engine.snapshot())  # an honest checkpoint after 0 rounds (well-formed)
    with pytest.raises(CheckpointMismatch, match="different strategy"):
        server(FedAvgM()).run()
    with pytest.raises(CheckpointMismatch, match="different model"):
        server(units=12).run()
    assert list_checkpoints(checkpoints) == [checkpoint_path(checkpoints, 0)]  # a mismatch is not touched

    newest = checkpoint_path(checkpoints, 1)
    first.engine.completed_rounds = 1
    first.store.save(first.engine.snapshot())  # round 1's record is missing: a checkpoint that does not add up
    inconsistent = newest.read_bytes()
    for corrupt in (inconsistent, inconsistent[: len(inconsistent) // 2], b"not a zip file",
                    inconsistent.replace(b"pyfed-state/1", b"pyfed-state/9")):
        newest.write_bytes(corrupt)
        caplog.clear()
        resumed = opened()  # falls back to round 0's checkpoint, keeps the bad one aside
        assert resumed.completed_rounds == 0 and resumed.history == [] and resumed.run_log.rounds == []
        assert f"skipped a checkpoint that does not load ({newest}" in caplog.text
        assert newest.with_name("round-000001.npz.corrupt").exists() and not newest.exists()
        newest.with_name("round-000001.npz.corrupt").unlink()
        if corrupt is inconsistent:
            assert "round 1 does not match its history of 0 rounds" in caplog.text

    fresh = opened(fresh_start=True, min_fit_clients=1)
    assert fresh.completed_rounds == 0
    assert not list_checkpoints(checkpoints)
    assert len(list((tmp_path / "logs/archive").glob("*/checkpoints/round-000000.npz"))) == 1
