"""Differential privacy end to end: `pyfed simulate` and a server with clients on loopback stop at the
privacy budget, cleanly, and report the epsilon spent every round."""

import json
import re

import pytest

from pyfed.federation.privacy import RoundEvent, epsilon, local_epsilon
from tests.integration.support import free_port, run_dir, scalar_steps, start_server

pytestmark = pytest.mark.integration

DELTA = 1e-5


def target_allowing(rounds: int, population: int, sampled: int, z: float) -> float:
    """A target epsilon between what ``rounds`` and ``rounds + 1`` rounds spend."""
    event = RoundEvent(population, sampled, z)
    return (epsilon([(event, rounds)], DELTA) + epsilon([(event, rounds + 1)], DELTA)) / 2


def test_a_simulation_with_fixed_noise_ends_at_its_budget_and_logs_epsilon_every_round(tmp_path, processes):

    target = target_allowing(3, 20, 5, 1.0)
    logdir = tmp_path / "logs"
    run = processes.pyfed("simulate", "--clients", "20", "--rounds", "8", "--fraction-fit", "0.25", "--epochs", "1",
                          "--dp-noise-multiplier", "1.0", "--dp-target-epsilon", f"{target:.6f}", "--logdir",
                          str(logdir), "--progress", "0", name="simulate")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    log = run.log_path.read_text()
    assert "the target epsilon" in log and "allows 3 of the 8 planned rounds" in log
    assert "ending the run after 3 of 8 rounds: round 4 may not run" in log
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished" and "above the target" in summary["final"]["ended_early"]
    spent = [r["privacy"]["epsilon"] for r in summary["rounds"]]
    assert len(spent) == 3 and spent == sorted(spent) and spent[-1] <= target
    assert spent[-1] == pytest.approx(epsilon([(RoundEvent(20, 5, 1.0), 3)], DELTA), rel=1e-6)
    assert all(len(r["selected"]) == 5 for r in summary["rounds"])
    assert scalar_steps(run_dir(logdir) / "server")["privacy/epsilon"] == [1, 2, 3]


def test_a_server_with_a_target_calibrates_its_noise_and_its_clients_clip_and_noise_their_own_updates(
        tmp_path, processes, shards):
    """Central DP calibrated to a target, with local DP on top: the clients clip and noise their own
    updates, and both the server (the worst client) and each client (its own) report local epsilon."""
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "3", "--min-clients", "3", "--epochs", "2",
                          "--dp-target-epsilon", "50", "--dp-clip-norm", "0.5",
                          "--dp-local-noise-multiplier", "0.05")
    clients = [processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{i}.npz"),
                               "--client-id", f"site-{i}", name=f"site-{i}") for i in (1, 2, 3)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    log = server.log_path.read_text()
    assert "keeps 3 rounds of 3 of 3 clients within epsilon 50" in log
    assert re.search(r"round 1: differential privacy: [0-3] of 3 updates within clip norm", log)
    summary = json.loads((logdir / "summary.json").read_text())
    privacy = [r["privacy"] for r in summary["rounds"]]
    assert len(privacy) == 3 and privacy[-1]["epsilon"] == pytest.approx(50, rel=0.01)
    assert privacy[0]["clip_norm"] == 0.5 and privacy[0]["noise_multiplier"] == pytest.approx(0.5383, rel=1e-3)
    assert summary["config"]["dp_target_epsilon"] == 50
    # local DP, accounted apart: the server's count of each client's noised updates, and the clients' own
    assert "local differential privacy: each client clips its update to 0.5 and adds noise of 0.05 clip norms" in log
    assert [p["local_epsilon"] for p in privacy] == pytest.approx([local_epsilon(0.05, k, DELTA) for k in (1, 2, 3)],
                                                                   rel=1e-5)
    assert scalar_steps(run_dir(logdir) / "server")["privacy/local_epsilon"] == [1, 2, 3]
    for client in clients:
        own = re.findall(r"(\d) noised updates sent \(noise multiplier 0.05\): this site's local epsilon ([\d.e+]+) "
                         r"at delta 1e-05", client.log_path.read_text())
        assert [int(k) for k, _ in own] == [1, 2, 3], client.log_path.read_text()[-2000:]
        assert [float(e) for _, e in own] == pytest.approx([local_epsilon(0.05, k, DELTA) for k in (1, 2, 3)], rel=1e-3)


def test_a_site_with_its_own_local_dp_floor_noises_at_least_that_and_refuses_unclipped_updates(tmp_path, processes,
                                                                                               shards):
    """The server's local noise is only a request: a site with --dp-local-noise-multiplier noises with at
    least its own (and accounts that); facing a server that asks for unclipped updates, it leaves, and
    the server carries on with the others."""
    from tests.integration.support import start_client

    logdir, address = tmp_path / "private", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "2", "--epochs", "1",
                          "--dp-noise-multiplier", "1", "--dp-local-noise-multiplier", "0.05")
    careful = start_client(processes, shards, address, 1, "--dp-local-noise-multiplier", "0.2")
    trusting = start_client(processes, shards, address, 2)
    assert processes.wait(server, 300) == 0, processes.tail(server)
    assert processes.wait(careful, 60) == 0 and processes.wait(trusting, 60) == 0
    assert re.findall(r"(\d) noised updates sent \(noise multiplier ([\d.]+)\)", careful.log_path.read_text()) == [
        ("1", "0.2"), ("2", "0.2")]
    assert re.findall(r"(\d) noised updates sent \(noise multiplier ([\d.]+)\)", trusting.log_path.read_text()) == [
        ("1", "0.05"), ("2", "0.05")]
    own = float(re.findall(r"this site's local epsilon ([\d.e+]+)", careful.log_path.read_text())[-1])
    assert own == pytest.approx(local_epsilon(0.2, 2, DELTA), rel=1e-3)

    logdir, address = tmp_path / "plain", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "2", "--epochs", "1",
                          "--min-fit-clients", "1")
    careful = start_client(processes, shards, address, 1, "--dp-local-noise-multiplier", "0.2", name="careful-2")
    trusting = start_client(processes, shards, address, 2, name="trusting-2")
    assert processes.wait(careful, 120) == 1
    assert "the server asked for an update without clipping, but this site sends only locally private updates " \
           "(--dp-local-noise-multiplier 0.2); not sending it" in careful.log_path.read_text()
    assert processes.wait(server, 300) == 0, processes.tail(server)
    assert processes.wait(trusting, 60) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [["site-2"]]


def _ledger_run(processes, logdir, name: str, *flags: str):
    """``pyfed simulate`` with DP over 10 clients, 5 a round, in ``logdir``."""
    return processes.pyfed("simulate", "--clients", "10", "--fraction-fit", "0.5", "--epochs", "1",
                           "--dp-noise-multiplier", "1.0", "--logdir", str(logdir), "--progress", "0", *flags, name=name)


def _stopped_after(processes, logdir, rounds: int) -> int:
    """A private simulation stopped (SIGTERM) once its checkpoint of ``rounds`` exists; its newest checkpoint."""
    import os
    import signal
    import time

    from pyfed.persistence.store import list_checkpoints

    run = _ledger_run(processes, logdir, "first", "--rounds", "30")
    checkpoint = logdir / "checkpoints" / f"round-{rounds:06d}.npz"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGTERM)
    assert processes.wait(run, 120) == 0, processes.tail(run)
    return int(list_checkpoints(logdir / "checkpoints")[-1].name[6:12])


def test_the_privacy_ledger_never_goes_backwards_past_lost_checkpoints(tmp_path, processes):
    """The review's two cases, through `pyfed simulate` (the server's engine and store): epsilon
    reported 21.4 where the released rounds cost 25.1 after falling back past a corrupt newest
    checkpoint, and a run whose checkpoints were all corrupt started afresh, silently. Now the
    releases are in LOGDIR/privacy-ledger.jsonl: the fall-back is refused until told, then counts
    every release; the lost run is refused until --fresh-start, and the total over both is reported."""
    from pyfed.persistence.ledger import LedgerFile
    from pyfed.persistence.store import list_checkpoints

    def releases(logdir):
        return LedgerFile(logdir / "privacy-ledger.jsonl").releases

    # 1. the newest checkpoint corrupt: resuming behind a released round is refused, each time, until told
    logdir = tmp_path / "fallback"
    newest = _stopped_after(processes, logdir, 3)
    released = len(releases(logdir))
    assert released >= newest >= 3
    list_checkpoints(logdir / "checkpoints")[-1].write_bytes(b"not a checkpoint")
    for attempt in ("refused", "refused-again"):
        run = _ledger_run(processes, logdir, attempt, "--rounds", "30")
        assert processes.wait(run, 120) == 2
        assert f"past the checkpoint of round {newest - 1} being resumed" in run.log_path.read_text()
    run = _ledger_run(processes, logdir, "overridden", "--rounds", str(newest + 1), "--dp-override-ledger")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    summary = json.loads((logdir / "summary.json").read_text())
    true_epsilon = epsilon([(RoundEvent(10, 5, 1.0), released + 2)], DELTA)  # rounds newest and newest + 1 again
    assert len(releases(logdir)) == released + 2
    assert summary["rounds"][-1]["privacy"]["epsilon"] == pytest.approx(true_epsilon, rel=1e-6)
    print(f"\nfell back from round {newest} (released {released}) to {newest - 1}: epsilon reported "
          f"{summary['rounds'][-1]['privacy']['epsilon']:.4g} after {released + 2} releases (true {true_epsilon:.4g}; "
          f"the checkpoint's count alone would give {epsilon([(RoundEvent(10, 5, 1.0), newest + 1)], DELTA):.4g})")

    # 2. every checkpoint corrupt: no silent fresh start; --fresh-start begins a new run, and the total is kept
    logdir = tmp_path / "all-lost"
    _stopped_after(processes, logdir, 2)
    first = len(releases(logdir))
    for path in list_checkpoints(logdir / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    run = _ledger_run(processes, logdir, "lost", "--rounds", "30")
    assert processes.wait(run, 120) == 2
    assert "which did not finish, but no checkpoint of it could be loaded" in run.log_path.read_text()
    run = _ledger_run(processes, logdir, "fresh", "--rounds", "2", "--fresh-start")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    privacy = json.loads((logdir / "summary.json").read_text())["rounds"][-1]["privacy"]
    assert privacy["epsilon"] == pytest.approx(epsilon([(RoundEvent(10, 5, 1.0), 2)], DELTA), rel=1e-6)
    assert privacy["epsilon_all_runs"] == pytest.approx(epsilon([(RoundEvent(10, 5, 1.0), first + 2)], DELTA), rel=1e-6)
    print(f"all checkpoints lost after {first} releases: refused; --fresh-start: this run's epsilon "
          f"{privacy['epsilon']:.4g}, every run's {privacy['epsilon_all_runs']:.4g}")
