"""``mmcst demo``: the whole pipeline on the embedded default dataset.

1. Generate (or reuse) the procedural dataset, written in the PASCAL VOC layout.
2. Evaluate the reference predictors (ground truth as maps, centre Gaussian prior) through the real path.
3. Train each demo method with the same wall-clock budget from random weights, generate maps on the
   validation split, evaluate them with the VOC protocol.
4. Write ``report.md``, a self-contained ``report.html`` and ``report.json``.

The demo configs live in ``configs/demo/``. Where they differ from the paper's configs, each file says
which switch and why (``demo_notes``), and the report lists those notes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from mmcst.config import Config, load_config
from mmcst.io import atomic_write_json

log = logging.getLogger("mmcst.demo")

DEMO_METHODS = ("mmcst", "mctformer_v2", "cam")


@dataclass(frozen=True)
class DemoBudget:
    n_train: int
    n_val: int
    size: int
    train_seconds: float
    eval_images: Optional[int]


FULL = DemoBudget(n_train=2000, n_val=300, size=224, train_seconds=130.0, eval_images=None)
QUICK = DemoBudget(n_train=240, n_val=48, size=160, train_seconds=15.0, eval_images=None)


def config_dir() -> Path:
    """The project's ``configs/`` folder (``MMCST_CONFIG_DIR`` overrides it)."""
    env = os.environ.get("MMCST_CONFIG_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "configs"
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"configs folder not found at {candidate}; run from a source checkout or set MMCST_CONFIG_DIR")
    return candidate


def demo_config(method: str, out: Path, budget: DemoBudget, seed: int = 0) -> Config:
    path = config_dir() / "demo" / f"{method}.yaml"
    overrides = [
        f"name={method}",
        f"out_dir={out / 'runs'}",
        f"seed={seed}",
        f"data.root={out / 'data'}",
        f"data.synthetic_train={budget.n_train}",
        f"data.synthetic_val={budget.n_val}",
        f"data.synthetic_size={budget.size}",
        f"train.time_budget_s={budget.train_seconds}",
    ]
    return load_config(path, overrides)


def demo_notes(method: str) -> list[str]:
    """The ``demo_notes`` list of a demo config: each switch that differs from the paper's config, and why."""
    raw = yaml.safe_load((config_dir() / "demo" / f"{method}.yaml").read_text()) or {}
    return [str(n) for n in raw.get("demo_notes", [])]


def run_demo(out: str | Path = "demo_out", quick: bool = False, methods: Optional[list[str]] = None,
             progress: bool = True, seed: int = 0) -> Path:
    from mmcst.data.base import build_dataset
    from mmcst.engine.evaluate import evaluate_maps
    from mmcst.engine.infer import infer
    from mmcst.engine.train import train
    from mmcst.reference import REFERENCES, write_reference_maps
    from mmcst.report import chance_map, write_demo_report

    out = Path(out)
    budget = QUICK if quick else FULL
    methods = list(methods or DEMO_METHODS)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown demo method(s) {unknown}; expected some of {list(DEMO_METHODS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.time()

    t0 = time.time()
    val = build_dataset("synthetic", out / "data", "val", n_train=budget.n_train, n_val=budget.n_val,
                        size=budget.size, seed=seed)
    data_seconds = time.time() - t0
    log.info("dataset ready in %.1f s: %s (%d val images)", data_seconds, val.root, len(val))

    eval_cfg = demo_config(methods[0] if methods else "mmcst", out, budget, seed).eval
    results: dict[str, Any] = {"references": {}, "methods": {}}
    for kind in REFERENCES:
        maps_dir = write_reference_maps(val, out / "references" / kind / "maps" / "val", kind, progress=progress)
        result = evaluate_maps(maps_dir, val, eval_cfg, out=out / "references" / kind / "eval" / "val.json",
                               progress=progress)
        results["references"][kind] = {"result": result, "maps_dir": str(maps_dir)}
        log.info("reference %s: best mIoU %.1f", kind, result["best"]["miou"])

    for method in methods:
        cfg = demo_config(method, out, budget, seed)
        run_dir = Path(cfg.out_dir) / cfg.name
        if run_dir.exists():
            # The demo owns <out>/runs: each demo run trains afresh instead of resuming an older budget.
            log.info("removing the previous demo run %s", run_dir)
            shutil.rmtree(run_dir)
        t0 = time.time()
        run_dir = train(cfg, resume=False, progress=progress)
        train_seconds = time.time() - t0
        t0 = time.time()
        result = infer(run_dir, "val", evaluate=True, pseudo_labels=True, progress=progress)
        infer_seconds = time.time() - t0
        summary = _read_json(run_dir / "summary.json")
        results["methods"][method] = {
            "result": result, "run_dir": str(run_dir), "maps_dir": str(run_dir / "maps" / "val"),
            "pseudo_dir": str(run_dir / "pseudo_labels" / "val"),
            "train_seconds": train_seconds, "infer_seconds": infer_seconds, "train_summary": summary,
            "notes": demo_notes(method), "config": _config_digest(cfg),
        }
        log.info("%s: best mIoU %.1f (train %.0f s, maps %.0f s)", method, result["best"]["miou"],
                 train_seconds, infer_seconds)

    meta = {"quick": quick, "budget": budget.__dict__, "seed": seed, "data_seconds": data_seconds,
            "total_seconds": time.time() - started, "dataset_root": str(val.root),
            "class_names": list(val.class_names), "chance_val_map": chance_map(val.label_matrix())}
    report = write_demo_report(out, val, results, meta)
    summary = _json_summary(results, meta)
    atomic_write_json(out / "report.json", summary)
    log.info(summary["verdict"])
    return report


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _config_digest(cfg: Config) -> dict[str, Any]:
    bb = cfg.model.backbone
    return {"method": cfg.model.name, "backbone": bb.name, "patch_size": bb.patch_size, "embed_dim": bb.embed_dim,
            "depth": bb.depth, "input": cfg.data.image_size, "scales": list(cfg.infer.scales),
            "flip": cfg.infer.flip, "refine": cfg.infer.refine, "prior": cfg.model.prior.kind}


def _json_summary(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    from mmcst.report import demo_verdict

    def row(result: dict[str, Any]) -> dict[str, Any]:
        return {"best_threshold": result["best"]["threshold"], "best_miou": result["best"]["miou"],
                "mctformer_threshold": result["mctformer_protocol"]["threshold"],
                "mctformer_miou": result["mctformer_protocol"]["miou"],
                "per_class_iou": result["best"].get("per_class_iou")}
    return {
        "meta": meta,
        "references": {k: row(v["result"]) for k, v in results["references"].items()},
        "methods": {k: {**row(v["result"]), "train_seconds": v["train_seconds"], "infer_seconds": v["infer_seconds"],
                        "config": v["config"], "notes": v["notes"]}
                    for k, v in results["methods"].items()},
        "random_init": True,
        "verdict": demo_verdict(results, meta.get("chance_val_map")),
    }
