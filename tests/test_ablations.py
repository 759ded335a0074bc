"""Each MMCST ablation switch changes exactly the computation it names (poster tables 1 and 2, METHOD 2-4)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_models import CLASSES, LABELS, build, clip_weights, images, model_config  # noqa: F401 (fixture)


def mmcst(clip: str | None, **values: Any) -> Any:
    return build(model_config("mmcst", clip, mmcst=values))


def _perturbed(tensor: torch.Tensor) -> torch.Tensor:
    return tensor + torch.randn(tensor.shape, generator=torch.Generator().manual_seed(7))


def test_global_local_combination_formula(clip_weights: str) -> None:
    model = mmcst(clip_weights, lambda_cls=0.5, lambda_text=2.0)
    with torch.no_grad():
        enc = model._encode(images())
        t_cls, t_txt = model.combined_tokens(enc)
        assert torch.allclose(t_cls, model.class_tokens + 0.5 * model.vit.norm(enc.cls_out))
        assert torch.allclose(t_txt, model.text_tokens_in() + 2.0 * model.vit.norm(enc.txt_out))


def test_local_tokens_ignore_global_tokens(clip_weights: str) -> None:
    """tokens=local: with the encoder outputs fixed, perturbing T_in leaves the map tokens unchanged."""
    for tokens, same in (("local", True), ("global_local", False)):
        model = mmcst(clip_weights, tokens=tokens)
        with torch.no_grad():
            enc = model._encode(images())
            before = model.combined_tokens(enc)
            model.class_tokens.copy_(_perturbed(model.class_tokens))
            model.text_proj.bias.add_(1.0)
            after = model.combined_tokens(enc)
        for a, b in zip(before, after):
            assert torch.allclose(a, b) is same, tokens


def test_global_tokens_ignore_encoder_outputs(clip_weights: str) -> None:
    """tokens=global: perturbing T_out leaves the map tokens unchanged (global_local: changes them)."""
    for tokens, same in (("global", True), ("global_visual", True), ("global_local", False)):
        model = mmcst(clip_weights if tokens != "global_visual" else None, tokens=tokens, context="none")
        with torch.no_grad():
            enc = model._encode(images())
            before = model.combined_tokens(enc)
            enc.cls_out = _perturbed(enc.cls_out)
            if enc.txt_out is not None:
                enc.txt_out = _perturbed(enc.txt_out)
            after = model.combined_tokens(enc)
        assert torch.allclose(before[0], after[0]) is same, tokens
        if before[1] is not None:
            assert torch.allclose(before[1], after[1]) is same, tokens


def test_visual_context_off_equals_global_path(clip_weights: str) -> None:
    no_context = mmcst(clip_weights, tokens="global_local", visual_context=False, context="none").eval()
    global_ = mmcst(clip_weights, tokens="global", context="none").eval()
    global_.load_state_dict(no_context.state_dict())
    full = mmcst(clip_weights, tokens="global_local", context="none").eval()
    full.load_state_dict(no_context.state_dict())
    x = images()
    with torch.no_grad():
        a, b, c = (m.localize(x).maps for m in (no_context, global_, full))
        la, lb = no_context(x, LABELS), global_(x, LABELS)
    assert torch.equal(a, b)
    assert torch.equal(la["t2p_logits"], lb["t2p_logits"]) and torch.equal(la["c2p_logits"], lb["c2p_logits"])
    assert not torch.allclose(a, c)


def test_global_visual_has_no_text_tokens(clip_weights: str) -> None:
    model = mmcst(clip_weights, tokens="global_visual")
    c = len(CLASSES)
    assert model.vit.num_prefix == c and [g for g, _ in model.vit.groups] == ["cls"]
    assert model.text_tokens_in() is None and not hasattr(model, "text_embeddings")  # CLIP not even loaded
    assert model.token_layout() == f"[{c} visual | 4x4=16 patches at 64x64 px]"
    outputs = model(images(), LABELS)
    assert set(model.loss(outputs, {"labels": LABELS})) == {"cls_token", "c2p"}
    with torch.no_grad():
        enc = model._encode(images())
        c2p = torch.relu(torch.einsum("bcd,bnd->bcn", model.class_tokens.expand(2, -1, -1), enc.patches))
        assert torch.allclose(model.localize(images()).maps, c2p.view(2, c, 4, 4), atol=1e-5)  # c2p only


def test_context_none_has_no_context_term(clip_weights: str) -> None:
    model = mmcst(clip_weights, context="none")
    outputs = model(images(), LABELS)
    assert "context" not in outputs and model.context_proj is None and model.clip_image is None
    assert set(model.loss(outputs, {"labels": LABELS})) == {"cls_token", "t2p", "c2p"}


def test_prior_none_random_text_tokens_and_no_context(clip_weights: str) -> None:
    model = mmcst(None, context="image")  # no CLIP: context transfer is off whatever `context` says
    assert model.text_proj is None and model.text_tokens.requires_grad
    norms = model.text_tokens.detach().norm(dim=-1)
    assert torch.allclose(norms, norms[0].expand_as(norms))
    assert set(model.loss(model(images(), LABELS), {"labels": LABELS})) == {"cls_token", "t2p", "c2p"}


def test_image_context_targets_are_clip_image_embeddings(clip_weights: str) -> None:
    model = mmcst(clip_weights)
    x = images()
    outputs = model(x, LABELS)
    assert torch.allclose(outputs["context_target"], model.clip_image(x))
    # label-masked pooling of LN(T_txt_out), projected, L2-normalised
    with torch.no_grad():
        enc = model._encode(x)
        tokens = model.vit.norm(enc.txt_out)
        pooled = torch.stack([tokens[0, [0, 2]].mean(0), tokens[1, [1]].mean(0)])
        expected = F.normalize(model.context_proj(pooled), dim=-1)
    assert torch.allclose(outputs["context"], expected, atol=1e-5)
    u, v = outputs["context"], outputs["context_target"]
    manual = F.cross_entropy(u @ v.t() / 0.07, torch.arange(2))
    assert torch.allclose(model.loss(outputs, {"labels": LABELS})["contrast"], manual, atol=1e-5)
    # a precomputed (cached) embedding replaces the on-the-fly one
    cached = F.normalize(torch.randn(2, 32), dim=-1)
    assert torch.allclose(model(x, LABELS, extras={"clip_embedding": cached})["context_target"], cached)


def test_l1_regularizer_term(clip_weights: str) -> None:
    model = mmcst(clip_weights, regularizer="l1")
    outputs = model(images(), LABELS)
    terms = model.loss(outputs, {"labels": LABELS})
    assert "l1" in terms and "contrast" not in terms
    expected = (outputs["context"] - outputs["context_target"]).abs().sum(-1).mean()
    assert torch.allclose(terms["l1"], expected)


def test_caption_context(clip_weights: str, tmp_path: Path) -> None:
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\na.jpg,a cat on a sofa\nb,a dog\nb,a brown dog in a park\n")
    model = mmcst(clip_weights, context="caption", regularizer="l1", captions_file=str(captions))
    assert model.clip_image is None and model.caption_embeddings.shape == (2, 32)
    dog = F.normalize(model.clip_text(["a dog", "a brown dog in a park"]).mean(0), dim=-1)
    assert torch.allclose(model.caption_embeddings[1], dog, atol=1e-6)
    outputs = model(images(), LABELS)
    terms = model.loss(outputs, {"labels": LABELS, "id": ["a", "b"]})
    targets = model.caption_embeddings
    assert torch.allclose(terms["l1"], (outputs["context"] - targets).abs().sum(-1).mean())
    with pytest.raises(KeyError, match="no caption for image 'zebra'"):
        model.loss(outputs, {"labels": LABELS, "id": ["a", "zebra"]})
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na,b\n")
    with pytest.raises(ValueError, match="image,caption"):
        mmcst(clip_weights, context="caption", captions_file=str(bad))


def test_fusions_differ_and_follow_their_formulas(clip_weights: str) -> None:
    models = {f: mmcst(clip_weights, fusion=f, attention_layers=1).eval() for f in ("F1", "F2", "F3")}
    state = models["F1"].state_dict()
    for model in models.values():
        model.load_state_dict(state)
    x = images()
    with torch.no_grad():
        maps = {f: m.localize(x).maps for f, m in models.items()}
        enc = models["F1"]._encode(x)
        t_cls, t_txt = models["F1"].combined_tokens(enc)
        c2p = torch.relu(torch.einsum("bcd,bnd->bcn", t_cls, enc.patches))
        t2p = torch.relu(torch.einsum("bcd,bnd->bcn", t_txt, enc.patches))

    def norm(m: torch.Tensor) -> torch.Tensor:
        low, high = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
        return (m - low) / (high - low + 1e-8)

    assert torch.allclose(maps["F1"], (t2p * c2p).sqrt().view_as(maps["F1"]), atol=1e-5)
    assert torch.allclose(maps["F2"], (norm(t2p) + norm(c2p)).view_as(maps["F2"]), atol=1e-5)
    assert not torch.allclose(maps["F1"], maps["F2"]) and not torch.allclose(maps["F1"], maps["F3"])
    assert not torch.allclose(maps["F2"], maps["F3"])


def test_decoder_design_uses_its_decoder(clip_weights: str) -> None:
    model = mmcst(clip_weights, context_design="decoder", decoder_layers=2)
    assert model.decoder is not None and len(model.decoder.layers) == 2
    assert "decoder" in model.token_layout()
    x = images()
    with torch.no_grad():
        before = model(x, LABELS)["c2p_logits"]
        bias = model.decoder.layers[-1].linear2.bias
        bias.copy_(_perturbed(bias))
        after = model(x, LABELS)["c2p_logits"]
    assert not torch.allclose(before, after)
    terms = model.loss(model(x, LABELS), {"labels": LABELS})
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert mmcst(clip_weights).decoder is None


def test_text_bridges(clip_weights: str) -> None:
    linear = mmcst(clip_weights, text_bridge="linear")
    with torch.no_grad():
        norms = linear.text_tokens_in().norm(dim=-1)
    visual_norm = float(linear.class_tokens.detach().norm(dim=-1).mean())
    assert norms.mean().item() == pytest.approx(visual_norm, rel=1e-4)  # norm-matched init
    with pytest.raises(ValueError, match="text_bridge=direct"):
        mmcst(clip_weights, text_bridge="direct")  # CLIP 32-d vs ViT 64-d
    cfg = model_config("mmcst", clip_weights, mmcst={"text_bridge": "direct"})
    cfg.backbone.embed_dim = 32
    direct = build(cfg)
    assert direct.text_proj is None and direct.text_tokens.shape == (3, 32)
    cosine = F.cosine_similarity(direct.text_tokens.detach(), direct.text_embeddings, dim=-1)
    assert torch.allclose(cosine, torch.ones(3), atol=1e-5)


def test_learnable_lambda_and_temperature(clip_weights: str) -> None:
    model = mmcst(clip_weights, learnable_lambda=True, learnable_temperature=True, temperature=0.1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lambda_text", "lambda_cls", "logit_scale"} <= names
    assert float(model.temperature().detach()) == pytest.approx(0.1)
    sum(model.loss(model(images(), LABELS), {"labels": LABELS}).values()).backward()
    assert model.lambda_cls.grad is not None and model.logit_scale.grad is not None
    fixed = mmcst(clip_weights)
    assert "lambda_cls" not in {n for n, _ in fixed.named_parameters()} and float(fixed.lambda_cls) == 1.0


def test_symmetric_contrast_and_text_token_loss(clip_weights: str) -> None:
    model = mmcst(clip_weights, symmetric_contrast=True, text_token_loss=True)
    outputs = model(images(), LABELS)
    terms = model.loss(outputs, {"labels": LABELS})
    assert "txt_token" in terms
    s = outputs["context"] @ outputs["context_target"].t() / 0.07
    target = torch.arange(2)
    expected = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))
    assert torch.allclose(terms["contrast"], expected, atol=1e-5)


def test_correlation_scale_and_cls_token_switch(clip_weights: str) -> None:
    plain = mmcst(clip_weights, context="none").eval()
    scaled = mmcst(clip_weights, context="none", correlation_scale="sqrt_d", cls_token_loss=False).eval()
    scaled.load_state_dict(plain.state_dict())
    x = images()
    with torch.no_grad():
        a, b = plain(x, LABELS), scaled(x, LABELS)
        assert torch.allclose(b["c2p_logits"], a["c2p_logits"] / 8.0, atol=1e-5)  # sqrt(64) = 8
        assert torch.allclose(scaled.classify(x), (b["t2p_logits"] + b["c2p_logits"]) / 2, atol=1e-6)
        assert torch.allclose(plain.classify(x), a["cls_logits"])
    assert "cls_token" not in scaled.loss(b, {"labels": LABELS})


def test_cls_token_weight_scales_only_the_class_token_term(clip_weights: str) -> None:
    full = mmcst(clip_weights, context="none").eval()
    light = mmcst(clip_weights, context="none", cls_token_weight=0.25).eval()
    light.load_state_dict(full.state_dict())
    with torch.no_grad():
        a = full.loss(full(images(), LABELS), {"labels": LABELS})
        b = light.loss(light(images(), LABELS), {"labels": LABELS})
    assert a["cls_token"] > 0
    assert torch.allclose(b["cls_token"], 0.25 * a["cls_token"], atol=1e-6)
    for name in ("t2p", "c2p"):
        assert torch.allclose(b[name], a[name], atol=1e-6)
