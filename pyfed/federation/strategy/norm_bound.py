"""Norm bounding: Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?",
2019 (arXiv:1911.07963). Each client's update, its change from the global model, is scaled down
to L2 norm at most ``max_norm`` before the strategy sees it, so one client can move the global
model by at most ``max_norm`` times its weight in the aggregate, however extreme what it sends.

A wrapper, so it works with every strategy: ``NormBound(FedAvg(), max_norm=5.0)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyfed.federation.aggregate import Weights, clip_update
from .base import Aggregator, FitPlan, FitResult, Strategy

log = logging.getLogger("pyfed.strategy")


class NormBound(Strategy):
    """Clips every update's change to ``max_norm`` (L2, over the float arrays), then hands it to ``inner``."""

    def __init__(self, inner: Strategy, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.inner, self.max_norm = inner, float(max_norm)
        self.name = inner.name

    def clip(self, server_round: int, global_weights: Weights, result: FitResult) -> FitResult:
        weights, norm = clip_update(result.weights, global_weights, self.max_norm)
        if norm > self.max_norm:
            log.info("round %d: update from %s has norm %.4g; scaled to %.4g", server_round, result.client_id,
                     norm, self.max_norm)
        return replace(result, weights=weights)

    def configure_fit(self, server_round: int, available: Sequence[str], plan: FitPlan) -> list[tuple[str, FitPlan]]:
        return self.inner.configure_fit(server_round, available, plan)

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        return self.inner.aggregate(server_round, global_weights,
                                    [self.clip(server_round, global_weights, r) for r in results])

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        return _Clipping(self, self.inner.aggregator(server_round, global_weights), server_round, global_weights)

    def min_fit_clients(self) -> int:
        return self.inner.min_fit_clients()

    def holds_updates(self) -> bool:
        return self.inner.holds_updates()

    def why_not_run(self, server_round: int, available: int) -> str | None:
        return self.inner.why_not_run(server_round, available)

    def privacy_report(self) -> dict[str, float] | None:
        return self.inner.privacy_report()

    def open_privacy(self, directory: Path | None, **kwargs: Any) -> str:
        return self.inner.open_privacy(directory, **kwargs)

    def close_privacy(self) -> None:
        self.inner.close_privacy()

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.inner.load_state(state)

    def describe(self) -> dict[str, Any]:
        """The inner strategy's description: the bound changes no state, so a run may resume with
        another bound (it is in summary.json's config)."""
        return self.inner.describe()


class _Clipping:
    def __init__(self, bound: NormBound, inner: Aggregator, server_round: int, global_weights: Weights):
        self._bound, self._inner, self._round, self._global = bound, inner, server_round, global_weights

    def add(self, result: FitResult) -> None:
        self._inner.add(self._bound.clip(self._round, self._global, result))

    def result(self) -> Weights:
        return self._inner.result()
