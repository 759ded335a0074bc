from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import H, OI_MIDS, W, make_openimages, openimages_expected_a1

from mmcst.data.base import DatasetError
from mmcst.data.openimages import OpenImagesDataset, read_localization


def test_test_split_labels_and_masks(tmp_path: Path) -> None:
    root = make_openimages(tmp_path)
    ds = OpenImagesDataset(root, "test")
    assert ds.ids == ["a1", "b2"]
    assert ds.class_names == OI_MIDS  # no class_names.txt: MIDs ordered by class index
    np.testing.assert_array_equal(ds.label_matrix(), np.array([[0, 0, 1], [1, 0, 0]], np.float32))
    np.testing.assert_array_equal(ds.get_labels(1), np.array([1, 0, 0], np.float32))
    assert ds.has_masks()
    np.testing.assert_array_equal(ds.get_mask(0), openimages_expected_a1())
    # image b2's mask is stored at twice the image size (top-left quarter set): resized (nearest) to the image
    expected_b2 = np.zeros((H, W), np.uint8)
    expected_b2[: H // 2, : W // 2] = 1
    np.testing.assert_array_equal(ds.get_mask(1), expected_b2)
    item = ds[0]
    assert item["image"].shape == (3, H, W) and item["mask"].dtype == torch.int64
    assert ds.image_path(0) == root / "OpenImages" / "test" / OI_MIDS[2] / "a1.jpg"
    info = ds.describe()
    assert info["split_file"].endswith("metadata/OpenImages/test/image_ids.txt")
    assert info["mask_source"].endswith("localization.txt") and info["has_masks"]


def test_train_split_has_no_masks_and_names_file(tmp_path: Path) -> None:
    ds = OpenImagesDataset(make_openimages(tmp_path, with_names=True), "train")
    assert ds.class_names == ["Snowman", "Ladybug", "Hot dog, frankfurter"]
    assert ds.mids == OI_MIDS
    assert not ds.has_masks() and ds.get_mask(0) is None
    assert ds.describe()["mask_source"] is None
    np.testing.assert_array_equal(ds.label_matrix(), np.eye(3, dtype=np.float32))


def test_localization_format(tmp_path: Path) -> None:
    path = tmp_path / "localization.txt"
    path.write_text("val/x/a.jpg,val/x/a_1.png,val/x/ignore/a.png\n"
                    "val/x/a.jpg,val/x/a_2.png,\n"
                    "val/y/b.jpg,val/y/b_1.png,\n")
    assert read_localization(path) == {"val/x/a.jpg": (["val/x/a_1.png", "val/x/a_2.png"], "val/x/ignore/a.png"),
                                       "val/y/b.jpg": (["val/y/b_1.png"], "")}
    path.write_text("val/x/a.jpg,val/x/a_1.png\n")
    with pytest.raises(DatasetError, match="localization.txt:1: expected"):
        read_localization(path)


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_openimages(tmp_path)
    with pytest.raises(DatasetError, match="metadata/OpenImages/val/image_ids.txt: metadata file not found"):
        OpenImagesDataset(root, "val")
    labels = root / "metadata" / "OpenImages" / "test" / "class_labels.txt"
    labels.write_text(labels.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match="test/class_labels.txt: no class label for 1 images"):
        OpenImagesDataset(root, "test")
    root2 = make_openimages(tmp_path / "second")
    (root2 / "OpenImages" / "test" / OI_MIDS[2] / f"a1_{OI_MIDS[2]}_i2.png").unlink()
    with pytest.raises(DatasetError, match=f"a1_{OI_MIDS[2]}_i2.png: mask PNG not found"):
        OpenImagesDataset(root2, "test").get_mask(0)
