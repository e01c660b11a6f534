"""Round overhead: one server and 3 client processes on the seed model, PyFed against the original.

Overhead per round = round wall time - the slowest client's fit, as for the original; the median
over the warm rounds (2..R; round 1 also holds process start-up skew and the first tracing, and is
kept in the JSON) is reported. PyFed's full test evaluation runs in the background while the next
round's clients train (only a 64-example probe stays inside the round), so it is not part of the
round and is not subtracted; its time (``eval_s``: the probe plus the background evaluation) is
reported apart. Clients get synthetic
learnable 784-feature data. A second pass uses tiny local data (32 examples, 1 epoch) and no
server-side evaluation (the original has none), where the framework dominates the whole round.
Server peak RSS is read from the kernel (wait4) for both.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import original
from bench.common import free_port, BENCH, emit, finish, main_with_original, median, start, synthetic_data, table, tail

CLIENTS = 3


def write_shards(workdir: Path, examples: int) -> tuple[list[Path], Path]:
    shards = []
    for index in range(1, CLIENTS + 1):
        x, y = synthetic_data(examples, seed=index)
        shards.append(workdir / f"client-{index}.npz")
        np.savez(shards[-1], x=x, y=y)
    x, y = synthetic_data(1000, seed=99)
    np.savez(workdir / "test.npz", x=x, y=y)
    return shards, workdir / "test.npz"


def pyfed_rounds(shards: list[Path], test: Path | None, rounds: int, epochs: int, batch_size: int,
                 workdir: Path, server_flags: tuple[str, ...] = ()) -> dict:
    address = f"tcp://127.0.0.1:{free_port()}"
    logdir = workdir / "pyfed-logs"
    base = [sys.executable, "-m", "pyfed"]
    server = start([*base, "server", "--address", address, "--rounds", str(rounds), "--min-clients", str(CLIENTS),
                    "--model", f"{BENCH / 'seed_model.py'}:build", "--logdir", str(logdir),
                    "--epochs", str(epochs), "--batch-size", str(batch_size), "--learning-rate", "3e-4",
                    *(["--test-data", str(test)] if test else []), *server_flags], workdir / "pyfed-server.log")
    clients = [start([*base, "client", "--server", address, "--data", str(shard)], workdir / f"pyfed-client-{i}.log")
               for i, shard in enumerate(shards, start=1)]
    server_done = finish(server, 3600)
    for process in clients:
        assert finish(process, 600).returncode == 0, tail(process.log_path)
    assert server_done.returncode == 0, tail(server.log_path)
    summary = json.loads((logdir / "summary.json").read_text())
    per_round = [{"wall_s": r["duration_s"], "eval_s": r["eval_s"], "slowest_fit_s": max(r["fit_s"].values()),
                  "overhead_s": r["duration_s"] - max(r["fit_s"].values())} for r in summary["rounds"]]
    return {"rounds": per_round, "server_peak_rss_mb": server_done.peak_rss_mb, **warm_medians(per_round)}


def warm_medians(per_round: list[dict]) -> dict:
    """Medians of each figure over rounds 2..R (round 1 alone if there is only one)."""
    warm = per_round[1:] or per_round
    return {f"median_{key}": median([r[key] for r in warm]) for key in warm[0]}


def run(quick: bool = False, with_original: bool = True) -> dict:
    rounds = 2 if quick else 6
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for label, examples, epochs in (("seed", 300 if quick else 1500, 1), ("tiny", 32, 1)):
            shards, test = write_shards(workdir, examples)
            entry = {"examples_per_client": examples, "epochs": epochs,
                     "pyfed": pyfed_rounds(shards, test if label == "seed" else None, rounds, epochs, 32, workdir)}
            if with_original:
                entry["original"] = original.rounds(shards, rounds, epochs, 32, free_port(), workdir)
            results[label] = entry
    seed, tiny = results["seed"], results["tiny"]
    summary = {"rounds": rounds, "clients": CLIENTS, **results}
    p = seed["pyfed"]
    summary["pyfed_overhead_share"] = p["median_overhead_s"] / p["median_wall_s"]
    rows = [["PyFed", p["median_wall_s"], p["median_slowest_fit_s"], p["median_overhead_s"],
             f"{summary['pyfed_overhead_share']:.1%}", p["median_eval_s"], tiny["pyfed"]["median_wall_s"],
             p["server_peak_rss_mb"]]]
    if with_original:
        o = seed["original"]
        summary["overhead_ratio"] = o["median_overhead_s"] / p["median_overhead_s"]
        summary["tiny_round_ratio"] = tiny["original"]["median_wall_s"] / tiny["pyfed"]["median_wall_s"]
        summary["server_rss_ratio"] = o["server_peak_rss_mb"] / p["server_peak_rss_mb"]
        rows.append(["original PyFed", o["median_wall_s"], o["median_slowest_fit_s"], o["median_overhead_s"],
                     f"{o['median_overhead_s'] / o['median_wall_s']:.1%}", "(none)", tiny["original"]["median_wall_s"],
                     o["server_peak_rss_mb"]])
        rows.append(["original / PyFed", o["median_wall_s"] / p["median_wall_s"], "",
                     summary["overhead_ratio"], "", "", summary["tiny_round_ratio"], summary["server_rss_ratio"]])
    failures = [f for entry in results.values() for f in entry.get("original", {}).get("failed_attempts", [])]
    summary["original_failed_attempts"] = failures
    markdown = table(f"Rounds: server + {CLIENTS} client processes, seed model, {seed['examples_per_client']} "
                     f"synthetic examples per client, 1 epoch; medians over rounds 2-{rounds}",
                     ["framework", "round wall s", "slowest fit s", "overhead s", "overhead share",
                      "server eval s (background)", "tiny-data round s", "server peak RSS MB"], rows)
    if failures:
        markdown += (f"\nThe original PyFed failed {len(failures)} time(s) in this run and was started again: "
                     + "; ".join(sorted(set(failures))) + "\n")
    emit("round", summary, markdown)
    return {**summary, "_markdown": markdown}


if __name__ == "__main__":
    main_with_original(__doc__, run)
