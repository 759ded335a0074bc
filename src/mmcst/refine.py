"""Map refinement: attention-affinity propagation, power background, optional dense CRF.

* :func:`affinity_refine` — MCTformer's patch-affinity refinement (METHOD 4.1.5, Appendix A.6).
* :func:`power_background` — background score ``(1 - max_c M_c)^alpha`` (METHOD 4.4).
* :func:`dense_crf` — fully connected CRF (optional extra ``mmcst[crf]``, i.e. ``pydensecrf2``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def affinity_refine(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Propagate maps along a patch affinity: ``refined[b, c, i] = sum_j affinity[b, i, j] * maps[b, c, j]``.

    Args:
        maps: B x C x h x w patch-level maps.
        affinity: B x N_p x N_p with N_p = h * w (rows: output patch i, columns: input patch j), e.g. the
            sum over layers of head-averaged patch-to-patch attention. Not renormalised (as MCTformer).

    Returns:
        B x C x h x w refined maps.
    """
    if maps.dim() != 4:
        raise ValueError(f"affinity_refine: expected B x C x h x w maps, got shape {tuple(maps.shape)}")
    batch, _, height, width = maps.shape
    num = height * width
    if affinity.shape != (batch, num, num):
        raise ValueError(
            f"affinity_refine: expected affinity of shape {(batch, num, num)} for maps {tuple(maps.shape)}, "
            f"got {tuple(affinity.shape)}"
        )
    flat = maps.flatten(2).to(affinity.dtype)  # B x C x N_p
    refined = torch.bmm(flat, affinity.transpose(1, 2))  # (B x C x N_j) @ (B x N_j x N_i)
    return refined.view_as(maps).to(maps.dtype)


def power_background(maps: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Background score ``(1 - max_c M_c)^alpha`` for maps in [0, 1].

    Args:
        maps: ... x C x H x W maps in [0, 1] (present classes only, or zeros elsewhere).
        alpha: the power; PSA uses 1 (confident foreground) and 12 (confident background).

    Returns:
        ... x 1 x H x W background plane (prepend it to the class planes before the argmax).
    """
    if maps.dim() < 3:
        raise ValueError(f"power_background: expected ... x C x H x W maps, got shape {tuple(maps.shape)}")
    if alpha <= 0:
        raise ValueError(f"power_background: alpha must be > 0, got {alpha}")
    if maps.shape[-3] == 0:  # no class present: everything is background
        return maps.new_ones(*maps.shape[:-3], 1, *maps.shape[-2:])
    peak = maps.amax(dim=-3, keepdim=True).clamp(0.0, 1.0)
    return (1.0 - peak).pow(alpha)


def _import_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf  # provided by the pydensecrf2 distribution
    except ImportError as exc:
        raise ImportError(
            "dense CRF refinement needs the optional dependency pydensecrf2: pip install mmcst[crf]"
        ) from exc
    return dcrf


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """Fully connected CRF on per-pixel label probabilities (defaults: PSA seed refinement, METHOD 4.4).

    Args:
        image: H x W x 3 uint8 RGB image.
        probs: K x H x W probabilities (background plane first if any); normalised over K here.
        iterations: mean-field iterations.

    Returns:
        K x H x W float32 refined probabilities.
    """
    dcrf = _import_densecrf()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"dense_crf: expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: expected K x {image.shape[0]} x {image.shape[1]} probabilities, got {probs.shape}")
    from pydensecrf.utils import unary_from_softmax

    num_labels, height, width = probs.shape
    probs = probs.astype(np.float32)
    probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), 1e-8)
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)
