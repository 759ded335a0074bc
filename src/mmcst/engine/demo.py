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

from mmcst.config import Config, flatten, load_config
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


FULL = DemoBudget(n_train=2000, n_val=300, size=224, train_seconds=80.0, eval_images=None)
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


def demo_config(method: str, out: Path, budget: DemoBudget, seed: int = 0, data_seed: int = 0) -> Config:
    path = config_dir() / "demo" / f"{method}.yaml"
    overrides = [
        f"name={method}",
        f"out_dir={out / 'runs'}",
        f"seed={seed}",
        f"data.synthetic_seed={data_seed}",
        f"data.root={data_root(out, data_seed)}",
        f"data.synthetic_train={budget.n_train}",
        f"data.synthetic_val={budget.n_val}",
        f"data.synthetic_size={budget.size}",
        f"train.time_budget_s={budget.train_seconds}",
    ]
    return load_config(path, overrides)


def data_root(out: Path, data_seed: int = 0) -> Path:
    """The demo's dataset folder: ``OUT/data`` for the shipped data (seed 0), ``OUT/data_seed<N>`` otherwise."""
    return out / "data" if data_seed == 0 else out / f"data_seed{data_seed}"


def demo_notes(method: str) -> list[str]:
    """The ``demo_notes`` list of a demo config: each switch that differs from the paper's config, and why."""
    raw = yaml.safe_load((config_dir() / "demo" / f"{method}.yaml").read_text()) or {}
    return [str(n) for n in raw.get("demo_notes", [])]


def run_demo(out: str | Path = "demo_out", quick: bool = False, methods: Optional[list[str]] = None,
             progress: bool = True, seed: int = 0, wsss: bool = True, data_seed: int = 0) -> Path:
    from mmcst.data.base import build_dataset
    from mmcst.engine.evaluate import evaluate_maps
    from mmcst.engine.infer import infer
    from mmcst.engine.train import train
    from mmcst.reference import REFERENCES, write_reference_maps
    from mmcst.metrics.classification import chance_map
    from mmcst.report import demo_summary

    out = Path(out)
    budget = QUICK if quick else FULL
    methods = list(methods or DEMO_METHODS)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown demo method(s) {unknown}; expected some of {list(DEMO_METHODS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.time()

    t0 = time.time()
    val = build_dataset("synthetic", data_root(out, data_seed), "val", n_train=budget.n_train, n_val=budget.n_val,
                        size=budget.size, seed=data_seed)
    data_seconds = time.time() - t0
    log.info("dataset ready in %.1f s: %s (%d val images)", data_seconds, val.root, len(val))

    eval_cfg = demo_config(methods[0] if methods else "mmcst", out, budget, seed, data_seed).eval
    results: dict[str, Any] = {"references": {}, "methods": {}}
    for kind in REFERENCES:
        maps_dir = write_reference_maps(val, out / "references" / kind / "maps" / "val", kind, progress=progress)
        result = evaluate_maps(maps_dir, val, eval_cfg, out=out / "references" / kind / "eval" / "val.json",
                               progress=progress)
        results["references"][kind] = {"result": result, "maps_dir": str(maps_dir)}
        log.info("reference %s: best mIoU %.1f", kind, result["best"]["miou"])

    for method in methods:
        cfg = demo_config(method, out, budget, seed, data_seed)
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

    if wsss and results["methods"]:
        results["wsss"] = _wsss_stage(out, results, budget, quick, seed, data_seed, progress)

    meta = {"quick": quick, "budget": budget.__dict__, "seed": seed, "data_seed": data_seed,
            "data_seconds": data_seconds,
            "total_seconds": time.time() - started, "dataset_root": str(val.root),
            "class_names": list(val.class_names), "chance_val_map": chance_map(val.label_matrix())}
    summary = demo_summary(results, meta)
    atomic_write_json(out / "report.json", summary)
    report = _write_report(out, val, summary)  # rendered from report.json's content only
    log.info(summary["verdict"])
    return report


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _config_digest(cfg: Config) -> dict[str, Any]:
    bb = cfg.model.backbone
    return {"method": cfg.model.name, "backbone": bb.name, "patch_size": bb.patch_size, "embed_dim": bb.embed_dim,
            "depth": bb.depth, "input": cfg.data.image_size, "scales": list(cfg.infer.scales),
            "flip": cfg.infer.flip, "refine": cfg.infer.refine, "prior": cfg.model.prior.kind}


# --------------------------------------------------------------------------------------------------
# the WSSS stage: the best localization method through AffinityNet and a segmentation network


@dataclass(frozen=True)
class WSSSBudget:
    train_images: int  # the first N train images: the pseudo masks AffinityNet and the segmenter train on
    affinity_seconds: float  # AffinityNet training (wsss.affinity.time_budget_s)
    seg_seconds: float  # segmenter training (wsss.seg.time_budget_s)


# Measured costs are in the README (demo); the rest of the stage is maps, labels, the walk and inference.
WSSS_FULL = WSSSBudget(train_images=100, affinity_seconds=22.0, seg_seconds=36.0)
WSSS_QUICK = WSSSBudget(train_images=32, affinity_seconds=3.0, seg_seconds=5.0)
WSSS_SPLIT = "wsss_train"  # split file of the training subset, written beside the dataset's own


def wsss_overrides(path: Path) -> list[str]:
    """``key=value`` overrides from the ``wsss`` section of a YAML file (the rest of the file is documentation)."""
    raw = yaml.safe_load(path.read_text()) or {}
    return [f"{key}={json.dumps(value)}" for key, value in flatten(raw.get("wsss") or {}, "wsss").items()]


def _wsss_stage(out: Path, results: dict[str, Any], budget: DemoBudget, quick: bool, seed: int, data_seed: int,
                progress: bool) -> dict[str, Any]:
    """Carry the method with the best validation mIoU through the pipeline's WSSS stages (``mmcst pipeline``):
    maps, pseudo-labels and confident labels of the first train images, AffinityNet, random-walk masks, the
    segmentation network on them; seeds, refined masks and predictions scored on the validation split."""
    from omegaconf import OmegaConf

    from mmcst.config import from_dict
    from mmcst.data.base import build_dataset
    from mmcst.engine.pipeline import run_pipeline
    from mmcst.io import atomic_write_text

    wsss_budget = WSSS_QUICK if quick else WSSS_FULL
    scores = {name: info["result"]["best"]["miou"] for name, info in results["methods"].items()}
    method = max(scores, key=lambda name: scores[name])
    train_split = build_dataset("synthetic", data_root(out, data_seed), "train", n_train=budget.n_train,
                                n_val=budget.n_val, size=budget.size, seed=data_seed)
    ids = list(train_split.ids)[:wsss_budget.train_images]
    atomic_write_text(Path(train_split.root) / "ImageSets" / "Segmentation" / f"{WSSS_SPLIT}.txt",
                      "".join(f"{i}\n" for i in ids))
    # The winner's own demo config (the pipeline adopts its training run), with the WSSS settings.
    overrides = wsss_overrides(config_dir() / "demo" / "wsss.yaml") + [
        f"wsss.affinity.train_split={WSSS_SPLIT}", f"wsss.seg.train_split={WSSS_SPLIT}", "wsss.seg.eval_split=val",
        f"wsss.affinity.time_budget_s={wsss_budget.affinity_seconds}",
        f"wsss.seg.time_budget_s={wsss_budget.seg_seconds}"]
    init = _classifier_init(out, results)
    if init is not None:
        overrides += [f"wsss.affinity.weights={init}", f"wsss.seg.weights={init}"]
    else:
        log.warning("WSSS stage: no CAM run in this demo (--methods), so AffinityNet and the segmenter start from "
                    "random weights and learn far less in their budget")
    base = OmegaConf.structured(demo_config(method, out, budget, seed, data_seed))
    cfg = from_dict(OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))))
    log.info("WSSS stage: %s (best validation mIoU %.1f) through AffinityNet and the segmenter, trained on the first "
             "%d train images", method, scores[method], len(ids))
    started = time.time()
    summary = run_pipeline(cfg, progress=progress, echo=log.info, report=False)
    return {"method": method, "method_miou": scores[method], "train_images": len(ids), "init": init,
            "budget": wsss_budget.__dict__, "seconds": time.time() - started, "notes": demo_notes("wsss"),
            "pipeline": summary}


def _classifier_init(out: Path, results: dict[str, Any]) -> Optional[str]:
    """The demo's CAM classifier (ResNet trunk) as the starting weights of AffinityNet and the segmenter, as PSA
    starts AffinityNet from its trained classifier ``res38_cls.pth``; None without a CAM run in this demo."""
    from mmcst.engine.importer import export_backbone

    cam = results["methods"].get("cam")
    if cam is None:
        return None
    info = export_backbone(cam["run_dir"], out / "wsss_init" / "cam_trunk.pth")
    log.info("WSSS stage: AffinityNet and the segmenter start from the demo's CAM classifier (%s, step %s)",
             info["backbone"], info["step"])
    return info["path"]


def _write_report(out: Path, val: Any, summary: dict[str, Any]) -> Path:
    """``report.md`` and ``report.html`` of the demo: the report module's sections, and the WSSS stage's
    (:func:`mmcst.engine.pipeline.wsss_sections`) before the setup."""
    from dataclasses import replace

    from mmcst.report import Prose, demo_report, write_report

    report = demo_report(summary, val)
    if "wsss" in summary:
        from mmcst.engine.pipeline import wsss_sections

        wsss = summary["wsss"]
        intro = Prose(wsss_intro(wsss))
        section, = wsss_sections(wsss["pipeline"], {"val": val}, key="wsss", json_path=("wsss", "pipeline"))
        section = replace(section, title="WSSS: seeds, refined masks, segmentation (%)",
                          blocks=(intro, *section.blocks))
        sections = list(report.sections)
        at = next((i for i, s in enumerate(sections) if s.title == "Setup"), len(sections))
        report = replace(report, sections=tuple(sections[:at]) + (section,) + tuple(sections[at:]))
    write_report(report, html_path=out / "report.html", markdown_path=out / "report.md")
    return out / "report.md"


def wsss_intro(wsss: dict[str, Any]) -> str:
    """What the three WSSS numbers of the demo are, in words."""
    pipeline = wsss["pipeline"]
    budget = wsss["budget"]
    notes = "\n".join(f"- {note}" for note in wsss["notes"])
    start = ("both start from the trunk of the demo's CAM classifier (trained on the same image labels), as PSA "
             "starts AffinityNet from its trained classifier" if wsss.get("init") else
             "both from random weights (no CAM run in this demo)")
    return (
        f"The method with the best validation mIoU, **{wsss['method']}** ({wsss['method_miou']:.1f}), carried "
        f"through the WSSS stages of `mmcst pipeline`. All three numbers are on the same "
        f"{pipeline['seg']['images']} validation images. *Seeds*: its validation maps, pseudo-mask = "
        f"argmax over [background at t, the maps of the image's classes], at the best t of the sweep "
        f"({pipeline['seed']['threshold']:.2f}): the number of the table above. *Refined masks*: the random walk of "
        f"those seeds (background plane at the same t) on the affinities of an AffinityNet trained "
        f"{budget['affinity_seconds']:.0f} s on the confident labels of the first {wsss['train_images']} train "
        f"images; like the seeds, they use the image-level labels of each validation image. *Segmentation*: "
        f"a DeepLab network trained {budget['seg_seconds']:.0f} s on the refined masks of those train images, "
        f"predicting the validation images from pixels alone (no image labels). AffinityNet and the segmenter: "
        f"{start}. WSSS stage: {wsss['seconds']:.0f} s.\n\n{wsss_outcome(pipeline)}\n\nWhere it differs from "
        f"the paper's recipe, and why:\n\n{notes}")


def wsss_outcome(pipeline: dict[str, Any]) -> str:
    """One honest sentence on what the refinement and the segmenter did in this run."""
    seed, refined, seg = (pipeline[key]["miou"] for key in ("seed", "refined", "seg"))
    if None in (seed, refined, seg):
        return "A stage produced no score in this run."
    change = "raised" if refined > seed else "lowered"
    return (f"Here the random walk {change} the seeds' mIoU from {seed:.1f} to {refined:.1f}, and the segmenter "
            f"reached {seg:.1f} without the image labels."
            + (" With under a minute of training on the first train images the segmenter stays well below the masks it "
               "learns from; the paper's stage starts from ImageNet-trained ResNet-38 weights and trains for hours "
               "on 10,582 images." if seg < refined - 5 else ""))