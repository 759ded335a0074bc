"""Demo report: markdown, self-contained HTML (images inlined), curve plot and overlays."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mmcst.io import atomic_write_bytes, atomic_write_text, load_map, voc_palette

OVERLAY_IMAGES = 6  # fixed set: the first validation ids


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(curves: dict[str, list[dict[str, float]]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curve in curves.items():
        ax.plot([p["threshold"] for p in curve], [p["miou"] for p in curve], label=name)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _colorize(label: np.ndarray) -> np.ndarray:
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    return palette[label]


def pseudo_mask(keys: np.ndarray, cam: np.ndarray, threshold: float) -> np.ndarray:
    """Argmax over [background plane = threshold, class maps]; ties go to background."""
    if len(keys) == 0:
        return np.zeros(cam.shape[1:], np.uint8)
    stack = np.concatenate([np.full((1,) + cam.shape[1:], threshold, np.float32), cam], axis=0)
    arg = stack.argmax(0)
    labels = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return labels[arg]


def plot_overlays(dataset: Any, indices: Sequence[int], methods: dict[str, dict[str, Any]]) -> bytes:
    """Rows: images; columns: image, ground truth, then for each method its map (max over classes) and pseudo-mask."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 + 2 * len(methods)
    fig, axes = plt.subplots(len(indices), cols, figsize=(1.6 * cols, 1.6 * len(indices)), squeeze=False)
    for row, index in enumerate(indices):
        sample = dataset[index]
        image = sample["image"].permute(1, 2, 0).numpy()
        mask = dataset.get_mask(index)
        panels: list[tuple[str, np.ndarray, bool]] = [("image", image, False), ("ground truth", _colorize(mask), False)]
        for name, info in methods.items():
            keys, cam = load_map(Path(info["maps_dir"]) / f"{dataset.ids[index]}.npy")
            heat = cam.max(0) if len(keys) else np.zeros(mask.shape, np.float32)
            panels.append((f"{name} map", heat, True))
            panels.append((f"{name} mask", _colorize(pseudo_mask(keys, cam, info["threshold"])), False))
        for col, (title, panel, is_heat) in enumerate(panels):
            ax = axes[row][col]
            if is_heat:
                ax.imshow(image)
                ax.imshow(panel, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            else:
                ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.2f}"
        return str(v)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    hd = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    hd += "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>"
    return "\n".join(md), hd


def chance_map(labels: Any) -> float:
    """Classification mAP a uniformly random ranking is expected to reach on ``labels`` (N x C multi-hot).

    For a class with P positives among N labelled images, a positive at rank r has on average
    ``1 + (P - 1)(r - 1)/(N - 1)`` positives at or above it, and r is uniform on 1..N, so
    ``E[AP] = a + (1 - a) H_N / N`` with ``a = (P - 1)/(N - 1)`` and H_N the N-th harmonic number: slightly
    above the class frequency. Classes without positives and images without labels are left out, as in the mAP.
    """
    labels = np.asarray(labels, dtype=np.float64) > 0
    labels = labels[labels.any(axis=1)]
    num = len(labels)
    if not num:
        return float("nan")
    positives = labels.sum(axis=0)
    positives = positives[positives > 0]
    if num == 1:
        return 1.0
    a = (positives - 1) / (num - 1)
    harmonic = float(np.sum(1.0 / np.arange(1, num + 1)))
    return float(np.mean(a + (1 - a) * harmonic / num))


def demo_verdict(results: dict[str, Any], chance: Optional[float] = None) -> str:
    """One honest sentence: does MMCST beat every other predictor, and if not, what the budget allowed.

    ``chance``: the validation mAP of a random ranking (:func:`chance_map`), to put the methods' mAP in context.
    """
    methods = results["methods"]
    if "mmcst" not in methods:
        return "MMCST was not part of this run."
    best = {name: info["result"]["best"]["miou"] for name, info in methods.items()}
    centre = results["references"].get("centre")
    if centre is not None:
        best["centre prior"] = centre["result"]["best"]["miou"]
    ours = best.pop("mmcst")
    beaten = [name for name, value in best.items() if value >= ours]
    if not beaten:
        return (f"MMCST has the best validation mIoU ({ours:.1f}) of every method and reference in this run, "
                "at equal map resolution and equal training time.")
    steps = {name: (info.get("train_summary") or {}).get("steps") for name, info in methods.items()}
    maps = {name: (info.get("train_summary") or {}).get("val_map") for name, info in methods.items()}
    detail = ", ".join(
        f"{name} {steps[name]} steps" + ("" if maps[name] is None else f" (val mAP {100 * maps[name]:.1f})")
        for name in methods)
    context = "" if chance is None or chance != chance else \
        f" A random ranking would reach a val mAP of about {100 * chance:.1f}."
    return (f"MMCST does not win this run: {', '.join(beaten)} reached a higher mIoU than its {ours:.1f}. "
            f"With the same wall-clock budget the methods completed {detail}.{context} From random weights a ViT learns "
            "image classification, and with it localization, far more slowly per step than a CNN, and a CPU "
            "budget of minutes ends while its classification is still weak; the paper's setting starts the ViT "
            "from DINO and CLIP weights instead.")


def write_demo_report(out: Path, dataset: Any, results: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``report.md``, ``report.html``, ``curves.png`` and ``overlays.png`` into ``out``; return the .md path."""
    out = Path(out)
    rows = []
    curves: dict[str, list[dict[str, float]]] = {}
    overlay_methods: dict[str, dict[str, Any]] = {}
    for kind, info in results["references"].items():
        r = info["result"]
        label = {"gt": "reference: ground truth as maps", "centre": "reference: centre Gaussian prior"}.get(kind, kind)
        rows.append([label, "-", r["best"]["threshold"], r["best"]["miou"], r["mctformer_protocol"]["threshold"],
                     r["mctformer_protocol"]["miou"], "-", "-", "-", "-"])
        if kind == "centre":
            curves[label] = r["miou_curve"]
    for method, info in results["methods"].items():
        r = info["result"]
        c = info["config"]
        res = f"{c['input']} px in, " + (f"patch {c['patch_size']}" if c.get("patch_size") else c["backbone"])
        ts = info.get("train_summary") or {}
        val_map = ts.get("val_map")
        rows.append([method, res, r["best"]["threshold"], r["best"]["miou"], r["mctformer_protocol"]["threshold"],
                     r["mctformer_protocol"]["miou"], f"{info['train_seconds']:.0f}", ts.get("steps", "-"),
                     "-" if val_map is None else f"{100 * val_map:.1f}", f"{info['infer_seconds']:.0f}"])
        curves[method] = r["miou_curve"]
        overlay_methods[method] = {"maps_dir": info["maps_dir"], "threshold": r["best"]["threshold"]}
    header = ["predictor", "model input", "best t", "best mIoU", "MCTformer-protocol t", "MCTformer-protocol mIoU",
              "train s", "steps", "val mAP", "maps s"]
    main_md, main_html = _table(header, rows)

    names = list(meta["class_names"])
    pc_header = ["class"] + [m for m in results["methods"]] + ["centre prior"]
    pc_rows = []
    for name in ["background"] + names:
        row: list[Any] = [name]
        for info in list(results["methods"].values()) + [results["references"].get("centre", {})]:
            per_class = info.get("result", {}).get("best", {}).get("per_class_iou", {}) if info else {}
            value = per_class.get(name)
            row.append(float("nan") if value is None else float(value))
        pc_rows.append(row)
    pc_md, pc_html = _table(pc_header, pc_rows)

    curve_png = plot_curves(curves)
    atomic_write_bytes(out / "curves.png", curve_png)
    overlay_png = b""
    if overlay_methods:
        indices = list(range(min(OVERLAY_IMAGES, len(dataset))))
        overlay_png = plot_overlays(dataset, indices, overlay_methods)
        atomic_write_bytes(out / "overlays.png", overlay_png)

    protocol = next(iter(results["references"].values()))["result"]["protocol"] if results["references"] else {}
    intro = [
        "All models in this demo start from **random weights**: the demo runs offline and needs no download. "
        "The paper's numbers need DINO ViT-B/16 and CLIP weights, real datasets and a GPU: use "
        "`configs/voc/*.yaml` with `model.backbone.weights=...` and `model.prior.clip_weights=...` (see the README).",
        f"Dataset: procedurally generated, PASCAL VOC layout, {meta['budget']['n_train']} train / "
        f"{meta['budget']['n_val']} val images of {meta['budget']['size']} px, {len(names)} classes "
        f"(`{meta['dataset_root']}`).",
        f"Every method trains for the same wall-clock budget ({meta['budget']['train_seconds']:.0f} s), seed {meta['seed']}.",
        "Protocol: " + ", ".join(f"{k} = {v}" for k, v in protocol.items() if k in
                                 ("split", "num_images", "bg_rule", "grid", "ties")),
        f"Total demo time: {meta['total_seconds']:.0f} s (dataset {meta['data_seconds']:.0f} s).",
    ]
    verdict = demo_verdict(results, meta.get("chance_val_map"))
    notes_md, notes_html = [], []
    for method, info in results["methods"].items():
        for note in info["notes"]:
            notes_md.append(f"- **{method}**: {note}")
            notes_html.append(f"<li><b>{html.escape(method)}</b>: {html.escape(note)}</li>")

    md = ["# mmcst demo report", ""] + [f"- {line}" for line in intro] + [
        "", "## Validation mIoU (%)", "", main_md, "", verdict, "",
        "Best t: the best point of the full threshold curve. MCTformer protocol: grid 0.00..0.59, stop at the "
        "first threshold that does not improve.", "",
        "## Threshold curves", "", "![curves](curves.png)", "",
        "## Maps and pseudo-masks", "", "![overlays](overlays.png)" if overlay_png else "(no trained method)", "",
        "## Per-class IoU at each method's best threshold", "", pc_md, "",
        "## Where the demo configs differ from the paper's, and why", "", *(notes_md or ["- (none)"]), "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))

    def img(data: bytes, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}" style="max-width:100%">'
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mmcst demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}} th{{background:#f3f3f3}}</style></head><body>
<h1>mmcst demo report</h1><ul>{''.join(f'<li>{html.escape(line)}</li>' for line in intro)}</ul>
<h2>Validation mIoU (%)</h2>{main_html}<p><b>{html.escape(verdict)}</b></p>
<p>Best t: the best point of the full threshold curve. MCTformer protocol: grid 0.00..0.59, stop at the first
threshold that does not improve.</p>
<h2>Threshold curves</h2>{img(curve_png, 'curves')}
<h2>Maps and pseudo-masks</h2>{img(overlay_png, 'overlays') if overlay_png else '<p>(no trained method)</p>'}
<h2>Per-class IoU at each method's best threshold</h2>{pc_html}
<h2>Where the demo configs differ from the paper's, and why</h2><ul>{''.join(notes_html) or '<li>(none)</li>'}</ul>
</body></html>"""
    atomic_write_text(out / "report.html", page)
    return out / "report.md"
