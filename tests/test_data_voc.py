from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import H, VOC_IDS, W, make_voc, voc_mask, write_voc_xml

from mmcst.data.base import VOC_CLASSES, DatasetError
from mmcst.data.voc import VOCDataset, load_cls_labels
from mmcst.io import save_label_png

PERSON, CAR, DOG = VOC_CLASSES.index("person"), VOC_CLASSES.index("car"), VOC_CLASSES.index("dog")


def _multi_hot(*indices: int) -> np.ndarray:
    labels = np.zeros(20, np.float32)
    labels[list(indices)] = 1.0
    return labels


def test_train_split_labels_from_xml_masks_and_items(tmp_path: Path) -> None:
    ds = VOCDataset(make_voc(tmp_path), "train")
    assert ds.ids == VOC_IDS[:2] and len(ds) == 2 and ds.class_names == list(VOC_CLASSES)
    # XML names win over the mask (image 1's mask lacks the 'difficult' dog)
    np.testing.assert_array_equal(ds.get_labels(0), _multi_hot(PERSON))
    np.testing.assert_array_equal(ds.get_labels(1), _multi_hot(PERSON, CAR, DOG))
    assert ds.has_masks()
    np.testing.assert_array_equal(ds.get_mask(1), voc_mask(1))
    item = ds[1]
    assert item["id"] == VOC_IDS[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, H, W)
    assert item["labels"].dtype == torch.float32 and item["labels"].tolist() == _multi_hot(PERSON, CAR, DOG).tolist()
    assert item["mask"].dtype == torch.int64 and torch.equal(item["mask"], torch.from_numpy(voc_mask(1)).long())
    np.testing.assert_array_equal(ds.label_matrix(), np.stack([_multi_hot(PERSON), _multi_hot(PERSON, CAR, DOG)]))
    assert ds.image_path(0) == tmp_path / "VOC2012" / "JPEGImages" / f"{VOC_IDS[0]}.jpg"
    with pytest.raises(IndexError):
        ds[2]


def test_describe_names_protocol(tmp_path: Path) -> None:
    ds = VOCDataset(make_voc(tmp_path, aug_masks=True), "train")
    info = ds.describe()
    assert info["split_file"].endswith("ImageSets/Segmentation/train.txt")
    assert info["images"] == 2 and info["classes"] == 20
    assert info["mask_source"].endswith("SegmentationClassAug")  # preferred over SegmentationClass
    assert "xml" in info["label_source"]


def test_train_aug_list_and_label_fallbacks(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    ds = VOCDataset(voc, "train_aug")
    assert ds.ids == VOC_IDS  # parsed from the DeepLab list format at <root>/train_aug.txt
    assert not ds.has_masks() and ds.get_mask(2) is None
    with pytest.raises(DatasetError, match=f"{VOC_IDS[2]}.xml"):
        ds.get_labels(2)  # no XML and no mask
    by_mask = VOCDataset(voc, "train", labels_source="mask")
    np.testing.assert_array_equal(by_mask.get_labels(1), _multi_hot(PERSON, CAR))


@pytest.mark.parametrize("int_keys", [False, True])
def test_psa_cls_labels(tmp_path: Path, int_keys: bool) -> None:
    voc = make_voc(tmp_path)
    table = {VOC_IDS[0]: _multi_hot(3), VOC_IDS[1]: _multi_hot(4, 5), VOC_IDS[2]: _multi_hot(19)}
    if int_keys:
        table = {int(k.replace("_", "")): v for k, v in table.items()}
    np.save(tmp_path / "cls_labels.npy", table, allow_pickle=True)
    ds = VOCDataset(voc, "train_aug", labels_file=tmp_path / "cls_labels.npy")
    np.testing.assert_array_equal(ds.get_labels(2), _multi_hot(19))
    np.testing.assert_array_equal(ds.get_labels(1), _multi_hot(4, 5))
    assert "cls_labels.npy" in ds.describe()["label_source"]
    assert set(load_cls_labels(tmp_path / "cls_labels.npy", 20)) == set(VOC_IDS)


def test_class_names_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    names = list(VOC_CLASSES)
    (voc / "class_names.txt").write_text("\n".join(names[:11]) + "\n")
    ds = VOCDataset(voc, "train")
    assert ds.class_names == names[:11]
    assert ds.describe()["class_names_file"].endswith("class_names.txt")
    with pytest.raises(DatasetError, match=f"{VOC_IDS[1]}.xml.*'person'"):
        ds.get_labels(1)  # person is not among the first 11 classes


def test_errors_name_the_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="ImageSets/Segmentation/trainval.txt"):
        VOCDataset(voc, "trainval")
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCDataset(tmp_path / "nowhere", "train")
    write_voc_xml(voc / "Annotations" / f"{VOC_IDS[0]}.xml", ["person", "unicorn"])
    with pytest.raises(DatasetError, match=f"{VOC_IDS[0]}.xml.*'unicorn'"):
        VOCDataset(voc, "train").get_labels(0)
    (voc / "Annotations" / f"{VOC_IDS[0]}.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=f"{VOC_IDS[0]}.xml: malformed"):
        VOCDataset(voc, "train").get_labels(0)
    bad = voc_mask(0)
    bad[0, 0] = 21
    save_label_png(voc / "SegmentationClass" / f"{VOC_IDS[0]}.png", bad)
    with pytest.raises(DatasetError, match=rf"{VOC_IDS[0]}.png: mask values \[21\] outside 0..20"):
        VOCDataset(voc, "train").get_mask(0)
    np.save(tmp_path / "short.npy", {VOC_IDS[0]: np.ones(5)}, allow_pickle=True)
    with pytest.raises(DatasetError, match="short.npy.*5 entries, expected 20"):
        VOCDataset(voc, "train", labels_file=tmp_path / "short.npy")
    np.save(tmp_path / "partial.npy", {VOC_IDS[0]: np.ones(20)}, allow_pickle=True)
    with pytest.raises(DatasetError, match="partial.npy: no labels for 1 images"):
        VOCDataset(voc, "train", labels_file=tmp_path / "partial.npy")


def test_rgb_mask_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    voc = make_voc(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "SegmentationClass" / f"{VOC_IDS[0]}.png")
    with pytest.raises(DatasetError, match=f"{VOC_IDS[0]}.png: expected a palette or greyscale"):
        VOCDataset(voc, "train").get_mask(0)
