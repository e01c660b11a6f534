"""What secure aggregation (SecAgg+) costs a round, against plain FedAvg, on the seed's 5.4M-parameter model.

    python -m bench.secagg            # bench/SECAGG.md: 3, 10 and 100 clients
    python -m bench.secagg --quick    # 3 clients, and 4 with one dropped, on a small model, to check the script

For each number of clients, one round's protocol runs in this process: every client's half
(``ClientStages``: keys, sealed shares, masking) and the server's (``ServerRound``: routing,
summing as inputs arrive, unmasking), every message encoded with the wire codec to count its bytes.
Plain FedAvg is the same round without the stages: the FIT down, the UPDATE up, the server's
streamed weighted mean. Local training is left out (it is the same either way). Updates are
random changes of standard deviation 0.01; the unmasked mean is checked against the plain one.

Reported per round: bytes a client sends and receives (mean over clients), a client's compute
(mean), the server's compute, and the ratios to plain FedAvg, all measured in this one run.

Then the whole round over the network: a server and 3 client processes on loopback, the seed model,
tiny local data (32 examples, 1 epoch, so the protocol, not training, dominates), plain and then
with ``--secure-aggregation``; the median round wall time over rounds 2..R of each (bench/round.py's
harness), and its ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import tempfile

from bench.common import BENCH, experiment_header, seed_weights, write_experiment
from bench.round import pyfed_rounds, write_shards
from pyfed.federation.secure_aggregation import (Advertised, ClientStages, PublicKeys, SecureAggregation, ServerRound,
                                                 apply_change, flatten_change, round_context)
from pyfed.federation.strategy import FedAvg, FitResult
from pyfed.wire import protocol
from pyfed.wire.protocol import FitPlan, Message, MessageType

PLAN = FitPlan(1, 32, 0.01)
RUN = "0123456789abcdef"


def wire_bytes(kind: MessageType, body: dict, arrays=()) -> int:
    return sum(len(frame) for frame in protocol.encode(Message(kind, round=1, client_id="client-1", body=body,
                                                                  arrays=list(arrays))))


def plain_round(global_weights: list[np.ndarray], n: int, rng: np.random.Generator,
                dropped: int = 0) -> tuple[dict, list[np.ndarray]]:
    fit = wire_bytes(MessageType.FIT, {"plan": PLAN.to_body(), "attempt": 1, "run": RUN}, global_weights)
    strategy = FedAvg()
    aggregator = strategy.aggregator(1, global_weights)
    server_s, up = 0.0, 0
    for index in range(n):
        trained = [(g + rng.normal(0, 0.01, g.shape)).astype(g.dtype) for g in global_weights]
        up = wire_bytes(MessageType.UPDATE, {"attempt": 1, "num_examples": 100 + index, "fit_s": 1.0,
                                             "history": {"loss": [0.5]}}, trained)
        if index < dropped:  # the same clients the secure round loses; their updates never arrive
            continue
        started = time.perf_counter()
        aggregator.add(FitResult(f"client-{index}", trained, 100 + index))
        server_s += time.perf_counter() - started
    started = time.perf_counter()
    mean = aggregator.result()
    server_s += time.perf_counter() - started
    return {"client_sent": up, "client_received": fit, "client_s": 0.0, "server_s": server_s}, mean


def secure_round(global_weights: list[np.ndarray], n: int, rng: np.random.Generator,
                 settings: SecureAggregation, dropped: int = 0) -> tuple[dict, list[np.ndarray]]:
    ids = [f"client-{index}" for index in range(n)]
    context = round_context(RUN, 1, 1)
    setup = settings.setup(context, n, total_weight=sum(100 + index for index in range(n)))  # as declared
    setup_body = {"threshold": setup.threshold, "degree": setup.degree, "quantisation_bits": setup.quantisation_bits,
                  "ring_bits": setup.ring_bits, "clip": setup.clip, "min_clients": setup.min_clients}
    length = sum(int(g.size) for g in global_weights)
    server = ServerRound(setup, ids, length, {cid: 100 + index for index, cid in enumerate(ids)})
    stages = {cid: ClientStages(cid) for cid in ids}
    sent = dict.fromkeys(ids, 0)
    received = dict.fromkeys(ids, wire_bytes(MessageType.FIT, {"plan": PLAN.to_body(), "attempt": 1, "run": RUN,
                                                               "secagg": setup_body}, global_weights))
    client_s = dict.fromkeys(ids, 0.0)
    server_s = 0.0

    def timed(bucket: dict | None, cid: str | None, function, *args):
        nonlocal server_s
        started = time.perf_counter()
        result = function(*args)
        if bucket is None:
            server_s += time.perf_counter() - started
        else:
            bucket[cid] += time.perf_counter() - started
        return result

    for index, cid in enumerate(ids):  # each client trains (left out), then advertises its keys
        trained = [(g + rng.normal(0, 0.01, g.shape)).astype(g.dtype) for g in global_weights]
        body = timed(client_s, cid, stages[cid].begin, RUN, 1, 1, setup_body, flatten_change(trained, global_weights),
                     100 + index, {"fit_s": 1.0, "history": {"loss": [0.5]}})
        sent[cid] += wire_bytes(MessageType.SECAGG_KEYS, body)
        timed(None, None, server.add_keys, cid, Advertised(
            PublicKeys(*(protocol.unb64(body[k]) for k in ("mask_key", "share_key", "sign_key"))),
            protocol.unb64(body["commitment"]), body["num_examples"], protocol.unb64(body["signature"])))
        del trained
    roster = {cid: [protocol.b64(k.mask_key), protocol.b64(k.share_key), protocol.b64(k.sign_key)]
              for cid, k in timed(None, None, server.roster).items()}
    for cid in ids:
        request = {"attempt": 1, "roster": roster}
        received[cid] += wire_bytes(MessageType.SECAGG_ROSTER, request)
        kind, body, _ = timed(client_s, cid, stages[cid].answer, MessageType.SECAGG_ROSTER, 1, request)
        sent[cid] += wire_bytes(kind, body)
        timed(None, None, server.add_shares, cid, {v: protocol.unb64(b) for v, b in body["boxes"].items()})
    for cid in ids[dropped:]:  # the first `dropped` clients vanish after sharing: no masked input
        request = {"attempt": 1, "boxes": {s: protocol.b64(b) for s, b in timed(None, None, server.boxes_for, cid).items()}}
        received[cid] += wire_bytes(MessageType.SECAGG_BOXES, request)
        kind, body, arrays = timed(client_s, cid, stages[cid].answer, MessageType.SECAGG_BOXES, 1, request)
        sent[cid] += wire_bytes(kind, body, arrays)
        timed(None, None, server.add_masked, cid, arrays[0])
        del arrays
    survivors, lost = timed(None, None, server.unmask_request)
    assert len(lost) == dropped and len(survivors) == len(ids) - dropped
    for cid in survivors:
        request = {"attempt": 1, "survivors": survivors, "dropped": lost}
        received[cid] += wire_bytes(MessageType.SECAGG_UNMASK, request)
        kind, body, _ = timed(client_s, cid, stages[cid].answer, MessageType.SECAGG_UNMASK, 1, request)
        sent[cid] += wire_bytes(kind, body)
        timed(None, None, server.add_unmask, cid, {o: (k, protocol.unb64(share), protocol.unb64(sig))
                                                   for o, (k, share, sig) in body["shares"].items()})
    total, weight = timed(None, None, server.result)
    mean = apply_change(global_weights, total / weight)
    return {"client_sent": statistics.mean(sent[c] for c in survivors),
            "client_received": statistics.mean(received[c] for c in survivors),
            "client_s": statistics.mean(client_s[c] for c in survivors), "server_s": server_s, "degree": setup.degree,
            "threshold": setup.threshold, "ring_bits": setup.ring_bits}, mean


def networked_rounds(rounds: int) -> dict:
    """Median round wall time, plain and secure, of a server and 3 client processes on tiny data."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards, _ = write_shards(workdir, 32)
        (workdir / "plain").mkdir()
        (workdir / "secure").mkdir()
        plain = pyfed_rounds(shards, None, rounds, 1, 32, workdir / "plain")
        secure = pyfed_rounds(shards, None, rounds, 1, 32, workdir / "secure", ("--secure-aggregation",))
    return {"clients": len(shards), "examples_per_client": 32, "rounds": rounds,
            "plain_round_s": plain["median_wall_s"], "secure_round_s": secure["median_wall_s"],
            "plain": plain["rounds"], "secure": secure["rounds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 and 4 clients on a small model")
    parser.add_argument("--out", type=Path, default=BENCH, help="directory for SECAGG.md and SECAGG.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    global_weights = [np.zeros((64, 32), np.float32), np.zeros(32, np.float32)] if args.quick else seed_weights(0)
    settings = SecureAggregation()
    rows, runs = [], []
    for n, dropped in ((3, 0), (4, 1)) if args.quick else ((3, 0), (10, 0), (100, 0), (100, 10)):
        plain, plain_mean = plain_round(global_weights, n, np.random.default_rng(n), dropped)
        secure, secure_mean = secure_round(global_weights, n, np.random.default_rng(n), settings, dropped)
        error = max(float(np.abs(a - b).max()) for a, b in zip(plain_mean, secure_mean))
        runs.append({"clients": n, "dropped_after_sharing": dropped, "parameters": int(sum(g.size for g in global_weights)), "plain": plain,
                     "secure": secure, "max_error_vs_plain": error})
        rows.append([f"{n}" + (f", {dropped} drop after sharing" if dropped else ""), f"{secure['degree']} / {secure['threshold']} / {secure['ring_bits']}",
                     f"{secure['client_sent'] / 1e6:.1f} MB (+{(secure['client_sent'] - plain['client_sent']) / 1e3:.1f} kB)",
                     f"{secure['client_received'] / 1e6:.1f} MB (+{(secure['client_received'] - plain['client_received']) / 1e3:.1f} kB)",
                     f"{secure['client_s']:.2f} s", f"{secure['server_s']:.2f} s ({secure['server_s'] / plain['server_s']:.0f}x)",
                     f"{error:.1e}"])
        print(f"{rows[-1][0]} clients: {rows[-1]}", flush=True)
    networked = networked_rounds(2 if args.quick else 6)
    print(f"over the network: {networked}", flush=True)
    results = {**experiment_header("secagg", argv, started), "table": rows, "runs": runs, "networked": networked}
    header = ["clients", "neighbours / threshold / ring bits", "a client sends (vs plain)",
              "a client receives (vs plain)", "a client's SecAgg compute", "server compute (vs plain FedAvg)",
              "largest error vs plain mean"]
    parameters = runs[0]["parameters"]
    report = "\n".join([
        "# Secure aggregation's cost per round", "",
        f"Made by `{results['command']}` on {results['machine']} in {results['seconds']:.0f} s ({results['date']}).", "",
        f"One round on a {parameters:,}-parameter model (float32), default settings (SecureAggregation(): threshold "
        "over half of a client's neighbourhood, 16 quantisation bits, clip 1.0); \"drop after sharing\": that many "
        "clients vanish once their shares are out, so the server rebuilds their mask keys and removes their pairwise "
        "masks from their neighbours' inputs; every message encoded with the wire "
        "codec. Plain FedAvg: the FIT down and the UPDATE up, the server's streamed weighted mean. Training left out "
        "(the same either way).", "",
        "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows), "",
        f"Over the network ({networked['clients']} client processes on loopback, the seed model, "
        f"{networked['examples_per_client']} examples each, 1 epoch; median of rounds 2-{networked['rounds']}): "
        f"a plain FedAvg round {networked['plain_round_s']:.2f} s, a securely aggregated round "
        f"{networked['secure_round_s']:.2f} s ({networked['secure_round_s'] / networked['plain_round_s']:.2f}x).", ""])
    write_experiment(args.out, "SECAGG", results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
