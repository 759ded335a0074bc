from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import H, W, coco_expected_masks, make_coco

from mmcst.data.base import DatasetError
from mmcst.data.coco import COCODataset, render_coco_semantic
from mmcst.io import load_label_png


def test_classes_ids_labels(tmp_path: Path) -> None:
    ds = COCODataset(make_coco(tmp_path), "val")  # alias of val2014
    assert ds.split == "val2014"
    assert ds.class_names == ["person", "car", "dog"]  # sorted category id order 1, 3, 18
    assert ds.category_ids == [1, 3, 18]
    assert ds.ids == ["COCO_val2014_000000000042", "COCO_val2014_000000000073", "COCO_val2014_000000000090"]
    # crowd-only person on image 73 still counts as present; image 90 has no annotations
    expected = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0]], np.float32)
    np.testing.assert_array_equal(ds.label_matrix(), expected)
    np.testing.assert_array_equal(ds.get_labels(1), expected[1])
    assert ds.has_masks()
    info = ds.describe()
    assert info["images"] == 3 and info["images_without_annotations"] == 1
    assert info["split_file"].endswith("annotations/instances_val2014.json")
    assert "largest area first" in info["mask_source"]


def test_semantic_rendering_matches_hand_computed(tmp_path: Path) -> None:
    ds = COCODataset(make_coco(tmp_path), "val2014")
    expected = coco_expected_masks()
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds.get_mask(i), expected[image_id], err_msg=image_id)
        # cached as a palette PNG at the documented place
        png = tmp_path / "mmcst_semantic" / "val2014" / f"{image_id}.png"
        np.testing.assert_array_equal(load_label_png(png), expected[image_id])
    item = ds[0]
    assert item["image"].shape == (3, H, W) and item["mask"].dtype == torch.int64
    assert torch.equal(item["mask"], torch.from_numpy(expected[ds.ids[0]]).long())


def test_cache_reuse_and_invalidation(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    out = tmp_path / "gt"
    assert render_coco_semantic(root, "val2014", out_dir=out) == 3
    assert render_coco_semantic(root, "val2014", out_dir=out) == 0  # resumable: nothing left to do
    # a cached PNG is read, not re-rendered
    from mmcst.io import save_label_png

    fake = np.full((H, W), 2, np.uint8)
    save_label_png(out / "COCO_val2014_000000000090.png", fake)
    np.testing.assert_array_equal(COCODataset(root, "val2014", cache_dir=out).get_mask(2), fake)
    # editing the annotation file invalidates the cache
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 42]
    ann.write_text(json.dumps(data))
    ds = COCODataset(root, "val2014", cache_dir=out)
    np.testing.assert_array_equal(ds.get_mask(2), np.zeros((H, W), np.uint8))
    np.testing.assert_array_equal(ds.get_mask(0), np.zeros((H, W), np.uint8))


def test_unwritable_cache_falls_back_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_coco(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    ds = COCODataset(root, "val2014", cache_dir=blocker / "gt")
    expected = coco_expected_masks()
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds.get_mask(i), expected[image_id])
    assert sum("cannot cache rendered semantic masks" in r.message for r in caplog.records) == 1
    with pytest.raises(DatasetError, match="cannot write the semantic-mask cache"):
        render_coco_semantic(root, "val2014", out_dir=blocker / "gt")


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    with pytest.raises(DatasetError, match="instances_train2014.json: COCO instances JSON not found"):
        COCODataset(root, "train")
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="instances_val2014.json: annotation 1 has category_id 99"):
        COCODataset(root, "val2014")
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2014.json: not valid JSON"):
        COCODataset(root, "val2014")
