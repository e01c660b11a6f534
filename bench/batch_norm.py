"""A model with BatchNorm, federated and trained centrally: IID sites, and sites whose features differ.

    python -m bench.batch_norm             # the committed table (a few minutes on 2 cores)
    python -m bench.batch_norm --quick     # 2 rounds x 1 seed, to check the script

Each federated run is an in-process simulation (``pyfed.federation.simulation``) of 3 sites on
scikit-learn's digits with a user's model that has two BatchNormalization layers, compiled with its
own Adam learning rate. The centralised run trains the same model, from the same initial weights, on
the union of the sites' training rows for as many epochs as a site trains in the whole federated run
(rounds x local epochs), with the same batch size.

- **IID**: the sites are an IID split; every model is scored on the same held-out test set.
- **Label skew**: the sites' labels follow a Dirichlet split (alpha 0.3), so each site's batches, and
  the moving statistics its BatchNorm layers keep, differ; scored on the common test set.
- **Feature shift**: the same IID split, but each site sees its features through its own affine map
  (site 1 as they are; site 2 times 4 plus 2; site 3 times 0.25 minus 1), as sites whose scanners or
  sensors differ do. Each site holds out a fifth of its rows, and each model is scored on every
  site's held-out rows, as the FedBN paper evaluates (Li et al., "FedBN: Federated Learning on Non-IID
  Features via Local Batch Normalization", ICLR 2021): FedAvg's global model, FedBN's model of each
  site (the global model with the site's own BatchNorm layers), the centralised model.

FedAvg is scored twice from one run: its last round's global model, whose BatchNorm moving statistics
are the sites' averaged ones, and the model PyFed exports, whose statistics are recalibrated after
the last round from what the layers receive at the sites (pooled exactly; ``RECALIBRATE_BATCH_NORM``).

Writes bench/BATCH_NORM.md and bench/BATCH_NORM.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from bench.common import (experiment_args, experiment_header, experiment_markdown, mean_and_spread,
                          write_experiment)

NUM_SITES = 3
EVAL_FRACTION = 0.2
BATCH_SIZE = 32
#: each site's view of the features: x * scale + shift
FEATURE_SHIFTS = [(1.0, 0.0), (4.0, 2.0), (0.25, -1.0)]
#: the label-skewed case's Dirichlet concentration
ALPHA = 0.3
CASES = {"iid": "IID sites, common test set", "label_skew": f"label-skewed sites (Dirichlet {ALPHA}), common test set",
         "shifted": "feature-shifted sites (x, 4x+2, x/4-1), each site's held-out rows"}
METHODS = ("central", "fedavg", "fedavg_recalibrated", "fedbn")


def build_model(learning_rate: float):
    import keras

    model = keras.Sequential([
        keras.layers.Input((64,)),
        keras.layers.Dense(64), keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
        keras.layers.Dense(64), keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def sites(seed: int, case: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The sites' (x, y) and the common test set (shifted: each site's rows and no common test set)."""
    from pyfed.learning.data import load_dataset, split_dataset

    x, y = load_dataset("digits")
    clients, test = split_dataset(x, y, NUM_SITES, seed=seed, scheme="dirichlet" if case == "label_skew" else "iid",
                                  alpha=ALPHA)
    if case == "shifted":
        clients = [((cx * scale + shift).astype(np.float32), cy) for (cx, cy), (scale, shift) in
                   zip(clients, FEATURE_SHIFTS)]
    return clients, test


def held_out_rows(clients: list, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (training, held-out) rows of each site in a simulation (its trainer's seed is the run's plus its index)."""
    from pyfed.learning.training import holdout_split

    return [holdout_split(len(cy), EVAL_FRACTION, seed + index) for index, (_, cy) in enumerate(clients)]


def on_sites_held_out_rows(model, clients: list, rows: list) -> dict:
    """``model``'s accuracy on each site's held-out rows, and over them all."""
    per_site = {f"client-{index + 1}": float(model.evaluate(cx[held], cy[held], verbose=0)[1])
                for index, ((cx, cy), (_, held)) in enumerate(zip(clients, rows))}
    sizes = [len(held) for _, held in rows]
    return {"accuracy": float(np.average(list(per_site.values()), weights=sizes)), "per_site": per_site}


def central(seed: int, case: str, *, epochs: int, learning_rate: float) -> dict:
    """One model on every site's training rows; its test accuracy, or (shifted) its accuracy on each
    site's held-out rows."""
    import keras

    from pyfed.learning.model import training_dataset

    clients, (x_test, y_test) = sites(seed, case)
    keras.utils.set_random_seed(seed)
    model = build_model(learning_rate)
    if case == "shifted":
        rows = held_out_rows(clients, seed)
        x = np.concatenate([cx[train] for (cx, _), (train, _) in zip(clients, rows)])
        y = np.concatenate([cy[train] for (_, cy), (train, _) in zip(clients, rows)])
    else:
        x, y = np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])
    model.fit(training_dataset(x, y, BATCH_SIZE, seed=seed), epochs=epochs, verbose=0, shuffle=False)  # tf.data shuffles
    if case != "shifted":
        return {"accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1])}
    return on_sites_held_out_rows(model, clients, rows)


def federated(seed: int, case: str, local_layers: str, *, rounds: int, epochs: int,
              learning_rate: float) -> list[dict]:
    """FedAvg (local_layers "none": its last round's model, then the exported one with recalibrated
    BatchNorm statistics) or FedBN ("batchnorm"): the test accuracy, or (shifted) the accuracy on the
    sites' held-out rows (FedBN: each site's own model, by federated evaluation)."""
    import keras

    from pyfed.federation.moments import BatchNormLayer, SiteStatistics
    from pyfed.federation.simulation import Simulation
    from pyfed.learning.model import batch_norm_arrays
    from pyfed.wire.protocol import FitPlan

    shifted = case == "shifted"
    clients, test = sites(seed, case)
    keras.utils.set_random_seed(seed)
    model = build_model(learning_rate)
    recalibrate = local_layers == "none"
    statistics = SiteStatistics(batch_norm=tuple(BatchNormLayer(*found) for found in batch_norm_arrays(model))
                                if recalibrate else ())
    plan = FitPlan(epochs, BATCH_SIZE, learning_rate, local_layers=local_layers,
                   eval_fraction=EVAL_FRACTION if shifted else 0.0)
    simulation = Simulation(model, clients, rounds=rounds, plan=plan, test_data=None if shifted else test, seed=seed,
                            progress=False, statistics=statistics)
    history = simulation.run()
    last = history[-1]
    if not shifted:
        runs = [{"method": "fedbn" if not recalibrate else "fedavg", "accuracy": last.test_accuracy,
                 "by_round": [r.test_accuracy for r in history]}]
        if recalibrate:
            runs.append({"method": "fedavg_recalibrated", "accuracy": simulation.engine.final_metrics[1],
                         "recalibrated": simulation.engine.recalibrated})
        return runs
    evaluation = last.federated_evaluation
    runs = [{"method": "fedbn" if not recalibrate else "fedavg", "accuracy": evaluation["accuracy"],
             "by_round": [r.federated_evaluation["accuracy"] for r in history],
             "per_site": {cid: part["accuracy"] for cid, part in evaluation["clients"].items()}}]
    if recalibrate:  # the exported global model on each site's held-out rows
        exported = build_model(learning_rate)
        exported.set_weights(simulation.engine.weights)
        runs.append({"method": "fedavg_recalibrated", "recalibrated": simulation.engine.recalibrated,
                     **on_sites_held_out_rows(exported, clients, held_out_rows(clients, seed))})
    return runs


def summarise(runs: list[dict]) -> list[list[str]]:
    rows = []
    for case, label in CASES.items():
        mine = {method: [r["accuracy"] for r in runs if r["case"] == case and r["method"] == method]
                for method in METHODS}
        gap = [c - f for c, f in zip(mine["central"], mine["fedavg_recalibrated"])]
        kept = [r["recalibrated"] for r in runs if r["case"] == case and r["method"] == "fedavg_recalibrated"]
        rows.append([label, *(mean_and_spread(mine[method]) for method in METHODS), f"{sum(kept)}/{len(kept)}",
                     f"{statistics.mean(gap) * 100:+.1f}"])
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    header = ["case", "centralised", "FedAvg, averaged BatchNorm statistics", "FedAvg, exported (recalibrated)",
              "FedBN (LOCAL_LAYERS=batchnorm)", "runs that kept the recalibration",
              "centralised - FedAvg exported (points)"]
    return experiment_markdown("A model with BatchNorm: federated vs centralised", results, (
        f"{NUM_SITES} sites on digits, a user's model with two BatchNormalization layers (Dense 64, BatchNorm, "
        f"ReLU, twice; softmax), compiled with Adam at {s['learning_rate']}; {s['rounds']} rounds of {s['epochs']} "
        f"local epochs against {s['rounds'] * s['epochs']} centralised epochs on the union of the sites' training "
        f"rows, batch {BATCH_SIZE}, seeds {s['seeds']}. Label skew: a Dirichlet ({ALPHA}) split of the labels. "
        "Feature shift: site 1 sees the features as they are, "
        "site 2 times 4 plus 2, site 3 times 0.25 minus 1; each site holds out a fifth of its rows. Accuracy: mean "
        "± standard deviation over the seeds; on the common test set (FedBN: the global model, with the "
        "sites' averaged BatchNorm layers), feature shift on every site's held-out rows (FedBN: each site's own "
        "model). FedAvg's two columns are one run: its last round's global model, whose BatchNorm moving "
        "statistics are the sites' average, and the model PyFed exports, whose statistics are recalibrated from "
        "the sites after the last round, unless the averaged ones score better on the server's test set (the "
        "feature-shifted case has none: always recalibrated)."), header)


def main(argv: list[str] | None = None) -> int:
    args = experiment_args(__doc__, argv, name="BATCH_NORM", rounds=10, clients=NUM_SITES)
    started = time.perf_counter()
    runs = []
    for case in CASES:
        for seed in range(args.seeds):
            for method in ("central", "fedavg", "fedbn"):
                began = time.perf_counter()
                if method == "central":
                    found = [{"method": "central", **central(seed, case, epochs=args.rounds * args.epochs,
                                                             learning_rate=args.learning_rate)}]
                else:
                    found = federated(seed, case, "batchnorm" if method == "fedbn" else "none", rounds=args.rounds,
                                      epochs=args.epochs, learning_rate=args.learning_rate)
                for run in found:
                    run.update(case=case, seed=seed, seconds=round(time.perf_counter() - began, 1))
                    runs.append(run)
                    print(f"{case:<10} {run['method']:<20} seed {seed}: accuracy {run['accuracy']:.3f} "
                          f"({run['seconds']:.0f}s)", flush=True)
    results = {
        **experiment_header("batch_norm", argv, started),
        "settings": {"rounds": args.rounds, "epochs": args.epochs, "learning_rate": args.learning_rate,
                     "seeds": list(range(args.seeds)), "feature_shifts": FEATURE_SHIFTS, "alpha": ALPHA},
        "table": summarise(runs),
        "runs": runs,
    }
    write_experiment(args.out, "BATCH_NORM", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
