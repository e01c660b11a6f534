"""Per-feature moments from many sites, pooled exactly: what federated feature scaling and batch-norm
recalibration need, and all that leaves a site for them.

A site summarises its values (features, or the inputs of a batch-norm layer) per feature as
:class:`Moments`: how many values, their mean, and the sum of squared deviations from that mean
(``m2``). This is the same information as a count, a sum and a sum of squares, in the form that
stays exact in floating point when a feature's mean is large against its spread (a sum of squares
would cancel catastrophically). Sites' moments are merged with the pairwise formulas of

    T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating formulae and a pairwise algorithm for
    computing sample variances", COMPSTAT 1982 (Stanford report STAN-CS-79-773, 1979),

so the pooled mean and variance are those of all the sites' values together: not an average of
the sites' variances, which leaves out how far apart the sites' means are.

Pure logic, no I/O: a site computes its moments with :meth:`Moments.of`, the server checks each
report with :func:`why_report_unusable` and pools the usable ones with :func:`pool`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: a pooled variance at most this is no spread: the feature is centred, not divided by ~0
TINY_VARIANCE = 1e-12


@dataclass(frozen=True)
class FeatureScaling:
    """Where the model's feature scaling keeps its mean and variance: their positions among the
    global weights (the engine sets them from the sites' pooled moments before round 1)."""

    mean_index: int
    variance_index: int


@dataclass(frozen=True)
class BatchNormLayer:
    """One BatchNormalization layer the engine recalibrates after the last round: where its moving
    mean and variance sit among the global weights, how many channels it normalises, and how many
    values per channel one example gives it (the positions of a convolution's feature map: 1 after
    a Dense layer), which is what a site's count must be a multiple of."""

    name: str
    mean_index: int
    variance_index: int
    channels: int
    values_per_example: int


@dataclass(frozen=True)
class SiteStatistics:
    """What the engine asks the sites to summarise, outside the rounds: the features before round 1
    (into ``feature_scaling``), each of ``batch_norm``'s layers' inputs after the last round."""

    feature_scaling: FeatureScaling | None = None
    batch_norm: tuple[BatchNormLayer, ...] = ()


@dataclass(frozen=True)
class Moments:
    """``count`` values per feature, their ``mean`` and ``m2`` (the sum of squared deviations from
    the mean), each a float64 vector of one entry per feature."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        """The population variance of each feature (``m2 / count``), as a batch-norm layer keeps it."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    @classmethod
    def of(cls, values: np.ndarray, *, chunk_rows: int = 4096) -> "Moments":
        """The moments of ``values`` (rows are examples; the other axes are flattened into features),
        computed a chunk of rows at a time in float64."""
        values = np.asarray(values)
        flat = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(-1, 1)
        total = cls(0, np.zeros(flat.shape[1]), np.zeros(flat.shape[1]))
        for start in range(0, len(flat), chunk_rows):
            chunk = flat[start:start + chunk_rows].astype(np.float64)
            mean = chunk.mean(axis=0)
            total = total.merge(cls(len(chunk), mean, ((chunk - mean) ** 2).sum(axis=0)))
        return total

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both sets of values together (Chan, Golub and LeVeque's pairwise update)."""
        if not other.count:
            return self
        if not self.count:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def without(self, part: "Moments") -> "Moments":
        """The moments of these values with ``part``'s (a subset of them) taken out: the merge undone."""
        count = self.count - part.count
        if count <= 0:
            return Moments(0, np.zeros_like(self.mean), np.zeros_like(self.m2))
        mean = (self.count * self.mean - part.count * part.mean) / count
        delta = part.mean - mean
        m2 = np.maximum(self.m2 - part.m2 - delta**2 * (part.count * count / self.count), 0.0)
        return Moments(count, mean, m2)


def report_of(body: Mapping[str, Any]) -> Moments:
    """A site's report from its MOMENTS message (whose schema the protocol has checked)."""
    return Moments(body["count"], np.asarray(body["mean"], np.float64), np.asarray(body["m2"], np.float64))


def pool(reports: Iterable[Moments]) -> Moments:
    """All the reports' values together; ValueError if there is none, or they disagree in features."""
    reports = list(reports)
    if not reports:
        raise ValueError("no site reported its moments")
    widths = {len(r.mean) for r in reports}
    if len(widths) != 1:
        raise ValueError(f"the reports disagree in their number of features: {sorted(widths)}")
    total = reports[0]
    for report in reports[1:]:
        total = total.merge(report)
    return total


def why_report_unusable(report: Moments, *, num_features: int, max_count: int,
                        values_per_example: int = 1) -> str | None:
    """Why a site's report cannot be pooled (it is a network input), or None. What cannot be
    checked: a site can report any moments its count allows, as it can send any update; its
    weight in the pool is its count, held to at most ``max_count`` examples (what it declared it
    holds) of ``values_per_example`` values each (a whole number of examples)."""
    if not isinstance(report.count, int) or isinstance(report.count, bool) or report.count < 1:
        return f"its count {report.count!r} is not a positive whole number"
    if report.count > max_count * values_per_example:
        return (f"its count {report.count} is more than the {max_count} examples it may claim"
                + (f" ({values_per_example} values each)" if values_per_example > 1 else ""))
    if report.count % values_per_example:
        return f"its count {report.count} is not a whole number of examples of {values_per_example} values"
    for name in ("mean", "m2"):
        array = getattr(report, name)
        if not isinstance(array, np.ndarray) or array.dtype != np.float64 or array.shape != (num_features,):
            return f"its {name} is not {num_features} float64 values"
        if not np.all(np.isfinite(array)):
            return f"its {name} holds a value that is not finite"
    if np.any(report.m2 < 0):
        return "a sum of squared deviations is negative"
    return None


#: how many of the other sites' standard deviations a site's mean may sit from theirs, or its variance
#: be times theirs, before its report is taken for a lie (honest sites differ, by far less than this)
IMPLAUSIBLE_SPREAD = 1e3


def implausible(reports: Mapping[str, Moments]) -> dict[str, str]:
    """The reports that cannot come from data like the other sites' ({site: why}): a feature's mean
    at least IMPLAUSIBLE_SPREAD of the others' standard deviations (pooled) from the others' mean,
    or its variance IMPLAUSIBLE_SPREAD squared times theirs. Each report is judged against the
    pool of all the others; the worst is left out and the rest judged again, so that one liar's
    huge values cannot make another's look ordinary. With fewer than three sites nothing can say
    which of two disagreeing reports lies, and nothing is refused."""
    remaining, found = dict(reports), {}
    while len(remaining) >= 3:
        total = pool(remaining.values())  # each site's others: the total without it (one merge undone, not n)
        judged = {site: _how_implausible(report, total.without(report)) for site, report in remaining.items()}
        worst = max(judged, key=lambda site: judged[site][0])
        if judged[worst][0] < 1.0:
            break
        found[worst] = judged[worst][1]
        del remaining[worst]
    return found


def _how_implausible(report: Moments, others: Moments) -> tuple[float, str]:
    """(how far past the bound ``report`` is against ``others``: at least 1 is implausible, why)."""
    spread = np.sqrt(others.variance) + np.sqrt(TINY_VARIANCE) + 1e-6 * np.abs(others.mean)
    distance = np.abs(report.mean - others.mean) / spread
    ratio = np.sqrt(report.variance) / spread
    far, wide = int(np.argmax(distance)), int(np.argmax(ratio))
    if distance[far] >= ratio[wide]:
        return float(distance[far] / IMPLAUSIBLE_SPREAD), (
            f"feature {far}'s mean {report.mean[far]:.3g} is {distance[far]:.3g} standard deviations from the other "
            f"sites' {others.mean[far]:.3g}")
    return float(ratio[wide] / IMPLAUSIBLE_SPREAD), (
        f"feature {wide}'s variance {report.variance[wide]:.3g} is {ratio[wide] ** 2:.3g} times the other sites'")


def scale_spread(moments: Moments) -> float:
    """How many times the largest feature's scale (its root mean square) is the smallest non-zero
    one's: 1 for features on one scale (what the engine logs of the features it scales)."""
    scale = np.sqrt(moments.variance + moments.mean**2)
    scale = scale[scale > 0]
    return float(scale.max() / scale.min()) if len(scale) else 1.0
