"""The paper's MMCST end to end at tiny scale, and the cached whole-image CLIP context (``image_embed=cache``).

The model is the poster's: a CLIP prior (random weights in the real open_clip layout) for the text tokens and the
image-language context loss, the class-token loss, global-local tokens, F1 fusion and affinity refinement, trained
with the real VOC dataset code and augmentation on a VOC-layout fixture, killed, resumed, then mapped and evaluated.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import VOC_IDS, make_voc, write_jpeg, write_voc_xml
from test_models import TINY_CLIP, clip_weights  # noqa: F401 (fixture: registers the tiny CLIP architecture)

from mmcst.config import Config, from_dict
from mmcst.data.base import VOC_CLASSES
from mmcst.data.voc import VOCDataset
from mmcst.engine.builders import Builders
from mmcst.engine.infer import infer
from mmcst.engine.train import train
from mmcst.io import load_label_png, load_map
from mmcst.models.mmcst import MMCST
from mmcst.models.priors import ClipImageEncoder
from mmcst.models.registry import build_model

TERMS = {"cls_token", "t2p", "c2p", "contrast"}  # the poster's L_total


def voc_fixture(root: Path) -> Path:
    """``make_voc`` plus labels for its third image and a fourth image: train_aug = 4 labelled images."""
    voc = make_voc(root)
    write_voc_xml(voc / "Annotations" / "2008_000002.xml", ["dog"])
    write_jpeg(voc / "JPEGImages" / "2008_000003.jpg", seed=3)
    write_voc_xml(voc / "Annotations" / "2008_000003.xml", ["car", "person"])
    (voc / "train_aug.txt").write_text("".join(f"{i}\n" for i in [*VOC_IDS, "2008_000003"]))
    return voc


def paper_config(tmp_path: Path, clip: str, name: str, **overrides: Any) -> Config:
    """MMCST with every paper component at tiny size (ViT depth 2, width 64, patch 8 on 32 px crops)."""
    data = {"dataset": "voc", "root": str(tmp_path / "VOC2012"), "train_split": "train_aug", "val_split": "val",
            "image_size": 32, "num_workers": 0}
    model = {"name": "mmcst",
             "backbone": {"name": "vit_base_patch16_224", "patch_size": 8, "embed_dim": 64, "depth": 2,
                          "num_heads": 2, "img_size": 32},
             "prior": {"kind": "clip", "clip_model": TINY_CLIP, "clip_weights": clip,
                       "cache_dir": str(tmp_path / "cache")},  # the class-prompt embeddings: computed once
             "mmcst": {"tokens": "global_local", "context": "image", "cls_token_loss": True, "fusion": "F1"}}
    train_cfg = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "scale_lr": False, "warmup_epochs": 0.5,
                 "log_every": 1, "checkpoint_every": 0, "amp": False}  # checkpoints at epoch ends
    cfg: dict[str, Any] = {"name": name, "out_dir": str(tmp_path / "runs"), "seed": 3, "device": "cpu",
                           "data": data, "model": model, "train": train_cfg,
                           "infer": {"scales": [1.0, 0.75], "flip": True, "refine": True}}
    for key, value in overrides.items():  # "section.field" = value
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(cfg)


class Killed(Exception):
    """Stands for a killed process."""


def builders_killed_at(call: int) -> Builders:
    """The registry's model, whose ``call``-th training forward dies (the run is killed mid-training)."""
    def build(model_cfg: Any, class_names: Any) -> Any:
        model = build_model(model_cfg, class_names)
        forward, calls = model.forward, [0]

        def dying(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == call:
                raise Killed(f"killed at forward call {call}")
            return forward(*args, **kwargs)

        model.forward = dying
        return model
    return Builders(model=build)


def losses(run: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]


def miou_by_hand(run: Path, voc: Path, ids: list[str], threshold: float) -> float:
    """mIoU (%) at ``threshold`` from the stored maps: argmax over [t, maps], ties to background, 255 ignored,
    IoU averaged over the classes present in the ground truth or the prediction."""
    inter, union = np.zeros(21), np.zeros(21)
    for image_id in ids:
        keys, cam = load_map(run / "maps" / "train" / f"{image_id}.npy")
        gt = load_label_png(voc / "SegmentationClass" / f"{image_id}.png")
        planes = np.concatenate([np.full((1, *gt.shape), threshold, np.float32), cam.astype(np.float32)])
        pred = np.concatenate([[0], keys + 1])[planes.argmax(0)]
        valid = gt != 255
        for k in range(21):
            p, g = (pred == k) & valid, (gt == k) & valid
            inter[k] += (p & g).sum()
            union[k] += (p | g).sum()
    present = union > 0
    return float(100 * (inter[present] / union[present]).mean())


def test_paper_mmcst_trains_resumes_exactly_and_maps_evaluate(tmp_path: Path, clip_weights: str) -> None:  # noqa: F811
    """4 steps (2 epochs of 2): a run killed at step 3 and resumed from its step-2 checkpoint ends bitwise equal to
    an uninterrupted one (drop-path, RandAugment, random erasing, the CLIP crop targets and the first-batch token
    balance included); its maps of VOC train are written for the labelled classes and evaluated."""
    voc = voc_fixture(tmp_path)
    reference = train(paper_config(tmp_path, clip_weights, "whole"), progress=False)

    cfg = paper_config(tmp_path, clip_weights, "killed")
    with pytest.raises(Killed):
        train(cfg, progress=False, builders=builders_killed_at(3))
    assert torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pth", weights_only=True)["step"] == 2
    resumed = train(cfg, resume=True, progress=False)

    expected, got = state(reference), state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    records = losses(resumed)
    assert [(r["step"], r["loss"]) for r in records] == [(r["step"], r["loss"]) for r in losses(reference)]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(TERMS <= set(r) and all(np.isfinite(r[t]) for t in TERMS) for r in records)
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4

    result = infer(resumed, "train", progress=False)
    assert result["infer"]["written"] == 2 and result["infer"]["refine"] is True
    for k, image_id in enumerate(VOC_IDS[:2]):
        keys, cam = load_map(resumed / "maps" / "train" / f"{image_id}.npy")
        # XML labels: person (14); person, car (6), and the difficult dog (11)
        assert keys.tolist() == ([14] if k == 0 else [6, 11, 14])
        assert cam.shape == (len(keys), 24, 32) and cam.min() >= 0 and cam.max() <= 1
        assert np.allclose(cam.reshape(len(keys), -1).max(1), 1.0, atol=1e-3)  # min-max normalised per class
    assert (resumed / "eval" / "train.json").is_file()
    best = result["best"]
    assert result["protocol"]["num_images"] == 2
    assert best["miou"] == pytest.approx(miou_by_hand(resumed, voc, VOC_IDS[:2], best["threshold"]), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# model.prior.image_embed=cache


class Spy:
    """Counts images through the CLIP image encoder and records what each training forward receives."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.encoded = 0
        self.forwards: list[tuple[list[str], torch.Tensor]] = []
        encode, forward = ClipImageEncoder.forward, MMCST.forward

        def counting(encoder: ClipImageEncoder, images: torch.Tensor) -> torch.Tensor:
            self.encoded += images.shape[0]
            return encode(encoder, images)

        def recording(model: MMCST, images: torch.Tensor, labels: Any = None, extras: Any = None) -> Any:
            if extras is not None and "clip_embedding" in extras:
                self.forwards.append((list(extras["id"]), extras["clip_embedding"].clone()))
            return forward(model, images, labels, extras)

        monkeypatch.setattr(ClipImageEncoder, "forward", counting)
        monkeypatch.setattr(MMCST, "forward", recording)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("clip_image_*.pt"))


def test_cached_image_context_is_computed_once_and_fed_to_the_model(tmp_path: Path, clip_weights: str,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an engine that ignores ``image_embed=cache`` (the encoder would run on every step's crops), a cache
    recomputed on resume or by the next run, and embeddings fed in another order than the sampler's."""
    voc_fixture(tmp_path)
    spy = Spy(monkeypatch)
    cache_dir = tmp_path / "cache"  # model.prior.cache_dir, shared by the runs
    run = train(paper_config(tmp_path, clip_weights, "a", **{"model.prior.image_embed": "cache", "train.max_steps": 2}),
                progress=False)
    [cache] = cache_files(cache_dir)
    assert spy.encoded == 4  # the 4 training images once, no crop of any step
    stored = torch.load(cache, weights_only=True)
    table = dict(zip(stored["ids"], stored["embeddings"]))
    assert sorted(table) == sorted([*VOC_IDS, "2008_000003"])
    assert len(spy.forwards) == 2
    for ids, embeddings in spy.forwards:  # each row is its own image's cached embedding
        assert torch.equal(embeddings, torch.stack([table[i] for i in ids]))
    first_a = losses(run)[0]
    assert TERMS <= set(first_a)

    modified = cache.stat().st_mtime_ns
    train(paper_config(tmp_path, clip_weights, "a", **{"model.prior.image_embed": "cache", "train.max_steps": 3}),
          resume=True, progress=False)
    assert spy.encoded == 4 and cache.stat().st_mtime_ns == modified  # the resumed run reads it back

    # Another run reuses the file; with its content perturbed, only the contrast term of step 1 changes.
    stored["embeddings"] = F.normalize(torch.randn(stored["embeddings"].shape,
                                                   generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.save(stored, cache)
    spy.forwards.clear()
    run_b = train(paper_config(tmp_path, clip_weights, "b", **{"model.prior.image_embed": "cache",
                                                               "train.max_steps": 1}), progress=False)
    assert spy.encoded == 4 and cache_files(cache_dir) == [cache]  # reused, not recomputed
    perturbed = dict(zip(stored["ids"], stored["embeddings"]))
    [(ids, embeddings)] = spy.forwards
    assert torch.equal(embeddings, torch.stack([perturbed[i] for i in ids]))
    first_b = losses(run_b)[0]
    assert first_b["contrast"] != pytest.approx(first_a["contrast"], abs=1e-4)
    for term in ("cls_token", "t2p", "c2p"):
        assert first_b[term] == first_a[term], term


def test_image_cache_location_and_key(tmp_path: Path, clip_weights: str) -> None:  # noqa: F811
    """Without ``cache_dir`` the cache goes to the directory the engine gives (the run's); another image list gets
    another file. Without embeddings in the batch, cache mode is an error, not a silent fall back to crops."""
    voc_fixture(tmp_path)
    cfg = paper_config(tmp_path, clip_weights, "x",
                       **{"model.prior.image_embed": "cache", "model.prior.cache_dir": None})
    model = build_model(cfg.model, VOC_CLASSES)
    work = tmp_path / "run" / "cache"
    extras = model.training_extras(VOCDataset(tmp_path / "VOC2012", "train"), work)
    assert sorted(extras["clip_embedding"]) == VOC_IDS[:2] and len(cache_files(work)) == 1
    model.training_extras(VOCDataset(tmp_path / "VOC2012", "train_aug"), work)
    assert len(cache_files(work)) == 2

    images, labels = torch.randn(2, 3, 32, 32), torch.eye(20)[:2]
    with pytest.raises(ValueError, match="image_embed=cache.*clip_embedding"):
        model(images, labels)
    cached = F.normalize(torch.randn(2, 32), dim=-1)
    assert torch.allclose(model(images, labels, extras={"clip_embedding": cached})["context_target"], cached)
    crop = build_model(paper_config(tmp_path, clip_weights, "y").model, VOC_CLASSES)
    assert crop.training_extras(VOCDataset(tmp_path / "VOC2012", "train"), work) == {}  # crop: nothing precomputed
