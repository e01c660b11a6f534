"""The strategy contract: who trains in a round, with which plan, and how updates are combined.

Two paired verbs, as in Flower: :meth:`Strategy.configure_fit` (choose the clients and their
plan) and :meth:`Strategy.aggregate` (combine a round's results into new global weights). A
strategy keeps what it needs across rounds in :meth:`Strategy.state` / :meth:`Strategy.load_state`
so that the server can checkpoint it.

A custom strategy only needs ``aggregate``. Rules that can fold updates in one at a time (the
FedAvg family) override :meth:`Strategy.aggregator` instead, so the server holds one running sum
rather than every update: memory O(model) whatever the number of clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from pyfed.federation.aggregate import Weights, WeightedSum
from pyfed.wire.protocol import FitPlan


@dataclass
class FitResult:
    """One client's answer to a round: its trained weights, how many examples, its metrics."""

    client_id: str
    weights: Sequence[np.ndarray]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    """Receives a round's updates one at a time, then gives the new global weights."""

    def add(self, result: FitResult) -> None: ...

    def result(self) -> Weights: ...


@dataclass
class Strategy:
    """Base strategy: every available client trains with the server's plan.

    Subclasses implement :meth:`aggregate` (or, to stream, :meth:`aggregator`). Parameters are
    dataclass fields, so ``make_strategy(name, **options)`` can pass them by name.
    """

    name: ClassVar[str] = "base"

    def configure_fit(self, server_round: int, available: Sequence[str], plan: FitPlan) -> list[tuple[str, FitPlan]]:
        """The (client_id, plan) pairs that train in ``server_round``."""
        return [(client_id, plan) for client_id in available]

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        """The new global weights from this round's results (at least one)."""
        raise NotImplementedError

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        """A fresh aggregator for ``server_round``: by default it keeps the results for :meth:`aggregate`."""
        return _Collecting(self, server_round, global_weights)

    def min_fit_clients(self) -> int:
        """The fewest updates a round needs for this rule to mean anything (checked at start-up)."""
        return 1

    def holds_updates(self) -> bool:
        """Whether the rule holds every update of a round until it ends (one dense model copy each),
        rather than folding each into a running sum as it arrives (federation/memory.py)."""
        return type(self).aggregator is Strategy.aggregator

    def why_not_run(self, server_round: int, available: int) -> str | None:
        """Why the run must end before ``server_round`` with ``available`` clients connected (a privacy
        budget spent, say), or None to run it."""
        return None

    def privacy_report(self) -> dict[str, float] | None:
        """Figures of the round just aggregated for its record (summary.json, TensorBoard), or None."""
        return None

    def open_privacy(self, directory: Path | None, *, run: str, completed_rounds: int, resumed: bool,
                     set_aside: Sequence[int] = (), fresh_start: bool = False) -> str:
        """A private strategy reads its privacy ledger in ``directory`` before the run's first round
        (federation/privacy.py) and says which run its releases belong to; others keep ``run``."""
        return run

    def close_privacy(self) -> None:
        """The run ended (every round, or the budget): a private strategy's ledger says so."""

    def state(self) -> dict[str, Any]:
        """Everything needed to resume this strategy: JSON values and lists of numpy arrays.

        The arrays are shared, not copied: a strategy replaces its state arrays on each step and
        never modifies them in place, so a returned state stays valid (the engine keeps one to
        roll back a refused round, and hands one to the checkpoint writer)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    def describe(self) -> dict[str, Any]:
        """The strategy's name and parameters, for logs and summary.json."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


class _Collecting:
    """Keeps each result (its weights are views of the received frames) until the round ends."""

    def __init__(self, strategy: Strategy, server_round: int, global_weights: Weights):
        self._strategy, self._round, self._global = strategy, server_round, global_weights
        self._results: list[FitResult] = []

    def add(self, result: FitResult) -> None:
        self._results.append(dataclasses.replace(result, weights=list(result.weights)))

    def result(self) -> Weights:
        if not self._results:
            raise ValueError("no updates were added")
        return self._strategy.aggregate(self._round, self._global, self._results)


@dataclass
class WeightedMeanStrategy(Strategy):
    """The FedAvg family: a streamed weighted mean of the updates, then :meth:`server_update`."""

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        return _Streaming(self, global_weights)

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        streaming = _Streaming(self, global_weights)
        for result in results:
            streaming.add(result)
        return streaming.result()

    def server_update(self, global_weights: Weights, mean: Weights) -> Weights:
        """The new global weights given the round's weighted mean; FedAvg takes the mean itself."""
        return mean


class _Streaming:
    def __init__(self, strategy: WeightedMeanStrategy, global_weights: Weights):
        self._strategy, self._global = strategy, global_weights
        self._sum = WeightedSum()

    def add(self, result: FitResult) -> None:
        self._sum.add(result.weights, result.num_examples)

    def result(self) -> Weights:
        return self._strategy.server_update(self._global, self._sum.mean())


def sample_clients(available: Sequence[str], fraction: float, minimum: int, seed: Sequence[int]) -> list[str]:
    """The clients asked to train: ``ceil(fraction * n)`` of the ``n`` available (at least
    ``minimum``, at most all), drawn without replacement, reproducibly for a given ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    available = sorted(available)
    count = min(len(available), max(minimum, int(np.ceil(fraction * len(available) - 1e-9))))
    if count >= len(available):
        return available
    chosen = np.random.default_rng(list(seed)).choice(len(available), size=count, replace=False)
    return [available[i] for i in sorted(chosen)]
