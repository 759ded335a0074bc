"""Training engine: run directory, schedule, optimiser groups, sampler, mAP, NaN stop, unreadable images."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine_helpers import (
    TEST_BUILDERS, NaNNet, TinyNet, build_nan_model, builders_with, state_of, tiny_config,
)
from mmcst.config import ConfigError, TrainConfig, load_config
from mmcst.data.base import DatasetError
from mmcst.engine.train import (
    NonFiniteLossError, ResumableBatchSampler, build_optimizer, lr_at, model_from_run, parameter_groups, train,
)
from mmcst.metrics.classification import average_precision, mean_average_precision


def test_train_writes_run_directory(tmp_path):
    run = train(tiny_config(tmp_path, epochs=2), progress=False, builders=TEST_BUILDERS)
    assert run == tmp_path / "runs" / "run"
    for name in ("config.yaml", "env.json", "log.txt", "metrics.jsonl", "summary.json", "checkpoints/last.pth"):
        assert (run / name).is_file(), name
    for sub in ("maps", "pseudo_labels", "eval"):
        assert (run / sub).is_dir()
    assert load_config(run / "config.yaml").train.batch_size == 4  # the resolved config reads back
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 7 and env["torch"] == torch.__version__ and "timm" in env and "command" in env

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 12 images / batch 4 = 3 steps x 2 epochs
    assert all({"cls", "reg", "lr", "images_per_s"} <= set(r) for r in steps)
    assert all(math.isclose(r["loss"], r["cls"] + r["reg"], rel_tol=1e-6) for r in steps)
    epochs = [r for r in records if "val_map" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["val_map"] <= 1 for r in epochs)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["epochs_completed"] == 2 and summary["stopped_by"] == "epochs"
    assert set(summary["final_losses"]) == {"cls", "reg"} and summary["skipped_files"] == []
    log_text = (run / "log.txt").read_text()
    assert "seed 7" in log_text and "resolved config" in log_text and "training finished" in log_text


def test_model_from_run_round_trip_and_errors(tmp_path):
    run = train(tiny_config(tmp_path, max_steps=2), progress=False, builders=TEST_BUILDERS)
    model, cfg, names = model_from_run(run, builders=TEST_BUILDERS)
    assert names == ["disc", "square", "bar"] and cfg.train.max_steps == 2 and not model.training
    for key, value in state_of(run).items():
        assert torch.equal(model.state_dict()[key], value)

    def wider(model_cfg, class_names):
        return TinyNet(class_names, width=5)
    with pytest.raises(ValueError, match=r"last\.pth: checkpoint does not fit the model.*shape mismatch.*conv1"):
        model_from_run(run, builders=builders_with(wider))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        model_from_run(tmp_path / "runs" / "nothing", builders=TEST_BUILDERS)
    # An existing run is not silently overwritten.
    with pytest.raises(FileExistsError, match="resume=True"):
        train(tiny_config(tmp_path, max_steps=2), progress=False, builders=TEST_BUILDERS)


def test_schedule_warmup_cosine_and_max_steps(tmp_path):
    cfg = TrainConfig(lr=0.5, batch_size=512, warmup_epochs=1.5, warmup_lr=1e-3, min_lr=1e-4)
    model = TinyNet(["a", "b"])
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch=4, total_steps=10, device=torch.device("cpu"))
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = 6  # 1.5 epochs x 4 steps
    expected = [1e-3 + (0.5 - 1e-3) * s / warmup if s < warmup else
                1e-4 + 0.5 * (0.5 - 1e-4) * (1 + math.cos(math.pi * (s - warmup) / (10 - warmup))) for s in range(10)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[6] == pytest.approx(0.5) and lr_at(10, 0.5, 1e-3, 1e-4, 6, 10) == pytest.approx(1e-4)
    # lr scaling by batch / 512 and both param groups follow the schedule
    scaled = TrainConfig(lr=0.4, batch_size=128, warmup_epochs=0)
    optimizer, _ = build_optimizer(model, scaled, 4, 8, torch.device("cpu"))
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.1)] * 2
    assert optimizer.defaults["eps"] == 1e-8


def test_parameter_groups_exclude_1d_and_named_tokens():
    model = TinyNet(["a", "b"])
    decay, no_decay = parameter_groups(model, 0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[id(p)] for p in decay["params"]) == ["conv1.weight", "conv2.weight", "head.weight"]
    assert sorted(by_id[id(p)] for p in no_decay["params"]) == \
        ["class_bias", "conv1.bias", "conv2.bias", "head.bias"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_max_steps_and_time_budget_stop(tmp_path):
    run = train(tiny_config(tmp_path, name="short", epochs=50, max_steps=4), progress=False, builders=TEST_BUILDERS)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["total_steps"] == 4 and summary["stopped_by"] == "max_steps"
    checkpoint = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["position"]) == (4, 1, 1)
    run = train(tiny_config(tmp_path, name="budget", epochs=50, time_budget_s=1e-9), progress=False,
                builders=TEST_BUILDERS)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped_by"] == "time_budget"


def test_sampler_shards_global_batches_and_resumes():
    full = ResumableBatchSampler(10, 4, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 2 and all(e == 2 for b in batches for e, _ in b)
    order = full.permutation(2)
    assert [i for b in batches for _, i in b] == list(order[:8])  # drop_last
    assert not np.array_equal(order, full.permutation(3))
    ranks = [ResumableBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    for step, (a, b) in enumerate(zip(*ranks)):
        assert len(a) == len(b) == 2 and sorted(a + b) == sorted(batches[step])
    full.set_epoch(2, start=1)
    assert list(full) == batches[1:] and len(full) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        ResumableBatchSampler(10, 3, seed=0, world_size=2)
    with pytest.raises(ConfigError, match="larger than the 3 training images"):
        ResumableBatchSampler(3, 4, seed=0)


def test_average_precision_matches_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 5))
    targets = (rng.random((40, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a class without positives is left out of the mean
    ap = average_precision(scores, targets)
    for c in range(4):
        order = np.argsort(-scores[:, c])
        hits, precisions = 0, []
        for rank, i in enumerate(order, start=1):
            if targets[i, c]:
                hits += 1
                precisions.append(hits / rank)
        assert ap[c] == pytest.approx(np.mean(precisions))
    assert np.isnan(ap[4])
    labelled = targets.sum(1) > 0  # images without labels are left out, as MCTformer's monitor
    assert (~labelled).any()
    assert mean_average_precision(scores, targets) == \
        pytest.approx(np.mean(average_precision(scores[labelled], targets[labelled])[:4]))
    perfect = np.eye(3)
    assert mean_average_precision(perfect * 5, perfect) == 1.0


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    NaNNet.nan_at = 3
    cfg = tiny_config(tmp_path, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*'reg'.*last good checkpoint"):
        train(cfg, progress=False, builders=builders_with(build_nan_model))
    checkpoint = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "last.pth", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_unreadable_image_stops_or_is_skipped(tmp_path):
    import io

    from PIL import Image

    from engine_helpers import TinyDataset

    bad = TinyDataset(tmp_path / "data", "train", n=12).image_path(5)
    encoded = io.BytesIO()
    with Image.open(bad) as image:
        image.convert("RGB").save(encoded, format="JPEG")
    bad.write_bytes(encoded.getvalue()[:300])  # a truncated JPEG: valid header, the data stops

    with pytest.raises(DatasetError, match=r"train_005\.png"):
        train(tiny_config(tmp_path, name="strict", max_steps=6), progress=False, builders=TEST_BUILDERS)
    cfg = tiny_config(tmp_path, name="lenient", max_steps=6)
    cfg.data.skip_bad = True
    run = train(cfg, progress=False, builders=TEST_BUILDERS)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert len(summary["skipped_files"]) == 1 and "train_005.png" in summary["skipped_files"][0]
    assert "train_005.png" in (run / "log.txt").read_text()


def test_missing_val_split_is_logged_and_skipped(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.data.val_split = "missing"
    run = train(cfg, progress=False, builders=TEST_BUILDERS)
    assert "classification mAP skipped: split 'missing'" in (run / "log.txt").read_text()
    assert json.loads((run / "summary.json").read_text())["val_map"] is None
