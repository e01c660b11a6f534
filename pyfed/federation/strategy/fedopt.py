"""Adaptive federated optimisation: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

The server treats the averaged client change ``mean - w`` as a pseudo-gradient and feeds it to an
adaptive optimiser (Algorithm 2 of the paper): FedAdagrad, FedAdam or FedYogi. They share
everything but the second-moment update, so each is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pyfed.federation.aggregate import Weights, adaptive_step
from pyfed.ranges import Range

from .base import WeightedMeanStrategy


@dataclass
class FedOpt(WeightedMeanStrategy):
    """Server-side adaptive optimiser over the streamed weighted mean.

    ``server_learning_rate`` is the paper's eta, ``beta1``/``beta2`` its moment decays and ``tau``
    its adaptivity (the epsilon that bounds the step where the second moment is small).
    """

    optimizer: ClassVar[str] = ""
    server_learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        Range(0, 1e6, low_open=True).check(self.server_learning_rate, "server_learning_rate")
        Range(0, 1, high_open=True).check(self.beta1, "beta1")
        Range(0, 1, high_open=True).check(self.beta2, "beta2")
        Range(0, 1e6, low_open=True).check(self.tau, "tau")
        self._m: list[np.ndarray] | None = None
        self._v: list[np.ndarray] | None = None

    def server_update(self, global_weights: Weights, mean: Weights) -> Weights:
        weights, self._m, self._v = adaptive_step(
            self.optimizer, global_weights, mean, self._m, self._v,
            learning_rate=self.server_learning_rate, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return weights

    def state(self) -> dict[str, Any]:
        return {"first_moment": self._m, "second_moment": self._v}

    def load_state(self, state: dict[str, Any]) -> None:
        self._m, self._v = state.get("first_moment"), state.get("second_moment")


@dataclass
class FedAdagrad(FedOpt):
    """FedAdagrad: ``v = v + delta^2`` (Reddi et al. 2021).

    Its second moment only grows, so its steps shrink over the run; it takes a larger default
    ``server_learning_rate`` (0.1, as Flower's) than Adam and Yogi (0.01).
    """

    name = "fedadagrad"
    optimizer = "adagrad"
    server_learning_rate: float = 0.1


@dataclass
class FedAdam(FedOpt):
    """FedAdam: ``v = beta2 * v + (1 - beta2) * delta^2`` (Reddi et al. 2021)."""

    name = "fedadam"
    optimizer = "adam"


@dataclass
class FedYogi(FedOpt):
    """FedYogi: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (Reddi et al. 2021)."""

    name = "fedyogi"
    optimizer = "yogi"
