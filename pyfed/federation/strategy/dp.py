"""Client-level differential privacy for the FedAvg family: DP-FedAvg (McMahan, Ramage, Talwar and
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018, arXiv:1710.06963),
with adaptive clipping to a quantile of the update norms (Andrew, Thakkar, McMahan and Ramaswamy,
"Differentially Private Learning with Adaptive Clipping", NeurIPS 2021, arXiv:1905.03871).

A wrapper around any FedAvg-family strategy (FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam,
FedYogi). Each round:

1. ``m = max(minimum, ceil(fraction * n))`` of the ``n`` connected clients are sampled uniformly
   without replacement, with the operating system's randomness (a seed anyone could know would
   let them re-draw the sample and remove the amplification the accountant counts on);
2. each update's change from the global model, ``delta_k``, is clipped to L2 norm ``C``;
3. ``S = sum_k clip(delta_k) + N(0, (z_delta * C)^2 I)``, over the floating-point arrays;
4. the wrapped strategy's server step gets the mean ``global + S / m``: FedAvg takes it as the new
   model, FedAvgM and the adaptive optimisers take its change as their pseudo-gradient (post-
   processing: no further privacy cost).

The normaliser is ``m``, the number of clients *asked*, fixed before any update arrives, not the
number that answered: McMahan et al.'s fixed-denominator estimator. Dividing by the answers would
make the denominator depend on the clients; a client that does not answer adds 0. Updates are
weighted equally (not by ``num_examples``, which would let one client's weight, and so the
sensitivity, grow with its claim).

With adaptive clipping, each round also counts the updates within ``C`` (b_k = 1 if ||delta_k|| <= C),
noised with standard deviation ``sigma_b``, and moves ``C`` geometrically toward the target
quantile: ``C <- C * exp(-eta * (b~ - quantile))`` with ``b~ = (sum b_k + N(0, sigma_b^2)) / m``.
Releasing both costs what one Gaussian mechanism with noise multiplier ``z`` costs when
``z^-2 = z_delta^-2 + (2 sigma_b)^-2`` (Andrew et al., Theorem 1), so for the ``z`` the accountant
is given, the updates get ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``.

What the accountant counts (privacy.py): one ``RoundEvent(n, m, z)`` per aggregated round.

Local DP (``local_noise_multiplier`` z_l > 0), a layer on top for sites that do not trust the
server: each client clips its own change to ``C`` and adds ``N(0, (z_l * C)^2 I)`` before sending
(client-side clipping is then implied). Its guarantee is per client and weaker: the server sees each
noised update, so there is no amplification by sampling or by the others' updates; every update a
client sends is one Gaussian mechanism with noise multiplier ``z_l / 2``, composed over its updates.
The server counts the updates it received from each client and reports the worst client's local
epsilon (``local_epsilon``); each client counts the updates it sent and logs its own. The central
guarantee above is accounted as if the local noise were not there (it only adds privacy).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.federation.aggregate import WeightedSum, Weights, change_norm, fold_change
from pyfed.federation.privacy import PrivacyLedger, RoundEvent, local_epsilon
from .base import Aggregator, FitPlan, FitResult, Strategy, WeightedMeanStrategy

log = logging.getLogger("pyfed.strategy")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al.'s geometric update of the clip norm toward ``quantile`` of the update norms."""

    quantile: float = 0.5
    learning_rate: float = 0.2
    bit_noise_fraction: float = 0.05  # sigma_b = this * m (the paper's m / 20)

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"the target quantile must be in (0, 1), got {self.quantile}")
        if not self.learning_rate > 0:
            raise ValueError(f"the clip learning rate must be positive, got {self.learning_rate}")
        if not self.bit_noise_fraction > 0:
            raise ValueError(f"the bit noise fraction must be positive, got {self.bit_noise_fraction}")


class DifferentialPrivacy(Strategy):
    """Central client-level DP around a FedAvg-family strategy (see the module docstring)."""

    def __init__(self, inner: Strategy, *, noise_multiplier: float, clip_norm: float, fraction: float,
                 ledger: PrivacyLedger, minimum: int = 1, adaptive: AdaptiveClipping | None = None,
                 clipping: str = "server", local_noise_multiplier: float = 0.0,
                 rng: np.random.Generator | None = None):
        if not isinstance(inner, WeightedMeanStrategy):
            raise ValueError(f"differential privacy needs a FedAvg-family strategy, whose sensitivity to one client "
                             f"is bounded by clipping; {inner.name} is not one (fedavg, fedavgm, fedprox, "
                             f"fedadagrad, fedadam, fedyogi are)")
        if not noise_multiplier > 0:
            raise ValueError(f"the noise multiplier must be positive, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"the clip norm must be positive, got {clip_norm}")
        if not 0 < fraction <= 1:
            raise ValueError(f"the sampled fraction must be in (0, 1], got {fraction}")
        if clipping not in ("server", "client"):
            raise ValueError(f"clipping must be server or client, got {clipping!r}")
        if not (math.isfinite(local_noise_multiplier) and local_noise_multiplier >= 0):
            raise ValueError(f"the local noise multiplier must be zero or positive, got {local_noise_multiplier}")
        if local_noise_multiplier and clipping != "client":
            raise ValueError("local differential privacy has the clients clip and noise their own updates: "
                             "it needs client-side clipping")
        self.inner, self.name, self.clipping = inner, inner.name, clipping
        self.noise_multiplier, self.clip_norm, self.fraction = float(noise_multiplier), float(clip_norm), fraction
        self.ledger, self.minimum, self.adaptive = ledger, minimum, adaptive
        self.local_noise_multiplier = float(local_noise_multiplier)
        self.local_releases: Counter[str] = Counter()  # client id -> noised updates received from it
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._round_event: RoundEvent | None = None

    # --- sampling and the budget ------------------------------------------------------------------

    def sample_size(self, population: int) -> int:
        return min(population, max(self.minimum, math.ceil(self.fraction * population - 1e-9)))

    def why_not_run(self, server_round: int, available: int) -> str | None:
        """Why round ``server_round`` may not start with ``available`` clients (the budget), or None."""
        if available < 1:
            return None
        return self.ledger.why_not(RoundEvent(available, self.sample_size(available), self.noise_multiplier))

    def configure_fit(self, server_round: int, available: Sequence[str], plan: FitPlan) -> list[tuple[str, FitPlan]]:
        available = sorted(available)
        count = self.sample_size(len(available))
        chosen = sorted(self.rng.choice(len(available), size=count, replace=False)) if available else []
        self._round_event = RoundEvent(len(available), count, self.noise_multiplier) if available else None
        if self.clipping == "client":  # clients clip before sending (the server clips again: a no-op if they did)
            plan = dataclasses.replace(plan, clip_norm=self.clip_norm, local_noise=self.local_noise_multiplier,
                                       local_delta=self.ledger.delta if self.local_noise_multiplier else 0.0)
        return self.inner.configure_fit(server_round, [available[i] for i in chosen], plan)

    # --- aggregation ------------------------------------------------------------------------------

    def update_noise_multiplier(self, sampled: int) -> float:
        """z_delta: the noise on the updates, given the accountant's z and (adaptive) the bits' noise."""
        if self.adaptive is None:
            return self.noise_multiplier
        sigma_b = self.adaptive.bit_noise_fraction * sampled
        remaining = self.noise_multiplier ** -2 - (2 * sigma_b) ** -2
        if remaining <= 0:
            raise ValueError(f"noise multiplier {self.noise_multiplier:g} leaves no room for adaptive clipping with "
                             f"{sampled} clients a round: the count that steers the clip norm, noised with sigma_b = "
                             f"{sigma_b:g}, alone costs as much as noise multiplier 2 sigma_b = {2 * sigma_b:g}; "
                             f"sample more clients a round, or keep the clip norm fixed")
        return remaining ** -0.5

    def aggregator(self, server_round: int, global_weights: Weights) -> Aggregator:
        if self._round_event is None:
            raise ValueError("aggregator() before configure_fit(): no sample to account for")
        return _NoisySum(self, server_round, global_weights, self._round_event)

    def aggregate(self, server_round: int, global_weights: Weights, results: Sequence[FitResult]) -> Weights:
        aggregator = self.aggregator(server_round, global_weights)
        for result in results:
            aggregator.add(result)
        return aggregator.result()

    def min_fit_clients(self) -> int:
        return self.inner.min_fit_clients()

    def open_privacy(self, directory: Path | None, *, run: str, completed_rounds: int, resumed: bool,
                     set_aside: Sequence[int] = (), fresh_start: bool = False) -> str:
        run = self.ledger.open(directory, run=run, completed_rounds=completed_rounds, resumed=resumed,
                               set_aside=set_aside, fresh_start=fresh_start)
        if self.ledger.file is not None:
            everything = self.ledger.spent_all_runs()
            log.info("differential privacy: ledger %s: this run has released %d round(s), epsilon %.4g (delta %g)%s",
                     self.ledger.file.path, sum(self.ledger.rounds.values()), self.ledger.spent(), self.ledger.delta,
                     f"; every run it records, on the same clients' data: epsilon {everything:.4g}"
                     if everything is not None else "")
        return run

    def close_privacy(self) -> None:
        self.ledger.finish()

    def privacy_report(self) -> dict[str, float] | None:
        report = {"epsilon": round(self.ledger.spent(), 6), "delta": self.ledger.delta, "clip_norm": self.clip_norm,
                  "noise_multiplier": self.noise_multiplier}
        everything = self.ledger.spent_all_runs()
        if everything is not None:
            report["epsilon_all_runs"] = round(everything, 6)
        if self.local_noise_multiplier:
            report["local_noise_multiplier"] = self.local_noise_multiplier
            report["local_epsilon"] = round(self.local_epsilon(), 6)
        return report

    def local_epsilon(self) -> float:
        """Local DP: the worst client's epsilon, from the noised updates the server received from it."""
        most = max(self.local_releases.values(), default=0)
        return local_epsilon(self.local_noise_multiplier, most, self.ledger.delta) if most else 0.0

    # --- state ------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"inner": self.inner.state(), "privacy": {"ledger": self.ledger.state(), "clip_norm": self.clip_norm,
                                                         "local_releases": dict(self.local_releases)}}

    def load_state(self, state: dict[str, Any]) -> None:
        if "privacy" not in state or "inner" not in state:
            raise ValueError("the checkpoint's run was not differentially private, so its earlier rounds were not "
                             "accounted; start a private run afresh with --fresh-start")
        privacy = state["privacy"]
        if not isinstance(privacy, dict):
            raise ValueError("the checkpoint's privacy state is not a mapping")
        clip_norm = float(privacy.get("clip_norm", "nan"))
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"the checkpoint's clip norm {privacy.get('clip_norm')!r} is not a positive number")
        releases = privacy.get("local_releases", {})
        if not (isinstance(releases, dict) and all(
                isinstance(k, str) and type(v) is int and 0 <= v <= 10**9 for k, v in releases.items())):
            raise ValueError("the checkpoint's local_releases is not a table of client ids to counts")
        self.ledger.load_state(privacy.get("ledger"))
        self.inner.load_state(state["inner"])
        self.clip_norm = clip_norm
        self.local_releases = Counter(releases) | self.local_releases  # never forgets a release, as the ledger

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "differential_privacy": {
            "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "fraction": self.fraction,
            "delta": self.ledger.delta, "target_epsilon": self.ledger.target_epsilon,
            "adaptive_quantile": self.adaptive.quantile if self.adaptive else None, "clipping": self.clipping,
            "local_noise_multiplier": self.local_noise_multiplier}}


class _NoisySum:
    """Clipped changes summed in float64 as they arrive (memory: one model, in float64), noised once
    at the end; every step a chunk at a time, as :class:`~pyfed.federation.aggregate.WeightedSum`
    folds, so a round holds no float64 temporary of a whole array (federation/memory.py's plan)."""

    def __init__(self, dp: DifferentialPrivacy, server_round: int, global_weights: Weights, event: RoundEvent):
        self._dp, self._round, self._global, self._event = dp, server_round, global_weights, event
        self._floats = [np.dtype(g.dtype).kind == "f" for g in global_weights]
        self._sums = [np.zeros(np.shape(g), np.float64) if f else None for g, f in zip(global_weights, self._floats)]
        largest = max((int(np.size(g)) for g, f in zip(global_weights, self._floats) if f), default=1)
        self._scratch = np.empty(min(WeightedSum.CHUNK, max(largest, 1)), np.float64)
        self._within = 0  # updates whose norm was at most the clip norm
        self._added = 0
        self._local: set[str] = set()  # clients whose locally noised update is in the sum

    def add(self, result: FitResult) -> None:
        norm = change_norm(result.weights, self._global)
        clip = self._dp.clip_norm
        scale = 1.0 if norm <= clip else clip / norm
        measured = norm <= clip * (1 + 1e-6)
        reported = result.metrics.get("within_clip") if self._dp.clipping == "client" else None
        if reported is not None and not self._dp.local_noise_multiplier and not measured:
            # a client that clips (as the plan asks) sends at most the clip norm: this one did not, so what it
            # says of its norm is not taken; what the server sees is counted instead
            log.warning("round %d: %s sent a change of norm %.4g, above the clip norm %.4g it was asked to clip to; "
                        "its within_clip bit is not taken", self._round, result.client_id, norm, clip)
            reported = None
        self._within += bool(reported) if reported is not None else measured
        fold_change(self._sums, result.weights, self._global, scale, self._scratch)
        self._added += 1
        if self._dp.local_noise_multiplier:
            self._dp.local_releases[result.client_id] += 1
            self._local.add(result.client_id)

    def result(self) -> Weights:
        if not self._added:
            raise ValueError("no updates were added")
        dp, sampled = self._dp, self._event.sampled
        sigma = dp.update_noise_multiplier(sampled) * dp.clip_norm
        # in the ledger file before anything of it can leave (LedgerError, a ValueError, if it cannot be written:
        # the engine then refuses the round's model, and nothing is released)
        spent = dp.ledger.record(self._event, server_round=self._round, local=sorted(self._local))
        mean = []
        for total, base in zip(self._sums, self._global):
            if total is None:
                mean.append(base)  # not trained (integer counters): the global value
                continue
            out = np.empty(np.shape(base), base.dtype)
            flat_total, flat_base, flat_out = total.reshape(-1), np.asarray(base).reshape(-1), out.reshape(-1)
            for start in range(0, flat_total.size, self._scratch.size):  # noise drawn and added a chunk at a time
                stop = min(start + self._scratch.size, flat_total.size)
                part = self._scratch[: stop - start]
                dp.rng.standard_normal(out=part)
                part *= sigma
                part += flat_total[start:stop]
                part /= sampled
                part += flat_base[start:stop]
                flat_out[start:stop] = part
            mean.append(out)
        self._sums = [None] * len(self._sums)  # the sum is spent: its float64 memory goes before the server step
        new = dp.inner.server_update(self._global, mean)
        if dp.adaptive is not None:
            noisy = (self._within + dp.rng.normal(0.0, dp.adaptive.bit_noise_fraction * sampled)) / sampled
            dp.clip_norm *= math.exp(-dp.adaptive.learning_rate * (noisy - dp.adaptive.quantile))
        log.info("round %d: differential privacy: %d of %d updates within clip norm; noise std %.4g; "
                 "epsilon spent %.4g (delta %g)%s%s", self._round, self._within, self._added, sigma, spent,
                 dp.ledger.delta, f"; clip norm now {dp.clip_norm:.4g}" if dp.adaptive else "",
                 f"; local DP: the worst client's local epsilon {dp.local_epsilon():.4g}"
                 if dp.local_noise_multiplier else "")
        return new
