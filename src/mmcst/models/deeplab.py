"""Segmentation networks of the WSSS stage, trained on pseudo masks (METHOD.md 4.5).

* ``deeplab_v1`` — the paper's: DeepLab-V1 LargeFOV head on ResNet-38, as MCTformer's
  ``seg/network/resnet38_seg.py``: 3x3 conv dilation 12 (4096 -> 512, bias) + ReLU + 3x3 conv dilation 12
  (512 -> C + 1, bias), Xavier-initialised, no dropout in the head (ResNet-38's own Dropout2d in b6/b7
  stays). Head names ``fc8_seg_conv1`` / ``fc8_seg_conv2`` as MCTformer, so its checkpoints load.
* ``deeplab_v2`` — ASPP of four 3x3 convolutions to C + 1 classes at dilations 6/12/18/24, summed
  (Chen et al., TPAMI 2017), on a timm ResNet-101 trunk at output stride 8.
* ``deeplab_v3`` — torchvision's DeepLabV3 head (``DeepLabHead``: ASPP 12/24/36 + image pooling, 256
  channels) on the same trunk; at ``resnet101`` the model has exactly the tensors of torchvision's
  ``deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=False)`` under the same names.

Contract for the engine (every segmenter, :class:`Segmenter`):

* ``forward(images) -> logits``: ``images`` B x 3 x H x W, RGB, ImageNet mean/std (``input_mean`` /
  ``input_std``); logits B x (C + 1) x ceil(H/8) x ceil(W/8), background first, before softmax. The
  caller upsamples (MCTformer: bilinear, ``align_corners=False``, to the label size) for the
  cross-entropy and for inference.
* ``param_groups(base_lr, weight_decay)``: optimizer groups with ``lr_mult`` per group (head x10 etc.).
* ``load_pretrained(path) -> WeightReport``: backbone weights from a local file.

Nothing downloads: trunks and heads are built with random weights, weight files come from the caller.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from mmcst.models.priors import IMAGENET_MEAN, IMAGENET_STD
from mmcst.models.resnet38 import (
    DEEPLAB_V2_RECIPE,
    MCTFORMER_SEG_RECIPE,
    SEGMENTER_FROZEN_LAYERS,
    LrRecipe,
    ResNet38,
    freeze_layers,
    lr_param_groups,
    resnet_trunk,
    trunk_channels,
)
from mmcst.models.weights import WeightReport, load_resnet38_weights, load_resnet_weights

DEEPLAB_V2_RATES = (6, 12, 18, 24)
LARGEFOV_DILATION = 12


class Segmenter(nn.Module):
    """Base class: a backbone at output stride 8 and a head producing ``num_classes + 1`` logit planes.

    Attributes: ``num_classes`` (foreground classes C), ``num_outputs`` (C + 1), ``output_stride`` (8),
    ``input_mean`` / ``input_std`` (RGB, [0, 1] scale), ``new_layers`` (head modules, the x10 group),
    ``lr_recipe``, ``weight_reports`` (one per loaded file).
    """

    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD
    output_stride = 8
    new_layers: tuple[str, ...] = ()
    lr_recipe: LrRecipe = LrRecipe()
    backbone: nn.Module

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"segmenter: num_classes counts the foreground classes, must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_outputs = num_classes + 1
        self.weight_reports: list[WeightReport] = []

    def features(self, images: Tensor) -> Tensor:
        """The backbone's last feature map, B x K x ceil(H/8) x ceil(W/8)."""
        return self.backbone(images)[-1]

    def param_groups(self, base_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups under ``lr_recipe`` (see :func:`mmcst.models.resnet38.lr_param_groups`).

        MCTformer's optimiser passes its weight decay into SGD's momentum slot (METHOD.md Appendix A.10):
        to reproduce its numbers give ``weight_decay=0`` here and momentum 1e-5 to SGD.
        """
        return lr_param_groups(self, [f"{name}." for name in self.new_layers], base_lr, weight_decay, self.lr_recipe)

    def load_pretrained(self, path: str) -> WeightReport:
        """Backbone weights from a local timm/torchvision ResNet state dict (classifier dropped)."""
        report = WeightReport(**load_resnet_weights(self.backbone, path))
        self.weight_reports.append(report)
        return report


class DeepLabV1LargeFOV(Segmenter):
    """DeepLab-V1 LargeFOV on ResNet-38 (MCTformer's ``resnet38_seg.Net``); the paper's segmenter.

    ``frozen_layers`` (inside the backbone) defaults to MCTformer's ``conv1a``; BN frozen as PSA.
    ``load_pretrained`` takes PSA-layout files: ``res38_cls.pth`` (the recipe's initialisation), the
    converted ImageNet weights, or a whole MCTformer segmentation checkpoint (its head loads too).
    """

    new_layers = ("fc8_seg_conv1", "fc8_seg_conv2")
    lr_recipe = MCTFORMER_SEG_RECIPE

    def __init__(self, num_classes: int, width: float = 1.0, head_channels: Optional[int] = None,
                 frozen_layers: Sequence[str] = SEGMENTER_FROZEN_LAYERS, freeze_bn: bool = True) -> None:
        super().__init__(num_classes)
        self.backbone = ResNet38(width, frozen_layers, freeze_bn)
        head_channels = head_channels or max(1, round(512 * width))
        self.fc8_seg_conv1 = nn.Conv2d(self.backbone.out_channels, head_channels, 3, padding=LARGEFOV_DILATION,
                                       dilation=LARGEFOV_DILATION, bias=True)
        self.fc8_seg_conv2 = nn.Conv2d(head_channels, self.num_outputs, 3, padding=LARGEFOV_DILATION,
                                       dilation=LARGEFOV_DILATION, bias=True)
        nn.init.xavier_uniform_(self.fc8_seg_conv1.weight)
        nn.init.xavier_uniform_(self.fc8_seg_conv2.weight)

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc8_seg_conv2(torch.relu(self.fc8_seg_conv1(self.features(images))))

    def load_pretrained(self, path: str) -> WeightReport:
        report = load_resnet38_weights(self, path)
        self.weight_reports.append(report)
        return report


class SummedASPP(nn.Module):
    """DeepLab-V2's classifier: parallel 3x3 dilated convolutions straight to the classes, summed."""

    def __init__(self, in_channels: int, num_outputs: int, rates: Sequence[int] = DEEPLAB_V2_RATES) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_outputs, 3, padding=rate, dilation=rate, bias=True) for rate in rates)
        for conv in self.convs:  # DeepLab-V2's initialisation of its classifier
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([conv(x) for conv in self.convs]).sum(dim=0)


class DeepLabV2(Segmenter):
    """DeepLab-V2 (ASPP-L, summed branches) on a timm ResNet trunk at output stride 8."""

    new_layers = ("classifier",)
    lr_recipe = DEEPLAB_V2_RECIPE

    def __init__(self, num_classes: int, backbone: str = "resnet101", rates: Sequence[int] = DEEPLAB_V2_RATES,
                 frozen_layers: Sequence[str] = (), freeze_bn: bool = True) -> None:
        super().__init__(num_classes)
        self.backbone = resnet_trunk(backbone, out_indices=(4,), freeze_bn=freeze_bn)
        freeze_layers(self.backbone, frozen_layers)
        self.classifier = SummedASPP(trunk_channels(self.backbone)[-1], self.num_outputs, rates)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


class DeepLabV3(Segmenter):
    """torchvision's DeepLabV3 head on a timm ResNet trunk at output stride 8 (logits not upsampled).

    The head keeps its own (trainable) batch norm; ``freeze_bn`` concerns the backbone only.
    """

    new_layers = ("classifier",)
    lr_recipe = LrRecipe()  # METHOD.md 4.5: head x10

    def __init__(self, num_classes: int, backbone: str = "resnet101", frozen_layers: Sequence[str] = (),
                 freeze_bn: bool = True) -> None:
        super().__init__(num_classes)
        self.backbone = resnet_trunk(backbone, out_indices=(4,), freeze_bn=freeze_bn)
        freeze_layers(self.backbone, frozen_layers)
        self.classifier = DeepLabHead(trunk_channels(self.backbone)[-1], self.num_outputs)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "deeplab_v1": DeepLabV1LargeFOV,
    "deeplab_v2": DeepLabV2,
    "deeplab_v3": DeepLabV3,
}


def build_segmenter(name: str, num_classes: int, backbone_weights: Optional[str] = None, width: float = 1.0,
                    backbone: Optional[str] = None, freeze_bn: bool = True,
                    frozen_layers: Optional[Sequence[str]] = None) -> Segmenter:
    """Build a segmenter by name; load ``backbone_weights`` (a local file) if given.

    Args:
        name: ``deeplab_v1`` (ResNet-38, the paper's), ``deeplab_v2`` or ``deeplab_v3``.
        num_classes: foreground classes C (VOC 20, COCO 80); the logits have C + 1 planes, background first.
        backbone_weights: ``deeplab_v1``: a PSA-layout ResNet-38 file (``res38_cls.pth``); the others: a
            timm/torchvision ResNet state dict of ``backbone``.
        width: ResNet-38 channel multiplier (tests); only for ``deeplab_v1``.
        backbone: timm ResNet name for ``deeplab_v2``/``v3`` (default ``resnet101``); not for ``deeplab_v1``.
        freeze_bn: freeze the backbone's batch norm (PSA/MCTformer's recipe; small batches).
        frozen_layers: untrained backbone layers; default ``conv1a`` for ``deeplab_v1``, none otherwise.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"segmenter: unknown name {name!r}; expected one of {sorted(SEGMENTERS)}")
    kwargs: dict[str, Any] = {"freeze_bn": freeze_bn}
    if frozen_layers is not None:
        kwargs["frozen_layers"] = frozen_layers
    if name == "deeplab_v1":
        if backbone not in (None, "resnet38"):
            raise ValueError(f"segmenter deeplab_v1: the backbone is ResNet-38, got backbone={backbone!r}")
        model = SEGMENTERS[name](num_classes, width=width, **kwargs)
    else:
        if width != 1.0:
            raise ValueError(f"segmenter {name}: width applies to ResNet-38 only; pick a smaller timm backbone instead")
        model = SEGMENTERS[name](num_classes, backbone=backbone or "resnet101", **kwargs)
    if backbone_weights is not None:
        model.load_pretrained(backbone_weights)
    return model
