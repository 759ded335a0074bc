"""Honest reference predictors that run through the real map-file and evaluation path.

* ``gt``: the ground-truth mask turned into one map per labelled class (1 inside the class, 0 elsewhere).
  It must score 100 mIoU at every threshold in (0, 1): a check of the whole evaluation path.
* ``centre``: an isotropic Gaussian centred in the image for every labelled class — the classic
  "centre prior" of weakly supervised localization, which any useful method must beat.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mmcst.io import save_map

REFERENCES = ("gt", "centre")


def gt_maps(mask: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[K, H, W] maps equal to 1 where the mask holds class ``key + 1``."""
    return np.stack([(mask == k + 1).astype(np.float32) for k in keys]) if len(keys) else np.zeros((0,) + mask.shape, np.float32)


def centre_gaussian(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """HxW Gaussian centred in the image, standard deviation ``sigma`` x the side, peak 1."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))


def write_reference_maps(dataset: Any, out_dir: str | Path, kind: str, progress: bool = True) -> Path:
    """Write map files of reference predictor ``kind`` for every image of ``dataset`` (labels from the dataset)."""
    if kind not in REFERENCES:
        raise ValueError(f"reference predictor: expected one of {REFERENCES}, got {kind!r}")
    out_dir = Path(out_dir)
    for index in tqdm(range(len(dataset)), desc=f"reference {kind}", disable=not progress, leave=False):
        mask = dataset.get_mask(index)
        if mask is None:
            raise ValueError(f"reference predictor {kind!r} needs ground-truth masks; image {dataset.ids[index]} has none")
        keys = np.flatnonzero(dataset.get_labels(index) > 0)
        if kind == "gt":
            cam = gt_maps(mask, keys)
        else:
            cam = np.repeat(centre_gaussian(*mask.shape)[None], len(keys), axis=0)
        save_map(out_dir / f"{dataset.ids[index]}.npy", keys, cam)
    return out_dir
