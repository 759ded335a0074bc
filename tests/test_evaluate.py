"""evaluate_maps end to end on map files written in the real formats, against brute-force references."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from mmcst.config import EvalConfig
from mmcst.data.base import DatasetError
from mmcst.engine.evaluate import evaluate_maps, format_result
from mmcst.io import save_label_png, save_map
from mmcst.metrics.wsol import PxAPAccumulator, prepare_openimages_map, resize_mask_nearest


class FakeDataset:
    """The non-decoding accessors evaluation uses, over in-memory masks and labels."""

    name = "fake"

    def __init__(self, masks: list[Optional[np.ndarray]], labels: np.ndarray, class_names: list[str],
                 task: Optional[str] = None) -> None:
        self.ids = [f"img_{i:03d}" for i in range(len(masks))]
        self.split = "train"
        self.class_names = class_names
        self.masks, self.labels = masks, labels
        if task is not None:
            self.task = task

    def get_mask(self, i: int) -> Optional[np.ndarray]:
        return self.masks[i]

    def get_labels(self, i: int) -> np.ndarray:
        return self.labels[i]

    def has_masks(self) -> bool:
        return any(m is not None for m in self.masks)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "split_file": "ImageSets/Segmentation/train.txt",
                "num_images": len(self.ids)}


def make_voc_like(tmp_path: Path, count: int = 6, num_fg: int = 3, seed: int = 0):
    """Blob GT and float16 map files (stored like mmcst's inference) with maps peaking inside the blobs."""
    rng = np.random.default_rng(seed)
    masks, labels, maps = [], [], []
    yy, xx = np.mgrid[:20, :28]
    for _ in range(count):
        mask = np.zeros((20, 28), np.uint8)
        present = np.sort(rng.choice(num_fg, size=rng.integers(1, 3), replace=False))
        cams = []
        for key in present:
            cy, cx = rng.integers(4, 16), rng.integers(4, 24)
            blob = np.hypot(yy - cy, xx - cx) < 5
            mask[blob] = key + 1
            cams.append(np.clip(1 - np.hypot(yy - cy, xx - cx) / 9 + rng.normal(0, 0.1, mask.shape), 0, 1))
        mask[0, :3] = 255
        masks.append(mask)
        label = np.zeros(num_fg, np.float32)
        label[present] = 1
        labels.append(label)
        maps.append((present, np.stack(cams)))
    dataset = FakeDataset(masks, np.stack(labels), [f"c{i}" for i in range(num_fg)])
    maps_dir = tmp_path / "maps"
    for image_id, (keys, cam) in zip(dataset.ids, maps):
        save_map(maps_dir / f"{image_id}.npy", keys, cam)
    return dataset, maps_dir


def brute_miou(dataset: FakeDataset, maps_dir: Path, t: float) -> float:
    num = len(dataset.class_names) + 1
    confusion = np.zeros((num, num), np.int64)
    for i, image_id in enumerate(dataset.ids):
        stored = np.load(maps_dir / f"{image_id}.npy", allow_pickle=True).item()
        gt = dataset.get_mask(i)
        stack = np.zeros((num,) + gt.shape, np.float32)
        stack[np.asarray(stored["keys"]) + 1] = stored["cam"]
        stack[0] = t
        pred = np.argmax(stack, axis=0)
        valid = gt != 255
        np.add.at(confusion, (gt[valid], pred[valid]), 1)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]) * 100)


def test_curve_result_matches_brute_force_and_writes_outputs(tmp_path):
    dataset, maps_dir = make_voc_like(tmp_path)
    cfg = EvalConfig(threshold_start=0.0, threshold_stop=0.9, threshold_step=0.1)
    out = tmp_path / "eval" / "train.json"
    result = evaluate_maps(maps_dir, dataset, cfg, out=out, progress=False)

    protocol = result["protocol"]
    assert protocol["num_images"] == 6 and protocol["num_thresholds"] == 10
    assert protocol["grid"] == [0.0, 0.9, 0.1] and protocol["ties"] == "background"
    assert protocol["split_file"] == "ImageSets/Segmentation/train.txt" and protocol["map_key"] == "cam"
    for point in result["miou_curve"]:
        assert point["miou"] == pytest.approx(brute_miou(dataset, maps_dir, point["threshold"]), abs=1e-9)
    best = max(result["miou_curve"], key=lambda p: p["miou"])
    assert result["best"]["threshold"] == best["threshold"] and result["best"]["miou"] == best["miou"]
    assert set(result["best"]["per_class_iou"]) == {"background", "c0", "c1", "c2"}
    mct = result["mctformer_protocol"]
    assert mct["miou"] == pytest.approx(brute_miou(dataset, maps_dir, mct["threshold"]), abs=1e-9)

    assert json.loads(out.read_text())["best"]["miou"] == result["best"]["miou"]
    markdown = (tmp_path / "eval" / "train.md").read_text()
    assert "MCTformer protocol" in markdown and "| c1 |" in markdown and "split file" in markdown
    assert (tmp_path / "eval" / "train_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best of the full sweep" in format_result(result)


def test_power_rule_result(tmp_path):
    dataset, maps_dir = make_voc_like(tmp_path, count=3)
    cfg = EvalConfig(threshold_step=0.05, bg_rule="power", bg_power=2.0)
    result = evaluate_maps(maps_dir, dataset, cfg, progress=False)
    power = result["power_rule"]
    assert result["protocol"]["bg_power"] == 2.0
    # (1 - m)^2 >= m  <=>  m <= (3 - sqrt(5)) / 2
    assert power["equivalent_threshold"] == pytest.approx((3 - 5**0.5) / 2, abs=1e-6)
    assert power["miou"] == pytest.approx(brute_miou(dataset, maps_dir, power["equivalent_threshold"]), abs=1e-9)


def test_missing_maps_error_and_allow_missing(tmp_path):
    dataset, maps_dir = make_voc_like(tmp_path)
    for image_id in dataset.ids[:4]:
        (maps_dir / f"{image_id}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"4 of 6 images have no \.npy map file \(img_000, img_001"):
        evaluate_maps(maps_dir, dataset, progress=False)
    result = evaluate_maps(maps_dir, dataset, progress=False, allow_missing=True)
    assert result["protocol"]["num_images"] == 2 and result["protocol"]["num_missing"] == 4


def test_bad_maps_name_the_file(tmp_path):
    dataset, maps_dir = make_voc_like(tmp_path, count=2)
    save_map(maps_dir / "img_001.npy", [0], np.zeros((1, 10, 10)))
    with pytest.raises(ValueError, match=r"img_001\.npy: map size \(10, 10\) differs"):
        evaluate_maps(maps_dir, dataset, progress=False)
    save_map(maps_dir / "img_001.npy", [5], np.zeros((1, 20, 28)))
    with pytest.raises(ValueError, match=r"img_001\.npy: class keys \[5\] outside 0..2"):
        evaluate_maps(maps_dir, dataset, progress=False)
    no_masks = FakeDataset([None, None], dataset.labels, dataset.class_names)
    with pytest.raises(DatasetError, match="no ground-truth masks"):
        evaluate_maps(maps_dir, no_masks, progress=False)


def test_mctformer_dict_maps(tmp_path):
    dataset, maps_dir = make_voc_like(tmp_path, count=3)
    mct_dir = tmp_path / "mct"
    mct_dir.mkdir()
    for image_id in dataset.ids:
        stored = np.load(maps_dir / f"{image_id}.npy", allow_pickle=True).item()
        as_dict = {int(k): c.astype(np.float32) for k, c in zip(stored["keys"], stored["cam"])}
        np.save(mct_dir / f"{image_id}.npy", as_dict, allow_pickle=True)
    ours = evaluate_maps(maps_dir, dataset, progress=False)
    theirs = evaluate_maps(mct_dir, dataset, progress=False)
    assert ours["miou_curve"] == theirs["miou_curve"]


def test_png_label_maps(tmp_path):
    dataset, _ = make_voc_like(tmp_path, count=3)
    png_dir = tmp_path / "pseudo"
    rng = np.random.default_rng(1)
    expected = np.zeros((4, 4), np.int64)
    for i, image_id in enumerate(dataset.ids):
        gt = dataset.get_mask(i)
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 4, gt.shape)).astype(np.uint8)
        pred[pred == 255] = 0
        save_label_png(png_dir / f"{image_id}.png", pred)
        valid = gt != 255
        np.add.at(expected, (gt[valid], pred[valid]), 1)
    result = evaluate_maps(png_dir, dataset, progress=False, out=tmp_path / "png.json")
    tp = np.diag(expected)
    assert result["best"]["miou"] == pytest.approx(np.mean(tp / (expected.sum(0) + expected.sum(1) - tp)) * 100)
    assert result["protocol"]["map_format"] == "png" and "miou_curve" not in result
    assert "label maps" in (tmp_path / "png.md").read_text()


def test_openimages_pxap_piou(tmp_path):
    rng = np.random.default_rng(2)
    masks, labels, maps_dir = [], [], tmp_path / "maps"
    expected = PxAPAccumulator(step=0.01)
    for i in range(4):
        mask = np.zeros((60, 50), np.uint8)
        cls = i % 3
        mask[10:40, 5 + i: 30 + i] = cls + 1
        mask[45:, :] = 255
        masks.append(mask)
        label = np.zeros(3, np.float32)
        label[cls] = 1
        labels.append(label)
        cam = np.clip((mask == cls + 1) * 0.6 + rng.random((30, 25)).repeat(2, 0).repeat(2, 1) * 0.5, 0, 1)
        keys = [cls, (cls + 1) % 3]
        save_map(maps_dir / f"img_{i:03d}.npy", keys, np.stack([cam, 1 - cam]))
        stored = np.load(maps_dir / f"img_{i:03d}.npy", allow_pickle=True).item()["cam"][0]
        small = resize_mask_nearest(mask, 224)
        expected.update(prepare_openimages_map(stored), (small != 0) & (small != 255), small == 255)
    dataset = FakeDataset(masks, np.stack(labels), ["a", "b", "c"], task="wsol")
    result = evaluate_maps(maps_dir, dataset, EvalConfig(wsol_step=0.01), out=tmp_path / "oi.json", progress=False)
    assert result["pxap"] == pytest.approx(expected.pxap()) and result["piou"] == pytest.approx(expected.piou())
    assert 50 < result["pxap"] <= 100
    assert result["protocol"]["threshold_step"] == 0.01
    assert "PxAP" in (tmp_path / "oi.md").read_text() and (tmp_path / "oi_curve.png").is_file()

    perfect_dir = tmp_path / "perfect"
    for i, mask in enumerate(masks):  # a binary map at 224 x 224 needs no interpolation: exactly perfect
        small = resize_mask_nearest(mask, 224)
        save_map(perfect_dir / f"img_{i:03d}.npy", [int(np.argmax(labels[i]))], ((small != 0) & (small != 255))[None])
    perfect = evaluate_maps(perfect_dir, dataset, progress=False)
    assert perfect["pxap"] == pytest.approx(100.0) and perfect["piou"] == pytest.approx(100.0)
