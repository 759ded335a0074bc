"""Backbones of the WSSS stage: the wide ResNet-38 in PSA's layout, and timm/torchvision ResNet trunks.

**ResNet-38** is model A of Wu, Shen and van den Hengel, "Wider or Deeper: Revisiting the ResNet Model
for Visual Recognition" (Pattern Recognition 2019), in the output-stride-8 form PSA (Ahn and Kwak, CVPR
2018) calls ``resnet38d`` and MCTformer's segmentation code reuses. Parameter and buffer names follow
PSA exactly (``conv1a``, ``b2`` ... ``b7``, ``bn7``; inside blocks ``bn_branch2a``, ``conv_branch2a``,
``bn_branch2b1``, ``conv_branch2b1``, ``bn_branch2b2``, ``conv_branch2b2``, ``conv_branch1``), so PSA's
ImageNet weights (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` converted to a ``.pth`` state dict by PSA's
``convert_mxnet_to_torch``) and PSA's VOC classifier ``res38_cls.pth`` load key for key
(:func:`mmcst.models.weights.load_resnet38_weights`).

Layout (channels at ``width=1``; every stage is pre-activation: BN-ReLU before each convolution)::

    conv1a   3x3, 64                                   stride 1
    b2..b2_2 3 blocks 3x3/3x3 -> 128                   stride 2 (1/2)
    b3..b3_2 3 blocks -> 256                           stride 2 (1/4)
    b4..b4_5 6 blocks -> 512                           stride 2 (1/8)
    b5..b5_2 3 blocks -> 1024, dilation 2 (b5's first conv undilated)
    b6       bottleneck 1x1/3x3/1x1 -> 2048, dilation 4, Dropout2d 0.3
    b7       bottleneck -> 4096, dilation 4, Dropout2d 0.5
    bn7      BN-ReLU: the 4096-channel feature map ("conv6" in PSA)

A feature map is ``ceil(H / 8) x ceil(W / 8)`` for an ``H x W`` input.

**Input normalisation** (every backbone here): RGB channel order, pixel values scaled to [0, 1], then
ImageNet mean ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``; PSA's ``Normalize`` and
MCTformer's segmentation data code (``cv2`` BGR converted to RGB first) both do exactly this, and
padding is done after normalisation with zeros. Not BGR, not 0..255.

**Training conventions of the PSA family**, built in as options: batch-norm layers are frozen (running
statistics and affine parameters fixed; PSA's ``train()`` puts every BN in eval mode and stops its
gradients) and a prefix of the network is not trained (PSA: ``conv1a`` for the segmenter,
``conv1a`` + ``b2*`` for the classifier and AffinityNet). Frozen BN layers become
``torchvision.ops.FrozenBatchNorm2d`` (same tensor names minus ``num_batches_tracked``).

Also here, shared by :mod:`mmcst.models.affinity` and :mod:`mmcst.models.deeplab`: a timm ResNet trunk
at output stride 8 (:func:`resnet_trunk`, torchvision key names), layer freezing and the learning-rate
groups of these recipes (:class:`LrRecipe`, :func:`lr_param_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import timm
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from mmcst.models.priors import IMAGENET_MEAN, IMAGENET_STD

# PSA's layers that its classifier and AffinityNet leave untrained; its segmenter (MCTformer) leaves only conv1a.
PSA_FROZEN_LAYERS = ("conv1a", "b2", "b2_1", "b2_2")
SEGMENTER_FROZEN_LAYERS = ("conv1a",)

# Plain pre-activation blocks: (name, in, mid, out, stride, first_dilation, dilation), channels in units of
# 64 (the width of conv1a at width 1). b5 dilates its second conv only, so that the stride-1 transition
# from b4 keeps b4's receptive field on its first conv (PSA: first_dilation=1, dilation=2).
_BASIC_BLOCKS: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("b2", 1, 2, 2, 2, 1, 1), ("b2_1", 2, 2, 2, 1, 1, 1), ("b2_2", 2, 2, 2, 1, 1, 1),
    ("b3", 2, 4, 4, 2, 1, 1), ("b3_1", 4, 4, 4, 1, 1, 1), ("b3_2", 4, 4, 4, 1, 1, 1),
    ("b4", 4, 8, 8, 2, 1, 1), ("b4_1", 8, 8, 8, 1, 1, 1), ("b4_2", 8, 8, 8, 1, 1, 1),
    ("b4_3", 8, 8, 8, 1, 1, 1), ("b4_4", 8, 8, 8, 1, 1, 1), ("b4_5", 8, 8, 8, 1, 1, 1),
    ("b5", 8, 8, 16, 1, 1, 2), ("b5_1", 16, 8, 16, 1, 2, 2), ("b5_2", 16, 8, 16, 1, 2, 2),
)
# Bottleneck blocks: (name, in, out, dilation, dropout); inner widths are out/4 and out/2.
_BOTTLENECK_BLOCKS: tuple[tuple[str, int, int, int, float], ...] = (
    ("b6", 16, 32, 4, 0.3),
    ("b7", 32, 64, 4, 0.5),
)


class PreActBlock(nn.Module):
    """Two 3x3 convolutions, each after BN-ReLU (PSA's ``ResBlock``).

    The shortcut is the identity when shapes agree; otherwise a 1x1 convolution applied to the
    *pre-activated* input (BN-ReLU of the block's input), as in Wu et al.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, BN-ReLU of the block input); the latter is one of AffinityNet's feature levels."""
        preact = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(preact)
        out = self.conv_branch2a(preact)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class PreActBottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 with BN-ReLU(-Dropout2d) before each conv (PSA's ``ResBlock_bot``).

    Inner widths are ``out/4`` and ``out/2``; the shortcut is always a 1x1 convolution of the
    pre-activated input (both uses, b6 and b7, change the channel count).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels == out_channels:
            raise ValueError("PreActBottleneck: ResNet-38's bottlenecks always change the channel count")
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        preact = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(preact)
        out = self.conv_branch2a(preact)
        out = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(out))))
        return shortcut + out, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ResNet38(nn.Module):
    """Wide ResNet-38 at output stride 8, parameter names as PSA's ``network.resnet38d.Net``.

    Args:
        width: channel multiplier; ``64 * width`` must be a positive integer (``1/16`` gives a 4-channel
            stem and a 256-channel output, for tests). Weight files fit ``width=1`` only.
        frozen_layers: top-level layers whose parameters get ``requires_grad=False`` (PSA's
            ``not_training``): :data:`SEGMENTER_FROZEN_LAYERS` (default) or :data:`PSA_FROZEN_LAYERS`.
        freeze_bn: replace every BN by a frozen one (PSA trains with all BN frozen).

    ``forward(images) -> B x 4096w x ceil(H/8) x ceil(W/8)``; :meth:`forward_features` also returns the
    intermediate levels. Inputs: RGB, ImageNet mean/std (see the module docstring).
    """

    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD
    output_stride = 8
    feature_names = ("conv4", "conv5", "conv6")

    def __init__(self, width: float = 1.0, frozen_layers: Sequence[str] = SEGMENTER_FROZEN_LAYERS,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        base = 64 * width
        if width <= 0 or abs(base - round(base)) > 1e-6:
            raise ValueError(f"ResNet38: width must make 64 * width a positive integer, got width={width}")
        base = round(base)
        self.width = width
        self.conv1a = nn.Conv2d(3, base, 3, padding=1, bias=False)
        for name, cin, mid, cout, stride, first_dilation, dilation in _BASIC_BLOCKS:
            self.add_module(name, PreActBlock(cin * base, mid * base, cout * base, stride, first_dilation, dilation))
        for name, cin, cout, dilation, dropout in _BOTTLENECK_BLOCKS:
            self.add_module(name, PreActBottleneck(cin * base, cout * base, dilation, dropout))
        self.bn7 = nn.BatchNorm2d(64 * base)
        # conv4: BN-ReLU of b5's input (end of the 1/8 stage); conv5: of b6's input; conv6: the output.
        self.feature_channels = {"conv4": 8 * base, "conv5": 16 * base, "conv6": 64 * base}
        self.out_channels = 64 * base
        if freeze_bn:
            freeze_batch_norm_2d(self)
        freeze_layers(self, frozen_layers)

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """PSA's ``forward_as_dict``: ``conv4`` (512w), ``conv5`` (1024w), ``conv6`` (4096w), all at 1/8."""
        x = self.conv1a(images)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x = getattr(self, name)(x)
        x, conv4 = self.b5.forward_preact(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_preact(x)
        conv6 = F.relu(self.bn7(self.b7(x)))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)["conv6"]


# --------------------------------------------------------------------------------------------------
# timm / torchvision ResNet trunks


def resnet_trunk(name: str = "resnet101", out_indices: Sequence[int] = (4,), freeze_bn: bool = True) -> nn.Module:
    """A timm ResNet at output stride 8 (last two stages dilated 2 and 4), returning a list of feature maps.

    ``out_indices`` pick timm feature levels (1-4 = ``layer1``-``layer4``). Parameter names are
    torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) for the standard ResNets, so timm and
    torchvision ``.pth`` files load with :func:`mmcst.models.weights.load_resnet_weights`; at ``resnet101``
    the trunk equals the backbone of torchvision's ``deeplabv3_resnet101`` tensor for tensor (same
    dilations). Never downloads. Inputs: RGB, ImageNet mean/std.
    """
    try:
        trunk = timm.create_model(name, pretrained=False, features_only=True, output_stride=8,
                                  out_indices=tuple(out_indices))
    except Exception as exc:  # unknown name, or a model without dilation support
        raise ValueError(f"backbone: cannot build timm ResNet {name!r} at output stride 8 with feature levels "
                         f"{tuple(out_indices)} ({exc})") from exc
    if freeze_bn:
        trunk = freeze_batch_norm_2d(trunk)
    return trunk


def trunk_channels(trunk: nn.Module) -> list[int]:
    """Channels of each feature map a :func:`resnet_trunk` returns."""
    return list(trunk.feature_info.channels())


# --------------------------------------------------------------------------------------------------
# freezing and learning-rate groups


def freeze_layers(module: nn.Module, names: Sequence[str]) -> None:
    """Set ``requires_grad=False`` on every parameter of the named submodules (dotted names allowed)."""
    children = dict(module.named_modules())
    unknown = [name for name in names if name not in children]
    if unknown:
        raise ValueError(f"frozen_layers: no layer named {unknown} in {type(module).__name__}")
    for name in names:
        children[name].requires_grad_(False)


@dataclass(frozen=True)
class LrRecipe:
    """Learning-rate multipliers per parameter role, and whether bias-like tensors get weight decay.

    *Pretrained* parameters come from the backbone's weight file; *new* ones are the layers the stage
    adds (heads). *Bias-like* means 1-d tensors: biases and trainable norm scales.
    """

    pretrained_weight: float = 1.0
    pretrained_bias: float = 1.0
    new_weight: float = 10.0
    new_bias: float = 10.0
    decay_biases: bool = True


# PSA's AffinityNet (train_aff.py): x1 / x2 biases / x10 new weights / x20 new biases; no decay on biases.
PSA_AFFINITY_RECIPE = LrRecipe(1.0, 2.0, 10.0, 20.0, decay_biases=False)
# MCTformer's seg/train_seg.py: backbone x1, every parameter whose name holds "fc8" (the head) x10.
MCTFORMER_SEG_RECIPE = LrRecipe(1.0, 1.0, 10.0, 10.0, decay_biases=True)
# DeepLab-V2 (Caffe prototxt): classifier weights x10, biases x20, no decay on biases.
DEEPLAB_V2_RECIPE = LrRecipe(1.0, 2.0, 10.0, 20.0, decay_biases=False)


def lr_param_groups(model: nn.Module, new_prefixes: Sequence[str], base_lr: float, weight_decay: float,
                    recipe: LrRecipe) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``model`` under ``recipe``; frozen parameters are left out.

    A parameter is *new* when its name starts with one of ``new_prefixes`` (e.g. ``"fc8_seg_conv1."``).
    Each group is ``{"name", "params", "lr", "lr_mult", "weight_decay"}`` with ``lr = base_lr * lr_mult``,
    in the order pretrained weights, pretrained biases, new weights, new biases; empty groups are dropped.
    A poly schedule sets ``group["lr"] = base_lr * group["lr_mult"] * (1 - step / max_step) ** 0.9``.
    """
    roles: dict[str, list[nn.Parameter]] = {"pretrained_weight": [], "pretrained_bias": [], "new_weight": [],
                                            "new_bias": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        origin = "new" if name.startswith(tuple(new_prefixes)) else "pretrained"
        kind = "bias" if param.ndim <= 1 else "weight"
        roles[f"{origin}_{kind}"].append(param)
    groups = []
    for role, params in roles.items():
        if not params:
            continue
        mult = getattr(recipe, role)
        decay = weight_decay if role.endswith("weight") or recipe.decay_biases else 0.0
        groups.append({"name": role, "params": params, "lr": base_lr * mult, "lr_mult": mult, "weight_decay": decay})
    return groups
