"""Losses shared by the methods (METHOD.md 3 and 7.3).

* :func:`mlsm` — multi-label soft-margin loss on B x C logits.
* :func:`gwrp` — Global Weighted Ranking Pooling of B x C x N maps into B x C logits.
* :func:`batch_contrastive_ce` — ``CE(u v^T / tau, I)`` over a batch (image-language context transfer),
  the global batch under DDP.
* :func:`l1_regularizer` — the L1 variant of the context regulariser.
* :func:`contrastive_class_token_loss` — MCTformer+'s contrastive class-token (CCT) loss.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist
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


def _check_contrastive_inputs(u: torch.Tensor, v: torch.Tensor, temperature: Temperature) -> None:
    if u.dim() != 2 or v.dim() != 2 or u.shape != v.shape:
        raise ValueError(f"contrastive loss: expected two B x d tensors of equal shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    if isinstance(temperature, float) and temperature <= 0:
        raise ValueError(f"contrastive loss: temperature must be > 0, got {temperature}")


def _similarity(u: torch.Tensor, v: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    return (u @ v.t()) / temperature


def batch_contrastive_ce(u: torch.Tensor, v: torch.Tensor, temperature: Temperature, symmetric: bool = False) -> torch.Tensor:
    """Batch-contrastive cross-entropy (METHOD 3.4): ``S = u v^T / tau``, CE of each row against its own index.

    Under DDP (an initialised process group of more than one process) the batch is the *global* one:
    ``u`` and ``v`` are gathered from every rank, S is the N x N matrix of all N samples, and the value
    returned is the loss of the whole global batch, the same number on every rank (so the logged
    ``contrast`` term reads as in a single process with batch N). Every rank must call it: two small
    collectives and one host sync (the per-rank sizes).
    Gradients equal those of one process computing the loss on all N samples once DDP has averaged them
    (see :func:`_global_batch`). Without a process group nothing is gathered.

    Args:
        u: B x d projected pooled text representations (L2-normalised by the caller).
        v: B x d targets (CLIP image or caption embeddings, L2-normalised, no gradient needed).
        temperature: tau, a float or a scalar tensor (learnable variant).
        symmetric: also take the column-wise CE (image -> text) and average the two.
    """
    _check_contrastive_inputs(u, v, temperature)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        u, v = _global_batch(u, v)
    sim = _similarity(u, v, temperature)
    target = torch.arange(sim.shape[0], device=sim.device)
    loss = F.cross_entropy(sim, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sim.t(), target))
    return loss


def _global_batch(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of ``u`` and ``v`` in rank order; this rank's own rows keep their gradient, times W.

    Each rank then computes the whole global loss L. Other ranks' rows are constants here, so rank r's
    backward yields dL/du_r (row i of S depends on u_i only, but every column of the symmetric variant
    depends on all u: computing all rows and columns on every rank covers both). DDP sums the W ranks'
    parameter gradients and divides by W, hence the factor W on the local rows; a shared parameter such
    as a learnable temperature gets the full dL/dtau on every rank, whose average is dL/dtau again.
    This assumes DDP's default averaging (no gradient-summing communication hook).

    Ranks may hold different numbers of rows (skipped unreadable samples): sizes are exchanged first
    and the rows padded to the longest for the collective. Plain all_gather + re-inserted local rows
    rather than the autograd-aware ``torch.distributed.nn.functional.all_gather``: the collectives stay in
    the forward pass (no reduce-scatter, emulated by all-to-all on gloo, interleaved with DDP's bucket
    all-reduces in backward), and computing the whole N x N loss on every rank makes the logged value
    the global one. The cost is N x N x d on each rank: nothing next to the encoder.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes_here = torch.tensor([u.shape[0]], device=u.device)
    sizes = [torch.empty_like(sizes_here) for _ in range(world)]
    dist.all_gather(sizes, sizes_here)
    counts = [int(n) for n in torch.cat(sizes).tolist()]
    # One collective for both: packed side by side in a dtype that holds either exactly.
    common = torch.promote_types(u.dtype, v.dtype)
    packed = torch.cat([u.detach().to(common), v.detach().to(common)], dim=1)
    longest = max(counts)
    if packed.shape[0] < longest:
        packed = F.pad(packed, (0, 0, 0, longest - packed.shape[0]))
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed.contiguous())
    width = u.shape[1]
    u_parts = [part[:n, :width].to(u.dtype) for part, n in zip(parts, counts)]
    v_parts = [part[:n, width:].to(v.dtype) for part, n in zip(parts, counts)]
    u_parts[rank] = _scale_gradient(u, world)
    v_parts[rank] = _scale_gradient(v, world)
    return torch.cat(u_parts), torch.cat(v_parts)


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged (bitwise), with the gradient flowing back through this use multiplied by ``factor``."""
    if not x.requires_grad:
        return x
    detached = x.detach()
    return detached + (x - detached) * factor  # x - detached is exactly 0: same value, gradient x factor


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
