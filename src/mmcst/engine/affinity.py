"""PSA / AffinityNet refinement of a run's localization maps into pseudo masks (METHOD.md 4.4).

Three steps, each a function and a ``mmcst affinity`` command:

1. :func:`make_affinity_labels` — confident labels from the maps ``RUN/maps/<split>/<id>.npy``: the seeds with
   a background ``(1 - max_c M_c)^alpha`` at ``alpha_fg`` ("la") and ``alpha_bg`` ("ha"), each refined by the
   dense CRF (``mmcst[crf]``) or PAR; class where la says foreground, 255 where la says background, 0 where ha
   says background. Palette PNGs ``RUN/affinity/labels/<split>/<id>.png``.
2. :func:`train_affinity` — AffinityNet (ResNet-38 in PSA's layout, or a timm ResNet) on those labels with
   PSA's recipe: ``RUN/affinity/`` (``config.yaml``, ``env.json``, ``log.txt``, ``metrics.jsonl``,
   ``summary.json``, ``checkpoints/last.pth``).
3. :func:`refine_masks` — the random walk of the seeds (background plane: a constant, MCTformer's rule, or
   PSA's ``(1 - max)^alpha``) on the learnt affinities: ``RUN/refined/<split>/<id>.png``, evaluated against
   the split's masks when it has them (``RUN/eval/refined_<split>.{json,md}``).

Steps 1 and 3 are resumable (valid PNGs made with the same settings are kept) and shard their images over
the ranks under ``torchrun``; step 2 resumes exactly from its checkpoint.

Background of the random walk (``wsss.affinity.bg_threshold`` / ``bg_alpha``): MCTformer's ``psa/infer_aff.py``
(the paper's pipeline) uses a constant plane ``--bg_thr 0.39``, "the optimal one obtained for seeds", i.e. the
best threshold of the seed evaluation; PSA's original ``infer_aff.py`` uses ``(1 - max_c M_c)^16``. Default
here: the best threshold of the run's own seed evaluation (``RUN/eval/<split>.json``, else that of
``data.eval_split``), else 0.39.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mmcst.config import Config
from mmcst.data.transforms import normalize
from mmcst.data.wsss import AffinityTrainTransform, LabelFolderDataset, name_missing
from mmcst.engine.builders import Builders, dataset_from_config
from mmcst.engine.distributed import barrier, init_distributed, is_main_process, shard, sum_over_ranks
from mmcst.engine.randomness import seed_everything
from mmcst.engine.rundir import log, setup_logging
from mmcst.engine.stage import (
    ImageJobs,
    PolyTrainer,
    file_stamp,
    identity,
    prepare_output_dir,
    read_settings,
    run_on_main,
    stage_config,
    start_stage_logging,
)
from mmcst.engine.train import TrainSamples, load_checkpoint, load_model_state
from mmcst.io import load_map, save_label_png
from mmcst.models.affinity import AffinityNet, affinity_loss, affinity_loss_terms, pairwise_affinity
from mmcst.refine import RANDOM_WALK_BG_THRESHOLD, confident_labels, crf_available, random_walk_labels

AFFINITY_CHECKPOINT_FORMAT = "mmcst-affinity-checkpoint-v1"
LABEL_METHODS = ("auto", "crf", "par")


def affinity_dir(run_dir: str | Path) -> Path:
    """``RUN/affinity``: AffinityNet's training record."""
    return Path(run_dir) / "affinity"


def affinity_labels_dir(run_dir: str | Path, split: str) -> Path:
    """``RUN/affinity/labels/<split>``: confident labels (palette PNGs, 255 ignore)."""
    return affinity_dir(run_dir) / "labels" / split


def refined_dir(run_dir: str | Path, split: str) -> Path:
    """``RUN/refined/<split>``: pseudo masks after the random walk (palette PNGs)."""
    return Path(run_dir) / "refined" / split


# --------------------------------------------------------------------------------------------------
# map files


def checked_maps_dir(run_dir: Path, split: str, ids: Sequence[str]) -> Path:
    """``RUN/maps/<split>``, after checking that it holds a map file for every image of the split."""
    maps_dir = run_dir / "maps" / split
    if not maps_dir.is_dir() or not any(maps_dir.glob("*.npy")):
        raise FileNotFoundError(f"{maps_dir}: no localization maps; write them first with `mmcst infer {run_dir} "
                                f"--split {split}`")
    missing = [maps_dir / f"{i}.npy" for i in ids if not (maps_dir / f"{i}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{maps_dir}: {len(missing)} of {len(ids)} images of split {split!r} have no map "
                                f"file: {name_missing(missing)}")
    return maps_dir


def read_seed_map(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, cam)`` of a map file whose maps must have the image's size ``(H, W)``."""
    keys, cam = load_map(path)
    if keys.size and tuple(cam.shape[1:]) != tuple(size):
        raise ValueError(f"{path}: maps are {cam.shape[2]}x{cam.shape[1]} (WxH) but the image is {size[1]}x{size[0]}; "
                         "map files must be stored at the image size")
    if not keys.size:
        cam = np.zeros((0, *size), np.float32)
    return keys, cam


class _ConfidentLabelJobs(ImageJobs):
    """Writes the confident-label PNG of one image (in a loader worker)."""

    def __init__(self, dataset: Any, indices: Sequence[int], maps_dir: Path, out_dir: Path, method: str,
                 alpha_fg: float, alpha_bg: float) -> None:
        super().__init__(dataset, indices, [out_dir])
        self.maps_dir, self.out_dir, self.method = maps_dir, out_dir, method
        self.alpha_fg, self.alpha_bg = alpha_fg, alpha_bg

    def __getitem__(self, j: int) -> str:
        image_id, image = self.load(j)
        if image is None:
            return "reused"
        keys, cam = read_seed_map(self.maps_dir / f"{image_id}.npy", tuple(image.shape[-2:]))
        labels = confident_labels(image.permute(1, 2, 0).numpy(), keys, cam, self.alpha_fg, self.alpha_bg,
                                  self.method)
        save_label_png(self.out_dir / f"{image_id}.png", labels)
        return "written"


def resolve_label_method(method: str) -> str:
    """``auto`` -> ``crf`` when pydensecrf2 imports, else ``par``; ``crf`` without it is an error."""
    if method not in LABEL_METHODS:
        raise ValueError(f"label method: expected one of {list(LABEL_METHODS)}, got {method!r}")
    if method == "auto":
        return "crf" if crf_available() else "par"
    if method == "crf" and not crf_available():
        raise RuntimeError("label method crf needs the optional dependency pydensecrf2 (pip install mmcst[crf]); "
                           "or use method par")
    return method


def make_affinity_labels(run_dir: str | Path, split: str, *, method: Optional[str] = None,
                         overrides: Sequence[str] = (), progress: bool = True,
                         builders: Optional[Builders] = None) -> Path:
    """Confident labels for AffinityNet from the run's maps of ``split``; returns their folder.

    Args:
        run_dir: a run directory with ``maps/<split>/`` (``mmcst infer``).
        split: the split AffinityNet trains on (VOC: ``train_aug``).
        method: ``auto`` | ``crf`` | ``par`` (None = ``wsss.affinity.label_method``); ``auto`` takes the CRF
            when pydensecrf2 is installed. The method used is recorded in the folder's ``settings.json``.
        overrides: ``wsss.*`` ``key=value`` overrides (e.g. ``wsss.affinity.alpha_bg=32``).
        progress: progress bar (main process).
        builders: replace the dataset builder (as given to ``train``).

    Returns:
        ``RUN/affinity/labels/<split>``.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    builders = builders or Builders()
    cfg = stage_config(run_dir, overrides)
    section = cfg.wsss.affinity
    asked = method or section.label_method
    resolved = resolve_label_method(asked)
    init_distributed(cfg.device)
    setup_logging(run_dir)
    dataset = dataset_from_config(cfg, split, builders)
    maps_dir = checked_maps_dir(run_dir, split, [str(i) for i in dataset.ids])
    out_dir = affinity_labels_dir(run_dir, split)
    settings = {"method": resolved, "method_asked": asked, "alpha_fg": section.alpha_fg, "alpha_bg": section.alpha_bg,
                "maps": read_settings(maps_dir)}
    if is_main_process():
        prepare_output_dir(out_dir, settings)
    barrier()
    log.info("confident labels of %d image(s) of %r with %s (asked: %s), la alpha %g, ha alpha %g -> %s",
             len(dataset), split, resolved.upper(), asked, section.alpha_fg, section.alpha_bg, out_dir)
    indices = shard(range(len(dataset)))
    jobs = _ConfidentLabelJobs(dataset, indices, maps_dir, out_dir, resolved, section.alpha_fg, section.alpha_bg)
    loader = DataLoader(jobs, batch_size=None, num_workers=cfg.data.num_workers, collate_fn=identity)
    counts = {"written": 0, "reused": 0}
    for status in tqdm(loader, total=len(indices), disable=not (progress and is_main_process()), unit="img",
                       desc=f"affinity labels {split}", dynamic_ncols=True):
        counts[status] += 1
    barrier()
    counts = sum_over_ranks(counts)
    log.info("confident labels: %d written, %d valid ones kept", counts["written"], counts["reused"])
    return out_dir


# --------------------------------------------------------------------------------------------------
# training


class _PairAffinities(nn.Module):
    """AffinityNet's training forward: the embedding (under autocast) and its pair affinities in float32, where
    ``log(1 - a)`` of affinities near 1 stays accurate."""

    def __init__(self, net: AffinityNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pairwise_affinity(self.net.embed(images).float(), self.net.radius)


def _affinity_objective(affinity: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    terms = affinity_loss_terms(affinity, batch["bg_pos"], batch["fg_pos"], batch["neg"])
    return affinity_loss(terms), terms


def build_affinity_net(cfg: Config, weights: Optional[str] = None) -> AffinityNet:
    section = cfg.wsss.affinity
    return AffinityNet(backbone=section.backbone, weights=weights, width=section.width, radius=section.radius,
                       frozen_layers=section.frozen_layers, freeze_bn=section.freeze_bn)


def train_affinity(run_dir: str | Path, overrides: Sequence[str] = (), *, resume: bool = False, progress: bool = True,
                   builders: Optional[Builders] = None) -> Path:
    """Train AffinityNet on the confident labels of the run (PSA's recipe, METHOD.md 4.4 step 3).

    Args:
        run_dir: a run with ``affinity/labels/<split>/`` (:func:`make_affinity_labels`) for the training split
            (``wsss.affinity.train_split``, default ``data.train_split``).
        overrides: ``wsss.*`` ``key=value`` overrides (``wsss.affinity.weights=res38_cls.pth``, ...).
        resume: continue from ``RUN/affinity/checkpoints/last.pth`` (weights, optimizer, sampler position, RNG).
            Without it, an existing checkpoint is an error.
        progress: progress bar (main process).
        builders: replace the dataset builder.

    Under ``torchrun`` every process calls this; ``wsss.affinity.batch_size`` is global.

    Returns:
        ``RUN/affinity``.
    """
    run_dir = Path(run_dir)
    builders = builders or Builders()
    cfg = stage_config(run_dir, overrides)
    section = cfg.wsss.affinity
    device = init_distributed(cfg.device)
    stage_dir = affinity_dir(run_dir)
    start_stage_logging(stage_dir)
    split = section.train_split or cfg.data.train_split
    dataset = dataset_from_config(cfg, split, builders)
    labels_dir = affinity_labels_dir(run_dir, split)
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{labels_dir}: no confident labels for split {split!r}; write them first with "
                                f"`mmcst affinity labels {run_dir} --split {split}`")
    labelled = LabelFolderDataset(dataset, labels_dir, len(dataset.class_names))
    transform = AffinityTrainTransform(section.crop, section.radius, section.resize_long, section.color_jitter)
    samples = TrainSamples(labelled, transform, cfg.seed, cfg.data.skip_bad)

    seed_everything(cfg.seed)  # the same initial heads on every rank
    model = build_affinity_net(cfg, section.weights)
    if section.weights is None:
        log.warning("AffinityNet starts from random weights (wsss.affinity.weights is not set; the paper's "
                    "recipe starts from res38_cls.pth)")
    for report in model.weight_reports:
        log.info("pretrained weights: %s", report)
    trainer = PolyTrainer(
        stage="affinity", stage_dir=stage_dir, cfg=cfg, section=section, model=model,
        train_module=_PairAffinities(model), param_groups=model.param_groups(section.lr, section.weight_decay),
        samples=samples, loss_fn=_affinity_objective, resume=resume, progress=progress, device=device,
        record={"train_split": split, "labels_dir": str(labels_dir), "labels": read_settings(labels_dir),
                "weights": [report.as_dict() for report in model.weight_reports]})
    return trainer.run()


def load_affinity_net(run_dir: str | Path, overrides: Sequence[str] = (),
                      device: str | torch.device = "cpu") -> tuple[AffinityNet, Config, Path]:
    """The trained AffinityNet of a run (eval mode), the config it was trained with (plus ``overrides``), and its
    checkpoint path."""
    path = affinity_dir(run_dir) / "checkpoints" / "last.pth"
    checkpoint = load_checkpoint(path, AFFINITY_CHECKPOINT_FORMAT,
                                       f"train AffinityNet first: `mmcst affinity train {run_dir}`")
    cfg = stage_config(run_dir, overrides, stored=checkpoint["config"])
    model = build_affinity_net(cfg)
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg, path


# --------------------------------------------------------------------------------------------------
# random walk


def walk_background(run_dir: Path, split: str, cfg: Config) -> dict[str, Any]:
    """The seeds' background plane for the random walk, and where it comes from (module docstring)."""
    section = cfg.wsss.affinity
    if section.bg_alpha is not None:
        return {"rule": "power", "alpha": float(section.bg_alpha), "source": "wsss.affinity.bg_alpha (PSA's rule)"}
    if section.bg_threshold is not None:
        return {"rule": "constant", "threshold": float(section.bg_threshold), "source": "wsss.affinity.bg_threshold"}
    for name in dict.fromkeys((split, cfg.data.eval_split)):
        path = run_dir / "eval" / f"{name}.json"
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
            if result["protocol"].get("bg_rule", "constant") == "constant" and result["best"]["threshold"] is not None:
                return {"rule": "constant", "threshold": float(result["best"]["threshold"]),
                        "source": f"best seed threshold of {path}"}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: no best threshold readable (%s)", path, exc)
    return {"rule": "constant", "threshold": RANDOM_WALK_BG_THRESHOLD,
            "source": "MCTformer's default (no seed evaluation in the run)"}


class _WalkJobs(ImageJobs):
    """Loads an image (ImageNet-normalised) and its seed maps for the random walk."""

    def __init__(self, dataset: Any, indices: Sequence[int], maps_dir: Path, out_dir: Path) -> None:
        super().__init__(dataset, indices, [out_dir])
        self.maps_dir = maps_dir

    def __getitem__(self, j: int) -> dict[str, Any]:
        image_id, image = self.load(j)
        if image is None:
            return {"id": image_id, "reused": True}
        keys, cam = read_seed_map(self.maps_dir / f"{image_id}.npy", tuple(image.shape[-2:]))
        return {"id": image_id, "reused": False, "image": normalize(image), "keys": keys, "cam": cam}


@torch.inference_mode()
def walk_image(model: AffinityNet, image: torch.Tensor, keys: np.ndarray, cam: np.ndarray, cfg: Config,
               background: dict[str, Any]) -> np.ndarray:
    """Pseudo mask of one normalised 3 x H x W image: the image zero-padded to a multiple of 8 (PSA), its dense
    affinity, the random walk of its seeds (:func:`mmcst.refine.random_walk_labels`)."""
    section = cfg.wsss.affinity
    height, width = image.shape[-2:]
    stride = model.output_stride
    padded = F.pad(image[None], (0, -width % stride, 0, -height % stride))
    affinity = model.dense_affinity(padded)[0].float()
    return random_walk_labels(affinity, keys, cam, bg_threshold=background.get("threshold"),
                              bg_alpha=background.get("alpha"), beta=section.beta, logt=section.logt, stride=stride,
                              method=section.walk_method)


def refine_masks(run_dir: str | Path, split: str, *, evaluate: bool = True, overrides: Sequence[str] = (),
                 progress: bool = True, builders: Optional[Builders] = None) -> dict[str, Any]:
    """Pseudo masks of ``split`` by the random walk on the trained AffinityNet's affinities.

    Args:
        run_dir: a run with ``maps/<split>/`` and ``affinity/checkpoints/last.pth``.
        split: VOC: ``train_aug`` to train the segmenter, ``train`` to evaluate (METHOD.md Appendix A.8).
        evaluate: evaluate the masks when the split has ground truth (``RUN/eval/refined_<split>.json``).
        overrides: ``wsss.*`` overrides of AffinityNet's stored config (``wsss.affinity.bg_threshold=0.4``,
            ``wsss.affinity.logt=8``, ...).
        progress: progress bars (main process).
        builders: replace the dataset builder.

    Returns:
        The evaluation result (``evaluate_maps``; empty when not evaluated) with a ``"refine"`` entry: the
        folder, image counts and the walk's settings.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    builders = builders or Builders()
    model, cfg, checkpoint_path = load_affinity_net(run_dir, overrides)
    section = cfg.wsss.affinity
    device = init_distributed(cfg.device)
    model.to(device)
    setup_logging(run_dir)
    dataset = dataset_from_config(cfg, split, builders)
    maps_dir = checked_maps_dir(run_dir, split, [str(i) for i in dataset.ids])
    background = walk_background(run_dir, split, cfg)
    out_dir = refined_dir(run_dir, split)
    walk = {"beta": section.beta, "logt": section.logt, "method": section.walk_method, "background": background}
    if is_main_process():
        prepare_output_dir(out_dir, {"checkpoint": file_stamp(checkpoint_path), **walk,
                                     "maps": read_settings(maps_dir)})
    barrier()
    log.info("random walk of %d image(s) of %r (beta %g, %d steps, %s; background %s) -> %s", len(dataset), split,
             section.beta, 2 ** section.logt, section.walk_method,
             f"(1 - max)^{background['alpha']:g}" if background["rule"] == "power" else
             f"{background['threshold']:.3f} ({background['source']})", out_dir)
    indices = shard(range(len(dataset)))
    loader = DataLoader(_WalkJobs(dataset, indices, maps_dir, out_dir), batch_size=None,
                        num_workers=cfg.data.num_workers, collate_fn=identity, pin_memory=device.type == "cuda")
    counts = {"written": 0, "reused": 0}
    for job in tqdm(loader, total=len(indices), disable=not (progress and is_main_process()), unit="img",
                    desc=f"random walk {split}", dynamic_ncols=True):
        if job["reused"]:
            counts["reused"] += 1
            continue
        labels = walk_image(model, job["image"].to(device), job["keys"], job["cam"], cfg, background)
        save_label_png(out_dir / f"{job['id']}.png", labels)
        counts["written"] += 1
    barrier()
    counts = sum_over_ranks(counts)
    log.info("refined masks: %d written, %d valid ones kept", counts["written"], counts["reused"])

    result: dict[str, Any] = {}
    if evaluate and dataset.has_masks():
        from mmcst.engine.evaluate import evaluate_maps

        out = run_dir / "eval" / f"refined_{split}.json"
        result = run_on_main(lambda: evaluate_maps(out_dir, dataset, cfg.eval, out=out, map_format="png",
                                                   progress=progress))
        log.info("refined masks of %r: mIoU %.2f (%s)", split, result["best"]["miou"], out)
    elif evaluate:
        log.info("split %r has no masks: the refined masks are not evaluated", split)
    result["refine"] = {"dir": str(out_dir), "images": len(dataset), **counts, **walk}
    return result


__all__ = ["affinity_dir", "affinity_labels_dir", "load_affinity_net", "make_affinity_labels", "refine_masks",
           "refined_dir", "train_affinity", "walk_background"]
