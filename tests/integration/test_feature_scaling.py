"""Federated feature scaling: before round 1 the sites' per-feature moments are pooled into the
default model's feature scaling, so an unscaled CSV trains; a site's statistics that cannot be true
are refused and the run goes on with the others'."""

import json
from pathlib import Path

import numpy as np
import pytest
import zmq

pytestmark = pytest.mark.integration


def unscaled_csv(path: Path, rows: int = 1500) -> Path:
    """A CSV whose label hangs on a feature near 0.1 beside features in the thousands and tens of thousands."""
    from tests.site_data import write_csv

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    x = np.c_[rng.normal(1000, 300, rows), rng.normal(0.1, 0.02, rows) + 0.03 * (2 * y - 1),
              rng.normal(5, 1, (rows, 2)), rng.normal(2e4, 5e3, rows)]
    return write_csv(path, x.astype(np.float32), y, label_column="diagnosis")


def test_a_simulation_on_an_unscaled_csv_scales_its_features_from_the_sites_and_learns(tmp_path, processes):
    csv = unscaled_csv(tmp_path / "unscaled.csv")
    run = processes.pyfed("simulate", "--clients", "3", "--rounds", "4", "--epochs", "2", "--dataset", f"csv:{csv}",
                          "--label-column", "diagnosis", "--logdir", str(tmp_path / "logs"), "--progress", "false",
                          name="simulate")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    log_text = run.log_path.read_text()
    assert ("feature scaling: the model standardises its 5 features by the pooled mean and variance of 1200 "
            "examples at 3 site(s) (client-1, client-2, client-3)") in log_text
    assert "scales differ" not in log_text  # the model now normalises them: no warning
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] >= 0.9  # unscaled, the same run stays near 0.5


def test_over_the_network_a_site_whose_statistics_cannot_be_true_is_refused_and_the_others_scale_the_model(
        tmp_path, processes):
    from pyfed.wire import protocol
    from pyfed.wire.protocol import Message, MessageType
    from tests.conftest import free_port
    from tests.integration.support import Peer, finish, start_client, start_server

    csv = unscaled_csv(tmp_path / "unscaled.csv")
    shards = tmp_path / "shards"
    partition = processes.pyfed("partition", "--dataset", f"csv:{csv}", "--label-column", "diagnosis",
                                "--clients", "2", "--out", str(shards), name="partition")
    assert processes.wait(partition, 120) == 0, processes.tail(partition)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "3",
                          "--min-fit-clients", "2", "--epochs", "2", "--round-timeout", "120")
    context = zmq.Context()
    try:
        mallory = Peer(context, address)
        mallory.join("mallory", num_examples=100)
        clients = [start_client(processes, shards, address, i) for i in (1, 2)]
        stats = mallory.receive(timeout_s=120)
        assert stats.type is MessageType.STATS and stats.body["kind"] == "features", stats
        mallory.send(protocol.encode(Message(MessageType.MOMENTS, client_id="mallory", body={  # to outweigh the sites
            "count": 10**6, "mean": [1e30] * 5, "m2": [0.0] * 5})))
        refusal = mallory.receive(timeout_s=60)
        assert refusal.type is MessageType.ERROR and "more than the 100 examples" in refusal.body["reason"], refusal
        mallory.leave("mallory")
        finish(processes, server, clients)
    finally:
        context.destroy(linger=0)
    server_log = server.log_path.read_text()
    assert ("dropped client mallory: its moments was refused (its count 1000000 is more than the 100 examples it "
            "may claim)") in server_log
    assert "feature scaling: the model standardises its 5 features by the pooled mean and variance of" in server_log
    assert "at 2 site(s) (site-1, site-2)" in server_log
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] >= 0.85
    for client in clients:
        assert "sent the mean and spread of each of its 5 features" in client.log_path.read_text()
