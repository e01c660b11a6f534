"""Server memory while many clients upload at once: N protocol-level clients send a large model's
update at the same moment; how far the server's RSS rises above its level just before, in model
copies, and how long the round takes.

The server is the real CLI server (``pyfed server``, its defaults) with a Dense model from
``bench/seed_model.py`` (``build_large``: 50M parameters, 200 MB; ``--huge``: ``build_huge``, 240M
parameters, 960 MB). The clients are numpy only, in this process: each joins, and when every one of
them holds its FIT they all answer at once with the global weights plus a small change (one shared
array, sent zero-copy by each). Where the server grants upload slots (UPLOAD_READY / UPLOAD_GRANT,
federation/uploads.py) they ask first and send large updates in chunks (wire/chunks.py), as clients
do; a server without them (an older checkout) gets whole UPDATEs at once. A thread reads the server's RSS from /proc every 5 ms.

Reported per N: the server's RSS as round 1's uploads begin (its idle level: the model loaded and
sent, nothing received), its peak from then to the end of the run, the rise in model copies, the
rise over the N=2 rise, and the round's duration from summary.json (the median over the rounds).
``--server-args`` adds server flags: with ``--dp-noise-multiplier`` the rounds are differentially
private (each update clipped and summed, the sum noised), the aggregation the memory plan must hold too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH, ProtocolClients, emit, finish, free_port, machine, median, start, tail, table
from pyfed.wire import protocol
from pyfed.wire.protocol import Message, MessageType

GRANTS = hasattr(MessageType, "UPLOAD_READY")  # this checkout's server grants upload slots
CHUNKS = hasattr(protocol, "encode_update")  # and takes large updates in chunks
KEEP_LOGS = os.environ.get("BENCH_KEEP_LOGS")  # a directory to copy each server's log to
FIT_WAIT_S = 5.0  # the clients asked in a round (all N, unless one was lost) hold their FIT within this


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """The RSS of one process every ``interval_s``, with the time of each sample."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = rss_bytes(self.pid)
            if rss is None:
                return
            self.samples.append((time.monotonic(), rss))

    def at(self, when: float) -> int:
        """The last sample at or before ``when``."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else self.samples[0][1]

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def run_clients(address: str, count: int, timeout_s: float) -> dict:
    """``count`` clients; returns, per round, when the uploads began and when the round's FIT (or the
    FINISH) after it arrived."""
    clients = ProtocolClients(address, count, io_threads=2)
    fits: dict[int, Message] = {}
    update: list[np.ndarray] | None = None
    upload_started: dict[int, float] = {}  # round -> when every client had its FIT and the uploads began
    first_fit: dict[int, float] = {}
    round_over: dict[int, float] = {}
    current = 0
    deadline = time.monotonic() + timeout_s

    def send_update(i: int, fit: Message) -> None:
        body = {"attempt": fit.body["attempt"], "num_examples": 100, "fit_s": 0.01, "history": {"loss": [0.5]}}
        if CHUNKS:
            clients.send(i, "update", round=fit.round, body=body, arrays=update, deadline=deadline)
        else:  # an older checkout: whole, at once
            clients.transports[i].send(protocol.encode(Message(MessageType.UPDATE, round=fit.round, arrays=update,
                                                               client_id=clients.client_ids[i], body=body)))

    try:
        while len(clients.finished) < count and time.monotonic() < deadline:
            for i, message in clients.poll(200):
                if message.type is MessageType.FIT:
                    if message.round != current:
                        round_over.setdefault(current, time.monotonic())
                        current, fits, update = message.round, {}, None
                    if update is None:  # one change for all: what the server folds is what matters here
                        update = [np.asarray(a) + np.float32(1e-4) for a in message.arrays]
                    fits[i] = message
                    first_fit.setdefault(current, time.monotonic())
                elif GRANTS and message.type is MessageType.UPLOAD_GRANT:
                    send_update(i, fits[i])
                elif message.type is MessageType.FINISH:
                    round_over.setdefault(current, time.monotonic())
            if fits and current not in upload_started and (
                    len(fits) == count or time.monotonic() - first_fit[current] > FIT_WAIT_S):
                upload_started[current] = time.monotonic()  # every client asked holds its FIT: all answer at once
                for j, fit in fits.items():
                    if GRANTS:
                        clients.send(j, "upload_ready", round=fit.round, deadline=deadline,
                                     body={"attempt": fit.body["attempt"], "bytes": sum(int(a.nbytes) for a in update)})
                    else:
                        send_update(j, fit)
    finally:
        clients.close()
    return {"upload_started": upload_started, "round_over": round_over, "finished": len(clients.finished)}


def measure(count: int, model: str, model_bytes: int, rounds: int, workdir: Path, server_args: list[str]) -> dict:
    address = f"tcp://127.0.0.1:{free_port()}"
    logdir = workdir / f"logs-{count}"
    server = start([sys.executable, "-m", "pyfed", "server", "--address", address, "--rounds", str(rounds),
                    "--min-clients", str(count), "--model", f"{BENCH / 'seed_model.py'}:{model}",
                    "--logdir", str(logdir), "--round-timeout", "600", "--log-level", "INFO", *server_args],
                   workdir / f"server-{count}.log")
    sampler = RssSampler(server.pid)
    try:
        clients = run_clients(address, count, timeout_s=1800)
    finally:
        done = finish(server, 600)
        sampler.stop()
    if KEEP_LOGS:
        Path(KEEP_LOGS).mkdir(parents=True, exist_ok=True)
        (Path(KEEP_LOGS) / f"server-{count}.log").write_bytes(server.log_path.read_bytes())
        wall = time.time() - time.monotonic()  # the samples against the log's wall-clock times
        (Path(KEEP_LOGS) / f"rss-{count}.tsv").write_text("".join(
            f"{time.strftime('%H:%M:%S', time.localtime(t + wall))}.{int((t + wall) % 1 * 1000):03d}\t{rss / 1e6:.0f}\n"
            for t, rss in sampler.samples))
    assert done.returncode == 0, tail(server.log_path)
    summary = json.loads((logdir / "summary.json").read_text())
    # idle: the server's RSS as round 1's uploads begin (model loaded, FITs sent, nothing received yet);
    # peak: the most it held from then to the end of the last round
    first = min(clients["upload_started"])
    idle = sampler.at(clients["upload_started"][first])
    peak = sampler.peak(clients["upload_started"][first], max(clients["round_over"].values()))
    idles, peaks, rises = [idle], [peak], [(peak - idle) / model_bytes]
    lost = sum(len(r["dropped"]) + sum(len(a["dropped"]) for a in r["failed_attempts"]) for r in summary["rounds"])
    return {"clients": count, "updates_lost": lost, "idle_mb": max(idles) / 1e6, "peak_mb": max(peaks) / 1e6,
            "rise_copies": max(rises), "round_s": median([r["duration_s"] for r in summary["rounds"]]),
            "server_peak_rss_mb": done.peak_rss_mb,
            "max_inflight": next((line.split("max-inflight-updates ")[1].split()[0]
                                  for line in server.log_path.read_text().splitlines()
                                  if "max-inflight-updates " in line), None),
            "expected_peak_mb": next((float(line.split("expected peak memory ")[1].split(" MB")[0].replace(",", ""))
                                      for line in server.log_path.read_text().splitlines()
                                      if "expected peak memory " in line), None)}


def run(counts: list[int], model: str, rounds: int, label: str, server_args: list[str] = ()) -> dict:
    parameters = {"build_large": 50_054_010, "build_huge": 240_095_010}[model]
    model_bytes = 4 * parameters
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            row = measure(count, model, model_bytes, rounds, Path(tmp), list(server_args))
            rows.append(row)
            print(f"N={count}: idle {row['idle_mb']:.0f} MB, peak {row['peak_mb']:.0f} MB, rise "
                  f"{row['rise_copies']:.2f} model copies, round {row['round_s']:.2f} s, "
                  f"{row['updates_lost']} update(s) lost", flush=True)
    base = rows[0]["rise_copies"]
    for row in rows:
        row["rise_over_first"] = row["rise_copies"] - base
    result = {"label": label, "grants": GRANTS, "model": model, "parameters": parameters,
              "model_mb": model_bytes / 1e6, "rounds": rounds, "rows": rows}
    markdown = table(f"Server memory with N clients uploading at once ({label}): {parameters:,} parameters "
                     f"({model_bytes / 1e6:.0f} MB), {rounds} rounds",
                     ["N", "idle RSS (MB)", "peak RSS (MB)", "rise (model copies)", f"rise - rise at N={counts[0]}",
                      "round (s)", "clients dropped", "uploads at once", "server's expected peak (MB)",
                      "whole-run peak RSS (MiB, wait4)"],
                     [[r["clients"], round(r["idle_mb"]), round(r["peak_mb"]), round(r["rise_copies"], 2),
                       round(r["rise_over_first"], 2), round(r["round_s"], 2), r["updates_lost"],
                       r["max_inflight"] or "all", r["expected_peak_mb"] or "n/a", round(r["server_peak_rss_mb"])]
                      for r in rows])
    return {**result, "_markdown": markdown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--huge", action="store_true", help="the 240M-parameter model (960 MB) instead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--name", default="memory", help="the name of the results (bench/<NAME>.md and .json)")
    parser.add_argument("--max-inflight-updates", help="passed to the server (a checkout that has it)")
    parser.add_argument("--server-args", default="",
                        help="more flags for the server, e.g. --server-args='--dp-noise-multiplier 1' for a DP round")
    args = parser.parse_args()
    server_args = ["--max-inflight-updates", args.max_inflight_updates] if args.max_inflight_updates else []
    server_args += args.server_args.split()
    results = run(args.clients, "build_huge" if args.huge else "build_large", args.rounds, args.label, server_args)
    data = {k: v for k, v in results.items() if k != "_markdown"}
    emit(args.name, data, results["_markdown"])
    command = "python -m bench.memory " + " ".join(sys.argv[1:])
    (BENCH / f"{args.name.upper()}.md").write_text(f"Made by `{command}` ({machine()['cpu']}).\n\n{results['_markdown']}")
    (BENCH / f"{args.name.upper()}.json").write_text(json.dumps({"command": command, **data}, indent=1, default=float))
