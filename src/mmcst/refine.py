"""Map refinement: attention-affinity propagation, background scores, CRF / PAR, PSA's affinity stage.

Seed maps (METHOD 4.1-4.3):

* :func:`affinity_refine` — MCTformer's patch-affinity refinement (METHOD 4.1.5, Appendix A.6).
* :func:`power_background` — background score ``(1 - max_c M_c)^alpha`` (METHOD 4.4).

Pixel-level refinement of per-pixel label probabilities:

* :func:`dense_crf` — fully connected CRF (optional extra ``mmcst[crf]``, i.e. ``pydensecrf2``).
* :func:`pixel_adaptive_refine` — PAR (Ru et al., ToCo): torch-only local colour/position affinity, iterated.
* :func:`crf_available` — whether :func:`dense_crf` can run here.

PSA / AffinityNet (METHOD 4.4):

* :func:`confident_labels` — confident foreground / background / ignore labels from seeds at two
  background strengths ("la" and "ha"), refined with the CRF or PAR.
* :func:`downsample_labels` — a label map onto the network's 1/8 grid.
* :func:`radius_offsets` — the half-disc of (dy, dx) pair offsets within a radius.
* :func:`affinity_pair_indices` — flat node indices of those pairs on an h x w grid (AffinityNet's layout).
* :func:`affinity_labels` — bg-positive / fg-positive / negative pair labels for AffinityNet training.
* :func:`dense_affinity` — the n x n affinity matrix from AffinityNet's pair affinities.
* :func:`random_walk` — seeds propagated by the transition matrix of ``affinity^beta``, ``2^logt`` steps.
* :func:`random_walk_labels` — the whole PSA inference: seeds pooled to the grid, walked, upsampled, argmax.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def crf_available() -> bool:
    """True when the optional dense CRF (``pydensecrf2``, ``pip install mmcst[crf]``) can be imported."""
    try:
        _import_densecrf()
    except ImportError:
        return False
    return True


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


# --------------------------------------------------------------------------------------------------
# PAR: pixel-adaptive refinement (torch only)

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
# The 8 neighbours of a pixel at unit distance; each dilation d scales them to (d*dy, d*dx).
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(d * dy, d * dx) for d in dilations for dy, dx in _RING]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """The neighbour at (dy, dx) of every pixel, read from a tensor replicate-padded by ``pad``."""
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def pixel_adaptive_refine(
    image: torch.Tensor,
    probs: torch.Tensor,
    dilations: Sequence[int] = PAR_DILATIONS,
    iterations: int = 10,
    colour_scale: float = 0.3,
    position_weight: float = 0.01,
) -> torch.Tensor:
    """Pixel-adaptive refinement (PAR; Ru et al., "Token Contrast", CVPR 2023) of label probabilities.

    Every pixel looks at 8 neighbours at each dilation (``8 * len(dilations)`` in all, borders replicated).
    Its weight for neighbour k is ``softmax_k(-mean_rgb((|I_k - I| / (std_k I_k * colour_scale))^2))``
    (colour distance relative to the spread of the neighbourhood's colours; ``std_k`` is the unbiased standard
    deviation over the neighbours) plus ``position_weight`` times ``softmax_k(-(dist_k / (std_k dist_k *
    colour_scale))^2)`` (nearer neighbours weigh more), divided by ``1 + position_weight``. Each iteration
    replaces the probabilities by the weighted sum of the neighbours' probabilities (the pixel itself is not
    among its neighbours). Defaults are ToCo's (dilations 1-24, 10 iterations, 0.3, 0.01).

    Args:
        image: B x 3 x H x W float image (any intensity scale: distances are relative to local spread).
        probs: B x K x H x W non-negative scores (e.g. probabilities with the background plane first).
        dilations: neighbour distances in pixels (positive integers).
        iterations: propagation steps (>= 0).
        colour_scale: temperature of both affinities (ToCo's ``w1``).
        position_weight: weight of the position affinity (ToCo's ``w2``).

    Returns:
        B x K x H x W refined scores; when ``probs`` sums to 1 over K, so does the result.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"pixel_adaptive_refine: image must be B x 3 x H x W, got shape {tuple(image.shape)}")
    if probs.dim() != 4 or probs.shape[0] != image.shape[0] or probs.shape[2:] != image.shape[2:]:
        raise ValueError(f"pixel_adaptive_refine: probs must be {image.shape[0]} x K x {image.shape[2]} x "
                         f"{image.shape[3]} to match image, got shape {tuple(probs.shape)}")
    if not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"pixel_adaptive_refine: dilations must be positive integers, got {tuple(dilations)}")
    if iterations < 0 or colour_scale <= 0 or position_weight < 0:
        raise ValueError(f"pixel_adaptive_refine: expected iterations >= 0, colour_scale > 0, position_weight >= 0, "
                         f"got {iterations}, {colour_scale}, {position_weight}")
    _, _, height, width = image.shape
    offsets = _neighbour_offsets([int(d) for d in dilations])
    pad = max(int(d) for d in dilations)
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    image = image.to(dtype)
    padded = F.pad(image, [pad] * 4, mode="replicate")

    # The spread (unbiased std over neighbours) of each colour channel, from sums of differences to the centre
    # pixel: a flat region gives exactly 0, where raw sums of squares would leave rounding noise.
    total = torch.zeros_like(image)
    total_sq = torch.zeros_like(image)
    for dy, dx in offsets:
        diff = _shifted(padded, pad, dy, dx, height, width) - image
        total += diff
        total_sq += diff * diff
    count = len(offsets)
    spread = ((total_sq - total * total / count) / (count - 1)).clamp_min(0).sqrt() + 1e-8

    colour_logits = torch.stack([
        -((_shifted(padded, pad, dy, dx, height, width) - image).abs() / spread / colour_scale).pow(2).mean(1)
        for dy, dx in offsets], dim=1)  # B x count x H x W
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=dtype, device=image.device)
    position = torch.softmax(-(distance / distance.std() / colour_scale).pow(2), dim=0)
    # Dividing by 1 + position_weight keeps the weights a convex combination (ToCo leaves them summing to
    # 1 + w2, which scales every label alike and so changes no argmax).
    weights = torch.softmax(colour_logits, dim=1) + position_weight * position.view(1, -1, 1, 1)
    weights /= 1 + position_weight

    refined = probs.to(dtype)
    for _ in range(iterations):
        padded_probs = F.pad(refined, [pad] * 4, mode="replicate")
        refined = torch.zeros_like(refined)
        for k, (dy, dx) in enumerate(offsets):
            refined.addcmul_(weights[:, k:k + 1], _shifted(padded_probs, pad, dy, dx, height, width))
    return refined


# --------------------------------------------------------------------------------------------------
# PSA stage 1: confident labels from seeds

IGNORE_LABEL = 255
RefineMethod = Literal["crf", "par", "auto"]


def _as_float_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")
    return value.float()


def _check_keys(keys: Any, count: int, name: str = "keys") -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.size != count:
        raise ValueError(f"{name}: expected one class index per map ({count}), got {keys.size}")
    if keys.size and (keys.min() < 0 or keys.max() >= IGNORE_LABEL - 1):
        raise ValueError(f"{name}: 0-based class indices must lie in [0, {IGNORE_LABEL - 2}] to fit a uint8 label "
                         f"map beside the ignore value {IGNORE_LABEL}, got {keys.tolist()}")
    return keys


def _refined_argmax(image: np.ndarray, scores: torch.Tensor, method: str) -> torch.Tensor:
    """Argmax over (1 + K) planes after the CRF or PAR: H x W plane indices (0 = background)."""
    if method == "crf":
        return torch.from_numpy(dense_crf(image, scores.numpy()).argmax(0))
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    probs = scores / scores.sum(0, keepdim=True).clamp_min(1e-8)
    return pixel_adaptive_refine(pixels, probs[None])[0].argmax(0)


def confident_labels(
    image: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    cams: np.ndarray | torch.Tensor,
    alpha_fg: float = 1.0,
    alpha_bg: float = 12.0,
    method: RefineMethod = "auto",
) -> np.ndarray:
    """Confident labels for AffinityNet training (PSA; METHOD 4.4 steps 1-2).

    The seeds are refined twice, each time with the background plane ``(1 - max_c M_c)^alpha`` in front:
    with ``alpha_fg`` ("la": a strong background, so the foreground left is confident) and ``alpha_bg``
    ("ha": a weak background, so the background left is confident). Labels, as PSA's: the class (1 + key)
    where la says foreground; 255 (ignore) where la says background; 0 where ha says background (this wins).
    Pixels outside a training crop are the caller's to mark 255 (pad the crop with 255).

    Args:
        image: H x W x 3 uint8 RGB image.
        keys: the K present classes, 0-based (class k is label k + 1).
        cams: K x H x W seed maps in [0, 1] (numpy or torch), in the order of ``keys``.
        alpha_fg: background power of the la pass (MCTformer: 1; PSA: 4).
        alpha_bg: background power of the ha pass (MCTformer: 12; PSA: 32).
        method: ``"crf"`` the dense CRF of PSA (:func:`dense_crf` with its defaults, needs ``mmcst[crf]``);
            ``"par"`` :func:`pixel_adaptive_refine` with its defaults at the image's resolution on the scores
            normalised to sum 1 (torch only); ``"auto"`` the CRF when installed, else PAR. The two agree on
            most pixels; where they differ, the CRF more often leaves a pixel uncertain (255).

    Returns:
        H x W uint8 label map: 0 background, 1 + key foreground, 255 ignore.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"confident_labels: image must be an H x W x 3 uint8 array, got "
                         f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
    cams_t = _as_float_tensor("confident_labels: cams", cams)
    if cams_t.dim() != 3 or cams_t.shape[1:] != image.shape[:2]:
        raise ValueError(f"confident_labels: cams must be K x {image.shape[0]} x {image.shape[1]} (the image's size), "
                         f"got shape {tuple(cams_t.shape)}")
    key_array = _check_keys(keys, cams_t.shape[0], "confident_labels: keys")
    if method not in ("crf", "par", "auto"):
        raise ValueError(f"confident_labels: method must be 'crf', 'par' or 'auto', got {method!r}")
    if method == "auto":
        method = "crf" if crf_available() else "par"
    cams_t = cams_t.clamp(0.0, 1.0)
    class_of_plane = torch.from_numpy(np.concatenate([[0], key_array + 1])).to(torch.uint8)

    passes = []
    for alpha in (alpha_fg, alpha_bg):
        scores = torch.cat([power_background(cams_t, alpha), cams_t])  # (1 + K) x H x W
        passes.append(_refined_argmax(image, scores, method))
    la_plane, ha_plane = passes
    labels = class_of_plane[la_plane]
    labels[la_plane == 0] = IGNORE_LABEL
    labels[ha_plane == 0] = 0
    return labels.numpy()


# --------------------------------------------------------------------------------------------------
# PSA stage 2: pairwise affinity labels on the 1/8 grid

def downsample_labels(labels: np.ndarray | torch.Tensor, stride: int = 8) -> np.ndarray | torch.Tensor:
    """A label map on the grid of a stride-``stride`` network: pixel (stride*i, stride*j) of each cell.

    This is PSA's nearest-neighbour rescale by 1/8 (it reads the top-left pixel of each 8 x 8 cell); the grid
    is ``ceil(H / stride) x ceil(W / stride)``, the feature grid of the image padded to a multiple of 8.
    """
    if labels.ndim != 2:
        raise ValueError(f"downsample_labels: labels must be an H x W map, got shape {tuple(labels.shape)}")
    if stride < 1:
        raise ValueError(f"downsample_labels: stride must be >= 1, got {stride}")
    return labels[::stride, ::stride]


def radius_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of PSA's pairs: half of the disc ``dy^2 + dx^2 < radius^2`` without (0, 0).

    First the row ``(0, 1) .. (0, radius - 1)``, then rows ``dy = 1 .. radius - 1`` left to right; each
    unordered pair of grid nodes within the radius appears once (34 offsets for radius 5).
    """
    if radius < 2:
        raise ValueError(f"radius_offsets: radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dy * dy + dx * dx < radius * radius]
    return offsets


def _pair_grid(grid: torch.Tensor, radius: int, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(from: P, to: D x P) values of ``grid`` (h x w) for PSA's pairs.

    The "from" nodes are those whose whole half-disc lies inside the grid: rows ``0 .. h - radius`` and
    columns ``radius - 1 .. w - radius``, row-major; row d of "to" is each one's neighbour at offset d.
    """
    height, width = grid.shape
    margin = radius - 1
    inner_h, inner_w = height - margin, width - 2 * margin
    if inner_h < 1 or inner_w < 1:
        raise ValueError(f"{caller}: a {height} x {width} grid is too small for radius {radius} "
                         f"(needs at least {radius} rows and {2 * radius - 1} columns)")
    origin = grid[:inner_h, margin:margin + inner_w].reshape(-1)
    targets = torch.stack([grid[dy:dy + inner_h, margin + dx:margin + dx + inner_w].reshape(-1)
                           for dy, dx in radius_offsets(radius)])
    return origin, targets


def affinity_pair_indices(height: int, width: int, radius: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row-major) node indices of PSA's pairs on an h x w grid.

    Returns:
        ``(origin, targets)``: origin [P] int64, targets [D x P] int64 (D = ``len(radius_offsets(radius))``);
        pair (d, p) joins node ``origin[p]`` and node ``targets[d, p]``. AffinityNet computes one affinity
        per pair in this D x P layout, which :func:`affinity_labels` and :func:`dense_affinity` share.
    """
    grid = torch.arange(height * width, dtype=torch.int64).view(height, width)
    return _pair_grid(grid, radius, "affinity_pair_indices")


def affinity_labels(labels: np.ndarray | torch.Tensor,
                    radius: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AffinityNet's pair labels from a confident label map on the 1/8 grid (PSA ``ExtractAffinityLabelInRadius``).

    Args:
        labels: h x w labels (0 background, classes, 255 ignore), e.g. :func:`downsample_labels` of
            :func:`confident_labels` of a training crop.
        radius: pairs join nodes less than ``radius`` apart (:func:`radius_offsets`).

    Returns:
        ``(bg_pos, fg_pos, neg)``, each a D x P float32 tensor of 0/1 in the layout of
        :func:`affinity_pair_indices`: both nodes background; both the same foreground class; the two
        labels differ. A pair with an ignored (255) node is in none of them.
    """
    grid = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
    if grid.dim() != 2 or grid.is_floating_point() or grid.dtype == torch.bool:
        raise ValueError(f"affinity_labels: labels must be an h x w integer map, got shape {tuple(grid.shape)} "
                         f"{grid.dtype}")
    origin, targets = _pair_grid(grid.to(torch.int64), radius, "affinity_labels")
    origin = origin.unsqueeze(0)
    valid = (origin != IGNORE_LABEL) & (targets != IGNORE_LABEL)
    same = (origin == targets) & valid
    bg_pos = same & (origin == 0)
    fg_pos = same & (origin != 0)
    neg = ~(origin == targets) & valid
    return bg_pos.float(), fg_pos.float(), neg.float()


def dense_affinity(pair_affinity: torch.Tensor, height: int, width: int, radius: int = 5) -> torch.Tensor:
    """The symmetric n x n affinity matrix (n = h * w) from AffinityNet's pair affinities, as PSA builds it.

    Args:
        pair_affinity: D x P affinities (or their D * P flattening) in the layout of
            :func:`affinity_pair_indices` for this grid and radius.

    Returns:
        n x n matrix: each pair's affinity at (from, to) and (to, from), 1 on the diagonal, 0 elsewhere
        (nodes farther apart than the radius).
    """
    origin, targets = affinity_pair_indices(height, width, radius)
    if pair_affinity.numel() != targets.numel() or pair_affinity.dim() not in (1, 2):
        raise ValueError(f"dense_affinity: pair_affinity must be {tuple(targets.shape)} (or flat) for a {height} x "
                         f"{width} grid and radius {radius}, got shape {tuple(pair_affinity.shape)}")
    values = pair_affinity.reshape(-1)
    rows = origin.to(values.device).expand_as(targets).reshape(-1)
    cols = targets.to(values.device).reshape(-1)
    num = height * width
    dense = torch.zeros(num, num, dtype=values.dtype, device=values.device)
    dense[rows, cols] = values
    dense[cols, rows] = values
    dense.diagonal().fill_(1.0)
    return dense


# --------------------------------------------------------------------------------------------------
# PSA stage 3: random walk

RANDOM_WALK_BG_THRESHOLD = 0.39  # MCTformer's run_psa default, "the optimal one obtained for seeds"
WalkMethod = Literal["power", "squaring"]


_BAND_COLUMNS = 256  # columns per block of the banded product: large enough for efficient matrix products


def _column_bands(affinity: torch.Tensor, width: int) -> Optional[list[tuple[int, int, int, int]]]:
    """``(start, stop, low, high)`` per run of ``width`` columns: rows ``low .. high - 1`` hold all the
    nonzeros of columns ``start .. stop - 1``. None when these bands cover half of the matrix or more.

    AffinityNet's affinity links grid nodes less than ``radius`` apart, so in row-major node order every
    nonzero lies within ``(radius - 1) * (grid width + 1)`` of the diagonal: for a 500 x 375 image (63 x 47
    grid, radius 5) the bands hold a quarter of the matrix, small enough to stay in cache across the steps
    where the dense matrix (35 MB in float32) would be read from memory at every step.
    """
    num = affinity.shape[0]
    nonzero = affinity != 0
    spans = []
    for start in range(0, num, width):
        stop = min(start + width, num)
        rows = nonzero[:, start:stop].any(dim=1).nonzero()
        low, high = (int(rows[0]), int(rows[-1]) + 1) if rows.numel() else (start, start)
        spans.append((start, stop, low, high))
    if sum((high - low) * (stop - start) for start, stop, low, high in spans) >= num * num // 2:
        return None
    return spans


def _check_column_sums(column_sums: torch.Tensor) -> None:
    if not bool((column_sums > 0).all()):
        empty = int((column_sums <= 0).nonzero()[0, -1])
        raise ValueError(f"random_walk: affinity column {empty} has no positive weight (every node needs a "
                         "positive self-affinity or neighbour; PSA puts 1 on the diagonal)")


def random_walk(
    affinity: torch.Tensor,
    seeds: torch.Tensor,
    beta: float = 8.0,
    logt: int = 6,
    method: WalkMethod = "power",
) -> torch.Tensor:
    """Seeds propagated ``2^logt`` steps by the random walk on ``affinity^beta`` (PSA ``infer_aff.py``).

    The transition matrix is ``T = A^beta / colsum(A^beta)`` (each column sums to 1, as PSA's) and the
    result is ``seeds_flat @ T^(2^logt)``: each node's new score is a weighted mean of all nodes' scores.

    * ``"power"`` applies T to the K x n seed matrix ``2^logt`` times: at most ``2^logt * n^2 * K``
      multiply-adds. For a radius-limited affinity (AffinityNet's), T is built and applied in blocks of
      columns restricted to the rows holding their nonzeros: the exact zeros are skipped, so the sums are
      the same up to rounding, at a quarter of the cost for a 500 x 375 image.
    * ``"squaring"`` (PSA) squares the n x n matrix ``logt`` times, then applies it once:
      ``logt * n^3 + n^2 * K``. For a 500 x 375 image (n = 63 * 47 = 2961, K = 21, logt = 6) that is
      13x more arithmetic than the dense ``"power"``. Both give the same scores up to rounding.

    Args:
        affinity: n x n non-negative affinities (e.g. :func:`dense_affinity`); float32 or float64.
        seeds: K x h x w scores on the affinity's grid (h * w = n), e.g. background + class maps average-
            pooled by 8.
        beta: power applied to the affinities (PSA: 8) before normalising.
        logt: log2 of the number of steps (MCTformer: 6, i.e. 64 steps; PSA: 8).
        method: ``"power"`` or ``"squaring"``.

    Returns:
        K x h x w walked scores, in the affinity's dtype and device.
    """
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1] or not affinity.is_floating_point():
        raise ValueError(f"random_walk: affinity must be a square n x n float matrix, got shape "
                         f"{tuple(affinity.shape)} {affinity.dtype}")
    num = affinity.shape[0]
    if seeds.dim() != 3 or seeds.shape[1] * seeds.shape[2] != num:
        raise ValueError(f"random_walk: seeds must be K x h x w with h * w = {num} (the affinity's size), got shape "
                         f"{tuple(seeds.shape)}")
    if method not in ("power", "squaring"):
        raise ValueError(f"random_walk: method must be 'power' or 'squaring', got {method!r}")
    if logt < 0 or beta <= 0:
        raise ValueError(f"random_walk: expected logt >= 0 and beta > 0, got logt {logt}, beta {beta}")
    scores = seeds.reshape(seeds.shape[0], num).to(affinity)
    bands = _column_bands(affinity, _BAND_COLUMNS) if method == "power" else None
    if bands is not None:
        # Every nonzero of a column lies in its band, so the band's column sums are the full column sums.
        blocks = [affinity[low:high, start:stop].pow(beta) for start, stop, low, high in bands]
        column_sums = torch.cat([block.sum(dim=0) for block in blocks])
        _check_column_sums(column_sums)
        for (start, stop, _, _), block in zip(bands, blocks):
            block /= column_sums[start:stop]
        for _ in range(2 ** logt):
            stepped = torch.empty_like(scores)
            for (start, stop, low, high), block in zip(bands, blocks):
                torch.mm(scores[:, low:high], block, out=stepped[:, start:stop])
            scores = stepped
        return scores.view_as(seeds)

    transition = affinity.pow(beta)
    column_sums = transition.sum(dim=0, keepdim=True)
    _check_column_sums(column_sums)
    transition /= column_sums
    if method == "power":
        for _ in range(2 ** logt):
            scores = scores @ transition
    else:
        for _ in range(logt):
            transition = transition @ transition
        scores = scores @ transition
    return scores.view_as(seeds)


def random_walk_labels(
    affinity: torch.Tensor,
    keys: Sequence[int] | np.ndarray,
    cams: np.ndarray | torch.Tensor,
    bg_threshold: Optional[float] = None,
    bg_alpha: Optional[float] = None,
    beta: float = 8.0,
    logt: int = 6,
    stride: int = 8,
    method: WalkMethod = "power",
) -> np.ndarray:
    """Pseudo mask by PSA's random walk (METHOD 4.4 step 4; MCTformer ``psa/infer_aff.py``).

    The background plane and the class maps are zero-padded to a multiple of ``stride``, average-pooled by
    ``stride``, walked (:func:`random_walk`), upsampled bilinearly to the padded size, cropped, and the
    argmax taken.

    Args:
        affinity: n x n affinity on the ``ceil(H / stride) x ceil(W / stride)`` grid (:func:`dense_affinity`).
        keys: the K present classes, 0-based.
        cams: K x H x W seed maps in [0, 1] (numpy or torch), in the order of ``keys``.
        bg_threshold: constant background score (MCTformer; 0.39 when neither background option is given).
        bg_alpha: instead, PSA's background ``(1 - max_c M_c)^bg_alpha`` (PSA: 16).
        beta, logt, method: as :func:`random_walk`.
        stride: the affinity grid's stride in pixels.

    Returns:
        H x W uint8 label map: 0 background, 1 + key foreground.
    """
    if bg_threshold is not None and bg_alpha is not None:
        raise ValueError("random_walk_labels: give bg_threshold (constant background) or bg_alpha "
                         f"((1 - max)^alpha background), not both; got {bg_threshold} and {bg_alpha}")
    cams_t = _as_float_tensor("random_walk_labels: cams", cams).to(affinity.device)
    if cams_t.dim() != 3:
        raise ValueError(f"random_walk_labels: cams must be K x H x W, got shape {tuple(cams_t.shape)}")
    key_array = _check_keys(keys, cams_t.shape[0], "random_walk_labels: keys")
    _, height, width = cams_t.shape
    grid_h, grid_w = -(-height // stride), -(-width // stride)
    if affinity.shape != (grid_h * grid_w, grid_h * grid_w):
        raise ValueError(f"random_walk_labels: affinity must be {grid_h * grid_w} x {grid_h * grid_w} for the "
                         f"{grid_h} x {grid_w} grid of {height} x {width} maps at stride {stride}, got shape "
                         f"{tuple(affinity.shape)}")
    if bg_alpha is not None:
        background = power_background(cams_t, bg_alpha)
    else:
        level = RANDOM_WALK_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
        background = cams_t.new_full((1, height, width), level)
    planes = torch.cat([background, cams_t])  # (1 + K) x H x W
    padded = F.pad(planes, (0, grid_w * stride - width, 0, grid_h * stride - height))
    seeds = F.avg_pool2d(padded[None], stride, stride)[0]
    walked = random_walk(affinity, seeds.to(affinity.dtype), beta=beta, logt=logt, method=method)
    upsampled = F.interpolate(walked[None].float(), size=padded.shape[1:], mode="bilinear", align_corners=False)[0]
    plane = upsampled[:, :height, :width].argmax(0).cpu()
    class_of_plane = torch.from_numpy(np.concatenate([[0], key_array + 1])).to(torch.uint8)
    return class_of_plane[plane].numpy()
