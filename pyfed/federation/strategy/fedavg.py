"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The new global model is the clients' weights averaged by ``num_examples``."""

from __future__ import annotations

from dataclasses import dataclass

from .base import WeightedMeanStrategy


@dataclass
class FedAvg(WeightedMeanStrategy):
    """Weighted federated averaging; streams (one running sum, whatever the number of clients)."""

    name = "fedavg"
