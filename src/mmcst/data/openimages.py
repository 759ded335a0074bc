"""OpenImages30k in the wsolevaluation layout (Choe et al., CVPR 2020).

Layout::

    <root>/metadata/OpenImages/<split>/image_ids.txt      val/01226z/<hash>.jpg            (one per line)
    <root>/metadata/OpenImages/<split>/class_labels.txt   val/01226z/<hash>.jpg,12         (class index)
    <root>/metadata/OpenImages/<split>/localization.txt   val/01226z/<hash>.jpg,<mask>.png,<ignore>.png
    <root>/metadata/OpenImages/class_names.txt            optional: index,MID,display name
    <root>/OpenImages/<image id>                          images
    <root>/OpenImages/<mask path>                         instance masks and ignore-box masks

``localization.txt`` has one line per instance mask; the first line of an image carries its ignore mask
path (possibly empty), later lines of the same image leave the third field empty. Splits: ``train``
(no masks), ``val`` (wsolevaluation's "train-fullsup"), ``test``.

GT mask (as wsolevaluation's ``get_mask``): the union of the instance masks (value > 0), labelled with the
image's class index + 1; pixels of the ignore mask outside that union are 255. Instance masks whose size
differs from the image are resized to it (nearest), so the mask always matches the image; evaluation
then resizes both to 224x224 (METHOD.md 6.3).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from mmcst.data.base import DatasetError, ImageDataset, register_dataset

SPLITS = ("train", "val", "test")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: metadata file not found", path)
    return [line.rstrip("\r\n") for line in path.read_text().splitlines() if line.strip()]


def read_class_labels(path: Path) -> dict[str, int]:
    """``class_labels.txt``: ``<image id>,<class index>`` per line."""
    labels: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), 1):
        fields = line.split(",")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DatasetError(f"{path}:{number}: expected '<image id>,<class index>', got {line!r}", path)
        labels[fields[0].strip()] = int(fields[1])
    return labels


def read_localization(path: Path) -> dict[str, tuple[list[str], str]]:
    """``localization.txt``: image id -> (instance mask paths, ignore mask path or '')."""
    entries: dict[str, tuple[list[str], str]] = {}
    for number, line in enumerate(_read_lines(path), 1):
        fields = line.split(",")
        if len(fields) != 3 or not fields[1]:
            raise DatasetError(f"{path}:{number}: expected '<image id>,<mask path>,<ignore path or empty>', "
                               f"got {line!r}", path)
        image_id, mask_path, ignore_path = (f.strip() for f in fields)
        if image_id in entries:
            if ignore_path:
                raise DatasetError(f"{path}:{number}: only the first line of {image_id} may name an ignore mask",
                                   path)
            entries[image_id][0].append(mask_path)
        else:
            entries[image_id] = ([mask_path], ignore_path)
    return entries


def _mid_of(image_id: str) -> str:
    parts = image_id.split("/")
    return parts[1] if len(parts) >= 3 else ""


@register_dataset("openimages")
class OpenImagesDataset(ImageDataset):
    """OpenImages30k split (``train``, ``val``, ``test``); single-label, masks on val/test."""

    name = "openimages"

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        if split not in SPLITS:
            raise ValueError(f"OpenImages split must be one of {SPLITS}, got {split!r}")
        self.metadata_dir = self.root / "metadata" / "OpenImages"
        split_dir = self.metadata_dir / split
        self.split_file = split_dir / "image_ids.txt"
        self.labels_file = split_dir / "class_labels.txt"
        localization = split_dir / "localization.txt"
        self.localization_file: Optional[Path] = localization if localization.is_file() else None
        self.image_dir = self.root / "OpenImages"

        self.image_keys = _read_lines(self.split_file)  # relative paths, e.g. val/01226z/<hash>.jpg
        self.ids = [Path(key).stem for key in self.image_keys]
        if len(set(self.ids)) != len(self.ids):
            raise DatasetError(f"{self.split_file}: image ids are not unique by file stem", self.split_file)
        class_of = read_class_labels(self.labels_file)
        missing = [key for key in self.image_keys if key not in class_of]
        if missing:
            raise DatasetError(f"{self.labels_file}: no class label for {len(missing)} images of "
                               f"{self.split_file.name} (e.g. {missing[:3]})", self.labels_file)
        self.class_indices = np.array([class_of[key] for key in self.image_keys], np.int64)

        self.class_names, self.mids, self.class_names_source = self._class_names()
        bad = self.class_indices >= self.num_classes
        if bad.any():
            raise DatasetError(f"{self.labels_file}: class index {int(self.class_indices[bad][0])} outside "
                               f"0..{self.num_classes - 1} ({self.class_names_source})", self.labels_file)
        self._localization = read_localization(self.localization_file) if self.localization_file else {}

    def _class_names(self) -> tuple[list[str], list[str], str]:
        """Display names from ``class_names.txt`` (index,MID,name), else the MIDs seen in any split."""
        names_file = self.metadata_dir / "class_names.txt"
        if names_file.is_file():
            rows: dict[int, tuple[str, str]] = {}
            for number, line in enumerate(_read_lines(names_file), 1):
                fields = [f.strip() for f in line.split(",", 2)]
                if len(fields) != 3 or not fields[0].isdigit():
                    raise DatasetError(f"{names_file}:{number}: expected '<index>,<MID>,<name>', got {line!r}",
                                       names_file)
                rows[int(fields[0])] = (fields[1], fields[2])
            if sorted(rows) != list(range(len(rows))):
                raise DatasetError(f"{names_file}: class indices must be 0..{len(rows) - 1} without gaps",
                                   names_file)
            return [rows[k][1] for k in range(len(rows))], [rows[k][0] for k in range(len(rows))], str(names_file)
        mid_of_index: dict[int, str] = {}
        for split in SPLITS:
            labels_file = self.metadata_dir / split / "class_labels.txt"
            if not labels_file.is_file():
                continue
            for key, index in read_class_labels(labels_file).items():
                mid = _mid_of(key)
                if mid_of_index.setdefault(index, mid) != mid:
                    raise DatasetError(f"{labels_file}: class index {index} is used for folders "
                                       f"{mid_of_index[index]!r} and {mid!r}", labels_file)
        if not mid_of_index:
            raise DatasetError(f"{names_file}: not found, and no class_labels.txt names any class", names_file)
        if sorted(mid_of_index) != list(range(len(mid_of_index))):
            gaps = sorted(set(range(max(mid_of_index) + 1)) - set(mid_of_index))[:5]
            raise DatasetError(f"{names_file}: not found, and class indices {gaps} appear in no split's "
                               "class_labels.txt; add class_names.txt (index,MID,name)", names_file)
        mids = [mid_of_index[k] for k in range(len(mid_of_index))]
        return list(mids), mids, "MIDs from the class_labels.txt image paths"

    # ---------------------------------------------------------------------------------------------

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.image_keys[i]

    def get_labels(self, i: int) -> np.ndarray:
        labels = np.zeros(self.num_classes, np.float32)
        labels[self.class_indices[i]] = 1.0
        return labels

    def label_matrix(self) -> np.ndarray:
        matrix = np.zeros((len(self), self.num_classes), np.float32)
        matrix[np.arange(len(self)), self.class_indices] = 1.0
        return matrix

    def has_masks(self) -> bool:
        return bool(self.image_keys) and all(key in self._localization for key in self.image_keys)

    def mask_files(self, i: int) -> tuple[list[Path], Optional[Path]]:
        """Instance mask paths and the ignore mask path (or None) of image ``i``; ``([], None)`` if none."""
        entry = self._localization.get(self.image_keys[i])
        if entry is None:
            return [], None
        masks, ignore = entry
        return [self.image_dir / m for m in masks], (self.image_dir / ignore if ignore else None)

    def get_mask(self, i: int) -> Optional[np.ndarray]:
        masks, ignore = self.mask_files(i)
        if not masks:
            return None
        image_path = self.image_path(i)
        try:
            with Image.open(image_path) as image:  # reads the header only
                size = image.size
        except FileNotFoundError:
            raise DatasetError(f"{image_path}: image file not found", image_path) from None
        except Exception as exc:
            raise DatasetError(f"{image_path}: unreadable image header ({exc})", image_path) from exc
        foreground = np.zeros(size[::-1], bool)
        for path in masks:
            foreground |= _read_binary_mask(path, size)
        mask = np.where(foreground, self.class_indices[i] + 1, 0).astype(np.uint8)
        if ignore is not None:
            mask[_read_binary_mask(ignore, size) & ~foreground] = 255
        return mask

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "split_file": str(self.split_file),
            "label_source": str(self.labels_file),
            "mask_source": str(self.localization_file) if self.localization_file else None,
            "class_names_source": self.class_names_source,
            "has_masks": self.has_masks(),
        })
        return info


def _read_binary_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A greyscale mask PNG as a boolean HxW array (> 0), resized (nearest) to ``size`` = (W, H)."""
    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask PNG not found", path) from None
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable or truncated mask PNG ({exc})", path) from exc
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.NEAREST)
    return np.asarray(grey) > 0
