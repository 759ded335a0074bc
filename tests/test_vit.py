"""TokenViT: weight loading, reproduction of timm, attention capture, position embeddings."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmcst.models.weights import load_state_dict_file
from mmcst.models.vit import TokenViT, resize_patch_pos_embed

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2)  # 8 x 8 grid


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0, dynamic_img_size=True, **TINY).eval()
    with torch.no_grad():  # timm initialises the class token near zero; make it visible in the tests
        model.cls_token.normal_()
    return model


@pytest.fixture(scope="module")
def checkpoints(reference: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vit_ckpt")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    assert state["cls_token"].shape == (1, 1, 64) and state["pos_embed"].shape == (1, 65, 64)
    paths = {"dino": root / "dino.pth", "timm": root / "model.safetensors", "teacher": root / "checkpoint.pth"}
    torch.save(state, paths["dino"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["timm"]))
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, 64)  # DINO's projection head: must be dropped
    torch.save({"teacher": teacher, "student": {k: torch.zeros_like(v) for k, v in teacher.items()}, "epoch": 3},
               paths["teacher"])
    return paths


def _cls_prefix(vit: TokenViT) -> dict[str, torch.Tensor]:
    return {"cls": vit.pretrained_cls[None]}


@pytest.mark.parametrize("fmt", ["dino", "timm", "teacher"])
def test_checkpoint_formats_load_identical_weights(fmt: str, reference: torch.nn.Module,
                                                   checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, prefix_groups=(("cls", 3), ("txt", 2)), weights=str(checkpoints[fmt]), **TINY)
    ref = reference.state_dict()
    own = vit.state_dict()
    for key, value in ref.items():
        if key not in ("cls_token", "pos_embed"):
            assert torch.equal(own[key], value), key
    assert torch.equal(vit.pretrained_cls, ref["cls_token"].reshape(-1))
    assert torch.equal(vit.pos_embed, ref["pos_embed"][:, 1:])
    for group, count in (("cls", 3), ("txt", 2)):
        assert torch.equal(vit.prefix_pos[group], ref["pos_embed"][0, :1].expand(count, -1))
    report = vit.weight_report
    assert report is not None and report.missing == [] and report.unexpected == []
    assert report.loaded == len(own)
    assert len(report.sha256) == 64
    assert any("head" in note for note in report.notes) == (fmt == "teacher")


def test_report_lists_missing_and_unexpected(reference: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(reference.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["dist_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    vit = TokenViT(NAME, weights=str(path), **TINY)
    assert vit.weight_report.missing == ["blocks.1.mlp.fc2.bias"]
    assert vit.weight_report.unexpected == ["dist_token"]
    assert "blocks.1.mlp.fc2.bias" in vit.weight_report.summary()


def test_shape_mismatch_names_the_tensor(reference: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    state = dict(reference.state_dict())
    state["norm.weight"] = torch.ones(96)
    torch.save(state, path)
    with pytest.raises(ValueError, match="norm.weight"):
        TokenViT(NAME, weights=str(path), **TINY)


def test_missing_weight_file_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dino_vitbase16_pretrain.pth"):
        TokenViT(NAME, weights=str(tmp_path / "absent.pth"), **TINY)


@pytest.mark.parametrize("size", [(64, 64), (48, 88), (50, 91)])
def test_reproduces_timm_forward_features(size: tuple[int, int], reference: torch.nn.Module,
                                          checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, weights=str(checkpoints["dino"]), **TINY).eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = vit(images, _cls_prefix(vit))
        ours = vit.norm(torch.cat([out.prefix["cls"], out.patches], dim=1))
        h, w = size[0] // 8, size[1] // 8
        expected = reference.forward_features(images[..., : h * 8, : w * 8])  # timm needs whole patches
    assert out.grid == (h, w) and out.patches.shape == (2, h * w, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_attention_capture_is_exact_and_matches_reference(checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, prefix_groups=(("cls", 3), ("txt", 2)), weights=str(checkpoints["dino"]), **TINY).eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 40, 56)
    prefix = {"cls": torch.randn(3, 64), "txt": torch.randn(2, 2, 64)}  # shared / per-image tokens
    with torch.no_grad():
        plain = vit(images, prefix, return_all_layers=True)
        rows = slice(0, 3)
        captured = vit(images, prefix, attn_layers=[0, -1], attn_rows=rows)
        everything = vit(images, prefix, attn_layers=[1])
    assert plain.attentions == {}
    assert torch.equal(plain.patches, captured.patches)
    for group in ("cls", "txt"):
        assert torch.equal(plain.prefix[group], captured.prefix[group])
    assert sorted(captured.attentions) == [0, 1]
    n_tokens = 5 + 5 * 7
    assert captured.attentions[1].shape == (2, 3, n_tokens)
    assert everything.attentions[1].shape == (2, n_tokens, n_tokens)
    torch.testing.assert_close(captured.attentions[0].sum(-1), torch.ones(2, 3))

    # Brute force: the attention of block 1 from its input (the output of block 0).
    block = vit.blocks[1]
    with torch.no_grad():
        hidden = block.norm1(plain.layers[0])
        qkv = block.attn.qkv(hidden).reshape(2, n_tokens, 3, 2, 32)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # B x heads x N x 32
        probs = torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, dim=-1).mean(dim=1)
    torch.testing.assert_close(everything.attentions[1], probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured.attentions[1], probs[:, rows], rtol=1e-5, atol=1e-6)


def test_prefix_broadcast_and_validation(checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, prefix_groups=(("cls", 2),), weights=str(checkpoints["dino"]), **TINY).eval()
    tokens = torch.randn(2, 64)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        shared = vit(images, {"cls": tokens})
        per_image = vit(images, {"cls": tokens.expand(3, -1, -1)})
    assert torch.equal(shared.prefix["cls"], per_image.prefix["cls"])
    assert shared.prefix["cls"].shape == (3, 2, 64)
    with pytest.raises(ValueError, match="expected groups"):
        vit(images, {"txt": tokens})
    with pytest.raises(ValueError, match="'cls'"):
        vit(images, {"cls": torch.randn(3, 64)})
    with pytest.raises(ValueError, match="out of range"):
        vit(images, {"cls": tokens}, attn_layers=[5])
    with pytest.raises(ValueError, match="duplicate"):
        TokenViT(NAME, prefix_groups=(("a", 1), ("a", 2)), **TINY)


def test_training_path_gradients(checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, prefix_groups=(("cls", 2), ("txt", 2)), weights=str(checkpoints["dino"]),
                   drop_path_rate=0.1, **TINY).train()
    tokens = torch.nn.Parameter(torch.randn(2, 64))
    out = vit(torch.randn(2, 3, 72, 64), {"cls": tokens, "txt": torch.zeros(2, 64)})  # 9 x 8: pos-embeds resized
    (out.prefix["cls"].mean() + out.patches.mean()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert vit.prefix_pos["cls"].grad is not None and vit.pos_embed.grad is not None
    assert vit.pos_embed.grad.abs().sum() > 0
    assert out.attentions == {}
    assert vit.no_weight_decay() == {"pos_embed", "prefix_pos.cls", "prefix_pos.txt"}


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints: dict[str, Path]) -> None:
    grads = []
    for enable in (False, True):
        vit = TokenViT(NAME, weights=str(checkpoints["dino"]), **TINY).train()
        vit.set_grad_checkpointing(enable)
        torch.manual_seed(6)
        out = vit(torch.randn(2, 3, 64, 64), _cls_prefix(vit))
        out.patches.square().mean().backward()
        grads.append(vit.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_interpolated_pos_embed_cache_follows_parameter(checkpoints: dict[str, Path]) -> None:
    vit = TokenViT(NAME, weights=str(checkpoints["dino"]), **TINY).eval()
    with torch.no_grad():
        first = vit.patch_pos_embed((5, 11)).clone()
        assert vit.patch_pos_embed((5, 11)) is vit.patch_pos_embed((5, 11))  # cached
        expected = F.interpolate(vit.pos_embed.reshape(1, 8, 8, 64).permute(0, 3, 1, 2), size=(5, 11),
                                 mode="bicubic", antialias=True, align_corners=False)
        torch.testing.assert_close(first, expected.permute(0, 2, 3, 1).reshape(1, 55, 64))
        vit.pos_embed.add_(1.0)
        torch.testing.assert_close(vit.patch_pos_embed((5, 11)), first + 1.0, rtol=1e-5, atol=1e-5)


def test_checkpoint_grid_resized_to_training_grid(reference: torch.nn.Module, checkpoints: dict[str, Path]) -> None:
    pos = reference.pos_embed.detach()[:, 1:]  # 8 x 8
    big = dict(TINY, img_size=128)  # 16 x 16: exactly twice
    replicated = TokenViT(NAME, weights=str(checkpoints["dino"]), pos_embed_init="replicate", **big)
    grid = pos.reshape(8, 8, 64)
    for i, j in [(0, 0), (3, 5), (15, 15), (6, 9)]:
        assert torch.equal(replicated.pos_embed[0, i * 16 + j], grid[i // 2, j // 2])
    assert any("nearest x2" in note for note in replicated.weight_report.notes)
    bicubic = TokenViT(NAME, weights=str(checkpoints["dino"]), **big)
    expected = F.interpolate(grid.permute(2, 0, 1)[None], size=(16, 16), mode="bicubic", antialias=True,
                             align_corners=False)
    torch.testing.assert_close(bicubic.pos_embed.detach(), expected[0].permute(1, 2, 0).reshape(1, 256, 64))
    # Not exactly twice: replicate falls back to bicubic.
    odd = TokenViT(NAME, weights=str(checkpoints["dino"]), pos_embed_init="replicate", **dict(TINY, img_size=96))
    torch.testing.assert_close(odd.pos_embed.detach(), resize_patch_pos_embed(pos, (8, 8), (12, 12)))


def test_dino_tag_name_builds_the_architecture() -> None:
    vit = TokenViT("vit_base_patch16_224.dino", img_size=32, embed_dim=64, depth=1, num_heads=2)
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size, vit.grid_size) == (64, 1, 2, 16, (2, 2))
    assert isinstance(vit.norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="backbone.name"):
        TokenViT("resnet18")


def test_teacher_checkpoint_prefers_teacher(checkpoints: dict[str, Path]) -> None:
    state = load_state_dict_file(checkpoints["teacher"])
    assert "head.mlp.0.weight" in state and "cls_token" in state
    assert state["cls_token"].abs().sum() > 0  # the student copy is all zeros
