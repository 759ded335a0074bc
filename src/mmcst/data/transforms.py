"""Training and test pipelines on torchvision.transforms.v2, moving image and mask together.

A pipeline maps a dataset sample ``{"id", "image": uint8 3xHxW, "labels", "mask": HxW or None}`` to the
same dict with ``image`` float32 ImageNet-normalised and ``mask`` int64 (transformed with nearest
interpolation; area outside the image is 255 = ignore). Training recipes (METHOD.md 5.3):

* ``mctformer``: RandomResizedCrop (scale (min, 1), ratio 3/4-4/3, bicubic) + horizontal flip 0.5 +
  RandAugment (2 ops, magnitude 9) + normalisation + RandomErasing (p 0.25, per-pixel normal noise),
  the timm ``create_transform`` pipeline MCTformer trains with;
* ``light``: RandomResizedCrop + flip;
* ``none``: resize to SxS.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mmcst.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("mctformer", "light", "none")
# timm fills the area uncovered by rotate/shear/translate with the dataset mean pixel ("img_mean").
_IMAGE_FILL = [round(255 * m) for m in IMAGENET_MEAN]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 ImageNet-normalised."""
    return F.normalize(F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True),
                       list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize``: float [..., 3, H, W] back to [0, 1] pixel scale (not clamped: erased pixels may leave it)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return image * std + mean


class JointRandAugment(v2.RandAugment):
    """torchvision's RandAugment, with its geometric ops applied to the mask too.

    torchvision's ``RandAugment`` refuses masks, so this runs its own op sampling loop (the same as
    ``RandAugment.forward``) and replays each geometric op on the mask with nearest interpolation and
    the ignore fill. Photometric ops touch the image only.

    Differences from timm's ``rand-m9-mstd0.5-inc1`` used by MCTformer: torchvision applies each sampled
    op always (timm with probability 0.5), uses a fixed magnitude (timm draws it from N(9, 0.5)), has an
    ``Identity`` op and no ``SolarizeAdd``/``Invert``, and rotates/shears tensors bilinearly (timm: PIL
    bicubic). ``num_magnitude_bins=11`` puts magnitude 9 at 0.9 of each op's range, timm's m/10 scale.
    """

    _GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 11) -> None:
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins,
                         interpolation=InterpolationMode.BILINEAR,
                         fill={tv_tensors.Image: _IMAGE_FILL, tv_tensors.Mask: IGNORE_INDEX})

    def forward(self, image: tv_tensors.Image, mask: Optional[tv_tensors.Mask] = None  # type: ignore[override]
                ) -> tuple[tv_tensors.Image, Optional[tv_tensors.Mask]]:
        height, width = F.get_size(image)
        for _ in range(self.num_ops):
            op, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[self.magnitude])
                if signed and torch.rand(()) <= 0.5:
                    magnitude *= -1
            image = self._apply_image_or_video_transform(image, op, magnitude, interpolation=self.interpolation,
                                                         fill=self._fill)
            if mask is not None and op in self._GEOMETRIC_OPS:
                mask = self._apply_image_or_video_transform(mask, op, magnitude,
                                                            interpolation=InterpolationMode.NEAREST, fill=self._fill)
        return image, mask


class JointTransform:
    """Apply geometric transforms to image and mask together, then normalise (and erase) the image."""

    def __init__(self, geometric: Optional[v2.Transform] = None, randaugment: Optional[JointRandAugment] = None,
                 erasing: Optional[v2.RandomErasing] = None) -> None:
        self.geometric = geometric
        self.randaugment = randaugment
        self.erasing = erasing

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = tv_tensors.Image(sample["image"])
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"sample {sample.get('id')!r}: expected a uint8 3xHxW image, got "
                             f"{image.dtype} {tuple(image.shape)}")
        mask = sample.get("mask")
        mask = None if mask is None else tv_tensors.Mask(mask)
        if mask is not None and mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"sample {sample.get('id')!r}: mask {tuple(mask.shape)} does not match image "
                             f"{tuple(image.shape)}")
        if self.geometric is not None:
            if mask is None:
                image = self.geometric(image)
            else:
                image, mask = self.geometric(image, mask)
        if self.randaugment is not None:
            image, mask = self.randaugment(image, mask)
        out_image = normalize(image)
        if self.erasing is not None:
            out_image = self.erasing(out_image)
        out = dict(sample)
        out["image"] = out_image
        out["mask"] = None if mask is None else mask.as_subclass(torch.Tensor).to(torch.int64)
        return out

    def __repr__(self) -> str:
        parts = [repr(t) for t in (self.geometric, self.randaugment) if t is not None]
        parts.append(f"Normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD})")
        if self.erasing is not None:
            parts.append(repr(self.erasing))
        return f"{type(self).__name__}({', '.join(parts)})"


def train_transform(image_size: int, augment: str = "mctformer", rrc_scale_min: float = 0.08) -> JointTransform:
    """The training pipeline (module docstring) producing ``image_size`` x ``image_size`` crops."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if not 0.0 < rrc_scale_min <= 1.0:
        raise ValueError(f"rrc_scale_min must be in (0, 1], got {rrc_scale_min}")
    if augment == "none":
        return JointTransform(v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC))
    geometric = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(rrc_scale_min, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(0.5),
    ])
    if augment == "light":
        return JointTransform(geometric)
    # value="random" fills each erased pixel with N(0, 1) noise in normalised space: timm's mode "pixel".
    return JointTransform(geometric, JointRandAugment(num_ops=2, magnitude=9),
                          v2.RandomErasing(p=0.25, value="random"))


def test_transform() -> JointTransform:
    """Normalisation only, at the original size (multi-scale inference resizes later)."""
    return JointTransform()
