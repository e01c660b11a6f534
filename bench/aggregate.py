"""Aggregation at scale: FedAvg over N = 10, 100, 1,000 updates of the seed model, arriving one by one.

PyFed's FedAvg folds each update into a running float64 weighted sum (pyfed.federation.aggregate.WeightedSum),
so memory should not grow with N. Compared, in the same run, with a plain numpy axpy loop
(``acc += w * update`` per array, float64 accumulator). Peak memory is what tracemalloc sees numpy
allocate above the baseline, in copies of the model (21.6 MB); the updates themselves come from a
small pool of pre-made arrays, as if each had just been received.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from bench.common import emit, seed_weights, table
from pyfed.federation.aggregate import WeightedSum

POOL = 4


def _pool() -> list[list[np.ndarray]]:
    return [seed_weights(seed=s) for s in range(POOL)]


def _measure(function, *args) -> tuple[float, float]:
    """(seconds, peak bytes allocated above the baseline) of ``function(*args)``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    function(*args)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return seconds, peak


def pyfed_fedavg(pool: list[list[np.ndarray]], n: int) -> list[np.ndarray]:
    total = WeightedSum()
    for i in range(n):
        total.add(pool[i % POOL], 100 + i % 13)
    return total.mean()


def numpy_axpy(pool: list[list[np.ndarray]], n: int) -> list[np.ndarray]:
    sums = [np.zeros(a.shape, np.float64) for a in pool[0]]
    weight_total = 0.0
    for i in range(n):
        w = float(100 + i % 13)
        for acc, a in zip(sums, pool[i % POOL]):
            acc += w * a
        weight_total += w
    return [(acc / weight_total).astype(np.float32) for acc in sums]


def run(quick: bool = False) -> dict:
    pool = _pool()
    model_bytes = sum(a.nbytes for a in pool[0])
    sizes = [10, 20] if quick else [10, 100, 1000]
    rows, result = [], {"model_bytes": model_bytes, "n": {}}
    np.testing.assert_allclose(pyfed_fedavg(pool, 7)[0], numpy_axpy(pool, 7)[0], rtol=1e-5, atol=1e-6)
    for n in sizes:
        t_pyfed, peak_pyfed = _measure(pyfed_fedavg, pool, n)
        t_axpy, peak_axpy = _measure(numpy_axpy, pool, n)
        entry = {"pyfed_s": t_pyfed, "axpy_s": t_axpy, "pyfed_ms_per_update": t_pyfed / n * 1000,
                 "ratio_to_axpy": t_pyfed / t_axpy, "pyfed_peak_model_copies": peak_pyfed / model_bytes,
                 "axpy_peak_model_copies": peak_axpy / model_bytes}
        result["n"][n] = entry
        rows.append([n, t_pyfed, entry["pyfed_ms_per_update"], t_axpy, entry["ratio_to_axpy"],
                     entry["pyfed_peak_model_copies"], peak_pyfed / 1e6])
    markdown = table("Aggregation: FedAvg over N updates of the seed model, one by one",
                     ["N", "PyFed s", "ms per update", "numpy axpy s", "PyFed / axpy", "peak memory (model copies)",
                      "peak MB"], rows)
    emit("aggregate", result, markdown)
    return {**result, "_markdown": markdown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
