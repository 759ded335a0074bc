"""The procedural dataset: VOC layout on disk, determinism, the completion marker, the dataset contract."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcst.data.base import DatasetError, build_dataset
from mmcst.data.synthetic import (
    CLASS_SPECS,
    MARKER_NAME,
    _SHAPES,
    _boundary_band,
    _part_sdf,
    generate_synthetic,
    render_sample,
    synthetic_class_names,
)

N_TRAIN, N_VAL, SIZE = 20, 20, 96
PARAMS = dict(n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3, workers=1, progress=False)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), **PARAMS)


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER_NAME}


def test_layout_files_exist_and_parse(voc_root: Path) -> None:
    names = (voc_root / "class_names.txt").read_text().split()
    assert names == synthetic_class_names() and len(names) == 20
    train, val = _ids(voc_root, "train"), _ids(voc_root, "val")
    assert len(train) == N_TRAIN and len(val) == N_VAL and not set(train) & set(val)
    assert _ids(voc_root, "trainval") == train + val
    assert (voc_root / "ImageSets" / "Main" / "val.txt").read_text().split() == val
    for image_id in train + val:
        assert image_id.startswith("synth_")
        with Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
        with Image.open(voc_root / "SegmentationClass" / f"{image_id}.png") as png:
            assert png.mode == "P"
            mask = np.asarray(png)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255}
        assert 255 in values  # the boundary band

        root = ET.parse(voc_root / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("filename") == f"{image_id}.jpg"
        assert (root.findtext("size/width"), root.findtext("size/height"), root.findtext("size/depth")) == (
            str(SIZE), str(SIZE), "3")
        objects = root.findall("object")
        assert 1 <= len(objects) <= 4
        xml_classes = set()
        for obj in objects:
            cls = names.index(obj.findtext("name")) + 1
            xml_classes.add(cls)
            assert obj.findtext("difficult") == "0" and obj.findtext("truncated") in ("0", "1")
            xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= SIZE and 1 <= ymin <= ymax <= SIZE
            # VOC boxes are 1-based and inclusive; the class has pixels inside the box.
            assert (mask[ymin - 1:ymax, xmin - 1:xmax] == cls).any()
        assert xml_classes == values - {0, 255}, image_id


def test_marker_counts_match_annotations_and_every_class_is_in_both_splits(voc_root: Path) -> None:
    marker = json.loads((voc_root / MARKER_NAME).read_text())
    assert marker["params"]["n_train"] == N_TRAIN and marker["params"]["size"] == SIZE
    names = marker["class_names"]
    for split in ("train", "val"):
        instances = dict.fromkeys(names, 0)
        for image_id in _ids(voc_root, split):
            for obj in ET.parse(voc_root / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
                instances[obj.findtext("name")] += 1
        assert marker["counts"][split]["class_instances"] == instances
        assert marker["counts"][split]["images"] == (N_TRAIN if split == "train" else N_VAL)
        assert min(marker["counts"][split]["class_images"].values()) >= 1, split
    per_class = (voc_root / "ImageSets" / "Main" / f"{names[0]}_train.txt").read_text().splitlines()
    assert len(per_class) == N_TRAIN and all(line.split()[1] in ("1", "-1") for line in per_class)


def test_boundary_band_and_separation(voc_root: Path) -> None:
    for image_id in _ids(voc_root, "val")[:6]:
        mask = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png"))
        # Two different labels never touch: the 255 band lies between them, as in VOC.
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), image_id


def test_boundary_band_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    instances = (rng.random((9, 11)) < 0.3).astype(np.int32) * rng.integers(1, 4, (9, 11))
    expected = np.zeros(instances.shape, bool)
    h, w = instances.shape
    for y in range(h):
        for x in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    expected[y, x] |= instances[yy, xx] != instances[y, x]
    np.testing.assert_array_equal(_boundary_band(instances), expected)


def test_pairs_share_a_body_and_differ_in_a_small_part() -> None:
    grid = np.linspace(-1, 1, 401, dtype=np.float32)
    u, v = np.meshgrid(grid, grid)
    pairs: dict[str, list[int]] = {}
    for index, spec in enumerate(CLASS_SPECS):
        body = _SHAPES[spec.shape](u, v, float(np.mean(spec.aspect)))
        # Every silhouette fits in the unit disc: the renderer's 2R window holds it at any rotation.
        assert not ((body < 0) & (np.hypot(u, v) > 1.0)).any(), spec.name
        if spec.part is not None:
            pairs.setdefault(spec.shape, []).append(index)
            part = _part_sdf(u, v, spec.part) < 0
            fraction = (part & (body >= 0)).sum() / (part | (body < 0)).sum()
            assert 0.05 <= fraction <= 0.15, (spec.name, fraction)
    assert len(pairs) >= 3
    for members in pairs.values():
        a, b = (CLASS_SPECS[i] for i in members)
        assert len(members) == 2
        assert (a.shape, a.texture, a.hue, a.sat, a.val, a.aspect) == (b.shape, b.texture, b.hue, b.sat, b.val, b.aspect)
        assert (a.part.hue, a.part.sat, a.part.val) != (b.part.hue, b.part.sat, b.part.val)


def test_deterministic_whatever_the_worker_count(tmp_path: Path) -> None:
    params = dict(n_train=6, n_val=4, size=64, seed=11, progress=False)
    one = _file_bytes(generate_synthetic(tmp_path / "one", workers=1, **params))
    two = _file_bytes(generate_synthetic(tmp_path / "two", workers=2, **params))
    assert one.keys() == two.keys() and len(one) > 30
    assert one == two
    other = render_sample(12, "train", 0, 64).label
    assert not np.array_equal(render_sample(11, "train", 0, 64).label, other)
    np.testing.assert_array_equal(render_sample(12, "train", 0, 64).label, other)


def test_marker_logic(tmp_path: Path) -> None:
    params = dict(n_train=4, n_val=3, size=64, seed=5, workers=1, progress=False)
    root = generate_synthetic(tmp_path, **params)
    marker = root / MARKER_NAME
    stamp = marker.stat().st_mtime_ns
    reference = _file_bytes(root)

    # Same parameters, marker present: nothing is rewritten.
    assert generate_synthetic(tmp_path, **params) == root
    assert marker.stat().st_mtime_ns == stamp

    # An interrupted run (no marker, a stray half-written file): cleared and written again.
    marker.unlink()
    (root / "JPEGImages" / "synth_000999.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "SegmentationClass" / "synth_000000.png").unlink()
    generate_synthetic(tmp_path, **params)
    assert marker.is_file()
    assert _file_bytes(root) == reference

    # Different parameters: regenerated for the new ones.
    generate_synthetic(tmp_path, **{**params, "seed": 6})
    assert json.loads(marker.read_text())["params"]["seed"] == 6
    assert _file_bytes(root) != reference


def test_refuses_to_clear_a_folder_it_did_not_write(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"real data")
    with pytest.raises(DatasetError, match="2007_000032.jpg"):
        generate_synthetic(tmp_path, n_train=2, n_val=2, size=64, workers=1, progress=False)
    assert (root / "JPEGImages" / "2007_000032.jpg").read_bytes() == b"real data"


def test_build_dataset_returns_contract_samples(voc_root: Path) -> None:
    cache = voc_root.parent.parent
    dataset = build_dataset("synthetic", cache, "val", **{k: v for k, v in PARAMS.items() if k != "progress"})
    assert dataset.class_names == synthetic_class_names()
    assert len(dataset) == N_VAL
    for i in (0, len(dataset) - 1):
        sample = dataset[i]
        assert sample["id"] == _ids(voc_root, "val")[i]
        image, labels, mask = sample["image"], sample["labels"], sample["mask"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, SIZE, SIZE)
        assert labels.dtype == torch.float32 and tuple(labels.shape) == (20,)
        assert mask is not None and mask.dtype == torch.long and tuple(mask.shape) == (SIZE, SIZE)
        present = set(torch.unique(mask).tolist()) - {0, 255}
        assert {int(c) + 1 for c in torch.nonzero(labels).flatten()} == present
