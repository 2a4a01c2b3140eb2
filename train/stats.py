"""The study's statistics: exact tests on counts and on paired per-image outcomes, and a
bootstrap interval that counts both the seeds and the finite number of test images.

- ``fisher_one_sided(k, m, n)``: two groups of ``n`` runs, ``k`` events in the first and ``m``
  in the second; the probability, with no difference between the groups, of ``k`` or more of
  the ``k + m`` events falling in the first (the hypergeometric tail).
- ``mcnemar_exact(a, b)``: two models' outcomes on the same images (True = correct); the exact
  two-sided McNemar test, a binomial test with p = 1/2 on the discordant images.
- ``bootstrap_difference(a, b)``: per seed, two models' per-image outcomes on the same images;
  the mean over seeds of (accuracy of b - accuracy of a) with a percentile interval from a
  two-stage bootstrap: seeds drawn with replacement, then, within each drawn seed, images drawn
  with replacement (the same images for both models: the difference is paired). With one seed
  the interval is the images' alone, and says so (``seeds == 1``). ``bootstrap_mean`` does the
  same for one model's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Sequence

import numpy as np

__all__ = ["fisher_one_sided", "mcnemar_exact", "bootstrap_mean", "bootstrap_difference", "Interval",
           "BOOTSTRAP_DRAWS"]

BOOTSTRAP_DRAWS = 10_000  # enough for a 95% percentile interval to move by well under 0.1 points between seeds


def fisher_one_sided(k: int, m: int, n: int) -> float:
    """P(at least k of the k + m events fall in the first of two groups of n runs), under no difference."""
    if not (0 <= k <= n and 0 <= m <= n):
        raise ValueError(f"counts must be within 0..{n}, got {k} and {m}")
    total = k + m
    return sum(comb(total, x) * comb(2 * n - total, n - x) for x in range(k, min(total, n) + 1)) / comb(2 * n, n)


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> dict:
    """The exact McNemar test of two models on the same images -> {"only_a", "only_b", "p"}: the images
    only model a got right, only model b got right, and the two-sided p-value."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two outcome vectors over the same images expected, got shapes {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p": 1.0}
    tail = sum(comb(n, x) for x in range(0, min(only_a, only_b) + 1)) / 2 ** n
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}


@dataclass(frozen=True)
class Interval:
    """A mean (an accuracy or a difference of accuracies, 0-1) and its bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    images: int  # per seed (the smallest, when seeds differ)

    def points(self) -> str:
        """'+21.8 [+15.9, +27.5]': percentage points, as the study writes them."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def percent(self) -> str:
        """'61.6 [57.2, 67.9]': an accuracy in %, as the study writes it."""
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def _vectors(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    if not len(values):
        raise ValueError("no seeds")
    vectors = []
    for i, v in enumerate(values):
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"seed {i}: a non-empty vector of per-image figures expected, got shape {v.shape}")
        vectors.append(v)
    return vectors


def _two_stage(groups: Sequence[Sequence[np.ndarray]], signs: Sequence[int], draws: int, level: float,
               seed: int) -> Interval:
    """The two-stage bootstrap: seeds drawn with replacement, then, for each drawn seed, the images of each
    of its vectors drawn independently; the estimate is the mean over seeds of sum(sign x mean)."""
    n_seeds = len(groups[0])
    rng = np.random.default_rng(seed)
    estimates = np.empty(draws)
    for d in range(draws):
        chosen = rng.integers(0, n_seeds, n_seeds)
        estimates[d] = np.mean([sum(sign * group[s][rng.integers(0, group[s].size, group[s].size)].mean()
                                    for sign, group in zip(signs, groups)) for s in chosen])
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    mean = np.mean([sum(sign * group[s].mean() for sign, group in zip(signs, groups)) for s in range(n_seeds)])
    return Interval(mean=float(mean), low=float(low), high=float(high), seeds=n_seeds,
                    images=min(v.size for group in groups for v in group))


def bootstrap_mean(values: Sequence[np.ndarray], *, draws: int = BOOTSTRAP_DRAWS, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean over seeds of the per-image mean of ``values[i]`` (seed i's per-image figures: outcomes as
    0/1, or paired differences as -1/0/+1), with a two-stage bootstrap interval: seeds drawn with
    replacement, then images within each drawn seed."""
    return _two_stage([_vectors(values)], [1], draws, level, seed)


def bootstrap_unpaired_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *,
                                  draws: int = BOOTSTRAP_DRAWS, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean over seeds of accuracy(b) - accuracy(a) where the images cannot be paired (results without
    per-image outcomes): seeds drawn with replacement, then each model's images independently (a wider
    interval than ``bootstrap_difference``'s)."""
    a, b = _vectors(a), _vectors(b)
    if len(a) != len(b):
        raise ValueError(f"one outcome vector per seed for each model expected, got {len(a)} and {len(b)}")
    return _two_stage([a, b], [-1, 1], draws, level, seed)


def bootstrap_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, draws: int = BOOTSTRAP_DRAWS,
                         level: float = 0.95, seed: int = 0) -> Interval:
    """Mean over seeds of accuracy(b) - accuracy(a), with ``bootstrap_mean``'s interval over the paired
    per-image differences; ``a[i]`` and ``b[i]`` are seed i's outcomes of the two models on the same images."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"one outcome vector per seed for each model expected, got {len(a)} and {len(b)}")
    diffs = []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, dtype=bool), np.asarray(y, dtype=bool)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"seed {i}: outcome vectors over the same images expected, got {x.shape} and {y.shape}")
        diffs.append(y.astype(np.int8) - x.astype(np.int8))
    return bootstrap_mean(diffs, draws=draws, level=level, seed=seed)
