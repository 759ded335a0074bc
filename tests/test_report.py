"""The report generator: rules, tables, markdown and HTML rendering, the demo and eval reports (no browser).

``test_report_browser.py`` opens the pages in Chromium; these tests need none.
"""
from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmcst.report import (
    Callout, Cell, Column, Figure, Prose, Report, Row, Section, Table, best_cells, demo_summary,
    demo_verdict, format_value, pseudo_mask, reduce_labels, reduce_maps, render_html, render_markdown,
    write_demo_report,
)

MAX_HTML_BYTES = 5 * 1024 * 1024


def _results(mmcst: float, cam: float, centre: float = 5.0, mct: float = 10.0, maps=(0.3, 0.25)) -> dict:
    def entry(value, steps=None, val_map=None):
        return {"result": {"best": {"miou": value}}, "train_summary": {"steps": steps, "val_map": val_map}}
    return {"methods": {"mmcst": entry(mmcst, 70, maps[0]), "mctformer_v2": entry(mct, 75, maps[1]),
                        "cam": entry(cam, 80, 0.2)},
            "references": {"centre": {"result": {"best": {"miou": centre}}}}}


def test_verdict_checks_the_demo_claim():
    won = demo_verdict(_results(30.0, 20.0))
    assert won.startswith("MMCST has the best validation mIoU of this run, 30.0")
    assert "cam 20.0" in won and "mctformer_v2 10.0" in won and "at least that of mctformer_v2" in won
    lost = demo_verdict(_results(13.6, 22.0))
    assert lost.startswith("MMCST does not win") and "cam reached" in lost and "70 steps" in lost
    assert "centre prior" in demo_verdict(_results(4.0, 3.0, centre=6.0, mct=1.0))
    # Best mIoU, but a classification below MCTformer-V2's on the same backbone: the claim does not hold.
    weak = demo_verdict(_results(30.0, 20.0, maps=(0.2, 0.25)))
    assert weak.startswith("MMCST does not win") and "mAP (20.0) is below that of mctformer_v2" in weak
    assert "cam reached" not in weak
    assert "random ranking would reach a val mAP of about 11.0" in demo_verdict(_results(13.6, 22.0), chance=0.11)


def test_pseudo_mask_ties_go_to_background():
    cam = np.array([[[0.5, 0.7]], [[0.2, 0.9]]], np.float32)  # K=2, 1x2
    mask = pseudo_mask(np.array([3, 7]), cam, threshold=0.5)
    assert mask.tolist() == [[0, 8]]


def test_reduced_maps_are_area_averages_at_most_64_pixels():
    rng = np.random.default_rng(0)
    cam = rng.random((2, 128, 96)).astype(np.float32)
    reduced = reduce_maps(cam)
    blocks = cam.reshape(2, 64, 2, 48, 2).mean(axis=(2, 4))  # 2x2 blocks: the brute-force area average
    assert reduced.shape == (2, 64, 48) and reduced.dtype == np.uint8
    assert np.abs(reduced.astype(int) - np.round(blocks * 255)).max() <= 1  # float32 summation order
    assert reduce_maps(rng.random((1, 160, 100))).shape == (1, 64, 40)
    assert reduce_maps(np.ones((1, 20, 30))).tolist() == np.full((1, 20, 30), 255).tolist()  # small maps stay
    labels = rng.integers(0, 4, (160, 100)).astype(np.uint8)
    labels[0, 0] = 255
    small = reduce_labels(labels)
    assert small.shape == (64, 40) and set(np.unique(small)) <= set(np.unique(labels))


def _table() -> Table:
    columns = (Column("name"), Column("miou", True, 1, best="max"), Column("time", True, 0, best="min"),
               Column("steps", True, 0))
    rows = (Row((Cell("gt"), Cell(100.0), Cell(1.0), Cell(None)), compete=False),
            Row((Cell("a"), Cell(7.71), Cell(15.2), Cell(20))),
            Row((Cell("b"), Cell(7.68), Cell(12.0), Cell(20))),
            Row((Cell("c"), Cell(4.6), Cell(None), Cell(8))))
    return Table(columns, rows)


def test_best_values_are_compared_as_shown_and_references_never_win():
    winners = best_cells(_table())
    # 7.71 and 7.68 both show as 7.7: both win; gt (100.0, 1 s) does not compete; the min rule picks 12 s.
    assert winners == {(1, 1), (2, 1), (2, 2)}
    per_row = Table((Column("class"), Column("x", True, 1, best="max"), Column("y", True, 1, best="max")),
                    (Row((Cell("bg"), Cell(80.0), Cell(90.0))), Row((Cell("c1"), Cell(0.0), Cell(0.0)))),
                    best_per="row")
    assert best_cells(per_row) == {(0, 2)}  # an all-equal row highlights nothing


def test_markdown_table_aligns_numbers_and_marks_the_best():
    text = render_markdown(Report("t", (Section("s", (_table(),)),)))
    lines = text.splitlines()
    assert "|---|---:|---:|---:|" in lines
    assert "| a | **7.7** | 15 | 20 |" in lines and "| c | 4.6 | – | 8 |" in lines
    assert format_value(None) == format_value(float("nan")) == "–" and format_value(3) == "3"


class _Visible(HTMLParser):
    """Visible text and the keyed cells of a page (what a reader sees, without a browser)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.cells: list[tuple[list[str], str]] = []
        self._hidden = 0
        self._cell: list[Any] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1
        key = dict(attrs).get("data-key")
        if key is not None:
            self._cell = [json.loads(key), ""]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1
        if tag in ("td", "th") and self._cell:
            self.cells.append((self._cell[0], self._cell[1].strip()))
            self._cell = []

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.text.append(data)
            if self._cell:
                self._cell[1] += data


def _visible(page: str) -> _Visible:
    parser = _Visible()
    parser.feed(page)
    return parser


def assert_cells_show(cells: list[tuple[list[str], str]], source: dict[str, Any]) -> None:
    for key, text in cells:
        value = source
        for part in key:
            value = value[part]
        if value is None:
            assert text == "–", (key, text)
        elif isinstance(value, str):
            assert text == value, (key, text, value)
        else:
            digits = len(text.split(".")[1]) if "." in text else 0
            assert abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-9, (key, text, value)


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, flags=re.I), "external resource"
    assert "<link" not in page and not re.search(r"<script[^>]+src", page) and "@import" not in page
    assert "url(" not in page.split("<style>")[1].split("</style>")[0]


def test_html_converts_markdown_escapes_raw_html_and_is_self_contained():
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                           "AAAABJRU5ErkJggg==")  # 1x1 pixel
    report = Report("Title <x>", (
        Section("One", (Prose("Models start from **random weights**: use `configs/voc/*.yaml`.\n\n- item <script>"),
                        Callout("The *verdict*."))),
        Section("Two", (_table(), Figure("f.png", png, "a figure"))),
    ), subtitle="sub")
    page = render_html(report)
    assert "<strong>random weights</strong>" in page and "<code>configs/voc/*.yaml</code>" in page
    assert "<em>verdict</em>" in page and "&lt;script&gt;" in page and "Title &lt;x&gt;" in page
    assert 'src="data:image/png;base64,' in page
    visible = "".join(_visible(page).text)
    for marker in ("**", "`", "|---"):
        assert marker not in visible
    assert_self_contained(page)
    assert 'class="num best"' in page and 'class="reference"' in page


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mmcst.data.base import build_dataset

    root = tmp_path_factory.mktemp("report_data")
    return build_dataset("synthetic", root, "val", n_train=4, n_val=8, size=96, seed=0, workers=1)


def _payload(page: str, key: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, flags=re.S)
    assert match
    return json.loads(match.group(1))["explorers"][key]


def test_eval_writes_a_page_keyed_into_its_json(synthetic_val: Any, tmp_path: Path):
    """``evaluate_maps(out=X.json)`` (what ``mmcst eval --out X.json`` runs) writes X.html beside X.json."""
    from mmcst.engine.evaluate import evaluate_maps
    from mmcst.io import load_map, save_label_png
    from mmcst.reference import write_reference_maps

    maps_dir = write_reference_maps(synthetic_val, tmp_path / "centre" / "maps" / "val", "centre", progress=False)
    out = tmp_path / "eval" / "centre.json"
    result = evaluate_maps(maps_dir, synthetic_val, out=out, progress=False)
    page = out.with_suffix(".html").read_text()
    assert {p.name for p in out.parent.iterdir()} == {"centre.json", "centre.md", "centre_curve.png", "centre.html"}
    seen = _visible(page)
    assert_cells_show(seen.cells, result)
    assert len(seen.cells) == 2 * 2 + 3 * 21  # threshold and mIoU of two points; IoU, precision, recall of 21 classes
    assert_self_contained(page)
    payload = _payload(page, "eval")
    (method,) = payload["methods"]
    assert method["name"] == "centre" and method["threshold"] == result["best"]["threshold"]
    assert [p[1] for p in method["curve"]] == [p["miou"] for p in result["miou_curve"]]
    assert len(method["maps"]) == 6 and page.count('class="gallery-row"') == 6
    keys, cam = load_map(maps_dir / f"{synthetic_val.ids[0]}.npy")
    first = method["maps"][0]
    assert first["keys"] == keys.tolist() and (first["height"], first["width"]) == (64, 64)
    stored = np.frombuffer(base64.b64decode(first["data"]), np.uint8).reshape(len(keys), 64, 64)
    assert np.array_equal(stored, reduce_maps(cam))

    # Label maps: the page shows them as they are, without a threshold.
    labels_dir = tmp_path / "labels"
    for index, image_id in enumerate(synthetic_val.ids):
        save_label_png(labels_dir / f"{image_id}.png", np.where(synthetic_val.get_mask(index) == 255, 0,
                                                                 synthetic_val.get_mask(index)))
    result = evaluate_maps(labels_dir, synthetic_val, out=tmp_path / "labels.json", progress=False)
    page = (tmp_path / "labels.html").read_text()
    assert_cells_show(_visible(page).cells, result)
    assert _payload(page, "eval")["methods"][0]["kind"] == "labels"


def test_demo_report_renders_every_table_from_report_json(synthetic_val: Any, tmp_path: Path):
    from mmcst.config import EvalConfig
    from mmcst.engine.evaluate import evaluate_maps
    from mmcst.reference import write_reference_maps

    results: dict[str, Any] = {"references": {}, "methods": {}}
    for kind in ("gt", "centre"):
        maps_dir = write_reference_maps(synthetic_val, tmp_path / kind, kind, progress=False)
        results["references"][kind] = {"result": evaluate_maps(maps_dir, synthetic_val, EvalConfig(), progress=False),
                                       "maps_dir": str(maps_dir)}
    centre = results["references"]["centre"]
    results["methods"]["mmcst"] = {  # stands in for a trained method: the report only reads these fields
        "result": centre["result"], "maps_dir": centre["maps_dir"], "run_dir": str(tmp_path), "train_seconds": 15.2,
        "infer_seconds": 2.4, "train_summary": {"steps": 20, "val_map": 0.166},
        "notes": ["`cls_token_loss=false`: why"],
        "config": {"backbone": "vit_small_patch16_224", "patch_size": 8, "input": 128}}
    results["stages"] = {"seed_miou": 12.5}  # later result kinds travel into report.json
    meta = {"quick": True, "budget": {"n_train": 4, "n_val": 8, "size": 96, "train_seconds": 15.0},
            "seed": 0, "data_seconds": 1.0, "total_seconds": 30.0, "dataset_root": str(synthetic_val.root),
            "class_names": list(synthetic_val.class_names), "chance_val_map": 0.17}
    summary = json.loads(json.dumps(demo_summary(results, meta)))  # what report.json holds
    assert summary["methods"]["mmcst"]["steps"] == 20 and summary["methods"]["mmcst"]["val_map_percent"] == 16.6
    assert summary["stages"] == {"seed_miou": 12.5} and summary["verdict"].startswith("MMCST")

    markdown = write_demo_report(tmp_path, synthetic_val, summary)
    page = (tmp_path / "report.html").read_text()
    assert (tmp_path / "report.html").stat().st_size < MAX_HTML_BYTES
    seen = _visible(page)
    assert_cells_show(seen.cells, summary)
    shown = {tuple(key) for key, _ in seen.cells}
    for field in ("best_miou", "mctformer_miou", "train_seconds", "steps", "val_map_percent", "infer_seconds"):
        assert ("methods", "mmcst", field) in shown
    assert ("references", "centre", "per_class_iou", "background") in shown
    visible = "".join(seen.text)
    assert "random weights" in visible and "**" not in visible and "`" not in visible
    assert_self_contained(page)
    payload = _payload(page, "demo")
    assert [m["name"] for m in payload["methods"]] == ["mmcst", "centre prior"]
    assert all(e["height"] <= 64 and e["width"] <= 64 for m in payload["methods"] for e in m["maps"])

    text = markdown.read_text()
    assert "![mIoU against background threshold](curves.png)" in text and "(overlays.png)" in text
    for name in ("curves.png", "overlays.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| mmcst | 128 px in, patch 8 | {summary['methods']['mmcst']['best_threshold']:.2f} |" in text
    assert html.escape("<") not in text
