"""Reports people read: one data model, rendered as markdown and as one self-contained HTML page.

A :class:`Report` is a title and a list of :class:`Section`; a section holds blocks:

- :class:`Prose` and :class:`Callout`: markdown text;
- :class:`Table`: cells that each name the JSON field they show (``Cell.key``), so a table is rendered
  from its result file and can be checked against it;
- :class:`Figure`: a PNG (a file beside the markdown, a data URI in the HTML);
- :class:`Explorer`: images, ground truth and localization maps at reduced resolution with controls for the
  method, the class and the background threshold; the page computes each pseudo-mask with the evaluation's
  rule (:func:`pseudo_mask`) and marks the chosen threshold on the curves. Markdown shows its fallback figures.

Builders turn results into reports: :func:`demo_report` (from the demo's ``report.json``, :func:`demo_summary`)
and :func:`eval_report` (one ``mmcst eval`` result). Another kind of result (the WSSS stages, say) is another
function returning sections, with an :class:`Explorer` whose entries are score maps or label maps.
The HTML needs no network: styles, script, images and data are all inside the page.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mmcst.io import atomic_write_bytes, atomic_write_text, load_label_png, load_map, voc_palette

OVERLAY_IMAGES = 6  # fixed set: the first images of the split that have maps
MAX_MAP_SIDE = 64  # class maps embedded in the page: at most 64 x 64 each
MAX_IMAGE_SIDE = 256  # images and ground truth embedded for display
NOT_AVAILABLE = "–"  # a JSON null (undefined score, or not applicable to the row)
REFERENCE_LABELS = {"gt": "reference: ground truth as maps", "centre": "reference: centre Gaussian prior"}


# ------------------------------------------------------------------------------------------------ data model

@dataclass(frozen=True)
class Prose:
    markdown: str


@dataclass(frozen=True)
class Callout:
    """The sentence a reader must not miss (e.g. the verdict)."""

    markdown: str


@dataclass(frozen=True)
class Column:
    label: str
    numeric: bool = False
    digits: int = 1
    best: Optional[Literal["max", "min"]] = None  # which value wins, for highlighting
    shade: bool = False  # tint the cell by value / 100 (percentages)
    help: str = ""


@dataclass(frozen=True)
class Cell:
    value: Any
    key: Optional[tuple[str, ...]] = None  # the path of ``value`` in the result JSON the table is rendered from


@dataclass(frozen=True)
class Row:
    cells: tuple[Cell, ...]
    compete: bool = True  # False: shown but never highlighted (e.g. ground truth used as maps)


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    caption: str = ""
    best_per: Literal["column", "row"] = "column"  # highlight the best value of each column, or of each row


@dataclass(frozen=True)
class Figure:
    name: str  # file name beside the markdown
    png: bytes
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class GalleryImage:
    id: str
    image_uri: str
    gt_uri: Optional[str]
    classes: tuple[int, ...]  # ground-truth labels present (1..C)


@dataclass(frozen=True)
class Explorer:
    """Interactive pseudo-masks and threshold curves; ``payload`` is the JSON the page script draws from."""

    key: str
    payload: dict[str, Any]
    images: tuple[GalleryImage, ...] = ()
    fallback: tuple[Figure, ...] = ()  # what the markdown shows instead
    intro: str = ""  # markdown above the controls (the page only: it explains them)


Block = Union[Prose, Callout, Table, Figure, Explorer]


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Report:
    title: str
    sections: tuple[Section, ...]
    subtitle: str = ""


# ------------------------------------------------------------------------------------------------ the rule

def pseudo_mask(keys: np.ndarray, cam: np.ndarray, threshold: float) -> np.ndarray:
    """Argmax over [background plane = threshold, class maps]; ties go to background."""
    if len(keys) == 0:
        return np.zeros(cam.shape[1:], np.uint8)
    stack = np.concatenate([np.full((1,) + cam.shape[1:], threshold, np.float32), cam], axis=0)
    arg = stack.argmax(0)
    labels = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return labels[arg]


def reduced_size(height: int, width: int, max_side: int = MAX_MAP_SIDE) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``max_side``, aspect ratio kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def reduce_maps(cam: np.ndarray, max_side: int = MAX_MAP_SIDE) -> np.ndarray:
    """[K, H, W] maps in [0, 1] -> uint8 [K, h, w] (area average, then ``round(255 v)``) for the page."""
    cam = np.clip(np.asarray(cam, np.float32), 0.0, 1.0)
    height, width = reduced_size(*cam.shape[1:], max_side=max_side)
    planes = [np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BOX))
              for plane in cam]
    reduced = np.stack(planes) if planes else np.zeros((0, height, width), np.float32)
    return np.round(np.clip(reduced, 0.0, 1.0) * 255).astype(np.uint8)


def reduce_labels(label: np.ndarray, max_side: int = MAX_MAP_SIDE) -> np.ndarray:
    """HxW label map -> uint8 [h, w] by nearest neighbour (labels are never blended)."""
    height, width = reduced_size(*label.shape, max_side=max_side)
    return np.asarray(Image.fromarray(np.asarray(label, np.uint8)).resize((width, height), Image.Resampling.NEAREST))


# ------------------------------------------------------------------------------------------------ figures

def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(curves: dict[str, Sequence[dict[str, Any]]]) -> bytes:
    """mIoU against background threshold, one line per predictor (the markdown report's figure)."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        points = [(p["threshold"], p["miou"]) for p in curve if p["miou"] is not None]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _colorize(label: np.ndarray) -> np.ndarray:
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    return palette[label]


def plot_overlays(dataset: Any, indices: Sequence[int], methods: dict[str, dict[str, Any]]) -> bytes:
    """Rows: images; columns: image, ground truth, then for each method its map (max over classes) and pseudo-mask.

    The panels are composed into one mosaic and drawn on a single axes: one axes per panel costs seconds.
    """
    from matplotlib import colormaps

    jet = colormaps["jet"]
    titles = ["image", "ground truth"] + [f"{name} {what}" for name in methods for what in ("map", "mask")]
    rows = []
    for index in indices:
        image = dataset[index]["image"].permute(1, 2, 0).numpy().astype(np.float32) / 255.0
        mask = dataset.get_mask(index)
        panels = [image, _colorize(mask) / 255.0]
        for info in methods.values():
            keys, cam = load_map(Path(info["maps_dir"]) / f"{dataset.ids[index]}.npy")
            heat = cam.max(0) if len(keys) else np.zeros(mask.shape, np.float32)
            panels.append(0.5 * image + 0.5 * jet(np.clip(heat, 0.0, 1.0))[..., :3])
            panels.append(_colorize(pseudo_mask(keys, cam, info["threshold"])) / 255.0)
        rows.append(panels)
    return mosaic_png(rows, titles, fontsize=8)


def mosaic_png(rows: list[list[np.ndarray]], titles: Sequence[str], fontsize: float = 8) -> bytes:
    """Panels (H x W x 3, float in [0, 1] or uint8, all of one dtype) laid out row by row on a white ground, with
    the column titles above, as a PNG: one axes for the whole mosaic (one axes per panel costs seconds)."""
    from matplotlib.figure import Figure as MplFigure

    side = max(max(p.shape[:2]) for row in rows for p in row)
    gap = 4
    dtype = rows[0][0].dtype
    white = 255 if dtype == np.uint8 else 1.0
    mosaic = np.full((len(rows) * (side + gap) - gap, len(titles) * (side + gap) - gap, 3), white, dtype)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            y, x = r * (side + gap), c * (side + gap)
            mosaic[y:y + panel.shape[0], x:x + panel.shape[1]] = panel
    # One figure pixel per mosaic pixel, plus a strip for the column titles: nothing is resampled.
    dpi, strip = 100, 22
    height, width = mosaic.shape[:2]
    fig = MplFigure(figsize=(width / dpi, (height + strip) / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + strip)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([c * (side + gap) + side / 2 for c in range(len(titles))], list(titles), fontsize=fontsize)
    ax.xaxis.set_ticks_position("top")
    ax.tick_params(length=0, pad=3)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ explorer

@dataclass(frozen=True)
class ExplorerEntry:
    """One predictor in an :class:`Explorer`: score maps (thresholded in the page) or label maps, and its curve."""

    name: str
    maps_dir: Optional[Path] = None  # <id>.npy score maps
    labels_dir: Optional[Path] = None  # <id>.png label maps (no threshold)
    threshold: Optional[float] = None  # the point to start from (its best threshold)
    curve: Sequence[dict[str, Any]] = ()  # [{"threshold", "miou"}]
    mctformer: Optional[tuple[float, Optional[float]]] = None  # MCTformer's early-stopped (threshold, mIoU)
    reference: bool = False


def _png_uri(array: np.ndarray, palette: bool = False) -> str:
    image = Image.fromarray(array)
    if palette:
        image.putpalette(voc_palette())  # an "L" image becomes a palette image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _jpeg_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _gallery_image(dataset: Any, index: int) -> GalleryImage:
    rgb = dataset[index]["image"].permute(1, 2, 0).numpy()
    height, width = reduced_size(*rgb.shape[:2], max_side=MAX_IMAGE_SIDE)
    if (height, width) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))
    mask = dataset.get_mask(index)
    gt_uri, classes = None, ()
    if mask is not None:
        mask = np.asarray(mask, np.uint8)
        classes = tuple(int(c) for c in np.unique(mask) if 0 < c < 255)
        shown = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        gt_uri = _png_uri(shown, palette=True)
    return GalleryImage(str(dataset.ids[index]), _jpeg_uri(rgb), gt_uri, classes)


def _image_shape(dataset: Any, index: int) -> tuple[int, int]:
    mask = dataset.get_mask(index)
    return tuple(mask.shape) if mask is not None else tuple(dataset[index]["image"].shape[1:])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.uint8).tobytes()).decode("ascii")


def _series_colours(count: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours = colormaps["tab10"].colors
    return [to_hex(colours[i % len(colours)]) for i in range(count)]


def _colormap_lut() -> list[list[int]]:
    from matplotlib import colormaps

    return (np.asarray(colormaps["jet"](np.linspace(0.0, 1.0, 256)))[:, :3] * 255).round().astype(int).tolist()


def build_explorer(key: str, entries: Sequence[ExplorerEntry], class_names: Sequence[str],
                   grid: Sequence[float] = (0.0, 0.95, 0.01), dataset: Any = None,
                   indices: Sequence[int] = (), fallback: bool = False, intro: str = "") -> Explorer:
    """An :class:`Explorer` over ``indices`` of ``dataset`` (none: the curves only).

    ``class_names`` includes background at 0. ``fallback`` also renders the matplotlib figures that the
    markdown report shows in its place (curves.png, overlays.png).
    """
    images = tuple(_gallery_image(dataset, i) for i in indices) if dataset is not None else ()
    colours = _series_colours(len(entries))
    methods = []
    for entry, colour in zip(entries, colours):
        method: dict[str, Any] = {
            "name": entry.name, "colour": colour, "reference": entry.reference, "kind": "curve",
            "threshold": entry.threshold,
            "curve": [[p["threshold"], p["miou"]] for p in entry.curve],
            "mctformer": list(entry.mctformer) if entry.mctformer else None,
        }
        if dataset is not None and entry.maps_dir is not None:
            method["kind"], method["maps"] = "maps", []
            for index in indices:
                keys, cam = load_map(Path(entry.maps_dir) / f"{dataset.ids[index]}.npy")
                if len(keys):
                    reduced = reduce_maps(cam)
                else:  # no class present: an empty stack at the image's reduced size
                    reduced = np.zeros((0, *reduced_size(*_image_shape(dataset, index))), np.uint8)
                method["maps"].append({"keys": [int(k) for k in keys], "height": int(reduced.shape[1]),
                                       "width": int(reduced.shape[2]), "data": _b64(reduced)})
        elif dataset is not None and entry.labels_dir is not None:
            method["kind"], method["labels"] = "labels", []
            for index in indices:
                reduced = reduce_labels(load_label_png(Path(entry.labels_dir) / f"{dataset.ids[index]}.png"))
                method["labels"].append({"height": int(reduced.shape[0]), "width": int(reduced.shape[1]),
                                         "data": _b64(reduced)})
        methods.append(method)
    palette = np.asarray(voc_palette(), int).reshape(256, 3).tolist()
    payload = {"grid": [float(g) for g in grid], "classes": list(class_names), "palette": palette,
               "colormap": _colormap_lut(), "methods": methods}
    figures: list[Figure] = []
    if fallback:
        curves = {e.name: e.curve for e in entries if e.curve}
        if curves:
            figures.append(Figure("curves.png", plot_curves(curves), "mIoU against background threshold"))
        overlay = {e.name: {"maps_dir": e.maps_dir, "threshold": e.threshold} for e in entries
                   if e.maps_dir is not None and e.threshold is not None}
        if dataset is not None and overlay and indices:
            figures.append(Figure("overlays.png", plot_overlays(dataset, indices, overlay),
                                  "images, ground truth, maps and pseudo-masks at each best threshold"))
    return Explorer(key, payload, images, tuple(figures), intro)


# ------------------------------------------------------------------------------------------------ rendering

def format_value(value: Any, digits: int = 1) -> str:
    """How a cell shows a JSON value: null -> ``–``, integers as they are, other numbers with ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_AVAILABLE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def best_cells(table: Table) -> set[tuple[int, int]]:
    """``(row, column)`` of the winning cells, compared as shown; nothing where all candidates are equal."""
    def shown(row: int, col: int) -> Optional[float]:
        value = table.rows[row].cells[col].value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return round(float(value), table.columns[col].digits)

    groups: list[list[tuple[int, int]]] = []
    competing = [r for r, row in enumerate(table.rows) if row.compete]
    scored = [c for c, column in enumerate(table.columns) if column.best]
    if table.best_per == "column":
        groups = [[(r, c) for r in competing] for c in scored]
    else:
        groups = [[(r, c) for c in scored] for r in competing]
    winners: set[tuple[int, int]] = set()
    for group in groups:
        values = {cell: shown(*cell) for cell in group}
        values = {cell: v for cell, v in values.items() if v is not None}
        if len(set(values.values())) < 2:
            continue
        direction = table.columns[group[0][1]].best if table.best_per == "column" else "max"
        target = max(values.values()) if direction == "max" else min(values.values())
        winners |= {cell for cell, v in values.items() if v == target}
    return winners


def _markdown_table(table: Table) -> str:
    winners = best_cells(table)

    def text(row: int, col: int) -> str:
        shown = format_value(table.rows[row].cells[col].value, table.columns[col].digits).replace("|", r"\|")
        return f"**{shown}**" if (row, col) in winners else shown
    lines = ["| " + " | ".join(c.label for c in table.columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|"]
    lines += ["| " + " | ".join(text(r, c) for c in range(len(table.columns))) + " |" for r in range(len(table.rows))]
    return "\n".join(lines)


def render_markdown(report: Report, figure_dir: Optional[Path] = None) -> str:
    """The report as markdown; figures are written into ``figure_dir`` (none: figures are left out)."""
    lines = [f"# {report.title}", ""]
    if report.subtitle:
        lines += [report.subtitle, ""]

    def figure(fig: Figure) -> None:
        if figure_dir is None:
            return
        atomic_write_bytes(Path(figure_dir) / fig.name, fig.png)
        lines.extend([f"![{fig.alt}]({fig.name})", ""] + ([fig.caption, ""] if fig.caption else []))

    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Prose):
                lines += [block.markdown, ""]
            elif isinstance(block, Callout):
                lines += ["> " + line if line else ">" for line in block.markdown.splitlines()] + [""]
            elif isinstance(block, Table):
                lines += ([block.caption, ""] if block.caption else []) + [_markdown_table(block), ""]
            elif isinstance(block, Figure):
                figure(block)
            elif isinstance(block, Explorer):
                for fig in block.fallback:
                    figure(fig)
                lines += ["The HTML report shows these maps with controls for the predictor, the class and the "
                          "background threshold.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _asset(name: str) -> str:
    return resources.files("mmcst").joinpath("report_assets", name).read_text(encoding="utf-8")


def _markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    # Raw HTML in the text is escaped, not passed through: report text is data.
    return MarkdownIt("commonmark", {"html": False, "typographer": False}).render(text)


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, n = base, 2
    while anchor in used:
        anchor, n = f"{base}-{n}", n + 1
    used.add(anchor)
    return anchor


def _table_context(table: Table) -> dict[str, Any]:
    winners = best_cells(table)
    rows = []
    for r, row in enumerate(table.rows):
        cells = []
        for c, (cell, column) in enumerate(zip(row.cells, table.columns)):
            classes = ["num" if column.numeric else "text"]
            if (r, c) in winners:
                classes.append("best")
            style = ""
            if column.shade and isinstance(cell.value, (int, float)) and not isinstance(cell.value, bool) \
                    and not math.isnan(cell.value):
                style = f"--shade:{min(max(float(cell.value) / 100.0, 0.0), 1.0):.3f}"
                classes.append("shaded")
            cells.append({"text": format_value(cell.value, column.digits), "cls": " ".join(classes), "style": style,
                          "key": json.dumps(list(cell.key)) if cell.key is not None else None,
                          "header": c == 0 and not column.numeric})
        rows.append({"cells": cells, "cls": "" if row.compete else "reference"})
    return {"kind": "table", "columns": table.columns, "rows": rows, "caption": table.caption}


def _explorer_context(explorer: Explorer) -> dict[str, Any]:
    payload = explorer.payload
    methods, names, grid = payload["methods"], payload["classes"], payload["grid"]
    present = {c for image in explorer.images for c in image.classes}
    present |= {k + 1 for m in methods for entry in m.get("maps", []) for k in entry["keys"]}
    return {
        "kind": "explorer", "key": explorer.key, "methods": methods, "images": explorer.images,
        "class_options": [(c, names[c]) for c in sorted(present) if c < len(names)], "class_names": names,
        "css_colour": {c: "#%02x%02x%02x" % tuple(payload["palette"][c]) for c in range(len(names))},
        "grid": grid, "intro": _markdown_html(explorer.intro) if explorer.intro else "",
        "threshold": next((m["threshold"] for m in methods if m["threshold"] is not None), grid[0]),
        "digits": len(str(grid[2]).partition(".")[2]),  # decimals of the step, as the page script counts them
        "has_curves": any(m["curve"] for m in methods),
    }


def _block_context(block: Block) -> dict[str, Any]:
    if isinstance(block, Prose):
        return {"kind": "prose", "html": _markdown_html(block.markdown)}
    if isinstance(block, Callout):
        return {"kind": "callout", "html": _markdown_html(block.markdown)}
    if isinstance(block, Table):
        return _table_context(block)
    if isinstance(block, Figure):
        return {"kind": "figure", "alt": block.alt, "caption": block.caption,
                "uri": "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")}
    if isinstance(block, Explorer):
        return _explorer_context(block)
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(report: Report) -> str:
    """The report as one HTML page with its styles, script, images and data inline (no network)."""
    import jinja2

    used: set[str] = set()
    sections = [{"title": s.title, "anchor": _anchor(s.title, used), "blocks": [_block_context(b) for b in s.blocks]}
                for s in report.sections]
    explorers = {b.key: b.payload for s in report.sections for b in s.blocks if isinstance(b, Explorer)}
    # "<" escaped so that no string in the data can close the <script> element that holds it
    data_json = json.dumps({"explorers": explorers}, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    template = environment.from_string(_asset("report.html.j2"))
    return template.render(title=report.title, subtitle=report.subtitle, sections=sections, data_json=data_json,
                           css=_asset("report.css"), js=_asset("report.js"))


def write_report(report: Report, html_path: Optional[Path] = None, markdown_path: Optional[Path] = None) -> None:
    """Write the HTML page and/or the markdown (figures beside it), each atomically."""
    if markdown_path is not None:
        markdown_path = Path(markdown_path)
        atomic_write_text(markdown_path, render_markdown(report, markdown_path.parent))
    if html_path is not None:
        atomic_write_text(Path(html_path), render_html(report))


# ------------------------------------------------------------------------------------------------ demo

def demo_verdict(results: dict[str, Any], chance: Optional[float] = None) -> str:
    """The demo's claim, checked: MMCST's val mIoU beats every other method and the centre prior, and its val
    classification mAP is at least MCTformer-V2's (the same backbone). Says which part fails, with the figures.

    ``chance``: the validation mAP of a random ranking (:func:`mmcst.metrics.classification.chance_map`), to put
    the methods' mAP in context.
    """
    methods = results["methods"]
    if "mmcst" not in methods:
        return "MMCST was not part of this run."
    miou = {name: info["result"]["best"]["miou"] for name, info in methods.items()}
    centre = results["references"].get("centre")
    if centre is not None:
        miou["centre prior"] = centre["result"]["best"]["miou"]
    steps = {name: (info.get("train_summary") or {}).get("steps") for name, info in methods.items()}
    val_map = {name: (info.get("train_summary") or {}).get("val_map") for name, info in methods.items()}
    ours = miou.pop("mmcst")
    beaten = [name for name, value in miou.items() if value >= ours]
    peer = "mctformer_v2" if "mctformer_v2" in methods else None
    map_short = (peer is not None and val_map["mmcst"] is not None and val_map[peer] is not None
                 and val_map["mmcst"] < val_map[peer])
    detail = ", ".join(
        f"{name} {steps[name]} steps" + ("" if val_map[name] is None else f", val mAP {100 * val_map[name]:.1f}")
        for name in methods)
    context = "" if chance is None or chance != chance else \
        f" A random ranking would reach a val mAP of about {100 * chance:.1f}."
    if not beaten and not map_short:
        rivals = ", ".join(f"{name} {value:.1f}" for name, value in miou.items())
        mAP = "" if peer is None or val_map["mmcst"] is None or val_map[peer] is None else \
            (f"; its classification mAP ({100 * val_map['mmcst']:.1f}) is at least that of {peer} on the same backbone "
             f"({100 * val_map[peer]:.1f})")
        return (f"MMCST has the best validation mIoU of this run, {ours:.1f} (against {rivals}), at equal map "
                f"resolution and equal training time{mAP}. Runs: {detail}.{context}")
    failures = []
    if beaten:
        failures.append(f"{', '.join(beaten)} reached a validation mIoU at least as high as its {ours:.1f}")
    if map_short:
        failures.append(f"its classification mAP ({100 * val_map['mmcst']:.1f}) is below that of {peer} on the same "
                        f"backbone ({100 * val_map[peer]:.1f})")
    return (f"MMCST does not win this run: {'; '.join(failures)}. With the same wall-clock budget the methods "
            f"completed {detail}.{context} Runs that stop with a budget vary from run to run; the paper's setting "
            "starts the ViT from DINO and CLIP weights instead of random ones.")


def _model_input(config: dict[str, Any]) -> str:
    grid = f"patch {config['patch_size']}" if config.get("patch_size") else str(config["backbone"])
    return f"{config['input']} px in, {grid}"


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    mct = result.get("mctformer_protocol") or {}
    return {"best_threshold": result["best"]["threshold"], "best_miou": result["best"]["miou"],
            "mctformer_threshold": mct.get("threshold"), "mctformer_miou": mct.get("miou"),
            "per_class_iou": result["best"].get("per_class_iou"), "miou_curve": result.get("miou_curve", [])}


def demo_summary(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """``report.json``: every figure the demo report shows, from the demo's results and run metadata.

    Keys of ``results`` other than ``references`` and ``methods`` are carried over as they are.
    """
    references = {kind: {"label": REFERENCE_LABELS.get(kind, f"reference: {kind}"), **_scores(info["result"]),
                         "maps_dir": info.get("maps_dir")}
                  for kind, info in results["references"].items()}
    methods = {}
    for name, info in results["methods"].items():
        train_summary = info.get("train_summary") or {}
        val_map = train_summary.get("val_map")
        methods[name] = {
            **_scores(info["result"]), "model_input": _model_input(info["config"]),
            "train_seconds": info["train_seconds"], "steps": train_summary.get("steps"),
            "val_map_percent": None if val_map is None else 100.0 * val_map, "infer_seconds": info["infer_seconds"],
            "config": info["config"], "notes": info["notes"], "maps_dir": info.get("maps_dir"),
            "run_dir": info.get("run_dir"),
        }
    first = next(iter([*results["references"].values(), *results["methods"].values()]), None)
    summary = {
        "meta": meta, "protocol": first["result"]["protocol"] if first else {},
        "references": references, "methods": methods, "random_init": True,
        "verdict": demo_verdict(results, meta.get("chance_val_map")),
    }
    for key, value in results.items():
        summary.setdefault(key, value)
    return summary


def _demo_table(summary: dict[str, Any]) -> Table:
    columns = (
        Column("predictor"), Column("model input"),
        Column("best t", True, 2, help="background threshold of the best point of the full curve"),
        Column("best mIoU", True, 1, best="max"),
        Column("MCTformer t", True, 2, help="MCTformer's protocol: grid 0.00..0.59, stop at the first threshold "
                                            "that does not improve"),
        Column("MCTformer mIoU", True, 1, best="max", help="mIoU at the MCTformer-protocol threshold"),
        Column("train s", True, 0), Column("steps", True, 0),
        Column("val mAP", True, 1, best="max", help="classification mAP (%) on the validation split"),
        Column("maps s", True, 0, help="seconds to compute the validation maps"),
    )
    rows = []
    for kind, ref in summary["references"].items():
        k = ("references", kind)
        scores = (Cell(ref[f], (*k, f))
                  for f in ("best_threshold", "best_miou", "mctformer_threshold", "mctformer_miou"))
        not_trained = (Cell(None),) * 4  # train s, steps, val mAP, maps s
        rows.append(Row((Cell(ref["label"], (*k, "label")), Cell(None), *scores, *not_trained), compete=kind != "gt"))
    for name, m in summary["methods"].items():
        k = ("methods", name)
        rows.append(Row((Cell(name), Cell(m["model_input"], (*k, "model_input")),
                         *(Cell(m[f], (*k, f)) for f in ("best_threshold", "best_miou", "mctformer_threshold",
                                                         "mctformer_miou", "train_seconds", "steps",
                                                         "val_map_percent", "infer_seconds")))))
    return Table(columns, tuple(rows))


def _per_class_table(summary: dict[str, Any]) -> Table:
    sources = [(name, ("methods", name), m) for name, m in summary["methods"].items()]
    if "centre" in summary["references"]:
        sources.append(("centre prior", ("references", "centre"), summary["references"]["centre"]))
    columns = (Column("class"), *(Column(name, True, 1, best="max", shade=True) for name, _, _ in sources))
    rows = []
    for class_name in ["background", *summary["meta"]["class_names"]]:
        cells = [Cell(class_name)]
        for _, key, entry in sources:
            per_class = entry.get("per_class_iou") or {}
            cells.append(Cell(per_class.get(class_name), (*key, "per_class_iou", class_name)))
        rows.append(Row(tuple(cells)))
    return Table(columns, tuple(rows), best_per="row")


def demo_report(summary: dict[str, Any], dataset: Any = None, fallback: bool = True) -> Report:
    """The demo's report, from its ``report.json`` (:func:`demo_summary`) and the validation split."""
    meta, budget = summary["meta"], summary["meta"]["budget"]
    names = list(meta["class_names"])
    protocol = summary.get("protocol") or {}
    entries = [ExplorerEntry(name, Path(m["maps_dir"]), threshold=m["best_threshold"], curve=m["miou_curve"],
                             mctformer=(m["mctformer_threshold"], m["mctformer_miou"]))
               for name, m in summary["methods"].items() if m.get("maps_dir")]
    centre = summary["references"].get("centre")
    if centre is not None and centre.get("maps_dir"):
        entries.append(ExplorerEntry("centre prior", Path(centre["maps_dir"]), threshold=centre["best_threshold"],
                                     curve=centre["miou_curve"], mctformer=(centre["mctformer_threshold"],
                                                                             centre["mctformer_miou"]), reference=True))
    indices = list(range(min(OVERLAY_IMAGES, len(dataset)))) if dataset is not None else []
    how = ("Choose a predictor, a class and the background threshold *t*: each pseudo-mask is the argmax over "
           "[a background plane at *t*, the class maps] (ties go to background), computed in this page from maps "
           f"reduced to at most {MAX_MAP_SIDE}x{MAX_MAP_SIDE}. Click or drag on the chart to set *t*; the dots mark "
           "each curve at *t*, the rings each best point, the squares each MCTformer-protocol point.")
    explorer = build_explorer("demo", entries, ["background", *names], protocol.get("grid") or (0.0, 0.95, 0.01),
                              dataset, indices, fallback=fallback, intro=how)
    setup = [
        "All models start from **random weights**: the demo runs offline and needs no download. The paper's "
        "numbers need DINO ViT-B/16 and CLIP weights, real datasets and a GPU: use `configs/voc/*.yaml` with "
        "`model.backbone.weights=...` and `model.prior.clip_weights=...` (see the README).",
        f"Dataset: procedurally generated in the PASCAL VOC layout, {budget['n_train']} train / {budget['n_val']} val "
        f"images of {budget['size']} px, {len(names)} classes (`{meta['dataset_root']}`).",
        f"Every method trains for the same wall-clock budget ({budget['train_seconds']:.0f} s), seed {meta['seed']}.",
        "Protocol: " + ", ".join(f"{k} = {v}" for k, v in protocol.items()
                                 if k in ("split", "num_images", "bg_rule", "grid", "ties")) + ".",
        f"Total demo time: {meta['total_seconds']:.0f} s (dataset {meta['data_seconds']:.0f} s).",
    ]
    notes = [f"- **{name}**: {note}" for name, m in summary["methods"].items() for note in m["notes"]]
    sections = [
        Section("Verdict", (Callout(summary["verdict"]),)),
        Section("Validation mIoU (%)", (
            _demo_table(summary),
            Prose("Best t: the best point of the full threshold curve. MCTformer: its protocol's threshold (grid "
                  "0.00..0.59, stop at the first threshold that does not improve) and the mIoU there. The best "
                  "value of each score column is highlighted; ground truth used as maps is the upper bound, not a "
                  "competitor."),
        )),
        Section("Maps and pseudo-masks", (explorer,)),
        Section("Per-class IoU (%)", (_per_class_table(summary), Prose(
            "At each predictor's best threshold; the best predictor of each class is highlighted."))),
        Section("Setup", (Prose("\n".join(f"- {line}" for line in setup)),)),
        Section("Differences from the paper", (
            Prose("Where the demo configs differ from the paper's, and why:"), Prose("\n".join(notes) or "(none)"))),
    ]
    subtitle = (f"{'Quick demo' if meta.get('quick') else 'Demo'} · {budget['n_val']} validation images · "
                f"seed {meta['seed']} · {meta['total_seconds']:.0f} s in all")
    return Report("mmcst demo report", tuple(sections), subtitle)


def write_demo_report(out: Path, dataset: Any, summary: dict[str, Any]) -> Path:
    """Write ``report.md`` (with ``curves.png`` and ``overlays.png``) and ``report.html`` into ``out``.

    ``summary`` is the content of ``report.json`` (:func:`demo_summary`); returns the .md path.
    """
    out = Path(out)
    write_report(demo_report(summary, dataset), html_path=out / "report.html", markdown_path=out / "report.md")
    return out / "report.md"


# ------------------------------------------------------------------------------------------------ eval

def _eval_images(dataset: Any, directory: Path, suffix: str) -> list[int]:
    ids = [str(i) for i in dataset.ids]
    return [i for i, image_id in enumerate(ids) if (directory / f"{image_id}.{suffix}").is_file()][:OVERLAY_IMAGES]


def eval_report(result: dict[str, Any], title: str, protocol_markdown: str = "", dataset: Any = None,
                curve_png: Optional[bytes] = None) -> Report:
    """The report of one evaluation (``X.json`` of ``mmcst eval --out X.json``); cells are keyed into it.

    With ``dataset`` the page shows the first images with their maps (score maps with a threshold control,
    or label maps as they are), where the dataset decodes images (``dataset[i]["image"]``). ``curve_png`` is
    shown for results without an mIoU curve (PxAP/pIoU).
    """
    protocol = result["protocol"]
    maps_dir = Path(protocol["map_dir"])
    if dataset is not None and not callable(getattr(dataset, "__getitem__", None)):
        dataset = None  # it cannot decode images: curves and tables only
    sections: list[Section] = []
    if "pxap" in result:
        table = Table((Column("metric"), Column("value", True, 2), Column("threshold", True, 3)), (
            Row((Cell("PxAP"), Cell(result["pxap"], ("pxap",)), Cell(None))),
            Row((Cell("pIoU"), Cell(result["piou"], ("piou",)), Cell(result["piou_threshold"], ("piou_threshold",)))),
        ))
        sections.append(Section("Scores", (table,)))
        if curve_png:
            sections.append(Section("Pixel IoU against score threshold",
                                    (Figure(f"{maps_dir.name}_curve.png", curve_png, "pixel IoU curve"),)))
    else:
        best = result["best"]
        rows = [Row((Cell("best of the full sweep" if "miou_curve" in result else "label maps"),
                     Cell(best["threshold"], ("best", "threshold")), Cell(best["miou"], ("best", "miou"))))]
        if "mctformer_protocol" in result:
            mct = result["mctformer_protocol"]
            rows.append(Row((Cell("MCTformer protocol (0.00-0.59, early stop)"),
                             Cell(mct["threshold"], ("mctformer_protocol", "threshold")),
                             Cell(mct["miou"], ("mctformer_protocol", "miou")))))
        if "power_rule" in result:
            power = result["power_rule"]
            rows.append(Row((Cell(f"power rule k={power['power']:g}"),
                             Cell(power["equivalent_threshold"], ("power_rule", "equivalent_threshold")),
                             Cell(power["miou"], ("power_rule", "miou")))))
        sections.append(Section("Scores", (Table((Column("point"), Column("threshold", True, 2),
                                                   Column("mIoU (%)", True, 2)), tuple(rows)),)))
        class_names = list(best["per_class_iou"])
        # a run's maps live in <run>/maps/<split>: name them after the run
        name = next((part for part in reversed(maps_dir.parts) if part not in ("maps", protocol.get("split"))),
                    maps_dir.name)
        if "miou_curve" in result:
            indices = _eval_images(dataset, maps_dir, "npy") if dataset is not None else []
            mct = result["mctformer_protocol"]
            entry = ExplorerEntry(name or "maps", maps_dir, threshold=best["threshold"], curve=result["miou_curve"],
                                  mctformer=(mct["threshold"], mct["miou"]))
            how = ("Move the background threshold *t* (or click the curve): each pseudo-mask is the argmax over "
                   "[a background plane at *t*, the class maps], ties to background, computed in this page from "
                   f"maps reduced to at most {MAX_MAP_SIDE}x{MAX_MAP_SIDE}. The ring marks the best point, the "
                   "square MCTformer's protocol point.")
            sections.append(Section("Threshold curve and pseudo-masks", (
                build_explorer("eval", [entry], class_names, protocol["grid"], dataset, indices, intro=how),)))
        elif dataset is not None:
            indices = _eval_images(dataset, maps_dir, "png")
            entry = ExplorerEntry(name or "label maps", labels_dir=maps_dir)
            sections.append(Section("Label maps", (build_explorer("eval", [entry], class_names, (0.0, 0.0, 0.01),
                                                                  dataset, indices),)))
        per_class = Table((Column("class"), Column("IoU", True, 2, shade=True), Column("precision", True, 2),
                           Column("recall", True, 2)),
                          tuple(Row((Cell(n), Cell(best["per_class_iou"][n], ("best", "per_class_iou", n)),
                                     Cell(best["precision"][n], ("best", "precision", n)),
                                     Cell(best["recall"][n], ("best", "recall", n)))) for n in class_names))
        where = "" if best["threshold"] is None else f" at the best threshold {best['threshold']:.2f}"
        sections.append(Section(f"Per-class scores (%){where}", (per_class,)))
    if protocol_markdown:
        sections.append(Section("Protocol", (Prose(protocol_markdown),)))
    subtitle = f"{protocol.get('dataset')} · split {protocol.get('split')} · {protocol.get('num_images')} images"
    return Report(title, tuple(sections), subtitle)
