from __future__ import annotations

from pathlib import Path

import numpy as np
from fixtures_data import H, VOC_IDS, W, make_coco, make_folder, make_openimages, make_voc, voc_mask, write_voc_xml

from mmcst.data.check import check_dataset, export_labels, format_report
from mmcst.data.folder import FolderDataset
from mmcst.data.voc import VOCDataset, load_cls_labels
from mmcst.io import save_label_png


def test_clean_voc_split(tmp_path: Path) -> None:
    report = check_dataset("voc", make_voc(tmp_path), "train")
    assert report.ok, report.problems
    assert report.n_images == 2 and report.n_with_masks == 2 and report.n_without_labels == 0
    assert report.class_counts["person"] == 2 and report.class_counts["car"] == 1
    assert report.class_counts["dog"] == 1 and report.class_counts["cat"] == 0
    text = format_report(report)
    assert "images: 2" in text and "no problems found" in text and "ImageSets/Segmentation/train.txt" in text


def test_every_kind_of_problem_is_reported_with_its_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    jpeg = voc / "JPEGImages" / f"{VOC_IDS[0]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    (voc / "JPEGImages" / f"{VOC_IDS[2]}.jpg").unlink()  # listed in train_aug but missing
    write_voc_xml(voc / "Annotations" / f"{VOC_IDS[1]}.xml", ["person", "unicorn"])
    bad = voc_mask(1)
    bad[0, 0] = 40
    save_label_png(voc / "SegmentationClass" / f"{VOC_IDS[1]}.png", bad)
    save_label_png(voc / "SegmentationClass" / f"{VOC_IDS[0]}.png", np.zeros((H + 1, W), np.uint8))
    report = check_dataset("voc", voc, "train_aug")
    problems = {(Path(p).name, m.split(" (")[0]) for p, m in report.problems}
    assert (f"{VOC_IDS[0]}.jpg", "unreadable or truncated image") in problems
    assert (f"{VOC_IDS[2]}.jpg", "listed in the split but the image file is missing") in problems
    assert any(p == f"{VOC_IDS[1]}.xml" and "'unicorn'" in m for p, m in problems)
    assert (f"{VOC_IDS[1]}.png", "mask values [40] outside 0..20") in problems
    # image 2 has neither XML nor mask: missing annotation
    assert any(p == f"{VOC_IDS[2]}.xml" and "annotation XML not found" in m for p, m in problems)
    assert len(report.problems) == 5, report.problems
    # the size mismatch needs a readable image: restore image 0 and check again
    from fixtures_data import write_jpeg

    write_jpeg(jpeg, seed=0)
    report = check_dataset("voc", voc, "train")
    assert any(Path(p).name == f"{VOC_IDS[0]}.png" and f"mask is {W}x{H + 1}" in m for p, m in report.problems)
    text = format_report(report)
    assert "problem(s):" in text and f"{VOC_IDS[0]}.png" in text


def test_unopenable_dataset_is_one_problem(tmp_path: Path) -> None:
    report = check_dataset("voc", make_voc(tmp_path), "trainval")
    assert len(report.problems) == 1 and report.problems[0][0].endswith("ImageSets/Segmentation/trainval.txt")
    assert not report.ok


def test_other_layouts(tmp_path: Path) -> None:
    coco = check_dataset("coco", make_coco(tmp_path / "coco"), "val2014")
    assert coco.ok and coco.n_with_masks == 3 and coco.n_without_labels == 1
    assert coco.class_counts == {"person": 2, "car": 1, "dog": 1}
    oi = check_dataset("openimages", make_openimages(tmp_path / "oi"), "test")
    assert oi.ok and oi.n_with_masks == 2
    folder = check_dataset("folder", make_folder(tmp_path / "folder"), "all")
    assert folder.ok and folder.n_with_masks == 1 and folder.class_counts == {"cat": 2, "dog": 1}


def test_export_labels_round_trip(tmp_path: Path) -> None:
    voc = make_voc(tmp_path)
    ds = VOCDataset(voc, "train")
    assert export_labels(ds, tmp_path / "out" / "cls_labels.npy") == 2
    table = load_cls_labels(tmp_path / "out" / "cls_labels.npy", 20)
    assert set(table) == set(VOC_IDS[:2])
    assert all(v.dtype == np.float32 for v in table.values())
    again = VOCDataset(voc, "train", labels_file=tmp_path / "out" / "cls_labels.npy")
    np.testing.assert_array_equal(again.label_matrix(), ds.label_matrix())
    folder = FolderDataset(make_folder(tmp_path / "f"))
    export_labels(folder, tmp_path / "f.npy")
    raw = np.load(tmp_path / "f.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(raw["a"], np.array([1, 1], np.float32))
