"""The default model on an unscaled CSV, federated, against a centralised standardised logistic regression.

    python -m bench.feature_scaling            # the committed table (about a minute on 2 cores)
    python -m bench.feature_scaling --quick    # 2 rounds x 1 seed, to check the script

The breast-cancer data as scikit-learn ships it (569 rows, 30 features from 0.001 to 4,254), saved as
a CSV in ``bench/data`` (nothing downloads; see its README), is read by PyFed's CSV reader, then
split as ``pyfed simulate`` splits it: a fifth held out for testing, the rest IID over 3 sites.
Federated: PyFed's default model for it, trained by an in-process simulation, with its feature
scaling set before round 1 from the sites' pooled moments (what ``pyfed simulate`` and ``pyfed
server`` do), and, to show what the scaling is for, the same model without it. Centralised: a
standardised logistic regression (L2-penalised, C = 1, scikit-learn's default objective, solved by
Newton's method here) on the union of the sites' rows. All score
the same held-out rows. Writes bench/FEATURE_SCALING.md and bench/FEATURE_SCALING.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (experiment_args, experiment_header, experiment_markdown, mean_and_spread,
                          write_experiment)

NUM_SITES = 3
BATCH_SIZE = 32


DATA = Path(__file__).resolve().parent / "data" / "breast-cancer.csv"  # see bench/data/README.md


def split(csv: Path, seed: int):
    from pyfed.learning.data import ReadOptions, load_dataset, split_dataset

    x, y = load_dataset(f"csv:{csv}", ReadOptions(label_column="diagnosis"))
    return x, split_dataset(x, y, NUM_SITES, seed=seed, scheme="iid")


def logistic_regression(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Weights (bias last) minimising the logistic loss summed over the rows plus ``l2``/2 times the
    squared weights (not the bias): scikit-learn's default LogisticRegression objective (C = 1/l2),
    by Newton's method, which converges in a few steps on standardised features."""
    design = np.c_[x, np.ones(len(x))]
    weights = np.zeros(design.shape[1])
    penalty = np.r_[np.full(x.shape[1], l2), 0.0]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-design @ weights))
        gradient = design.T @ (p - y) + penalty * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return weights


def centralised(csv: Path, seed: int) -> dict:
    """A standardised logistic regression on the union of the sites' rows (standardised by their
    mean and standard deviation), scored on the held-out rows."""
    _, (sites, (x_test, y_test)) = split(csv, seed)
    x = np.concatenate([s[0] for s in sites]).astype(np.float64)
    y = np.concatenate([s[1] for s in sites]).astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    weights = logistic_regression((x - mean) / std, y)
    predicted = (np.c_[(x_test - mean) / std, np.ones(len(x_test))] @ weights) > 0
    return {"accuracy": float(np.mean(predicted == (y_test == 1)))}


def federated(csv: Path, seed: int, *, scaled: bool, rounds: int, epochs: int, learning_rate: float) -> dict:
    import keras

    from pyfed.federation.moments import FeatureScaling, SiteStatistics
    from pyfed.federation.simulation import Simulation
    from pyfed.learning.model import default_model, feature_scaling_indices, needs_scaling
    from pyfed.wire.protocol import FitPlan

    x, (sites, test) = split(csv, seed)
    keras.utils.set_random_seed(seed)
    model = default_model(tuple(x.shape[1:]), 2, learning_rate, feature_scaling=scaled and needs_scaling(x))
    indices = feature_scaling_indices(model)
    history = Simulation(model, sites, rounds=rounds, plan=FitPlan(epochs, BATCH_SIZE, learning_rate), test_data=test,
                         seed=seed, progress=False,
                         statistics=SiteStatistics(FeatureScaling(*indices) if indices else None)).run()
    return {"accuracy": history[-1].test_accuracy, "by_round": [r.test_accuracy for r in history],
            "scaled": indices is not None}



def markdown(results: dict) -> str:
    s = results["settings"]
    header = ["case", "centralised standardised logistic regression", "federated, feature scaling from the sites",
              "federated, unscaled", "centralised - federated scaled (points)"]
    return experiment_markdown("The default model on an unscaled CSV: federated vs centralised", results, (
        f"The breast-cancer data as scikit-learn ships it, saved as CSV (569 rows, 30 features), a fifth held out, the rest IID over "
        f"{NUM_SITES} sites; PyFed's default model (an MLP), Adam at {s['learning_rate']}, {s['rounds']} rounds of "
        f"{s['epochs']} local epochs, batch {BATCH_SIZE}; seeds {s['seeds']} (each its own split). Test accuracy on "
        "the held-out rows, mean ± standard deviation over the seeds."), header)


def main(argv: list[str] | None = None) -> int:
    args = experiment_args(__doc__, argv, name="FEATURE_SCALING", rounds=10, clients=NUM_SITES)
    started = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for method in ("central", "scaled", "unscaled"):
            began = time.perf_counter()
            run = (centralised(DATA, seed) if method == "central" else
                   federated(DATA, seed, scaled=method == "scaled", rounds=args.rounds, epochs=args.epochs,
                             learning_rate=args.learning_rate))
            run.update(method=method, seed=seed, seconds=round(time.perf_counter() - began, 1))
            runs.append(run)
            print(f"{method:<9} seed {seed}: accuracy {run['accuracy']:.3f} ({run['seconds']:.0f}s)", flush=True)
    by = {m: [r["accuracy"] for r in runs if r["method"] == m] for m in ("central", "scaled", "unscaled")}
    gap = statistics.mean(c - f for c, f in zip(by["central"], by["scaled"]))
    results = {
        **experiment_header("feature_scaling", argv, started),
        "settings": {"rounds": args.rounds, "epochs": args.epochs, "learning_rate": args.learning_rate,
                     "seeds": list(range(args.seeds))},
        "table": [["breast cancer, 3 IID sites", mean_and_spread(by["central"]), mean_and_spread(by["scaled"]),
                   mean_and_spread(by["unscaled"]), f"{gap * 100:+.1f}"]],
        "runs": runs,
    }
    write_experiment(args.out, "FEATURE_SCALING", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
