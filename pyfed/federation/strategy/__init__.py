"""Federated strategies, selectable by name (``--strategy`` / ``STRATEGY``).

=============  ==============================================================================
fedavg         weighted mean of the clients' weights (McMahan et al. 2017); streams
fedavgm        FedAvg + server momentum (Hsu et al. 2019); streams
fedprox        FedAvg + a proximal term in each client's loss (Li et al. 2020); streams
fedadagrad     server-side Adagrad on the averaged change (Reddi et al. 2021); streams
fedadam        server-side Adam (Reddi et al. 2021); streams
fedyogi        server-side Yogi (Reddi et al. 2021); streams
fedmedian      coordinate-wise median (Yin et al. 2018)
trimmed-mean   coordinate-wise beta-trimmed mean (Yin et al. 2018)
krum           the most central update (Blanchard et al. 2017)
multi-krum     mean of the m most central updates (El Mhamdi et al. 2018)
=============  ==============================================================================

A custom strategy subclasses :class:`Strategy` and implements ``aggregate`` (and, if it keeps
state across rounds, ``state``/``load_state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Aggregator, FitPlan, FitResult, Strategy, WeightedMeanStrategy, sample_clients
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .fedprox import FedProx
from .norm_bound import NormBound
from .robust import FedMedian, Krum, MultiKrum, TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam, FedYogi, FedMedian, TrimmedMean, Krum, MultiKrum)}


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered under ``name``, given those ``options`` that it takes (None = default)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    accepted = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = ["Aggregator", "FitPlan", "FitResult", "Strategy", "WeightedMeanStrategy", "FedAvg", "FedAvgM",
           "FedProx", "FedOpt", "FedAdagrad", "FedAdam", "FedYogi", "FedMedian", "TrimmedMean", "Krum",
           "MultiKrum", "NormBound", "STRATEGIES", "make_strategy", "sample_clients"]
