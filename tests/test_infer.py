"""Inference engine: map files, brute-force reference, size bucketing, resume, pseudo-labels, evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine_helpers import TEST_BUILDERS, TinyDataset, build_tiny_dataset, tiny_config, tiny_normalize
from mmcst.engine.infer import MapGenerator, infer, map_file_is_valid, pseudo_label
from mmcst.engine.train import model_from_run, train
from mmcst.io import load_map, save_map, voc_palette


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    return train(tiny_config(tmp, max_steps=3), progress=False, builders=TEST_BUILDERS)


def _test_split(run_dir) -> TinyDataset:
    return build_tiny_dataset("tiny", str(run_dir.parent.parent / "data"), "test")


def _new_log_lines(run_dir, action) -> str:
    """What ``action`` appended to the run's ``log.txt``."""
    before = (run_dir / "log.txt").read_text()
    action()
    return (run_dir / "log.txt").read_text()[len(before):]


def _reference_map(model, image: torch.Tensor, keys: np.ndarray, scales, flip: bool) -> np.ndarray:
    """METHOD.md 4.1-4.2 written out for one image: loops instead of batching, explicit affinity sums."""
    height, width = image.shape[-2:]
    total = torch.zeros(len(keys), height, width, dtype=torch.float64)
    for scale in scales:
        size = (int(height * scale), int(width * scale))
        scaled = image[None] if size == (height, width) else \
            F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)
        for flipped in ([False, True] if flip else [False]):
            x = scaled.flip(-1) if flipped else scaled
            out = model.localize(x, need_affinity=True)
            maps, affinity = out.maps[0].double(), out.affinity[0].double()
            c, h, w = maps.shape
            flat = maps.reshape(c, h * w)
            refined = torch.zeros_like(flat)
            for i in range(h * w):  # refined[i] = sum_j P[i, j] M[j]
                refined[:, i] = (affinity[i][None, :] * flat).sum(dim=1)
            up = F.interpolate(refined.reshape(1, c, h, w).float(), size=(height, width), mode="bilinear",
                               align_corners=False)[0].double()
            total += (up.flip(-1) if flipped else up)[torch.as_tensor(keys)]
    low = total.amin(dim=(1, 2), keepdim=True)
    high = total.amax(dim=(1, 2), keepdim=True)
    return ((total - low) / (high - low + 1e-8)).numpy()


def test_maps_match_reference_and_hold_present_classes_only(run_dir):
    result = infer(run_dir, "test", evaluate=False, progress=False, builders=TEST_BUILDERS)
    assert result == {}
    dataset = _test_split(run_dir)
    model, cfg, _ = model_from_run(run_dir, builders=TEST_BUILDERS)
    sizes = set()
    empty = 0
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            keys, cam = load_map(run_dir / "maps" / "test" / f"{sample['id']}.npy")
            expected_keys = np.flatnonzero(sample["labels"].numpy())
            np.testing.assert_array_equal(keys, expected_keys)
            assert cam.shape == (len(expected_keys), *sample["image"].shape[-2:])
            sizes.add(cam.shape[1:])
            if not len(keys):
                empty += 1
                continue
            assert cam.min() >= 0 and np.allclose(cam.max(axis=(1, 2)), 1.0, atol=1e-3)
            reference = _reference_map(model, tiny_normalize(sample["image"]), keys, cfg.infer.scales,
                                       cfg.infer.flip)
            np.testing.assert_allclose(cam, reference, atol=2e-3)  # float16 storage
    assert len(sizes) == 3 and empty >= 1


def test_bucketed_batches_equal_one_by_one(run_dir):
    model, cfg, _ = model_from_run(run_dir, builders=TEST_BUILDERS)
    dataset = _test_split(run_dir)
    same_size = [i for i in range(len(dataset)) if tuple(dataset[i]["image"].shape[-2:]) == (32, 40)]
    assert len(same_size) >= 3
    samples = [dataset[i] for i in same_size]
    keys = [np.arange(3) for _ in samples]  # all classes: every map is compared
    images = torch.stack([tiny_normalize(s["image"]) for s in samples])
    generator = MapGenerator(model, [1.0, 0.75, 1.25], flip=True, refine=True, device=torch.device("cpu"))
    together = generator(images, keys, normalize=False)
    for b in range(len(samples)):
        alone = generator(images[b:b + 1], keys[b:b + 1], normalize=False)[0]
        # Equal up to float rounding of batched kernels. The raw sums are compared: min-max normalisation divides
        # by each map's range, which for this barely trained model is small enough to magnify float rounding of
        # the batched interpolation (kernels differ between CPUs) beyond any fixed tolerance.
        scale = alone.abs().amax(dim=(1, 2), keepdim=True)
        assert torch.all((together[b] - alone).abs() <= 1e-5 * scale + 1e-7), b
    normalised = generator(images, keys)
    for b in range(len(samples)):
        low = together[b].amin(dim=(1, 2), keepdim=True)
        high = together[b].amax(dim=(1, 2), keepdim=True)
        torch.testing.assert_close(normalised[b], (together[b] - low) / (high - low + 1e-8))


def test_resume_keeps_valid_maps_and_rewrites_bad_ones(run_dir, tmp_path):
    maps_dir = run_dir / "maps" / "test"
    # Without refinement: the barely trained model's refined maps are so flat that min-max normalisation
    # magnifies the float rounding of a different batch composition beyond the float16 step of the files.
    options = dict(refine=False, evaluate=False, progress=False, builders=TEST_BUILDERS)
    infer(run_dir, "test", **options)
    files = sorted(maps_dir.glob("*.npy"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    labelled = [p for p in files if len(load_map(p)[0])]
    truncated, wrong_keys = labelled[0], labelled[1]
    truncated.write_bytes(before[truncated.name][1][:40])
    keys, cam = load_map(wrong_keys)
    save_map(wrong_keys, keys[:-1] if len(keys) > 1 else (keys + 1) % 3, cam[:1])
    assert not map_file_is_valid(truncated, keys, *cam.shape[1:])

    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", **options))
    assert f"2 written, {len(files) - 2} valid ones kept" in log
    for path in files:
        if path in (truncated, wrong_keys):
            # Rewritten with the same keys and the same maps up to float16 rounding (other batch companions).
            keys, cam = load_map(path)
            (tmp_path / path.name).write_bytes(before[path.name][1])
            old_keys, old_cam = load_map(tmp_path / path.name)
            np.testing.assert_array_equal(keys, old_keys)
            np.testing.assert_allclose(cam, old_cam, atol=1e-3, rtol=0)
        else:
            assert path.stat().st_mtime_ns == before[path.name][0]  # not touched


def test_rerun_with_other_options_regenerates_all_maps(run_dir):
    maps_dir = run_dir / "maps" / "test"
    options = dict(evaluate=False, progress=False, builders=TEST_BUILDERS)
    infer(run_dir, "test", scales=[1.0], flip=True, refine=False, **options)
    count = len(list(maps_dir.glob("*.npy")))
    settings = json.loads((maps_dir / "settings.json").read_text())
    assert settings["scales"] == [1.0] and settings["flip"] is True and settings["refine"] is False
    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", scales=[1.0], flip=True, refine=False, **options))
    assert f"0 written, {count} valid ones kept" in log
    # Other test-time options: the old maps must not be reused.
    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", scales=[1.0], flip=False, refine=False, **options))
    assert "removing them to regenerate all" in log and f"{count} written, 0 valid ones kept" in log
    assert json.loads((maps_dir / "settings.json").read_text())["flip"] is False
    # A newer checkpoint of the run (here: the same file written again) invalidates them too.
    checkpoint = run_dir / "checkpoints" / "last.pth"
    checkpoint.write_bytes(checkpoint.read_bytes())
    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", scales=[1.0], flip=False, refine=False, **options))
    assert f"{count} written, 0 valid ones kept" in log


def test_pseudo_label_ties_go_to_background():
    keys = np.array([0, 2])
    cam = np.array([[[0.5, 0.2], [0.9, 0.1]], [[0.3, 0.6], [0.95, 0.6]]], np.float32)
    np.testing.assert_array_equal(pseudo_label(keys, cam, 0.5), [[0, 3], [3, 3]])
    np.testing.assert_array_equal(pseudo_label(keys, cam, 0.6), [[0, 0], [3, 0]])
    np.testing.assert_array_equal(pseudo_label(np.zeros(0, np.int64), np.zeros((0, 2, 3), np.float32), 0.1),
                                  np.zeros((2, 3)))


def test_pseudo_labels_palette_threshold_and_evaluation(run_dir):
    eval_json = run_dir / "eval" / "test.json"
    eval_json.unlink(missing_ok=True)
    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", evaluate=False, pseudo_labels=True, progress=False,
                                               builders=TEST_BUILDERS))
    assert "background threshold 0.390 (default" in log
    dataset = _test_split(run_dir)
    for image_id in dataset.ids:
        with Image.open(run_dir / "pseudo_labels" / "test" / f"{image_id}.png") as png:
            assert png.mode == "P" and png.getpalette()[:3 * 256] == voc_palette()
            label = np.asarray(png)
        keys, cam = load_map(run_dir / "maps" / "test" / f"{image_id}.npy")
        assert label.shape == cam.shape[1:] and label.max() <= 3
        assert set(np.unique(label)) <= {0, *(keys + 1).tolist()}
        np.testing.assert_array_equal(label, pseudo_label(keys, cam, 0.39))

    # With evaluation: the run's own best threshold becomes the default background plane.
    results = []
    log = _new_log_lines(run_dir, lambda: results.append(
        infer(run_dir, "test", evaluate=True, pseudo_labels=True, progress=False, builders=TEST_BUILDERS)))
    result = results[0]
    best = result["best"]["threshold"]
    assert json.loads(eval_json.read_text())["best"]["threshold"] == best
    assert f"best threshold of {eval_json}" in log
    assert result["infer"]["bg_threshold"] == best and result["infer"]["reused"] == len(dataset)
    image_id = dataset.ids[0]
    keys, cam = load_map(run_dir / "maps" / "test" / f"{image_id}.npy")
    with Image.open(run_dir / "pseudo_labels" / "test" / f"{image_id}.png") as png:
        np.testing.assert_array_equal(np.asarray(png), pseudo_label(keys, cam, best))
    # An explicit threshold wins.
    infer(run_dir, "test", evaluate=False, pseudo_labels=True, bg_threshold=0.0, progress=False,
          builders=TEST_BUILDERS)
    with Image.open(run_dir / "pseudo_labels" / "test" / f"{image_id}.png") as png:
        np.testing.assert_array_equal(np.asarray(png), pseudo_label(keys, cam, 0.0))


def test_max_images_and_options(tmp_path):
    run = train(tiny_config(tmp_path, max_steps=1), progress=False, builders=TEST_BUILDERS)
    result = infer(run, "test", scales=[1.0], flip=False, refine=False, max_images=3, progress=False,
                   builders=TEST_BUILDERS)
    assert sorted(p.stem for p in (run / "maps" / "test").glob("*.npy")) == [f"test_{i:03d}" for i in range(3)]
    assert result["infer"]["images"] == 3 and result["protocol"]["num_images"] == 3
    # Without refinement and flip, one scale: the map is the model's map upsampled and normalised.
    model, _, _ = model_from_run(run, builders=TEST_BUILDERS)
    sample = build_tiny_dataset("tiny", str(tmp_path / "data"), "test")[0]
    keys, cam = load_map(run / "maps" / "test" / f"{sample['id']}.npy")
    with torch.no_grad():
        maps = model.localize(tiny_normalize(sample["image"])[None]).maps
    up = F.interpolate(maps, size=cam.shape[1:], mode="bilinear", align_corners=False)[0, keys]
    low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(cam, ((up - low) / (high - low + 1e-8)).numpy(), atol=1e-3)


def test_registered_dataset_and_model_end_to_end(tmp_path):
    """The real pieces: the synthetic VOC-layout dataset, its transforms, a tiny MCTformer-V2, the evaluator."""
    from mmcst.config import from_dict

    cfg = from_dict({
        "name": "mct", "out_dir": str(tmp_path / "runs"), "device": "cpu",
        "data": {"dataset": "synthetic", "root": str(tmp_path / "data"), "train_split": "train", "val_split": "val",
                 "image_size": 64, "num_workers": 0, "augment": "light", "synthetic_train": 8, "synthetic_val": 4,
                 "synthetic_size": 64},
        "model": {"name": "mctformer", "prior": {"kind": "none"}, "mctformer": {"layer_index": 2},
                  "backbone": {"name": "vit_small_patch16_224", "patch_size": 8, "embed_dim": 32, "depth": 2,
                               "num_heads": 2}},
        "train": {"max_steps": 2, "batch_size": 4},
        "infer": {"scales": [1.0, 0.5], "batch_size": 2},
    })
    run = train(cfg, progress=False)
    result = infer(run, "val", pseudo_labels=True, progress=False)
    assert 0 <= result["best"]["miou"] <= 100 and result["infer"]["written"] == 4
    assert (run / "eval" / "val.json").is_file() and len(list((run / "pseudo_labels" / "val").glob("*.png"))) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_map"] is not None


def test_channels_last_model_maps_match_contiguous_ones():
    """A model asking for channels-last (CAM) gets its weights and inputs converted; its maps do not change."""
    from mmcst.config import ModelConfig
    from mmcst.models.registry import build_model

    cfg = ModelConfig(name="cam")
    cfg.backbone.name, cfg.prior.kind, cfg.cam.output_stride = "resnet10t", "none", 8
    torch.manual_seed(0)
    model = build_model(cfg, ["a", "b", "c"]).eval()
    assert model.memory_format == torch.channels_last
    images = torch.randn(2, 3, 48, 40)
    keys = [np.array([0, 2]), np.array([1])]
    plain = MapGenerator(model, [1.0, 0.75], flip=True, refine=False, device=torch.device("cpu"))
    plain.memory_format = torch.contiguous_format
    model.to(memory_format=torch.contiguous_format)
    expected = plain(images, keys, normalize=False)
    generator = MapGenerator(model, [1.0, 0.75], flip=True, refine=False, device=torch.device("cpu"))
    conv = model.backbone.conv1[0] if isinstance(model.backbone.conv1, torch.nn.Sequential) else model.backbone.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(generator(images, keys, normalize=False), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _AutocastProbe(torch.nn.Module):
    """Records, at each ``localize``, the input dtype and the dtype a matmul gets (= the active autocast dtype)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def localize(self, images, need_affinity=False):
        probe = torch.ones(2, 2)
        self.seen.append((images.dtype, (probe @ probe).dtype))
        return self.model.localize(images, need_affinity)


def test_default_precision_is_float32_even_inside_an_enclosing_autocast(run_dir):
    model, cfg, _ = model_from_run(run_dir, builders=TEST_BUILDERS)
    assert cfg.infer.precision == "fp32"
    images = tiny_normalize(_test_split(run_dir)[0]["image"])[None]
    probe = _AutocastProbe(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a training loop's; the maps must not inherit it
        fp32 = MapGenerator(probe, [1.0, 0.75], flip=True, refine=True, device=torch.device("cpu"))(
            images, [np.arange(3)], normalize=False)
    assert probe.seen and all(seen == (torch.float32, torch.float32) for seen in probe.seen)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # CPU autocast to both in this torch
        probe.seen.clear()
        maps = MapGenerator(probe, [1.0, 0.75], flip=True, refine=True, device=torch.device("cpu"),
                            precision=precision)(images, [np.arange(3)], normalize=False)
        assert probe.seen and all(seen == (torch.float32, dtype) for seen in probe.seen), precision
        assert maps[0].dtype == torch.float32 and torch.isfinite(maps[0]).all()
        assert not torch.equal(maps[0], fp32[0])  # the autocast really ran
        torch.testing.assert_close(maps[0], fp32[0], rtol=0.05, atol=0.05 * float(fp32[0].abs().max()))


def test_unsupported_autocast_dtype_is_a_clear_error(monkeypatch):
    import contextlib

    import mmcst.engine.infer as infer_module

    with pytest.raises(ValueError, match="infer.precision: expected one of"):
        infer_module.precision_autocast(torch.device("cpu"), "fp8")
    # An older torch disables CPU autocast to float16 with a mere warning: the generator must refuse instead.
    monkeypatch.setattr(infer_module, "precision_autocast", lambda device, precision: contextlib.nullcontext())
    with pytest.raises(ValueError, match="infer.precision=fp16: torch .* cannot autocast to torch.float16 on cpu"):
        MapGenerator(torch.nn.Identity(), [1.0], flip=False, refine=False, device=torch.device("cpu"), precision="fp16")


def test_precision_is_recorded_and_other_precision_regenerates_maps(run_dir):
    maps_dir = run_dir / "maps" / "test"
    options = dict(scales=[1.0], flip=False, refine=False, progress=False, builders=TEST_BUILDERS)
    result = infer(run_dir, "test", **options)
    assert result["infer"]["precision"] == "fp32" and result["infer"]["batch_size"] == 3
    assert json.loads((maps_dir / "settings.json").read_text())["precision"] == "fp32"
    count = len(list(maps_dir.glob("*.npy")))
    log = _new_log_lines(run_dir, lambda: infer(run_dir, "test", precision="bf16", evaluate=False, **options))
    assert "removing them to regenerate all" in log and f"{count} written, 0 valid ones kept" in log
    assert "bf16, batch 3" in log
    assert json.loads((maps_dir / "settings.json").read_text())["precision"] == "bf16"


def test_batch_size_auto_is_one_on_cpu_and_eight_on_cuda(tmp_path):
    from mmcst.cli import build_parser
    from mmcst.config import ConfigError, from_dict
    from mmcst.engine.infer import resolve_batch_size

    assert from_dict({}).infer.batch_size == "auto" and from_dict({}).infer.precision == "fp32"
    assert resolve_batch_size("auto", torch.device("cpu")) == 1
    assert resolve_batch_size("auto", torch.device("cuda")) == 8
    assert resolve_batch_size(5, torch.device("cpu")) == 5
    for bad in (0, "8", 2.5, True):
        with pytest.raises(ValueError, match="infer.batch_size: expected auto or an integer >= 1"):
            resolve_batch_size(bad, torch.device("cpu"))
    with pytest.raises(ConfigError, match="infer.batch_size"):
        from_dict({"infer": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="infer.precision"):
        from_dict({"infer": {"precision": "fp64"}})
    assert build_parser().parse_args(["infer", "run", "--split", "val", "--precision", "fp16"]).precision == "fp16"
    # An auto run on CPU: one image per forward.
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg.infer.batch_size = "auto"
    run = train(cfg, progress=False, builders=TEST_BUILDERS)
    result = infer(run, "test", scales=[1.0], flip=False, refine=False, progress=False, builders=TEST_BUILDERS)
    assert result["infer"]["batch_size"] == 1 and result["infer"]["written"] == 7
