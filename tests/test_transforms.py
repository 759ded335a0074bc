from __future__ import annotations

import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_choices
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mmcst.data import transforms
from mmcst.data.transforms import (GEOMETRIC_OPS, IMAGENET_MEAN, IMAGENET_STD, RANDAUGMENT_CONFIG, JointRandAugment,
                                   denormalize, normalize, train_transform)
from mmcst.engine.train import seeded_rng


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


def _textured_image(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def test_randaugment_is_timms_own_transform_and_the_mask_does_not_change_its_draws() -> None:
    """Bit-identical to timm's create_transform(auto_augment="rand-m9-mstd0.5-inc1", bicubic) RandAugment."""
    _, secondary, _ = create_transform(32, is_training=True, auto_augment=RANDAUGMENT_CONFIG,
                                       interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, separate=True)
    reference = secondary.transforms[0]
    ours = JointRandAugment(32)
    assert ours.op_names == [op.name for op in reference.ops]
    image = _textured_image(32, 32)
    mask = tv_tensors.Mask(torch.randint(0, 4, (32, 32), generator=torch.Generator().manual_seed(1)))
    changed = 0
    for seed in range(60):
        _seed(seed)
        try:
            expected = F.pil_to_tensor(reference(F.to_pil_image(image)))
        except ValueError as exc:  # timm's 0-bit posterize on Pillow >= 11: see the test below
            assert "bits" in str(exc)
            continue
        _seed(seed)
        with_mask, _ = ours(tv_tensors.Image(image), mask)
        _seed(seed)
        without_mask, none = ours(tv_tensors.Image(image))
        assert torch.equal(with_mask, expected) and torch.equal(without_mask, expected) and none is None, seed
        changed += int(not torch.equal(expected, image))
    assert changed >= 40  # P(no op applied) = 0.25


def test_randaugment_op_statistics_follow_rand_m9_mstd05_inc1() -> None:
    """Over many seeded draws: timm's 15 increasing ops, each chosen 2x with replacement and applied with
    probability 0.5 (so an op appears 1/15 times per image), magnitude N(9, 0.5) clipped to [0, 10]."""
    augment = JointRandAugment(16)
    assert augment.op_names == rand_augment_choices("", increasing=True)
    assert {"Invert", "SolarizeAdd", "PosterizeIncreasing"} <= set(augment.op_names)
    image = tv_tensors.Image(_textured_image(8, 8))
    draws = 1500
    counts: Counter = Counter()
    per_image: Counter = Counter()
    magnitudes: list[float] = []
    signs: list[bool] = []
    _seed(123)
    for _ in range(draws):
        _, _, applied = augment.apply(image)
        per_image[len(applied)] += 1
        for name, args in applied:
            counts[name] += 1
            # Rotate: 30 degrees at magnitude 10; shear 0.3; translate 0.45 of the side (timm's level functions).
            scale = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
            if name in scale:
                magnitudes.append(abs(args[0]) / scale[name] * 10)
                signs.append(args[0] < 0)
    assert set(counts) == set(augment.op_names)
    expected = draws * 2 * 0.5 / 15  # 100 per op
    for name, count in counts.items():
        assert abs(count - expected) < 5 * expected ** 0.5, (name, count)
    # Ops applied per image: Binomial(2, 0.5) -> 0, 1, 2 with 1/4, 1/2, 1/4.
    for k, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(per_image[k] / draws - p) < 5 * (p * (1 - p) / draws) ** 0.5, (k, per_image[k])
    magnitudes_np = np.array(magnitudes)
    assert magnitudes_np.max() <= 10 + 1e-9 and len(magnitudes_np) > 400
    assert abs(magnitudes_np.mean() - 9.0) < 0.07  # clipping at 10 lowers the mean by only ~0.004
    assert 0.42 < magnitudes_np.std() < 0.52  # std 0.5, a little less after clipping at 10 (2 sigma)
    assert abs(np.mean(signs) - 0.5) < 0.06


def test_posterize_to_zero_bits_gives_a_black_image() -> None:
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits: black, as with the Pillow timm was written for."""
    augment = JointRandAugment(16, config="rand-m10-p1.0-inc1", ops=["PosterizeIncreasing"])
    image, _, applied = augment.apply(tv_tensors.Image(_textured_image() | 1))
    assert applied == [("PosterizeIncreasing", (0,))] * 2 and not image.any()
    image, _, applied = JointRandAugment(16, config="rand-m9-p1.0-inc1", ops=["PosterizeIncreasing"]).apply(
        tv_tensors.Image(_textured_image()))
    assert applied[0] == ("PosterizeIncreasing", (1,)) and set(image.unique().tolist()) <= {0, 128}


GEOMETRIC = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def test_randaugment_moves_the_mask_exactly_like_the_image() -> None:
    """The mask is drawn from the image content (grey level = 20 x class): with nearest sampling for the image
    too, every geometric op must keep them equal pixel for pixel, with the image fill where the mask is 255."""
    augment = JointRandAugment(48, interpolation=Image.Resampling.NEAREST, ops=GEOMETRIC)
    sample = _square_sample()
    mask = sample["mask"].clone()
    mask[30:40, 40:60] = 1
    image = tv_tensors.Image((mask * 20).to(torch.uint8).expand(3, -1, -1).clone())
    moved = 0
    _seed(5)
    for _ in range(40):
        out_image, out_mask, applied = augment.apply(image, tv_tensors.Mask(mask))
        inside = out_mask != 255
        assert torch.equal(out_image[0][inside].long(), out_mask[inside] * 20)
        mean_pixel = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
        assert (out_image[:, ~inside] == mean_pixel[:, None]).all()  # image: timm's mean-pixel fill
        moved += int(bool(applied))
        assert bool(applied) == (not torch.equal(out_mask, mask)), applied
    assert moved >= 25  # P(no op applied) = 0.25


def test_randaugment_mask_follows_bicubic_image() -> None:
    """With the real (bicubic) interpolation the mask still covers the moved square."""
    augment = JointRandAugment(48, ops=GEOMETRIC)
    sample = _square_sample()
    _seed(6)
    for _ in range(20):
        image, mask = augment(tv_tensors.Image(sample["image"]), tv_tensors.Mask(sample["mask"]))
        square, bright = mask == 3, image[0] > 127
        assert (bright & square).sum() >= 0.9 * square.sum() and (bright & ~square).sum() <= 0.1 * square.sum() + 8


def test_randaugment_photometric_ops_leave_mask() -> None:
    photometric = [name for name in JointRandAugment().op_names if name not in GEOMETRIC_OPS]
    assert len(photometric) == 10
    augment = JointRandAugment(48, ops=photometric)
    sample = _square_sample()
    changed = 0
    _seed(3)
    for _ in range(20):
        image, mask = augment(tv_tensors.Image(sample["image"]), tv_tensors.Mask(sample["mask"]))
        assert torch.equal(mask, sample["mask"])
        changed += int(not torch.equal(image, sample["image"]))
    assert changed >= 5


def test_training_pipeline_repeats_under_the_engines_per_sample_seeding() -> None:
    transform = train_transform(32, "mctformer")
    outputs = []
    for _ in range(2):
        with seeded_rng(11):
            outputs.append(transform(_square_sample()))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"]) and torch.equal(outputs[0]["mask"], outputs[1]["mask"])
    with seeded_rng(12):
        other = transform(_square_sample())
    assert not torch.equal(other["image"], outputs[0]["image"])


def test_randaugment_rejects_masks_outside_a_byte() -> None:
    with pytest.raises(ValueError, match="mask values must be in 0..255"):
        JointRandAugment()(tv_tensors.Image(_textured_image()), tv_tensors.Mask(torch.full((24, 32), 300)))


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
