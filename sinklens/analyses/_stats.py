"""Confidence intervals shared by the analyses (scipy does the statistics)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats


def mean_interval(
    values: torch.Tensor | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean and its t-interval over all values (the mean twice when they cannot vary)."""
    x = np.asarray(
        values.detach().cpu().double() if isinstance(values, torch.Tensor) else values, dtype=float
    ).ravel()
    mean = float(x.mean())
    if x.size < 2 or np.allclose(x, x[0]):
        return mean, mean, mean
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=stats.sem(x))
    return mean, float(low), float(high)


def proportion_interval(
    successes: int, trials: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Share of successes and its Wilson score interval (NaN for no trials)."""
    if trials == 0:
        return float("nan"), float("nan"), float("nan")
    interval = stats.binomtest(successes, trials).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return successes / trials, float(interval.low), float(interval.high)
