"""Byzantine-robust aggregation: the server must hold every update, so these rules do not stream.

* FedMedian and trimmed mean: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018 (coordinate-wise median; coordinate-wise beta-trimmed mean).
* Krum: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017. Multi-Krum: El Mhamdi et al., "The Hidden Vulnerability of Distributed
  Learning in Byzantium", ICML 2018.

Robust rules are unweighted by design: weighting by ``num_examples`` would let one client that
claims many examples dominate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pyfed.federation.aggregate import Weights, coordinate_median, krum_select, trimmed_mean, weighted_average
from pyfed.ranges import Range

from .base import FitResult, Strategy

log = logging.getLogger("pyfed.strategy")


@dataclass
class FedMedian(Strategy):
    """The coordinate-wise median of the clients' weights (Yin et al. 2018)."""

    name = "fedmedian"

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        return coordinate_median([r.weights for r in results])


@dataclass
class TrimmedMean(Strategy):
    """The coordinate-wise mean after trimming a ``trim_fraction`` (beta) from each end (Yin et al. 2018)."""

    name = "trimmed-mean"
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        Range(0, 0.5, high_open=True).check(self.trim_fraction, "trim_fraction")

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        return trimmed_mean([r.weights for r in results], self.trim_fraction)


@dataclass
class Krum(Strategy):
    """The single update closest to its ``n - f - 2`` nearest neighbours (Blanchard et al. 2017).

    ``num_byzantine`` is f, the number of malicious clients to tolerate; Krum needs ``n >= 2f + 3``.
    """

    name = "krum"
    num_byzantine: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_byzantine, int) or self.num_byzantine < 0:
            raise ValueError(f"num_byzantine must be a non-negative integer, got {self.num_byzantine!r}")

    def min_fit_clients(self) -> int:
        return 2 * self.num_byzantine + 3

    def _selected(self, server_round: int, results: Sequence[FitResult], count: int) -> list[FitResult]:
        if len(results) < self.min_fit_clients():
            log.warning("round %d: %s with f=%d wants at least %d updates, got %d; its guarantee does not hold",
                        server_round, self.name, self.num_byzantine, self.min_fit_clients(), len(results))
        chosen = krum_select([r.weights for r in results], self.num_byzantine, min(count, len(results)))
        log.info("round %d: %s kept %s", server_round, self.name, ", ".join(results[i].client_id for i in chosen))
        return [results[i] for i in chosen]

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        return [a.copy() for a in self._selected(server_round, results, 1)[0].weights]


@dataclass
class MultiKrum(Krum):
    """The mean of the ``num_selected`` best-scored updates (El Mhamdi et al. 2018); 0 means n - f."""

    name = "multi-krum"
    num_selected: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_selected, int) or self.num_selected < 0:
            raise ValueError(f"num_selected must be a non-negative integer, got {self.num_selected!r}")

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        count = self.num_selected or max(len(results) - self.num_byzantine, 1)
        return weighted_average([(r.weights, 1.0) for r in self._selected(server_round, results, count)])
