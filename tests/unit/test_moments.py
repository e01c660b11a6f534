"""Per-feature moments pooled across sites exactly (federation/moments.py): pure logic, no I/O."""

import numpy as np
import pytest

from pyfed.federation.moments import Moments, pool, scale_spread, why_report_unusable

pytestmark = pytest.mark.unit


def sites(seed: int = 0) -> list[np.ndarray]:
    """Three sites of very different sizes, means and spreads (non-IID), 5 features."""
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, scale, size=(n, 5)) for n, loc, scale in ((7, -3.0, 0.5), (400, 10.0, 2.0), (61, 0.0, 9.0))]


def test_pooled_moments_are_those_of_all_the_sites_values_together_not_an_average_of_variances():
    parts = sites()
    pooled = pool(Moments.of(part) for part in parts)
    together = np.concatenate(parts)
    assert pooled.count == len(together)
    np.testing.assert_allclose(pooled.mean, together.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled.variance, together.var(axis=0), rtol=1e-12)
    averaged = np.average([part.var(axis=0) for part in parts], axis=0, weights=[len(p) for p in parts])
    assert np.all(pooled.variance > 1.5 * averaged)  # the sites' means lie far apart: that is variance too


def test_a_large_mean_with_a_small_spread_stays_exact_where_a_sum_of_squares_cancels():
    rng = np.random.default_rng(1)
    parts = [1e8 + rng.normal(0, 1, size=(1000, 3)) for _ in range(4)]
    pooled = pool(Moments.of(part, chunk_rows=97) for part in parts)
    together = np.concatenate(parts)
    np.testing.assert_allclose(pooled.variance, together.var(axis=0), rtol=1e-8)
    naive = (together**2).mean(axis=0) - together.mean(axis=0) ** 2  # what count, sum, sum of squares would give
    assert np.max(np.abs(naive - together.var(axis=0))) > 1e-3


def test_moments_of_images_are_per_pixel_and_chunks_do_not_change_them():
    images = np.random.default_rng(2).random((50, 4, 4, 3)).astype(np.float32)
    whole, chunked = Moments.of(images, chunk_rows=10**6), Moments.of(images, chunk_rows=7)
    assert whole.mean.shape == (48,) and whole.count == 50
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.m2, whole.m2, rtol=1e-10)
    assert Moments.of(np.arange(4.0)).mean.shape == (1,)  # a single feature


def test_empty_reports_merge_to_the_other_and_pooling_nothing_or_mismatched_widths_is_an_error():
    one = Moments.of(np.ones((3, 2)))
    empty = Moments(0, np.zeros(2), np.zeros(2))
    assert empty.merge(one) is one and one.merge(empty) is one
    np.testing.assert_array_equal(empty.variance, np.zeros(2))
    with pytest.raises(ValueError, match="no site reported"):
        pool([])
    with pytest.raises(ValueError, match=r"disagree in their number of features: \[2, 3\]"):
        pool([one, Moments.of(np.ones((3, 3)))])


@pytest.mark.parametrize("report, why", [
    (Moments(0, np.zeros(2), np.zeros(2)), "count 0 is not a positive whole number"),
    (Moments(True, np.zeros(2), np.zeros(2)), "count True is not a positive whole number"),
    (Moments(2.5, np.zeros(2), np.zeros(2)), "count 2.5 is not a positive whole number"),
    (Moments(101, np.zeros(2), np.zeros(2)), "count 101 is more than the 100 examples it may claim"),
    (Moments(5, np.zeros(3), np.zeros(2)), "its mean is not 2 float64 values"),
    (Moments(5, np.zeros(2, np.float32), np.zeros(2)), "its mean is not 2 float64 values"),
    (Moments(5, np.zeros(2), [0.0, 0.0]), "its m2 is not 2 float64 values"),
    (Moments(5, np.array([0.0, np.nan]), np.zeros(2)), "its mean holds a value that is not finite"),
    (Moments(5, np.zeros(2), np.array([np.inf, 0.0])), "its m2 holds a value that is not finite"),
    (Moments(5, np.zeros(2), np.array([1.0, -1e-9])), "a sum of squared deviations is negative"),
])
def test_a_report_that_cannot_be_pooled_says_why(report, why):
    assert why in why_report_unusable(report, num_features=2, max_count=100)


def test_a_usable_report_passes():
    assert why_report_unusable(Moments.of(np.ones((100, 2))), num_features=2, max_count=100) is None


def test_features_on_scales_orders_of_magnitude_apart_are_worth_normalising():
    rng = np.random.default_rng(3)
    cancer_like = np.column_stack([rng.normal(0.1, 0.02, 500), rng.normal(20, 4, 500), rng.normal(650, 350, 500)])
    assert scale_spread(Moments.of(cancer_like)) > 100
    standardised = (cancer_like - cancer_like.mean(axis=0)) / cancer_like.std(axis=0)
    assert scale_spread(Moments.of(standardised)) < 2
    assert scale_spread(Moments.of(np.zeros((4, 3)))) == 1.0  # constant zero features have no scale


def test_a_report_far_outside_the_other_sites_is_implausible_and_honest_differences_are_not():
    from pyfed.federation.moments import implausible

    rng = np.random.default_rng(0)
    honest = {f"site-{i}": Moments.of(np.c_[rng.normal(1000 + 100 * i, 300, 200), rng.normal(0.1 * i, 0.02, 200)])
              for i in range(1, 4)}
    shifted = {**honest, "scanner-b": Moments.of(np.c_[rng.normal(4000, 900, 200), rng.normal(2.0, 0.1, 200)])}
    assert implausible(honest) == {} and implausible(shifted) == {}  # sites differ; none lies
    liar = Moments(200, np.array([1e30, 0.1]), np.array([1.0, 1.0]))
    wide = Moments(200, np.array([1000.0, 0.1]), np.array([200 * 1e16, 1.0]))
    found = implausible({**honest, "liar": liar, "wide": wide})
    assert set(found) == {"liar", "wide"}, found
    assert found["liar"].startswith("feature 0's mean 1e+30 is") and "times the other sites'" in found["wide"]
    assert implausible({"a": honest["site-1"], "liar": liar}) == {}  # two: nothing can say which one lies


def test_taking_a_part_out_undoes_merging_it():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1e4, 5, (40, 3)), rng.normal(-2, 0.1, (25, 3))
    rest = Moments.of(np.concatenate([a, b])).without(Moments.of(b))
    assert rest.count == 40
    assert np.allclose(rest.mean, a.mean(axis=0)) and np.allclose(rest.variance, a.var(axis=0), rtol=1e-6)
    assert Moments.of(a).without(Moments.of(a)).count == 0


def test_a_report_of_a_feature_map_counts_whole_examples_of_its_positions():
    report = Moments(64, np.zeros(3), np.ones(3))
    assert why_report_unusable(report, num_features=3, max_count=4, values_per_example=16) is None
    assert "more than the 3 examples it may claim (16 values each)" in why_report_unusable(
        report, num_features=3, max_count=3, values_per_example=16)
    assert "not a whole number of examples of 10 values" in why_report_unusable(
        report, num_features=3, max_count=100, values_per_example=10)
