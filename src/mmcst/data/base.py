"""The dataset contract shared by every dataset, and the dataset registry.

``dataset[i]`` returns ``{"id": str, "image": uint8 tensor 3xHxW, "labels": float tensor [C] multi-hot,
"mask": long tensor HxW or None}`` with mask values 0 = background, 1..C classes, 255 ignore.
Image-level labels come from the dataset itself. Datasets expose ``class_names`` and ``ids``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and what was expected.

    ``path`` (optional) is the offending file, so reports such as ``mmcst data check`` can list it apart.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 3xHxW tensor (RGB), with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found", path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({exc})", path) from exc
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    present = np.unique(mask)
    present = present[(present > 0) & (present != IGNORE_INDEX)]
    labels = np.zeros(num_classes, np.float32)
    labels[present - 1] = 1.0
    return labels


def read_label_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """Read a label PNG (palette or greyscale indices) as HxW uint8, checking values are 0..C or 255."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: mask PNG not found", path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"{path}: expected a palette or greyscale label PNG of class indices, got mode {image.mode}"
                    " (colour-coded masks must be converted to indices first)", path)
            values = np.asarray(image)
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable or truncated mask PNG ({exc})", path) from exc
    return check_label_mask(values, num_classes, path)


def check_label_mask(mask: np.ndarray, num_classes: int, path: str | Path) -> np.ndarray:
    """Return ``mask`` as uint8 after checking every value is in 0..C or 255 (error names ``path``)."""
    mask = np.asarray(mask)
    bad = ((mask > num_classes) & (mask != IGNORE_INDEX)) | (mask < 0)
    if bad.any():
        values = np.unique(mask[bad])[:10].tolist()
        raise DatasetError(
            f"{path}: mask values {values} outside 0..{num_classes} (classes) and {IGNORE_INDEX} (ignore)", path)
    return mask.astype(np.uint8)


class ImageDataset:
    """Shared behaviour of the file-backed datasets (the contract in the module docstring).

    Subclasses set ``root``, ``split``, ``class_names`` and ``ids`` and implement ``image_path``,
    ``get_labels`` and ``get_mask``; the accessors never decode the image, so evaluation can read
    labels and GT quickly.
    """

    name = "dataset"
    root: Path
    split: str
    class_names: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def get_labels(self, i: int) -> np.ndarray:
        """float32 [C] multi-hot labels of image ``i``."""
        raise NotImplementedError

    def get_mask(self, i: int) -> np.ndarray | None:
        """uint8 HxW GT mask of image ``i`` (0 bg, 1..C, 255 ignore), or None where it has none."""
        raise NotImplementedError

    def has_masks(self) -> bool:
        """Whether every image of the split has a GT mask (required for mIoU evaluation)."""
        return False

    def label_matrix(self) -> np.ndarray:
        """float32 [N, C] labels of every image, in ``ids`` order."""
        if not self.ids:
            return np.zeros((0, self.num_classes), np.float32)
        return np.stack([self.get_labels(i) for i in range(len(self))]).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "root": str(self.root), "split": self.split, "images": len(self),
                "classes": self.num_classes}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        path = self.image_path(i)
        image = read_image(path)
        mask = self.get_mask(i)
        if mask is not None and tuple(mask.shape) != tuple(image.shape[1:]):
            raise DatasetError(
                f"{path}: image is {image.shape[2]}x{image.shape[1]} (WxH) but its mask is "
                f"{mask.shape[1]}x{mask.shape[0]}", path)
        return {
            "id": self.ids[i],
            "image": image,
            "labels": torch.from_numpy(self.get_labels(i).astype(np.float32)),
            "mask": None if mask is None else torch.from_numpy(mask.astype(np.int64)),
        }


_DATASETS: dict[str, Callable[..., Any]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        _DATASETS[name] = factory
        return factory
    return deco


def dataset_names() -> list[str]:
    _import_all()
    return sorted(_DATASETS)


def build_dataset(name: str, root: str | Path, split: str, **kwargs: Any) -> Any:
    """Build a dataset by registry name (voc, coco, openimages, folder, synthetic)."""
    _import_all()
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(_DATASETS)}")
    return _DATASETS[name](root=root, split=split, **kwargs)


def _import_all() -> None:
    # Importing the modules registers them; done lazily so ``base`` has no import cycle.
    from mmcst.data import coco, folder, openimages, synthetic, voc  # noqa: F401
