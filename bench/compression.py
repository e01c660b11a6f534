"""Compressed updates and broadcasts: bytes, accuracy, and the round time on a slow link, in one run.

    python -m bench.compression            # bench/COMPRESSION.md (about 25 minutes on 2 cores)
    python -m bench.compression --quick    # 2 rounds, 1 seed, 2 codecs: to check the script

Accuracy: for each encoding (none, fp16, int8, top-k 1% and 10%), in-process simulations of 10
clients on scikit-learn's digits, IID and Dirichlet(0.3) label skew, 30 rounds, 3 seeds, the default
MLP; the final test accuracy (mean and range over seeds) and the update compression ratio the
server recorded (dense bytes over the bytes that came).

Bytes: one round's FIT and UPDATE of the seed's 5.4M-parameter model under each encoding, through
the wire codec (a random change of standard deviation 0.01).

Slow link: a server and 3 client processes on the seed model, tiny local data (32 examples, 1
epoch, so the link dominates), each client through its own user-space link (bench/link.py): an
uplink (client to server) of 50 Mbit/s and a downlink of 200 Mbit/s (an asymmetric business line),
and a symmetric 50 Mbit/s link. The median round wall time over rounds 2..R for each encoding and
its ratio to none.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (BENCH, experiment_header, experiment_parser, finish, free_port, seed_weights, start,
                          synthetic_data, tail, write_experiment)

ENCODINGS = [("none", None), ("fp16", None), ("int8", None), ("topk", 0.01), ("topk", 0.1)]
PARTITIONS = [("iid", None), ("dirichlet", 0.3)]
MBIT = 1e6 / 8  # bytes a second in a megabit a second
LINKS = [("50 Mbit/s up, 200 Mbit/s down", 50 * MBIT, 200 * MBIT), ("50 Mbit/s both ways", 50 * MBIT, 50 * MBIT)]
LINK_SETTINGS = [("none", None, "none"), ("int8", None, "none"), ("int8", None, "fp16"), ("topk", 0.01, "fp16"),
                 ("fp16", None, "fp16")]


def label(codec: str, fraction: float | None, broadcast: str = "none") -> str:
    name = f"top-k {fraction:.0%}" if codec == "topk" else codec
    return name + (f" + {broadcast} broadcast" if broadcast != "none" else "")


def accuracy_run(codec: str, fraction: float | None, scheme: str, alpha: float | None, seed: int, *, rounds: int,
                 epochs: int, learning_rate: float, num_clients: int) -> dict:
    import keras

    from pyfed.federation.simulation import Simulation
    from pyfed.learning.data import load_dataset, split_dataset
    from pyfed.learning.model import default_model
    from pyfed.wire.protocol import FitPlan

    x, y = load_dataset("digits")
    clients, test = split_dataset(x, y, num_clients, seed=seed, scheme=scheme, alpha=alpha or 0.5)
    keras.utils.set_random_seed(seed)
    model = default_model(tuple(x.shape[1:]), int(y.max()) + 1, learning_rate)
    plan = FitPlan(epochs, 32, learning_rate, update_compression=codec, topk_fraction=fraction or 0.01)
    started = time.perf_counter()
    history = Simulation(model, clients, rounds=rounds, plan=plan, test_data=test, seed=seed, progress=False).run()
    ratios = [r.update_compression_ratio for r in history if r.update_compression_ratio]
    return {"encoding": label(codec, fraction), "scheme": scheme, "alpha": alpha, "seed": seed,
            "final_accuracy": history[-1].test_accuracy, "accuracy_by_round": [r.test_accuracy for r in history],
            "update_compression_ratio": statistics.mean(ratios) if ratios else 1.0,
            "seconds": round(time.perf_counter() - started, 2)}


def wire_bytes() -> list[dict]:
    """One round's FIT and UPDATE of the seed model under each encoding, through the wire codec."""
    from pyfed.wire import protocol
    from pyfed.wire.compression import UpdateEncoder, encode_broadcast
    from pyfed.wire.protocol import FitPlan, Message, MessageType

    global_weights = seed_weights(0)
    trained = [(g + np.random.default_rng(1).normal(0, 0.01, g.shape)).astype(np.float32) for g in global_weights]
    rows = []
    for codec, fraction, broadcast in [("none", None, "none"), ("fp16", None, "fp16"), ("int8", None, "none"),
                                       ("topk", 0.01, "none"), ("topk", 0.1, "none")]:
        plan = FitPlan(1, 32, 0.01, update_compression=codec, topk_fraction=fraction or 0.01,
                       broadcast_compression=broadcast)
        fit = protocol.encode(Message(MessageType.FIT, round=1, body={"plan": plan.to_body(), "attempt": 1,
                                                                      "run": "0" * 16},
                                      arrays=encode_broadcast(global_weights, broadcast)))
        arrays, encoding = UpdateEncoder().encode(trained, global_weights, codec, fraction or 0.01, "run/client")
        update = protocol.encode(Message(MessageType.UPDATE, round=1, client_id="client-1", arrays=arrays,
                                         body={"attempt": 1, "num_examples": 32, "fit_s": 1.0, "history": {},
                                               **encoding}))
        rows.append({"encoding": label(codec, fraction), "broadcast": broadcast,
                     "fit_bytes": sum(len(f) for f in fit), "update_bytes": sum(len(f) for f in update)})
    return rows


def link_rounds(codec: str, fraction: float | None, broadcast: str, up_bytes_s: float, down_bytes_s: float,
                rounds: int, workdir: Path) -> dict:
    """A server and 3 clients, each through its own paced link; the median round wall over rounds 2..R."""
    from bench.link import DelayProxy

    workdir.mkdir(parents=True)
    port = free_port()
    base = [sys.executable, "-m", "pyfed"]
    logdir = workdir / "logs"
    server = start([*base, "server", "--address", f"tcp://127.0.0.1:{port}", "--rounds", str(rounds),
                    "--min-clients", "3", "--model", f"{BENCH / 'seed_model.py'}:build", "--logdir", str(logdir),
                    "--epochs", "1", "--batch-size", "32", "--learning-rate", "3e-4", "--round-timeout", "600",
                    "--update-compression", codec, "--topk-fraction", str(fraction or 0.01),
                    "--broadcast-compression", broadcast], workdir / "server.log")
    proxies, clients = [], []
    try:
        wait_for_line(server.log_path, "listening on", 300)  # a proxy's upstream must find the server
        for index in range(1, 4):
            x, y = synthetic_data(32, seed=index)
            np.savez(workdir / f"client-{index}.npz", x=x, y=y)
            proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.005, up_bytes_s=up_bytes_s,
                               down_bytes_s=down_bytes_s, max_buffered_bytes=1024 * 1024)
            proxies.append(proxy)
            clients.append(start([*base, "client", "--server", f"tcp://127.0.0.1:{proxy.address[1]}",
                                  "--data", str(workdir / f"client-{index}.npz")], workdir / f"client-{index}.log"))
        done = finish(server, 1800)
        for process in clients:
            finish(process, 120)
        assert done.returncode == 0, tail(server.log_path)
    finally:
        for process in clients:
            if process.poll() is None:
                process.kill()
        for proxy in proxies:
            proxy.close()
    summary = json.loads((logdir / "summary.json").read_text())
    walls = [r["duration_s"] for r in summary["rounds"]]
    return {"rounds": walls, "median_round_s": statistics.median(walls[1:] or walls),
            "bytes_sent": [r["bytes_sent"] for r in summary["rounds"]],
            "bytes_received": [r["bytes_received"] for r in summary["rounds"]]}


def wait_for_line(log_path: Path, text: str, timeout_s: float) -> None:
    """Until ``text`` is in the log (bounded: ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists() and text in log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {log_path} after {timeout_s:.0f}s:\n{tail(log_path)}")


def summarise(runs: list[dict], encodings: list[str]) -> list[list[str]]:
    rows = []
    for encoding in encodings:
        row = [encoding]
        mine = [r for r in runs if r["encoding"] == encoding]
        row.append(f"{statistics.mean(r['update_compression_ratio'] for r in mine):.1f}x")
        for scheme, _ in PARTITIONS:
            finals = [r["final_accuracy"] for r in mine if r["scheme"] == scheme]
            baseline = [r["final_accuracy"] for r in runs if r["scheme"] == scheme and r["encoding"] == "none"]
            row.append(f"{statistics.mean(finals):.3f} ({min(finals):.3f}-{max(finals):.3f}), "
                       f"{100 * (statistics.mean(finals) - statistics.mean(baseline)):+.1f} points")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, rounds=30, clients=10)
    parser.add_argument("--link-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH, help="directory for COMPRESSION.md and COMPRESSION.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    encodings, links, settings = ENCODINGS, LINKS, LINK_SETTINGS
    if args.quick:
        args.rounds, args.seeds, args.epochs, args.link_rounds = 2, 1, 1, 2
        encodings, links, settings = ENCODINGS[::2][:2], LINKS[:1], LINK_SETTINGS[:2]
    started = time.perf_counter()
    wire = wire_bytes()
    for row in wire:
        print(f"bytes: {row}", flush=True)
    runs = []
    for scheme, alpha in PARTITIONS:
        for codec, fraction in encodings:
            for seed in range(args.seeds):
                run = accuracy_run(codec, fraction, scheme, alpha, seed, rounds=args.rounds, epochs=args.epochs,
                                   learning_rate=args.learning_rate, num_clients=args.clients)
                runs.append(run)
                print(f"{scheme:<10} {run['encoding']:<12} seed {seed}: final accuracy {run['final_accuracy']:.3f}, "
                      f"compressed {run['update_compression_ratio']:.1f}x, {run['seconds']:.1f}s", flush=True)
    slow = []
    with tempfile.TemporaryDirectory() as tmp:
        for link_name, up, down in links:
            for index, (codec, fraction, broadcast) in enumerate(settings):
                measured = link_rounds(codec, fraction, broadcast, up, down, args.link_rounds,
                                       Path(tmp) / f"{len(slow)}")
                slow.append({"link": link_name, "encoding": label(codec, fraction, broadcast), **measured})
                print(f"{link_name}, {slow[-1]['encoding']}: median round {measured['median_round_s']:.2f}s", flush=True)
    results = {
        **experiment_header("compression", argv, started),
        "settings": {"num_clients": args.clients, "rounds": args.rounds, "epochs": args.epochs,
                     "learning_rate": args.learning_rate, "seeds": list(range(args.seeds)),
                     "link_rounds": args.link_rounds},
        "table": summarise(runs, [label(c, f) for c, f in encodings]), "wire": wire, "runs": runs, "slow_link": slow,
    }
    write_experiment(args.out, "COMPRESSION", results, markdown(results))
    return 0


def markdown(results: dict) -> str:
    settings = results["settings"]
    none_fit = next(r for r in results["wire"] if r["encoding"] == "none")
    wire_rows = [f"| {r['encoding']}{' + fp16 broadcast' if r['broadcast'] == 'fp16' else ''} | "
                 f"{r['fit_bytes'] / 1e6:.2f} MB ({none_fit['fit_bytes'] / r['fit_bytes']:.1f}x) | "
                 f"{r['update_bytes'] / 1e6:.2f} MB ({none_fit['update_bytes'] / r['update_bytes']:.1f}x) |"
                 for r in results["wire"]]
    slow_rows = []
    for entry in results["slow_link"]:
        none = next(s for s in results["slow_link"] if s["link"] == entry["link"] and s["encoding"] == "none")
        slow_rows.append(f"| {entry['link']} | {entry['encoding']} | {entry['median_round_s']:.2f} s | "
                         f"{none['median_round_s'] / entry['median_round_s']:.2f}x |")
    return "\n".join([
        "# Compressed updates and broadcasts", "",
        f"Made by `{results['command']}` on {results['machine']} in {results['seconds']:.0f} s ({results['date']}).", "",
        "## Bytes of one round on the seed's 5.4M-parameter model (wire codec)", "",
        "| encoding | FIT (server to a client) | UPDATE (a client to the server) |", "|---|---|---|", *wire_rows, "",
        f"## Accuracy: {settings['num_clients']} clients on digits, {settings['rounds']} rounds, "
        f"{settings['epochs']} epochs, learning rate {settings['learning_rate']}, seeds {settings['seeds']}", "",
        "Final test accuracy, mean (range) over seeds, and the difference from no compression; the update "
        "compression ratio is the server's (dense bytes over the bytes that came).", "",
        "| encoding | update compression | IID | Dirichlet(0.3) |", "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in results["table"]), "",
        f"## Round time on a slow link: 3 clients, the seed model, tiny data, median of rounds 2-{settings['link_rounds']}",
        "", "| link (each client's own) | encoding | round | faster than none |", "|---|---|---|---|", *slow_rows, ""])


if __name__ == "__main__":
    sys.exit(main())
