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

import argparse
import statistics
import sys
import time

from bench.common import experiment_args, experiment_header, experiment_markdown, write_experiment

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0, None)  # None: no differential privacy
LEVER_EPSILON = 8.0
# What moves accuracy at one epsilon: (what changes, target epsilon or None, settings over the defaults).
# The noise on the averaged update is z * C / m per coordinate (m clients a round): a smaller clip norm
# C, if updates are small, and more clients (for the same fraction, z stays), each cut it.
LEVERS = (
    ("10 of 100 clients a round, C = 1 (the table above)", LEVER_EPSILON, {}),
    ("10 of 100 clients a round, C = 0.1", LEVER_EPSILON, {"clip_norm": 0.1}),
    ("144 of 1438 one-example clients a round, 1 epoch, C = 0.1", LEVER_EPSILON,
     {"num_clients": 1438, "clip_norm": 0.1, "epochs": 1}),
    ("144 of 1438 one-example clients a round, 1 epoch, no DP", None, {"num_clients": 1438, "epochs": 1}),
)


def run_one(target_epsilon: float | None, seed: int, *, rounds: int, epochs: int, learning_rate: float,
            num_clients: int, fraction: float, clip_norm: float, alpha: float, adaptive_quantile: float | None = None,
            server_momentum: float = 0.0) -> dict:
    import keras
    import numpy as np

    from pyfed.federation.privacy import PrivacyLedger, noise_for_target
    from pyfed.federation.simulation import Simulation
    from pyfed.federation.strategy import FedAvg, FedAvgM
    from pyfed.federation.strategy.dp import AdaptiveClipping, DifferentialPrivacy
    from pyfed.learning.data import load_dataset, split_dataset
    from pyfed.learning.model import default_model
    from pyfed.wire.protocol import FitPlan

    x, y = load_dataset("digits")
    clients, test = split_dataset(x, y, num_clients, seed=seed, scheme="dirichlet", alpha=alpha)
    keras.utils.set_random_seed(seed)
    model = default_model(tuple(x.shape[1:]), int(y.max()) + 1, learning_rate)
    strategy, noise = FedAvgM(server_momentum=server_momentum) if server_momentum else FedAvg(), None
    if target_epsilon is not None:
        sampled = max(1, round(fraction * num_clients))
        noise = noise_for_target(target_epsilon, DELTA, rounds, num_clients, sampled)
        adaptive = AdaptiveClipping(adaptive_quantile) if adaptive_quantile is not None else None
        strategy = DifferentialPrivacy(strategy, noise_multiplier=noise, clip_norm=clip_norm, fraction=fraction,
                                       ledger=PrivacyLedger(DELTA, target_epsilon), adaptive=adaptive,
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


def summarise_levers(runs: list[dict], settings: dict) -> list[list[str]]:
    rows = []
    for label, target, overrides in LEVERS:
        mine = [r for r in runs if r["lever"] == label]
        accuracies = [r["final_accuracy"] for r in mine]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        options = {**settings, **overrides}
        sampled = max(1, round(options["fraction"] * options["num_clients"]))
        z = mine[0]["noise_multiplier"]
        rows.append([label, "no DP" if target is None else f"{target:g}", "—" if z is None else f"{z:.3f}",
                     "—" if z is None else f"{z * options['clip_norm'] / sampled:.2g}",
                     f"{statistics.mean(accuracies):.3f} ± {spread:.3f}"])
    return rows


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
    levers = ["", f"## What moves accuracy at ε = {LEVER_EPSILON:g}", "",
              "The noise on the averaged update has standard deviation z·C/m per coordinate, for m clients a round; "
              "the clipped updates it hides are at most C long. Same settings as above except as the first column "
              "says (one-example clients: each of the 1438 training examples is its own client).", "",
              "| settings | target ε | z | noise std on the mean, z·C/m | final accuracy |", "|---|---|---|---|---|",
              *("| " + " | ".join(row) + " |" for row in results.get("levers", [])), ""] if results.get("levers") else []
    return experiment_markdown("Differential privacy on digits: accuracy against epsilon", results, (
        f"{s['num_clients']} clients on a Dirichlet α={s['alpha']} split of digits, {s['fraction']:.0%} of them "
        f"sampled each round without replacement, {s['rounds']} rounds of {s['epochs']} local epochs (batch 32, "
        f"client Adam {s['learning_rate']}), FedAvg; with DP, each update's change clipped to L2 norm "
        f"{s['clip_norm']} and Gaussian noise of z times that on the sum, z calibrated by dp-accounting so that "
        f"the {s['rounds']} rounds spend the target ε; seeds {s['seeds']}. Final accuracy is on the 359 held-out "
        "examples after the last round, mean ± standard deviation over the seeds."), header) + "\n".join(levers)


def main(argv: list[str] | None = None) -> int:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fraction", type=float, default=0.1)
        parser.add_argument("--clip-norm", type=float, default=1.0)
        parser.add_argument("--alpha", type=float, default=0.5)

    args = experiment_args(__doc__, argv, name="PRIVACY", rounds=60, clients=100, more=more)
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
    settings = {"num_clients": args.clients, "fraction": args.fraction, "clip_norm": args.clip_norm,
                "epochs": args.epochs}
    lever_runs = []
    for label, target, overrides in ([] if args.quick else LEVERS):
        for seed in range(args.seeds):
            if not overrides and target is not None:  # the main table's run
                run = next(r for r in runs if r["target_epsilon"] == target and r["seed"] == seed)
            else:
                options = {**settings, **overrides}
                run = run_one(target, seed, rounds=args.rounds, epochs=options["epochs"],
                              learning_rate=args.learning_rate, num_clients=options["num_clients"],
                              fraction=options["fraction"], clip_norm=options["clip_norm"], alpha=args.alpha)
            lever_runs.append({**run, "lever": label})
            print(f"{label}, seed {seed}: final accuracy {run['final_accuracy']:.3f}", flush=True)
    results = {
        **experiment_header("privacy", argv, started),
        "settings": {"num_clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
                     "epochs": args.epochs, "learning_rate": args.learning_rate, "clip_norm": args.clip_norm,
                     "alpha": args.alpha, "seeds": list(range(args.seeds))},
        "table": summarise(runs),
        "levers": summarise_levers(lever_runs, settings) if lever_runs else [],
        "runs": runs,
        "lever_runs": lever_runs,
    }
    write_experiment(args.out, "PRIVACY", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
