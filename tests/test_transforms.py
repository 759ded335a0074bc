from __future__ import annotations

import pickle

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode

from mmcst.data import transforms
from mmcst.data.transforms import IMAGENET_MEAN, IMAGENET_STD, JointRandAugment, denormalize, normalize, train_transform


def _square_sample(h: int = 48, w: int = 64) -> dict:
    """White square on black, and the same square as class 3 in the mask (left of centre, so flips show)."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, 12:36, 8:32] = 255
    mask = torch.zeros(h, w, dtype=torch.int64)
    mask[12:36, 8:32] = 3
    return {"id": "x", "image": image, "labels": torch.tensor([0.0, 0.0, 1.0]), "mask": mask}


@pytest.mark.parametrize("augment", ["mctformer", "light", "none"])
def test_output_shapes_dtypes_and_mask_values(augment: str) -> None:
    torch.manual_seed(0)
    transform = train_transform(32, augment)
    for _ in range(10):
        out = transform(_square_sample())
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (32, 32) and out["mask"].dtype == torch.int64
        assert set(out["mask"].unique().tolist()) <= {0, 3, 255}
        assert out["id"] == "x" and torch.equal(out["labels"], torch.tensor([0.0, 0.0, 1.0]))
    no_mask = dict(_square_sample(), mask=None)
    assert transform(no_mask)["mask"] is None
    pickle.loads(pickle.dumps(transform))  # data-loader workers receive it pickled


def test_light_keeps_image_and_mask_aligned() -> None:
    torch.manual_seed(1)
    transform = train_transform(32, "light", rrc_scale_min=0.3)
    checked = 0
    for _ in range(30):
        out = transform(_square_sample())
        square = out["mask"] == 3
        if square.sum() < 30:
            continue
        bright = denormalize(out["image"]).mean(0) > 0.5
        iou = (bright & square).sum() / (bright | square).sum()
        assert iou > 0.75, iou  # a missed flip or crop offset gives far less
        checked += 1
    assert checked >= 10


def test_none_resizes_mask_with_nearest() -> None:
    out = train_transform(24, "none")(_square_sample())
    expected = torch.zeros(24, 24, dtype=torch.int64)
    expected[6:18, 3:12] = 3  # 48x64 -> 24x24: rows /2, cols *3/8
    assert torch.equal(out["mask"], expected)


class _GeometricOnly(JointRandAugment):
    _AUGMENTATION_SPACE = {k: v for k, v in JointRandAugment._AUGMENTATION_SPACE.items()
                           if k in JointRandAugment._GEOMETRIC_OPS}


def test_randaugment_replays_geometric_ops_on_mask() -> None:
    torch.manual_seed(2)
    augment = _GeometricOnly(num_ops=2, magnitude=9)
    augment.interpolation = InterpolationMode.NEAREST  # image and mask then sample identically
    sample = _square_sample()
    moved = 0
    for _ in range(20):
        image, mask = augment(tv_tensors.Image(sample["image"] // 255 * 60), tv_tensors.Mask(sample["mask"]))
        inside = mask != 255
        assert torch.equal(image[0][inside].long(), mask[inside] * 20)
        assert (image[0][~inside] == round(255 * IMAGENET_MEAN[0])).all()  # image fill, mask ignore fill
        moved += int(not torch.equal(mask, tv_tensors.Mask(sample["mask"])))
    assert moved >= 15


def test_randaugment_photometric_ops_leave_mask() -> None:
    class _PhotometricOnly(JointRandAugment):
        _AUGMENTATION_SPACE = {k: v for k, v in JointRandAugment._AUGMENTATION_SPACE.items()
                               if k not in JointRandAugment._GEOMETRIC_OPS}

    torch.manual_seed(3)
    sample = _square_sample()
    for _ in range(10):
        _, mask = _PhotometricOnly()(tv_tensors.Image(sample["image"]), tv_tensors.Mask(sample["mask"]))
        assert torch.equal(mask, sample["mask"])


def test_test_transform_and_normalize_round_trip() -> None:
    sample = _square_sample()
    out = transforms.test_transform()(sample)
    assert out["image"].shape == (3, 48, 64) and torch.equal(out["mask"], sample["mask"])
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out["image"][:, 20, 20], white, atol=1e-6)
    assert torch.allclose(denormalize(normalize(sample["image"])), sample["image"].float() / 255, atol=1e-6)
    batch = torch.stack([sample["image"]] * 2)
    assert normalize(batch).shape == (2, 3, 48, 64)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transform(32, "heavy")
    with pytest.raises(ValueError, match="expected a uint8 3xHxW image"):
        transforms.test_transform()({"id": "y", "image": torch.zeros(3, 4, 4), "mask": None})
