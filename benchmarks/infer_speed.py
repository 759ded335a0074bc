"""Map-generation throughput: mmcst's batched generator against a batch-size-1 loop, same maps.

    python -m benchmarks.infer_speed [--model mmcst] [--backbone vit_small_patch16_224] [--images 16]
                                     [--batch 8] [--device cpu|cuda] [--json]

On ``--images`` synthetic VOC-sized images (500 x 375, random normalised pixels, 1-3 present classes of
20) and a random-weight model, times the localization maps at scales 1.0 / 0.75 / 1.25 with flip and
patch-affinity refinement, two ways:

* ``ours``: :class:`mmcst.engine.infer.MapGenerator` as ``mmcst infer`` runs it: images bucketed by size
  (all VOC-sized here, so one bucket) in batches of ``--batch``, each scale's flip in the same forward as
  its image, bf16 autocast on CUDA (``infer.precision=bf16``; mmcst infer defaults to fp32);
* ``reference``: MCTformer's ``generate_attention_maps_ms``: one image at a time, one float32 forward per
  scale and per flip, each map refined, upsampled and summed.

Both include copying the finished maps to host memory; neither includes image decoding or file writing.
Both paths are warmed up (untimed) on a half-size image first. The maps of both are compared
(``maps_equal``: max abs difference <= ``--atol``): on CPU all of them (both run in float32), on CUDA the
first ``--check-images``, with ours re-run in float32; there the bf16 maps are also compared with the
float32 ones (Pearson correlation and max abs difference of the normalised maps).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.device import add_device_argument, device_from_args, sync
from benchmarks.memory import PeakMemory
from benchmarks.model_speed import model_config
from mmcst.engine.infer import MapGenerator
from mmcst.models.registry import build_model
from mmcst.refine import affinity_refine

HEIGHT, WIDTH = 375, 500
SCALES = (1.0, 0.75, 1.25)
NUM_CLASSES = 20


def make_images(count: int, seed: int = 0, size: tuple[int, int] = (HEIGHT, WIDTH),
                num_classes: int = NUM_CLASSES) -> list[tuple[torch.Tensor, np.ndarray]]:
    """``count`` pairs of (3 x H x W normalised image, sorted present-class indices)."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return [(torch.randn(3, *size, generator=generator),
             np.sort(rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False)).astype(np.int64))
            for _ in range(count)]


def build_map_model(model: str, backbone: str, device: torch.device, num_classes: int = NUM_CLASSES,
                    backbone_overrides: Optional[dict[str, Any]] = None) -> nn.Module:
    """A random-weight model in eval mode (the maps' cost does not depend on the weights)."""
    torch.manual_seed(0)
    cfg = model_config(model, backbone, 224, backbone_overrides)
    return build_model(cfg, [f"class{i}" for i in range(num_classes)]).to(device).eval()


def ours(generator: MapGenerator, images: Sequence[tuple[torch.Tensor, np.ndarray]], batch: int,
         device: torch.device) -> list[np.ndarray]:
    """Maps as ``mmcst infer`` makes them: equal sizes bucketed, ``batch`` images per call."""
    buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, (image, _) in enumerate(images):
        buckets[tuple(image.shape[-2:])].append(index)
    out: list[Optional[np.ndarray]] = [None] * len(images)
    for indices in buckets.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            stacked = torch.stack([images[i][0] for i in chunk]).to(device, non_blocking=True)
            for i, cam in zip(chunk, generator(stacked, [images[i][1] for i in chunk])):
                out[i] = cam.cpu().numpy()
    return out  # type: ignore[return-value]


@torch.inference_mode()
def reference_map(model: nn.Module, image: torch.Tensor, keys: np.ndarray, scales: Sequence[float], flip: bool,
                  refine: bool) -> torch.Tensor:
    """One image the peers' way: a separate float32 batch-1 forward for every scale and every flip."""
    height, width = image.shape[-2:]
    index = torch.as_tensor(keys, device=image.device)
    total = image.new_zeros((len(keys), height, width), dtype=torch.float32)
    for scale in scales:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        scaled = image[None] if size == (height, width) else \
            F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            out = model.localize(scaled.flip(-1) if flipped else scaled, need_affinity=refine)
            maps = out.maps.float()
            if refine and out.affinity is not None:
                maps = affinity_refine(maps, out.affinity.float())
            up = F.interpolate(maps[:, index], size=(height, width), mode="bilinear", align_corners=False)[0]
            total += up.flip(-1) if flipped else up
    low = total.amin(dim=(1, 2), keepdim=True)
    high = total.amax(dim=(1, 2), keepdim=True)
    return (total - low) / (high - low + 1e-8)


def reference(model: nn.Module, images: Sequence[tuple[torch.Tensor, np.ndarray]], scales: Sequence[float],
              flip: bool, refine: bool, device: torch.device) -> list[np.ndarray]:
    return [reference_map(model, image.to(device), keys, scales, flip, refine).cpu().numpy()
            for image, keys in images]


def map_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> dict[str, float]:
    """Max abs difference and Pearson correlation over all pixels of two sets of normalised maps."""
    x = np.concatenate([m.ravel() for m in a]).astype(np.float64)
    y = np.concatenate([m.ravel() for m in b]).astype(np.float64)
    return {"max_abs_diff": float(np.abs(x - y).max()), "correlation": float(np.corrcoef(x, y)[0, 1])}


def measure_maps(model_name: str = "mmcst", backbone: str = "vit_small_patch16_224", images: int = 16,
                 batch: int = 8, device: torch.device = torch.device("cpu"), *, scales: Sequence[float] = SCALES,
                 flip: bool = True, refine: bool = True, check_images: int = 2, atol: float = 1e-3,
                 size: tuple[int, int] = (HEIGHT, WIDTH), backbone_overrides: Optional[dict[str, Any]] = None,
                 seed: int = 0) -> dict[str, Any]:
    """Time both map generators on the same images; check their float32 maps agree. One result dict."""
    model = build_map_model(model_name, backbone, device, backbone_overrides=backbone_overrides)
    data = make_images(images, seed, size)
    cuda = device.type == "cuda"
    exact = MapGenerator(model, scales, flip, refine, device, precision="fp32")
    fast = MapGenerator(model, scales, flip, refine, device, precision="bf16") if cuda else exact

    # Untimed warm-up of both paths (kernel selection, allocator) on a half-size image.
    warm = make_images(1, seed + 1, (max(1, size[0] // 2), max(1, size[1] // 2)))
    ours(fast, warm, batch, device)
    reference(model, warm, scales, flip, refine, device)

    # Peak memory of each pass: on CUDA all allocated memory (weights included); on CPU what the pass adds
    # to the resident memory before it (its activations, buffers and output maps).
    memory = PeakMemory(device).begin()
    start = time.perf_counter()
    ours_maps = ours(fast, data, batch, device)
    sync(device)
    ours_s = time.perf_counter() - start
    peak_ours = memory.read()
    memory.restart(rebase=True)
    start = time.perf_counter()
    reference_maps = reference(model, data, scales, flip, refine, device)
    sync(device)
    reference_s = time.perf_counter() - start
    peak_reference = memory.read()

    # The reference is float32; so is ours on CPU (its timed maps are compared), on CUDA ours is re-run in
    # float32 on the first ``check_images`` images for the equality check and compared with its bf16 maps.
    count = len(data) if not cuda else max(1, min(check_images, images))
    ours_fp32 = ours_maps if not cuda else ours(exact, data[:count], batch, device)
    agreement = map_agreement(ours_fp32[:count], reference_maps[:count])
    result: dict[str, Any] = {
        "model": model_name, "backbone": backbone, "images": images, "size": list(size), "batch": batch,
        "scales": list(scales), "flip": flip, "refine": refine,
        "ours_precision": "bf16" if cuda else "fp32", "reference_precision": "fp32",
        "ours_s": ours_s, "reference_s": reference_s, "ours_images_per_s": images / ours_s,
        "reference_images_per_s": images / reference_s, "speedup": reference_s / ours_s,
        "ours_peak_mem_mib": peak_ours, "reference_peak_mem_mib": peak_reference,
        "check_images": count, "maps_equal": agreement["max_abs_diff"] <= atol, "atol": atol,
        "ours_vs_reference_fp32": agreement,
    }
    if cuda:
        result["bf16_vs_fp32"] = map_agreement(ours_maps[:count], ours_fp32)
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mmcst", choices=["mmcst", "mctformer"])
    parser.add_argument("--backbone", default="vit_small_patch16_224", help="timm ViT name")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="images per generator call (ours)")
    parser.add_argument("--check-images", type=int, default=2, help="on CUDA: images whose float32 maps are compared")
    parser.add_argument("--atol", type=float, default=1e-3)
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON after the summary")
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    result = measure_maps(args.model, args.backbone, args.images, args.batch, device,
                          check_images=args.check_images, atol=args.atol)
    print(f"# maps of {args.images} {WIDTH}x{HEIGHT} images, {args.model} {args.backbone}, scales {list(SCALES)} "
          f"+ flip, affinity refinement, {device.type}")
    print(f"ours      : {result['ours_images_per_s']:8.2f} img/s (batch {args.batch}, {result['ours_precision']})")
    print(f"reference : {result['reference_images_per_s']:8.2f} img/s (batch 1, one forward per scale and flip, fp32)")
    print(f"speed-up  : {result['speedup']:8.2f} x; float32 maps equal: {result['maps_equal']} "
          f"(max abs diff {result['ours_vs_reference_fp32']['max_abs_diff']:.2e})")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
