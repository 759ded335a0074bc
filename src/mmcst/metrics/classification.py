"""Image classification metrics of the training monitor: per-class AP, mAP, and the mAP of chance.

The mAP follows MCTformer's monitor: average precision per class over the images that carry at least one
label, averaged over the classes that have positives.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# A run whose final validation mAP is within this many points of chance has not learned its classes.
CHANCE_MARGIN = 0.05


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision (mean precision at the rank of each positive); NaN without positives.

    Args:
        scores: N x C classifier scores.
        targets: N x C multi-hot labels.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64) > 0
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(targets, order, axis=0)
    precision = np.cumsum(hits, axis=0) / np.arange(1, len(scores) + 1)[:, None]
    positives = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (precision * hits).sum(axis=0) / positives, np.nan)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over classes with positives; images without any label are left out (as MCTformer)."""
    targets = np.asarray(targets)
    labelled = targets.sum(axis=1) > 0
    if not labelled.any():
        return float("nan")
    return float(np.nanmean(average_precision(np.asarray(scores)[labelled], targets[labelled])))


def chance_map(labels: Any) -> float:
    """Classification mAP a uniformly random ranking is expected to reach on ``labels`` (N x C multi-hot).

    For a class with P positives among N labelled images, a positive at rank r has on average
    ``1 + (P - 1)(r - 1)/(N - 1)`` positives at or above it, and r is uniform on 1..N, so
    ``E[AP] = a + (1 - a) H_N / N`` with ``a = (P - 1)/(N - 1)`` and H_N the N-th harmonic number: slightly
    above the class frequency. Classes without positives and images without labels are left out, as in the mAP.
    """
    labels = np.asarray(labels, dtype=np.float64) > 0
    labels = labels[labels.any(axis=1)]
    num = len(labels)
    if not num:
        return float("nan")
    positives = labels.sum(axis=0)
    positives = positives[positives > 0]
    if num == 1:
        return 1.0
    a = (positives - 1) / (num - 1)
    harmonic = float(np.sum(1.0 / np.arange(1, num + 1)))
    return float(np.mean(a + (1 - a) * harmonic / num))


def at_chance(value: float, chance: float, margin: float = CHANCE_MARGIN) -> bool:
    """True when a classification mAP ``value`` is less than ``margin`` above ``chance`` (both in [0, 1])."""
    return bool(np.isfinite(value) and np.isfinite(chance) and value - chance < margin)
