"""An interrupted and resumed run ends with exactly (bitwise) the weights of an uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import (
    TEST_BUILDERS, Interrupted, InterruptedNet, build_interrupted_model, builders_with, state_of, tiny_config,
)
from mmcst.engine.train import train


@pytest.mark.parametrize("stop_at, checkpoint_every", [(5, 1), (4, 3)])
def test_resume_is_bitwise_identical(tmp_path, stop_at, checkpoint_every):
    # 3 steps per epoch, 3 epochs; dropout, augmentation (torch, python and numpy RNGs) and the schedule all
    # have to continue exactly. stop_at=5 dies mid-epoch 2; stop_at=4 resumes from the epoch-1-end checkpoint.
    reference = train(tiny_config(tmp_path, name="whole", epochs=3, checkpoint_every=checkpoint_every),
                      progress=False, builders=TEST_BUILDERS)

    cfg = tiny_config(tmp_path, name="killed", epochs=3, checkpoint_every=checkpoint_every)
    InterruptedNet.stop_at = stop_at
    with pytest.raises(Interrupted):
        train(cfg, progress=False, builders=builders_with(build_interrupted_model))
    interrupted = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pth", weights_only=True)
    assert 0 < interrupted["step"] < 9
    resumed = train(cfg, resume=True, progress=False, builders=TEST_BUILDERS)

    expected, got = state_of(reference), state_of(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(expected["conv1.weight"], interrupted["model"]["conv1.weight"])

    # The metrics of the repeated steps are not duplicated, and they match the uninterrupted run.
    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
    assert losses(resumed) == losses(reference)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["epochs_completed"] == 3
    assert "resumed from" in (resumed / "log.txt").read_text()


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    run = train(cfg, progress=False, builders=TEST_BUILDERS)
    before = state_of(run)
    train(cfg, resume=True, progress=False, builders=TEST_BUILDERS)
    assert all(torch.equal(before[k], v) for k, v in state_of(run).items())


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    run = train(tiny_config(tmp_path, max_steps=2), resume=True, progress=False, builders=TEST_BUILDERS)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert "no checkpoint" in (run / "log.txt").read_text()
