"""FedAvgM: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019. FedAvg whose server applies momentum to the averaged
change: ``v = momentum * v + (w - mean)``, ``w = w - server_learning_rate * v``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pyfed.federation.aggregate import Weights, momentum_step
from pyfed.ranges import Range

from .base import WeightedMeanStrategy


@dataclass
class FedAvgM(WeightedMeanStrategy):
    """FedAvg with server momentum. With ``server_momentum=0`` and rate 1 it is plain FedAvg."""

    name = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        Range(0, 1e6, low_open=True).check(self.server_learning_rate, "server_learning_rate")
        Range(0, 1, high_open=True).check(self.server_momentum, "server_momentum")
        self._velocity: list[np.ndarray] | None = None

    def server_update(self, global_weights: Weights, mean: Weights) -> Weights:
        weights, self._velocity = momentum_step(global_weights, mean, self._velocity,
                                                learning_rate=self.server_learning_rate,
                                                momentum=self.server_momentum)
        return weights

    def state(self) -> dict[str, Any]:
        return {"velocity": self._velocity}

    def load_state(self, state: dict[str, Any]) -> None:
        self._velocity = state.get("velocity")
