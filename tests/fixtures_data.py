"""Writers of tiny datasets in the real on-disk layouts (VOC, COCO, OpenImages30k, folder) for tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mmcst.io import save_label_png

W, H = 32, 24  # image width and height of every fixture image


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def write_voc_xml(path: Path, names: list[str], difficult: tuple[int, ...] = ()) -> Path:
    objects = "".join(
        f"<object><name>{n}</name><difficult>{int(k in difficult)}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for k, n in enumerate(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objects}</annotation>")
    return path


# --------------------------------------------------------------------------------------------------
# VOC

VOC_IDS = ["2007_000032", "2007_000039", "2008_000002"]


def voc_mask(k: int) -> np.ndarray:
    """GT of fixture image k: class 15 (person) block, plus class 7 (car) on image 1, and a 255 border."""
    mask = np.zeros((H, W), np.uint8)
    mask[4:12, 6:20] = 15
    if k == 1:
        mask[14:20, 2:10] = 7
    mask[3, 5:21] = 255
    return mask


def make_voc(root: Path, aug_masks: bool = False) -> Path:
    """VOC2012 folder: 3 images; XMLs for images 0 and 1; masks for images 0 and 1 (SegmentationClass)."""
    voc = root / "VOC2012"
    for k, image_id in enumerate(VOC_IDS):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed=k)
    write_voc_xml(voc / "Annotations" / f"{VOC_IDS[0]}.xml", ["person", "person"])
    write_voc_xml(voc / "Annotations" / f"{VOC_IDS[1]}.xml", ["person", "car", "dog"], difficult=(2,))
    for k in (0, 1):
        save_label_png(voc / ("SegmentationClassAug" if aug_masks else "SegmentationClass") / f"{VOC_IDS[k]}.png",
                       voc_mask(k))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text(f"{VOC_IDS[0]}\n{VOC_IDS[1]}\n")
    (sets / "val.txt").write_text(f"{VOC_IDS[2]}\n")
    # train_aug in the DeepLab/IRN list format, at the root
    (voc / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in VOC_IDS))
    return voc


# --------------------------------------------------------------------------------------------------
# COCO

COCO_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the pixel block rows y0..y1-1, cols x0..x1-1 (pycocotools' rasterisation of it)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(block: tuple[int, int, int, int], h: int = H, w: int = W) -> dict:
    """Column-major uncompressed RLE of the block (y0, y1, x0, x1), as COCO stores crowd regions."""
    mask = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = block
    mask[y0:y1, x0:x1] = 1
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [h, w], "counts": counts}


def make_coco(root: Path, split: str = "val2014") -> Path:
    """COCO root with 3 images: a large car under a small person, a dog with a crowd region, no annotations."""
    names = [f"COCO_{split}_{i:012d}.jpg" for i in (42, 73, 90)]
    for k, name in enumerate(names):
        write_jpeg(root / split / name, seed=10 + k)
    images = [{"id": i, "file_name": n, "height": H, "width": W} for i, n in zip((42, 73, 90), names)]
    annotations = [
        # image 42: car block 2..22 x 2..18 (area 320) painted first, person 8..14 x 6..12 (area 36) on top
        {"id": 1, "image_id": 42, "category_id": 1, "segmentation": [rect(8, 6, 14, 12)], "area": 36.0,
         "bbox": [8, 6, 6, 6], "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 3, "segmentation": [rect(2, 2, 22, 18)], "area": 320.0,
         "bbox": [2, 2, 20, 16], "iscrowd": 0},
        # image 73: dog block, and a crowd of people (RLE) overlapping it, which wins
        {"id": 3, "image_id": 73, "category_id": 18, "segmentation": [rect(0, 0, 16, 12)], "area": 192.0,
         "bbox": [0, 0, 16, 12], "iscrowd": 0},
        {"id": 4, "image_id": 73, "category_id": 1, "segmentation": uncompressed_rle((8, 20, 10, 30)),
         "area": 240.0, "bbox": [10, 8, 20, 12], "iscrowd": 1},
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}))
    return root


def coco_expected_masks() -> dict[str, np.ndarray]:
    """Hand-computed semantic GT of ``make_coco`` (labels: person 1, car 2, dog 3)."""
    a = np.zeros((H, W), np.uint8)
    a[2:18, 2:22] = 2
    a[6:12, 8:14] = 1
    b = np.zeros((H, W), np.uint8)
    b[0:12, 0:16] = 3
    b[8:20, 10:30] = 255
    return {"COCO_val2014_000000000042": a, "COCO_val2014_000000000073": b,
            "COCO_val2014_000000000090": np.zeros((H, W), np.uint8)}


# --------------------------------------------------------------------------------------------------
# OpenImages30k (wsolevaluation)

OI_MIDS = ["01226z", "02p0tk3", "0cmf2"]  # class indices 0, 1, 2


def _binary_png(path: Path, block: tuple[int, int, int, int], size: tuple[int, int] = (W, H)) -> str:
    mask = np.zeros((size[1], size[0]), np.uint8)
    y0, y1, x0, x1 = block
    mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, mode="L").save(path)
    return path.as_posix()


def make_openimages(root: Path, with_names: bool = False) -> Path:
    """train: 3 images (one per class); test: a1 with 2 instances + an ignore box, b2 with a mask at 2x size."""
    meta = root / "metadata" / "OpenImages"
    data = root / "OpenImages"
    train = [f"train/{mid}/t{k}.jpg" for k, mid in enumerate(OI_MIDS)]
    for k, key in enumerate(train):
        write_jpeg(data / key, seed=20 + k)
    (meta / "train").mkdir(parents=True, exist_ok=True)
    (meta / "train" / "image_ids.txt").write_text("".join(f"{key}\n" for key in train))
    (meta / "train" / "class_labels.txt").write_text("".join(f"{key},{k}\n" for k, key in enumerate(train)))

    test = [f"test/{OI_MIDS[2]}/a1.jpg", f"test/{OI_MIDS[0]}/b2.jpg"]
    for k, key in enumerate(test):
        write_jpeg(data / key, seed=30 + k)
    _binary_png(data / f"test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i1.png", (2, 8, 2, 10))
    _binary_png(data / f"test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i2.png", (12, 20, 16, 30))
    _binary_png(data / f"test/{OI_MIDS[2]}/ignore/a1.png", (0, 10, 0, 16))  # overlaps instance 1
    _binary_png(data / f"test/{OI_MIDS[0]}/b2_{OI_MIDS[0]}_i1.png", (0, 24, 0, 32), size=(2 * W, 2 * H))
    (meta / "test").mkdir(parents=True, exist_ok=True)
    (meta / "test" / "image_ids.txt").write_text("".join(f"{key}\n" for key in test))
    (meta / "test" / "class_labels.txt").write_text(f"{test[0]},2\n{test[1]},0\n")
    (meta / "test" / "localization.txt").write_text(
        f"{test[0]},test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i1.png,test/{OI_MIDS[2]}/ignore/a1.png\n"
        f"{test[0]},test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i2.png,\n"
        f"{test[1]},test/{OI_MIDS[0]}/b2_{OI_MIDS[0]}_i1.png,\n")
    if with_names:
        (meta / "class_names.txt").write_text(
            f"0,{OI_MIDS[0]},Snowman\n1,{OI_MIDS[1]},Ladybug\n2,{OI_MIDS[2]},Hot dog, frankfurter\n")
    return root


def openimages_expected_a1() -> np.ndarray:
    """GT of test image a1 (class index 2 -> value 3): two instances, ignore box minus foreground = 255."""
    mask = np.zeros((H, W), np.uint8)
    mask[0:10, 0:16] = 255
    mask[2:8, 2:10] = 3
    mask[12:20, 16:30] = 3
    return mask


# --------------------------------------------------------------------------------------------------
# folder

def make_folder(root: Path, fmt: str = "csv") -> Path:
    """images/{a,b,c}.jpg (c in a sub-folder), tags, a mask for a, a split list."""
    for k, name in enumerate(["a.jpg", "b.png", "sub/c.jpg"]):
        path = root / "images" / name
        if name.endswith(".png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(path)
        else:
            write_jpeg(path, seed=40 + k)
    tags = {"a.jpg": ["dog", "cat"], "b.png": [], "sub/c.jpg": ["cat"]}
    if fmt == "csv":
        (root / "labels.csv").write_text("image,labels\n" + "".join(f"{k},{';'.join(v)}\n" for k, v in tags.items()))
    else:
        (root / "labels.json").write_text(json.dumps(tags))
    mask = np.zeros((H, W), np.uint8)
    mask[2:10, 2:10] = 2  # dog is class 2 in the sorted order (cat, dog)
    save_label_png(root / "masks" / "a.png", mask)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "val.txt").write_text("sub/c.jpg\na\n")
    return root
