"""Losses against brute-force / hand-worked references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcst.losses import (
    batch_contrastive_ce,
    contrastive_class_token_loss,
    gwrp,
    gwrp_weights,
    l1_regularizer,
    mlsm,
)


def _gwrp_loop(maps: torch.Tensor, decay: float) -> torch.Tensor:
    out = torch.zeros(maps.shape[:2], dtype=torch.float64)
    for b in range(maps.shape[0]):
        for c in range(maps.shape[1]):
            values = sorted(maps[b, c].tolist(), reverse=True)
            num = sum(decay**j * r for j, r in enumerate(values))
            den = sum(decay**j for j in range(len(values)))
            out[b, c] = num / den
    return out


def test_mlsm_matches_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    labels = (torch.rand(3, 5) > 0.5).float()
    ref = -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean()
    assert torch.allclose(mlsm(logits, labels), ref, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        mlsm(logits, labels[:, :4])


def test_gwrp_equals_bruteforce_loop() -> None:
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 17)
    for decay in (0.996, 0.9, 0.5):
        assert torch.allclose(gwrp(maps, decay).double(), _gwrp_loop(maps, decay), atol=1e-5)


def test_gwrp_decay_one_is_mean_and_tiny_decay_is_max() -> None:
    torch.manual_seed(1)
    maps = torch.randn(2, 4, 5, 6)  # B x C x h x w input is flattened
    assert torch.allclose(gwrp(maps, 1.0), maps.flatten(2).mean(-1), atol=1e-6)
    assert torch.allclose(gwrp(maps, 1e-6), maps.flatten(2).amax(-1), atol=1e-4)


def test_gwrp_weights_cached_and_normalised() -> None:
    w = gwrp_weights(196, 0.996)
    assert w is gwrp_weights(196, 0.996)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    # METHOD 2.9 / 3.3: Z(0.996) = 136.0 at 196 patches, so the first weight is 1 / 136.0
    assert math.isclose(1.0 / float(w[0]), 136.0, rel_tol=1e-3)
    assert gwrp_weights(784, 0.996)[0].item() == pytest.approx(1 / 239.2, rel=1e-3)
    with pytest.raises(ValueError, match="decay"):
        gwrp_weights(4, 0.0)


def test_gwrp_gradient_finite_and_ranked() -> None:
    maps = torch.tensor([[[3.0, 1.0, 2.0]]], requires_grad=True)
    gwrp(maps, 0.5).sum().backward()
    # weights 1, .5, .25 / 1.75 go to ranks 1 (value 3), 2 (value 2), 3 (value 1)
    expected = torch.tensor([[[1.0, 0.25, 0.5]]]) / 1.75
    assert torch.allclose(maps.grad, expected)


def test_batch_contrastive_ce_hand_computed() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    tau = 0.5
    # S = u v^T / tau = [[1.2, 0], [1.6, 2.0]]
    row0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0)))
    row1 = -math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))
    assert batch_contrastive_ce(u, v, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    col0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    col1 = -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0)))
    sym = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    assert batch_contrastive_ce(u, v, tau, symmetric=True).item() == pytest.approx(sym, rel=1e-6)


def test_batch_contrastive_ce_learnable_temperature_gradients() -> None:
    torch.manual_seed(0)
    u = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(4, 8), dim=-1)
    tau = torch.tensor(0.07, requires_grad=True)
    batch_contrastive_ce(u, v, tau).backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(tau.grad)
    with pytest.raises(ValueError, match="B x d"):
        batch_contrastive_ce(u, v[:3], 0.07)


def test_l1_regularizer() -> None:
    u = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert l1_regularizer(u, t).item() == pytest.approx((2 + 3) / 2)


def test_contrastive_class_token_loss_bruteforce() -> None:
    torch.manual_seed(0)
    tokens = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    per_layer = []
    for layer in tokens:
        terms = []
        for b in range(2):
            for c in range(3):
                if labels[b, c] > 0:
                    sims = torch.stack([F.cosine_similarity(layer[b, c], layer[b, k], dim=0) for k in range(3)])
                    terms.append(-torch.log_softmax(sims, 0)[c])
        per_layer.append(torch.stack(terms).mean())
    ref = torch.stack(per_layer).mean()
    loss = contrastive_class_token_loss(tokens, labels)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in tokens)
    assert contrastive_class_token_loss(torch.stack(tokens), torch.zeros(2, 3)).item() == 0.0
