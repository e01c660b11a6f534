"""Many clients: 1,000 protocol-level clients in one process against one ``pyfed server`` process.

The clients are numpy only (no TensorFlow): each holds its own DEALER socket, joins, and answers
every FIT with the global weights plus a small perturbation, sent once the server grants it an
upload slot (UPLOAD_READY / UPLOAD_GRANT), as clients do. The server is the real CLI server
with a ~100k-parameter model (bench/seed_model.py:build_small), 3 rounds. Reported: time per round
(from summary.json), the server's peak RSS and CPU seconds (from wait4), and whether every update
was aggregated in every round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH, ProtocolClients, emit, finish, free_port, median, start, synthetic_data, table, tail
from pyfed.wire.protocol import MessageType


def run_clients(address: str, count: int, timeout_s: float) -> dict:
    """Drive ``count`` clients from this thread until the server finishes them all."""
    clients = ProtocolClients(address, count, num_examples=lambda i: 10 + i % 90)
    updates_sent = 0
    held: dict[int, tuple[int, dict, list]] = {}  # each client's update, until the server grants it a slot
    deadline = time.monotonic() + timeout_s
    try:
        while len(clients.finished) < count and time.monotonic() < deadline:
            for i, message in clients.poll(200):
                if message.type is MessageType.FIT:  # train (a small change), then ask for an upload slot
                    delta = np.float32(1e-4 * ((i % 7) - 3))
                    body = {"attempt": message.body["attempt"], "num_examples": 10 + i % 90, "fit_s": 0.001,
                            "history": {"loss": [0.5]}}
                    held[i] = (message.round, body, [a + delta for a in message.arrays])
                    clients.send(i, "upload_ready", round=message.round, deadline=deadline,
                                 body={"attempt": body["attempt"], "bytes": sum(a.nbytes for a in held[i][2])})
                elif message.type is MessageType.UPLOAD_GRANT:
                    server_round, body, arrays = held.pop(i)
                    clients.send(i, "update", round=server_round, body=body, arrays=arrays, deadline=deadline)
                    updates_sent += 1
    finally:
        clients.close()
    return {"joined": len(clients.client_ids), "finished": len(clients.finished), "updates_sent": updates_sent}


def run(quick: bool = False) -> dict:
    count = 50 if quick else 1000
    rounds = 3
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        x, y = synthetic_data(200, seed=7)
        np.savez(workdir / "test.npz", x=x, y=y)
        address = f"tcp://127.0.0.1:{free_port()}"
        server = start([sys.executable, "-m", "pyfed", "server", "--address", address, "--rounds", str(rounds),
                        "--min-clients", str(count), "--model", f"{BENCH / 'seed_model.py'}:build_small",
                        "--test-data", str(workdir / "test.npz"), "--logdir", str(workdir / "logs"),
                        "--log-level", "WARNING"], workdir / "server.log")
        started = time.monotonic()
        clients = run_clients(address, count, timeout_s=1800)
        clients_s = time.monotonic() - started
        server_done = finish(server, 300)
        assert server_done.returncode == 0, tail(server.log_path)
        summary = json.loads((workdir / "logs" / "summary.json").read_text())
    per_round = [r["duration_s"] for r in summary["rounds"]]
    all_aggregated = all(len(r["clients"]) == count for r in summary["rounds"])
    result = {"clients": count, "rounds": rounds, "round_s": per_round, "median_round_s": median(per_round),
              "all_updates_aggregated": all_aggregated, "server_peak_rss_mb": server_done.peak_rss_mb,
              "server_cpu_s": server_done.cpu_s, "whole_run_s": clients_s, **clients,
              "model_parameters": 101_770}
    markdown = table(f"Many clients: {count} protocol-level clients (one process) against one server process, "
                     f"101,770-parameter model, {rounds} rounds",
                     ["round", "seconds", "updates aggregated"],
                     [[r["round"], r["duration_s"], len(r["clients"])] for r in summary["rounds"]])
    markdown += (f"\nServer peak RSS {server_done.peak_rss_mb:.0f} MB, server CPU {server_done.cpu_s:.1f} s for the "
                 f"whole run (joins included); every update aggregated in every round: {all_aggregated}.\n")
    emit("many_clients", result, markdown)
    return {**result, "_markdown": markdown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
