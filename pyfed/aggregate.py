"""Aggregation arithmetic over lists of numpy arrays: pure functions, no I/O.

Every strategy builds on these. The weighted mean is computed as a running sum so that the
server holds one accumulator (float64) whatever the number of updates, instead of all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Weights = list[np.ndarray]


class WeightedSum:
    """A running weighted sum of model updates: ``add`` each as it arrives, then ``mean``.

    Memory: one float64 accumulator the size of the model plus a 2 MB scratch buffer, independent
    of how many updates are added; ``mean`` writes straight into arrays of the original dtypes.
    """

    CHUNK = 262_144  # elements of float64 scratch: products are formed a chunk at a time

    def __init__(self) -> None:
        self._sums: list[np.ndarray] | None = None
        self._dtypes: list[np.dtype] = []
        self._scratch: np.ndarray | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        """Add ``weight * arrays``; ``arrays`` must match the first update's count and shapes."""
        if not weight > 0 or not np.isfinite(weight):
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        if self._sums is None:
            self._sums = [np.zeros(a.shape, np.float64) for a in arrays]
            self._dtypes = [np.asarray(a).dtype for a in arrays]
            self._scratch = np.empty(min(self.CHUNK, max((a.size for a in arrays), default=0)), np.float64)
        elif len(arrays) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} arrays, got {len(arrays)}")
        w = np.float64(weight)
        for total, array in zip(self._sums, arrays):
            if array.shape != total.shape:
                raise ValueError(f"array shape {array.shape} does not match {total.shape}")
            flat_total, flat_array = total.reshape(-1), np.asarray(array).reshape(-1)
            for start in range(0, flat_total.size, self.CHUNK):
                stop = min(start + self.CHUNK, flat_total.size)
                product = self._scratch[: stop - start]
                np.multiply(flat_array[start:stop], w, out=product)
                flat_total[start:stop] += product
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> Weights:
        """The weighted mean, cast back to each array's original dtype (integers rounded)."""
        if self._sums is None:
            raise ValueError("no updates were added")
        weight = np.float64(self.total_weight)
        return [_divided(total, weight, dtype) for total, dtype in zip(self._sums, self._dtypes)]


def _divided(total: np.ndarray, weight: np.float64, dtype: np.dtype) -> np.ndarray:
    """``total / weight`` in ``dtype``; floats are computed in float64 and cast without a temporary."""
    if dtype.kind == "f":
        return np.divide(total, weight, out=np.empty(total.shape, dtype), casting="unsafe")
    values = total / weight
    if dtype.kind == "b":
        return values >= 0.5
    return np.rint(values).astype(dtype)


def weighted_average(updates: Iterable[tuple[Sequence[np.ndarray], float]]) -> Weights:
    """FedAvg's rule: the mean of each array across updates, weighted by (e.g.) ``num_examples``."""
    total = WeightedSum()
    for arrays, weight in updates:
        total.add(arrays, weight)
    return total.mean()
