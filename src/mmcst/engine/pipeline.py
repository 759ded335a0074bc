"""``mmcst pipeline``: the whole weakly supervised segmentation method in one run directory.

Stages, in order (METHOD.md 4.1-4.5), each a call of an engine function:

1. ``train`` — the localization method (``mmcst train``);
2. ``seed_maps`` — its maps of the seed split (``mmcst infer``), and of the seed-evaluation split when
   that split is not part of the seed split;
3. ``seed_eval`` — the maps' threshold curve on the seed-evaluation split (``eval/<split>.json``);
4. ``pseudo_labels`` — seed pseudo-masks at the background threshold (``pseudo_labels/<split>/``);
5. ``affinity_labels`` — confident labels for AffinityNet (``affinity/labels/<split>/``);
6. ``affinity_train`` — AffinityNet (``affinity/``);
7. ``refined_masks`` — random-walk masks (``refined/<split>/``) and their evaluation
   (``eval/refined_<split>.json``);
8. ``seg_train`` — the segmentation network on the refined masks (``seg/``);
9. ``seg_eval`` — its predictions and their evaluation on the segmentation split (``eval/seg_<split>.json``).

Every stage writes ``stages/<stage>.json`` when it completes (atomically): the config values it depends on,
the identities of its inputs (checkpoint size and modification time, a manifest of each input folder:
file count, bytes, and a hash of names, sizes and modification times), the records of the stages it reads
from, and a manifest of its outputs. A rerun skips a stage whose record still matches; otherwise it redoes
it, and with it every stage that reads its outputs (their records name it). A stage killed half-way left a
``stages/<stage>.started.json`` with the same settings: the rerun resumes it (training from
``last.pth``, maps and labels by keeping the valid files); with other settings it starts the stage afresh
(a training stage removes its checkpoint first; the other stages' functions discard files made with other
settings or inputs themselves). ``pipeline.json`` sums it up (the three mIoUs, per-stage times, what was
skipped) and ``report/pipeline.{md,html}`` shows it.

The pipeline knows no method: stages call the engine's functions with the run directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from mmcst.config import Config, flatten
from mmcst.engine.builders import Builders, dataset_from_config
from mmcst.engine.rundir import run_directory, write_config
from mmcst.io import atomic_write_json

RECORD_VERSION = 1
STAGES_DIR = "stages"

# Config fields that change no stage's outputs: where things go, how fast and how verbosely they run
# (infer.max_images: the pipeline refuses it, its stages need maps of whole splits).
INERT_KEYS = (
    "name", "out_dir", "device", "data.num_workers", "train.log_every", "train.checkpoint_every",
    "train.keep_epoch_checkpoints", "train.compile", "infer.batch_size", "infer.max_images",
    "wsss.affinity.log_every", "wsss.affinity.checkpoint_every", "wsss.seg.log_every", "wsss.seg.checkpoint_every",
    "wsss.seg.channels_last",
)


# --------------------------------------------------------------------------------------------------
# identities of inputs and outputs


def file_identity(path: Path) -> Optional[dict[str, int]]:
    """Size and modification time of a file (None when it does not exist)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_manifest(path: Path) -> Optional[dict[str, Any]]:
    """File count, total bytes and a hash of (relative name, size, mtime) of every file below ``path``.

    None when the folder does not exist. Only ``stat`` calls: cheap enough for 10,000s of files.
    """
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    count = total = 0
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            stat = full.stat()
            entries.append((full.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    for name, size, mtime in sorted(entries):
        digest.update(f"{name}\t{size}\t{mtime}\n".encode())
        count += 1
        total += size
    return {"files": count, "bytes": total, "sha256": digest.hexdigest()}


def path_identity(path: Path) -> Optional[dict[str, Any]]:
    """:func:`folder_manifest` of a folder, :func:`file_identity` of a file, None when absent."""
    return folder_manifest(path) if path.is_dir() else file_identity(path)


def flat_config(cfg: Config) -> dict[str, Any]:
    """Every field of ``cfg`` by its dotted name."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def config_values(cfg: Config, keys: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The values of dotted ``keys`` of ``cfg``, flattened: a section gives all its fields but those in
    ``exclude`` and :data:`INERT_KEYS`; a field named exactly is always included."""
    flat = flat_config(cfg)
    values: dict[str, Any] = {}
    for key in keys:
        if key in flat:
            values[key] = flat[key]
            continue
        found = {k: v for k, v in flat.items() if k.startswith(key + ".") and k not in exclude and k not in INERT_KEYS}
        if not found:
            raise KeyError(f"pipeline: config has no key {key!r}")
        values.update(found)
    return dict(sorted(values.items()))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# stages


@dataclass
class Context:
    """What every stage gets: the config, the run directory and the splits the pipeline works on."""

    cfg: Config
    run_dir: Path
    builders: Builders
    progress: bool
    affinity_split: str  # confident labels and AffinityNet training (wsss.affinity.train_split)
    seed_split: str  # refined masks the segmenter trains on (wsss.seg.train_split)
    seed_eval_split: str  # where seeds and refined masks are scored (data.eval_split)
    seg_eval_split: str  # where the segmenter is scored (wsss.seg.eval_split)
    extra_split: Optional[str]  # seed_eval_split when no other map split holds its images (its maps are made too)
    eval_maps_split: str  # the map split that holds seed_eval_split's images

    @property
    def map_splits(self) -> list[str]:
        splits = list(dict.fromkeys([self.affinity_split, self.seed_split]))
        return splits + ([self.extra_split] if self.extra_split else [])

    @property
    def refined_splits(self) -> list[str]:
        return [self.seed_split] + ([self.extra_split] if self.extra_split else [])

    def maps_of(self, split: str) -> Path:
        """The maps folder holding ``split``'s images."""
        return self.run_dir / "maps" / (self.eval_maps_split if split == self.seed_eval_split else split)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``keys``: config values its outputs depend on; ``upstream``: stages whose outputs it reads;
    ``inputs``: identities of the files it reads; ``outputs``: paths (relative to the run directory) it
    writes; ``run(ctx, resume)``: does the work, returns a JSON-able result;
    ``adopt``: whether outputs made outside the pipeline stand as this stage's: ``"complete"``, ``"partial"``
    (resume them) or None (none there).
    """

    name: str
    title: str
    keys: Callable[[Context], Sequence[str]]
    upstream: tuple[str, ...]
    inputs: Callable[[Context], dict[str, Any]]
    outputs: Callable[[Context], list[str]]
    run: Callable[[Context, bool], dict[str, Any]]
    adopt: Optional[Callable[[Context], Optional[str]]] = None
    exclude: tuple[str, ...] = ()  # fields of the ``keys`` sections that do not count
    # Remove the outputs before a fresh start. Trainings need it (a checkpoint there would be resumed); the other
    # stages' engine functions keep only files made with their current settings and inputs themselves.
    clear: bool = False


def _flag_overrides(cfg: Config) -> list[str]:
    """``key=value`` overrides that hand the pipeline's current WSSS settings to the stage functions (which read
    the run's ``config.yaml`` or a stage checkpoint's stored config otherwise)."""
    flat = flat_config(cfg)
    keys = [k for k in flat if k.startswith("wsss.")] + ["seed", "device", "data.num_workers", "data.skip_bad"]
    return [f"{key}={json.dumps(flat[key])}" for key in keys]


def _seed_threshold(ctx: Context) -> float:
    """Background plane of the seed pseudo-labels: ``wsss.affinity.bg_threshold`` when set (the random walk's
    plane), else the best threshold of the seed evaluation (METHOD.md 4.3), else MCTformer's 0.39."""
    from mmcst.engine.infer import DEFAULT_BG_THRESHOLD

    if ctx.cfg.wsss.affinity.bg_threshold is not None:
        return float(ctx.cfg.wsss.affinity.bg_threshold)
    best = _read_json(ctx.run_dir / "eval" / f"{ctx.seed_eval_split}.json").get("best") or {}
    return float(best["threshold"]) if best.get("threshold") is not None else DEFAULT_BG_THRESHOLD


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of an evaluation result a stage record keeps."""
    best = result.get("best") or {}
    out = {"miou": best.get("miou"), "threshold": best.get("threshold"),
           "images": (result.get("protocol") or {}).get("num_images")}
    if "mctformer_protocol" in result:
        out["mctformer_miou"] = result["mctformer_protocol"].get("miou")
    return out


# The stages' work: each a call of the engine function that the matching command runs.

def _run_train(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.train import train

    train(ctx.cfg, resume=resume, progress=ctx.progress, builders=ctx.builders)
    summary = _read_json(ctx.run_dir / "summary.json")
    return {k: summary.get(k) for k in ("steps", "stopped_by", "time_s", "val_map")}


def _run_maps(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.infer import infer

    infer_cfg = ctx.cfg.infer
    counts = {}
    for split in ctx.map_splits:
        infer(ctx.run_dir, split, scales=infer_cfg.scales, flip=infer_cfg.flip, refine=infer_cfg.refine,
              evaluate=False, progress=ctx.progress, precision=infer_cfg.precision, device=ctx.cfg.device,
              builders=ctx.builders)
        counts[split] = len(list((ctx.run_dir / "maps" / split).glob("*.npy")))
    return {"maps": counts}


def _run_seed_eval(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.evaluate import evaluate_maps

    dataset = dataset_from_config(ctx.cfg, ctx.seed_eval_split, ctx.builders)
    result = evaluate_maps(ctx.maps_of(ctx.seed_eval_split), dataset, ctx.cfg.eval,
                           out=ctx.run_dir / "eval" / f"{ctx.seed_eval_split}.json", progress=ctx.progress)
    return _scores(result)


def _run_pseudo_labels(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.infer import infer

    threshold = _seed_threshold(ctx)
    infer_cfg = ctx.cfg.infer
    for split in ctx.map_splits:
        infer(ctx.run_dir, split, scales=infer_cfg.scales, flip=infer_cfg.flip, refine=infer_cfg.refine,
              pseudo_labels=True, bg_threshold=threshold, evaluate=False, progress=ctx.progress,
              precision=infer_cfg.precision, device=ctx.cfg.device, builders=ctx.builders)
    return {"bg_threshold": threshold}


def _run_affinity_labels(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.affinity import make_affinity_labels

    folder = make_affinity_labels(ctx.run_dir, ctx.affinity_split, overrides=_flag_overrides(ctx.cfg),
                                  progress=ctx.progress, builders=ctx.builders)
    settings = _read_json(folder / "settings.json")
    return {"method": settings.get("method"), "images": len(list(folder.glob("*.png")))}


def _run_affinity_train(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.affinity import train_affinity

    stage_dir = train_affinity(ctx.run_dir, _flag_overrides(ctx.cfg), resume=resume, progress=ctx.progress,
                               builders=ctx.builders)
    summary = _read_json(stage_dir / "summary.json")
    return {k: summary.get(k) for k in ("steps", "stopped_by", "time_s", "final_losses")}


def _run_refined(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.affinity import refine_masks, refined_dir
    from mmcst.engine.evaluate import evaluate_maps

    overrides = _flag_overrides(ctx.cfg)
    walk = refine_masks(ctx.run_dir, ctx.seed_split, evaluate=False, overrides=overrides, progress=ctx.progress,
                        builders=ctx.builders)
    if ctx.extra_split:  # the evaluation split has images of its own: walk them too
        result = refine_masks(ctx.run_dir, ctx.extra_split, evaluate=True, overrides=overrides,
                              progress=ctx.progress, builders=ctx.builders)
    else:  # its images are among the seed split's: score those masks
        dataset = dataset_from_config(ctx.cfg, ctx.seed_eval_split, ctx.builders)
        result = evaluate_maps(refined_dir(ctx.run_dir, ctx.seed_split), dataset, ctx.cfg.eval,
                               out=ctx.run_dir / "eval" / f"refined_{ctx.seed_eval_split}.json", map_format="png",
                               progress=ctx.progress)
    counts = {k: walk["refine"][k] for k in ("written", "reused")}
    return {**_scores(result), "background": walk["refine"]["background"], "seed_split_images": counts}


def _run_seg_train(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.seg import train_segmenter

    stage_dir = train_segmenter(ctx.run_dir, "refined", _flag_overrides(ctx.cfg), resume=resume,
                                progress=ctx.progress, builders=ctx.builders)
    summary = _read_json(stage_dir / "summary.json")
    return {k: summary.get(k) for k in ("steps", "stopped_by", "time_s", "final_losses")}


def _run_seg_eval(ctx: Context, resume: bool) -> dict[str, Any]:
    from mmcst.engine.seg import evaluate_segmenter, infer_segmenter

    overrides = _flag_overrides(ctx.cfg)
    infer_segmenter(ctx.run_dir, ctx.seg_eval_split, overrides=overrides, progress=ctx.progress,
                    builders=ctx.builders)
    result = evaluate_segmenter(ctx.run_dir, ctx.seg_eval_split, overrides=overrides, progress=ctx.progress,
                                builders=ctx.builders)
    return _scores(result)


def _adopt_training(ctx: Context) -> Optional[str]:
    """A run trained by ``mmcst train`` before the pipeline saw it: ``"complete"`` (its summary is written) or
    ``"partial"`` (to resume) when its checkpoint holds the pipeline's training settings; an error otherwise
    (the pipeline never removes training it did not start)."""
    from mmcst.engine.train import config_from_checkpoint, load_checkpoint

    path = ctx.run_dir / "checkpoints" / "last.pth"
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    stored = config_values(config_from_checkpoint(checkpoint, path), TRAIN_KEYS, TRAIN_EXCLUDE)
    current = config_values(ctx.cfg, TRAIN_KEYS, TRAIN_EXCLUDE)
    changed = sorted(k for k in current if stored.get(k) != current[k])
    if changed:
        raise ValueError(f"{ctx.run_dir}: holds a training run made outside the pipeline with other settings "
                         f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); choose another name= or "
                         "remove the run directory")
    summary = _read_json(ctx.run_dir / "summary.json")
    return "complete" if summary.get("steps") == checkpoint.get("step") else "partial"


# --------------------------------------------------------------------------------------------------
# the stage table

TRAIN_KEYS = ("seed", "data", "model", "train")
TRAIN_EXCLUDE = ("data.eval_split",)  # where maps are scored: the evaluation stages name it
AFFINITY_LABEL_KEYS = tuple(f"wsss.affinity.{k}" for k in ("label_method", "alpha_fg", "alpha_bg", "train_split"))
AFFINITY_TRAIN_KEYS = tuple(f"wsss.affinity.{k}" for k in (
    "train_split", "backbone", "weights", "width", "freeze_bn", "frozen_layers", "radius", "crop", "resize_long",
    "color_jitter", "batch_size", "epochs", "max_steps", "lr", "weight_decay", "momentum", "poly_power",
    "psa_optimizer_quirk", "amp", "time_budget_s"))
WALK_KEYS = tuple(f"wsss.affinity.{k}" for k in ("beta", "logt", "walk_method", "bg_threshold", "bg_alpha"))
SEG_TRAIN_KEYS = tuple(f"wsss.seg.{k}" for k in (
    "model", "backbone", "weights", "width", "freeze_bn", "frozen_layers", "train_split", "crop", "scale_range",
    "batch_size", "epochs", "max_steps", "lr", "weight_decay", "momentum", "poly_power", "psa_optimizer_quirk", "amp",
    "time_budget_s"))
SEG_INFER_KEYS = tuple(f"wsss.seg.{k}" for k in ("scales", "flip", "fusion", "crf", "eval_split"))
SPLIT_KEYS = ("wsss.affinity.train_split", "wsss.seg.train_split", "data.eval_split")


def _maps_dirs(ctx: Context) -> list[str]:
    return [f"maps/{split}" for split in ctx.map_splits]


def _manifests(ctx: Context, paths: Sequence[str]) -> dict[str, Any]:
    return {p: path_identity(ctx.run_dir / p) for p in paths}


STAGES: tuple[Stage, ...] = (
    Stage("train", "training", keys=lambda ctx: TRAIN_KEYS, upstream=(),
          inputs=lambda ctx: {}, outputs=lambda ctx: ["checkpoints", "summary.json"], run=_run_train,
          adopt=_adopt_training, exclude=TRAIN_EXCLUDE, clear=True),
    Stage("seed_maps", "localization maps", keys=lambda ctx: ("infer",) + SPLIT_KEYS, upstream=("train",),
          inputs=lambda ctx: _manifests(ctx, ["checkpoints/last.pth"]), outputs=_maps_dirs, run=_run_maps),
    Stage("seed_eval", "seed evaluation", keys=lambda ctx: ("eval", "data.eval_split"), upstream=("seed_maps",),
          inputs=lambda ctx: _manifests(ctx, _maps_dirs(ctx)),
          outputs=lambda ctx: [f"eval/{ctx.seed_eval_split}.json"], run=_run_seed_eval),
    Stage("pseudo_labels", "seed pseudo-labels", keys=lambda ctx: ("wsss.affinity.bg_threshold",),
          upstream=("seed_maps", "seed_eval"),
          inputs=lambda ctx: _manifests(ctx, _maps_dirs(ctx) + [f"eval/{ctx.seed_eval_split}.json"]),
          outputs=lambda ctx: [f"pseudo_labels/{split}" for split in ctx.map_splits], run=_run_pseudo_labels),
    Stage("affinity_labels", "affinity labels", keys=lambda ctx: AFFINITY_LABEL_KEYS, upstream=("seed_maps",),
          inputs=lambda ctx: _manifests(ctx, [f"maps/{ctx.affinity_split}"]),
          outputs=lambda ctx: [f"affinity/labels/{ctx.affinity_split}"], run=_run_affinity_labels),
    Stage("affinity_train", "AffinityNet training", keys=lambda ctx: AFFINITY_TRAIN_KEYS,
          upstream=("affinity_labels",),
          inputs=lambda ctx: _manifests(ctx, [f"affinity/labels/{ctx.affinity_split}"]),
          outputs=lambda ctx: ["affinity/checkpoints", "affinity/summary.json"], run=_run_affinity_train,
          clear=True),
    Stage("refined_masks", "refined masks", keys=lambda ctx: WALK_KEYS + SPLIT_KEYS,
          upstream=("seed_maps", "seed_eval", "affinity_train"),
          inputs=lambda ctx: _manifests(ctx, _maps_dirs(ctx) + ["affinity/checkpoints/last.pth",
                                                                f"eval/{ctx.seed_eval_split}.json"]),
          outputs=lambda ctx: [f"refined/{split}" for split in ctx.refined_splits] +
          [f"eval/refined_{ctx.seed_eval_split}.json"], run=_run_refined),
    Stage("seg_train", "segmentation training", keys=lambda ctx: SEG_TRAIN_KEYS, upstream=("refined_masks",),
          inputs=lambda ctx: _manifests(ctx, [f"refined/{ctx.seed_split}"]),
          outputs=lambda ctx: ["seg/checkpoints", "seg/summary.json"], run=_run_seg_train, clear=True),
    Stage("seg_eval", "segmentation inference and evaluation", keys=lambda ctx: SEG_INFER_KEYS,
          upstream=("seg_train",), inputs=lambda ctx: _manifests(ctx, ["seg/checkpoints/last.pth"]),
          outputs=lambda ctx: [f"seg/predictions/{ctx.seg_eval_split}", f"eval/seg_{ctx.seg_eval_split}.json"],
          run=_run_seg_eval),
)


# --------------------------------------------------------------------------------------------------
# records


def _record_path(run_dir: Path, name: str, started: bool = False) -> Path:
    return run_dir / STAGES_DIR / f"{name}{'.started' if started else ''}.json"


def stage_identity(stage: Stage, ctx: Context, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a stage's outputs are a function of: its settings, its inputs' identities, its upstream records."""
    return {"version": RECORD_VERSION,
            "settings": config_values(ctx.cfg, stage.keys(ctx), stage.exclude),
            "inputs": stage.inputs(ctx),
            "upstream": {name: _digest(records[name]) for name in stage.upstream}}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _why_redo(stage: Stage, ctx: Context, record: Optional[dict[str, Any]], identity: dict[str, Any]) -> Optional[str]:
    """None when ``record`` still stands for the stage's outputs, else the reason to redo it."""
    if record is None:
        return "no record"
    old = record.get("identity") or {}
    if old.get("version") != identity["version"]:
        return "record of another mmcst version"
    for part, label in (("settings", "settings changed"), ("upstream", "redone before it"),
                        ("inputs", "inputs changed")):
        changed = _differences(old.get(part) or {}, identity[part])
        if part == "settings":
            changed = [k for k in changed if not _schema_change(k, old.get(part) or {}, identity[part])]
        if changed:
            return f"{label}: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}"
    outputs = _manifests(ctx, stage.outputs(ctx))
    changed = _differences(record.get("outputs") or {}, outputs)
    if changed:
        return f"outputs changed since: {', '.join(changed[:4])}"
    return None


def _schema_change(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A field added to the config schema since the record, at its default (which keeps the old behaviour), or
    a field the schema no longer has: neither is a changed setting."""
    if key not in old:
        return new[key] == _schema_defaults().get(key, object())
    return key not in new and key not in _schema_defaults()


def _schema_defaults() -> dict[str, Any]:
    return flat_config(Config())


def _clear(ctx: Context, paths: Sequence[str]) -> None:
    for relative in paths:
        path = ctx.run_dir / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (data-loader workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------------------------------
# the pipeline


def _split_ids(cfg: Config, split: str, builders: Builders) -> set[str]:
    return {str(i) for i in dataset_from_config(cfg, split, builders).ids}


def make_context(cfg: Config, builders: Optional[Builders] = None, progress: bool = True) -> Context:
    """The pipeline's splits for ``cfg``: which maps it makes and where it scores them."""
    builders = builders or Builders()
    affinity_split = cfg.wsss.affinity.train_split or cfg.data.train_split
    seed_split = cfg.wsss.seg.train_split or cfg.data.train_split
    eval_split = cfg.data.eval_split
    if eval_split in (affinity_split, seed_split):
        holder = eval_split
    else:
        wanted = _split_ids(cfg, eval_split, builders)
        holder = next((s for s in dict.fromkeys([seed_split, affinity_split])
                       if wanted <= _split_ids(cfg, s, builders)), None)
    return Context(cfg=cfg, run_dir=run_directory(cfg), builders=builders, progress=progress,
                   affinity_split=affinity_split, seed_split=seed_split, seed_eval_split=eval_split,
                   seg_eval_split=cfg.wsss.seg.eval_split, extra_split=None if holder else eval_split,
                   eval_maps_split=holder or eval_split)


def run_pipeline(cfg: Config, *, progress: bool = True, builders: Optional[Builders] = None,
                 echo: Callable[[str], None] = print, report: bool = True) -> dict[str, Any]:
    """Run every stage of ``cfg``'s WSSS pipeline in ``<out_dir>/<name>`` (module docstring); return the summary
    written to ``pipeline.json``.

    Args:
        cfg: a validated config (localization method + ``wsss`` section).
        progress: progress bars inside the stages.
        builders: replace the model/dataset builders (as given to ``train``).
        echo: where the one-line-per-stage progress goes.
        report: also write ``report/pipeline.{md,html}``.
    """
    if cfg.infer.max_images is not None:
        raise ValueError(f"infer.max_images={cfg.infer.max_images}: the pipeline needs maps of whole splits (name a "
                         "smaller split with a split file instead)")
    started = time.perf_counter()
    ctx = make_context(cfg, builders, progress)
    run_dir = ctx.run_dir
    (run_dir / STAGES_DIR).mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    records: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    total = len(STAGES)
    for number, stage in enumerate(STAGES, 1):
        head = f"[{number}/{total}] {stage.title}"
        identity = stage_identity(stage, ctx, records)
        record = _read_json(_record_path(run_dir, stage.name)) or None
        why = _why_redo(stage, ctx, record, identity)
        if why is None:
            assert record is not None
            echo(f"{head}: skipped (record matches)")
            records[stage.name] = record
            rows.append(_row(stage, "skipped", record, 0.0, 0.0, "record matches"))
            continue
        marker = _read_json(_record_path(run_dir, stage.name, started=True))
        resume = bool(marker) and marker.get("identity") == identity
        adopted = None
        if not resume and record is None and not marker and stage.adopt is not None:
            adopted = stage.adopt(ctx)
            resume = adopted == "partial"
        if not resume and adopted is None and stage.clear:
            _clear(ctx, stage.outputs(ctx))
        status = "adopted" if adopted == "complete" else "resumed" if resume else "done"
        doing = {"adopted": "adopting the outputs already there", "resumed": "resuming", "done": "running"}[status]
        echo(f"{head}: {doing} ({why})")
        atomic_write_json(_record_path(run_dir, stage.name, started=True), {"identity": identity})
        _record_path(run_dir, stage.name).unlink(missing_ok=True)  # it no longer describes the outputs
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            result = stage.run(ctx, resume) if status != "adopted" else {}
        except BaseException:
            echo(f"{head}: stopped after {time.perf_counter() - wall:.0f} s (rerun to resume)")
            raise
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        record = {"stage": stage.name, "identity": identity, "outputs": _manifests(ctx, stage.outputs(ctx)),
                  "result": result, "wall_s": wall, "cpu_s": cpu, "status": status,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(_record_path(run_dir, stage.name), record)
        _record_path(run_dir, stage.name, started=True).unlink(missing_ok=True)
        records[stage.name] = record
        rows.append(_row(stage, status, record, wall, cpu, why))
        echo(f"{head}: {status} in {wall:.0f} s")
    summary = pipeline_summary(ctx, records, rows, time.perf_counter() - started)
    atomic_write_json(run_dir / "pipeline.json", summary)
    if report:
        write_pipeline_report(run_dir, summary, ctx)
    echo(f"seed mIoU {_fmt(summary['seed']['miou'])} ({ctx.seed_eval_split}), refined masks "
         f"{_fmt(summary['refined']['miou'])} ({ctx.seed_eval_split}), segmentation {_fmt(summary['seg']['miou'])} "
         f"({ctx.seg_eval_split}); {run_dir / 'pipeline.json'}")
    return summary


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def _row(stage: Stage, status: str, record: dict[str, Any], wall: float, cpu: float, reason: str) -> dict[str, Any]:
    return {"name": stage.name, "title": stage.title, "status": status, "reason": reason, "wall_s": wall,
            "cpu_s": cpu, "recorded_wall_s": record.get("wall_s"), "recorded_cpu_s": record.get("cpu_s"),
            "result": record.get("result") or {}}


def pipeline_summary(ctx: Context, records: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
                     seconds: float) -> dict[str, Any]:
    """``pipeline.json``: the three mIoUs (seeds, refined masks, segmentation), the splits and each stage's fate."""
    from mmcst.engine.affinity import refined_dir
    from mmcst.engine.seg import predictions_dir

    def scores(name: str, split: str) -> dict[str, Any]:
        result = (records.get(name) or {}).get("result") or {}
        return {"split": split, "miou": result.get("miou"), "threshold": result.get("threshold"),
                "images": result.get("images")}

    run_dir = ctx.run_dir
    return {
        "run_dir": str(run_dir), "name": ctx.cfg.name, "method": ctx.cfg.model.name,
        "splits": {"affinity_train": ctx.affinity_split, "seg_train": ctx.seed_split,
                   "seed_eval": ctx.seed_eval_split, "seg_eval": ctx.seg_eval_split, "maps": ctx.map_splits},
        "seed": scores("seed_eval", ctx.seed_eval_split),
        "refined": scores("refined_masks", ctx.seed_eval_split),
        "seg": scores("seg_eval", ctx.seg_eval_split),
        "bg_threshold": ((records.get("pseudo_labels") or {}).get("result") or {}).get("bg_threshold"),
        "stages": rows,
        "skipped": [row["name"] for row in rows if row["status"] == "skipped"],
        "wall_s": seconds,
        "dirs": {"maps": str(ctx.maps_of(ctx.seed_eval_split)),
                 "pseudo_labels": str(run_dir / "pseudo_labels" / ctx.eval_maps_split),
                 "refined": str(refined_dir(run_dir, ctx.extra_split or ctx.seed_split)),
                 "seg": str(predictions_dir(run_dir, ctx.seg_eval_split)),
                 "seed_eval": str(run_dir / "eval" / f"{ctx.seed_eval_split}.json")},
    }


# --------------------------------------------------------------------------------------------------
# report

REPORT_IMAGES = 6  # images shown with their seeds, masks and predictions
MOSAIC_SIDE = 128  # long side of each panel of the markdown figure


def _label_mosaic(dataset: Any, indices: Sequence[int], columns: dict[str, Path]) -> bytes:
    """Rows: images; columns: image, ground truth, then each label folder's PNG (the markdown report's figure)."""
    from PIL import Image

    from mmcst.io import load_label_png, voc_palette

    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    rows = []
    for index in indices:
        image = dataset[index]["image"].permute(1, 2, 0).numpy()
        scale = MOSAIC_SIDE / max(image.shape[:2])  # small images grow so that the column titles fit
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        labels = [np.asarray(dataset.get_mask(index), np.uint8)]
        labels += [load_label_png(folder / f"{dataset.ids[index]}.png") for folder in columns.values()]
        panels = [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))]
        panels += [palette[np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))]
                   for label in labels]
        rows.append(panels)
    from mmcst.report import mosaic_png

    return mosaic_png(rows, ["image", "ground truth", *columns], fontsize=7)


def wsss_sections(summary: dict[str, Any], datasets: dict[str, Any], key: str = "wsss",
                  json_path: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """Report sections of a pipeline summary (:func:`pipeline_summary`): the three scores, the stages, and the
    seeds, pseudo-labels, refined masks and predictions of the first images.

    ``datasets``: the seed-evaluation and segmentation-evaluation splits by name (images for the explorer).
    ``json_path``: where ``summary`` sits in the JSON file the report is rendered from (table cells name it).
    """
    from mmcst.report import Cell, Column, ExplorerEntry, Figure, Prose, Row, Section, Table, build_explorer

    seed, seg = summary["seed"], summary["seg"]
    descriptions = {"seed": ("seeds", "localization maps, background plane at the best threshold of the sweep"),
                    "refined": ("refined masks", "random walk of the seeds on AffinityNet's affinities"),
                    "seg": ("segmentation", "the segmentation network trained on the refined masks, its predictions")}
    score_rows = tuple(
        Row((Cell(label), Cell(what), Cell(summary[name]["split"], (*json_path, name, "split")),
             Cell(summary[name]["images"], (*json_path, name, "images")),
             Cell(summary[name]["miou"], (*json_path, name, "miou"))))
        for name, (label, what) in descriptions.items())
    scores = Table((Column("stage"), Column("what is scored"), Column("split"), Column("images", True, 0),
                    Column("mIoU (%)", True, 1, shade=True)), score_rows)
    stage_rows = tuple(
        Row((Cell(row["title"]), Cell(row["status"]), Cell(row["reason"]),
             Cell(row["wall_s"] if row["status"] != "skipped" else row["recorded_wall_s"]),
             Cell(row["cpu_s"] if row["status"] != "skipped" else row["recorded_cpu_s"])), compete=False)
        for row in summary["stages"])
    stages = Table((Column("stage"), Column("status"), Column("why"), Column("wall s", True, 0),
                    Column("CPU s", True, 0)), stage_rows,
                   caption="Times of skipped stages are those recorded when they ran.")
    blocks: list[Any] = [
        Prose(f"Seeds and refined masks are scored on split `{seed['split']}`, the segmentation on split "
              f"`{seg['split']}`; the seed pseudo-labels (and the random walk, unless "
              "`wsss.affinity.bg_threshold` is set) use the background threshold "
              f"{_fmt_threshold(summary.get('bg_threshold'))}."),
        scores, stages]
    dirs = {name: Path(path) for name, path in summary["dirs"].items()}
    curve = _read_json(dirs["seed_eval"]).get("miou_curve", [])
    eval_dataset = datasets.get(seed["split"])
    same = seg["split"] == seed["split"]
    if eval_dataset is not None:
        indices = list(range(min(REPORT_IMAGES, len(eval_dataset))))
        entries = [ExplorerEntry("seeds", maps_dir=dirs["maps"], threshold=seed["threshold"], curve=curve),
                   ExplorerEntry("seed pseudo-labels", labels_dir=dirs["pseudo_labels"]),
                   ExplorerEntry("refined masks", labels_dir=dirs["refined"])]
        columns = {"pseudo-labels": dirs["pseudo_labels"], "refined masks": dirs["refined"]}
        if same:
            entries.append(ExplorerEntry("segmentation", labels_dir=dirs["seg"]))
            columns["segmentation"] = dirs["seg"]
        blocks.append(_explorer_with_figure(build_explorer, Figure, key, entries, eval_dataset, indices, columns,
                                            summary))
    seg_dataset = datasets.get(seg["split"])
    if not same and seg_dataset is not None:
        indices = list(range(min(REPORT_IMAGES, len(seg_dataset))))
        blocks.append(_explorer_with_figure(build_explorer, Figure, f"{key}_seg",
                                            [ExplorerEntry("segmentation", labels_dir=dirs["seg"])], seg_dataset,
                                            indices, {"segmentation": dirs["seg"]}, summary))
    return (Section("WSSS stages", tuple(blocks)),)


def _fmt_threshold(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def _explorer_with_figure(build_explorer: Any, figure_type: Any, key: str, entries: list[Any], dataset: Any,
                          indices: list[int], columns: dict[str, Path], summary: dict[str, Any]) -> Any:
    from dataclasses import replace

    names = ["background", *dataset.class_names]
    explorer = build_explorer(key, entries, names, dataset=dataset, indices=indices,
                              intro="Each image with its ground truth and the label maps of the WSSS stages; the "
                                    "seeds' pseudo-mask follows the background threshold.")
    figure = figure_type(f"{key}_overlays.png", _label_mosaic(dataset, indices, columns),
                         "images, ground truth and the label maps of the WSSS stages")
    return replace(explorer, fallback=(figure,))


def write_pipeline_report(run_dir: Path, summary: dict[str, Any], ctx: Optional[Context] = None) -> Path:
    """``RUN/report/pipeline.md`` (figures beside it) and ``pipeline.html``; returns the markdown path."""
    from mmcst.report import Report, write_report

    datasets = {}
    if ctx is not None:
        for split in dict.fromkeys([ctx.seed_eval_split, ctx.seg_eval_split]):
            dataset = dataset_from_config(ctx.cfg, split, ctx.builders)
            if dataset.has_masks():
                datasets[split] = dataset
    out = Path(run_dir) / "report"
    subtitle = f"run {summary['name']} · method {summary['method']} · {summary['wall_s']:.0f} s this time"
    report = Report("mmcst pipeline report", wsss_sections(summary, datasets), subtitle)
    write_report(report, html_path=out / "pipeline.html", markdown_path=out / "pipeline.md")
    return out / "pipeline.md"

