"""The contract every localization method implements (DESIGN.md 4.1).

The engine knows nothing else about a method:

* ``forward(images, labels) -> dict[str, Tensor]``: logits/maps needed by ``loss``. ``images`` is
  B x 3 x H x W, ImageNet-normalised; ``labels`` B x C multi-hot (may be used, e.g. for label-masked pooling).
  A method that needs extra inputs (the CLIP image embedding of the crop) reads them from ``batch`` in
  ``loss`` or receives them via ``forward(..., extras=batch)``.
* ``loss(outputs, batch) -> dict[str, Tensor]``: named scalar terms, summed by the engine.
* ``localize(images, need_affinity=False) -> Localization``: raw (non-negative, un-normalised) maps
  B x C x h x w for every class, and optionally the B x N_p x N_p patch affinity used for refinement.
* ``classify(images) -> B x C`` logits for the per-epoch mAP monitor.

Optional hooks (defaults do nothing): ``calibrate(images, labels)``, a data-dependent start on the first
training batch of a fresh run (returns what it set, for the run's log); ``monitor(outputs)``, scalars of a
training forward worth logging beside the losses in ``metrics.jsonl``; ``training_extras(dataset, work_dir)``,
per-image inputs computed once before training (e.g. cached embeddings), which the engine adds to each sample
of the batch under their names, so they reach ``forward(..., extras=batch)`` in the sampler's order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class Localization:
    maps: torch.Tensor  # B x C x h x w, >= 0
    affinity: Optional[torch.Tensor] = None  # B x N_p x N_p (rows: output patch, cols: input patch) or None


class LocalizationModel(nn.Module):
    """Base class: subclasses implement the four methods below."""

    num_classes: int
    # Layout the engine gives the model's weights and input images: channels-last suits convolution trunks
    # (oneDNN on CPU, cuDNN on GPU), while ViTs only use one patch-embedding convolution and keep the default.
    memory_format: torch.memory_format = torch.contiguous_format

    def forward(self, images: torch.Tensor, labels: torch.Tensor, extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        raise NotImplementedError

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Data-dependent initialisation on the first training batch of a fresh run; returns a record for the log."""
        return {}

    def monitor(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalars of a training forward's ``outputs`` to log beside the losses."""
        return {}

    def training_extras(self, dataset: Any, work_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
        """Per-image training inputs computed once: ``{name: {image id: tensor}}`` for the training ``dataset``.

        Files the computation keeps (caches) go under ``work_dir`` unless the model's config names a place. Called
        before training on the main process first, then on the others (which should find the files made).
        """
        return {}

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides 1-D tensors (tokens, pos-embeds)."""
        return set()

    def weight_report(self) -> list[dict[str, Any]]:
        """One entry per pretrained file loaded: path, sha256, loaded/missing/unexpected keys."""
        return []
