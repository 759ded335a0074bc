"""WSSS stage engines: confident labels, AffinityNet training and the random walk, the segmenter (train, infer, eval).

Everything runs on a tiny dataset in the PASCAL VOC layout (3 classes named in ``class_names.txt``, 64 x 48 px)
with hand-written seed maps, ResNet-38 at width 1/16, a few steps per stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmcst.cli import main
from mmcst.config import ConfigError, from_dict
from mmcst.data.base import build_dataset
from mmcst.data.transforms import normalize
from mmcst.data.wsss import LabelFolderDataset, SegTrainTransform
from mmcst.engine import affinity as affinity_engine
from mmcst.engine import seg as seg_engine
from mmcst.engine.affinity import (
    load_affinity_net,
    make_affinity_labels,
    refine_masks,
    train_affinity,
    walk_background,
)
from mmcst.engine.rundir import write_config
from mmcst.engine.seg import (
    evaluate_segmenter,
    infer_segmenter,
    load_segmenter,
    segment_probabilities,
    segmentation_loss,
    train_segmenter,
)
from mmcst.engine.train import RunExistsError
from mmcst.io import load_label_png, save_label_png, save_map, voc_palette
from mmcst.models.resnet38 import ResNet38
from mmcst.refine import confident_labels, random_walk_labels

CLASSES = ["disc", "square", "bar"]
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], np.uint8)
HEIGHT, WIDTH = 48, 64
SPLITS = {"train": 8, "val": 3, "test": 2}
TINY_WSSS = [
    "wsss.affinity.width=0.0625", "wsss.affinity.radius=3", "wsss.affinity.crop=48", "wsss.affinity.batch_size=2",
    "wsss.affinity.epochs=1", "wsss.affinity.log_every=1", "wsss.affinity.label_method=par",
    "wsss.seg.width=0.0625", "wsss.seg.crop=40", "wsss.seg.batch_size=2", "wsss.seg.epochs=1", "wsss.seg.log_every=1",
    "wsss.seg.scales=[1.0,0.5]", "wsss.seg.crf=false",
]


# --------------------------------------------------------------------------------------------------
# fixtures


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 70, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for c in rng.choice(len(CLASSES), size=int(rng.integers(1, 3)), replace=False):
        h, w = int(rng.integers(12, 24)), int(rng.integers(12, 28))
        y, x = int(rng.integers(0, HEIGHT - h)), int(rng.integers(0, WIDTH - w))
        image[y:y + h, x:x + w] = COLOURS[c]
        mask[y:y + h, x:x + w] = c + 1
    return image, mask


def make_voc(root: Path) -> Path:
    """VOC2012 layout: JPEGImages, SegmentationClass (train and val only), ImageSets/Segmentation, class_names.txt."""
    voc = root / "VOC2012"
    rng = np.random.default_rng(0)
    sets = voc / "ImageSets" / "Segmentation"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", sets):
        folder.mkdir(parents=True, exist_ok=True)
    (voc / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in SPLITS.items():
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for image_id in ids:
            image, mask = _scene(rng)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            if split != "test":
                save_label_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def write_seed_maps(run_dir: Path, voc: Path, split: str) -> None:
    """Seeds from the ground truth: each present class's region blurred, plus noise, min-max normalised."""
    dataset = build_dataset("voc", voc, split)
    rng = np.random.default_rng(1)
    out = run_dir / "maps" / split
    out.mkdir(parents=True, exist_ok=True)
    for index, image_id in enumerate(dataset.ids):
        mask = dataset.get_mask(index)
        keys = np.flatnonzero(dataset.get_labels(index))
        cams = []
        for key in keys:
            region = torch.from_numpy((mask == key + 1).astype(np.float32))[None, None]
            blurred = F.avg_pool2d(region, 9, stride=1, padding=4)[0, 0].numpy()
            cam = np.clip(blurred + 0.1 * rng.random(blurred.shape), 0, None)
            cams.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-8))
        save_map(out / f"{image_id}.npy", keys, np.stack(cams) if cams else np.zeros((0, HEIGHT, WIDTH)))


def make_run(root: Path, name: str = "run", **data: object) -> Path:
    voc = root / "VOC2012" if (root / "VOC2012").is_dir() else make_voc(root)
    cfg = from_dict({"name": name, "out_dir": str(root / "runs"), "seed": 3, "device": "cpu",
                     "data": {"dataset": "voc", "root": str(voc), "train_split": "train", "val_split": "val",
                              "eval_split": "train", "num_workers": 0, **data}})
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    write_config(run_dir, cfg)
    for split in ("train", "val"):
        write_seed_maps(run_dir, voc, split)
    return run_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny convolutions run fastest single-threaded, and far faster than two threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def psa_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-38 state dict in PSA's layout (width 1/16), as ``res38_cls.pth`` holds at full width."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "res38_tiny.pth"
    torch.save(ResNet38(width=0.0625).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, psa_weights: Path) -> Path:
    """A run taken through every stage with the Python API (``mmcst.*``)."""
    import mmcst

    run_dir = make_run(tmp_path_factory.mktemp("wsss"))
    overrides = [*TINY_WSSS, f"wsss.affinity.weights={psa_weights}", f"wsss.seg.weights={psa_weights}"]
    assert mmcst.make_affinity_labels(run_dir, "train", overrides=overrides, progress=False) == \
        run_dir / "affinity" / "labels" / "train"
    assert mmcst.train_affinity(run_dir, overrides, progress=False) == run_dir / "affinity"
    for split in ("train", "val"):
        assert mmcst.refine_masks(run_dir, split, progress=False)["refine"]["written"] == SPLITS[split]
    assert mmcst.train_segmenter(run_dir, "refined", overrides, progress=False) == run_dir / "seg"
    assert mmcst.infer_segmenter(run_dir, "val", progress=False) == run_dir / "seg" / "predictions" / "val"
    mmcst.infer_segmenter(run_dir, "test", progress=False)
    assert mmcst.evaluate_segmenter(run_dir, "val", progress=False)["best"]["miou"] is not None
    return run_dir


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------------------------------
# confident labels


def test_confident_labels_follow_the_la_ha_rule_and_resume(pipeline: Path) -> None:
    labels_dir = pipeline / "affinity" / "labels" / "train"
    settings = json.loads((labels_dir / "settings.json").read_text())
    assert settings["method"] == "par" and settings["alpha_fg"] == 1.0 and settings["alpha_bg"] == 12.0
    dataset = build_dataset("voc", pipeline.parent.parent / "VOC2012", "train")
    from mmcst.io import load_map

    saw = set()
    for index, image_id in enumerate(dataset.ids):
        keys, cam = load_map(pipeline / "maps" / "train" / f"{image_id}.npy")
        image = dataset[index]["image"].permute(1, 2, 0).numpy()
        expected = confident_labels(image, keys, cam, 1.0, 12.0, "par")
        written = load_label_png(labels_dir / f"{image_id}.png")
        np.testing.assert_array_equal(written, expected)
        saw |= set(np.unique(written).tolist())
    assert {0, 255} <= saw and saw - {0, 255}, "confident background, unsure pixels and classes all occur"

    # A rerun keeps valid files; other settings regenerate them.
    first = labels_dir / f"{dataset.ids[0]}.png"
    stamp = first.stat().st_mtime_ns
    make_affinity_labels(pipeline, "train", overrides=[*TINY_WSSS], progress=False)
    assert first.stat().st_mtime_ns == stamp
    make_affinity_labels(pipeline, "train", overrides=[*TINY_WSSS, "wsss.affinity.alpha_bg=32"], progress=False)
    assert json.loads((labels_dir / "settings.json").read_text())["alpha_bg"] == 32
    keys, cam = load_map(pipeline / "maps" / "train" / f"{dataset.ids[0]}.npy")
    expected = confident_labels(dataset[0]["image"].permute(1, 2, 0).numpy(), keys, cam, 1.0, 32.0, "par")
    np.testing.assert_array_equal(load_label_png(first), expected)
    make_affinity_labels(pipeline, "train", overrides=[*TINY_WSSS], progress=False)  # back, for the other tests


# --------------------------------------------------------------------------------------------------
# AffinityNet and the random walk


def test_affinity_training_record_and_psa_initialisation(pipeline: Path, psa_weights: Path) -> None:
    stage = pipeline / "affinity"
    for name in ("config.yaml", "env.json", "log.txt", "metrics.jsonl", "summary.json", "checkpoints/last.pth"):
        assert (stage / name).is_file(), name
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped_by"] == "epochs"  # 8 images, batch 2, 1 epoch
    assert set(summary["final_losses"]) == {"loss", "bg_pos", "fg_pos", "neg"}
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # poly schedule: lr = 0.01 * (1 - step / 4)^0.9, the record of step s shows the lr of step s (0-based s - 1)
    np.testing.assert_allclose([r["lr"] for r in records], [0.01 * (1 - s / 4) ** 0.9 for s in range(4)], rtol=1e-6)
    groups = torch.load(stage / "checkpoints" / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    # PSA's groups (ResNet-38's convolutions and AffinityNet's heads have no biases): backbone x1, heads x10,
    # weight decay on both; SGD momentum 0.9 without the optimiser quirk.
    assert [(g["name"], g["lr_mult"], g["weight_decay"], g["momentum"]) for g in groups] == \
        [("pretrained_weight", 1.0, 5e-4, 0.9), ("new_weight", 10.0, 5e-4, 0.9)]
    file_state = torch.load(psa_weights, weights_only=True)
    trained = _state(stage / "checkpoints" / "last.pth")
    # PSA leaves conv1a and b2* untrained: they still hold the file's tensors; a trained layer moved away.
    torch.testing.assert_close(trained["backbone.conv1a.weight"], file_state["conv1a.weight"])
    torch.testing.assert_close(trained["backbone.b2_1.conv_branch2a.weight"], file_state["b2_1.conv_branch2a.weight"])
    assert not torch.equal(trained["backbone.b4.conv_branch2a.weight"], file_state["b4.conv_branch2a.weight"])


def test_refined_masks_are_the_random_walk_of_the_seeds_and_evaluated(pipeline: Path) -> None:
    from mmcst.io import load_map

    model, cfg, _ = load_affinity_net(pipeline)
    background = walk_background(pipeline, "val", cfg)
    assert background == {"rule": "constant", "threshold": 0.39,
                          "source": "MCTformer's default (no seed evaluation in the run)"}
    dataset = build_dataset("voc", pipeline.parent.parent / "VOC2012", "val")
    for index, image_id in enumerate(dataset.ids):
        image = normalize(dataset[index]["image"])
        padded = F.pad(image[None], (0, -WIDTH % 8, 0, -HEIGHT % 8))
        with torch.no_grad():
            affinity = model.dense_affinity(padded)[0]
        keys, cam = load_map(pipeline / "maps" / "val" / f"{image_id}.npy")
        expected = random_walk_labels(affinity, keys, cam, bg_threshold=0.39, beta=8.0, logt=6)
        np.testing.assert_array_equal(load_label_png(pipeline / "refined" / "val" / f"{image_id}.png"), expected)
    result = json.loads((pipeline / "eval" / "refined_val.json").read_text())
    assert result["protocol"]["map_format"] == "png" and 0 <= result["best"]["miou"] <= 100
    assert (pipeline / "eval" / "refined_val.md").is_file()


def test_walk_background_sources(tmp_path: Path) -> None:
    cfg = from_dict({"data": {"eval_split": "train"}})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "train.json").write_text(json.dumps({"protocol": {"bg_rule": "constant"},
                                                              "best": {"threshold": 0.27, "miou": 50.0}}))
    assert walk_background(tmp_path, "train_aug", cfg)["threshold"] == 0.27  # the seed protocol's split
    assert walk_background(tmp_path, "train_aug", from_dict({"wsss": {"affinity": {"bg_threshold": 0.5}}})) == \
        {"rule": "constant", "threshold": 0.5, "source": "wsss.affinity.bg_threshold"}
    assert walk_background(tmp_path, "x", from_dict({"wsss": {"affinity": {"bg_alpha": 16}}}))["rule"] == "power"
    with pytest.raises(ConfigError, match="not both"):
        from_dict({"wsss": {"affinity": {"bg_alpha": 16, "bg_threshold": 0.3}}})


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, module: object, name: str, call: int) -> None:
    """Make ``module.name`` raise at its ``call``-th call (a killed process)."""
    original = getattr(module, name)
    calls = [0]

    def dying(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


@pytest.mark.parametrize("stage", ["affinity", "seg"])
def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    stage: str) -> None:
    run_dir = make_run(tmp_path)
    overrides = [*TINY_WSSS, f"wsss.{stage}.epochs=2", f"wsss.{stage}.batch_size=4", f"wsss.{stage}.checkpoint_every=1"]
    if stage == "affinity":
        make_affinity_labels(run_dir, "train", overrides=overrides, progress=False)
        def train(**kw: object) -> Path:
            return train_affinity(run_dir, overrides, progress=False, **kw)  # type: ignore[arg-type]
        module, name = affinity_engine, "affinity_loss_terms"
    else:
        save_dir = run_dir / "refined" / "train"  # the GT as pseudo masks: no AffinityNet needed here
        save_dir.mkdir(parents=True)
        dataset = build_dataset("voc", run_dir.parent.parent / "VOC2012", "train")
        for index, image_id in enumerate(dataset.ids):
            save_label_png(save_dir / f"{image_id}.png", dataset.get_mask(index))
        def train(**kw: object) -> Path:
            return train_segmenter(run_dir, "refined", overrides, progress=False, **kw)  # type: ignore[arg-type]
        module, name = seg_engine, "segmentation_loss"
    stage_dir = train()
    uninterrupted = _state(stage_dir / "checkpoints" / "last.pth")
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    for record in ("checkpoints/last.pth", "metrics.jsonl", "summary.json"):
        (stage_dir / record).unlink()
    with monkeypatch.context() as patch:
        _interrupt_at(patch, module, name, 4)  # dies in step 4 of 4, after the epoch boundary (step 2)
        with pytest.raises(KeyboardInterrupt):
            train()
    assert torch.load(stage_dir / "checkpoints" / "last.pth", weights_only=True)["step"] == 3
    with pytest.raises(RunExistsError):
        train()
    train(resume=True)
    resumed = _state(stage_dir / "checkpoints" / "last.pth")
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)
    # The records of the killed attempt after its checkpoint are replaced: one per step, the same losses.
    resumed_records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_records] == [r["loss"] for r in records]


# --------------------------------------------------------------------------------------------------
# segmenter


def test_segmentation_loss_ignores_255() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, requires_grad=True)
    masks = torch.randint(0, 4, (2, 6, 5))
    masks[0, :2] = 255
    masks[1, :, 3:] = 255
    loss = segmentation_loss(logits, masks)
    # Reference: mean negative log-likelihood over the labelled pixels only.
    log_probs = logits.log_softmax(1).permute(0, 2, 3, 1)
    valid = masks != 255
    expected = -log_probs[valid].gather(1, masks[valid][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~valid] == 0)
    # The ignored pixels carry a wrong class in the scene (here: the logits say class 3 there, confidently):
    # loss and gradient stay the same whatever the network says about them.
    wrong = logits.detach().clone()
    wrong.permute(0, 2, 3, 1)[~valid] = torch.tensor([-9.0, -9.0, -9.0, 9.0])
    wrong.requires_grad_(True)
    loss_wrong = segmentation_loss(wrong, masks)
    loss_wrong.backward()
    torch.testing.assert_close(loss_wrong, loss)
    torch.testing.assert_close(wrong.grad, logits.grad)


def test_seg_transform_pads_labels_with_ignore_and_image_with_zero() -> None:
    image = torch.full((3, 10, 12), 200, dtype=torch.uint8)
    mask = torch.ones(10, 12, dtype=torch.int64)
    torch.manual_seed(0)
    out = SegTrainTransform(crop=32, scale_range=(1.0, 1.0))({"id": "a", "image": image, "mask": mask})
    assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
    inside = out["mask"] == 1
    assert int(inside.sum()) == 120 and set(out["mask"].unique().tolist()) == {1, 255}
    assert torch.all(out["image"][:, ~inside] == 0)
    torch.testing.assert_close(out["image"][:, inside], normalize(image)[:, :1, :1].reshape(3, 1).expand(3, 120))


def test_segmenter_training_record_and_max_fusion(pipeline: Path) -> None:
    summary = json.loads((pipeline / "seg" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["class_names"] == CLASSES and summary["labels"] == "refined"
    assert summary["labels_dir"] == str(pipeline / "refined" / "train")
    model, cfg, _, _ = load_segmenter(pipeline)
    assert cfg.wsss.seg.scales == [1.0, 0.5]
    dataset = build_dataset("voc", pipeline.parent.parent / "VOC2012", "val")
    image = normalize(dataset[0]["image"])
    with torch.no_grad():  # reference: scales one by one, the per-pixel maximum of their softmax
        views = []
        for scale in (1.0, 0.5):
            size = (int(HEIGHT * scale), int(WIDTH * scale))
            x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=True)
            views.append(F.interpolate(model(x), size=(HEIGHT, WIDTH), mode="bilinear",
                                       align_corners=False).softmax(1)[0])
        expected = torch.maximum(views[0], views[1])
    fused = segment_probabilities(model, image, [1.0, 0.5])
    torch.testing.assert_close(fused, expected)
    averaged = segment_probabilities(model, image, [1.0, 0.5], fusion="mean")
    torch.testing.assert_close(averaged, (views[0] + views[1]) / 2)
    prediction = load_label_png(pipeline / "seg" / "predictions" / "val" / f"{dataset.ids[0]}.png")
    np.testing.assert_array_equal(prediction, fused.argmax(0).numpy())


def test_segmenter_evaluation_and_voc_server_layout(pipeline: Path) -> None:
    result = json.loads((pipeline / "eval" / "seg_val.json").read_text())
    assert result["protocol"]["map_format"] == "png"
    assert list(result["best"]["per_class_iou"]) == ["background", *CLASSES]
    dataset = build_dataset("voc", pipeline.parent.parent / "VOC2012", "val")
    intersection, union = np.zeros(4), np.zeros(4)  # brute-force mIoU over the split (classes seen in GT or prediction)
    for index, image_id in enumerate(dataset.ids):
        gt = dataset.get_mask(index)
        pred = load_label_png(pipeline / "seg" / "predictions" / "val" / f"{image_id}.png")
        for c in range(4):
            intersection[c] += np.sum((pred == c) & (gt == c))
            union[c] += np.sum(((pred == c) | (gt == c)) & (gt != 255))
    seen = union > 0
    assert result["best"]["miou"] == pytest.approx(100 * np.mean(intersection[seen] / union[seen]), abs=1e-6)
    server = pipeline / "seg" / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.name for p in server.iterdir()) == ["test_000.png", "test_001.png"]  # nothing else to upload
    for path in server.glob("*.png"):
        with Image.open(path) as png:
            assert png.mode == "P" and png.getpalette()[:12] == voc_palette()[:12]
            values = np.asarray(png)
        np.testing.assert_array_equal(values, load_label_png(pipeline / "seg" / "predictions" / "test" / path.name))
        assert values.max() <= 3
    assert not (pipeline / "seg" / "results" / "VOC2012" / "Segmentation" / "comp6_val_cls").exists()
    with pytest.raises(ValueError, match="has no ground-truth masks"):
        evaluate_segmenter(pipeline, "test", progress=False)


def test_dense_crf_for_labels_and_segmentation(pipeline: Path, tmp_path: Path) -> None:
    from test_refine_wsss import require_crf

    from mmcst.engine.seg import SEG_CRF
    from mmcst.io import load_map
    from mmcst.refine import dense_crf

    require_crf()
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(pipeline, run_dir)
    dataset = build_dataset("voc", pipeline.parent.parent / "VOC2012", "val")
    image = dataset[0]["image"]
    labels_dir = make_affinity_labels(run_dir, "val", method="auto", progress=False)  # auto: the CRF, installed
    assert json.loads((labels_dir / "settings.json").read_text())["method"] == "crf"
    keys, cam = load_map(run_dir / "maps" / "val" / f"{dataset.ids[0]}.npy")
    np.testing.assert_array_equal(load_label_png(labels_dir / f"{dataset.ids[0]}.png"),
                                  confident_labels(image.permute(1, 2, 0).numpy(), keys, cam, 1.0, 12.0, "crf"))

    out = infer_segmenter(run_dir, "val", crf=True, progress=False)
    assert json.loads((out / "settings.json").read_text())["crf"] == SEG_CRF
    model, _, _, _ = load_segmenter(run_dir)
    probs = segment_probabilities(model, normalize(image), [1.0, 0.5]).numpy()
    expected = dense_crf(image.permute(1, 2, 0).numpy(), probs, iterations=10, gaussian_sxy=4, gaussian_compat=3,
                         bilateral_sxy=83, bilateral_srgb=5, bilateral_compat=3).argmax(0)
    np.testing.assert_array_equal(load_label_png(out / f"{dataset.ids[0]}.png"), expected)


# --------------------------------------------------------------------------------------------------
# command line and errors


def test_every_stage_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path)
    run = str(run_dir)
    assert main(["affinity", "labels", run, *TINY_WSSS, "--split", "train", "--method", "par", "--no-progress"]) == 0
    assert json.loads((run_dir / "affinity" / "labels" / "train" / "settings.json").read_text())["method"] == "par"
    assert main(["affinity", "train", run, *TINY_WSSS, "wsss.affinity.backbone=resnet10t",
                 "wsss.affinity.time_budget_s=0", "--no-progress"]) == 0
    summary = json.loads((run_dir / "affinity" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped_by"] == "time_budget"  # the budget is checked after each step
    assert main(["affinity", "refine", run, "wsss.affinity.bg_threshold=0.3", "--split", "val", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and str(run_dir / "refined" / "val") in out
    assert json.loads((run_dir / "refined" / "val" / "settings.json").read_text())["background"]["threshold"] == 0.3
    # the segmenter on the refined masks of val (a folder), DeepLab-V2 on a small timm trunk
    assert main(["seg", "train", run, *TINY_WSSS, "wsss.seg.model=deeplab_v2", "wsss.seg.backbone=resnet10t",
                 "wsss.seg.width=1.0", "wsss.seg.train_split=val", "wsss.seg.max_steps=1",
                 "wsss.seg.psa_optimizer_quirk=true", "--labels", str(run_dir / "refined" / "val"),
                 "--no-progress"]) == 0
    groups = torch.load(run_dir / "seg" / "checkpoints" / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    # MCTformer's optimiser: the weight decay (1e-5) lands in SGD's momentum slot, nothing decays
    assert {(g["momentum"], g["weight_decay"]) for g in groups} == {(1e-5, 0.0)}
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0, 20.0]  # DeepLab-V2: classifier weights x10, biases x20
    assert main(["seg", "infer", run, "--split", "test", "--scales", "1.0", "--no-crf", "--no-progress"]) == 0
    assert len(list((run_dir / "seg" / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls").glob("*.png"))) == 2
    assert main(["seg", "infer", run, "--split", "val", "--scales", "1.0", "--flip", "--no-progress"]) == 0
    assert main(["seg", "eval", run, "--split", "val", "--no-progress"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert json.loads((run_dir / "seg" / "predictions" / "val" / "settings.json").read_text())["flip"] is True
    assert main(["seg", "eval", run, "--split", "test", "--no-progress"]) == 2
    assert "has no ground-truth masks" in capsys.readouterr().err


def test_bad_inputs_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path)
    maps = run_dir / "maps" / "train"
    for path in maps.glob("*.npy"):
        path.rename(path.with_suffix(".bak"))
    assert main(["affinity", "labels", str(run_dir), "--split", "train", "--no-progress"]) == 2
    assert f"{maps}: no localization maps" in capsys.readouterr().err
    for path in maps.glob("*.bak"):
        path.rename(path.with_suffix(".npy"))
    (maps / "train_003.npy").unlink()
    with pytest.raises(FileNotFoundError, match=str(maps / "train_003.npy")):
        make_affinity_labels(run_dir, "train", overrides=TINY_WSSS, progress=False)

    labels = tmp_path / "masks"
    dataset = build_dataset("voc", run_dir.parent.parent / "VOC2012", "train")
    for index, image_id in enumerate(dataset.ids):
        if image_id != "train_005":
            save_label_png(labels / f"{image_id}.png", dataset.get_mask(index))
    assert main(["seg", "train", str(run_dir), *TINY_WSSS, "--labels", str(labels), "--no-progress"]) == 2
    assert str(labels / "train_005.png") in capsys.readouterr().err
    save_label_png(labels / "train_005.png", np.full((HEIGHT, WIDTH), 7, np.uint8))  # class 7 of 3
    with pytest.raises(ValueError, match=r"train_005.png: mask values \[7\] outside 0..3"):
        LabelFolderDataset(dataset, labels, 3)[5]
    with pytest.raises(FileNotFoundError, match="refined/train: no pseudo masks"):
        train_segmenter(run_dir, "refined", TINY_WSSS, progress=False)
    with pytest.raises(FileNotFoundError, match="train AffinityNet first"):
        refine_masks(run_dir, "val", progress=False)
    with pytest.raises(FileNotFoundError, match="mmcst seg train"):
        infer_segmenter(run_dir, "val", progress=False)
    with pytest.raises(ConfigError, match="model.name"):
        train_affinity(run_dir, ["model.name=cam"], progress=False)


# --------------------------------------------------------------------------------------------------
# torchrun


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, overrides: list[str], out: str) -> None:
    """One ``torchrun``-like process through the PSA stage; it saves the weights its training ends with.

    The segmenter's training and inference run the same code paths (``PolyTrainer``, sharded image jobs).
    """
    import os

    from mmcst.engine.stage import PolyTrainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    original_run = PolyTrainer.run

    def run_and_keep(self: PolyTrainer) -> Path:
        stage_dir = original_run(self)
        torch.save(self.model.state_dict(), Path(out) / f"{self.stage}{rank}.pt")
        return stage_dir

    PolyTrainer.run = run_and_keep  # type: ignore[method-assign]
    make_affinity_labels(run_dir, "train", overrides=overrides, progress=False)
    train_affinity(run_dir, overrides, progress=False)
    result = refine_masks(run_dir, "train", progress=False)
    (Path(out) / f"refine{rank}.json").write_text(json.dumps(result))


def test_two_processes_shard_the_images_and_train_in_step(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from engine_helpers import free_port

    run_dir = make_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    overrides = [*TINY_WSSS, "wsss.affinity.max_steps=2", "wsss.affinity.batch_size=4"]
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(run_dir), overrides, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    rank0, rank1 = torch.load(out / "affinity0.pt"), torch.load(out / "affinity1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the ranks in step
    saved = _state(run_dir / "affinity" / "checkpoints" / "last.pth")
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    assert json.loads((run_dir / "affinity" / "summary.json").read_text())["world_size"] == 2
    refined = [json.loads((out / f"refine{r}.json").read_text()) for r in range(2)]
    assert refined[0] == refined[1]  # the main process's evaluation, on every rank
    assert refined[0]["refine"]["written"] == 8 and "best" in refined[0]  # each image once, counted over the ranks
    assert len(list((run_dir / "refined" / "train").glob("*.png"))) == 8
