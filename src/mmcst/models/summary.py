"""Model summary for ``mmcst model summary CONFIG``: parameter counts, token layout, weight reports."""
from __future__ import annotations

from typing import Any

from torch import nn


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


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Describe a model: class, classes, trainable/frozen counts (total and per top-level part), token
    layout (``model.token_layout()`` where the method defines one) and the pretrained-weight reports.

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
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "parts": parts,
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
