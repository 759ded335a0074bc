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
# Natural spellings used inside CLIP prompts (METHOD.md 2.3); keys are dataset class names.
PROMPT_NAMES = {
    "aeroplane": "aeroplane", "diningtable": "dining table", "motorbike": "motorbike",
    "pottedplant": "potted plant", "tvmonitor": "tv monitor",
}

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and what was expected."""


def prompt_name(class_name: str) -> str:
    return PROMPT_NAMES.get(class_name, class_name.replace("_", " "))


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 3xHxW tensor (RGB), with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({exc})") from exc
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    present = np.unique(mask)
    present = present[(present > 0) & (present != IGNORE_INDEX)]
    labels = np.zeros(num_classes, np.float32)
    labels[present - 1] = 1.0
    return labels


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
