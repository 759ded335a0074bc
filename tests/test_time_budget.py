"""A wall-clock budget drives the cosine schedule, so a budget-limited run still ends at min_lr."""
from __future__ import annotations

import json
import time

import pytest

from engine_helpers import TEST_BUILDERS, TinyNet, builders_with, tiny_config
from mmcst.engine.train import train


class SlowNet(TinyNet):
    """Each forward takes ~50 ms, so a 1 s budget ends after ~20 of the 3,000 scheduled steps."""

    def forward(self, images, labels=None, extras=None):
        time.sleep(0.05)
        return super().forward(images, labels, extras)


def test_budget_limited_run_anneals_to_min_lr(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1000, time_budget_s=1.0, warmup_epochs=0.0, log_every=1)
    run = train(cfg, progress=False, builders=builders_with(lambda model_cfg, names: SlowNet(names)))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "time_budget"
    assert summary["steps"] < 200  # far from the 3,000 scheduled steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    lrs = [r["lr"] for r in records]
    base, final = cfg.train.lr * (cfg.train.batch_size / 512 if cfg.train.scale_lr else 1), lrs[-1]
    # Without the budget-driven schedule the lr would still be ~base after <7% of the steps.
    assert final < cfg.train.min_lr + 0.2 * (base - cfg.train.min_lr)
    assert lrs == sorted(lrs, reverse=True)


def test_budget_limited_run_warms_up_in_steps_then_anneals_on_the_clock(tmp_path):
    """The warm-up counts steps as in a step-limited run (not a sliver of a nominal 3,000-step schedule); the
    cosine then spans the rest of the budget."""
    cfg = tiny_config(tmp_path, epochs=1000, time_budget_s=1.5, warmup_epochs=2.0, log_every=1)  # 6 warm-up steps
    run = train(cfg, progress=False, builders=builders_with(lambda model_cfg, names: SlowNet(names)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    lrs = [r["lr"] for r in records]
    assert len(lrs) > 12
    peak = lrs.index(max(lrs))
    assert 4 <= peak <= 7, lrs
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[0] < 0.5 * max(lrs)
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] < cfg.train.min_lr + 0.2 * (max(lrs) - cfg.train.min_lr)


def test_budget_limited_run_shows_a_bar_of_seconds(tmp_path, monkeypatch):
    """The bar counts the budget in seconds (not the 3,000 scheduled steps) and names the steps done."""
    import tqdm

    bars = []

    class RecordingBar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    cfg = tiny_config(tmp_path, epochs=1000, time_budget_s=0.5, warmup_epochs=0.0, log_every=1)
    run = train(cfg, progress=True, builders=builders_with(lambda model_cfg, names: SlowNet(names)))
    steps = json.loads((run / "summary.json").read_text())["steps"]
    bar = next(b for b in bars if b.desc.startswith(cfg.name))
    assert bar.unit == "s" and bar.total == 0.5
    assert bar.n == pytest.approx(0.5)  # stopped by the budget: the bar is full, whatever the step count
    assert bar.desc == f"{cfg.name} step {steps}" and 0 < steps < 200
