"""Client-level differential privacy on digits: accuracy at epsilon 1, 3 and 8 against no DP.

    python -m bench.privacy              # the committed table, bench/PRIVACY.md (about 20 minutes on 2 cores)
    python -m bench.privacy --quick      # 2 rounds, 1 seed, to check the script

100 simulated clients on a label-skewed split of scikit-learn's digits (Dirichlet alpha 0.5), 10
sampled each round (fraction 0.1, without replacement), FedAvg on the server, the default MLP with
Adam on the clients. With DP, the noise multiplier is calibrated by dp-accounting so that the
planned rounds spend exactly the target epsilon at delta 1e-5 (strategy/dp.py, privacy.py); each
update's change is clipped to ``--clip-norm``. Without DP, the same sampling and plan, FedAvg
weighting by examples. Final accuracy is the global model's on the 359 held-out examples after the
last round, over seeds; the cost per round is the median round duration, DP against none.
Writes bench/PRIVACY.md and bench/PRIVACY.json (or --out).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

from bench.common import BENCH, experiment_header, experiment_markdown, experiment_parser, write_experiment

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0, None)  # None: no differential privacy


def run_one(target_epsilon: float | None, seed: int, *, rounds: int, epochs: int, learning_rate: float,
            num_clients: int, fraction: float, clip_norm: float, alpha: float) -> dict:
    import keras
    import numpy as np

    from pyfed.federation.privacy import PrivacyLedger, noise_for_target
    from pyfed.federation.simulation import Simulation
    from pyfed.federation.strategy import FedAvg
    from pyfed.federation.strategy.dp import DifferentialPrivacy
    from pyfed.learning.data import load_dataset, split_dataset
    from pyfed.learning.model import default_model
    from pyfed.wire.protocol import FitPlan

    x, y = load_dataset("digits")
    clients, test = split_dataset(x, y, num_clients, seed=seed, scheme="dirichlet", alpha=alpha)
    keras.utils.set_random_seed(seed)
    model = default_model(tuple(x.shape[1:]), int(y.max()) + 1, learning_rate)
    strategy, noise = FedAvg(), None
    if target_epsilon is not None:
        sampled = max(1, round(fraction * num_clients))
        noise = noise_for_target(target_epsilon, DELTA, rounds, num_clients, sampled)
        strategy = DifferentialPrivacy(FedAvg(), noise_multiplier=noise, clip_norm=clip_norm, fraction=fraction,
                                       ledger=PrivacyLedger(DELTA, target_epsilon),
                                       rng=np.random.default_rng(1000 + seed))
    started = time.perf_counter()
    history = Simulation(model, clients, rounds=rounds, plan=FitPlan(epochs, 32, learning_rate), strategy=strategy,
                         test_data=test, seed=seed, progress=False,
                         fraction_fit=1.0 if target_epsilon is not None else fraction).run()
    return {"target_epsilon": target_epsilon, "seed": seed, "noise_multiplier": noise,
            "epsilon_spent": history[-1].privacy["epsilon"] if history[-1].privacy else None,
            "rounds_run": len(history), "final_accuracy": history[-1].test_accuracy,
            "accuracy_by_round": [r.test_accuracy for r in history],
            "median_round_s": statistics.median(r.duration_s for r in history),
            "seconds": round(time.perf_counter() - started, 2)}


def summarise(runs: list[dict]) -> list[list[str]]:
    baseline = statistics.median(r["median_round_s"] for r in runs if r["target_epsilon"] is None)
    rows = []
    for target in EPSILONS:
        mine = [r for r in runs if r["target_epsilon"] == target]
        if not mine:
            continue
        accuracies = [r["final_accuracy"] for r in mine]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        seconds = statistics.median(r["median_round_s"] for r in mine)
        rows.append([
            "no DP" if target is None else f"{target:g}",
            "—" if target is None else f"{mine[0]['noise_multiplier']:.3f}",
            "—" if target is None else f"{max(r['epsilon_spent'] for r in mine):.3f}",
            f"{statistics.mean(accuracies):.3f} ± {spread:.3f}",
            f"{seconds:.3f} s ({seconds / baseline:.2f}x)"])
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    header = ["target ε (δ = 1e-5)", "noise multiplier z", "ε spent", "final accuracy", "median round (vs no DP)"]
    return experiment_markdown("Differential privacy on digits: accuracy against epsilon", results, (
        f"{s['num_clients']} clients on a Dirichlet α={s['alpha']} split of digits, {s['fraction']:.0%} of them "
        f"sampled each round without replacement, {s['rounds']} rounds of {s['epochs']} local epochs (batch 32, "
        f"client Adam {s['learning_rate']}), FedAvg; with DP, each update's change clipped to L2 norm "
        f"{s['clip_norm']} and Gaussian noise of z times that on the sum, z calibrated by dp-accounting so that "
        f"the {s['rounds']} rounds spend the target ε; seeds {s['seeds']}. Final accuracy is on the 359 held-out "
        "examples after the last round, mean ± standard deviation over the seeds."), header)


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, rounds=60, clients=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=BENCH, help="directory for PRIVACY.md and PRIVACY.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.rounds, args.seeds, args.epochs = 2, 1, 1
    started = time.perf_counter()
    runs = []
    for target in EPSILONS:
        for seed in range(args.seeds):
            run = run_one(target, seed, rounds=args.rounds, epochs=args.epochs, learning_rate=args.learning_rate,
                          num_clients=args.clients, fraction=args.fraction, clip_norm=args.clip_norm, alpha=args.alpha)
            runs.append(run)
            print(f"epsilon {target}, seed {seed}: z {run['noise_multiplier']}, final accuracy "
                  f"{run['final_accuracy']:.3f}, median round {run['median_round_s']:.3f}s, {run['seconds']:.1f}s",
                  flush=True)
    results = {
        **experiment_header("privacy", argv, started),
        "settings": {"num_clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
                     "epochs": args.epochs, "learning_rate": args.learning_rate, "clip_norm": args.clip_norm,
                     "alpha": args.alpha, "seeds": list(range(args.seeds))},
        "table": summarise(runs),
        "runs": runs,
    }
    write_experiment(args.out, "PRIVACY", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
