"""Model summary for ``mmcst model summary CONFIG``: parameter counts, token layout, weight reports."""
from __future__ import annotations

from typing import Any

from torch import nn

from mmcst.models.vit import TokenViT


def _hidden_frozen(module: nn.Module) -> int:
    """Parameters of frozen priors kept outside the module tree (``clip_model`` held by the CLIP encoders,
    so that they stay out of optimizers and checkpoints) still count as frozen parameters of the model."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        hidden = sub.__dict__.get("clip_model")
        if isinstance(hidden, nn.Module) and id(hidden) not in seen:
            seen.add(id(hidden))
            total += sum(p.numel() for p in hidden.parameters())
    return total


def _count(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for name, b in module.named_buffers() if not name.endswith("num_batches_tracked"))
    return trainable, frozen + _hidden_frozen(module)


def _vit_input(model: nn.Module) -> dict[str, Any] | None:
    """Patch size and native grid of the model's ViT: the input size its learned pos-embed is laid out for."""
    vit = next((m for m in model.modules() if isinstance(m, TokenViT)), None)
    if vit is None:
        return None
    grid = [int(g) for g in vit.grid_size]
    return {"patch_size": vit.patch_size, "grid": grid, "image_size": [g * vit.patch_size for g in grid]}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Describe a model: class, classes, trainable/frozen counts (total and per top-level part), the ViT's
    native input size, token layout (``model.token_layout()`` where the method defines one) and the
    pretrained-weight reports.

    Frozen counts include buffers (e.g. cached CLIP text embeddings, BatchNorm statistics) and the frozen
    CLIP encoders, which are held outside ``parameters()``.
    """
    trainable, frozen = _count(model)
    parts = {}
    for name, child in model.named_children():
        t, f = _count(child)
        if t or f:
            parts[name] = {"trainable": t, "frozen": f}
    layout = model.token_layout() if callable(getattr(model, "token_layout", None)) else None
    reports = model.weight_report() if callable(getattr(model, "weight_report", None)) else []
    return {
        "model": type(model).__name__,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "class_names": [str(name) for name in getattr(model, "class_names", [])],
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "parts": parts,
        "vit_input": _vit_input(model),
        "token_layout": layout,
        "weight_reports": reports,
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`model_summary`'s dict."""
    lines = [
        f"model: {summary['model']} ({summary['num_classes']} classes)",
        f"parameters: {_millions(summary['trainable_parameters'])} trainable, "
        f"{_millions(summary['frozen_parameters'])} frozen (incl. buffers)",
    ]
    names = summary.get("class_names") or []
    if names:
        shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
        lines.append(f"classes: {shown}")
    vit_input = summary.get("vit_input")
    if vit_input:
        (h, w), (height, width) = vit_input["grid"], vit_input["image_size"]
        size = f"{height} px" if height == width else f"{height}x{width} px"
        lines.append(f"input: {size} = {h}x{w} patches of {vit_input['patch_size']} px (native pos-embed grid; "
                     f"other sizes interpolate it)")
    if summary.get("token_layout"):
        lines.append(f"token layout: {summary['token_layout']}")
    if summary.get("parts"):
        lines.append("parts:")
        width = max(len(name) for name in summary["parts"])
        for name, counts in summary["parts"].items():
            lines.append(f"  {name:<{width}}  {_millions(counts['trainable']):>8} trainable  {_millions(counts['frozen']):>8} frozen")
    reports = summary.get("weight_reports") or []
    if not reports:
        lines.append("pretrained weights: none (random initialisation)")
    for report in reports:
        loaded = report.get("loaded", [])
        missing = report.get("missing", [])
        unexpected = report.get("unexpected", [])
        n_loaded = loaded if isinstance(loaded, int) else len(loaded)
        lines.append(f"weights: {report.get('path')} sha256={str(report.get('sha256', ''))[:12]} loaded={n_loaded} "
                     f"missing={len(missing)} unexpected={len(unexpected)}")
        for key, values in (("missing", missing), ("unexpected", unexpected)):
            if values:
                shown = ", ".join(values[:8]) + (" ..." if len(values) > 8 else "")
                lines.append(f"  {key}: {shown}")
        for note in report.get("notes", []) or []:
            lines.append(f"  note: {note}")
    return "\n".join(lines)
