"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

Each client minimises its loss plus the proximal term ``mu/2 * ||w - w_global||^2``, which keeps
local models near the global one when data differ between clients. The server sends ``mu`` in the
round plan; aggregation is FedAvg's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pyfed.wire.protocol import FitPlan

from .base import WeightedMeanStrategy


@dataclass
class FedProx(WeightedMeanStrategy):
    """FedAvg aggregation; clients train with the proximal term weighted by ``proximal_mu``."""

    name = "fedprox"
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        FitPlan.range_of("proximal_mu").check(self.proximal_mu, "proximal_mu")

    def configure_fit(self, server_round: int, available: Sequence[str], plan: FitPlan) -> list[tuple[str, FitPlan]]:
        plan = dataclasses.replace(plan, proximal_mu=self.proximal_mu)
        return [(client_id, plan) for client_id in available]
