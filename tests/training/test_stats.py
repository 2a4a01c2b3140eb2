"""train.stats: the study's exact tests and its two-stage bootstrap, against hand-computed values."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from train.stats import (
    bootstrap_difference,
    bootstrap_mean,
    bootstrap_unpaired_difference,
    fisher_one_sided,
    mcnemar_exact,
)


def test_fisher_matches_the_hypergeometric_tail_of_the_study():
    assert fisher_one_sided(3, 0, 5) == pytest.approx(1 / 12)  # 3 of 5 vs 0 of 5: C(5,3) / C(10,3) = 0.0833
    assert fisher_one_sided(4, 0, 6) == pytest.approx(comb(6, 4) / comb(12, 4))  # 0.030, the text of section 6
    assert fisher_one_sided(0, 0, 5) == 1.0
    assert fisher_one_sided(0, 3, 5) == 1.0  # every event in the second group: the first is not ahead
    assert fisher_one_sided(5, 5, 5) == 1.0
    with pytest.raises(ValueError):
        fisher_one_sided(6, 0, 5)


def test_mcnemar_exact_on_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    r = mcnemar_exact(a, b)  # only a: images 1, 2, 7; only b: image 4 -> 2 * P(X <= 1 | n = 4) = 2 * 5 / 16
    assert (r["only_a"], r["only_b"]) == (3, 1) and r["p"] == pytest.approx(10 / 16)
    assert mcnemar_exact(a, a)["p"] == 1.0
    assert mcnemar_exact(np.ones(20, bool), np.zeros(20, bool))["p"] == pytest.approx(2 / 2 ** 20)
    with pytest.raises(ValueError):
        mcnemar_exact(a, b[:4])


def test_bootstrap_interval_counts_images_and_seeds():
    rng = np.random.default_rng(1)
    # one seed: the interval is binomial-like, about +-1.96 * sqrt(p(1-p)/n) around the accuracy
    x = rng.random(1000) < 0.6
    one = bootstrap_mean([x], draws=4000)
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / 1000)
    assert one.mean == pytest.approx(x.mean()) and one.seeds == 1 and one.images == 1000
    assert one.high - one.low == pytest.approx(2 * half, rel=0.15)
    # three seeds far apart: much wider than the images alone would give
    seeds = [rng.random(1000) < p for p in (0.3, 0.6, 0.9)]
    many = bootstrap_mean(seeds, draws=4000)
    assert many.high - many.low > 5 * (one.high - one.low)
    assert many.low < many.mean < many.high


def test_bootstrap_difference_is_paired_and_signed():
    rng = np.random.default_rng(2)
    a = [rng.random(500) < 0.5 for _ in range(3)]
    b = [x | (rng.random(500) < 0.2) for x in a]  # b right wherever a is, and on ~10% more
    d = bootstrap_difference(a, b, draws=3000)
    assert d.mean == pytest.approx(np.mean([y.mean() - x.mean() for x, y in zip(a, b)]))
    assert 0 < d.low < d.mean < d.high  # paired: the interval is narrow and excludes 0
    assert d.points().startswith("+")
    swapped = bootstrap_difference(b, a, draws=3000)
    assert swapped.mean == pytest.approx(-d.mean) and swapped.high < 0
    assert bootstrap_difference(a, a, draws=200).high == 0.0
    with pytest.raises(ValueError):
        bootstrap_difference(a, b[:2])
    with pytest.raises(ValueError):
        bootstrap_difference([a[0]], [b[0][:10]])


def test_unpaired_difference_is_wider_than_the_paired_one_and_has_the_same_mean():
    rng = np.random.default_rng(5)
    a = [rng.random(500) < 0.5 for _ in range(3)]
    b = [x | (rng.random(500) < 0.2) for x in a]
    paired, unpaired = bootstrap_difference(a, b, draws=3000), bootstrap_unpaired_difference(a, b, draws=3000)
    assert unpaired.mean == pytest.approx(paired.mean)
    assert unpaired.high - unpaired.low > paired.high - paired.low  # pairing removes the images' shared noise
    assert unpaired.percent() == f"{100 * unpaired.mean:.1f} [{100 * unpaired.low:.1f}, {100 * unpaired.high:.1f}]"
    with pytest.raises(ValueError):
        bootstrap_unpaired_difference(a, b[:2])


def test_bootstrap_is_repeatable():
    a = [np.arange(100) % 3 == 0]
    b = [np.arange(100) % 2 == 0]
    assert bootstrap_difference(a, b, draws=500, seed=4) == bootstrap_difference(a, b, draws=500, seed=4)
