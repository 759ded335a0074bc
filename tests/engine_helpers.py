"""A tiny model and a tiny file-backed dataset implementing the mmcst contracts, for the engine tests.

Everything here is top-level (picklable) so data-loader workers and spawned distributed processes can
use it. ``TEST_BUILDERS`` plugs them into ``train``/``infer`` through :class:`mmcst.engine.builders.Builders`.
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcst.config import Config, DataConfig, ModelConfig, from_dict
from mmcst.data.base import DatasetError, read_image
from mmcst.engine.builders import Builders
from mmcst.models.base import Localization, LocalizationModel

CLASS_NAMES = ["disc", "square", "bar"]
COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 70, 230]], np.uint8)


# --------------------------------------------------------------------------------------------------
# dataset


class TinyDataset:
    """Random-noise images with coloured rectangles (one colour per class), written as PNG files.

    Image sizes cycle through ``sizes`` so inference sees several shapes. Masks are kept in memory.
    """

    def __init__(self, root: str | Path, split: str, n: int = 12, sizes: Sequence[tuple[int, int]] = ((32, 40),),
                 seed: int = 0, **unused: Any) -> None:
        if split == "missing":
            raise DatasetError(f"{root}: split file for 'missing' not found")
        self.root = Path(root) / split
        self.class_names = list(CLASS_NAMES)
        rng = np.random.default_rng([seed, len(split)])
        self.ids = [f"{split}_{i:03d}" for i in range(n)]
        self._labels: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self.root.mkdir(parents=True, exist_ok=True)
        for i, image_id in enumerate(self.ids):
            height, width = sizes[i % len(sizes)]
            image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            mask = np.zeros((height, width), np.int64)
            labels = np.zeros(len(CLASS_NAMES), np.float32)
            present = rng.random(len(CLASS_NAMES)) < 0.5
            if i % 5 == 4:
                present[:] = False  # some images without any label
            for c in np.flatnonzero(present):
                h, w = rng.integers(6, height // 2), rng.integers(6, width // 2)
                y, x = rng.integers(0, height - h), rng.integers(0, width - w)
                image[y:y + h, x:x + w] = COLOURS[c]
                mask[y:y + h, x:x + w] = c + 1
                labels[c] = 1.0
            self._labels.append(labels)
            self._masks.append(mask)
            path = self.root / f"{image_id}.png"
            if not path.exists():
                from PIL import Image

                Image.fromarray(image).save(path)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.root / f"{self.ids[index]}.png"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": self.ids[index], "image": read_image(self.image_path(index)),
                "labels": torch.from_numpy(self._labels[index]), "mask": torch.from_numpy(self._masks[index])}

    def get_labels(self, index: int) -> np.ndarray:
        return self._labels[index]

    def get_mask(self, index: int) -> np.ndarray:
        return self._masks[index].astype(np.uint8)

    def label_matrix(self) -> np.ndarray:
        return np.stack(self._labels)

    def has_masks(self) -> bool:
        return True


def build_tiny_dataset(name: str, root: str, split: str, **kwargs: Any) -> TinyDataset:
    sizes = ((32, 40), (40, 32), (36, 36)) if split == "test" else ((32, 40),)
    n = {"train": 12, "val": 6, "test": 7}.get(split, 6)
    return TinyDataset(root, split, n=n, sizes=sizes)


class TinyAugment:
    """Resize + random flip + noise + brightness: draws from torch, python and numpy RNGs."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"].float()[None] / 255.0
        image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = image * (0.8 + 0.4 * random.random()) + float(np.random.normal(0, 0.02))
        image = image + 0.05 * torch.randn_like(image)
        return {"id": sample["id"], "image": (image - 0.5) / 0.25, "labels": sample["labels"]}


def tiny_train_transform(data: DataConfig) -> TinyAugment:
    return TinyAugment(data.image_size)


def tiny_normalize(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255.0 - 0.5) / 0.25


# --------------------------------------------------------------------------------------------------
# models


class TinyNet(LocalizationModel):
    """Two stride-2 convs (maps at stride 4), dropout, a 1x1 class head; affinity = softmax feature similarity."""

    def __init__(self, class_names: Sequence[str], width: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_classes = len(class_names)
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Conv2d(width, self.num_classes, 1)
        self.class_bias = nn.Parameter(torch.zeros(self.num_classes, 2))  # 2-D "token", excluded from decay

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.drop(F.relu(self.conv1(images)))))

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        maps = self.head(self.features(images))
        return {"logits": maps.mean(dim=(2, 3)) + self.class_bias.sum(1), "maps": maps}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"cls": F.multilabel_soft_margin_loss(outputs["logits"], batch["labels"]),
                "reg": 1e-3 * F.relu(outputs["maps"]).mean()}

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        feats = self.features(images)
        maps = F.softplus(self.head(feats))  # strictly positive: every normalised map reaches 1
        affinity = None
        if need_affinity:
            tokens = feats.flatten(2).transpose(1, 2)  # B x N x D
            affinity = torch.softmax(tokens @ tokens.transpose(1, 2) / tokens.shape[-1] ** 0.5, dim=-1)
        return Localization(maps=maps, affinity=affinity)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)["logits"]

    def no_weight_decay(self) -> set[str]:
        return {"class_bias"}


class NaNNet(TinyNet):
    """Its ``reg`` loss term becomes NaN at the ``nan_at``-th call of ``loss``."""

    nan_at = 3

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names)
        self.calls = 0

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls += 1
        terms = super().loss(outputs, batch)
        if self.calls == self.nan_at:
            terms["reg"] = terms["reg"] * float("nan")
        return terms


class Interrupted(Exception):
    """Stands for a killed process in the resume test."""


class InterruptedNet(TinyNet):
    """Raises :class:`Interrupted` at the ``stop_at``-th forward call (the run dies mid-training)."""

    stop_at = 4

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names)
        self.calls = 0

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise Interrupted(f"killed at forward call {self.calls}")
        return super().forward(images, labels, extras)


BUILT: list[TinyNet] = []  # the models built in this process, last one last


def build_tiny_model(model_cfg: ModelConfig, class_names: Sequence[str]) -> TinyNet:
    torch.manual_seed(1234)  # the same initial weights in every run, whatever the RNG state
    model = TinyNet(class_names, dropout=2 * model_cfg.backbone.drop_path_rate)
    BUILT.append(model)
    return model


def build_nan_model(model_cfg: ModelConfig, class_names: Sequence[str]) -> TinyNet:
    torch.manual_seed(1234)
    return NaNNet(class_names)


def build_interrupted_model(model_cfg: ModelConfig, class_names: Sequence[str]) -> TinyNet:
    torch.manual_seed(1234)
    return InterruptedNet(class_names)


TEST_BUILDERS = Builders(model=build_tiny_model, dataset=build_tiny_dataset, train_transform=tiny_train_transform,
                         normalize=tiny_normalize)


def builders_with(model: Any) -> Builders:
    return Builders(model=model, dataset=build_tiny_dataset, train_transform=tiny_train_transform,
                    normalize=tiny_normalize)


def tiny_config(tmp_path: Path, name: str = "run", **train: Any) -> Config:
    """A CPU config for the tiny model: 12 train images, batch 4 (3 steps/epoch), image size 32."""
    return from_dict({
        "name": name, "out_dir": str(tmp_path / "runs"), "seed": 7, "device": "cpu",
        "data": {"root": str(tmp_path / "data"), "train_split": "train", "val_split": "val",
                 "image_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.5, "warmup_epochs": 0.5, "min_lr": 1e-4,
                  "log_every": 1, "amp": False, **train},
        "infer": {"scales": [1.0, 0.75], "flip": True, "refine": True, "batch_size": 3},
    })


def state_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------------------------------
# distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ddp_worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    """One ``torchrun``-like process: the environment variables, ``train`` (saving its final weights), ``infer``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mmcst.engine.infer import infer
    from mmcst.engine.train import train

    run_dir = train(from_dict(cfg_dict), progress=False, builders=TEST_BUILDERS)
    torch.save(BUILT[-1].state_dict(), Path(out_dir) / f"rank{rank}.pt")
    result = infer(run_dir, "test", pseudo_labels=True, progress=False, builders=TEST_BUILDERS)
    (Path(out_dir) / f"infer{rank}.json").write_text(json.dumps(result["infer"]))
