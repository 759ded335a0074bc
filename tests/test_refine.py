"""Refinement against brute-force references."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from mmcst.refine import affinity_refine, dense_crf, power_background


def test_affinity_refine_matches_loop() -> None:
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 2, 3)
    affinity = torch.rand(2, 6, 6)
    out = affinity_refine(maps, affinity)
    ref = torch.zeros_like(maps)
    for b in range(2):
        for c in range(3):
            flat = maps[b, c].flatten()
            for i in range(6):
                ref[b, c].view(-1)[i] = sum(affinity[b, i, j] * flat[j] for j in range(6))
    assert torch.allclose(out, ref, atol=1e-6)


def test_affinity_refine_direction_and_shape_errors() -> None:
    # patch 0 receives everything from patch 1: direction is rows = output patch
    maps = torch.tensor([[[[0.0, 5.0]]]])
    affinity = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert affinity_refine(maps, affinity).flatten().tolist() == [5.0, 0.0]
    with pytest.raises(ValueError, match="expected affinity of shape"):
        affinity_refine(maps, torch.rand(1, 3, 3))


def test_power_background() -> None:
    maps = torch.tensor([[[0.2, 0.9]], [[0.5, 0.1]]])  # C=2, H=1, W=2
    bg = power_background(maps, 2.0)
    assert bg.shape == (1, 1, 2)
    assert torch.allclose(bg, torch.tensor([[[0.25, 0.01]]]))
    assert torch.equal(power_background(torch.zeros(0, 2, 2)), torch.ones(1, 2, 2))


def test_dense_crf_missing_dependency_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"pip install mmcst\[crf\]"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))


def test_dense_crf_runs_when_installed() -> None:
    if os.environ.get("MMCST_REQUIRE_CRF") != "1":  # CI installs the extra: there the test must run
        pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    probs = rng.random((2, 8, 8)).astype(np.float32)
    out = dense_crf(image, probs, iterations=2)
    assert out.shape == (2, 8, 8)
    assert np.allclose(out.sum(0), 1.0, atol=1e-4)
