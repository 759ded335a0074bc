"""Method outputs by value against a brute-force reference built from the model's own weights.

``explicit_vit`` re-runs the encoder by hand in float64 (patch convolution, LayerNorms, explicit
``softmax(Q K^T / sqrt(d))`` per head, MLP), so the references below share no code with the fused training
path, the attention-capture hook or the pooling helpers. Each test names the wrong implementation it catches.
The models get sharpened attention (larger q/k weights) and distinct class tokens, so that wrong layers,
wrong rows or a wrong pooling give values far outside the tolerance (each test asserts that margin too).
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_models import CLASSES, LABELS, build, clip_weights, images, model_config  # noqa: F401 (fixture)
from torch import nn

import mmcst.models.vit as vit_module
from mmcst.models.vit import TokenViT

C = len(CLASSES)


# --------------------------------------------------------------------------------------------------
# the brute-force reference


def explicit_vit(vit: TokenViT, x: torch.Tensor,
                 prefix: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block (float64): the output tokens B x N x D and the head-averaged attention probabilities B x N x N.

    ``prefix`` holds the token groups in sequence order (C x D shared or B x C x D); position embeddings are
    the model's (``patch_pos_embed`` is checked against timm in test_vit.py).
    """
    def d(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double()

    p = vit.patch_size
    batch = x.shape[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    embedded = F.conv2d(d(x[..., :grid[0] * p, :grid[1] * p]), d(vit.patch_embed.proj.weight),
                        d(vit.patch_embed.proj.bias), stride=p)  # B x D x h x w
    dim = embedded.shape[1]
    patches = embedded.flatten(2).transpose(1, 2) + d(vit.patch_pos_embed(grid))
    groups = [d(tokens).expand(batch, -1, -1) + d(vit.prefix_pos[name])
              for tokens, (name, _) in zip(prefix, vit.groups)]
    h = torch.cat(groups + [patches], dim=1)
    n = h.shape[1]
    outputs, attentions = [], []
    for block in vit.blocks:
        # the tiny models use none of timm's optional parts (layer scale, q/k norm, ...)
        for part in (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm):
            assert isinstance(part, nn.Identity)
        heads = block.attn.num_heads
        head_dim = dim // heads
        y = F.layer_norm(h, (dim,), d(block.norm1.weight), d(block.norm1.bias), block.norm1.eps)
        qkv = y @ d(block.attn.qkv.weight).T + d(block.attn.qkv.bias)
        q, k, v = qkv.reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each B x heads x N x hd
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        mixed = (probs @ v).transpose(1, 2).reshape(batch, n, dim)
        h = h + mixed @ d(block.attn.proj.weight).T + d(block.attn.proj.bias)
        y = F.layer_norm(h, (dim,), d(block.norm2.weight), d(block.norm2.bias), block.norm2.eps)
        h = h + F.gelu(y @ d(block.mlp.fc1.weight).T + d(block.mlp.fc1.bias)) @ d(block.mlp.fc2.weight).T \
            + d(block.mlp.fc2.bias)
        outputs.append(h)
        attentions.append(probs.mean(dim=1))
    return outputs, attentions


def layer_norm(vit: TokenViT, t: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(t, t.shape[-1:], vit.norm.weight.detach().double(), vit.norm.bias.detach().double(),
                        vit.norm.eps)


def gwrp_by_hand(maps: torch.Tensor, decay: float) -> torch.Tensor:
    """B x C x N -> B x C: scores sorted high to low, weighted by d^j, divided by Z(d) = sum_j d^j."""
    ranked = maps.flatten(2).sort(dim=-1, descending=True).values
    weights = torch.tensor([decay ** j for j in range(ranked.shape[-1])], dtype=torch.float64)
    return (ranked * weights).sum(-1) / weights.sum()


def sharpen(model: nn.Module, seed: int = 5) -> nn.Module:
    """Re-draw every block's q/k/v weights larger, so attention is peaked and differs from layer to layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.vit.blocks:
            weight = block.attn.qkv.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.25)
    return model


def tiny(name: str, clip: str | None = None, depth: int = 2, patch: int = 16, **section: Any) -> Any:
    """A tiny model with distinct class tokens (a random-init [CLS] copied C times would hide class mix-ups)."""
    if name == "mmcst":
        section.setdefault("token_norm", "none")  # T = T_in + lambda LN(T_out), the form the references use
    cfg = model_config(name, clip, patch=patch, **{name: section})
    cfg.backbone.depth, cfg.backbone.token_init_std = depth, 0.5
    return sharpen(build(cfg)).eval()


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-4) -> None:
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def far(wrong: torch.Tensor, want: torch.Tensor, tol: float = 2e-4) -> None:
    """The wrong alternative differs from the reference by far more than the tolerance: the test can fail."""
    assert (wrong.double() - want).abs().max() > 50 * tol


# --------------------------------------------------------------------------------------------------
# 1. logits by value


def test_mmcst_logits_are_gwrp_with_the_configured_decay(clip_weights: str) -> None:  # noqa: F811
    """Catches: mean pooling (or max pooling) of the correlations, the default decay 0.996 instead of the configured
    one, an ascending sort, LayerNorm-ed tokens in the class-token head, lambda applied to the wrong token type."""
    decay = 0.8
    model = tiny("mmcst", clip_weights, patch=8, gwrp_decay=decay, lambda_cls=0.5, lambda_text=2.0)
    x = images()  # 64 x 64: an 8 x 8 grid, 64 positions to rank
    with torch.no_grad():
        outputs = model(x, LABELS)
        text_in = model.text_tokens_in()
        final = explicit_vit(model.vit, x, [model.class_tokens, text_in])[0][-1]
    cls_out, txt_out, patches = final[:, :C], final[:, C:2 * C], layer_norm(model.vit, final[:, 2 * C:])
    t_cls = model.class_tokens.double() + 0.5 * layer_norm(model.vit, cls_out)
    t_txt = text_in.double() + 2.0 * layer_norm(model.vit, txt_out)
    c2p = torch.einsum("bcd,bnd->bcn", t_cls, patches)
    t2p = torch.einsum("bcd,bnd->bcn", t_txt, patches)

    close(outputs["cls_logits"], cls_out.mean(-1))  # raw residual stream, channel mean
    close(outputs["c2p_logits"], gwrp_by_hand(c2p, decay))
    close(outputs["t2p_logits"], gwrp_by_hand(t2p, decay))
    for wrong in (c2p.mean(-1), gwrp_by_hand(c2p, 0.996), c2p.amax(-1)):
        far(wrong, gwrp_by_hand(c2p, decay))
    far(layer_norm(model.vit, cls_out).mean(-1), cls_out.mean(-1))

    # classify: the class-token logits, or (without the class-token loss) the mean of the two pooled logits
    with torch.no_grad():
        close(model.classify(x), cls_out.mean(-1))
        model.cfg.cls_token_loss = False
        maps = 0.5 * (gwrp_by_hand(t2p, decay) + gwrp_by_hand(c2p, decay))
        close(model.classify(x), maps)
        # model.mmcst.score overrides the automatic choice; "mean" averages the two heads (MCTformer+'s score)
        for score, want in (("cls_token", cls_out.mean(-1)), ("maps", maps), ("mean", 0.5 * (cls_out.mean(-1) + maps))):
            model.cfg.score = score
            close(model.classify(x), want)
        far(maps, cls_out.mean(-1))
        # score_decay pools the maps' classification score with its own decay; training keeps gwrp_decay
        model.cfg.score, model.cfg.score_decay = "maps", 0.3
        sharp = 0.5 * (gwrp_by_hand(t2p, 0.3) + gwrp_by_hand(c2p, 0.3))
        close(model.classify(x), sharp)
        far(sharp, maps)
        close(model(x, LABELS)["c2p_logits"], gwrp_by_hand(c2p, decay))


MCT_HEADS = {
    "v1": {"version": "v1", "layer_index": 1},
    "v2-gap": {"version": "v2", "layer_index": 1},
    "v2-gwrp": {"version": "v2", "layer_index": 1, "patch_pool": "gwrp", "gwrp_decay": 0.7},
    "v2-patch-only": {"version": "v2", "layer_index": 1, "cls_token_loss": False},
}


@pytest.mark.parametrize("case", list(MCT_HEADS))
def test_mctformer_logits_and_classify_by_hand(case: str) -> None:
    """Catches: class logits from LayerNorm-ed tokens or from the wrong token positions, PatchCAM on normalised
    patches, GAP where GWRP is configured (or the default decay), and a wrong V2 inference score (it is the mean
    of class-token and patch logits, or the patch logits alone without the class-token loss)."""
    section = MCT_HEADS[case]
    model = tiny("mctformer", patch=8, **section)
    x = images(64, 96)  # 8 x 12 grid: a transposed reshape would not match
    with torch.no_grad():
        outputs = model(x, LABELS)
        classified = model.classify(x)
        final = explicit_vit(model.vit, x, [model.class_tokens])[0][-1]
    cls_logits = final[:, :C].mean(-1)
    close(outputs["cls_logits"], cls_logits)
    far(layer_norm(model.vit, final[:, :C]).mean(-1), cls_logits)
    if section["version"] == "v1":
        assert "patch_logits" not in outputs
        close(classified, cls_logits)
        return
    head = model.patch_head
    feats = final[:, C:].transpose(1, 2).reshape(2, -1, 8, 12)
    cam = F.conv2d(feats, head.weight.detach().double(), head.bias.detach().double(), padding=1)
    patch_logits = gwrp_by_hand(cam, section["gwrp_decay"]) if section.get("patch_pool") == "gwrp" else cam.mean((2, 3))
    close(outputs["patch_cam"], cam)
    close(outputs["patch_logits"], patch_logits)
    if section.get("patch_pool") == "gwrp":
        far(cam.mean((2, 3)), patch_logits)
    expected = patch_logits if not section.get("cls_token_loss", True) else 0.5 * (cls_logits + patch_logits)
    close(classified, expected)
    far(cls_logits, expected)


# --------------------------------------------------------------------------------------------------
# 2. attention maps over several layers, MCTformer+ options


def class_attention(attentions: list[torch.Tensor], layers: list[int], start: int, reduce: str = "sum") -> torch.Tensor:
    """B x C x N_p: rows 0..C-1 (class-token queries), patch columns from ``start``, reduced over ``layers``."""
    stacked = torch.stack([attentions[layer][:, :C, start:] for layer in layers])
    return stacked.mean(0) if reduce == "mean" else stacked.sum(0)


def affinity(attentions: list[torch.Tensor], start: int) -> torch.Tensor:
    """B x N_p x N_p: patch rows and columns, summed over every layer (not renormalised)."""
    return torch.stack([a[:, start:, start:] for a in attentions]).sum(0)


MCT_MAPS = {
    "v1-K3": {"version": "v1", "layer_index": 3},
    "v2-K3": {"version": "v2", "layer_index": 3},
    "plus-K3": {"version": "v2", "layer_index": 3, "attention_reduce": "mean", "fusion": "sqrt",
                "patch_pool": "gwrp"},
}


@pytest.mark.parametrize("need_affinity", [False, True], ids=["class-rows", "all-rows"])
@pytest.mark.parametrize("case", list(MCT_MAPS))
def test_mctformer_maps_over_the_last_three_layers(case: str, need_affinity: bool) -> None:
    """Depth 4, K = 3: maps from layers 1-3. Catches: the first K layers, the last layer only, all layers, a mean
    where V1/V2 sum (or a sum where MCTformer+ averages), patch columns starting at the wrong index, a missing
    square root (MCTformer+) or ReLU on PatchCAM, and an affinity over other layers or rows."""
    section = MCT_MAPS[case]
    model = tiny("mctformer", depth=4, **section)
    x = images(64, 96)  # 4 x 6 grid
    with torch.no_grad():
        loc = model.localize(x, need_affinity=need_affinity)
        outputs, attentions = explicit_vit(model.vit, x, [model.class_tokens])
    reduce = section.get("attention_reduce", "sum")
    attn = class_attention(attentions, [1, 2, 3], C, reduce)
    for wrong_layers in ([0, 1, 2], [3], [0, 1, 2, 3]):
        far(class_attention(attentions, wrong_layers, C, reduce), attn, tol=1e-5)
    far(class_attention(attentions, [1, 2, 3], C, "sum" if reduce == "mean" else "mean"), attn, tol=1e-5)
    expected = attn.reshape(2, C, 4, 6)
    if section["version"] == "v2":
        head = model.patch_head
        feats = outputs[-1][:, C:].transpose(1, 2).reshape(2, -1, 4, 6)
        cam = F.relu(F.conv2d(feats, head.weight.detach().double(), head.bias.detach().double(), padding=1))
        expected = expected * cam
        if section.get("fusion") == "sqrt":
            far(expected, expected.sqrt())
            expected = expected.sqrt()
    close(loc.maps, expected, tol=1e-5)
    if need_affinity:
        close(loc.affinity, affinity(attentions, C), tol=1e-5)
        far(affinity(attentions[1:], C), affinity(attentions, C), tol=1e-5)
    else:
        assert loc.affinity is None


def test_mmcst_f3_class_attention_over_the_last_three_layers(clip_weights: str) -> None:  # noqa: F811
    """F3 = sqrt(ReLU(t2p) ReLU(c2p)) x class attention summed over the last K = 3 of 4 layers, patch columns from
    2C. Catches: columns from C (the text tokens counted as patches), other layers, the mean instead of the sum."""
    model = tiny("mmcst", clip_weights, depth=4, fusion="F3", attention_layers=3, lambda_cls=0.5)
    x = images(64, 96)
    with torch.no_grad():
        loc = model.localize(x, need_affinity=True)
        text_in = model.text_tokens_in()
        outputs, attentions = explicit_vit(model.vit, x, [model.class_tokens, text_in])
    final = outputs[-1]
    patches = layer_norm(model.vit, final[:, 2 * C:])
    t_cls = model.class_tokens.double() + 0.5 * layer_norm(model.vit, final[:, :C])
    t_txt = text_in.double() + layer_norm(model.vit, final[:, C:2 * C])
    c2p = F.relu(torch.einsum("bcd,bnd->bcn", t_cls, patches))
    t2p = F.relu(torch.einsum("bcd,bnd->bcn", t_txt, patches))
    attn = class_attention(attentions, [1, 2, 3], 2 * C)
    expected = ((t2p * c2p).sqrt() * attn).reshape(2, C, 4, 6)
    close(loc.maps, expected, tol=1e-4)
    for wrong in (class_attention(attentions, [1, 2, 3], C)[..., :24], class_attention(attentions, [3], 2 * C),
                  class_attention(attentions, [1, 2, 3], 2 * C, "mean")):
        far((t2p * c2p).sqrt() * wrong, (t2p * c2p).sqrt() * attn, tol=1e-4)
    close(loc.affinity, affinity(attentions, 2 * C), tol=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. MMCST's default refinement path captures only the patch rows


def test_mmcst_default_refinement_uses_patch_rows_and_matches_full_attention(clip_weights: str,  # noqa: F811
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Default F1 with refinement: only the N_p patch query rows are captured, at every layer, and the affinity and
    maps equal those from the full N x N attention. Catches: slicing the captured rows as if they started at row 0
    (the 2C token rows counted as patches), a request for the wrong rows or layers, maps that change with capture."""
    model = tiny("mmcst", clip_weights, depth=3)
    x = images(64, 96)
    num_prefix = 2 * C
    captured: list[tuple[int, slice]] = []
    capture = vit_module._run_block_capturing_attention

    def spy(block: nn.Module, h: torch.Tensor, rows: slice, store: dict[int, torch.Tensor], index: int) -> torch.Tensor:
        captured.append((index, rows))
        return capture(block, h, rows, store, index)

    monkeypatch.setattr(vit_module, "_run_block_capturing_attention", spy)
    with torch.no_grad():
        refined = model.localize(x, need_affinity=True)
        assert captured == [(layer, slice(num_prefix, None)) for layer in range(3)]  # patch rows only
        captured.clear()
        plain = model.localize(x, need_affinity=False)
        assert captured == []  # F1 needs no attention at all
        text_in = model.text_tokens_in()
        outputs, attentions = explicit_vit(model.vit, x, [model.class_tokens, text_in])
    final = outputs[-1]
    patches = layer_norm(model.vit, final[:, num_prefix:])
    t_cls = model.class_tokens.double() + layer_norm(model.vit, final[:, :C])
    t_txt = text_in.double() + layer_norm(model.vit, final[:, C:num_prefix])
    c2p = F.relu(torch.einsum("bcd,bnd->bcn", t_cls, patches))
    t2p = F.relu(torch.einsum("bcd,bnd->bcn", t_txt, patches))
    maps = (t2p * c2p).sqrt().reshape(2, C, 4, 6)
    close(refined.maps, maps, tol=1e-4)
    torch.testing.assert_close(refined.maps, plain.maps, rtol=0, atol=0)  # capture leaves the encoder untouched
    full_affinity = affinity(attentions, num_prefix)
    close(refined.affinity, full_affinity, tol=1e-5)
    # rows misread from the start of the captured block would take token rows 0..N_p-1
    far(torch.stack([a[:, :24, num_prefix:] for a in attentions]).sum(0), full_affinity, tol=1e-5)
