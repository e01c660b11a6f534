"""What a round costs, measured from outside: whole processes, PyFed and the original, in one run.

Each framework runs a server and 3 client processes on the seed's 5.4M-parameter model with 96
synthetic examples per client and 1 local epoch, once for 1 round and once for ``LONG`` rounds;
the wall time of the whole server process (start to exit) is taken each time, and

    cost of a round = (wall(LONG rounds) - wall(1 round)) / (LONG - 1)

so process start-up, model building and the end of the run cancel out, and everything a round
does counts: transfers, aggregation, evaluation, checkpoints, logs. Each wall is the median of
``REPEATS`` runs (taken in turn, short and long), since start-up alone varies by up to ~0.8 s: over
10 rounds, that is +-0.08 s on a ~0.4 s round for one run (three runs each still gave 1.12x to
1.35x of the floor on the same code; five narrow it). The server's own median round duration (from
summary.json, which leaves out the time between rounds) is shown beside it as a cross-check. PyFed's figure is set against
the floor no framework can beat: the slowest client's fit (median over rounds 2..LONG, from
summary.json) plus the round's transfers at the wire speed measured in this run
(:mod:`bench.wire`): the model down to each client and back.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench import original, wire
from bench.common import BENCH, emit, finish, main_with_original, free_port, median, seed_weights, start, table, tail
from bench.round import CLIENTS, write_shards

EXAMPLES = 96
LONG = 11
REPEATS = 5  # each wall is the median of this many runs: process start-up varies by up to ~0.8 s


def pyfed_wall(shards: list[Path], test: Path, rounds: int, workdir: Path) -> tuple[float, dict]:
    """Wall seconds of the whole PyFed server process for ``rounds`` rounds, and its summary.json."""
    address = f"tcp://127.0.0.1:{free_port()}"
    logdir = workdir / f"pyfed-{rounds}"
    base = [sys.executable, "-m", "pyfed"]
    server = start([*base, "server", "--address", address, "--rounds", str(rounds), "--min-clients", str(CLIENTS),
                    "--model", f"{BENCH / 'seed_model.py'}:build", "--logdir", str(logdir), "--epochs", "1",
                    "--batch-size", "32", "--learning-rate", "3e-4", "--test-data", str(test)],
                   workdir / f"pyfed-server-{rounds}.log")
    clients = [start([*base, "client", "--server", address, "--data", str(shard)],
                     workdir / f"pyfed-client-{rounds}-{i}.log") for i, shard in enumerate(shards, start=1)]
    done = finish(server, 3600)
    for process in clients:
        assert finish(process, 600).returncode == 0, tail(process.log_path)
    assert done.returncode == 0, tail(server.log_path)
    return done.wall_s, json.loads((logdir / "summary.json").read_text())


def original_wall(shards: list[Path], rounds: int, workdir: Path) -> float:
    """Wall seconds of the original's whole server process for ``rounds`` rounds (retried as
    :func:`bench.original.rounds` does: its framing sometimes truncates a model)."""
    return original.rounds(shards, rounds, 1, 32, free_port(), workdir)["server_wall_s"]


def run(quick: bool = False, with_original: bool = True) -> dict:
    long_rounds, repeats = (2, 1) if quick else (LONG, REPEATS)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards, test = write_shards(workdir, EXAMPLES)
        short_walls, long_walls, summaries = [], [], []
        for _ in range(repeats):
            short_walls.append(pyfed_wall(shards, test, 1, workdir)[0])
            wall, summary = pyfed_wall(shards, test, long_rounds, workdir)
            long_walls.append(wall)
            summaries.append(summary)
        short_s, long_s = median(short_walls), median(long_walls)
        pyfed_round_s = (long_s - short_s) / (long_rounds - 1)
        warm = [r for summary in summaries for r in summary["rounds"][1:]]
        slowest_fit_s = median([max(r["fit_s"].values()) for r in warm])
        server_round_s = median([r["duration_s"] for r in warm])
        bytes_down, bytes_up = median([r["bytes_sent"] for r in warm]), median([r["bytes_received"] for r in warm])
        weights = seed_weights()
        model_bytes = sum(w.nbytes for w in weights)
        t_down, t_up = wire.pyfed_wire(weights, 3 if quick else 10)  # one model copy each way, this run
        transfer_s = bytes_down / model_bytes * t_down + bytes_up / model_bytes * t_up
        floor_s = slowest_fit_s + transfer_s
        result = {"rounds": long_rounds, "clients": CLIENTS, "examples_per_client": EXAMPLES, "repeats": repeats,
                  "pyfed": {"walls_1_round_s": short_walls, f"walls_{long_rounds}_rounds_s": long_walls,
                            "wall_1_round_s": short_s, f"wall_{long_rounds}_rounds_s": long_s,
                            "round_s": pyfed_round_s, "median_server_round_s": server_round_s,
                            "median_slowest_fit_s": slowest_fit_s, "transfer_s": transfer_s, "floor_s": floor_s},
                  "pyfed_round_over_floor": pyfed_round_s / floor_s}
        rows = [["PyFed", short_s, long_s, pyfed_round_s, server_round_s, floor_s, result["pyfed_round_over_floor"]]]
        if with_original:
            # once each: the original's ~9 s round dwarfs its start-up noise (and one run takes minutes)
            o_short, o_long = original_wall(shards, 1, workdir), original_wall(shards, long_rounds, workdir)
            original_round_s = (o_long - o_short) / (long_rounds - 1)
            result["original"] = {"wall_1_round_s": o_short, f"wall_{long_rounds}_rounds_s": o_long,
                                  "round_s": original_round_s}
            result["original_over_pyfed"] = original_round_s / pyfed_round_s
            rows.append(["original PyFed", o_short, o_long, original_round_s, "", "", original_round_s / floor_s])
    markdown = table(f"A round measured from outside: server + {CLIENTS} client processes, seed model, {EXAMPLES} "
                     f"examples per client, 1 epoch; (wall of {long_rounds} rounds - wall of 1) / {long_rounds - 1}, "
                     f"each wall the median of {repeats} run(s)",
                     ["framework", "1 round: process s", f"{long_rounds} rounds: process s", "a round s",
                      "server's own median round s", "floor s (slowest fit + transfers)", "round / floor"], rows)
    if with_original:
        markdown += f"\nThe original's round costs {result['original_over_pyfed']:.1f}x PyFed's.\n"
    emit("outside", result, markdown)
    return {**result, "_markdown": markdown}


if __name__ == "__main__":
    main_with_original(__doc__, run)
