"""PSA's random walk two ways: repeated squaring of the transition matrix vs applying it to the seeds.

    python -m benchmarks.random_walk [--images 5] [--repeats 3] [--threads N] [--device cpu|cuda] [--json]

On ``--images`` synthetic VOC-sized cases (500 x 375 pixels, so a 63 x 47 grid at stride 8: n = 2,961 nodes)
times :func:`mmcst.refine.random_walk_labels` (seeds average-pooled by 8, walked with beta 8 for
2^6 = 64 steps, upsampled, argmax) with

* ``squaring`` (PSA's ``infer_aff.py``): the n x n transition matrix squared 6 times, then applied once:
  6 n^3 multiply-adds;
* ``power``: the transition matrix applied 64 times to the (1 + 20) x n seed matrix: 64 n^2 21 for a
  dense matrix, a quarter of that here, where the radius-5 affinity is banded (only the band is built and
  multiplied).

Each case is an AffinityNet-style affinity (``exp(-mean |f_i - f_j|)`` between node features, radius 5,
made dense by :func:`mmcst.refine.dense_affinity`; the features are piecewise constant over 1-3 object
regions plus noise) and 20 class planes (1-3 present blobs, the others zero, as PSA passes all 21 planes).
Building the cases is not timed. Both methods are warmed up on the first case, then timed in alternation
``--repeats`` times over all cases; the table gives the median and the range of the per-image time.
The masks of both methods are compared pixel for pixel. Matrix products run in full float32 on CUDA too
(no TF32): the walk compounds 64 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Optional

import numpy as np
import torch

from benchmarks.device import add_device_argument, device_from_args, sync
from mmcst.refine import affinity_pair_indices, dense_affinity, random_walk_labels

HEIGHT, WIDTH = 375, 500
STRIDE = 8
RADIUS = 5
NUM_CLASSES = 20
METHODS = ("squaring", "power")


def make_case(seed: int, height: int = HEIGHT, width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(affinity n x n, cams 20 x H x W)`` for one synthetic image."""
    rng = np.random.default_rng(seed)
    grid_h, grid_w = -(-height // STRIDE), -(-width // STRIDE)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    region = np.zeros((height, width), np.int64)
    cams = np.zeros((NUM_CLASSES, height, width), np.float32)
    present = rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)
    for index, key in enumerate(present, start=1):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        distance = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        region[distance < 1] = index
        cams[key] = np.clip(1.2 - 0.8 * distance + rng.normal(0, 0.1, (height, width)), 0, 1)
    # node features: one random 16-d vector per region, plus noise; AffinityNet's affinity between pairs
    cell_region = region[::STRIDE, ::STRIDE]
    features = rng.normal(0, 1, (len(present) + 1, 16))[cell_region] + rng.normal(0, 0.3, (grid_h, grid_w, 16))
    flat = torch.from_numpy(features.reshape(-1, 16).T.astype(np.float32))  # 16 x n
    origin, targets = affinity_pair_indices(grid_h, grid_w, RADIUS)
    pair = torch.exp(-(flat[:, origin].unsqueeze(1) - flat[:, targets]).abs().mean(0))
    return dense_affinity(pair, grid_h, grid_w, RADIUS), torch.from_numpy(cams)


def measure(images: int = 5, repeats: int = 3, device: torch.device = torch.device("cpu"), height: int = HEIGHT,
            width: int = WIDTH, seed: int = 0) -> dict[str, Any]:
    """Time both methods on the same cases; compare their masks. One result dict."""
    cases = [make_case(seed + i, height, width) for i in range(images)]
    cases = [(affinity.to(device), cams.to(device)) for affinity, cams in cases]
    keys = list(range(NUM_CLASSES))

    def run(method: str, affinity: torch.Tensor, cams: torch.Tensor) -> np.ndarray:
        return random_walk_labels(affinity, keys, cams, stride=STRIDE, method=method)  # type: ignore[arg-type]

    for method in METHODS:  # untimed warm-up (allocator, kernel selection)
        run(method, *cases[0])
    per_image: dict[str, list[float]] = {method: [] for method in METHODS}
    masks: dict[str, list[np.ndarray]] = {}
    for _ in range(repeats):
        for method in METHODS:
            sync(device)
            start = time.perf_counter()
            masks[method] = [run(method, affinity, cams) for affinity, cams in cases]
            sync(device)
            per_image[method].append(1000 * (time.perf_counter() - start) / images)
    differing = sum(int((a != b).sum()) for a, b in zip(masks["squaring"], masks["power"]))
    median = {method: statistics.median(times) for method, times in per_image.items()}
    grid = [-(-height // STRIDE), -(-width // STRIDE)]
    return {
        "images": images, "size": [height, width], "grid": grid, "nodes": grid[0] * grid[1],
        "columns": NUM_CLASSES + 1, "beta": 8, "logt": 6, "repeats": repeats, "device": device.type,
        "squaring_ms_per_image": median["squaring"], "power_ms_per_image": median["power"],
        "squaring_ms_range": [min(per_image["squaring"]), max(per_image["squaring"])],
        "power_ms_range": [min(per_image["power"]), max(per_image["power"])],
        "speedup": median["squaring"] / median["power"],
        "masks_equal": differing == 0, "differing_pixels": differing,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5, help="synthetic 500x375 cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all cases, methods alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    report = measure(args.images, args.repeats, device, seed=args.seed)
    if args.json:
        print(json.dumps(report))
        return report
    print(f"random walk on {args.images} images {WIDTH}x{HEIGHT} (grid {report['grid'][1]}x{report['grid'][0]} = "
          f"{report['nodes']} nodes, {report['columns']} seed planes, beta 8, 64 steps), {device.type}, "
          f"{report['torch_threads']} torch threads, {args.repeats} repeats")
    print(f"{'method':<10}{'ms/image':>10}{'range':>20}")
    for method in METHODS:
        low, high = report[f"{method}_ms_range"]
        print(f"{method:<10}{report[f'{method}_ms_per_image']:>10.1f}{f'{low:.1f} - {high:.1f}':>20}")
    print(f"speed-up of power over squaring: {report['speedup']:.1f} x; masks equal: {report['masks_equal']} "
          f"({report['differing_pixels']} differing pixels)")
    return report


if __name__ == "__main__":
    main()
