"""Data of the WSSS stage: images paired with label PNGs from a folder, and the two training pipelines.

* :class:`LabelFolderDataset` — a split's images with ``<labels_dir>/<id>.png`` as their masks (confident
  labels for AffinityNet, pseudo masks for the segmenter); every PNG is checked to exist up front.
* :class:`AffinityTrainTransform` — PSA's AffinityNet crops (``train_aff.py``): colour jitter, optional
  random resize of the long side, random crop (padding: image 0 after normalisation, labels 255), flip; the
  crop's labels are read on the 1/8 grid and turned into the three pair-label maps.
* :class:`SegTrainTransform` — MCTformer's segmenter crops (``seg/tool/exutils.py``): random rescale,
  flip, normalisation, random crop with padding (image 0 after normalisation, labels 255 = ignore).

Both draw from torch's RNG only (torchvision transforms), which the engine seeds per sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mmcst.data.base import IGNORE_INDEX, DatasetError, read_image, read_label_mask
from mmcst.data.transforms import normalize
from mmcst.refine import affinity_labels, downsample_labels

_SHOW_MISSING = 5  # file names listed in a missing-files error


def name_missing(paths: Sequence[Path]) -> str:
    """The first few of ``paths``, for an error message."""
    return ", ".join(str(p) for p in paths[:_SHOW_MISSING]) + (", ..." if len(paths) > _SHOW_MISSING else "")


def dataset_image(dataset: Any, index: int) -> torch.Tensor:
    """The uint8 3 x H x W image of ``dataset[index]`` without touching its labels or masks when the dataset
    exposes ``image_path`` (the VOC test split has neither)."""
    if hasattr(dataset, "image_path"):
        return read_image(dataset.image_path(index))
    return dataset[index]["image"]


def dataset_image_size(dataset: Any, index: int) -> Optional[tuple[int, int]]:
    """``(H, W)`` from the image file's header when the dataset exposes ``image_path``, else None."""
    if not hasattr(dataset, "image_path"):
        return None
    from PIL import Image

    try:
        with Image.open(dataset.image_path(index)) as image:
            width, height = image.size
    except Exception:  # unreadable here: the full read reports it properly
        return None
    return height, width


class LabelFolderDataset:
    """The images of ``dataset`` with ``<labels_dir>/<id>.png`` as their masks.

    Items: ``{"id", "image": uint8 3 x H x W, "mask": int64 H x W}`` (0 background, 1..C, 255 ignore). The PNG
    must have the image's size and values in 0..``num_classes`` or 255; errors name the file.
    """

    def __init__(self, dataset: Any, labels_dir: str | Path, num_classes: int) -> None:
        self.dataset = dataset
        self.labels_dir = Path(labels_dir)
        self.num_classes = num_classes
        self.ids = [str(i) for i in dataset.ids]
        self.class_names = list(dataset.class_names)
        if not self.labels_dir.is_dir():
            raise FileNotFoundError(f"{self.labels_dir}: label folder not found")
        missing = [self.label_path(i) for i in range(len(self.ids)) if not self.label_path(i).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.labels_dir}: {len(missing)} of {len(self.ids)} images of the split have no "
                                    f"label PNG: {name_missing(missing)}")

    def __len__(self) -> int:
        return len(self.ids)

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"{self.ids[index]}.png"

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = dataset_image(self.dataset, index)
        path = self.label_path(index)
        mask = read_label_mask(path, self.num_classes)
        if mask.shape != tuple(image.shape[-2:]):
            raise DatasetError(f"{path}: label map is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                               f"{image.shape[2]}x{image.shape[1]}", path)
        return {"id": self.ids[index], "image": image, "mask": torch.from_numpy(mask.astype(np.int64))}


def _random_crop(crop: int) -> v2.RandomCrop:
    """A random ``crop`` x ``crop`` window; a smaller image lands at a random place in a padded container (PSA's
    ``RandomCrop``): image 0 (normalised space), labels ignore."""
    return v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX})


class AffinityTrainTransform:
    """A training crop of PSA's AffinityNet with its pair labels.

    Order as PSA: colour jitter of the whole image (and, if asked, a random resize of its long side to
    U{min..max} px, bicubic / nearest), ImageNet normalisation, random crop, horizontal flip. The crop's labels
    are read on the network's 1/8 grid (:func:`mmcst.refine.downsample_labels`) and converted with
    :func:`mmcst.refine.affinity_labels`.

    Returns ``{"id", "image": float 3 x crop x crop, "bg_pos", "fg_pos", "neg": float D x P}``.
    """

    def __init__(self, crop: int, radius: int = 5, resize_long: Optional[Sequence[int]] = None,
                 color_jitter: Sequence[float] = (0.3, 0.3, 0.3, 0.1), stride: int = 8) -> None:
        self.crop, self.radius, self.stride = crop, radius, stride
        self.resize_long = None if resize_long is None else (int(resize_long[0]), int(resize_long[1]))
        brightness, contrast, saturation, hue = color_jitter
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.crop_flip = v2.Compose([_random_crop(crop), v2.RandomHorizontalFlip(0.5)])

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = tv_tensors.Image(sample["image"])
        mask = tv_tensors.Mask(sample["mask"])
        if self.resize_long is not None:
            long_side = int(torch.randint(self.resize_long[0], self.resize_long[1] + 1, ()))
            height, width = image.shape[-2:]
            size = [round(height * long_side / max(height, width)), round(width * long_side / max(height, width))]
            image = F.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
            mask = F.resize(mask, size, interpolation=InterpolationMode.NEAREST)
        image = tv_tensors.Image(normalize(self.jitter(image)))
        image, mask = self.crop_flip(image, mask)
        grid = downsample_labels(mask.as_subclass(torch.Tensor), self.stride)
        bg_pos, fg_pos, neg = affinity_labels(grid, self.radius)
        return {"id": sample["id"], "image": image.as_subclass(torch.Tensor), "bg_pos": bg_pos, "fg_pos": fg_pos,
                "neg": neg}


class SegTrainTransform:
    """A training crop of the segmenter (MCTformer's recipe).

    Rescale by U(low, high) (bilinear image, nearest labels; sizes ``int(H * s)`` x ``int(W * s)`` as MCTformer),
    horizontal flip, ImageNet normalisation, random ``crop`` x ``crop`` window padded where the image is smaller
    (image 0 after normalisation, labels 255). MCTformer draws one scale per batch and pads at the bottom/right
    with label 0 (background); here the scale is drawn per image and the padding is ignored, as METHOD.md 4.5
    describes the recipe.

    Returns ``{"id", "image": float 3 x crop x crop, "mask": int64 crop x crop}``.
    """

    def __init__(self, crop: int, scale_range: Sequence[float] = (0.7, 1.3)) -> None:
        self.crop = crop
        self.low, self.high = float(scale_range[0]), float(scale_range[1])
        self.flip = v2.RandomHorizontalFlip(0.5)
        self.random_crop = _random_crop(crop)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = tv_tensors.Image(sample["image"])
        mask = tv_tensors.Mask(sample["mask"])
        scale = self.low + (self.high - self.low) * float(torch.rand(()))
        height, width = image.shape[-2:]
        size = [max(1, int(height * scale)), max(1, int(width * scale))]
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        mask = F.resize(mask, size, interpolation=InterpolationMode.NEAREST)
        image, mask = self.flip(image, mask)
        image = tv_tensors.Image(normalize(image))
        image, mask = self.random_crop(image, mask)
        return {"id": sample["id"], "image": image.as_subclass(torch.Tensor),
                "mask": mask.as_subclass(torch.Tensor).to(torch.int64)}


__all__ = ["AffinityTrainTransform", "LabelFolderDataset", "SegTrainTransform", "dataset_image", "dataset_image_size",
           "name_missing"]
