"""Every shipped config builds its model at tiny scale and runs a training step and a localization,
so configs cannot drift from the code. Only sizes and weight files are replaced; every method switch
of the config is kept. The 448 px ViT configs also build at their own patch grid (28x28)."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml

from mmcst.config import Config, load_config
from mmcst.models.registry import build_model
from mmcst.models.summary import format_summary, model_summary
from mmcst.models.vit import TokenViT, resize_patch_pos_embed
from mmcst.refine import radius_offsets
from test_models import TINY_CLIP, clip_weights  # noqa: F401  (session fixture: a tiny open_clip model)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ["cat", "dog", "pottedplant"]
ALL = sorted(CONFIGS.rglob("*.yaml"))
# ViT configs trained at 448 px. demo/ is 128 px (its wsss.yaml is a fragment read on top of a demo method config).
VIT_448 = [p for p in ALL if p.parent.name != "demo"
           and (lambda c: c.model.name != "cam" and c.data.image_size == 448)(load_config(p))]


def _tiny_prior(cfg: Config, clip_file: str, tmp_path: Path) -> None:
    """Tiny CLIP instead of the real one; a captions file for the caption-context ablations."""
    if cfg.model.prior.kind == "clip":
        cfg.model.prior.clip_model, cfg.model.prior.clip_weights = TINY_CLIP, clip_file
        cfg.model.prior.cache_dir = str(tmp_path / "cache")
    if cfg.model.mmcst.context == "caption":
        captions = tmp_path / "captions.csv"
        captions.write_text("image,caption\na,a cat on a sofa\nb,a dog in a garden\n")
        cfg.model.mmcst.captions_file = str(captions)


def _vit(model: torch.nn.Module) -> TokenViT:
    return next(m for m in model.modules() if isinstance(m, TokenViT))


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_builds_and_runs_at_tiny_scale(path, clip_weights, tmp_path):  # noqa: F811
    cfg = load_config(path)
    bb = cfg.model.backbone
    bb.weights = None
    if cfg.model.name == "cam":
        bb.name = "resnet10t"
    else:
        bb.embed_dim, bb.depth, bb.num_heads, bb.img_size = 64, 3, 2, 64  # depth 3: the last-3-layer attention of MCTformer
        bb.patch_size = bb.patch_size or 16
    _tiny_prior(cfg, clip_weights, tmp_path)
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


def test_448_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in VIT_448}
    assert {"voc/mmcst.yaml", "coco/mmcst.yaml", "openimages/mmcst.yaml"} <= names
    assert any(name.startswith("ablations/") for name in names)


@pytest.mark.parametrize("path", VIT_448, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_448_config_learns_its_pos_embed_at_the_training_grid(path, clip_weights, tmp_path):  # noqa: F811
    """Narrow and shallow, but the config's own patch size and input size: the native grid is 28x28."""
    cfg = load_config(path, ["model.backbone.weights=null", "model.backbone.embed_dim=64", "model.backbone.depth=3",
                             "model.backbone.num_heads=2"])
    assert cfg.model.backbone.img_size == cfg.data.image_size == 448
    _tiny_prior(cfg, clip_weights, tmp_path)
    model = build_model(cfg.model, CLASSES)
    vit = _vit(model)
    assert vit.grid_size == (28, 28) and tuple(vit.pos_embed.shape) == (1, 784, 64)
    with torch.enable_grad():  # training: a 448 crop adds the learned parameter itself, nothing resampled
        assert vit.patch_pos_embed((28, 28)) is vit.pos_embed
    summary = model_summary(model)
    assert summary["vit_input"] == {"patch_size": 16, "grid": [28, 28], "image_size": [448, 448]}
    assert "input: 448 px = 28x28 patches of 16 px" in format_summary(summary)


def test_native_grid_follows_the_training_size():
    assert load_config(CONFIGS / "voc/mmcst.yaml", ["data.image_size=224"]).model.backbone.img_size == 224
    assert load_config(CONFIGS / "voc/mctformer_v2.yaml").model.backbone.img_size == 224
    assert load_config(CONFIGS / "voc/mmcst.yaml", ["model.backbone.img_size=384"]).model.backbone.img_size == 384


def test_14x14_checkpoint_is_resized_once_to_the_28x28_grid(clip_weights, tmp_path):  # noqa: F811
    """A DINO-layout file (plain state dict, pos_embed = 1 class slot + 14x14) loaded by the 448 px VOC config."""
    torch.manual_seed(0)
    dino = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=64, depth=3,
                             num_heads=2)
    state = {k: v.clone() for k, v in dino.state_dict().items()}
    with torch.no_grad():
        state["pos_embed"].normal_()
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 64)
    weights = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(state, weights)
    cfg = load_config(CONFIGS / "voc/mmcst.yaml", [f"model.backbone.weights={weights}", "model.backbone.embed_dim=64",
                                                   "model.backbone.depth=3", "model.backbone.num_heads=2"])
    _tiny_prior(cfg, clip_weights, tmp_path)
    model = build_model(cfg.model, CLASSES)
    vit = _vit(model)
    expected = resize_patch_pos_embed(state["pos_embed"][:, 1:], (14, 14), (28, 28))
    torch.testing.assert_close(vit.pos_embed.detach(), expected)
    assert any("14x14 -> 28x28" in note for note in vit.weight_report.notes)
    # Learned at 28x28 from here on: a training step at 448 px moves the 28x28 parameter directly.
    model.train()
    images = torch.randn(2, 3, 448, 448)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch = {"id": ["a", "b"], "image": images, "labels": labels}
    with torch.enable_grad():
        sum(model.loss(model(images, labels, extras=batch), batch).values()).backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.shape == (1, 784, 64)
    assert vit.pos_embed.grad.abs().sum(-1).gt(0).float().mean() > 0.9  # nearly every one of the 784 positions


WSSS = [p for p in ALL if "wsss" in (yaml.safe_load(p.read_text()) or {})]


def test_wsss_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in WSSS}
    assert {"voc/wsss_mmcst.yaml", "coco/wsss_mmcst.yaml", "demo/wsss.yaml"} <= names


@pytest.mark.parametrize("path", WSSS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_wsss_config_builds_its_affinitynet_and_segmenter_at_tiny_scale(path):
    """The config's AffinityNet and segmenter (ResNet-38 at 1/16 width, timm trunks as named, no weight files)
    run a forward at 72 px: the pair affinities of the config's radius and C + 1 logit planes on the 1/8 grid."""
    from mmcst.engine.affinity import build_affinity_net
    from mmcst.engine.seg import build_seg_model

    cfg = load_config(path)
    cfg.wsss.affinity.weights = cfg.wsss.seg.weights = None
    if cfg.wsss.affinity.backbone == "resnet38":
        cfg.wsss.affinity.width = 0.0625
    if cfg.wsss.seg.model == "deeplab_v1":
        cfg.wsss.seg.width = 0.0625
    torch.manual_seed(0)
    images = torch.randn(2, 3, 72, 72)
    affinity_net = build_affinity_net(cfg).eval()
    segmenter = build_seg_model(cfg, len(CLASSES)).eval()
    with torch.no_grad():
        pairs = affinity_net(images)
        logits = segmenter(images)
    radius = cfg.wsss.affinity.radius
    assert pairs.shape[:2] == (2, len(radius_offsets(radius)))
    assert ((pairs > 0) & (pairs <= 1)).all()
    assert logits.shape == (2, len(CLASSES) + 1, 9, 9)
