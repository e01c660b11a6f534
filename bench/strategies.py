"""Every strategy on IID and label-skewed digits: final accuracy over seeds and rounds to 90%.

    python -m bench.strategies                 # the committed table (about 15 minutes on 2 cores)
    python -m bench.strategies --quick         # 2 strategies x 2 rounds x 1 seed, to check the script

Each run is an in-process simulation (``pyfed.federation.simulation``) with the strategy's default
parameters: 10 clients on scikit-learn's digits (1,438 training and 359 test examples), the
default MLP, Adam on the clients, the same plan for every strategy. Writes bench/STRATEGIES.md
and bench/STRATEGIES.json (or --out).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

from bench.common import BENCH, experiment_header, experiment_markdown, experiment_parser, write_experiment

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
    return experiment_markdown("Strategies on digits: IID vs label skew", results, (
        f"{settings['num_clients']} clients, {settings['rounds']} rounds, {settings['epochs']} local epochs of "
        f"batch 32, client Adam learning rate {settings['learning_rate']}, seeds {settings['seeds']}, every strategy "
        "with its default parameters (`pyfed simulate --help`). Final accuracy is the global model's on the held-out "
        f"test set after the last round, mean ± standard deviation over the seeds; rounds to {TARGET_ACCURACY:.0%} "
        "is the mean first round whose test accuracy reached it, over the seeds that reached it (how many in brackets)."),
        header)


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, rounds=30, clients=10)
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
        **experiment_header("strategies", argv, started),
        "settings": {"num_clients": args.clients, "rounds": args.rounds, "epochs": args.epochs,
                     "learning_rate": args.learning_rate, "seeds": list(range(args.seeds))},
        "table": summarise(runs, strategies, args.seeds),
        "runs": runs,
    }
    write_experiment(args.out, "STRATEGIES", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
