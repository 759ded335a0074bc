from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import H, W, make_folder

from mmcst.data.base import DatasetError
from mmcst.data.folder import FolderDataset


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_all_split_labels_and_masks(tmp_path: Path, fmt: str) -> None:
    ds = FolderDataset(make_folder(tmp_path, fmt), "all")
    assert ds.class_names == ["cat", "dog"]  # sorted union
    assert ds.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.label_matrix(), np.array([[1, 1], [0, 0], [1, 0]], np.float32))
    assert not ds.has_masks()  # only a has one
    assert ds.get_mask(1) is None
    expected = np.zeros((H, W), np.uint8)
    expected[2:10, 2:10] = 2
    np.testing.assert_array_equal(ds.get_mask(0), expected)
    item = ds[2]
    assert item["id"] == "c" and item["image"].shape == (3, H, W) and item["mask"] is None
    assert ds[1]["image"].dtype == torch.uint8  # the PNG image decodes to RGB uint8 too
    assert ds.image_path(2) == tmp_path / "images" / "sub" / "c.jpg"
    assert ds.describe()["label_source"].endswith(f"labels.{fmt}")


def test_split_file_and_classes_txt(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    (root / "classes.txt").write_text("dog\ncat\nbird\n")
    ds = FolderDataset(root, "val")
    assert ds.ids == ["c", "a"]  # split order; entries by name or stem
    assert ds.class_names == ["dog", "cat", "bird"]
    np.testing.assert_array_equal(ds.label_matrix(), np.array([[0, 1, 0], [1, 1, 0]], np.float32))
    assert ds.describe()["split_file"].endswith("splits/val.txt")


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    with pytest.raises(DatasetError, match="splits/test.txt: split file not found"):
        FolderDataset(root, "test")
    (root / "classes.txt").write_text("dog\n")
    with pytest.raises(DatasetError, match=r"labels.csv: image 'a.jpg' has labels \['cat'\]"):
        FolderDataset(root)
    (root / "classes.txt").unlink()
    (root / "labels.csv").write_text("file,tags\na.jpg,dog\n")
    with pytest.raises(DatasetError, match="labels.csv: expected a header 'image,labels'"):
        FolderDataset(root)
    (root / "labels.csv").unlink()
    with pytest.raises(DatasetError, match="labels.csv: labels not found"):
        FolderDataset(root)
    (root / "labels.json").write_text('{"a.jpg": "dog"}')
    with pytest.raises(DatasetError, match="labels.json: expected"):
        FolderDataset(root)
