"""Federated strategies: who trains in a round, with which plan, and how updates are combined.

The contract is two paired verbs, as in Flower: ``configure_fit`` (choose the clients and their
plan) and ``aggregator`` (combine their updates). A strategy keeps any state it needs across
rounds in ``state()`` / ``load_state()`` so that the server can checkpoint it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from .aggregate import Weights, WeightedSum


@dataclass(frozen=True)
class FitPlan:
    """How a client trains in one round."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.001

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "FitPlan":
        return cls(**body)


@dataclass
class FitResult:
    """One client's answer to a round."""

    client_id: str
    weights: Sequence[np.ndarray]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    """Receives a round's updates one at a time, then gives the new global weights."""

    def add(self, result: FitResult) -> None: ...

    def result(self) -> Weights: ...


class Strategy:
    """Base strategy: every available client trains with the server's plan; subclasses aggregate."""

    name = "base"

    def configure_fit(self, server_round: int, available: Sequence[str], plan: FitPlan) -> list[tuple[str, FitPlan]]:
        """The (client_id, plan) pairs that train in ``server_round``."""
        return [(client_id, plan) for client_id in available]

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        """A fresh aggregator for ``server_round``'s updates."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Everything needed to resume this strategy (JSON values and numpy arrays)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""


class _FedAvgAggregator:
    def __init__(self) -> None:
        self._sum = WeightedSum()

    def add(self, result: FitResult) -> None:
        self._sum.add(result.weights, result.num_examples)

    def result(self) -> Weights:
        return self._sum.mean()


class FedAvg(Strategy):
    """Federated Averaging: the mean of the clients' weights, weighted by ``num_examples``.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017. Streams: each update is folded into a running sum as it arrives.
    """

    name = "fedavg"

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        return _FedAvgAggregator()


STRATEGIES: dict[str, type[Strategy]] = {FedAvg.name: FedAvg}


def make_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}") from None
