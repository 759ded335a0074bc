"""Offline weight files and frozen CLIP priors (tiny open_clip model, all three file formats)."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmcst.models import priors
from mmcst.models.priors import (
    ENSEMBLE_TEMPLATES, PROMPT_TEMPLATE, ClipImageEncoder, ClipTextEncoder, cache_image_embeddings,
    clip_text_embeddings, encode_texts, prompt_name, resolve_templates,
)
from mmcst.models.weights import WeightReport, load_clip, load_state_dict_file, sha256_file, summarize_reports

TINY_CLIP = "mmcst-test-tiny"  # plain GELU; "-quickgelu" is the same with QuickGELU


# --------------------------------------------------------------------------------------------------
# weight files

class _Opaque:
    """An arbitrary pickled object, refused by the weights-only reader."""


def test_load_state_dict_file_unwraps_and_strips(tmp_path: Path) -> None:
    weights = {"blocks.0.w": torch.randn(2, 2), "norm.bias": torch.randn(2)}
    dino_full = {"teacher": {f"module.backbone.{k}": v for k, v in weights.items()},
                 "student": {}, "epoch": 7, "args": argparse.Namespace(arch="vit_base")}
    torch.save(dino_full, tmp_path / "checkpoint.pth")
    torch.save({"model": {"state_dict": {f"encoder.{k}": v for k, v in weights.items()}}}, tmp_path / "nested.pt")
    save_file({f"model.{k}": v for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    for name in ("checkpoint.pth", "nested.pt", "w.safetensors"):
        state = load_state_dict_file(tmp_path / name)
        assert sorted(state) == sorted(weights), name
        for key, value in weights.items():
            assert torch.equal(state[key], value)


def test_load_state_dict_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="huggingface.co/timm/vit_base_patch16_224.dino"):
        load_state_dict_file(tmp_path / "missing.pth")

    torch.save({"w": torch.zeros(1), "obj": _Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth"):
        load_state_dict_file(tmp_path / "pickled.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no tensors"):
        load_state_dict_file(tmp_path / "empty.pth")


def test_sha256_file_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * (3 << 20) + b"tail")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == expected == sha256_file(str(path))
    path.write_bytes(b"changed")  # new size -> new cache key
    assert sha256_file(path) == hashlib.sha256(b"changed").hexdigest()
    report = WeightReport(str(path), expected, 10, ["a.weight"], ["head.b"], ["resized"])
    text = summarize_reports([report, None])
    assert "loaded 10" in text and "a.weight" in text and "head.b" in text and "resized" in text
    assert "random" in summarize_reports([None])
    assert report.as_dict()["missing"] == ["a.weight"]


def test_templates() -> None:
    assert PROMPT_TEMPLATE == "a photo of a {}."
    assert len(ENSEMBLE_TEMPLATES) == 80 == len(set(ENSEMBLE_TEMPLATES))
    # Cross-check against open_clip's copy of CLIP's ImageNet templates.
    reference = [t("{}") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert sorted(ENSEMBLE_TEMPLATES) == sorted(reference)
    assert resolve_templates("single") == [PROMPT_TEMPLATE]
    assert resolve_templates("ensemble") == ENSEMBLE_TEMPLATES
    with pytest.raises(ValueError):
        resolve_templates(["no placeholder"])


# --------------------------------------------------------------------------------------------------
# CLIP

@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    base = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    for name, changes in ((TINY_CLIP, {"quick_gelu": False}), (f"{TINY_CLIP}-quickgelu", {"quick_gelu": True}),
                          (f"{TINY_CLIP}-narrow", {"quick_gelu": True, "embed_dim": 16})):
        path = root / f"{name}.json"
        path.write_text(json.dumps(dict(base, **changes)))
        open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(f"{TINY_CLIP}-quickgelu").eval()
    files = {"bin": root / "open_clip_pytorch_model.bin", "safetensors": root / "open_clip_model.safetensors",
             "openai": root / "ViT-tiny.pt"}
    state = model.state_dict()
    torch.save(state, files["bin"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    torch.jit.script(_OpenAIArchive(model)).save(str(files["openai"]))
    return files


class _OpenAIArchive(torch.nn.Module):
    """OpenAI releases TorchScript archives: CLIP's module layout plus three int buffers."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(key, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, list[str]]:
    torch.manual_seed(3)
    return torch.randn(2, 3, 48, 40), ["a photo of a cat.", "a dog"]


def _embeddings(model: torch.nn.Module, inputs: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    return ClipImageEncoder(model)(inputs[0]), encode_texts(model, inputs[1])


def test_all_clip_formats_give_identical_embeddings(clip_files: dict[str, Path], inputs) -> None:
    results = {}
    for fmt, path in clip_files.items():
        model, report = load_clip(f"{TINY_CLIP}-quickgelu", path)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert report.sha256 == sha256_file(path) and report.loaded == len(model.state_dict())
        results[fmt] = _embeddings(model, inputs)
    for fmt in ("safetensors", "openai"):
        torch.testing.assert_close(results[fmt][0], results["bin"][0], rtol=0, atol=0)
        torch.testing.assert_close(results[fmt][1], results["bin"][1], rtol=0, atol=0)


def test_openai_archive_switches_to_quickgelu(clip_files: dict[str, Path], inputs) -> None:
    model, report = load_clip(TINY_CLIP, clip_files["openai"])
    assert model.model_name == f"{TINY_CLIP}-quickgelu"
    assert any("QuickGELU" in note for note in report.notes)
    activations = [m for m in model.modules() if isinstance(m, open_clip.transformer.QuickGELU)]
    assert len(activations) == 4  # one per residual block, 2 visual + 2 text
    correct = _embeddings(model, inputs)
    # The same weights with the wrong activation (allowed for open_clip state dicts) embed differently.
    wrong_model, wrong_report = load_clip(TINY_CLIP, clip_files["bin"])
    assert wrong_model.model_name == TINY_CLIP and wrong_report.notes == []
    wrong = _embeddings(wrong_model, inputs)
    assert (correct[0] - wrong[0]).abs().max() > 1e-4
    assert (correct[1] - wrong[1]).abs().max() > 1e-4


def test_load_clip_errors(tmp_path: Path, clip_files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="openaipublic"):
        load_clip("ViT-B-16", None)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_clip("ViT-B-16-quickgelu", tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="unknown open_clip"):
        load_clip("no-such-clip", clip_files["bin"])
    with pytest.raises(ValueError, match="does not fit"):
        load_clip(f"{TINY_CLIP}-narrow", clip_files["bin"])


def test_clip_text_embeddings_reference_and_cache(clip_files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_clip(f"{TINY_CLIP}-quickgelu", clip_files["safetensors"])
    names = ["diningtable", "cat"]
    templates = ["a photo of a {}.", "a drawing of the {}."]
    got = clip_text_embeddings(model, names, templates, cache_dir=tmp_path)
    # Brute force: natural names, per-template normalisation, mean, renormalisation.
    tokenizer = open_clip.get_tokenizer(f"{TINY_CLIP}-quickgelu")
    expected = []
    for name in ("dining table", "cat"):
        with torch.no_grad():
            per_template = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        expected.append(F.normalize(per_template.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert len(list(tmp_path.glob("clip_text_*.pt"))) == 1
    single = clip_text_embeddings(model, names, "single")
    torch.testing.assert_close(single[1], encode_texts(model, ["a photo of a cat."])[0])

    def no_encoding(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(priors, "encode_texts", no_encoding)
    assert torch.equal(clip_text_embeddings(model, names, templates, cache_dir=tmp_path), got)
    with pytest.raises(AssertionError, match="cache miss"):  # other templates: another cache entry
        clip_text_embeddings(model, names, [PROMPT_TEMPLATE], cache_dir=tmp_path)


def test_clip_image_encoder_is_frozen_and_matches_reference(clip_files: dict[str, Path]) -> None:
    model, _ = load_clip(f"{TINY_CLIP}-quickgelu", clip_files["bin"])
    encoder = ClipImageEncoder(model)
    assert encoder.embed_dim == 32 and encoder.input_size == (32, 32)
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    torch.manual_seed(4)
    pixels = torch.rand(2, 3, 64, 48)
    mean, std = torch.tensor(priors.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(priors.IMAGENET_STD).view(1, 3, 1, 1)
    crops = ((pixels - mean) / std).requires_grad_(True)
    out = encoder(crops)
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())
    resized = F.interpolate(pixels, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    clip_mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    clip_std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(model.encode_image((resized - clip_mean) / clip_std), dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    encoder.to(torch.float64)  # moving the wrapper moves the hidden CLIP model
    assert next(model.parameters()).dtype == torch.float64
    encoder.to(torch.float32)


def test_clip_text_encoder_for_captions(clip_files: dict[str, Path], inputs) -> None:
    model, _ = load_clip(f"{TINY_CLIP}-quickgelu", clip_files["bin"])
    encoder = ClipTextEncoder(model)
    out = encoder(inputs[1])
    assert out.shape == (2, 32) and encoder.embed_dim == 32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out, encode_texts(model, inputs[1]))


class _TinyDataset:
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(5)
        self.images = [torch.randint(0, 256, (3, 40 + 8 * i, 50), dtype=torch.uint8, generator=generator)
                       for i in range(3)]
        self.ids = [f"img{i}" for i in range(3)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"id": self.ids[index], "image": self.images[index], "labels": torch.zeros(2), "mask": None}


def test_cache_image_embeddings(clip_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_clip(f"{TINY_CLIP}-quickgelu", clip_files["bin"])
    encoder = ClipImageEncoder(model)
    dataset = _TinyDataset()
    path = tmp_path / "image_embeddings.pt"
    table = cache_image_embeddings(encoder, dataset, path, batch_size=2)
    assert sorted(table) == dataset.ids and path.is_file()
    pixels = F.interpolate(dataset.images[2].float()[None] / 255, size=(32, 32), mode="bicubic", antialias=True,
                           align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(priors.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(priors.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(table["img2"], encoder((pixels - mean) / std)[0], rtol=1e-4, atol=1e-5)

    def no_encoding(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(ClipImageEncoder, "forward", no_encoding)
    again = cache_image_embeddings(encoder, dataset, path)
    assert all(torch.equal(again[k], table[k]) for k in table)


def test_prompt_names_are_natural_spellings() -> None:
    assert prompt_name("pottedplant") == "potted plant"
    assert prompt_name("tvmonitor") == "tv monitor"
    assert prompt_name("red_striped_disc") == "red striped disc"
    assert PROMPT_TEMPLATE.format(prompt_name("diningtable")) == "a photo of a dining table."
