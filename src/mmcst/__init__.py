"""mmcst: weakly supervised dense object localization (MMCST, MCTformer, CAM).

Python API (the CLI calls the same functions)::

    import mmcst
    cfg = mmcst.load_config("configs/voc/mmcst.yaml", ["train.epochs=10"])
    run_dir = mmcst.train(cfg)
    result = mmcst.infer(run_dir, "train")                      # maps + evaluation when GT exists
    result = mmcst.evaluate("runs/x/maps/train", dataset="voc", root="data/VOC2012", split="train")
    summary = mmcst.pipeline(mmcst.load_config("configs/voc/wsss_mmcst.yaml"))  # seed / refined / seg mIoU
    mmcst.make_affinity_labels(run_dir, "train_aug")              # WSSS stage, step by step (README)
    mmcst.train_affinity(run_dir, ["wsss.affinity.weights=res38_cls.pth"])
    result = mmcst.refine_masks(run_dir, "train")                 # refined masks + their mIoU
    mmcst.train_segmenter(run_dir, "refined", ["wsss.seg.weights=res38_cls.pth"])
    mmcst.infer_segmenter(run_dir, "val"); result = mmcst.evaluate_segmenter(run_dir, "val")
    run_dir = mmcst.import_mctformer("MCTformer_v2/checkpoint.pth", "runs/official_v2", "v2", ["data.root=..."])
    mmcst.export_backbone("runs/cam", "cam_resnet.pth")          # a CAM run's trunk: wsss.*.weights
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "train", "infer", "evaluate", "pipeline", "demo", "import_mctformer",
           "export_backbone", "make_affinity_labels", "train_affinity", "refine_masks", "train_segmenter",
           "infer_segmenter", "evaluate_segmenter"]


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


def pipeline(config: Any, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Every stage of the method in one run directory (``mmcst pipeline``): training, maps, seeds, AffinityNet,
    refined masks, the segmenter; stages whose record matches are skipped. Returns ``pipeline.json``'s content."""
    from mmcst.config import Config, load_config as _load
    from mmcst.engine.pipeline import run_pipeline
    cfg = config if isinstance(config, Config) else _load(config)
    return run_pipeline(cfg, progress=progress, **kwargs)


def demo(out: str | Path = "demo_out", quick: bool = False, **kwargs: Any) -> Path:
    """Run the demo; returns the report path. ``kwargs``: ``methods``, ``wsss``, ``progress``, ``seed`` (training
    seed), ``data_seed`` (generator seed: 0 is the shipped data, others held-out data of the same kind)."""
    from mmcst.engine.demo import run_demo
    return run_demo(out, quick=quick, **kwargs)


def import_mctformer(checkpoint: str | Path, run_dir: str | Path, version: str,
                     overrides: list[str] | tuple[str, ...] = (), config: str | Path | None = None) -> Path:
    """Write a run directory from an official MCTformer-V1/V2 checkpoint (``version`` ``v1`` | ``v2``); return it."""
    from mmcst.engine.importer import import_mctformer as _import
    return _import(checkpoint, run_dir, version, overrides, config=config)


def export_backbone(run_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write a trained ``cam`` run's ResNet trunk as a timm ResNet state dict (``wsss.affinity.weights`` /
    ``wsss.seg.weights``); returns ``{"path", "backbone", "tensors", "step"}``."""
    from mmcst.engine.importer import export_backbone as _export
    return _export(run_dir, dest)


def make_affinity_labels(run_dir: str | Path, split: str, **kwargs: Any) -> Path:
    """Confident labels for AffinityNet from the run's maps of ``split``; returns their folder."""
    from mmcst.engine.affinity import make_affinity_labels as _labels
    return _labels(run_dir, split, **kwargs)


def train_affinity(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Path:
    """Train AffinityNet on the run's confident labels; returns ``RUN/affinity``."""
    from mmcst.engine.affinity import train_affinity as _train
    return _train(run_dir, overrides, **kwargs)


def refine_masks(run_dir: str | Path, split: str, **kwargs: Any) -> dict[str, Any]:
    """Random-walk pseudo masks of ``split`` (``RUN/refined/<split>``); returns their evaluation and counts."""
    from mmcst.engine.affinity import refine_masks as _refine
    return _refine(run_dir, split, **kwargs)


def train_segmenter(run_dir: str | Path, labels: str | Path = "refined", overrides: list[str] | tuple[str, ...] = (),
                    **kwargs: Any) -> Path:
    """Train the segmentation network on pseudo masks; returns ``RUN/seg``."""
    from mmcst.engine.seg import train_segmenter as _train
    return _train(run_dir, labels, overrides, **kwargs)


def infer_segmenter(run_dir: str | Path, split: str, **kwargs: Any) -> Path:
    """Predicted label maps of ``split`` (``RUN/seg/predictions/<split>``); returns that folder."""
    from mmcst.engine.seg import infer_segmenter as _infer
    return _infer(run_dir, split, **kwargs)


def evaluate_segmenter(run_dir: str | Path, split: str, **kwargs: Any) -> dict[str, Any]:
    """mIoU of the segmenter's predictions of ``split`` (``RUN/eval/seg_<split>.json``)."""
    from mmcst.engine.seg import evaluate_segmenter as _evaluate
    return _evaluate(run_dir, split, **kwargs)
