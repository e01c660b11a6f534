"""Every strategy on IID and label-skewed digits: final accuracy over seeds and rounds to 90%.

    python -m bench.strategies                 # the committed table (about 15 minutes on 2 cores)
    python -m bench.strategies --quick         # 2 strategies x 2 rounds x 1 seed, to check the script

Each run is an in-process simulation (``pyfed.federation.simulation``) with the strategy's default
parameters: 10 clients on scikit-learn's digits (1,438 training and 359 test examples), the
default MLP, Adam on the clients, the same plan for every strategy. Writes bench/STRATEGIES.md
and bench/STRATEGIES.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from bench.common import BENCH, machine

TARGET_ACCURACY = 0.90
PARTITIONS = [("iid", None), ("dirichlet", 0.1)]


def run_one(strategy_name: str, scheme: str, alpha: float | None, seed: int, *, rounds: int, epochs: int,
            learning_rate: float, num_clients: int) -> dict:
    import keras

    from pyfed.learning.data import load_dataset, split_dataset
    from pyfed.learning.model import default_model
    from pyfed.federation.simulation import Simulation, rounds_to_reach
    from pyfed.federation.strategy import make_strategy
    from pyfed.wire.protocol import FitPlan

    x, y = load_dataset("digits")
    clients, test = split_dataset(x, y, num_clients, seed=seed, scheme=scheme, alpha=alpha or 0.5)
    keras.utils.set_random_seed(seed)
    model = default_model(tuple(x.shape[1:]), int(y.max()) + 1, learning_rate)
    strategy = make_strategy(strategy_name)
    started = time.perf_counter()
    history = Simulation(model, clients, rounds=rounds, plan=FitPlan(epochs, 32, learning_rate), strategy=strategy,
                         test_data=test, seed=seed, progress=False).run()
    return {"strategy": strategy.describe(), "scheme": scheme, "alpha": alpha, "seed": seed,
            "final_accuracy": history[-1].test_accuracy, "final_loss": history[-1].test_loss,
            "rounds_to_target": rounds_to_reach(history, TARGET_ACCURACY),
            "accuracy_by_round": [r.test_accuracy for r in history], "seconds": round(time.perf_counter() - started, 2)}


def summarise(runs: list[dict], strategies: list[str], seeds: int) -> list[list[str]]:
    rows = []
    for name in strategies:
        row = [f"`{name}`"]
        for scheme, _ in PARTITIONS:
            mine = [r for r in runs if r["strategy"]["name"] == name and r["scheme"] == scheme]
            accuracies = [r["final_accuracy"] for r in mine]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            reached = [r["rounds_to_target"] for r in mine if r["rounds_to_target"] is not None]
            row.append(f"{statistics.mean(accuracies):.3f} ± {spread:.3f}")
            row.append(f"{statistics.mean(reached):.1f} ({len(reached)}/{len(mine)})" if reached else f"never (0/{len(mine)})")
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    settings = results["settings"]
    header = ["strategy", "IID: final accuracy", f"IID: rounds to {TARGET_ACCURACY:.0%}",
              "Dirichlet α=0.1: final accuracy", f"Dirichlet α=0.1: rounds to {TARGET_ACCURACY:.0%}"]
    lines = [
        "# Strategies on digits: IID vs label skew",
        "",
        f"Made by `{results['command']}` on {results['machine']} in {results['seconds']:.0f} s "
        f"({results['date']}).",
        "",
        f"{settings['num_clients']} clients, {settings['rounds']} rounds, {settings['epochs']} local epochs of "
        f"batch 32, client Adam learning rate {settings['learning_rate']}, seeds {settings['seeds']}, every strategy "
        "with its default parameters (`pyfed simulate --help`). Final accuracy is the global model's on the held-out "
        f"test set after the last round, mean ± standard deviation over the seeds; rounds to {TARGET_ACCURACY:.0%} "
        "is the mean first round whose test accuracy reached it, over the seeds that reached it (how many in brackets).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in results["table"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script works")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--strategies", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, default=BENCH, help="directory for STRATEGIES.md and STRATEGIES.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from pyfed.federation.strategy import STRATEGIES

    strategies = [s for s in args.strategies.split(",") if s] or list(STRATEGIES)
    if args.quick:
        args.rounds, args.seeds, args.epochs = 2, 1, 1
        strategies = strategies[:2] if not args.strategies else strategies
    started = time.perf_counter()
    runs = []
    for scheme, alpha in PARTITIONS:
        for name in strategies:
            for seed in range(args.seeds):
                run = run_one(name, scheme, alpha, seed, rounds=args.rounds, epochs=args.epochs,
                              learning_rate=args.learning_rate, num_clients=args.clients)
                runs.append(run)
                print(f"{scheme:<10} {name:<13} seed {seed}: final accuracy {run['final_accuracy']:.3f}, "
                      f"rounds to {TARGET_ACCURACY:.0%}: {run['rounds_to_target']}, {run['seconds']:.1f}s", flush=True)
    results = {
        "command": "python -m bench.strategies" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "machine": "{cores}-core {cpu}, Python {python}, TensorFlow {tensorflow}, Keras {keras}".format(
            **{"tensorflow": "?", "keras": "?", **machine()}),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "settings": {"num_clients": args.clients, "rounds": args.rounds, "epochs": args.epochs,
                     "learning_rate": args.learning_rate, "seeds": list(range(args.seeds))},
        "table": summarise(runs, strategies, args.seeds),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "STRATEGIES.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    md = args.out / "STRATEGIES.md"
    analysis_marker = "## What the numbers say"
    if md.exists() and analysis_marker in md.read_text():  # keep the hand-written analysis below the table
        report += "\n" + md.read_text()[md.read_text().index(analysis_marker):]
    md.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
