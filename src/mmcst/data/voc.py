"""PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) in its standard on-disk layout.

``root`` is the ``VOC2012`` folder::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/Annotations/<id>.xml                    object names -> image-level labels
    VOC2012/SegmentationClass/<id>.png              palette PNG, 0 bg, 1..20, 255 boundary
    VOC2012/SegmentationClassAug/<id>.png           SBD-augmented masks (preferred when present)
    VOC2012/ImageSets/Segmentation/<split>.txt      train, val, trainval, test
    VOC2012/ImageSets/SegmentationAug/train_aug.txt or VOC2012/train_aug.txt   (train_aug)
    VOC2012/class_names.txt                         optional: one class per line (mmcst extension)

Image-level labels come from, in the order ``labels_source="auto"`` tries them: a PSA-style
``cls_labels.npy`` given as ``labels_file``, the image's XML, its GT mask.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mmcst.data.base import (
    VOC_CLASSES,
    DatasetError,
    ImageDataset,
    labels_from_mask,
    read_label_mask,
    register_dataset,
)
from mmcst.io import MapFileError, safe_load_npy

LABEL_SOURCES = ("auto", "xml", "mask", "npy")


def read_split_file(path: Path) -> list[str]:
    """Read image ids from a split list, one per line.

    Besides bare ids, accepts the DeepLab/IRN list format ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
    (the id is the stem of the first field), so users can point at the lists they already have.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read split file ({exc})", path) from exc
    ids = []
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        first = fields[0]
        ids.append(Path(first).stem if ("/" in first or "." in first) else first)
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise DatasetError(f"{path}: image ids listed more than once: {dup}", path)
    return ids


def read_class_names(path: Path) -> list[str]:
    """One class name per line (blank lines skipped); names must be unique."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: expected one class name per line, found none", path)
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: class names must be unique, got {names}", path)
    return names


def load_cls_labels(path: str | Path, num_classes: int) -> dict[str, np.ndarray]:
    """Read a PSA-style ``cls_labels.npy``: a pickled dict ``{image id: float [C]}``.

    Keys may be strings ('2007_000032') or, in older files, ints (2007000032); ints are turned back
    into VOC ids by re-inserting the underscore after the year. The file is read by
    :func:`mmcst.io.safe_load_npy`, so a crafted file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found (expected a PSA-style cls_labels.npy)", path)
    try:
        obj = safe_load_npy(path, what="labels file")
    except MapFileError as exc:
        raise DatasetError(str(exc), path) from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict {{image id: float [C]}}, got {type(obj).__name__}", path)
    labels: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(key, (int, np.integer)):
            digits = str(int(key))
            key = f"{digits[:4]}_{digits[4:]}"
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
        if vector.shape[0] != num_classes:
            raise DatasetError(
                f"{path}: labels of {key!r} have {vector.shape[0]} entries, expected {num_classes} (one per class)",
                path)
        labels[str(key)] = vector
    return labels


def parse_voc_xml(path: Path, class_names: list[str]) -> np.ndarray:
    """Multi-hot labels from the ``<object><name>`` entries of a VOC annotation XML.

    Objects marked ``difficult`` count too: they are in the image, and PSA's ``cls_labels.npy`` keeps them.
    """
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation XML not found", path) from None
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed annotation XML ({exc})", path) from exc
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.zeros(len(class_names), np.float32)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DatasetError(f"{path}: object name {name!r} is not one of the {len(class_names)} classes "
                               f"{class_names}", path)
        labels[index[name]] = 1.0
    return labels


@register_dataset("voc")
class VOCDataset(ImageDataset):
    """PASCAL VOC 2012 segmentation splits (``train``, ``val``, ``train_aug``, ...)."""

    name = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: Optional[list[str]] = None,
        labels_source: str = "auto",
        labels_file: Optional[str | Path] = None,
        mask_dir: Optional[str | Path] = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not (self.root / "JPEGImages").is_dir():
            raise DatasetError(
                f"{self.root}: not a VOC2012 folder (expected {self.root / 'JPEGImages'}); "
                "point data.root at VOCdevkit/VOC2012", self.root)
        if labels_source not in LABEL_SOURCES:
            raise ValueError(f"labels_source must be one of {LABEL_SOURCES}, got {labels_source!r}")
        if labels_source == "npy" and labels_file is None:
            raise ValueError("labels_source='npy' needs labels_file (a PSA-style cls_labels.npy)")
        if labels_file is not None and labels_source not in ("auto", "npy"):
            raise ValueError(f"labels_file is given but labels_source={labels_source!r} would ignore it")
        names_file = self.root / "class_names.txt"
        if class_names is not None:
            self.class_names = list(class_names)
        elif names_file.is_file():
            self.class_names = read_class_names(names_file)
        else:
            self.class_names = list(VOC_CLASSES)
        self.class_names_file = names_file if class_names is None and names_file.is_file() else None

        self.split_file = self._find_split_file(split)
        self.ids = read_split_file(self.split_file)

        self.labels_source = "npy" if labels_file is not None else labels_source
        self.labels_file = Path(labels_file) if labels_file is not None else None
        self._npy_labels: dict[str, np.ndarray] = {}
        if self.labels_file is not None:
            self._npy_labels = load_cls_labels(self.labels_file, self.num_classes)
            missing = [i for i in self.ids if i not in self._npy_labels]
            if missing:
                raise DatasetError(f"{self.labels_file}: no labels for {len(missing)} images of split "
                                   f"{split!r} (e.g. {missing[:5]})", self.labels_file)

        if mask_dir is not None:
            mask_path = Path(mask_dir)
            self.mask_dir: Optional[Path] = mask_path if mask_path.is_absolute() else self.root / mask_path
            if not self.mask_dir.is_dir():
                raise DatasetError(f"{self.mask_dir}: mask folder not found", self.mask_dir)
        elif (self.root / "SegmentationClassAug").is_dir():
            self.mask_dir = self.root / "SegmentationClassAug"
        elif (self.root / "SegmentationClass").is_dir():
            self.mask_dir = self.root / "SegmentationClass"
        else:
            self.mask_dir = None
        self._labels_cache: dict[int, np.ndarray] = {}
        self._has_masks: Optional[bool] = None

    def _find_split_file(self, split: str) -> Path:
        candidates = [self.root / "ImageSets" / "Segmentation" / f"{split}.txt"]
        if split == "train_aug":
            candidates += [self.root / "ImageSets" / "SegmentationAug" / "train_aug.txt", self.root / "train_aug.txt"]
        for path in candidates:
            if path.is_file():
                return path
        tried = ", ".join(str(p) for p in candidates)
        raise DatasetError(f"split {split!r}: no split file found (looked for {tried})", candidates[0])

    # ---------------------------------------------------------------------------------------------
    # accessors that never decode the JPEG

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[i]}.jpg"

    def xml_path(self, i: int) -> Path:
        return self.root / "Annotations" / f"{self.ids[i]}.xml"

    def mask_path(self, i: int) -> Optional[Path]:
        """The GT PNG of image ``i`` if the mask folder holds one, else None."""
        if self.mask_dir is None:
            return None
        path = self.mask_dir / f"{self.ids[i]}.png"
        return path if path.is_file() else None

    def get_labels(self, i: int) -> np.ndarray:
        if i not in self._labels_cache:
            self._labels_cache[i] = self._read_labels(i)
        return self._labels_cache[i].copy()

    def _read_labels(self, i: int) -> np.ndarray:
        image_id = self.ids[i]
        if self.labels_source == "npy":
            return self._npy_labels[image_id]
        xml = self.xml_path(i)
        if self.labels_source == "xml" or (self.labels_source == "auto" and xml.is_file()):
            return parse_voc_xml(xml, self.class_names)
        mask = self.get_mask(i)
        if mask is None:
            expected = (self.mask_dir or self.root / "SegmentationClass") / f"{image_id}.png"
            if self.labels_source == "auto":
                raise DatasetError(f"{xml}: annotation XML not found, and no GT mask {expected} either, so "
                                   f"image {image_id!r} has no labels (or pass a cls_labels.npy as labels_file)", xml)
            raise DatasetError(f"{expected}: GT mask not found (labels_source='mask' needs one per image)", expected)
        return labels_from_mask(mask, self.num_classes)

    def get_mask(self, i: int) -> Optional[np.ndarray]:
        path = self.mask_path(i)
        return None if path is None else read_label_mask(path, self.num_classes)

    def has_masks(self) -> bool:
        if self._has_masks is None:
            self._has_masks = self.mask_dir is not None and all(
                self.mask_path(i) is not None for i in range(len(self)))
        return self._has_masks

    def describe(self) -> dict[str, Any]:
        if self.labels_source == "npy":
            label_source = f"cls_labels.npy ({self.labels_file})"
        elif self.labels_source == "auto":
            label_source = "Annotations/<id>.xml, else the GT mask"
        else:
            label_source = {"xml": "Annotations/<id>.xml", "mask": "GT mask"}[self.labels_source]
        info = super().describe()
        info.update({
            "split_file": str(self.split_file),
            "class_names_file": str(self.class_names_file) if self.class_names_file else None,
            "label_source": label_source,
            "mask_source": str(self.mask_dir) if self.mask_dir else None,
            "has_masks": self.has_masks(),
        })
        return info
