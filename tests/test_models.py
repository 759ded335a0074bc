"""Every registered method on tiny models: shapes, named finite losses, gradients, localization, weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import pytest
import timm
import torch

import mmcst.models.vit as vit_module
from mmcst.config import ModelConfig
from mmcst.models.base import LocalizationModel
from mmcst.models.registry import build_model, model_names
from mmcst.models.summary import format_summary, model_summary

CLASSES = ["cat", "dog", "pottedplant"]
TINY_CLIP = "mmcst-test-tiny-clip"
LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


@pytest.fixture(scope="session")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny open_clip architecture (registered under TINY_CLIP) and its random weights saved as a state dict."""
    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    path = folder / "tiny_clip.bin"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), path)
    return str(path)


def model_config(name: str, clip_weights: str | None = None, patch: int = 16, **sections: dict[str, Any]) -> ModelConfig:
    """A tiny config (depth 2, width 64, 2 heads) for ``name``; ``sections`` override fields per section."""
    cfg = ModelConfig(name=name)
    bb = cfg.backbone
    bb.name, bb.embed_dim, bb.depth, bb.num_heads, bb.patch_size, bb.img_size = "vit_base_patch16_224", 64, 2, 2, patch, 64
    bb.drop_path_rate = 0.0
    if name == "cam":
        bb.name, bb.patch_size, bb.embed_dim, bb.depth, bb.num_heads, bb.img_size = "resnet10t", None, None, None, None, None
    if clip_weights is not None:
        cfg.prior.clip_model, cfg.prior.clip_weights = TINY_CLIP, clip_weights
    else:
        cfg.prior.kind = "none"
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> LocalizationModel:
    torch.manual_seed(seed)
    model = build_model(cfg, CLASSES)
    model.train()
    return model


def images(height: int = 64, width: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


# (config name, sections, expected loss terms)
CASES = {
    "mmcst-F1": ("mmcst", {"mmcst": {"fusion": "F1"}}, {"cls_token", "t2p", "c2p", "contrast"}),
    "mmcst-F2": ("mmcst", {"mmcst": {"fusion": "F2"}}, {"cls_token", "t2p", "c2p", "contrast"}),
    "mmcst-F3": ("mmcst", {"mmcst": {"fusion": "F3", "attention_layers": 2}}, {"cls_token", "t2p", "c2p", "contrast"}),
    "mmcst-decoder": ("mmcst", {"mmcst": {"context_design": "decoder", "learnable_lambda": True,
                                          "learnable_temperature": True, "symmetric_contrast": True}},
                      {"cls_token", "t2p", "c2p", "contrast"}),
    "mmcst-global_visual": ("mmcst", {"mmcst": {"tokens": "global_visual"}}, {"cls_token", "c2p"}),
    "mctformer-v1": ("mctformer", {"mctformer": {"version": "v1", "layer_index": 2}}, {"cls_token"}),
    "mctformer-v2": ("mctformer", {"mctformer": {"version": "v2", "layer_index": 1}}, {"cls_token", "patch"}),
    "mctformer-plus": ("mctformer", {"mctformer": {"version": "v2", "layer_index": 2, "attention_reduce": "mean",
                                                   "fusion": "sqrt", "patch_pool": "gwrp", "cct_loss": True}},
                       {"cls_token", "patch", "cct"}),
    "cam": ("cam", {"cam": {"output_stride": 16}}, {"cls"}),
}


def test_registry_lists_every_method() -> None:
    assert {"mmcst", "mctformer", "cam"} <= set(model_names())


@pytest.mark.parametrize("size,patch", [((64, 64), 16), ((64, 96), 8)], ids=["64x64-p16", "64x96-p8"])
@pytest.mark.parametrize("case", list(CASES))
def test_method_contract(case: str, size: tuple[int, int], patch: int, clip_weights: str) -> None:
    name, sections, expected_terms = CASES[case]
    uses_clip = name == "mmcst" and sections.get("mmcst", {}).get("tokens") != "global_visual"
    model = build(model_config(name, clip_weights if uses_clip else None, patch=patch, **sections))
    x = images(*size)
    if name == "cam":
        grid = (size[0] // 16, size[1] // 16)
    else:
        grid = (size[0] // patch, size[1] // patch)
    num_patches = grid[0] * grid[1]

    outputs = model(x, LABELS)
    terms = model.loss(outputs, {"labels": LABELS, "id": ["a", "b"]})
    assert set(terms) == expected_terms
    for term, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), term
    sum(terms.values()).backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{case}: no gradient reached {param_name}"
            assert torch.isfinite(param.grad).all(), f"{case}: non-finite gradient in {param_name}"
    for part in ("clip_image", "clip_text"):
        encoder = getattr(model, part, None)
        if encoder is not None:  # the frozen prior: no gradient, not among the trainable parameters
            assert all(p.grad is None and not p.requires_grad for p in encoder.clip_model.parameters())
            trainable = {id(p) for p in model.parameters()}
            assert not any(id(p) in trainable for p in encoder.clip_model.parameters())

    model.eval()
    with torch.no_grad():
        assert model.classify(x).shape == (2, len(CLASSES))
        loc = model.localize(x, need_affinity=True)
        assert loc.maps.shape == (2, len(CLASSES), *grid)
        assert (loc.maps >= 0).all() and torch.isfinite(loc.maps).all()
        if name == "cam":
            assert loc.affinity is None  # CNN: no attention, no affinity
        else:
            assert loc.affinity is not None and loc.affinity.shape == (2, num_patches, num_patches)
            assert (loc.affinity >= 0).all()
        assert model.localize(x, need_affinity=False).affinity is None

    summary = model_summary(model)
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = format_summary(summary)
    assert type(model).__name__ in text


def test_mmcst_summary_layout_and_frozen_clip(clip_weights: str) -> None:
    model = build(model_config("mmcst", clip_weights))
    summary = model_summary(model)
    assert summary["token_layout"] == "[3 visual | 3 text | 4x4=16 patches at 64x64 px]"
    clip_params = sum(p.numel() for p in model.clip_image.clip_model.parameters())
    assert summary["frozen_parameters"] >= clip_params > 0
    assert [r["path"] for r in summary["weight_reports"]] == [clip_weights]
    assert "3 visual | 3 text" in format_summary(summary)
    # the frozen CLIP is re-loaded from its file, never saved in checkpoints
    assert not any(k.startswith("clip") for k in model.state_dict())
    assert model.no_weight_decay() == {"class_tokens", "text_proj.weight", "text_proj.bias", "vit.pos_embed",
                                       "vit.prefix_pos.cls", "vit.prefix_pos.txt"}


def test_mctformer_training_uses_fused_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training must not materialise attention: the capture path is never taken in forward/loss."""
    model = build(model_config("mctformer", mctformer={"version": "v2", "layer_index": 2}))

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("attention materialised during training")

    monkeypatch.setattr(vit_module, "_run_block_capturing_attention", forbidden)
    outputs = model(images(), LABELS)
    sum(model.loss(outputs, {"labels": LABELS}).values()).backward()
    with pytest.raises(AssertionError, match="materialised"):
        model.localize(images())


def _full_attention(model: Any, x: torch.Tensor, prefix: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    return model.vit(x, prefix, attn_layers=tuple(range(model.vit.depth))).attentions  # all rows


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mctformer_maps_match_attention_reference(version: str) -> None:
    model = build(model_config("mctformer", patch=8, mctformer={"version": version, "layer_index": 1})).eval()
    x = images(64, 96)
    c = len(CLASSES)
    with torch.no_grad():
        loc = model.localize(x, need_affinity=True)
        full = _full_attention(model, x, {"cls": model.class_tokens})
        out = model.vit(x, {"cls": model.class_tokens})
        attn = full[1][:, :c, c:].reshape(2, c, 8, 12)  # last layer, class rows, patch columns
        reference = attn
        if version == "v2":
            feats = out.patches.transpose(1, 2).reshape(2, -1, 8, 12)
            reference = attn * torch.relu(model.patch_head(feats))
        affinity = full[0][:, c:, c:] + full[1][:, c:, c:]
    assert torch.allclose(loc.maps, reference, atol=1e-5)
    assert torch.allclose(loc.affinity, affinity, atol=1e-5)


def test_mmcst_maps_match_reference(clip_weights: str) -> None:
    """F1 and F3 by hand from the encoder outputs; class attention columns start after the 2C tokens."""
    model = build(model_config("mmcst", clip_weights, mmcst={"fusion": "F3", "attention_layers": 1, "lambda_cls": 0.5})).eval()
    x = images()
    c = len(CLASSES)
    with torch.no_grad():
        loc = model.localize(x, need_affinity=True)
        prefix = {"cls": model.class_tokens, "txt": model.text_tokens_in()}
        full = _full_attention(model, x, prefix)
        out = model.vit(x, prefix)
        norm = model.vit.norm
        patches = norm(out.patches)
        t_cls = model.class_tokens + 0.5 * norm(out.prefix["cls"])
        t_txt = model.text_tokens_in() + 1.0 * norm(out.prefix["txt"])
        c2p = torch.relu(torch.einsum("bcd,bnd->bcn", t_cls, patches))
        t2p = torch.relu(torch.einsum("bcd,bnd->bcn", t_txt, patches))
        class_attn = full[1][:, :c, 2 * c:]
        reference = ((t2p * c2p).sqrt() * class_attn).reshape(2, c, 4, 4)
        affinity = full[0][:, 2 * c:, 2 * c:] + full[1][:, 2 * c:, 2 * c:]
    assert torch.allclose(loc.maps, reference, atol=1e-4, rtol=1e-4)
    assert torch.allclose(loc.affinity, affinity, atol=1e-5)


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_cam_output_stride_and_equation(stride: int) -> None:
    model = build(model_config("cam", cam={"output_stride": stride})).eval()
    x = images(64, 96)
    with torch.no_grad():
        feats = model.backbone.forward_features(x)
        loc = model.localize(x)
        logits = model.classify(x)
    assert loc.maps.shape[-2:] == (64 // stride, 96 // stride)
    weight = model.classifier.weight.flatten(1)  # C x K
    reference = torch.relu(torch.einsum("ck,bkhw->bchw", weight, feats))
    assert torch.allclose(loc.maps, reference, atol=1e-5)
    # GAP and the bias-free classifier commute: logits are the spatial mean of the un-rectified maps
    assert torch.allclose(logits, torch.einsum("ck,bkhw->bchw", weight, feats).mean((2, 3)), atol=1e-5)


def test_cam_loads_resnet_weights_and_reports(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    cfg = model_config("cam")
    cfg.backbone.weights = str(path)
    model = build(cfg)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    (report,) = model.weight_report()
    assert report["path"] == str(path) and len(report["sha256"]) == 64
    assert report["loaded"] == len([k for k in source.state_dict() if not k.startswith("fc.")])
    assert report["missing"] == [] and any("fc.weight" in note for note in report["notes"])

    wrong = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    cfg.backbone.weights = str(wrong)
    with pytest.raises(ValueError, match="do not fit"):
        build(cfg)


def test_cam_rejects_bad_output_stride() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build(model_config("cam", cam={"output_stride": 4}))


@pytest.mark.parametrize("name", ["mmcst", "mctformer"])
def test_class_token_init_copies_cls_or_draws_distinct_tokens(name: str, tmp_path: Path) -> None:
    extra = {"mctformer": {"layer_index": 2}} if name == "mctformer" else {}
    # Random weights: no trained [CLS] to copy; MCTformer's own trunc-normal(0.02) start, distinct per class.
    default = build(model_config(name, **extra))
    tokens = default.class_tokens.detach()
    assert abs(float(tokens.std()) - 0.02) < 0.005 and float(tokens.abs().max()) < 0.1
    assert float(torch.cdist(tokens, tokens).add(torch.eye(len(tokens)) * 1e3).min()) > 0.05
    # Pretrained weights: C copies of the checkpoint's [CLS] (MCTformer's initialisation).
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=64,
                                  embed_dim=64, depth=2, num_heads=2)
    state = reference.state_dict()
    state["cls_token"] = torch.randn(1, 1, 64)
    torch.save(state, tmp_path / "vit.pth")
    copied = build(model_config(name, backbone={"weights": str(tmp_path / "vit.pth")}, **extra))
    cls = state["cls_token"].reshape(-1)
    assert torch.equal(copied.class_tokens.detach(), cls.expand_as(copied.class_tokens))
    drawn = build(model_config(name, backbone={"token_init_std": 0.3}, **extra))
    tokens = drawn.class_tokens.detach()
    assert tokens.shape == default.class_tokens.shape
    assert abs(float(tokens.std()) - 0.3) < 0.05
    assert float(torch.cdist(tokens, tokens).add(torch.eye(len(tokens)) * 1e3).min()) > 1.0  # all distinct
    with pytest.raises(ValueError, match="token_init_std"):
        build(model_config(name, backbone={"token_init_std": 0.0}, **extra))
