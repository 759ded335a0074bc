"""Losses shared by the methods (METHOD.md 3 and 7.3).

* :func:`mlsm` — multi-label soft-margin loss on B x C logits.
* :func:`gwrp` — Global Weighted Ranking Pooling of B x C x N maps into B x C logits.
* :func:`batch_contrastive_ce` — ``CE(u v^T / tau, I)`` over a batch (image-language context transfer).
* :func:`l1_regularizer` — the L1 variant of the context regulariser.
* :func:`contrastive_class_token_loss` — MCTformer+'s contrastive class-token (CCT) loss.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

Temperature = Union[float, torch.Tensor]

# (N, decay, device, dtype) -> normalised weight vector d^0..d^{N-1} / Z(d). A handful of grid sizes
# occur in a run (training crop, inference scales), so the cache stays tiny.
_GWRP_WEIGHTS: dict[tuple[int, float, torch.device, torch.dtype], torch.Tensor] = {}


def mlsm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss (METHOD 3.1): mean over batch and classes of the binary logistic loss."""
    if logits.shape != labels.shape:
        raise ValueError(f"mlsm: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have the same shape")
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def gwrp_weights(num: int, decay: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The GWRP weight vector ``d^j / Z(d)`` for ``j = 0..num-1`` (sums to 1), cached per (num, decay, device, dtype)."""
    if num < 1:
        raise ValueError(f"gwrp: expected at least one spatial position, got {num}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"gwrp: decay must be in (0, 1], got {decay}")
    device = torch.device(device)
    key = (num, float(decay), device, dtype)
    weights = _GWRP_WEIGHTS.get(key)
    if weights is None:
        # Built in float64 so that tiny decays (d^j underflowing float32) still normalise exactly.
        powers = torch.pow(torch.tensor(float(decay), dtype=torch.float64), torch.arange(num, dtype=torch.float64))
        weights = (powers / powers.sum()).to(device=device, dtype=dtype)
        _GWRP_WEIGHTS[key] = weights
    return weights


def gwrp(maps: torch.Tensor, decay: float) -> torch.Tensor:
    """Global Weighted Ranking Pooling (METHOD 3.3).

    Args:
        maps: B x C x N (or B x C x h x w, flattened) scores.
        decay: d in (0, 1]; d = 1 is average pooling, d -> 0 approaches max pooling.

    Returns:
        B x C pooled logits ``sum_j d^j r_j / Z(d)`` with ``r`` the scores sorted in descending order.
    """
    if maps.dim() == 4:
        maps = maps.flatten(2)
    if maps.dim() != 3:
        raise ValueError(f"gwrp: expected B x C x N or B x C x h x w maps, got shape {tuple(maps.shape)}")
    # Sorting is a permutation, so the gradient reaches every position through the sorted values.
    ranked = maps.sort(dim=-1, descending=True).values
    weights = gwrp_weights(maps.shape[-1], decay, maps.device, maps.dtype)
    return ranked @ weights


def _similarity(u: torch.Tensor, v: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    if u.dim() != 2 or v.dim() != 2 or u.shape != v.shape:
        raise ValueError(f"contrastive loss: expected two B x d tensors of equal shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    if isinstance(temperature, float) and temperature <= 0:
        raise ValueError(f"contrastive loss: temperature must be > 0, got {temperature}")
    return (u @ v.t()) / temperature


def batch_contrastive_ce(u: torch.Tensor, v: torch.Tensor, temperature: Temperature, symmetric: bool = False) -> torch.Tensor:
    """Batch-contrastive cross-entropy (METHOD 3.4): ``S = u v^T / tau``, CE of each row against its own index.

    Args:
        u: B x d projected pooled text representations (L2-normalised by the caller).
        v: B x d targets (CLIP image or caption embeddings, L2-normalised, no gradient needed).
        temperature: tau, a float or a scalar tensor (learnable variant).
        symmetric: also take the column-wise CE (image -> text) and average the two.
    """
    sim = _similarity(u, v, temperature)
    target = torch.arange(sim.shape[0], device=sim.device)
    loss = F.cross_entropy(sim, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sim.t(), target))
    return loss


def l1_regularizer(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L1 context regulariser (METHOD 3.4, ablation): ``mean_b ||u_b - t_b||_1``."""
    if u.shape != t.shape:
        raise ValueError(f"l1_regularizer: expected equal shapes, got {tuple(u.shape)} and {tuple(t.shape)}")
    return (u - t).abs().sum(dim=-1).mean()


def contrastive_class_token_loss(class_tokens: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MCTformer+ contrastive class-token (CCT) loss (METHOD 7.3).

    For every layer: L2-normalise the C class tokens, form the C x C cosine-similarity matrix (no
    temperature) and take the cross-entropy of each row against its own index; only ground-truth classes
    count. The result is the mean over present (image, class) pairs, then over layers.

    Args:
        class_tokens: per layer a B x C x D tensor (a sequence, or an L x B x C x D tensor).
        labels: B x C multi-hot.
    """
    layers = list(class_tokens.unbind(0)) if isinstance(class_tokens, torch.Tensor) and class_tokens.dim() == 4 else list(class_tokens)
    if not layers:
        raise ValueError("contrastive_class_token_loss: expected at least one layer of class tokens")
    present = labels > 0
    if not present.any():
        return layers[0].sum() * 0.0  # no ground-truth class in the batch: no signal, keep the graph
    num_classes = labels.shape[1]
    target = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], -1)
    losses = []
    for tokens in layers:
        if tokens.shape[:2] != labels.shape:
            raise ValueError(f"contrastive_class_token_loss: tokens {tuple(tokens.shape)} do not match labels {tuple(labels.shape)}")
        normed = F.normalize(tokens.float(), dim=-1)
        sim = normed @ normed.transpose(1, 2)  # B x C x C
        ce = F.cross_entropy(sim.flatten(0, 1), target.flatten(), reduction="none")
        losses.append(ce[present.flatten()].mean())
    return torch.stack(losses).mean()
