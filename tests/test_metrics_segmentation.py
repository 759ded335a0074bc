"""The single-pass threshold curve against MCTformer's per-threshold argmax, and the confusion matrix."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mmcst.metrics.segmentation import (
    MCTFORMER_GRID,
    ConfusionMatrix,
    ThresholdCurve,
    confusion_scores,
    power_rule_threshold,
    threshold_grid,
)

# Values that sit exactly on grid thresholds (in float32) or one float32 step beside them.
_F32 = np.float32
_TIES = np.array([0.0, 0.25, 0.5, 0.75, 1.0, _F32(0.1), _F32(0.29), _F32(0.3), _F32(0.59)], dtype=np.float32)
_NEAR = np.concatenate([np.nextafter(_TIES, _F32(2)), np.nextafter(_TIES, _F32(-1))]).astype(np.float32)
_NEAR = _NEAR[(_NEAR >= 0) & (_NEAR <= 1)]  # maps live in [0, 1]


def brute_confusion(dense_maps: list[np.ndarray], gts: list[np.ndarray], background: float | None,
                    num_classes: int, power: float | None = None) -> np.ndarray:
    """MCTformer: a float32 (1 + C) x H x W stack with plane 0 = t (or (1 - max)^k), np.argmax, count valid pixels."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for maps, gt in zip(dense_maps, gts):
        stack = np.zeros((num_classes,) + gt.shape, dtype=np.float32)
        stack[1:] = maps
        stack[0] = background if power is None else np.power(_F32(1) - stack[1:].max(axis=0), power)
        pred = np.argmax(stack, axis=0)
        valid = gt != 255
        np.add.at(confusion, (gt[valid].astype(np.int64), pred[valid]), 1)
    return confusion


def brute_miou(confusion: np.ndarray) -> float:
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float(np.mean(tp[present] / union[present]) * 100)


def random_image(rng: np.random.Generator, num_fg: int, shape: tuple[int, int], present: int):
    """Dense maps with a few present classes (others zero), mixing random values with exact grid ties."""
    keys = np.sort(rng.choice(num_fg, size=present, replace=False))
    dense = np.zeros((num_fg,) + shape, dtype=np.float32)
    for key in keys:
        values = rng.random(shape, dtype=np.float32)
        special = rng.random(shape) < 0.4
        values[special] = rng.choice(np.concatenate([_TIES, _NEAR]), size=int(special.sum()))
        dense[key] = values
    if present > 1:  # exact ties between classes: the first class must win
        dense[keys[1], :2] = dense[keys[0], :2]
    gt = rng.integers(0, num_fg + 1, size=shape).astype(np.uint8)
    gt[rng.random(shape) < 0.1] = 255
    return keys, dense, gt


def test_threshold_grid_is_decimal_exact():
    grid = threshold_grid(0.0, 0.95, 0.01)
    assert grid.size == 96 and grid.dtype == np.float64
    assert all(grid[i] == i / 100.0 for i in range(96))
    assert np.array_equal(MCTFORMER_GRID, np.array([i / 100.0 for i in range(60)]))
    assert threshold_grid(0.1, 0.3, 0.1).tolist() == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_single_pass_equals_per_threshold_argmax(dtype):
    rng = np.random.default_rng(0)
    num_classes, shape = 6, (23, 31)
    thresholds = threshold_grid(0.0, 1.0, 0.01)  # includes 0.25, 0.5, 1.0 and float32-inexact 0.1, 0.29
    curve = ThresholdCurve(num_classes, thresholds)
    dense_maps, gts = [], []
    for index in range(8):
        keys, dense, gt = random_image(rng, num_classes - 1, shape, present=1 + index % 3)
        dense = dense.astype(dtype)
        curve.update_sparse(keys, dense[keys], gt)
        dense_maps.append(dense)
        gts.append(gt)
    # an image with no class map at all: background everywhere
    empty_gt = rng.integers(0, num_classes, size=shape).astype(np.uint8)
    curve.update_sparse(np.zeros(0, np.int64), np.zeros((0,) + shape, np.float32), empty_gt)
    dense_maps.append(np.zeros((num_classes - 1,) + shape, dtype))
    gts.append(empty_gt)

    points = curve.curve()
    for k, t in enumerate(thresholds):
        expected = brute_confusion(dense_maps, gts, t, num_classes)
        np.testing.assert_array_equal(curve.confusion_at(k).matrix, expected, err_msg=f"threshold {t}")
        assert points[k][1] == pytest.approx(brute_miou(expected), abs=1e-9)


def test_float32_comparison_matches_mctformer_not_float64():
    # float32(0.1) > 0.1 in float64: a float64 comparison would call it foreground at t = 0.1;
    # MCTformer's float32 stack holds float32(0.1) as plane 0, a tie, so the pixel is background.
    curve = ThresholdCurve(2, [0.1])
    curve.update_sparse([0], np.full((1, 1, 1), _F32(0.1)), np.zeros((1, 1), np.uint8))
    assert curve.confusion_at(0).matrix.tolist() == [[1, 0], [0, 0]]
    assert brute_confusion([np.full((1, 1, 1), _F32(0.1))], [np.zeros((1, 1), np.uint8)], 0.1, 2).tolist() == [[1, 0], [0, 0]]


def test_dense_update_and_sparse_update_agree_and_unsorted_keys():
    rng = np.random.default_rng(1)
    thresholds = threshold_grid(0.0, 0.95, 0.05)
    dense_curve, sparse_curve = ThresholdCurve(5, thresholds), ThresholdCurve(5, thresholds)
    for _ in range(3):
        keys, dense, gt = random_image(rng, 4, (9, 11), present=3)
        dense_curve.update(dense, gt)
        order = keys[::-1]  # keys in any order: ties must still go to the lowest class index
        sparse_curve.update_sparse(order, dense[order], gt)
    assert dense_curve.curve() == sparse_curve.curve()


def test_one_hot_ground_truth_scores_100_inside_unit_interval():
    rng = np.random.default_rng(2)
    num_classes = 4
    thresholds = threshold_grid(0.0, 1.0, 0.05)
    curve = ThresholdCurve(num_classes, thresholds)
    for _ in range(3):
        gt = rng.integers(0, num_classes, size=(16, 20)).astype(np.uint8)
        dense = np.stack([(gt == c).astype(np.float32) for c in range(1, num_classes)])
        gt[0, 0] = 255
        curve.update(dense, gt)
    for t, miou in curve.curve():
        if 0 < t < 1:
            assert miou == pytest.approx(100.0), t
    assert dict(curve.curve())[1.0] < 100.0  # t = 1 ties with the maps' 1.0: everything background


def test_eighty_one_classes():
    rng = np.random.default_rng(3)
    thresholds = threshold_grid(0.0, 0.9, 0.15)
    curve = ThresholdCurve(81, thresholds)
    dense_maps, gts = [], []
    for _ in range(3):
        keys, dense, gt = random_image(rng, 80, (12, 10), present=4)
        curve.update_sparse(keys, dense[keys], gt)
        dense_maps.append(dense)
        gts.append(gt)
    curve.update(dense_maps[0], gts[0])  # the dense path with 80 planes (np.argmax branch)
    dense_maps.append(dense_maps[0])
    gts.append(gts[0])
    for k, t in enumerate(thresholds):
        np.testing.assert_array_equal(curve.confusion_at(k).matrix, brute_confusion(dense_maps, gts, t, 81))
    assert curve.confusion_at(0).matrix.shape == (81, 81)


def mctformer_sweep(dense_maps, gts, num_classes):
    """MCTformer's ``--curve`` loop, literally."""
    best_miou, best_t = 0.0, 0.0
    for i in range(60):
        t = i / 100.0
        miou = brute_miou(brute_confusion(dense_maps, gts, t, num_classes))
        if miou > best_miou:
            best_miou, best_t = miou, t
        else:
            break
    return best_t, best_miou


@pytest.mark.parametrize("thresholds", [threshold_grid(0.0, 0.95, 0.01), np.array([0.333, 0.777])])
def test_mctformer_protocol_early_stop(thresholds):
    rng = np.random.default_rng(4)
    num_classes, shape = 3, (30, 30)
    # Two blobs whose maps peak at different heights: the curve rises, dips, then rises again.
    dense_maps, gts = [], []
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for peak in (0.2, 0.6):
        dense = np.zeros((num_classes - 1,) + shape, np.float32)
        dense[0] = np.clip(peak * (1 - np.hypot(yy - 15, xx - 15) / 15), 0, 1) + rng.random(shape, dtype=np.float32) * 0.05
        gt = (np.hypot(yy - 15, xx - 15) < 9).astype(np.uint8)
        dense_maps.append(dense)
        gts.append(gt)
    curve = ThresholdCurve(num_classes, thresholds)
    for dense, gt in zip(dense_maps, gts):
        curve.update(dense, gt)
    expected_t, expected_miou = mctformer_sweep(dense_maps, gts, num_classes)
    t, miou = curve.mctformer_protocol()
    assert t == expected_t
    assert miou == pytest.approx(expected_miou, abs=1e-9)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5, 12.0])
def test_power_rule_equals_brute_force(power):
    rng = np.random.default_rng(5)
    num_classes, shape = 4, (20, 20)
    v = power_rule_threshold(power)
    curve = ThresholdCurve(num_classes, threshold_grid(0.0, 0.95, 0.05), bg_rule="power", power=power)
    dense_maps, gts = [], []
    for _ in range(4):
        keys, dense, gt = random_image(rng, num_classes - 1, shape, present=2)
        # values at and beside the equivalent threshold
        dense[keys[0], -1, :3] = [v, np.nextafter(_F32(v), _F32(2)), np.nextafter(_F32(v), _F32(-1))]
        curve.update_sparse(keys, dense[keys], gt)
        dense_maps.append(dense)
        gts.append(gt)
    expected = brute_confusion(dense_maps, gts, None, num_classes, power=power)
    threshold, miou = curve.power_rule()
    assert threshold == v
    np.testing.assert_array_equal(curve.confusion_at_threshold(threshold).matrix, expected)
    assert miou == pytest.approx(brute_miou(expected), abs=1e-9)
    assert power_rule_threshold(1.0) == 0.5


def test_confusion_matrix_update_and_nan_aware_mean():
    rng = np.random.default_rng(6)
    num_classes = 5
    confusion = ConfusionMatrix(num_classes)
    expected = np.zeros((num_classes, num_classes), np.int64)
    for _ in range(3):
        pred = rng.integers(0, 3, size=(7, 9)).astype(np.uint8)  # classes 3 and 4 never predicted
        gt = rng.integers(0, 3, size=(7, 9)).astype(np.uint8)  # ... nor in the ground truth
        gt[0] = 255
        confusion.update(pred, gt)
        valid = gt != 255
        np.add.at(expected, (gt[valid], pred[valid]), 1)
    np.testing.assert_array_equal(confusion.matrix, expected)
    iou = confusion.iou()
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    assert confusion.miou() == pytest.approx(brute_miou(expected))
    assert confusion.miou() == pytest.approx(float(np.mean(iou[:3])))
    tp = np.diag(expected)
    np.testing.assert_allclose(confusion.precision()[:3], 100 * tp[:3] / expected.sum(0)[:3])
    np.testing.assert_allclose(confusion.recall()[:3], 100 * tp[:3] / expected.sum(1)[:3])


def test_confusion_matrix_unpredicted_pixels_and_bad_values():
    confusion = ConfusionMatrix(3)
    gt = np.array([[1, 1, 2, 255]], np.uint8)
    pred = np.array([[1, 255, 2, 0]], np.uint8)
    confusion.update(pred, gt)
    assert confusion.recall()[1] == pytest.approx(50.0)  # the 255 prediction is a miss
    assert confusion.iou()[1] == pytest.approx(50.0)
    assert math.isnan(confusion.iou()[0])
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion.update(np.array([[7]]), np.array([[1]]))
    curve = ThresholdCurve(3, [0.5])
    with pytest.raises(ValueError, match=r"ground truth has values \[9\]"):
        curve.update(np.zeros((2, 1, 2), np.float32), np.array([[9, 0]], np.uint8))
    with pytest.raises(ValueError, match="outside 0..1"):
        curve.update_sparse([2], np.zeros((1, 1, 2), np.float32), np.zeros((1, 2), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        curve.update_sparse([0], np.zeros((1, 3, 2), np.float32), np.zeros((1, 2), np.uint8))


def test_confusion_scores_stacked():
    stack = np.array([[[3, 1], [0, 2]], [[0, 0], [0, 4]]])
    iou = confusion_scores(stack)["iou"]
    np.testing.assert_allclose(iou[0], [75.0, 200 / 3])
    assert np.isnan(iou[1, 0]) and iou[1, 1] == 100.0


def test_bin_lookup_is_exact_for_any_float32_and_float16():
    from mmcst.metrics.segmentation import _BinLookup

    rng = np.random.default_rng(7)
    grid = np.unique(np.concatenate([threshold_grid(0.0, 1.0, 0.01), [1e-30, 3.0]]).astype(np.float32))
    lookup = _BinLookup(grid)
    values = np.concatenate([
        rng.random(20000, dtype=np.float32), _TIES, _NEAR, grid, np.nextafter(grid, _F32(-1)), np.nextafter(grid, _F32(9)),
        np.array([0.0, 1e-45, 1e-38, 2.5, 3.0, np.inf, 1e30], np.float32),
        rng.integers(0, 0x7F800000, 20000, dtype=np.uint32).view(np.float32),  # any finite non-negative pattern
    ]).astype(np.float32)
    np.testing.assert_array_equal(lookup.float32(values), np.searchsorted(grid, values, side="left"))
    finite16 = np.arange(0x7C00, dtype=np.uint16)
    np.testing.assert_array_equal(lookup.lut16[finite16],
                                  np.searchsorted(grid, finite16.view(np.float16).astype(np.float32), side="left"))


def test_float16_negative_values_and_nan():
    thresholds = threshold_grid(0.0, 0.9, 0.1)
    gt = np.array([[1, 1, 0, 2]], np.uint8)
    cam = np.array([[[-0.5, 0.3, -0.0, 0.7]], [[-0.25, 0.6, 0.0, 0.1]]], np.float16)  # negatives: slow path
    curve = ThresholdCurve(3, thresholds)
    curve.update_sparse([0, 1], cam, gt)
    for k, t in enumerate(thresholds):
        np.testing.assert_array_equal(curve.confusion_at(k).matrix,
                                      brute_confusion([cam.astype(np.float32)], [gt], t, 3))
    for dtype in (np.float16, np.float32):
        nan_map = np.full((1, 1, 4), 0.5, dtype)
        nan_map[0, 0, 2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            ThresholdCurve(3, thresholds).update_sparse([1], nan_map, gt)
