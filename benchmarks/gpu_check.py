"""Prepared check of the CUDA paths, with the full benchmark table; one command on a GPU machine.

    python benchmarks/gpu_check.py --out gpu.json [--wheels DIR] [--preset gpu|cpu] [--peak-tflops 989]

1. with ``--wheels DIR``, installs the wheels of DIR that the machine lacks (``benchmarks/wheels.py``: no
   index needed, nothing in the environment changed); puts the project's ``src`` on ``sys.path`` when
   ``mmcst`` is not installed; checks every runtime requirement and imports the project (stops with exit
   status 2 and the list of unmet requirements otherwise);
2. prints the device; stops with exit status 2 and a message when CUDA is not available;
3. checks that the fused SDPA attention runs with the flash kernel under bf16 autocast;
4. checks that a few bf16 training steps of MMCST and MCTformer-V2 (ViT-S/16, 224, batch 8) give finite
   losses, and records their peak memory;
5. compares bf16 with float32 maps (3 scales + flip, refinement, 500 x 375): correlation and max abs
   difference of the normalised maps;
6. runs ``python -m benchmarks.run --preset gpu`` (in process) and adds its figures;
7. profiles each target missed (``benchmarks.step_profile``): where the step's or the maps' time goes.

Everything goes to ``--out`` as JSON, rewritten after each step (a run cut short keeps what it measured).
The exit status is 1 when a check fails, 0 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(REPO))

MIN_MAP_CORRELATION = 0.99  # bf16 maps must track the float32 ones closely


def prepare_environment(wheel_folder: Optional[Path]) -> dict[str, Any]:
    """Install missing wheels (when a folder is given), make the project importable, check the requirements
    and import the project. Raises ``wheels.WheelError`` (or ImportError) with the reason."""
    from benchmarks import wheels

    result: dict[str, Any] = {}
    if wheel_folder is not None:
        result["wheels"] = wheels.install(wheel_folder)
    if importlib.util.find_spec("mmcst") is None:  # not installed: use the checkout itself
        wheels.activate(REPO / "src")
        result["project"] = f"{REPO / 'src'} on sys.path"
    problems = wheels.unmet(wheels.project_requirements())
    if problems:
        raise wheels.WheelError("unmet requirements:\n  " + "\n  ".join(problems) + "\nbring them as wheels: "
                                "python -m benchmarks.wheels fetch DIR --python-version X.Y on a machine that "
                                "reaches PyPI, then --wheels DIR here")
    for module in ("mmcst", "mmcst.models", "mmcst.engine", "mmcst.data.coco", "open_clip", "omegaconf"):
        importlib.import_module(module)
    result["versions"] = {name: str(wheels.installed_version(name)) for name in
                          ("torch", "torchvision", "timm", "open_clip_torch", "omegaconf", "pycocotools", "numpy")}
    return result


def check_sdpa_flash(device: Any) -> dict[str, Any]:
    """A bf16 forward of MMCST ViT-S/16 restricted to the flash SDPA kernel (it raises when not usable)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.infer_speed import build_map_model

    model = build_map_model("mmcst", "vit_small_patch16_224", device)
    images = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = model.classify(images)
    return {"flash_attention_bf16": True, "finite": bool(torch.isfinite(logits).all())}


def check_bf16_training(device: Any, steps: int = 5) -> dict[str, Any]:
    """A few bf16 training steps per model; finite losses, throughput and peak memory."""
    from benchmarks.model_speed import time_training

    rows = {}
    for model in ("mmcst", "mctformer"):
        row = time_training(model, "vit_small_patch16_224", 224, 8, "fused", device, steps=steps, warmup=1)
        rows[model] = {k: row.get(k) for k in ("precision", "losses", "losses_finite", "images_per_s",
                                               "peak_mem_mib", "error")}
    return {"rows": rows, "ok": all(r.get("losses_finite") is True for r in rows.values())}


def check_bf16_maps(device: Any, images: int = 4) -> dict[str, Any]:
    """bf16 vs float32 maps of the same random-weight model and images (both normalised to [0, 1])."""
    import torch

    from benchmarks import infer_speed
    from mmcst.engine.infer import MapGenerator

    model = infer_speed.build_map_model("mmcst", "vit_small_patch16_224", device)
    data = infer_speed.make_images(images)
    maps = {}
    for name in ("bf16", "fp32"):
        torch.cuda.reset_peak_memory_stats(device)
        generator = MapGenerator(model, infer_speed.SCALES, True, True, device, precision=name)
        maps[name] = infer_speed.ours(generator, data, images, device)
        maps[f"{name}_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    agreement = infer_speed.map_agreement(maps["bf16"], maps["fp32"])
    return {**agreement, "images": images, "peak_mem_mib": {k: maps[f"{k}_peak_mem_mib"] for k in ("bf16", "fp32")},
            "min_correlation": MIN_MAP_CORRELATION, "ok": agreement["correlation"] >= MIN_MAP_CORRELATION}


def profile_missed_targets(benchmark: dict[str, Any], device: Any) -> dict[str, Any]:
    """Where the time goes (``benchmarks.step_profile``) for each target the benchmark missed or could not
    measure: the training case of the target, or map generation."""
    from benchmarks import run as bench
    from benchmarks import step_profile

    targets = {t.name: t for t in bench.TARGETS}
    profiles, seen = {}, set()
    for checked in benchmark["targets"]:
        if checked["met"] is True:
            continue
        target = targets[checked["target"]]
        key = tuple(sorted(target.match.items())) if target.section == "training" else ("maps",)
        if key in seen:  # two targets of one case (speed and memory): one profile
            continue
        seen.add(key)
        try:
            if target.section == "training":
                m = target.match
                result = step_profile.profile_training(m["model"], m["backbone"], m["size"], m["batch"], device)
            else:
                result = step_profile.profile_maps(device, images=16, batch=8)
            print(step_profile.format_profile(result), flush=True)
        except Exception as exc:  # one profile failing must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}"}
        profiles[checked["target"]] = result
    return {"profiles": profiles, "profiled": len(profiles)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for all checks and figures")
    parser.add_argument("--preset", default="gpu", choices=["gpu", "cpu"], help="benchmark preset (cpu: a quick one)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for %%peak (default: H100 bf16)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder of wheels for what the machine lacks (python -m benchmarks.wheels fetch)")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}}
    try:
        report["environment"] = prepare_environment(args.wheels)
    except Exception as exc:  # missing packages: say which, before anything else runs
        report["error"] = f"{type(exc).__name__}: {exc}"
        args.out.parent.mkdir(parents=True, exist_ok=True)  # mmcst.io may not import: atomic write by hand
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, args.out)
        print(f"gpu_check: {report['error']}", file=sys.stderr)
        return 2
    print("environment:", json.dumps(report["environment"]), flush=True)

    import torch

    from benchmarks import run as bench
    from mmcst.io import atomic_write_json

    if not torch.cuda.is_available():
        report["error"] = "CUDA is not available: this check needs a GPU"
        atomic_write_json(args.out, report)
        print(f"gpu_check: {report['error']} (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); wrote {args.out}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    report["device"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                        "capability": list(torch.cuda.get_device_capability(device)), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}
    print(f"device: {properties.name}, {report['device']['memory_gib']} GiB, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    failed = False

    def step(name: str, function: Callable[[], dict[str, Any]]) -> None:
        nonlocal failed
        started = time.perf_counter()
        try:
            result = function()
        except Exception as exc:  # recorded and reported: the later checks still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - started, 1)
        failed = failed or result.get("ok") is False
        report["checks"][name] = result
        atomic_write_json(args.out, report)
        print(f"{name}: {'FAILED' if result.get('ok') is False else 'ok'} ({result['seconds']} s) "
              + (result.get("error") or ""), flush=True)

    step("sdpa_flash", lambda: check_sdpa_flash(device))
    step("bf16_training", lambda: check_bf16_training(device))
    step("bf16_vs_fp32_maps", lambda: check_bf16_maps(device))
    report["checks"]["peak_mem_mib_so_far"] = torch.cuda.max_memory_allocated(device) / 2**20

    def benchmark() -> dict[str, Any]:
        peak = args.peak_tflops if args.peak_tflops is not None else bench.H100_BF16_DENSE_TFLOPS
        result = bench.run(args.preset, device, peak)
        result["command"] = f"python benchmarks/gpu_check.py --out {args.out} --preset {args.preset}"
        report["benchmark"] = result
        print(bench.format_tables(result), flush=True)
        ok = result["maps"]["maps_equal"] and result["evaluation"]["subset_confusions_identical"] and all(
            pair["ours"].get("losses_finite", False) for pair in result["training"] if not pair["ours"].get("error"))
        return {"ok": bool(ok), "targets_met": [t["target"] for t in result["targets"] if t["met"]],
                "targets_missed": [t["target"] for t in result["targets"] if t["met"] is False]}

    step("benchmark", benchmark)
    if report.get("benchmark"):
        step("profiles_of_missed_targets", lambda: profile_missed_targets(report["benchmark"], device))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}; checks {'FAILED' if failed else 'passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
