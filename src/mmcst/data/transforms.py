"""Training and test pipelines on torchvision.transforms.v2, moving image and mask together.

A pipeline maps a dataset sample ``{"id", "image": uint8 3xHxW, "labels", "mask": HxW or None}`` to the
same dict with ``image`` float32 ImageNet-normalised and ``mask`` int64 (transformed with nearest
interpolation; area outside the image is 255 = ignore). Training recipes (METHOD.md 5.3):

* ``mctformer``: RandomResizedCrop (scale (min, 1), ratio 3/4-4/3, bicubic) + horizontal flip 0.5 +
  RandAugment + normalisation + RandomErasing (p 0.25, per-pixel normal noise), the timm
  ``create_transform`` pipeline MCTformer trains with;
* ``light``: RandomResizedCrop + flip;
* ``none``: resize to SxS.

RandAugment is timm's own ``rand-m9-mstd0.5-inc1`` (PIL): 2 ops drawn with replacement from timm's 15
"increasing" ops (AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing, SolarizeIncreasing, SolarizeAdd,
Color/Contrast/Brightness/SharpnessIncreasing, ShearX/Y, TranslateX/YRel), each applied with probability 0.5
at a magnitude drawn from N(9, 0.5) clipped to [0, 10], bicubic with mean-pixel fill. Its sampling is timm's
code (python ``random`` and numpy's global RNG, which the engine seeds per sample); the only addition is the
mask: rotate, shear and translate are replayed on it with the sampled arguments, nearest and ignore fill.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
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
RANDAUGMENT_CONFIG = "rand-m9-mstd0.5-inc1"  # MCTformer's (DeiT's) --aa default
# timm's ops that move pixels: replayed on the mask; all others change colours only.
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"})


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 ImageNet-normalised."""
    return F.normalize(F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True),
                       list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize``: float [..., 3, H, W] back to [0, 1] pixel scale (not clamped: erased pixels may leave it)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return image * std + mean


@dataclass
class _JointSample:
    """What flows through timm's RandAugment in place of a PIL image: the image, its mask, the ops applied."""

    image: Image.Image
    mask: Optional[Image.Image]
    applied: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)


class _JointOpFunction:
    """Stands in for a timm ``AugmentOp.aug_fn``: runs timm's function on the image and, for a geometric op,
    again on the mask with the same sampled arguments, nearest interpolation and the ignore fill."""

    def __init__(self, name: str, function: Callable[..., Image.Image]) -> None:
        self.name, self.function = name, function

    def __call__(self, sample: _JointSample, *level_args: Any, **kwargs: Any) -> _JointSample:
        if self.name.startswith("Posterize") and level_args[0] <= 0:
            # PosterizeIncreasing keeps 0 bits at magnitude 10 (2% of the N(9, 0.5) draws); Pillow >= 11 refuses
            # 0 bits, the Pillow releases timm was written against returned the all-black image: do that.
            image = Image.new(sample.image.mode, sample.image.size)
        else:
            image = self.function(sample.image, *level_args, **kwargs)
        mask = sample.mask
        if mask is not None and self.name in GEOMETRIC_OPS:
            mask = self.function(mask, *level_args, **{**kwargs, "resample": Image.Resampling.NEAREST,
                                                       "fillcolor": IGNORE_INDEX})
        return _JointSample(image, mask, sample.applied + [(self.name, tuple(level_args))])


class JointRandAugment:
    """timm's RandAugment (``rand-m9-mstd0.5-inc1`` by default), with its geometric ops replayed on the mask.

    The transform is timm's own ``rand_augment_transform`` with the hyper-parameters timm's ``create_transform``
    gives it (bicubic, mean-pixel fill, ``translate_const`` = 0.45 x crop), so op choice, application and
    magnitude noise are timm's code drawing from python's ``random`` and numpy's global RNGs. Each op's
    ``aug_fn`` is wrapped so that the image travels together with its mask: a geometric op (rotate, shear,
    translate) is run a second time on the mask with the arguments just sampled for the image.
    """

    def __init__(self, image_size: int = 224, config: str = RANDAUGMENT_CONFIG,
                 interpolation: Image.Resampling = Image.Resampling.BICUBIC,
                 ops: Optional[Sequence[str]] = None) -> None:
        """``ops``: restrict timm's op list to these names (tests); None = the list ``config`` implies."""
        self.config = config
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(_IMAGE_FILL),
                   "interpolation": interpolation}
        self.transform = rand_augment_transform(config, hparams, transforms=list(ops) if ops is not None else None)
        for op in self.transform.ops:
            op.aug_fn = _JointOpFunction(op.name, op.aug_fn)

    @property
    def op_names(self) -> list[str]:
        return [op.name for op in self.transform.ops]

    def apply(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None
              ) -> tuple[tv_tensors.Image, Optional[tv_tensors.Mask], list[tuple[str, tuple[Any, ...]]]]:
        """Augment a uint8 3xHxW image (and its HxW mask); also returns the ops applied with their arguments."""
        pil_mask = None
        if mask is not None:
            values = mask.as_subclass(torch.Tensor)
            if values.numel() and (int(values.min()) < 0 or int(values.max()) > 255):
                raise ValueError(f"RandAugment: mask values must be in 0..255, got "
                                 f"{int(values.min())}..{int(values.max())}")
            pil_mask = Image.fromarray(values.to(torch.uint8).contiguous().numpy())
        out = self.transform(_JointSample(F.to_pil_image(image.as_subclass(torch.Tensor)), pil_mask))
        new_image = tv_tensors.Image(F.pil_to_tensor(out.image))
        new_mask = None
        if mask is not None:
            new_mask = tv_tensors.Mask(torch.from_numpy(np.array(out.mask)).to(mask.dtype))
        return new_image, new_mask, out.applied

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None
                 ) -> tuple[tv_tensors.Image, Optional[tv_tensors.Mask]]:
        image, mask, _ = self.apply(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, ops={self.op_names})"


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
    return JointTransform(geometric, JointRandAugment(image_size),
                          v2.RandomErasing(p=0.25, value="random"))


def test_transform() -> JointTransform:
    """Normalisation only, at the original size (multi-scale inference resizes later)."""
    return JointTransform()
