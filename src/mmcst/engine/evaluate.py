"""Evaluate a directory of localization maps (or PNG label maps) against a dataset's ground truth.

Multi-label datasets (VOC, COCO, folder, synthetic) get the full mIoU curve over background thresholds,
its best point, and MCTformer's early-stopped point (METHOD.md 6.1-6.2); OpenImages gets PxAP and pIoU
(6.3-6.4). Every result carries the protocol it was measured under. Memory is O(1) in the number of images:
maps stream through fixed-size histograms, with file reading overlapped with counting.
"""
from __future__ import annotations

import io as _io
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from mmcst.config import EvalConfig
from mmcst.data.base import IGNORE_INDEX, DatasetError
from mmcst.io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_label_png, load_map
from mmcst.metrics.segmentation import ConfusionMatrix, ThresholdCurve, threshold_grid
from mmcst.metrics.wsol import PxAPAccumulator, prepare_openimages_map, resize_mask_nearest

__all__ = ["evaluate_maps", "format_protocol", "format_result", "write_result"]

WSOL_SIZE = 224  # wsolevaluation scores OpenImages at 224 x 224
_SHOW_MISSING = 5  # ids named in a missing-files error
_PREFETCH = 8  # images read ahead of the counting loop


def evaluate_maps(
    maps_dir: str | Path,
    dataset: Any,
    eval_cfg: Optional[EvalConfig] = None,
    out: Optional[str | Path] = None,
    map_format: str = "auto",
    progress: bool = True,
    allow_missing: bool = False,
    task: Optional[str] = None,
) -> dict[str, Any]:
    """Evaluate ``<maps_dir>/<id>.npy`` map files (or ``<id>.png`` label maps) on ``dataset``.

    Args:
        maps_dir: folder of map files named by image id.
        dataset: a dataset with ``ids``, ``class_names``, ``get_mask(i)``, ``get_labels(i)``, ``has_masks()``
            and ``describe()``; a ``task == "wsol"`` attribute selects the OpenImages metrics.
        eval_cfg: threshold grid and background rule (defaults: ``EvalConfig()``).
        out: ``X.json`` path; also writes ``X.md``, ``X_curve.png`` and the page ``X.html`` beside it.
        map_format: ``auto`` (``.npy`` if any exists, else ``.png``), ``npy`` or ``png``.
        progress: show a progress bar.
        allow_missing: skip images without a map file (counted in the protocol) instead of failing.
        task: ``segmentation`` or ``wsol``; default from ``dataset.task``, else ``wsol`` for a dataset named
            ``openimages``, else segmentation.

    Returns:
        The result dict (mIoU in percent), also written to ``out`` when given.
    """
    cfg = eval_cfg if eval_cfg is not None else EvalConfig()
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise FileNotFoundError(f"{maps_dir}: map directory not found")
    task = task or getattr(dataset, "task", None) or ("wsol" if getattr(dataset, "name", None) == "openimages" else "segmentation")
    if task not in ("segmentation", "wsol"):
        raise ValueError(f"task must be 'segmentation' or 'wsol', got {task!r}")
    if map_format not in ("auto", "npy", "png"):
        raise ValueError(f"map_format must be 'auto', 'npy' or 'png', got {map_format!r}")
    if not dataset.has_masks():
        raise DatasetError(f"{_dataset_name(dataset)} split {getattr(dataset, 'split', '?')!r} has no ground-truth masks to evaluate against")

    ids = [str(i) for i in dataset.ids]
    map_format, indices, missing = _resolve_files(maps_dir, ids, map_format, allow_missing)
    if task == "wsol" and map_format == "png":
        raise ValueError(f"{maps_dir}: OpenImages PxAP/pIoU need score maps (.npy), not PNG label maps")

    protocol = _protocol(dataset, maps_dir, map_format, len(indices), len(missing))
    bar = tqdm(total=len(indices), desc=f"eval {maps_dir.name}", disable=not progress, unit="img")
    try:
        if task == "wsol":
            result = _evaluate_wsol(maps_dir, dataset, indices, cfg, protocol, bar)
        elif map_format == "png":
            result = _evaluate_png(maps_dir, dataset, indices, protocol, bar)
        else:
            result = _evaluate_curve(maps_dir, dataset, indices, cfg, protocol, bar)
    finally:
        bar.close()
    if out is not None:
        write_result(result, out, dataset)
    return result


# ------------------------------------------------------------------------------------------------ inputs

def _dataset_name(dataset: Any) -> str:
    return str(getattr(dataset, "name", None) or type(dataset).__name__)


def _resolve_files(maps_dir: Path, ids: list[str], map_format: str, allow_missing: bool) -> tuple[str, list[int], list[str]]:
    """Pick the file format and the images to evaluate; fail early, listing missing ids."""
    if map_format == "auto":
        present = {suffix: sum((maps_dir / f"{i}.{suffix}").is_file() for i in ids) for suffix in ("npy", "png")}
        if not present["npy"] and not present["png"]:
            raise FileNotFoundError(f"{maps_dir}: no map file (<id>.npy or <id>.png) for any of the {len(ids)} images")
        map_format = "npy" if present["npy"] else "png"
    indices, missing = [], []
    for index, image_id in enumerate(ids):
        (indices if (maps_dir / f"{image_id}.{map_format}").is_file() else missing).append(index)
    missing_ids = [ids[i] for i in missing]
    if missing_ids and not allow_missing:
        shown = ", ".join(missing_ids[:_SHOW_MISSING]) + (", ..." if len(missing_ids) > _SHOW_MISSING else "")
        raise FileNotFoundError(
            f"{maps_dir}: {len(missing_ids)} of {len(ids)} images have no .{map_format} map file ({shown}); "
            "run inference for them or pass allow_missing=True"
        )
    if not indices:
        raise FileNotFoundError(f"{maps_dir}: no .{map_format} map file to evaluate")
    return map_format, indices, missing_ids


def _prefetch(load: Callable[[int], Any], indices: list[int]) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, load(index))`` in order, reading up to ``_PREFETCH`` images ahead on two threads.

    numpy and PIL release the GIL while reading and decoding, so this overlaps I/O with counting while
    keeping memory bounded.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[tuple[int, Future[Any]]] = deque()
        position = 0
        while position < len(indices) or pending:
            while position < len(indices) and len(pending) < _PREFETCH:
                pending.append((indices[position], pool.submit(load, indices[position])))
                position += 1
            index, future = pending.popleft()
            yield index, future.result()


def _ground_truth(dataset: Any, index: int, image_id: str) -> np.ndarray:
    mask = dataset.get_mask(index)
    if mask is None:
        raise DatasetError(f"{_dataset_name(dataset)}: image {image_id} has no ground-truth mask")
    return np.asarray(mask)


# ------------------------------------------------------------------------------------------------ metrics

def _evaluate_curve(maps_dir: Path, dataset: Any, indices: list[int], cfg: EvalConfig, protocol: dict[str, Any], bar: tqdm) -> dict[str, Any]:
    ids, class_names = list(dataset.ids), ["background", *dataset.class_names]
    thresholds = threshold_grid(cfg.threshold_start, cfg.threshold_stop, cfg.threshold_step)
    curve = ThresholdCurve(len(class_names), thresholds, bg_rule=cfg.bg_rule, power=cfg.bg_power)

    def load(index: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
        path = maps_dir / f"{ids[index]}.npy"
        keys, cam = load_map(path, dtype=None)  # float16 as stored: the curve's fastest path
        return path, keys, cam, _ground_truth(dataset, index, str(ids[index]))

    for _, (path, keys, cam, gt) in _prefetch(load, indices):
        if keys.size and tuple(cam.shape[1:]) != gt.shape:
            raise ValueError(f"{path}: map size {tuple(cam.shape[1:])} differs from the ground truth {gt.shape}; "
                             "maps must be stored at the image size (no resizing is done in evaluation)")
        if keys.size and (keys.min() < 0 or keys.max() >= len(class_names) - 1):
            raise ValueError(f"{path}: class keys {keys.tolist()} outside 0..{len(class_names) - 2} "
                             f"({len(class_names) - 1} classes)")
        try:
            curve.update_sparse(keys, cam, gt)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        bar.update()

    protocol.update({
        "map_key": "cam",
        "bg_rule": cfg.bg_rule,
        "bg_power": cfg.bg_power if cfg.bg_rule == "power" else None,
        "grid": [cfg.threshold_start, cfg.threshold_stop, cfg.threshold_step],
        "num_thresholds": int(thresholds.size),
        "ties": "background",
        "compare_dtype": "float32",
    })
    best_index = curve.best_index()
    best_threshold, best_miou = curve.best()
    mct_threshold, mct_miou = curve.mctformer_protocol()
    result: dict[str, Any] = {
        "protocol": protocol,
        "miou_curve": [{"threshold": t, "miou": _finite(m)} for t, m in curve.curve()],
        "best": {"threshold": best_threshold, "miou": _finite(best_miou),
                 **_class_scores(curve.confusion_at(best_index), class_names)},
        "mctformer_protocol": {"threshold": mct_threshold, "miou": _finite(mct_miou),
                               "grid": [0.0, 0.59, 0.01], "rule": "stop at the first threshold that does not improve"},
    }
    if cfg.bg_rule == "power":
        power_threshold, power_miou = curve.power_rule()
        result["power_rule"] = {"power": cfg.bg_power, "equivalent_threshold": power_threshold, "miou": _finite(power_miou),
                                **_class_scores(curve.confusion_at_threshold(power_threshold), class_names)}
    return result


def _evaluate_png(maps_dir: Path, dataset: Any, indices: list[int], protocol: dict[str, Any], bar: tqdm) -> dict[str, Any]:
    ids, class_names = list(dataset.ids), ["background", *dataset.class_names]
    confusion = ConfusionMatrix(len(class_names))

    def load(index: int) -> tuple[Path, np.ndarray, np.ndarray]:
        path = maps_dir / f"{ids[index]}.png"
        return path, load_label_png(path), _ground_truth(dataset, index, str(ids[index]))

    for _, (path, pred, gt) in _prefetch(load, indices):
        if pred.shape != gt.shape:
            raise ValueError(f"{path}: label map size {pred.shape} differs from the ground truth {gt.shape}")
        try:
            confusion.update(pred, gt)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        bar.update()
    protocol.update({"map_key": None, "bg_rule": None, "grid": None, "num_thresholds": 1,
                     "prediction_255": "no prediction (counts against recall)"})
    return {"protocol": protocol, "best": {"threshold": None, "miou": _finite(confusion.miou()),
                                          **_class_scores(confusion, class_names)}}


def _evaluate_wsol(maps_dir: Path, dataset: Any, indices: list[int], cfg: EvalConfig, protocol: dict[str, Any], bar: tqdm) -> dict[str, Any]:
    ids, num_classes = list(dataset.ids), len(dataset.class_names)
    accumulator = PxAPAccumulator(step=cfg.wsol_step)

    def load(index: int) -> tuple[Path, np.ndarray, np.ndarray]:
        path = maps_dir / f"{ids[index]}.npy"
        keys, cam = load_map(path)
        if keys.size and (keys.min() < 0 or keys.max() >= num_classes):
            raise ValueError(f"{path}: class keys {keys.tolist()} outside 0..{num_classes - 1}")
        positives = np.flatnonzero(np.asarray(dataset.get_labels(index)) > 0)
        if positives.size != 1:
            raise DatasetError(f"{_dataset_name(dataset)}: image {ids[index]} has {positives.size} labels; "
                               "PxAP/pIoU need exactly one ground-truth class")
        hit = np.flatnonzero(keys == positives[0])
        # A class without a stored map has a zero map: constant, so all-zero after normalisation.
        score_map = cam[hit[0]] if hit.size else np.zeros((WSOL_SIZE, WSOL_SIZE))
        mask = _ground_truth(dataset, index, str(ids[index]))
        if mask.shape != (WSOL_SIZE, WSOL_SIZE):
            mask = resize_mask_nearest(mask, WSOL_SIZE)
        return path, prepare_openimages_map(score_map, WSOL_SIZE), mask

    for _, (path, score, mask) in _prefetch(load, indices):
        accumulator.update(score, (mask != 0) & (mask != IGNORE_INDEX), mask == IGNORE_INDEX)
        bar.update()
    thresholds, iou = accumulator.iou_curve()
    protocol.update({
        "map_key": "cam of the ground-truth class",
        "score_map": f"bicubic resize to {WSOL_SIZE}x{WSOL_SIZE}, min-max normalised (constant -> 0), float64",
        "gt_mask": f"foreground union, nearest resize to {WSOL_SIZE}x{WSOL_SIZE}, ignore regions excluded",
        "threshold_step": cfg.wsol_step,
        "num_thresholds": int(accumulator.thresholds.size),
        "bins": "[t_0, t_1), ..., [t_n-1, 1), [1, 2), [2, 3] as wsolevaluation",
    })
    return {
        "pxap": accumulator.pxap(),
        "piou": accumulator.piou(),
        "piou_threshold": accumulator.piou_threshold(),
        "iou_curve": [{"threshold": float(t), "iou": float(v)} for t, v in zip(thresholds, iou)],
        "protocol": protocol,
    }


def _protocol(dataset: Any, maps_dir: Path, map_format: str, num_images: int, num_missing: int) -> dict[str, Any]:
    describe = dataset.describe() if hasattr(dataset, "describe") else {}
    if not isinstance(describe, dict):
        describe = {}
    return {
        "dataset": describe.get("dataset") or _dataset_name(dataset),
        "split": getattr(dataset, "split", None),
        "split_file": describe.get("split_file"),
        "describe": describe,
        "num_images": num_images,
        "num_missing": num_missing,
        "num_classes": len(dataset.class_names) + 1,
        "map_dir": str(maps_dir),
        "map_format": map_format,
        "miou_mean": "over classes present in the ground truth or the prediction",
    }


def _finite(value: float) -> Optional[float]:
    """JSON has no NaN: undefined scores are written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _class_scores(confusion: ConfusionMatrix, class_names: list[str]) -> dict[str, dict[str, Optional[float]]]:
    return {
        "per_class_iou": {n: _finite(v) for n, v in zip(class_names, confusion.iou().tolist())},
        "precision": {n: _finite(v) for n, v in zip(class_names, confusion.precision().tolist())},
        "recall": {n: _finite(v) for n, v in zip(class_names, confusion.recall().tolist())},
    }


# ------------------------------------------------------------------------------------------------ output

def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_protocol(result: dict[str, Any]) -> list[str]:
    """The protocol of a result as markdown list items (in ``X.md`` and in ``X.html``)."""
    p = result["protocol"]
    lines = [
        f"- dataset: {p['dataset']}, split {p['split']}" + (f" (split file `{p['split_file']}`)" if p.get("split_file") else ""),
        f"- images: {p['num_images']}" + (f" ({p['num_missing']} without a map file skipped)" if p.get("num_missing") else ""),
        f"- maps: `{p['map_dir']}` ({p['map_format']})",
    ]
    if "pxap" in result:
        return lines + [
            f"- score map: {p['map_key']}; {p['score_map']}",
            f"- ground truth: {p['gt_mask']}",
            f"- thresholds: np.arange(0, 1, {p['threshold_step']}) ({p['num_thresholds']}), bins {p['bins']}",
        ]
    if p["map_format"] == "png":
        return lines + ["- label maps evaluated as they are (no threshold)"]
    start, stop, step = p["grid"]
    background = "constant plane t" if p["bg_rule"] == "constant" else f"power rule (1 - max)^{p['bg_power']} and constant plane t"
    return lines + [
        f"- map key: {p['map_key']}; background: {background}; ties -> {p['ties']}; compared in {p['compare_dtype']}",
        f"- thresholds: {start:g} to {stop:g} step {step:g} ({p['num_thresholds']})",
        f"- mIoU: mean over {p['num_classes']} classes (background included), {p['miou_mean']}",
    ]


def format_result(result: dict[str, Any]) -> str:
    """The protocol and the scores as markdown text (printed by the CLI, saved as ``X.md``)."""
    lines = format_protocol(result)
    if "pxap" in result:
        lines += [
            "",
            "| metric | value | threshold |",
            "|---|---|---|",
            f"| PxAP | {result['pxap']:.2f} | |",
            f"| pIoU | {result['piou']:.2f} | {result['piou_threshold']:.3f} |",
        ]
        return "\n".join(lines) + "\n"

    best = result["best"]
    if result["protocol"]["map_format"] == "png":
        lines += ["", "| | mIoU |", "|---|---|", f"| label maps | {_fmt(best['miou'])} |"]
    else:
        lines += [
            "",
            "| | threshold | mIoU |",
            "|---|---|---|",
            f"| best of the full sweep | {best['threshold']:.2f} | {_fmt(best['miou'])} |",
        ]
        mct = result["mctformer_protocol"]
        lines.append(f"| MCTformer protocol (0.00-0.59, early stop) | {mct['threshold']:.2f} | {_fmt(mct['miou'])} |")
        if "power_rule" in result:
            pr = result["power_rule"]
            lines.append(f"| power rule k={pr['power']:g} (= threshold {pr['equivalent_threshold']:.4f}) | | {_fmt(pr['miou'])} |")
        if mct["threshold"] != best["threshold"]:
            lines += ["", "The early-stopped MCTformer sweep and the full sweep disagree; both are reported."]
    where = "" if best["threshold"] is None else f" at the best threshold {best['threshold']:.2f}"
    lines += ["", f"Per-class scores{where}:", "", "| class | IoU | precision | recall |", "|---|---|---|---|"]
    for name, iou in best["per_class_iou"].items():
        lines.append(f"| {name} | {_fmt(iou)} | {_fmt(best['precision'][name])} | {_fmt(best['recall'][name])} |")
    return "\n".join(lines) + "\n"


def write_result(result: dict[str, Any], out: str | Path, dataset: Any = None) -> None:
    """Write ``X.json``, ``X.md``, ``X_curve.png`` and ``X.html`` (each atomically) for ``out = X.json``.

    With ``dataset`` (the one evaluated), the HTML page also shows its first images with their maps.
    """
    from mmcst.report import eval_report, write_report

    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"out must name a .json file, got {out}")
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), f"# Evaluation: {out.stem}\n\n{format_result(result)}")
    curve = _curve_png(result) if "miou_curve" in result or "iou_curve" in result else None
    if curve is not None:
        atomic_write_bytes(out.with_name(f"{out.stem}_curve.png"), curve)
    report = eval_report(result, f"Evaluation: {out.stem}", "\n".join(format_protocol(result)), dataset, curve)
    write_report(report, html_path=out.with_suffix(".html"))


def _curve_png(result: dict[str, Any]) -> bytes:
    # Figure without pyplot: no global backend state, renders with Agg in any process.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    if "miou_curve" in result:
        points = [(c["threshold"], c["miou"]) for c in result["miou_curve"] if c["miou"] is not None]
        axes.plot(*zip(*points), color="tab:blue", label="mIoU")
        best, mct = result["best"], result["mctformer_protocol"]
        axes.plot([best["threshold"]], [best["miou"]], "o", color="tab:red",
                  label=f"best {best['miou']:.2f} @ {best['threshold']:.2f}")
        axes.plot([mct["threshold"]], [mct["miou"]], "s", mfc="none", color="tab:green", markersize=9,
                  label=f"MCTformer protocol {mct['miou']:.2f} @ {mct['threshold']:.2f}")
        axes.set_xlabel("background threshold")
        axes.set_ylabel("mIoU (%)")
    else:
        points = [(c["threshold"], c["iou"]) for c in result["iou_curve"]]
        axes.plot(*zip(*points), color="tab:blue", label="pixel IoU")
        axes.plot([result["piou_threshold"]], [result["piou"]], "o", color="tab:red",
                  label=f"pIoU {result['piou']:.2f} @ {result['piou_threshold']:.3f}")
        axes.set_xlabel("score threshold")
        axes.set_ylabel("IoU (%)")
        axes.set_title(f"PxAP {result['pxap']:.2f}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
