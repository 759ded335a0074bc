"""Training-step throughput and peak memory of a method, fused vs explicit attention, in one run.

    python -m benchmarks.model_speed [--model mmcst] [--backbone vit_base_patch16_224] [--size 224 448]
                                     [--batch 8] [--steps 5] [--device cpu|cuda] [--json]

For every input size, times ``--steps`` full training steps (forward, the method's loss terms, backward,
AdamW step) after ``--warmup`` untimed ones, on random images and labels, for two variants of the same
model (``--repeats`` runs each, in alternating order, median shown):

* ``fused``: mmcst's default; the ViT blocks run fused scaled-dot-product attention (no attention matrix);
* ``explicit``: every block computes ``softmax(Q K^T) V`` explicitly (timm's non-fused path), which is
  what MCTformer does in every training step.

On CUDA the step runs under bf16 autocast and the peak allocated memory is reported. Models start from
random weights (throughput does not depend on them); ``--clip-weights`` adds the frozen CLIP image
encoder of the context loss, otherwise MMCST runs with ``prior.kind=none``. CAM has no attention, so it
is timed once (``fused`` row only).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any, Optional

import torch

from mmcst.config import ModelConfig
from mmcst.models.registry import build_model

VARIANTS = ("fused", "explicit")


def make_model(args: argparse.Namespace, size: int) -> Any:
    cfg = ModelConfig(name=args.model)
    cfg.backbone.name = args.backbone
    cfg.backbone.img_size = size if args.model != "cam" else None
    cfg.backbone.drop_path_rate = 0.1
    if args.clip_weights:
        cfg.prior.kind, cfg.prior.clip_model, cfg.prior.clip_weights = "clip", args.clip_model, args.clip_weights
    else:
        cfg.prior.kind = "none"
    if args.model == "mctformer":
        cfg.mctformer.version = "v2"
    return build_model(cfg, [f"class{i}" for i in range(args.classes)])


def set_explicit_attention(model: Any, explicit: bool) -> int:
    """Switch every timm attention block of the model between fused SDPA and explicit softmax(QK^T)V;
    returns the number of blocks switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = not explicit
            count += 1
    return count


def run_variant(args: argparse.Namespace, size: int, variant: str, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make_model(args, size).to(device)
    if set_explicit_attention(model, variant == "explicit") == 0 and variant == "explicit":
        raise ValueError(f"--variants explicit: {args.model} has no timm attention block to switch")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = (torch.rand(args.batch, args.classes, device=device) < 0.15).float()
    labels[:, 0] = 1.0  # at least one class per image (label-masked pooling)
    batch = {"labels": labels, "id": [str(i) for i in range(args.batch)]}
    use_amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(images, labels)
            loss = sum(model.loss(outputs, batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    row: dict[str, Any] = {"model": args.model, "backbone": args.backbone, "size": size, "batch": args.batch,
                           "variant": variant, "classes": args.classes}
    try:
        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        elapsed = time.perf_counter() - start
        row.update(step_s=elapsed / args.steps, images_per_s=args.batch * args.steps / elapsed)
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError:
        row.update(step_s=None, images_per_s=None, peak_mem_mib=None, error="out of memory")
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    timed = sorted((r for r in runs if r.get("step_s") is not None), key=lambda r: r["step_s"])
    row = dict(timed[len(timed) // 2] if timed else runs[0])
    row["repeats"] = len(runs)
    row["step_s_all"] = [r.get("step_s") for r in runs]
    return row


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<10}{'size':>6}{'batch':>7}  {'variant':<9}{'img/s':>9}{'step ms':>10}{'peak MiB':>10}{'vs fused':>10}"]
    fused = {(r["size"], r["batch"]): r.get("images_per_s") for r in rows if r["variant"] == "fused"}
    for r in rows:
        base = fused.get((r["size"], r["batch"]))
        ratio = r["images_per_s"] / base if r.get("images_per_s") and base else None
        step_ms = None if r.get("step_s") is None else 1000 * r["step_s"]
        lines.append(f"{r['model']:<10}{r['size']:>6}{r['batch']:>7}  {r['variant']:<9}{_fmt(r.get('images_per_s'), '.2f'):>9}"
                     f"{_fmt(step_ms, '.0f'):>10}{_fmt(r.get('peak_mem_mib'), '.0f'):>10}{_fmt(ratio, '.2f'):>10}"
                     + (f"  ({r['error']})" if r.get("error") else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mmcst", choices=["mmcst", "mctformer", "cam"])
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="timm name (resnet50 for cam)")
    parser.add_argument("--size", type=int, nargs="+", default=[224, 448], help="square input sizes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating order; the median is shown")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--clip-model", default="ViT-B-16-quickgelu")
    parser.add_argument("--clip-weights", default=None, help="local CLIP file: adds the frozen CLIP image encoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = ["fused"] if args.model == "cam" else args.variants
    rows = []
    for size in args.size:
        # Variants alternate over repeats so that drifting machine load affects each alike; the median counts.
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for variant in (variants if repeat % 2 == 0 else variants[::-1]):
                runs[variant].append(run_variant(args, size, variant, device))
        rows += [_median_row(runs[v]) for v in variants]
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "autocast": "bf16" if device.type == "cuda" else "off"}
    print(f"# {args.model} training step, {env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"autocast {env['autocast']}, median of {args.repeats} run(s) of {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    print(format_table(rows))
    result = {"env": env, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
