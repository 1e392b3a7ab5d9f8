"""The report's arithmetic: means with bootstrap intervals over prompts, and win rates.

Every quantity is an array ``[N, m]``: N prompts, m samples per prompt. Samples of one
prompt are not independent draws of the population of prompts, so the bootstrap
resamples prompts (with replacement) and keeps each prompt's samples together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_mean(
    values: np.ndarray,  # [N, m]
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Mean over all samples, with a ``confidence`` interval from resampling prompts.

    Every prompt has the same number of samples, so the mean of per-prompt means is the
    overall mean; the interval is the percentile interval of that statistic over
    ``resamples`` draws of N prompts with replacement (seeded: the same inputs give the
    same interval).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty [prompts, samples] array, got {values.shape}")
    per_prompt = values.mean(axis=1)  # [N]
    mean = float(per_prompt.mean())
    if len(per_prompt) == 1 or resamples < 1:
        return Estimate(mean, mean, mean)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_prompt), size=(resamples, len(per_prompt)))  # [B, N]
    means = per_prompt[picks].mean(axis=1)  # [B]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    # the percentile interval of a mean contains the mean up to float rounding
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)))


def win_scores(row: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per sample: 1 where ``row`` beats ``baseline``, 0.5 on a tie, 0 where it loses.

    ``row[i, j]`` and ``baseline[i, j]`` are rewards of replies to prompt i decoded with
    the same seed j, so the comparison is paired.
    """
    row = np.asarray(row, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if row.shape != baseline.shape:
        raise ValueError(f"row {row.shape} and baseline {baseline.shape} differ in shape")
    return (row > baseline) + 0.5 * (row == baseline)  # [N, m]


def win_rate(
    row: np.ndarray, baseline: np.ndarray, resamples: int = 1000, seed: int = 0
) -> Estimate:
    """The share of paired samples the row wins (ties count half), with its interval."""
    return bootstrap_mean(win_scores(row, baseline), resamples, seed)


def worst_gap(
    row_wins: np.ndarray,  # [J, N, m] per-objective win scores of a row against the baseline
    other_wins: np.ndarray,  # [J, N, m] the same for another row, same prompts and seeds
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """``min_j WR_j(row) - min_j WR_j(other)``, both against one baseline, with a paired interval.

    Each bootstrap draw resamples prompts once for both rows and every objective (the rows'
    replies share seeds), and takes each row's worst objective *in that draw*, so the interval
    accounts for which objective is the worst changing.
    """
    row = np.asarray(row_wins, dtype=np.float64).mean(axis=2)  # [J, N] per-prompt win rates
    other = np.asarray(other_wins, dtype=np.float64).mean(axis=2)  # [J, N]
    if row.shape != other.shape or row.ndim != 2 or row.size == 0:
        raise ValueError(f"expected matching [J, N, m] arrays, got {row.shape} and {other.shape}")
    gap = float(row.mean(axis=1).min() - other.mean(axis=1).min())
    num_prompts = row.shape[1]
    if num_prompts == 1 or resamples < 1:
        return Estimate(gap, gap, gap)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num_prompts, size=(resamples, num_prompts))  # [B, N]
    draws = row[:, picks].mean(axis=2).min(axis=0) - other[:, picks].mean(axis=2).min(axis=0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])  # draws: [B]
    return Estimate(gap, float(min(low, gap)), float(max(high, gap)))
