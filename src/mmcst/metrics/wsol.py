"""OpenImages30k single-label localization metrics: PxAP (wsolevaluation) and pIoU (DA-WSOL), METHOD.md 6.3-6.4.

Both come from two dataset-level histograms of score values, one over ground-truth foreground pixels and one
over background pixels, with the bins of wsolevaluation's ``MaskEvaluator``: ``[t_0, t_1), ...,
[t_{n-1}, 1), [1, 2), [2, 3]`` for ``t = np.arange(0, 1, step)``. Ignored pixels are excluded.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PxAPAccumulator", "prepare_openimages_map", "resize_mask_nearest"]


def prepare_openimages_map(cam: np.ndarray, size: int = 224) -> np.ndarray:
    """wsolevaluation's score map: bicubic resize to ``size x size``, min-max normalise, float64 in [0, 1].

    A constant (or NaN-containing) map becomes all zeros, as wsolevaluation's ``normalize_scoremap`` does.
    Bicubic follows OpenCV's ``INTER_CUBIC`` convention (a = -0.75, half-pixel centres, replicated border),
    which is torch's ``bicubic`` with ``align_corners=False``; bicubic overshoot is clipped after normalising.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"expected an HxW map, got shape {cam.shape}")
    if np.isnan(cam).any() or cam.min() == cam.max():
        # Checked before resizing too: interpolation rounding would turn a constant map into noise.
        return np.zeros((size, size), dtype=np.float64)
    if cam.shape != (size, size):
        tensor = torch.from_numpy(np.ascontiguousarray(cam))[None, None]
        cam = F.interpolate(tensor, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    if np.isnan(cam).any():
        return np.zeros((size, size), dtype=np.float64)
    low, high = cam.min(), cam.max()
    if low == high:
        return np.zeros((size, size), dtype=np.float64)
    return np.clip((cam - low) / (high - low), 0.0, 1.0)


def resize_mask_nearest(mask: np.ndarray, size: int = 224) -> np.ndarray:
    """Nearest-neighbour resize of a label mask to ``size x size`` with OpenCV's ``INTER_NEAREST`` rule.

    Source index ``floor(i * in / out)``, the rule wsolevaluation's ``cv2.resize`` applies to the masks;
    computed with integers so no rounding can move a pixel.
    """
    mask = np.asarray(mask)
    height, width = mask.shape
    rows = (np.arange(size) * height) // size
    cols = (np.arange(size) * width) // size
    return mask[rows[:, None], cols[None, :]]


class PxAPAccumulator:
    """Dataset-level PxAP and pIoU (percent) from fg/bg score histograms.

    Args:
        step: threshold spacing Δ of ``np.arange(0, 1, Δ)`` (0.001 as wsolevaluation's training config).
    """

    def __init__(self, step: float = 0.001) -> None:
        if not 0 < step < 1:
            raise ValueError(f"step must be in (0, 1), got {step}")
        self.step = float(step)
        self.thresholds = np.arange(0, 1, step)  # the same float64 grid as wsolevaluation
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.num_bins = self.edges.size - 1
        self.fg_hist = np.zeros(self.num_bins, dtype=np.int64)
        self.bg_hist = np.zeros(self.num_bins, dtype=np.int64)
        self.num_images = 0

    def update(self, score: np.ndarray, gt_fg: np.ndarray, ignore: np.ndarray | None = None) -> None:
        """Add one image: ``score`` HxW float64 in [0, 1], ``gt_fg`` bool HxW, ``ignore`` bool HxW or None.

        As in wsolevaluation, ignore regions only apply outside the foreground.
        """
        score = np.asarray(score)
        gt_fg = np.asarray(gt_fg, dtype=bool)
        if score.shape != gt_fg.shape:
            raise ValueError(f"score map shape {score.shape} does not match the mask shape {gt_fg.shape}")
        if not np.issubdtype(score.dtype, np.floating):
            raise ValueError(f"score map must be floating point, got {score.dtype}")
        score = score.astype(np.float64, copy=False)
        if np.isnan(score).any() or score.min(initial=0.0) < 0 or score.max(initial=0.0) > 1:
            raise ValueError("score map must lie in [0, 1] without NaN (use prepare_openimages_map)")
        # bin k holds edges[k] <= s < edges[k+1], numpy.histogram's rule for these edges
        bins = np.searchsorted(self.edges, score, side="right") - 1
        counted = np.ones(score.shape, dtype=bool) if ignore is None else (gt_fg | ~np.asarray(ignore, dtype=bool))
        self.fg_hist += np.bincount(bins[counted & gt_fg], minlength=self.num_bins)
        self.bg_hist += np.bincount(bins[counted & ~gt_fg], minlength=self.num_bins)
        self.num_images += 1

    def _rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN at thresholds ``[2, 1, t_{n-1}, ..., t_0]`` (high to low) and those thresholds."""
        if self.fg_hist.sum() <= 0:
            raise ValueError("no ground-truth foreground pixel was accumulated")
        tp = np.cumsum(self.fg_hist[::-1]).astype(np.float64)
        fp = np.cumsum(self.bg_hist[::-1]).astype(np.float64)
        fn = self.fg_hist.sum() - tp
        return tp, fp, fn, self.edges[:-1][::-1]

    def pxap(self) -> float:
        """Pixel average precision: sum of precision x recall increments over thresholds, high to low."""
        tp, fp, fn, _ = self._rates()
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        area = precision[1:] * np.diff(recall)
        return float(100.0 * area[~np.isnan(area)].sum())

    def iou_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(thresholds ascending, dataset-level IoU % at each)``."""
        tp, fp, fn, thresholds = self._rates()
        iou = 100.0 * tp / (tp + fp + fn)
        return thresholds[::-1].copy(), iou[::-1].copy()

    def piou(self) -> float:
        """Peak IoU: max over thresholds of the dataset-level pixel IoU."""
        return float(self.iou_curve()[1].max())

    def piou_threshold(self) -> float:
        """The (lowest) threshold at which the peak IoU is reached."""
        thresholds, iou = self.iou_curve()
        return float(thresholds[int(np.argmax(iou))])
