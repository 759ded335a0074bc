"""A folder of your own photos with image-level tags.

Layout::

    <root>/images/<name>.jpg            any format Pillow reads; sub-folders allowed
    <root>/labels.csv                   header ``image,labels``; labels are ``;``-separated class names
      or <root>/labels.json             {"<name>.jpg": ["dog", "person"], ...}
    <root>/classes.txt                  optional: one class per line (fixes the order); else sorted union
    <root>/masks/<stem>.png             optional GT masks (palette/greyscale indices, 0 bg, 1..C, 255 ignore)
    <root>/splits/<split>.txt           optional: image names (or stems) of a split; ``all`` = every image

Image ids are file stems, so they must be unique across sub-folders. An image with no tags is allowed
(all-negative labels).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mmcst.data.base import DatasetError, ImageDataset, read_label_mask, register_dataset
from mmcst.data.voc import read_class_names


def _read_csv(path: Path) -> list[tuple[str, list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"image", "labels"} <= {f.strip() for f in reader.fieldnames}:
                raise DatasetError(f"{path}: expected a header 'image,labels', got {reader.fieldnames}", path)
            rows = []
            for row in reader:
                row = {k.strip(): (v or "") for k, v in row.items() if k is not None}
                if not row["image"].strip():
                    raise DatasetError(f"{path}:{reader.line_num}: empty 'image' field", path)
                rows.append((row["image"].strip(), [n.strip() for n in row["labels"].split(";") if n.strip()]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable labels CSV ({exc})", path) from exc
    return rows


def _read_json(path: Path) -> list[tuple[str, list[str]]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable labels JSON ({exc})", path) from exc
    if not isinstance(obj, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in obj.values()):
        raise DatasetError(f"{path}: expected {{\"<image>\": [\"<class name>\", ...], ...}}", path)
    return [(str(k), [n.strip() for n in v if n.strip()]) for k, v in obj.items()]


@register_dataset("folder")
class FolderDataset(ImageDataset):
    """Images + a CSV/JSON of tags; optional masks and split lists."""

    name = "folder"

    def __init__(self, root: str | Path, split: str = "all") -> None:
        self.root = Path(root)
        self.split = split
        self.image_dir = self.root / "images"
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found (expected <root>/images/)", self.image_dir)
        csv_file, json_file = self.root / "labels.csv", self.root / "labels.json"
        if csv_file.is_file():
            self.labels_file, rows = csv_file, _read_csv(csv_file)
        elif json_file.is_file():
            self.labels_file, rows = json_file, _read_json(json_file)
        else:
            raise DatasetError(f"{csv_file}: labels not found (expected labels.csv with header 'image,labels', "
                               "or labels.json)", csv_file)
        seen: set[str] = set()
        for image, _ in rows:
            if image in seen:
                raise DatasetError(f"{self.labels_file}: image {image!r} is listed more than once", self.labels_file)
            seen.add(image)

        classes_file = self.root / "classes.txt"
        self.classes_file: Optional[Path] = classes_file if classes_file.is_file() else None
        if self.classes_file is not None:
            self.class_names = read_class_names(self.classes_file)
        else:
            self.class_names = sorted({name for _, names in rows for name in names})
        index = {name: k for k, name in enumerate(self.class_names)}
        for image, names in rows:
            unknown = [n for n in names if n not in index]
            if unknown:
                raise DatasetError(f"{self.labels_file}: image {image!r} has labels {unknown} that are not in "
                                   f"{self.classes_file}", self.labels_file)

        if split == "all":
            self.split_file: Optional[Path] = None
            selected = rows
        else:
            self.split_file = self.root / "splits" / f"{split}.txt"
            if not self.split_file.is_file():
                raise DatasetError(f"{self.split_file}: split file not found (split 'all' needs none)",
                                   self.split_file)
            by_name = {image: (image, names) for image, names in rows}
            by_name.update({Path(image).stem: (image, names) for image, names in rows})
            wanted = read_split_file_entries(self.split_file)
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise DatasetError(f"{self.split_file}: {len(missing)} entries are not in {self.labels_file.name} "
                                   f"(e.g. {missing[:3]})", self.split_file)
            selected = [by_name[w] for w in wanted]

        self.image_names = [image for image, _ in selected]
        self.ids = [Path(image).stem for image in self.image_names]
        if len(set(self.ids)) != len(self.ids):
            raise DatasetError(f"{self.labels_file}: image file stems must be unique (they are the image ids)",
                               self.labels_file)
        self._labels = np.zeros((len(selected), self.num_classes), np.float32)
        for row, (_, names) in enumerate(selected):
            self._labels[row, [index[n] for n in names]] = 1.0
        self.mask_dir: Optional[Path] = self.root / "masks" if (self.root / "masks").is_dir() else None

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.image_names[i]

    def get_labels(self, i: int) -> np.ndarray:
        return self._labels[i].copy()

    def label_matrix(self) -> np.ndarray:
        return self._labels.copy()

    def mask_path(self, i: int) -> Optional[Path]:
        if self.mask_dir is None:
            return None
        path = self.mask_dir / f"{self.ids[i]}.png"
        return path if path.is_file() else None

    def get_mask(self, i: int) -> Optional[np.ndarray]:
        path = self.mask_path(i)
        return None if path is None else read_label_mask(path, self.num_classes)

    def has_masks(self) -> bool:
        return bool(self.ids) and all(self.mask_path(i) is not None for i in range(len(self)))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "split_file": str(self.split_file) if self.split_file else None,
            "label_source": str(self.labels_file),
            "class_names_source": str(self.classes_file) if self.classes_file else "sorted union of the labels",
            "mask_source": str(self.mask_dir) if self.mask_dir else None,
            "has_masks": self.has_masks(),
        })
        return info


def read_split_file_entries(path: Path) -> list[str]:
    """Split entries (image names or stems, one per line) without VOC's id normalisation."""
    entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(entries)) != len(entries):
        raise DatasetError(f"{path}: entries listed more than once", path)
    return entries
