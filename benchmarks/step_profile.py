"""Where the time of a training step (or of map generation) goes, from the PyTorch profiler.

    python -m benchmarks.step_profile [--model mmcst] [--backbone vit_base_patch16_224] [--size 448]
                                      [--batch 32] [--variant fused] [--steps 3] [--device cpu|cuda] [--json]
    python -m benchmarks.step_profile --maps [--images 8] [--batch 8] [--device cpu|cuda]

Times the work without the profiler first (wall time per step), then profiles a few steps and sums each
operator's own time on the device that does the work: the GPU's kernel time of the operators on CUDA, their
CPU time on the CPU. Operators are grouped (attention, matrix products, convolution, normalisation,
element-wise, reductions, copies and casts, other) by their names; whatever runs inside the optimizer's step
counts as the optimizer. On CUDA, ``busy_fraction`` is
the share of the wall time in which the GPU runs kernels: well below 1, the step waits on the CPU (Python,
kernel launches, data), which more work per kernel, CUDA graphs or ``torch.compile`` would hide; close to 1,
the kernels themselves are the cost, and the groups say which. ``benchmarks/gpu_check.py`` runs this for each
target it misses.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.device import add_device_argument, device_from_args, sync
from benchmarks.model_speed import VARIANTS, build_training_step

# First match wins; names are aten operators (and the optimizer's own records).
CATEGORIES = [
    ("attention", r"scaled_dot_product|flash|efficient_attention|fmha|cudnn_attention|softmax"),
    ("optimizer", r"adam|multi_tensor|unscale"),
    ("matrix products", r"\b(aten::)?(addmm|mm|bmm|matmul|linear|baddbmm|addbmm|einsum)\b"),
    ("convolution", r"conv"),
    ("normalisation", r"layer_norm|batch_norm|group_norm|rms_norm"),
    ("copies and casts", r"copy_|aten::to\b|_to_copy|contiguous|clone|aten::cat\b|aten::stack\b|index|gather|scatter"),
    ("reductions", r"\b(aten::)?(sum|mean|amax|amin|max|min|norm|logsumexp|topk|sort)\b"),
    ("element-wise", r"gelu|add|mul|div|sub|exp|log|sigmoid|relu|where|fill|zero|pow|sqrt|neg|clamp|dropout|"
                     r"bernoulli|binary_cross|threshold|lerp|abs|sign"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other"


def profile_work(work: Callable[[], Any], device: torch.device, steps: int = 3, warmup: int = 2,
                 top: int = 12) -> dict[str, Any]:
    """Wall time per call of ``work`` (unprofiled), then the profiled breakdown of ``steps`` calls."""
    for _ in range(warmup):
        work()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        work()
    sync(device)
    wall_ms = 1000 * (time.perf_counter() - start) / steps

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            work()
        sync(device)

    def own_us(event: Any) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))
        return float(event.self_cpu_time_total)

    # Each operator's own time, grouped by name; an operator run inside the optimizer's step (record
    # "Optimizer.step#...") counts as the optimizer's whatever its name.
    own: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for event in prof.events():
        if event.device_type != DeviceType.CPU or own_us(event) <= 0:
            continue
        node, label = event, category(event.name)
        while node is not None:
            if node.name.startswith("Optimizer."):
                label = "optimizer"
                break
            node = node.cpu_parent
        own[(event.name, label)] += own_us(event)
        calls[(event.name, label)] += 1
    busy_us = sum(own.values())
    groups: dict[str, float] = defaultdict(float)
    for (_, label), us in own.items():
        groups[label] += us
    ranked = sorted(own, key=own.__getitem__, reverse=True)[:top]
    share = (lambda us: round(100 * us / busy_us, 1)) if busy_us else (lambda us: None)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "time_of": "GPU kernel time per operator" if cuda else "CPU time per operator",
        "steps": steps, "wall_ms_per_step": round(wall_ms, 2),
        "busy_ms_per_step": round(busy_us / 1000 / steps, 2),
        "busy_fraction": round(busy_us / 1000 / steps / wall_ms, 3) if wall_ms else None,
        "categories": {label: {"ms_per_step": round(us / 1000 / steps, 2), "percent": share(us)}
                       for label, us in sorted(groups.items(), key=lambda item: -item[1])},
        "top": [{"op": name, "category": label, "ms_per_step": round(own[(name, label)] / 1000 / steps, 2),
                 "percent": share(own[(name, label)]), "calls_per_step": calls[(name, label)] / steps}
                for name, label in ranked],
    }


def profile_training(model: str, backbone: str, size: int, batch: int, device: torch.device,
                     variant: str = "fused", steps: int = 3, warmup: int = 2, top: int = 12,
                     **kwargs: Any) -> dict[str, Any]:
    """The breakdown of one training case of ``benchmarks.model_speed`` (same step, same precision)."""
    net, optimizer, step = build_training_step(model, backbone, size, batch, variant, device, **kwargs)
    result = profile_work(step, device, steps, warmup, top)
    result.update(work="training step", model=model, backbone=backbone, size=size, batch=batch, variant=variant)
    del net, optimizer
    return result


def profile_maps(device: torch.device, images: int = 8, batch: int = 8, model: str = "mmcst",
                 backbone: str = "vit_small_patch16_224", steps: int = 2, warmup: int = 1,
                 size: Optional[tuple[int, int]] = None,
                 backbone_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The breakdown of map generation as ``benchmarks.infer_speed`` times it (3 scales + flip, refinement;
    bf16 on CUDA). One step is all ``images``."""
    from benchmarks import infer_speed
    from mmcst.engine.infer import MapGenerator

    net = infer_speed.build_map_model(model, backbone, device, backbone_overrides=backbone_overrides)
    data = infer_speed.make_images(images, 0, size or (infer_speed.HEIGHT, infer_speed.WIDTH))
    generator = MapGenerator(net, infer_speed.SCALES, True, True, device,
                             precision="bf16" if device.type == "cuda" else "fp32")
    result = profile_work(lambda: infer_speed.ours(generator, data, batch, device), device, steps, warmup)
    result.update(work=f"maps of {images} images", model=model, backbone=backbone, batch=batch,
                  images_per_s=round(1000 * images / result["wall_ms_per_step"], 2))
    return result


def format_profile(result: dict[str, Any]) -> str:
    lines = [f"{result['work']} on {result['device']}: {result['wall_ms_per_step']} ms per step (wall), "
             f"{result['busy_ms_per_step']} ms of {result['time_of']} (busy fraction {result['busy_fraction']})"]
    lines += [f"  {label:<18}{v['ms_per_step']:>10.2f} ms {v['percent']:>6}%" for label, v in result["categories"].items()]
    lines.append("  top operators:")
    lines += [f"    {t['op'][:60]:<60}{t['ms_per_step']:>9.2f} ms {t['percent']:>6}%  ({t['category']})"
              for t in result["top"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", action="store_true", help="profile map generation instead of training")
    parser.add_argument("--model", default="mmcst", choices=["mmcst", "mctformer", "cam"])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="--maps: images per step")
    parser.add_argument("--variant", default="fused", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON after the table")
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    if args.maps:
        result = profile_maps(device, args.images, args.batch, args.model, args.backbone, steps=args.steps)
    else:
        result = profile_training(args.model, args.backbone, args.size, args.batch, device, args.variant, args.steps)
    print(format_profile(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
