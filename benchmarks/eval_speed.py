"""Speed of the single-pass threshold curve against the naive per-threshold evaluation.

    python -m benchmarks.eval_speed [--n 1464] [--thresholds 96] [--json]

Builds ``--n`` random VOC-sized maps (500x375, 1-2 classes each, float16 as mmcst stores them) with
matching random-blob ground truth, in memory, then times

* the single pass: ``ThresholdCurve.update_sparse`` over every image, then the mIoU at every threshold;
* the naive loop (MCTformer's ``evaluation.py``): for each threshold, for each image, stack the
  background plane and the 20 class planes in float32, ``np.argmax``, and count a confusion matrix.

The naive loop costs hours at full size, so it is timed on a subset (``--naive-images`` x
``--naive-thresholds``) and extrapolated linearly (its cost is the same for every image and threshold);
the output says so. On the subset both methods' confusion matrices are compared for equality.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from mmcst.metrics.segmentation import ThresholdCurve, threshold_grid

HEIGHT, WIDTH = 375, 500
NUM_FG = 20


def make_data(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(keys, cam float16 [K, H, W], gt uint8 [H, W])]`` with one blob per present class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    images = []
    for _ in range(count):
        keys = np.sort(rng.choice(NUM_FG, size=1 + int(rng.random() < 0.5), replace=False))
        gt = np.zeros((HEIGHT, WIDTH), np.uint8)
        cam = np.empty((keys.size, HEIGHT, WIDTH), np.float16)
        for plane, key in enumerate(keys):
            cy, cx = rng.uniform(50, HEIGHT - 50), rng.uniform(50, WIDTH - 50)
            radius = rng.uniform(40, 120)
            distance = np.hypot(yy - cy, xx - cx) / radius
            gt[distance < 1] = key + 1
            noisy = 1.2 - 0.8 * distance + rng.normal(0, 0.15, size=(HEIGHT // 25, WIDTH // 25)).repeat(25, 0).repeat(25, 1)
            cam[plane] = np.clip(noisy, 0, 1)
        gt[rng.random((HEIGHT, WIDTH)) < 0.02] = 255  # object boundaries
        images.append((keys, cam, gt))
    return images


def naive_confusions(images, thresholds: np.ndarray) -> np.ndarray:
    """MCTformer's loop: per threshold and image, float32 (1 + C) stack, argmax, confusion."""
    num = NUM_FG + 1
    out = np.zeros((thresholds.size, num, num), np.int64)
    for k, t in enumerate(thresholds):
        for keys, cam, gt in images:
            stack = np.zeros((num, HEIGHT, WIDTH), np.float32)
            stack[keys + 1] = cam
            stack[0] = t
            pred = np.argmax(stack, axis=0)
            valid = gt != 255
            out[k] += np.bincount(gt[valid].astype(np.int64) * num + pred[valid], minlength=num * num).reshape(num, num)
    return out


def single_pass(images, thresholds: np.ndarray) -> tuple[ThresholdCurve, list[tuple[float, float]]]:
    curve = ThresholdCurve(NUM_FG + 1, thresholds)
    for keys, cam, gt in images:
        curve.update_sparse(keys, cam, gt)
    return curve, curve.curve()


def measure(n: int = 1464, num_thresholds: int = 96, naive_images: int = 100, naive_thresholds: int = 3,
            seed: int = 0) -> dict[str, Any]:
    """Both evaluations of ``n`` random maps; the naive one timed on a subset and extrapolated (flagged)."""
    thresholds = threshold_grid(0.0, (num_thresholds - 1) / 100, 0.01)
    t0 = time.perf_counter()
    images = make_data(n, seed)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    curve, _ = single_pass(images, thresholds)
    single_s = time.perf_counter() - t0
    best_t, best_miou = curve.best()

    subset_images = images[: min(naive_images, n)]
    subset_thresholds = thresholds[np.linspace(0, thresholds.size - 1, min(naive_thresholds, thresholds.size)).astype(int)]
    t0 = time.perf_counter()
    naive = naive_confusions(subset_images, subset_thresholds)
    naive_subset_s = time.perf_counter() - t0
    naive_full_s = naive_subset_s * (n / len(subset_images)) * (thresholds.size / subset_thresholds.size)
    extrapolated = len(subset_images) < n or subset_thresholds.size < thresholds.size

    subset_curve, _ = single_pass(subset_images, thresholds)
    agree = all(np.array_equal(subset_curve.confusion_at(int(np.flatnonzero(thresholds == t)[0])).matrix, naive[k])
                for k, t in enumerate(subset_thresholds))

    return {
        "images": n, "size": [HEIGHT, WIDTH], "thresholds": int(thresholds.size), "map_dtype": "float16",
        "mean_classes_per_image": float(np.mean([keys.size for keys, _, _ in images])),
        "build_data_s": round(build_s, 2),
        "single_pass_s": round(single_s, 3),
        "single_pass_ms_per_image": round(1000 * single_s / n, 3),
        "naive_s": round(naive_full_s, 1),
        "naive_extrapolated": extrapolated,
        "naive_timed_subset": {"images": len(subset_images), "thresholds": int(subset_thresholds.size),
                               "seconds": round(naive_subset_s, 2)},
        "speedup": round(naive_full_s / single_s, 1),
        "subset_confusions_identical": agree,
        "best": {"threshold": best_t, "miou": round(best_miou, 3)},
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1464, help="images (VOC train has 1,464)")
    parser.add_argument("--thresholds", type=int, default=96, help="thresholds 0.00, 0.01, ... (96 = 0.00..0.95)")
    parser.add_argument("--naive-images", type=int, default=100, help="images in the timed naive subset")
    parser.add_argument("--naive-thresholds", type=int, default=3, help="thresholds in the timed naive subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    report = measure(args.n, args.thresholds, args.naive_images, args.naive_thresholds, args.seed)
    if args.json:
        print(json.dumps(report))
    else:
        subset = report["naive_timed_subset"]
        print(f"{args.n} maps {WIDTH}x{HEIGHT} (float16, {report['mean_classes_per_image']:.2f} classes/image), "
              f"{report['thresholds']} thresholds, {os.cpu_count()} CPU cores")
        print(f"single pass : {report['single_pass_s']:8.2f} s  ({report['single_pass_ms_per_image']:.2f} ms/image, "
              "whole curve)")
        how = (f"extrapolated from {subset['images']} images x {subset['thresholds']} thresholds "
               f"timed in {subset['seconds']:.1f} s" if report["naive_extrapolated"] else "measured")
        print(f"naive loop  : {report['naive_s']:8.1f} s  ({how})")
        print(f"speed-up    : {report['speedup']:8.1f} x")
        print(f"confusion matrices identical on the subset: {report['subset_confusions_identical']}; "
              f"best mIoU {report['best']['miou']:.2f} at t = {report['best']['threshold']:.2f}")
    return report


if __name__ == "__main__":
    main()
