"""All benchmark figures in one run, each paired with a reference implementation of the peers' approach.

    python -m benchmarks.run [--device cpu|cuda] [--preset cpu|gpu] [--json OUT] [--peak-tflops 989]

* training throughput and peak memory, MMCST and MCTformer-V2 (``benchmarks.model_speed``): ours (fused
  SDPA, bf16 autocast and fused AdamW on CUDA) vs the peers' step (explicit softmax(QK^T)V in every block,
  fp16 autocast + GradScaler on CUDA), with the model FLOPs counted per image and the achieved TFLOP/s;
* map generation on VOC-sized images, scales 1.0/0.75/1.25 + flip, affinity refinement
  (``benchmarks.infer_speed``): ours (batched) vs batch size 1, one forward per scale and flip;
* evaluation of 1,464 maps at 96 thresholds (``benchmarks.eval_speed``): single pass vs per-threshold loop
  (the loop timed on a subset and extrapolated; the output says so).

Presets: ``cpu`` (small batches, ViT-S/B at 224, ViT-S at 448 with batch 1, a few map images; minutes on
two cores) and ``gpu`` (the full matrix: batch 32, 224 and 448, ViT-S/16 and ViT-B/16). On CUDA the
figures are checked against the project's targets. Prints a table and writes all figures as JSON.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import eval_speed, infer_speed
from benchmarks.device import add_device_argument, device_from_args
from benchmarks.model_speed import compare_training
from mmcst.io import atomic_write_json

BACKBONES = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224"}
H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class Preset:
    """What one preset measures; ``train`` holds ``(model, backbone, size, batch)`` cases."""

    train: list[tuple[str, str, int, int]]
    train_steps: int
    train_warmup: int
    train_repeats: int
    map_images: int
    map_batch: int
    map_backbone: str = BACKBONES["vit_s16"]
    eval_images: int = 1464
    eval_thresholds: int = 96
    naive_images: int = 100
    naive_thresholds: int = 3
    map_size: tuple[int, int] = (infer_speed.HEIGHT, infer_speed.WIDTH)
    backbone_overrides: Optional[dict[str, Any]] = None  # toy architectures (tests)


def _matrix(cases: list[tuple[str, int, int]]) -> list[tuple[str, str, int, int]]:
    return [(model, BACKBONES[backbone], size, batch) for model in ("mmcst", "mctformer") for backbone, size, batch
            in cases]


PRESETS = {
    "cpu": Preset(train=_matrix([("vit_s16", 224, 2), ("vit_b16", 224, 2), ("vit_s16", 448, 1)]),
                  train_steps=3, train_warmup=1, train_repeats=1, map_images=4, map_batch=2,
                  naive_images=20, naive_thresholds=2),
    "gpu": Preset(train=_matrix([(b, s, 32) for b in ("vit_s16", "vit_b16") for s in (224, 448)]),
                  train_steps=10, train_warmup=3, train_repeats=1, map_images=64, map_batch=8),
}


@dataclass
class Target:
    """A figure the project promises on an H100 (checked on CUDA only)."""

    name: str
    section: str  # training | maps
    match: dict[str, Any]
    key: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None


TARGETS = [
    Target("MCTformer-V2 ViT-S/16 448 batch 32 >= 760 img/s", "training",
           {"model": "mctformer", "backbone": BACKBONES["vit_s16"], "size": 448, "batch": 32}, "images_per_s", 760),
    Target("MCTformer-V2 ViT-S/16 448 batch 32 <= 10 GB", "training",
           {"model": "mctformer", "backbone": BACKBONES["vit_s16"], "size": 448, "batch": 32}, "peak_mem_mib",
           maximum=10e9 / 2**20),
    Target("MMCST ViT-S/16 448 batch 32 >= 600 img/s", "training",
           {"model": "mmcst", "backbone": BACKBONES["vit_s16"], "size": 448, "batch": 32}, "images_per_s", 600),
    Target("MMCST ViT-B/16 448 batch 32 >= 40% of bf16 peak", "training",
           {"model": "mmcst", "backbone": BACKBONES["vit_b16"], "size": 448, "batch": 32}, "percent_of_peak", 40),
    Target("maps (3 scales + flip, 500x375, refinement) >= 32 img/s", "maps", {}, "ours_images_per_s", 32),
]


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value (our path) and whether it is met; None when not measured."""
    checked = []
    for target in TARGETS:
        value = None
        if target.section == "training":
            for pair in result["training"]:
                if all(pair[k] == v for k, v in target.match.items()):
                    value = pair["ours"].get(target.key)
        else:
            value = result["maps"].get(target.key)
        met = None if value is None else ((target.minimum is None or value >= target.minimum)
                                          and (target.maximum is None or value <= target.maximum))
        checked.append({"target": target.name, "value": value, "met": met})
    return checked


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def run_training(preset: Preset, device: torch.device, peak_tflops: Optional[float]) -> list[dict[str, Any]]:
    """One pair (ours, reference) per training case of the preset."""
    if preset.train:
        # The first training steps of a process pay one-time costs (kernel selection, allocator growth,
        # thread pools) larger than several steps' time on CPU: spend them on an untimed run.
        model, backbone, size, batch = preset.train[0]
        compare_training(model, backbone, size, batch, device, steps=1, warmup=1,
                         backbone_overrides=preset.backbone_overrides)
    pairs = []
    for model, backbone, size, batch in preset.train:
        ours, reference = compare_training(model, backbone, size, batch, device, variants=("fused", "explicit"),
                                           repeats=preset.train_repeats, steps=preset.train_steps,
                                           warmup=preset.train_warmup, peak_tflops=peak_tflops,
                                           backbone_overrides=preset.backbone_overrides)
        pairs.append({"model": model, "backbone": backbone, "size": size, "batch": batch, "ours": ours,
                      "reference": reference,
                      "speedup": _ratio(ours.get("images_per_s"), reference.get("images_per_s")),
                      "memory_ratio": _ratio(reference.get("peak_mem_mib"), ours.get("peak_mem_mib"))})
        print(f"  {model} {backbone} {size} batch {batch}: ours {_fmt(ours.get('images_per_s'), '.2f')} img/s, "
              f"reference {_fmt(reference.get('images_per_s'), '.2f')} img/s", file=sys.stderr, flush=True)
    return pairs


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_tables(result: dict[str, Any]) -> str:
    """The human-readable tables: every figure next to its paired reference and the ratio."""
    env = result["env"]
    lines = [f"# mmcst benchmarks, preset {result['preset']}, {env['device_name']}, torch {env['torch']}, "
             f"{env['threads']} threads, {env['cpu_count']} CPU cores, load average {env['loadavg_start']} "
             f"(start) / {env['loadavg_end']} (end)", ""]
    lines.append("Training step (img/s; ours: fused SDPA" + (", bf16, fused AdamW" if env["cuda"] else ", fp32")
                 + "; reference: explicit softmax(QK^T)V" + (", fp16 + GradScaler)" if env["cuda"] else ", fp32)"))
    lines.append(f"{'model':<10}{'backbone':<23}{'size':>5}{'batch':>6}{'ours':>9}{'ref':>9}{'ratio':>7}"
                 f"{'MiB ours':>10}{'MiB ref':>9}{'GFLOP/img':>11}{'TFLOP/s':>9}{'%peak':>7}")
    for pair in result["training"]:
        ours, ref = pair["ours"], pair["reference"]
        gflop = None if ours.get("train_flops_per_image") is None else ours["train_flops_per_image"] / 1e9
        lines.append(f"{pair['model']:<10}{pair['backbone']:<23}{pair['size']:>5}{pair['batch']:>6}"
                     f"{_fmt(ours.get('images_per_s'), '.2f'):>9}{_fmt(ref.get('images_per_s'), '.2f'):>9}"
                     f"{_fmt(pair['speedup'], '.2f'):>7}{_fmt(ours.get('peak_mem_mib'), '.0f'):>10}"
                     f"{_fmt(ref.get('peak_mem_mib'), '.0f'):>9}{_fmt(gflop, '.1f'):>11}"
                     f"{_fmt(ours.get('achieved_tflops'), '.3f'):>9}{_fmt(ours.get('percent_of_peak'), '.1f'):>7}"
                     + "".join(f"  ({name}: {row['error']})" for name, row in (("ours", ours), ("ref", ref))
                               if row.get("error")))
    lines.append("GFLOP/img: model FLOPs of one training step per image (3 x forward: patch embedding and every "
                 "block's matmuls incl. attention, N = prefix + patch tokens)"
                 + (f"; %peak of {result['peak_tflops']:g} TFLOP/s" if result["peak_tflops"] else ""))
    maps = result["maps"]
    lines += ["", f"Map generation ({maps['images']} images {maps['size'][1]}x{maps['size'][0]}, {maps['model']} "
              f"{maps['backbone']}, scales {maps['scales']} + flip, affinity refinement)",
              f"  ours      {maps['ours_images_per_s']:9.3f} img/s  (batch {maps['batch']}, {maps['ours_precision']})",
              f"  reference {maps['reference_images_per_s']:9.3f} img/s  (batch 1, one forward per scale and flip, "
              f"{maps['reference_precision']})",
              f"  peak MiB  ours {_fmt(maps['ours_peak_mem_mib'], '.0f')}, reference "
              f"{_fmt(maps['reference_peak_mem_mib'], '.0f')}",
              f"  ratio     {maps['speedup']:9.2f} x;  float32 maps equal: {maps['maps_equal']} (max abs diff "
              f"{maps['ours_vs_reference_fp32']['max_abs_diff']:.1e} on {maps['check_images']} image(s))"]
    if "bf16_vs_fp32" in maps:
        agree = maps["bf16_vs_fp32"]
        lines.append(f"  bf16 vs fp32 maps: correlation {agree['correlation']:.5f}, max abs diff "
                     f"{agree['max_abs_diff']:.3f}")
    ev = result["evaluation"]
    subset = ev["naive_timed_subset"]
    how = (f"EXTRAPOLATED from {subset['images']} images x {subset['thresholds']} thresholds timed in "
           f"{subset['seconds']:.1f} s" if ev["naive_extrapolated"] else "measured")
    lines += ["", f"Evaluation ({ev['images']} maps {ev['size'][1]}x{ev['size'][0]}, {ev['thresholds']} thresholds)",
              f"  ours      {ev['single_pass_s']:9.2f} s  (single pass, whole curve)",
              f"  reference {ev['naive_s']:9.1f} s  (per-threshold loop; {how})",
              f"  ratio     {ev['speedup']:9.1f} x;  confusion matrices identical on the subset: "
              f"{ev['subset_confusions_identical']}"]
    if result.get("targets"):
        lines += ["", "Targets (H100)"]
        for t in result["targets"]:
            state = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
            lines.append(f"  {t['target']:<58} {_fmt(t['value'], '.1f'):>9}  {state}")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model as Linux names it (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(preset_name: str, device: torch.device, peak_tflops: Optional[float] = None,
        preset: Optional[Preset] = None) -> dict[str, Any]:
    """Measure every figure of a preset; returns the JSON-ready result (``format_tables`` prints it)."""
    preset = preset or PRESETS[preset_name]
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = {"device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
           "cuda": cuda, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(),
           "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    started = time.perf_counter()
    print("training ...", file=sys.stderr, flush=True)
    training = run_training(preset, device, peak_tflops)
    print("maps ...", file=sys.stderr, flush=True)
    maps = infer_speed.measure_maps("mmcst", preset.map_backbone, preset.map_images, preset.map_batch, device,
                                    size=preset.map_size, backbone_overrides=preset.backbone_overrides)
    print("evaluation ...", file=sys.stderr, flush=True)
    evaluation = eval_speed.measure(preset.eval_images, preset.eval_thresholds, preset.naive_images,
                                    preset.naive_thresholds)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    env["wall_s"] = round(time.perf_counter() - started, 1)
    result: dict[str, Any] = {"preset": preset_name, "preset_settings": asdict(preset), "env": env,
                              "peak_tflops": peak_tflops, "training": training, "maps": maps,
                              "evaluation": evaluation}
    result["targets"] = check_targets(result) if cuda else []
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on cuda, else cpu")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures to this JSON file")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"dense peak of the device for %%peak (default on CUDA: {H100_BF16_DENSE_TFLOPS:g}, "
                             "H100 SXM bf16)")
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    peak = args.peak_tflops if args.peak_tflops is not None else (
        H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    result = run(preset, device, peak)
    result["command"] = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in
                                                                 (sys.argv[1:] if argv is None else argv))
    print(format_tables(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"figures written to {args.json}")
    return result


if __name__ == "__main__":
    main()
