"""mmcst: weakly supervised dense object localization (MMCST, MCTformer, CAM).

Python API (the CLI calls the same functions)::

    import mmcst
    cfg = mmcst.load_config("configs/voc/mmcst.yaml", ["train.epochs=10"])
    run_dir = mmcst.train(cfg)
    result = mmcst.infer(run_dir, "train")                      # maps + evaluation when GT exists
    result = mmcst.evaluate("runs/x/maps/train", dataset="voc", root="data/VOC2012", split="train")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "train", "infer", "evaluate", "demo"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    from mmcst.config import load_config as _load
    return _load(path, overrides)


def train(config: Any, resume: bool = False, progress: bool = True) -> Path:
    """Train the method of ``config`` (a Config, or a YAML path); return the run directory."""
    from mmcst.config import Config, load_config as _load
    from mmcst.engine.train import train as _train
    cfg = config if isinstance(config, Config) else _load(config)
    return _train(cfg, resume=resume, progress=progress)


def infer(run_dir: str | Path, split: str, **kwargs: Any) -> dict[str, Any]:
    """Localization maps (and optional pseudo-labels) for ``split``; returns the evaluation when GT exists."""
    from mmcst.engine.infer import infer as _infer
    return _infer(run_dir, split, **kwargs)


def evaluate(maps_dir: str | Path, dataset: str, root: str | Path, split: str, out: str | Path | None = None,
             eval_cfg: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a folder of map files (or label PNGs) against a dataset split's ground truth."""
    from mmcst.config import EvalConfig
    from mmcst.data.base import build_dataset
    from mmcst.engine.evaluate import evaluate_maps
    ds = build_dataset(dataset, root, split)
    return evaluate_maps(maps_dir, ds, eval_cfg or EvalConfig(), out=out, **kwargs)


def demo(out: str | Path = "demo_out", quick: bool = False, **kwargs: Any) -> Path:
    """Run the demo; returns the report path."""
    from mmcst.engine.demo import run_demo
    return run_demo(out, quick=quick, **kwargs)
