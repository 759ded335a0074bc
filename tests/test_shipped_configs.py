"""Every shipped config builds its model at tiny scale and runs a training step and a localization,
so configs cannot drift from the code. Only sizes and weight files are replaced; every method switch
of the config is kept."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcst.config import load_config
from mmcst.models.registry import build_model
from test_models import TINY_CLIP, clip_weights  # noqa: F401  (session fixture: a tiny open_clip model)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ["cat", "dog", "pottedplant"]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_builds_and_runs_at_tiny_scale(path, clip_weights, tmp_path):  # noqa: F811
    cfg = load_config(path)
    bb = cfg.model.backbone
    bb.weights = None
    if cfg.model.name == "cam":
        bb.name = "resnet10t"
    else:
        bb.embed_dim, bb.depth, bb.num_heads, bb.img_size = 64, 3, 2, 64  # depth 3: the last-3-layer attention of MCTformer
        bb.patch_size = bb.patch_size or 16
    if cfg.model.prior.kind == "clip":
        cfg.model.prior.clip_model, cfg.model.prior.clip_weights = TINY_CLIP, clip_weights
        cfg.model.prior.cache_dir = str(tmp_path / "cache")
    if cfg.model.mmcst.context == "caption":
        captions = tmp_path / "captions.csv"
        captions.write_text("image,caption\na,a cat on a sofa\nb,a dog in a garden\n")
        cfg.model.mmcst.captions_file = str(captions)
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASSES)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch = {"id": ["a", "b"], "image": images, "labels": labels}
    model.train()
    terms = model.loss(model(images, labels, extras=batch), batch)
    assert terms and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    model.eval()
    with torch.no_grad():
        loc = model.localize(images, need_affinity=cfg.infer.refine)
    assert loc.maps.shape[:2] == (2, 3) and (loc.maps >= 0).all()
    if cfg.infer.refine:
        assert loc.affinity is not None
