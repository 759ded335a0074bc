"""PxAP / pIoU against a direct per-threshold computation, and the OpenImages map preparation."""
from __future__ import annotations

import numpy as np
import pytest
from mmcst.metrics.wsol import PxAPAccumulator, prepare_openimages_map, resize_mask_nearest


def direct_scores(scores: list[np.ndarray], fgs: list[np.ndarray], ignores: list[np.ndarray], step: float):
    """Per threshold, high to low: TP = #fg with s >= t, FP = #bg with s >= t; then PxAP and max IoU."""
    thresholds = np.append(np.arange(0, 1, step), [1.0, 2.0])[::-1]
    s = np.concatenate([x.ravel() for x in scores])
    fg = np.concatenate([x.ravel() for x in fgs])
    counted = np.concatenate([(f | ~i).ravel() for f, i in zip(fgs, ignores)])
    s, fg = s[counted], fg[counted]
    tp = np.array([np.sum(fg & (s >= t)) for t in thresholds], dtype=float)
    fp = np.array([np.sum(~fg & (s >= t)) for t in thresholds], dtype=float)
    fn = fg.sum() - tp
    with np.errstate(invalid="ignore"):
        precision = tp / (tp + fp)
    recall = tp / fg.sum()
    pxap = sum(precision[k] * (recall[k] - recall[k - 1])
               for k in range(1, thresholds.size) if not np.isnan(precision[k]))
    iou = tp / (tp + fp + fn)
    return 100 * pxap, 100 * iou.max(), thresholds[int(np.flatnonzero(iou == iou.max())[-1])]


def random_case(rng: np.random.Generator, count: int = 4, size: int = 24):
    scores, fgs, ignores = [], [], []
    for _ in range(count):
        fg = np.zeros((size, size), bool)
        y, x = rng.integers(0, size // 2, 2)
        fg[y: y + size // 2, x: x + size // 2] = True
        score = np.clip(fg * 0.5 + rng.random((size, size)) * 0.6, 0, 1)
        score[0, :4] = [0.0, 1.0, 0.5, 0.25]  # edge values: bin boundaries and the [1, 2) bin
        ignore = np.zeros_like(fg)
        ignore[-3:] = True
        scores.append(score)
        fgs.append(fg)
        ignores.append(ignore)
    return scores, fgs, ignores


@pytest.mark.parametrize("step", [0.01, 0.05])
def test_pxap_piou_equal_direct_computation(step):
    scores, fgs, ignores = random_case(np.random.default_rng(0))
    accumulator = PxAPAccumulator(step=step)
    for score, fg, ignore in zip(scores, fgs, ignores):
        accumulator.update(score, fg, ignore)
    pxap, piou, piou_t = direct_scores(scores, fgs, ignores, step)
    assert accumulator.pxap() == pytest.approx(pxap, abs=1e-9)
    assert accumulator.piou() == pytest.approx(piou, abs=1e-9)
    assert accumulator.piou_threshold() == pytest.approx(piou_t)


def test_histograms_match_numpy_histogram_as_wsolevaluation():
    scores, fgs, ignores = random_case(np.random.default_rng(1))
    accumulator = PxAPAccumulator(step=0.001)
    expected_fg = np.zeros(accumulator.num_bins)
    for score, fg, ignore in zip(scores, fgs, ignores):
        accumulator.update(score, fg, ignore)
        gt = fg.astype(np.uint8) + 255 * (ignore & ~fg).astype(np.uint8)  # wsolevaluation's mask encoding
        expected_fg += np.histogram(score[gt == 1], bins=accumulator.edges)[0]
    np.testing.assert_array_equal(accumulator.fg_hist, expected_fg)


def test_perfect_map_scores_100():
    rng = np.random.default_rng(2)
    accumulator = PxAPAccumulator()
    for _ in range(3):
        fg = rng.random((20, 20)) < 0.3
        accumulator.update(fg.astype(np.float64), fg, np.zeros_like(fg))
    assert accumulator.pxap() == pytest.approx(100.0)
    assert accumulator.piou() == pytest.approx(100.0)


def test_constant_map_gives_foreground_fraction():
    rng = np.random.default_rng(3)
    accumulator = PxAPAccumulator()
    fg_count = total = 0
    for _ in range(3):
        fg = rng.random((16, 16)) < 0.25
        ignore = ~fg & (rng.random((16, 16)) < 0.2)
        score = prepare_openimages_map(np.full((7, 9), 0.3), size=16)
        assert not score.any()
        accumulator.update(score, fg, ignore)
        fg_count += fg.sum()
        total += (~ignore).sum()
    assert accumulator.pxap() == pytest.approx(100.0 * fg_count / total)


def opencv_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """OpenCV INTER_CUBIC by hand: Keys kernel a = -0.75, half-pixel centres, replicated border."""
    def kernel(x: float) -> float:
        x, a = abs(x), -0.75
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    def weights(out_size: int, in_size: int) -> np.ndarray:
        matrix = np.zeros((out_size, in_size))
        for i in range(out_size):
            centre = (i + 0.5) * in_size / out_size - 0.5
            base = int(np.floor(centre))
            for tap in range(base - 1, base + 3):
                matrix[i, min(max(tap, 0), in_size - 1)] += kernel(centre - tap)
        return matrix

    return weights(size, image.shape[0]) @ image @ weights(size, image.shape[1]).T


def test_prepare_openimages_map():
    ramp = np.tile(np.arange(10, dtype=np.float32), (6, 1)) ** 2
    ramp[2, 3] = 40.0
    out = prepare_openimages_map(ramp, size=16)
    assert out.shape == (16, 16) and out.dtype == np.float64
    assert out.min() == 0.0 and out.max() == 1.0
    expected = opencv_bicubic(ramp.astype(np.float64), 16)
    expected = np.clip((expected - expected.min()) / (expected.max() - expected.min()), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert prepare_openimages_map(ramp).shape == (224, 224)
    assert not prepare_openimages_map(np.full((5, 5), np.nan)).any()
    already = np.random.default_rng(4).random((224, 224))
    np.testing.assert_allclose(prepare_openimages_map(already), (already - already.min()) / np.ptp(already))


def test_resize_mask_nearest_uses_floor_rule():
    mask = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    out = resize_mask_nearest(mask, 11)
    for i in range(11):
        for j in range(11):
            assert out[i, j] == mask[(i * 5) // 11, (j * 7) // 11]


def test_invalid_inputs():
    accumulator = PxAPAccumulator()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        accumulator.update(np.full((2, 2), 1.5), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="does not match"):
        accumulator.update(np.zeros((2, 2)), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="no ground-truth foreground"):
        PxAPAccumulator().pxap()
