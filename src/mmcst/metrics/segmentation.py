"""Segmentation metrics: confusion matrix, and the exact single-pass background-threshold curve.

The seed protocol of MCTformer (METHOD.md 6.1) predicts, at background threshold ``t``, the argmax of the
float32 stack ``[t, M_1, ..., M_C]``. ``np.argmax`` returns the first maximum, so a pixel is background iff
``t >= m`` with ``m = max_c M_c`` (ties go to background), and otherwise the first class reaching ``m``.
The prediction therefore depends on ``t`` only through the position of ``m`` among the thresholds, and one
histogram over (GT class, argmax class, number of thresholds below ``m``) gives the confusion matrix at
every threshold by a cumulative sum: one pass over the pixels whatever the number of thresholds.

Comparisons are made in float32, the dtype of MCTformer's stack: a threshold ``t`` (defined as the float64
nearest to its decimal value, e.g. ``29 / 100``) is compared as ``float32(t)``, and maps are compared as
float32 values (float16 maps convert exactly; float64 maps are rounded to float32, as MCTformer's stack
does). All scores are percentages. A class absent from both the ground truth and the prediction has an
undefined IoU (NaN) and is left out of the mean (MCTformer would count it as 0).
"""
from __future__ import annotations

import math
import warnings
from decimal import Decimal
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = 255

__all__ = [
    "ConfusionMatrix",
    "MCTFORMER_GRID",
    "ThresholdCurve",
    "confusion_scores",
    "power_rule_threshold",
    "threshold_grid",
]


def threshold_grid(start: float, stop: float, step: float) -> np.ndarray:
    """Thresholds ``start, start + step, ..., stop`` (inclusive), float64, each the float nearest its decimal value.

    Decimal arithmetic keeps ``0.29`` equal to ``29 / 100`` (what MCTformer's ``i / 100.0`` gives), where
    ``np.arange(0, 1, 0.01)`` would produce ``0.29000000000000004``.
    """
    if step <= 0:
        raise ValueError(f"threshold step must be > 0, got {step}")
    if stop < start:
        raise ValueError(f"threshold stop ({stop}) must be >= start ({start})")
    d_start, d_step = Decimal(repr(float(start))), Decimal(repr(float(step)))
    count = int((Decimal(repr(float(stop))) - d_start) / d_step + Decimal("1e-9")) + 1
    return np.array([float(d_start + i * d_step) for i in range(count)], dtype=np.float64)


# MCTformer's ``--curve`` sweep: t = i / 100 for i = 0..59, stopping at the first non-improving threshold.
MCTFORMER_GRID = threshold_grid(0.0, 0.59, 0.01)


def _nan_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" -> NaN is the answer
        return np.nanmean(values, axis=axis)


def confusion_scores(confusion: np.ndarray, unpredicted: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-class IoU, precision and recall (percent) of ``confusion [..., N, N]`` (rows GT, columns prediction).

    ``unpredicted [..., N]`` counts GT pixels that received no prediction (they lower recall and IoU).
    Undefined ratios (empty union / no prediction / no GT pixel) are NaN. Works on stacks of matrices.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    gt_total = confusion.sum(axis=-1)
    if unpredicted is not None:
        gt_total = gt_total + unpredicted
    pred_total = confusion.sum(axis=-2)
    return {
        "iou": 100.0 * _nan_divide(tp, gt_total + pred_total - tp),
        "precision": 100.0 * _nan_divide(tp, pred_total),
        "recall": 100.0 * _nan_divide(tp, gt_total),
    }


def _label_rows(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Validate a label map (0..N-1 or 255) and return int64 indices with 255 mapped to ``num_classes``."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or (labels.max() >= num_classes and labels.max() != IGNORE_INDEX)):
        bad = np.unique(labels[(labels < 0) | ((labels >= num_classes) & (labels != IGNORE_INDEX))])
        raise ValueError(f"{what} has values {bad[:10].tolist()} outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    rows = labels.astype(np.int64)
    rows[rows == IGNORE_INDEX] = num_classes
    return rows


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` labels (background included), accumulated over a dataset.

    Rows are ground truth, columns prediction. GT pixels equal to 255 are ignored; a predicted 255 (no
    prediction) counts against recall only, as MCTformer's PNG evaluation does.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._unpredicted = np.zeros(num_classes, dtype=np.int64)  # valid GT pixels predicted 255

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> "ConfusionMatrix":
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
        out = cls(matrix.shape[0])
        out.matrix = matrix.astype(np.int64)
        return out

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` and ``gt`` HxW label maps (0..N-1, 255)."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match ground truth {gt.shape}")
        n = self.num_classes
        rows = _label_rows(gt, n, "ground truth")
        cols = _label_rows(pred, n, "prediction")
        # One bincount over combined indices; the extra row/column (255) is dropped afterwards.
        counts = np.bincount((rows * (n + 1) + cols).ravel(), minlength=(n + 1) * (n + 1)).reshape(n + 1, n + 1)
        self.matrix += counts[:n, :n]
        self._unpredicted += counts[:n, n]

    def _scores(self) -> dict[str, np.ndarray]:
        return confusion_scores(self.matrix, self._unpredicted)

    def iou(self) -> np.ndarray:
        """Per-class IoU in percent; NaN for a class absent from both GT and prediction."""
        return self._scores()["iou"]

    def precision(self) -> np.ndarray:
        return self._scores()["precision"]

    def recall(self) -> np.ndarray:
        return self._scores()["recall"]

    def miou(self) -> float:
        """Mean IoU in percent over the classes whose IoU is defined."""
        return float(_nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum() + self._unpredicted.sum()
        return float(100.0 * np.trace(self.matrix) / total) if total else math.nan


def power_rule_threshold(power: float) -> float:
    """The constant threshold equivalent to a background plane ``(1 - m) ** power`` for maps in [0, 1].

    ``(1 - m) ** k >= m`` holds exactly for ``m <= v`` (the left side falls, the right side rises), so the
    power rule is the constant rule at ``v``. Returned is the largest float32 ``v`` in [0, 1] for which the
    float32 computation ``(1 - v) ** k >= v`` holds, found by bisection over the ordered float32 bit patterns.
    """
    if not power > 0:
        raise ValueError(f"bg_power must be > 0, got {power}")

    def is_background(bits: int) -> bool:
        v = np.array([bits], dtype=np.uint32).view(np.float32)
        return bool(np.power(np.float32(1.0) - v, power)[0] >= v[0])

    lo, hi = 0, int(np.array([1.0], np.float32).view(np.uint32)[0])  # bit patterns of 0.0 and 1.0
    if is_background(hi):
        return 1.0
    while hi - lo > 1:  # invariant: is_background(lo) and not is_background(hi)
        mid = (lo + hi) // 2
        if is_background(mid):
            lo = mid
        else:
            hi = mid
    return float(np.array([lo], dtype=np.uint32).view(np.float32)[0])


_NAN_BIN = -(1 << 30)  # makes the combined index negative, which np.bincount rejects: NaN maps are an error
_FLOAT16_INF_BITS = 0x7C00  # float16 patterns below this are the finite non-negative values, in value order


class _BinLookup:
    """Maps max scores ``m`` to their bin ``#{j : U[j] < m}`` for the sorted float32 grid ``U``.

    ``np.searchsorted`` costs ~12 ms for a 500x375 map; a table indexed by the bit pattern is exact and
    much faster. float16 patterns index a 65,536-entry table directly. float32 values index a table by
    the top 20 bits of their pattern: each entry covers a contiguous run of 4,096 floats, and the few runs
    that contain a threshold (or infinity) are marked ambiguous and resolved by ``searchsorted`` on just
    those pixels. Entries for NaN patterns hold ``_NAN_BIN``.
    """

    SHIFT = 12

    def __init__(self, sorted_thresholds: np.ndarray) -> None:
        self.u = np.asarray(sorted_thresholds, dtype=np.float32)
        all16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        self.lut16 = np.searchsorted(self.u, all16.astype(np.float32), side="left").astype(np.int32)
        self.lut16[np.isnan(all16)] = _NAN_BIN
        prefixes = np.arange(1 << (32 - self.SHIFT), dtype=np.uint32) << self.SHIFT
        first, last = prefixes.view(np.float32), (prefixes | ((1 << self.SHIFT) - 1)).view(np.float32)
        low = np.searchsorted(self.u, first, side="left")
        high = np.searchsorted(self.u, last, side="left")
        lut32 = np.where(low == high, low, -1)
        lut32[np.isnan(first) & np.isnan(last)] = _NAN_BIN
        lut32[np.isinf(first) & np.isnan(last)] = -1  # the run starting at +-inf: resolved per pixel
        # Clipped maps hold many exact zeros, which share the first run with threshold 0.0. When 0.0 is the
        # only threshold in that run, tiny positives get bin 1 from the table and exact zeros are reset to 0.
        self.zero_split = bool(self.u[0] == 0 and (self.u.size == 1 or self.u[1] > last[0]))
        if self.zero_split:
            lut32[0] = 1
        self.lut32 = lut32.astype(np.int32)

    def float32(self, m: np.ndarray) -> np.ndarray:
        m = np.ascontiguousarray(m, dtype=np.float32)
        bits = m.view(np.uint32)
        bins = self.lut32[bits >> self.SHIFT]
        if self.zero_split:
            np.putmask(bins, bits == 0, 0)
        ambiguous = np.flatnonzero(bins == -1)
        if ambiguous.size:
            values = m.reshape(-1)[ambiguous]
            resolved = np.searchsorted(self.u, values, side="left").astype(np.int32)
            resolved[np.isnan(values)] = _NAN_BIN
            bins.reshape(-1)[ambiguous] = resolved
        return bins


class ThresholdCurve:
    """mIoU at every background threshold of a grid, accumulated in one pass over the pixels.

    Args:
        num_classes_with_bg: N = 1 + number of foreground classes (21 for VOC, 81 for COCO).
        thresholds: background thresholds (>= 0), e.g. ``threshold_grid(0, 0.95, 0.01)``.
        bg_rule: ``constant`` (background plane = t), or ``power``: additionally evaluates the background
            plane ``(1 - max_c M_c) ** power`` (PSA/IRN style), which equals the constant rule at
            :func:`power_rule_threshold` and so comes from the same histogram.
        power: the exponent k of the power rule.

    The MCTformer sweep points (0.00..0.59) and the power-rule point are merged into an internal grid, so
    :meth:`mctformer_protocol` and :meth:`power_rule` are exact whatever ``thresholds`` holds.
    """

    def __init__(
        self,
        num_classes_with_bg: int,
        thresholds: Sequence[float] | np.ndarray,
        bg_rule: str = "constant",
        power: float = 1.0,
    ) -> None:
        if num_classes_with_bg < 2:
            raise ValueError(f"num_classes_with_bg must be >= 2 (background + classes), got {num_classes_with_bg}")
        thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if thresholds.size == 0:
            raise ValueError("thresholds must not be empty")
        if not np.all(np.isfinite(thresholds)) or thresholds.min() < 0:
            raise ValueError(f"thresholds must be finite and >= 0, got min {thresholds.min()}")
        if bg_rule not in ("constant", "power"):
            raise ValueError(f"bg_rule must be 'constant' or 'power', got {bg_rule!r}")
        self.num_classes = num_classes_with_bg
        self.num_fg = num_classes_with_bg - 1
        self.thresholds = thresholds
        self.bg_rule = bg_rule
        self.power = float(power)
        self.power_threshold: Optional[float] = power_rule_threshold(power) if bg_rule == "power" else None

        extra = [MCTFORMER_GRID] + ([np.array([self.power_threshold])] if self.power_threshold is not None else [])
        # Internal grid in float32, the comparison dtype; distinct float64 values equal in float32 share a slot.
        self._grid = np.unique(np.concatenate([thresholds] + extra).astype(np.float32))
        self._bins = self._grid.size + 1  # bin b = number of grid thresholds strictly below the max score
        self._lookup = _BinLookup(self._grid)
        rows = self.num_classes + 2  # valid GT 0..N-1, then 255 (ignored), then invalid values (an error)
        if rows * self.num_fg * self._bins >= 2**31:
            raise ValueError("too many classes x thresholds for one histogram")
        self._stride_a = self._bins
        self._stride_g = self.num_fg * self._bins
        row_of = np.full(256, self.num_classes + 1, dtype=np.int32)
        row_of[: self.num_classes] = np.arange(self.num_classes)
        row_of[IGNORE_INDEX] = self.num_classes
        self._gt_offset = (row_of * self._stride_g).astype(np.int32)
        self._hist = np.zeros((self.num_classes, self.num_fg, self._bins), dtype=np.int64)
        self.num_images = 0

    # ------------------------------------------------------------------------------------------ updates
    def update(self, scores: np.ndarray, gt: np.ndarray) -> None:
        """Add one image from dense maps ``scores [C_fg, H, W]`` over all foreground classes (absent = 0)."""
        scores = np.asarray(scores)
        if scores.ndim != 3 or scores.shape[0] != self.num_fg:
            raise ValueError(f"scores must be [{self.num_fg}, H, W], got shape {scores.shape}")
        self.update_sparse(np.arange(self.num_fg), scores, gt)

    def update_sparse(self, keys: np.ndarray | Sequence[int], cam: np.ndarray, gt: np.ndarray) -> None:
        """Add one image from maps of its present classes: ``keys [K]`` 0-based, ``cam [K, H, W]``, ``gt`` HxW.

        Classes not in ``keys`` have zero maps; with thresholds >= 0 they never win.
        """
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        cam = np.asarray(cam)
        gt = np.asarray(gt)
        if cam.ndim != 3 or cam.shape[0] != keys.size:
            raise ValueError(f"cam must be [K, H, W] with K = len(keys) = {keys.size}, got shape {cam.shape}")
        if gt.ndim != 2 or (keys.size and cam.shape[1:] != gt.shape):
            raise ValueError(f"map size {tuple(cam.shape[1:])} does not match ground-truth size {gt.shape}")
        if keys.size and (keys.min() < 0 or keys.max() >= self.num_fg):
            raise ValueError(f"class keys {keys.tolist()} outside 0..{self.num_fg - 1}")
        if keys.size > 1 and np.any(np.diff(keys) <= 0):
            if np.unique(keys).size != keys.size:
                raise ValueError(f"duplicate class keys {keys.tolist()}")
            order = np.argsort(keys)  # first-maximum ties must follow class order, as in the dense stack
            keys, cam = keys[order], cam[order]
        if gt.dtype != np.uint8:
            if gt.size and (gt.min() < 0 or gt.max() > 255):
                raise ValueError(f"ground truth has values outside 0..255 (min {gt.min()}, max {gt.max()})")
            gt = gt.astype(np.uint8)

        index = self._gt_offset[gt]  # int32 H x W: GT row offset
        if keys.size:
            offsets = (keys * self._stride_a).astype(np.int32)
            bits = cam.view(np.uint16) if cam.dtype == np.float16 else None
            if bits is not None and bits.max() < _FLOAT16_INF_BITS:
                # Finite non-negative float16 maps (the stored format): compare the bit patterns as
                # integers, which order like the values and avoid slow float16 arithmetic.
                best, winner = self._max_argmax(bits)
                index += self._lookup.lut16[best]
            else:
                best, winner = self._max_argmax(cam.astype(np.float32, copy=False))  # MCTformer's stack dtype
                index += self._lookup.float32(best)
            if winner is None:
                index += offsets[0]
            elif winner.dtype == bool:  # two planes: the second wins where strictly greater
                index += winner.view(np.uint8) * np.int32(offsets[1] - offsets[0])
                index += offsets[0]
            else:
                index += offsets[winner]
        try:
            counts = np.bincount(index.reshape(-1), minlength=(self.num_classes + 2) * self._stride_g)
        except ValueError:  # a negative index comes only from _NAN_BIN
            raise ValueError("maps contain NaN") from None
        counts = counts.reshape(self.num_classes + 2, self.num_fg, self._bins)
        if counts[self.num_classes + 1].any():
            values = np.unique(gt)
            bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
            raise ValueError(f"ground truth has values {bad.tolist()} outside 0..{self.num_classes - 1} and 255")
        self._hist += counts[: self.num_classes]
        self.num_images += 1

    @staticmethod
    def _max_argmax(planes: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Per-pixel max and first argmax over K planes.

        The argmax is None for K = 1 (the only plane wins) and a bool "second plane wins" map for K = 2.
        """
        if planes.shape[0] == 1:
            return planes[0], None
        if planes.shape[0] == 2:
            return np.maximum(planes[0], planes[1]), planes[1] > planes[0]  # strict: ties keep the first
        if planes.shape[0] > 8:
            winner = np.argmax(planes, axis=0)
            return np.take_along_axis(planes, winner[None], axis=0)[0], winner
        best = planes[0].copy()
        winner = np.zeros(planes.shape[1:], dtype=np.intp)
        for plane in range(1, planes.shape[0]):
            np.putmask(winner, planes[plane] > best, plane)  # strict: the earlier class keeps ties
            np.maximum(best, planes[plane], out=best)
        return best, winner

    def merge(self, other: "ThresholdCurve") -> None:
        """Add another curve's counts (e.g. from a worker process); grids must match."""
        if other._hist.shape != self._hist.shape or not np.array_equal(other._grid, self._grid):
            raise ValueError("cannot merge curves with different classes or thresholds")
        self._hist += other._hist
        self.num_images += other.num_images

    # ------------------------------------------------------------------------------------------ results
    def _confusions(self) -> np.ndarray:
        """Confusion matrices at every internal grid threshold: int64 [G, N, N]."""
        hist = self._hist  # N x C_fg x B
        cumulative = np.cumsum(hist, axis=2)
        # Pixels whose max score is above grid threshold j have bin > j: they take their argmax class.
        foreground = cumulative[:, :, -1:] - cumulative[:, :, :-1]  # N x C_fg x G
        gt_total = cumulative[:, :, -1].sum(axis=1)  # N
        conf = np.empty((self._grid.size, self.num_classes, self.num_classes), dtype=np.int64)
        conf[:, :, 1:] = foreground.transpose(2, 0, 1)
        conf[:, :, 0] = gt_total[None, :] - foreground.sum(axis=1).T
        return conf

    def _slot(self, threshold: float) -> int:
        return int(np.searchsorted(self._grid, np.float32(threshold)))

    def _mious(self) -> np.ndarray:
        return _nanmean(confusion_scores(self._confusions())["iou"])

    def curve(self) -> list[tuple[float, float]]:
        """``[(threshold, mIoU %), ...]`` over the requested thresholds, in their order."""
        mious = self._mious()
        return [(float(t), float(mious[self._slot(t)])) for t in self.thresholds]

    def confusion_at(self, k: int) -> ConfusionMatrix:
        """The confusion matrix at ``thresholds[k]``."""
        return ConfusionMatrix.from_matrix(self._confusions()[self._slot(self.thresholds[k])])

    def confusion_at_threshold(self, threshold: float) -> ConfusionMatrix:
        """The confusion matrix at any threshold of the internal grid (requested, MCTformer or power-rule)."""
        slot = self._slot(threshold)
        if slot >= self._grid.size or self._grid[slot] != np.float32(threshold):
            raise ValueError(f"threshold {threshold} is not on the evaluated grid")
        return ConfusionMatrix.from_matrix(self._confusions()[slot])

    def best_index(self) -> int:
        """Index into ``thresholds`` of the highest mIoU (the lowest threshold on ties)."""
        mious = np.array([m for _, m in self.curve()])
        if np.all(np.isnan(mious)):
            return 0
        return int(np.nanargmax(mious))

    def best(self) -> tuple[float, float]:
        """``(threshold, mIoU %)`` of the best point of the full curve."""
        k = self.best_index()
        return float(self.thresholds[k]), self.curve()[k][1]

    def mctformer_protocol(self) -> tuple[float, float]:
        """MCTformer's greedy sweep: t = 0.00, 0.01, ... 0.59, stop at the first t that does not improve.

        Returns ``(threshold, mIoU %)`` of the point it reports (a first local maximum, METHOD.md 6.1).
        """
        mious = self._mious()
        best_t, best_miou = 0.0, 0.0  # MCTformer starts from max_mIoU = 0.0, best_thr = 0.0
        for t in MCTFORMER_GRID:
            miou = float(mious[self._slot(t)])
            if miou > best_miou:
                best_t, best_miou = float(t), miou
            else:
                break
        return best_t, best_miou

    def power_rule(self) -> tuple[float, float]:
        """``(equivalent threshold, mIoU %)`` of the background plane ``(1 - max) ** power`` (bg_rule=power)."""
        if self.power_threshold is None:
            raise ValueError("power_rule() needs bg_rule='power'")
        return self.power_threshold, float(self._mious()[self._slot(self.power_threshold)])
