"""Training-step throughput and peak memory of a method, fused vs explicit attention, in one run.

    python -m benchmarks.model_speed [--model mmcst] [--backbone vit_base_patch16_224] [--size 224 448]
                                     [--batch 8] [--steps 5] [--device cpu|cuda] [--json]

For every input size, times ``--steps`` full training steps (forward, the method's loss terms, backward,
AdamW step) after ``--warmup`` untimed ones (median step time), on random images and labels, for two variants of the same
model (``--repeats`` runs each, in alternating order, median shown):

* ``fused``: mmcst's default; the ViT blocks run fused scaled-dot-product attention (no attention matrix);
* ``explicit``: every block computes ``softmax(Q K^T) V`` explicitly (timm's non-fused path), which is
  what MCTformer does in every training step, under fp16 autocast with a GradScaler and a foreach AdamW
  (MCTformer's mixed precision) on CUDA.

On CUDA ``fused`` runs under bf16 autocast with fused AdamW. Peak memory of the timed steps: on CUDA the
peak allocated memory; on CPU the peak resident memory above the process's before the model was built
(``benchmarks.memory``; a tiny throwaway step first takes the libraries' one-time allocations out of it).
Models start from random weights (throughput does not depend on them); ``--clip-weights`` adds the frozen CLIP image
encoder of the context loss, otherwise MMCST runs with ``prior.kind=none``. CAM has no attention, so it
is timed once (``fused`` row only).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.device import add_device_argument, device_from_args, sync
from benchmarks.memory import PeakMemory
from mmcst.config import ModelConfig
from mmcst.models.registry import build_model

VARIANTS = ("fused", "explicit")
TINY_VIT = {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
_process_warmed = False


def model_config(model: str, backbone: str, size: int, backbone_overrides: Optional[dict[str, Any]] = None,
                 clip_model: str = "ViT-B-16-quickgelu", clip_weights: Optional[str] = None) -> ModelConfig:
    """The benchmarked model's config: random weights, ``prior.kind=none`` unless CLIP weights are given,
    MCTformer as V2. ``backbone_overrides`` (patch_size, embed_dim, depth, num_heads) make toy models."""
    cfg = ModelConfig(name=model)
    cfg.backbone.name = backbone
    cfg.backbone.img_size = size if model != "cam" else None
    cfg.backbone.drop_path_rate = 0.1
    for key, value in (backbone_overrides or {}).items():
        setattr(cfg.backbone, key, value)
    if clip_weights:
        cfg.prior.kind, cfg.prior.clip_model, cfg.prior.clip_weights = "clip", clip_model, clip_weights
    else:
        cfg.prior.kind = "none"
    if model == "mctformer":
        cfg.mctformer.version = "v2"
    return cfg


def set_explicit_attention(model: Any, explicit: bool) -> int:
    """Switch every timm attention block of the model between fused SDPA and explicit softmax(QK^T)V;
    returns the number of blocks switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = not explicit
            count += 1
    return count


def forward_flops(model: Any, height: int, width: int) -> Optional[float]:
    """Model FLOPs (2 x multiply-adds) of one forward pass for one ``height x width`` image.

    Counts the matmuls of the ViT: the patch embedding and, in every block, qkv, Q K^T, attention x V,
    the output projection and the MLP, for the actual token count N = prefix tokens + patches. Norms,
    activations, softmax and the methods' small heads (< 1 %) are not counted. None for non-ViT models.
    """
    vit = getattr(model, "vit", None)
    if vit is None or not hasattr(vit, "blocks"):
        return None
    patch, dim = vit.patch_size, vit.embed_dim
    patches = (height // patch) * (width // patch)
    tokens = vit.num_prefix + patches
    macs = patches * 3 * patch * patch * dim
    for block in vit.blocks:
        hidden = block.mlp.fc1.out_features
        macs += tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * hidden
    return 2.0 * macs


def build_training_step(model: str, backbone: str, size: int, batch: int, variant: str, device: torch.device, *,
                        classes: int = 20, backbone_overrides: Optional[dict[str, Any]] = None,
                        clip_model: str = "ViT-B-16-quickgelu", clip_weights: Optional[str] = None,
                        amp: Optional[bool] = None) -> tuple[Any, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    """The model, its optimizer and one training step (returns the detached loss) of a variant (see
    :func:`time_training`), on random images and labels that stay the same for every step. ``amp``
    (default: on CUDA only) runs the step under autocast: bf16 for ``fused``; fp16 with a GradScaler for
    ``explicit`` on CUDA, bf16 on CPU (CPU autocast has no fp16 loss scaling)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    cfg = model_config(model, backbone, size, backbone_overrides, clip_model, clip_weights)
    net = build_model(cfg, [f"class{i}" for i in range(classes)]).to(device)
    explicit = variant == "explicit"
    if set_explicit_attention(net, explicit) == 0 and explicit:
        raise ValueError(f"variant explicit: {model} has no timm attention block to switch")
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=cuda and not explicit)
    amp = cuda if amp is None else amp
    amp_dtype = torch.float16 if explicit and cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp and explicit)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = (torch.rand(batch, classes, device=device) < 0.15).float()
    labels[:, 0] = 1.0  # at least one class per image (label-masked pooling)
    batch_dict = {"labels": labels, "id": [str(i) for i in range(batch)]}

    def step() -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            outputs = net(images, labels)
            loss = sum(net.loss(outputs, batch_dict).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return net, optimizer, step


def precision(variant: str, device: torch.device, amp: Optional[bool] = None) -> str:
    """What :func:`build_training_step` runs in, as the tables print it."""
    cuda = device.type == "cuda"
    if not (cuda if amp is None else amp):
        return "fp32"
    return "fp16+GradScaler" if variant == "explicit" and cuda else "bf16"


def time_training(model: str, backbone: str, size: int, batch: int, variant: str, device: torch.device, *,
                  steps: int = 5, warmup: int = 1, classes: int = 20,
                  backbone_overrides: Optional[dict[str, Any]] = None, clip_model: str = "ViT-B-16-quickgelu",
                  clip_weights: Optional[str] = None, peak_tflops: Optional[float] = None,
                  amp: Optional[bool] = None) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of one variant; one result row.

    ``fused`` is mmcst's training step: fused SDPA attention, bf16 autocast on CUDA (no loss scaler),
    fused AdamW on CUDA. ``explicit`` is the peers' (MCTformer's) step: explicit softmax(QK^T)V in every
    block, fp16 autocast with a GradScaler on CUDA, foreach AdamW. On CPU both run in float32 unless ``amp``.
    """
    global _process_warmed
    if device.type == "cpu" and not _process_warmed:
        # The first training step of a process allocates the libraries' lasting state (about 200 MiB on CPU),
        # which would count in the first case's peak memory alone: a tiny throwaway step takes it first.
        _process_warmed = True
        time_training("mmcst", "vit_small_patch16_224", 32, 1, "fused", device, steps=1, warmup=0,
                      backbone_overrides=TINY_VIT)
    memory = PeakMemory(device).begin()
    net, optimizer, step = build_training_step(model, backbone, size, batch, variant, device, classes=classes,
                                               backbone_overrides=backbone_overrides, clip_model=clip_model,
                                               clip_weights=clip_weights, amp=amp)
    cuda = device.type == "cuda"
    explicit = variant == "explicit"

    def mark() -> Any:
        """A point in time: a recorded CUDA event (read after the final sync) or the CPU clock."""
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    flops = forward_flops(net, size, size)
    row: dict[str, Any] = {"model": model, "backbone": backbone, "size": size, "batch": batch, "variant": variant,
                           "classes": classes, "attention": "explicit" if explicit else "fused",
                           "precision": precision(variant, device, amp),
                           "train_flops_per_image": None if flops is None else 3 * flops}
    try:
        for _ in range(warmup):
            step()
        memory.restart()
        # Each step is timed on its own (CUDA events, no sync between steps) and the median counts: a burst
        # of load from other processes slows some steps, not the figure. Losses stay on the device until
        # the end (a .item() per step would add a sync).
        marks, timed = [mark()], []
        for _ in range(steps):
            timed.append(step())
            marks.append(mark())
        sync(device)
        if cuda:
            step_times = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        else:
            step_times = [b - a for a, b in zip(marks, marks[1:])]
        step_s = statistics.median(step_times)
        losses = [float(v) for v in timed]
        row.update(step_s=step_s, images_per_s=batch / step_s, step_s_each=step_times, losses=losses,
                   losses_finite=all(math.isfinite(v) for v in losses))
        row["peak_mem_mib"] = memory.read()
        if flops is not None:
            row["achieved_tflops"] = 3 * flops * row["images_per_s"] / 1e12
            if peak_tflops:
                row["peak_tflops"] = peak_tflops
                row["percent_of_peak"] = 100 * row["achieved_tflops"] / peak_tflops
    except torch.cuda.OutOfMemoryError:
        row.update(step_s=None, images_per_s=None, peak_mem_mib=None, error="out of memory")
    finally:
        del net, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return row


def compare_training(model: str, backbone: str, size: int, batch: int, device: torch.device, *,
                     variants: Sequence[str] = VARIANTS, repeats: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
    """One row per variant (median over ``repeats`` runs), in the order of ``variants``.

    The variants alternate over repeats so that drifting machine load affects each alike.
    ``kwargs`` go to :func:`time_training`.
    """
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in (variants if repeat % 2 == 0 else variants[::-1]):
            runs[variant].append(time_training(model, backbone, size, batch, variant, device, **kwargs))
    return [_median_row(runs[v]) for v in variants]


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
    add_device_argument(parser)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (default: on CUDA only); --amp on CPU runs bf16 autocast, to see its memory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    args = parser.parse_args(argv)
    device = device_from_args(parser, args)
    variants = ["fused"] if args.model == "cam" else args.variants
    rows = []
    for size in args.size:
        rows += compare_training(args.model, args.backbone, size, args.batch, device, variants=variants,
                                 repeats=args.repeats, steps=args.steps, warmup=args.warmup, classes=args.classes,
                                 clip_model=args.clip_model, clip_weights=args.clip_weights, amp=args.amp)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "autocast": " / ".join(f"{v} {precision(v, device, args.amp)}" for v in variants)}
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
