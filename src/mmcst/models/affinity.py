"""AffinityNet (Ahn and Kwak, CVPR 2018; PSA ``network/resnet38_aff.py``): pixel affinities for the random walk.

The network maps an image to a 448-channel embedding on the 1/8 grid; the affinity of two cells ``i``,
``j`` is ``exp(-mean_d |f_i[d] - f_j[d]|)``, in (0, 1]. Pairs are PSA's, as :mod:`mmcst.refine` defines
them: each *source* cell is paired with the cells at the offsets of :func:`mmcst.refine.radius_offsets`
(the forward half of the disc of radius ``radius``; 34 offsets at radius 5), and only cells whose whole
half-disc lies inside the grid are sources. Pairwise tensors are laid out like PSA's and like
:func:`mmcst.refine.affinity_pair_indices`: ``(B x) D x P`` with ``D`` offsets and ``P`` source cells in
row-major order.

A PSA pipeline (METHOD.md 4.4) with these pieces:

* training: :func:`mmcst.refine.affinity_labels` of the crop's 1/8 label map (0 background, 255
  ignore) per sample, stacked to B x D x P; ``AffinityNet(images)`` -> B x D x P affinities;
  :func:`affinity_loss_terms` and :func:`affinity_loss` (PSA's 1/4, 1/4, 1/2 sum);
* inference: :meth:`AffinityNet.dense_affinity` -> B x n x n (``n = h * w``), one per image to
  :func:`mmcst.refine.random_walk_labels`.

Inputs of :class:`AffinityNet`: RGB, ImageNet mean/std (see :mod:`mmcst.models.resnet38`); the label grid
must be the feature grid, ``ceil(H/8) x ceil(W/8)`` (PSA crops 448 px and average-pools the CRF label
scores by 8 to 56 x 56).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcst.models.priors import IMAGENET_MEAN, IMAGENET_STD
from mmcst.models.resnet38 import (
    PSA_AFFINITY_RECIPE,
    PSA_FROZEN_LAYERS,
    LrRecipe,
    ResNet38,
    freeze_layers,
    lr_param_groups,
    resnet_trunk,
    trunk_channels,
)
from mmcst.models.weights import WeightReport, load_resnet38_weights, load_resnet_weights
from mmcst.refine import dense_affinity, radius_offsets

# PSA's weights of the three loss terms (train_aff.py).
PSA_LOSS_WEIGHTS = {"bg_pos": 0.25, "fg_pos": 0.25, "neg": 0.5}
# Stem and first stage of a timm/torchvision ResNet: the share of the network PSA leaves untrained on ResNet-38.
RESNET_FROZEN_LAYERS = ("conv1", "bn1", "layer1")


def pairwise_affinity(features: Tensor, radius: int = 5) -> Tensor:
    """``exp(-mean_d |f_source - f_target|)`` for PSA's pairs: B x K x h x w features -> B x D x P."""
    if features.dim() != 4:
        raise ValueError(f"pairwise_affinity: expected B x K x h x w features, got shape {tuple(features.shape)}")
    height, width = features.shape[-2:]
    rows, cols = height - (radius - 1), width - 2 * (radius - 1)
    if rows < 1 or cols < 1:
        raise ValueError(f"pairwise_affinity: a {height} x {width} feature grid is too small for radius {radius} "
                         f"(needs {radius} x {2 * radius - 1} cells, an input of at least {8 * radius - 7} x "
                         f"{8 * (2 * radius - 1) - 7} px)")
    floor = radius - 1
    source = features[..., :rows, floor:floor + cols]
    # Shifted views, one offset at a time: PSA's index_select materialises a B x K x D x P difference at once.
    distances = [(features[..., dy:dy + rows, floor + dx:floor + dx + cols] - source).abs().mean(dim=1).flatten(1)
                 for dy, dx in radius_offsets(radius)]
    return torch.exp(-torch.stack(distances, dim=1))


def affinity_loss_terms(affinity: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor,
                        eps: float = 1e-5) -> dict[str, Tensor]:
    """PSA's three cross-entropy terms, each averaged over the batch's pairs of its kind.

    ``bg_pos`` and ``fg_pos``: ``sum(-label * log(a + eps)) / (count + eps)``; ``neg``: the same with
    ``log(1 + eps - a)``. ``affinity`` (:func:`pairwise_affinity`) and the 0/1 labels
    (:func:`mmcst.refine.affinity_labels`) are B x D x P.
    """
    labels = {"bg_pos": bg_pos, "fg_pos": fg_pos, "neg": neg}
    for name, label in labels.items():
        if label.shape != affinity.shape:
            raise ValueError(f"affinity_loss_terms: label {name!r} has shape {tuple(label.shape)}, the affinity "
                             f"{tuple(affinity.shape)} (label map and feature grid must be the same size)")
    positive, negative = torch.log(affinity + eps), torch.log(1.0 + eps - affinity)
    terms = {}
    for name, label in labels.items():
        label = label.to(affinity.dtype)
        log_likelihood = negative if name == "neg" else positive
        # where(): pairs without this label must not turn a log(0) into 0 * inf = nan.
        terms[name] = -(label * log_likelihood.where(label > 0, 0.0)).sum() / (label.sum() + eps)
    return terms


def affinity_loss(terms: dict[str, Tensor]) -> Tensor:
    """PSA's total: ``bg_pos / 4 + fg_pos / 4 + neg / 2``."""
    return sum(PSA_LOSS_WEIGHTS[name] * terms[name] for name in PSA_LOSS_WEIGHTS)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# the network


class AffinityNet(nn.Module):
    """PSA's AffinityNet on ResNet-38 (PSA layout) or a timm/torchvision ResNet, output stride 8.

    Heads (PSA names, no biases): 1x1 ``f8_3``, ``f8_4``, ``f8_5`` reduce three backbone levels to
    ``head_channels`` (64, 128, 256), each followed by ELU; their concatenation goes through 1x1 ``f9``
    (448 -> 448) and ELU. Levels: ResNet-38 ``conv4`` / ``conv5`` / ``conv6`` (512 / 1024 / 4096 channels,
    see :class:`ResNet38`); a timm ResNet ``layer2`` / ``layer3`` / ``layer4`` (dilated, all at 1/8).

    Args:
        backbone: ``"resnet38"`` or a timm ResNet name (``"resnet50"``; torchvision key names).
        weights: optional local file: PSA layout (``res38_cls.pth``, converted ImageNet weights, or a
            whole ``resnet38_aff.pth``) for ResNet-38, a timm/torchvision state dict otherwise.
        width: ResNet-38 channel multiplier (tests); ignored for timm backbones.
        radius: pair radius on the 1/8 grid (PSA: 5).
        frozen_layers: untrained backbone layers (names inside the backbone); default PSA's ``conv1a`` +
            ``b2*`` on ResNet-38, stem + ``layer1`` on a timm ResNet.
        freeze_bn: frozen backbone BN (PSA).

    Use: ``forward(images) -> B x D x P`` pair affinities for :func:`affinity_loss_terms`;
    :meth:`dense_affinity` for the random walk; :meth:`param_groups` for the optimizer.
    """

    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD
    output_stride = 8
    new_layers = ("f8_3", "f8_4", "f8_5", "f9")
    lr_recipe: LrRecipe = PSA_AFFINITY_RECIPE

    def __init__(self, backbone: str = "resnet38", weights: Optional[str] = None, width: float = 1.0,
                 radius: int = 5, head_channels: Sequence[int] = (64, 128, 256),
                 frozen_layers: Optional[Sequence[str]] = None, freeze_bn: bool = True) -> None:
        super().__init__()
        radius_offsets(radius)  # validates
        self.radius = radius
        self.backbone_name = backbone
        self.backbone: nn.Module
        if backbone == "resnet38":
            self.backbone = ResNet38(width, PSA_FROZEN_LAYERS if frozen_layers is None else frozen_layers, freeze_bn)
            level_channels = [self.backbone.feature_channels[name] for name in ResNet38.feature_names]
        else:
            self.backbone = resnet_trunk(backbone, out_indices=(2, 3, 4), freeze_bn=freeze_bn)
            freeze_layers(self.backbone, RESNET_FROZEN_LAYERS if frozen_layers is None else frozen_layers)
            level_channels = trunk_channels(self.backbone)
        if len(head_channels) != 3:
            raise ValueError(f"AffinityNet: head_channels needs one width per level (3), got {list(head_channels)}")
        self.f8_3 = nn.Conv2d(level_channels[0], head_channels[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(level_channels[1], head_channels[1], 1, bias=False)
        self.f8_5 = nn.Conv2d(level_channels[2], head_channels[2], 1, bias=False)
        self.embed_dim = sum(head_channels)
        self.f9 = nn.Conv2d(self.embed_dim, self.embed_dim, 1, bias=False)
        for layer in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(layer.weight)
        # PSA's gain of 4 keeps the embedding distances, hence the initial affinities, away from saturation.
        nn.init.xavier_uniform_(self.f9.weight, gain=4.0)
        self.weight_reports: list[WeightReport] = []
        if weights is not None:
            self.load_pretrained(weights)

    def load_pretrained(self, path: str) -> WeightReport:
        """Load a local weight file into the backbone (and PSA's heads, if the file has them)."""
        if self.backbone_name == "resnet38":
            report = load_resnet38_weights(self, path)
        else:
            report = WeightReport(**load_resnet_weights(self.backbone, path))
        self.weight_reports.append(report)
        return report

    def levels(self, images: Tensor) -> list[Tensor]:
        """The three backbone feature maps the heads read, each B x K_l x h x w."""
        if isinstance(self.backbone, ResNet38):
            features = self.backbone.forward_features(images)
            return [features[name] for name in ResNet38.feature_names]
        return list(self.backbone(images))

    def embed(self, images: Tensor) -> Tensor:
        """The affinity embedding, B x 448 x ceil(H/8) x ceil(W/8)."""
        level3, level4, level5 = self.levels(images)
        heads = [F.elu(self.f8_3(level3)), F.elu(self.f8_4(level4)), F.elu(self.f8_5(level5))]
        return F.elu(self.f9(torch.cat(heads, dim=1)))

    def forward(self, images: Tensor) -> Tensor:
        """Pair affinities B x D x P on the 1/8 grid (PSA's training output)."""
        return pairwise_affinity(self.embed(images), self.radius)

    def dense_affinity(self, images: Tensor) -> Tensor:
        """B x n x n symmetric affinity of the 1/8 grid (``n = h * w``, row-major cells), for the random walk.

        One matrix per image for :func:`mmcst.refine.random_walk_labels` (PSA pads the image to a multiple
        of 8 first; the grid is ``ceil(H/8) x ceil(W/8)`` either way).
        """
        embedding = self.embed(images)
        height, width = embedding.shape[-2:]
        pairs = pairwise_affinity(embedding, self.radius)
        return torch.stack([dense_affinity(image_pairs, height, width, self.radius) for image_pairs in pairs])

    def param_groups(self, base_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """PSA's groups: backbone x1, backbone biases x2 (no decay), heads x10, head biases x20 (no decay)."""
        return lr_param_groups(self, [f"{name}." for name in self.new_layers], base_lr, weight_decay, self.lr_recipe)
