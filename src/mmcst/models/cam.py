"""CAM baseline (Zhou et al., CVPR 2016) on a timm ResNet (poster: ResNet-50).

Features ``F`` (B x K x h x w) from the ResNet trunk at output stride 32, 16 or 8; a bias-free 1x1
classifier ``w`` (C x K). Training: logits = ``w`` applied to the globally average-pooled features, loss
``cls`` = MLSM. Localization: the poster's CAM equation ``A^c = ReLU(sum_k w_c^k F^k)``. GAP and the
bias-free linear classifier commute, so the maps average to the logits.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mmcst.losses import mlsm
from mmcst.models.base import Localization, LocalizationModel
from mmcst.models.registry import register_model
from mmcst.models.weights import load_resnet_weights

_OUTPUT_STRIDES = (8, 16, 32)


class CAMModel(LocalizationModel):
    """ResNet trunk + bias-free 1x1 classifier (CAM)."""

    # Measured on 2 CPU cores (ResNet-10-T, output stride 8): training steps 12% and maps 25% faster.
    memory_format = torch.channels_last

    def __init__(self, class_names: Sequence[str], backbone: str = "resnet50", output_stride: int = 16,
                 weights: Optional[str] = None) -> None:
        super().__init__()
        if output_stride not in _OUTPUT_STRIDES:
            raise ValueError(f"model.cam.output_stride: expected one of {list(_OUTPUT_STRIDES)}, got {output_stride}")
        if not class_names:
            raise ValueError("CAM: expected at least one class name")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        try:
            # Dilating the last stage(s) keeps the pretrained filters and enlarges the map (IRN uses 16).
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="",
                                              output_stride=output_stride)
        except Exception as exc:  # unknown name or a model without output_stride support
            raise ValueError(f"model.backbone.name: cannot build timm ResNet {backbone!r} at output stride "
                             f"{output_stride} ({exc})") from exc
        self.output_stride = output_stride
        self.classifier = nn.Conv2d(self.backbone.num_features, self.num_classes, kernel_size=1, bias=False)
        self._reports: list[dict[str, Any]] = []
        if weights is not None:
            self._reports.append(load_resnet_weights(self.backbone, weights))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)  # B x K x h x w

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        return {"logits": self.classify(images)}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"cls": mlsm(outputs["logits"], batch["labels"])}

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)  # B x C

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        """ReLU(sum_k w_c^k F^k) for every class; CAM has no patch affinity, so ``affinity`` is None."""
        maps = F.relu(self.classifier(self.features(images)))
        return Localization(maps=maps.float(), affinity=None)

    def weight_report(self) -> list[dict[str, Any]]:
        return list(self._reports)


@register_model("cam")
def build_cam(model_cfg: Any, class_names: Sequence[str]) -> CAMModel:
    return CAMModel(class_names, backbone=model_cfg.backbone.name, output_stride=model_cfg.cam.output_stride,
                    weights=model_cfg.backbone.weights)
