"""The segmentation network of the WSSS stage, trained on pseudo masks (METHOD.md 4.5).

* :func:`train_segmenter` — DeepLab (``wsss.seg.model``: V1 LargeFOV on ResNet-38, the paper's; V2/V3 on a
  timm ResNet) on pseudo masks (``RUN/refined/<split>``, ``RUN/pseudo_labels/<split>`` or any folder of label
  PNGs; 255 is ignored) with MCTformer's recipe: random rescale U(0.7, 1.3), flip, random 321 crop, batch 4,
  SGD with a poly schedule (lr 7e-4, head x10), cross-entropy on the logits upsampled bilinearly to the crop.
  bf16 autocast and channels-last on CUDA, DDP under ``torchrun``, exact resume. Writes ``RUN/seg/``
  (``config.yaml``, ``env.json``, ``log.txt``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/last.pth``).
* :func:`infer_segmenter` — multi-scale inference: each scale's softmax (input resized bilinearly with
  ``align_corners=True``, logits upsampled to the image with ``align_corners=False``, as MCTformer's
  ``seg/infer_seg.py``) fused by the per-pixel maximum over scales (MCTformer; no flip there, optional here),
  then optionally the dense CRF with the segmentation parameters (Gaussian sxy 4 / compat 3, bilateral sxy 83
  / srgb 5 / compat 3, 10 iterations), argmax. ``RUN/seg/predictions/<split>/<id>.png``; for the VOC test split
  also ``RUN/seg/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``, the layout of the PASCAL evaluation
  server's archive (``comp6``: trained with data beyond VOC's own annotations, as every WSSS entry using
  ImageNet weights). Those are indexed PNGs carrying the VOC colour map, as the devkit's ground truth and its
  example segmenter write them: pixel values are the class indices 0..20, the palette only colours them.
* :func:`evaluate_segmenter` — mIoU of the predictions (the PNG evaluator; any class count, COCO's 81
  included) -> ``RUN/eval/seg_<split>.{json,md}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmcst.data.base import IGNORE_INDEX, DatasetError
from mmcst.data.transforms import normalize
from mmcst.data.wsss import LabelFolderDataset, SegTrainTransform
from mmcst.engine.affinity import refined_dir
from mmcst.engine.builders import Builders, dataset_from_config
from mmcst.engine.distributed import autocast, barrier, init_distributed, is_main_process, shard, sum_over_ranks
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
from mmcst.io import save_label_png
from mmcst.models.deeplab import Segmenter, build_segmenter
from mmcst.refine import crf_available, dense_crf

SEG_CHECKPOINT_FORMAT = "mmcst-seg-checkpoint-v1"
# METHOD.md 4.5 (MCTformer's seg/tool/imutils.py crf_inference_inf).
SEG_CRF = {"iterations": 10, "gaussian_sxy": 4.0, "gaussian_compat": 3.0, "bilateral_sxy": 83.0,
           "bilateral_srgb": 5.0, "bilateral_compat": 3.0}
VOC_SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


def seg_dir(run_dir: str | Path) -> Path:
    """``RUN/seg``: the segmenter's training record and predictions."""
    return Path(run_dir) / "seg"


def predictions_dir(run_dir: str | Path, split: str) -> Path:
    """``RUN/seg/predictions/<split>``: predicted label PNGs (VOC palette)."""
    return seg_dir(run_dir) / "predictions" / split


def voc_server_dir(run_dir: str | Path) -> Path:
    """``RUN/seg/results/VOC2012/Segmentation/comp6_test_cls``: what the PASCAL VOC server takes (tar ``results``)."""
    return seg_dir(run_dir) / VOC_SERVER_DIR


def resolve_labels_dir(run_dir: Path, labels: str | Path, split: str) -> Path:
    """``refined`` -> ``RUN/refined/<split>``; ``pseudo`` -> ``RUN/pseudo_labels/<split>``; else a folder path."""
    if labels == "refined":
        folder, how = refined_dir(run_dir, split), f"`mmcst affinity refine {run_dir} --split {split}`"
    elif labels == "pseudo":
        folder, how = run_dir / "pseudo_labels" / split, f"`mmcst infer {run_dir} --split {split} --pseudo-labels`"
    else:
        folder, how = Path(labels), "a folder of <id>.png label maps"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no pseudo masks for split {split!r} (write them with {how})")
    return folder


# --------------------------------------------------------------------------------------------------
# training


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of B x (C+1) x h x w logits upsampled (bilinear, ``align_corners=False``) to the B x H x W
    masks, pixels labelled 255 ignored (MCTformer's ``train_seg.py``); float32 whatever the logits' dtype."""
    upsampled = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, masks, ignore_index=IGNORE_INDEX)


def _seg_objective(logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return segmentation_loss(logits, batch["mask"]), {}


def build_seg_model(cfg: Any, num_classes: int, weights: Optional[str] = None) -> Segmenter:
    section = cfg.wsss.seg
    return build_segmenter(section.model, num_classes, backbone_weights=weights, width=section.width,
                           backbone=section.backbone, freeze_bn=section.freeze_bn, frozen_layers=section.frozen_layers)


def _memory_format(cfg: Any, device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" and cfg.wsss.seg.channels_last else torch.contiguous_format


def train_segmenter(run_dir: str | Path, labels: str | Path = "refined", overrides: Sequence[str] = (), *,
                    resume: bool = False, progress: bool = True, builders: Optional[Builders] = None) -> Path:
    """Train the segmentation network on pseudo masks of the run's training split.

    Args:
        run_dir: a run directory (its ``config.yaml`` names the dataset).
        labels: ``refined`` (``RUN/refined/<split>``, the paper's), ``pseudo`` (``RUN/pseudo_labels/<split>``,
            the seeds' masks) or a folder of ``<id>.png`` label maps (0 background, 1..C, 255 ignore). The split is
            ``wsss.seg.train_split``, default ``data.train_split``.
        overrides: ``wsss.*`` ``key=value`` overrides (``wsss.seg.weights=res38_cls.pth``, ...).
        resume: continue from ``RUN/seg/checkpoints/last.pth``; without it an existing checkpoint is an error.
        progress: progress bar (main process).
        builders: replace the dataset builder.

    Under ``torchrun`` every process calls this; ``wsss.seg.batch_size`` is global.

    Returns:
        ``RUN/seg``.
    """
    run_dir = Path(run_dir)
    builders = builders or Builders()
    cfg = stage_config(run_dir, overrides)
    section = cfg.wsss.seg
    device = init_distributed(cfg.device)
    stage_dir = seg_dir(run_dir)
    start_stage_logging(stage_dir)
    split = section.train_split or cfg.data.train_split
    labels_dir = resolve_labels_dir(run_dir, labels, split)
    dataset = dataset_from_config(cfg, split, builders)
    class_names = list(dataset.class_names)
    labelled = LabelFolderDataset(dataset, labels_dir, len(class_names))
    samples = TrainSamples(labelled, SegTrainTransform(section.crop, section.scale_range), cfg.seed,
                           cfg.data.skip_bad)

    seed_everything(cfg.seed)  # the same initial head on every rank
    model = build_seg_model(cfg, len(class_names), section.weights)
    if section.weights is None:
        log.warning("the segmenter starts from random weights (wsss.seg.weights is not set; the paper's recipe "
                    "starts from res38_cls.pth)")
    for report in model.weight_reports:
        log.info("pretrained weights: %s", report)
    # MCTformer's optimiser sends the weight decay to SGD's momentum slot: no decay at all then (METHOD.md A.10).
    decay = 0.0 if section.psa_optimizer_quirk else section.weight_decay
    log.info("segmenter %s, pseudo masks %s (%d images of %r)", section.model, labels_dir, len(labelled), split)
    trainer = PolyTrainer(
        stage="seg", stage_dir=stage_dir, cfg=cfg, section=section, model=model, train_module=model,
        param_groups=model.param_groups(section.lr, decay), samples=samples, loss_fn=_seg_objective, resume=resume,
        progress=progress, device=device, memory_format=_memory_format(cfg, device),
        record={"class_names": class_names, "train_split": split, "labels": str(labels),
                "labels_dir": str(labels_dir), "labels_settings": read_settings(labels_dir),
                "weights": [report.as_dict() for report in model.weight_reports]})
    return trainer.run()


def load_segmenter(run_dir: str | Path, overrides: Sequence[str] = (),
                   device: str | torch.device = "cpu") -> tuple[Segmenter, Any, list[str], Path]:
    """The trained segmenter of a run (eval mode), its config (plus ``overrides``), class names and checkpoint."""
    path = seg_dir(run_dir) / "checkpoints" / "last.pth"
    checkpoint = load_checkpoint(path, SEG_CHECKPOINT_FORMAT,
                                       f"train the segmenter first: `mmcst seg train {run_dir}`")
    cfg = stage_config(run_dir, overrides, stored=checkpoint["config"])
    class_names = list(checkpoint["class_names"])
    model = build_seg_model(cfg, len(class_names))
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg, class_names, path


# --------------------------------------------------------------------------------------------------
# inference


@torch.inference_mode()
def segment_probabilities(model: Segmenter, image: torch.Tensor, scales: Sequence[float], flip: bool = False,
                          fusion: str = "max", amp: bool = False,
                          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Fused class probabilities (C+1) x H x W of one normalised 3 x H x W image.

    Each scale: the image resized bilinearly (``align_corners=True``) to ``int(H * s) x int(W * s)``, logits
    upsampled bilinearly (``align_corners=False``) to H x W, softmax; the views (scales, and their flips when
    ``flip``) fused by the per-pixel maximum (``fusion="max"``, MCTformer) or the mean.
    """
    if fusion not in ("max", "mean"):
        raise ValueError(f"fusion: expected 'max' or 'mean', got {fusion!r}")
    height, width = image.shape[-2:]
    device = image.device
    fused: Optional[torch.Tensor] = None
    views = 0
    for scale in scales:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        scaled = image[None] if size == (height, width) else \
            F.interpolate(image[None], size=size, mode="bilinear", align_corners=True)
        if flip:  # an image and its flip share a size: one forward for both
            scaled = torch.cat([scaled, scaled.flip(-1)])
        with autocast(device, amp):
            logits = model(scaled.contiguous(memory_format=memory_format))
        probs = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False).softmax(1)
        for view in ([probs[0], probs[1].flip(-1)] if flip else [probs[0]]):
            views += 1
            if fused is None:
                fused = view.clone()
            elif fusion == "max":
                torch.maximum(fused, view, out=fused)
            else:
                fused += view
    assert fused is not None
    return fused / views if fusion == "mean" else fused


def resolve_crf(setting: Optional[bool], configured: Optional[bool]) -> bool:
    """Whether to run the dense CRF: ``setting`` (or the configured value when None); None = when pydensecrf2 is
    installed; True without it is an error."""
    value = configured if setting is None else setting
    if value is None:
        if not crf_available():
            log.warning("dense CRF skipped: pydensecrf2 is not installed (pip install mmcst[crf]); the paper's "
                        "numbers use it")
        return crf_available()
    if value and not crf_available():
        raise RuntimeError("crf: the dense CRF needs the optional dependency pydensecrf2 (pip install mmcst[crf])")
    return bool(value)


class _SegJobs(ImageJobs):
    """Loads an image (uint8 for the CRF, normalised for the network) unless its predictions are valid."""

    def __getitem__(self, j: int) -> dict[str, Any]:
        image_id, image = self.load(j)
        if image is None:
            return {"id": image_id, "reused": True}
        return {"id": image_id, "reused": False, "pixels": image, "image": normalize(image)}


def infer_segmenter(run_dir: str | Path, split: str, *, scales: Optional[Sequence[float]] = None,
                    crf: Optional[bool] = None, voc_server_layout: Optional[bool] = None,
                    flip: Optional[bool] = None, overrides: Sequence[str] = (), progress: bool = True,
                    builders: Optional[Builders] = None) -> Path:
    """Predict label maps of ``split`` with the trained segmenter; returns the predictions folder.

    Args:
        run_dir: a run with ``seg/checkpoints/last.pth``.
        split: any split of the run's dataset (masks are not needed: VOC ``test`` works).
        scales: inference scales (None = ``wsss.seg.scales``: 0.5, 0.75, 1.0, 1.25, 1.5).
        crf: dense CRF on the fused probabilities (None = ``wsss.seg.crf``, whose default None means: when
            pydensecrf2 is installed).
        voc_server_layout: also write ``RUN/seg/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``; None =
            for the VOC ``test`` split.
        flip: add flipped views (None = ``wsss.seg.flip``, off as MCTformer).
        overrides: ``wsss.*`` overrides of the segmenter's stored config (``wsss.seg.fusion=mean``, ...).
        progress: progress bar (main process).
        builders: replace the dataset builder.

    Valid predictions made with the same settings are kept (resume after a kill); under ``torchrun`` every rank
    predicts a disjoint share of the images.

    Returns:
        ``RUN/seg/predictions/<split>``.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    builders = builders or Builders()
    model, cfg, class_names, checkpoint_path = load_segmenter(run_dir, overrides)
    section = cfg.wsss.seg
    device = init_distributed(cfg.device)
    model.to(device, memory_format=_memory_format(cfg, device))
    setup_logging(run_dir)
    scales = list(section.scales if scales is None else scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected positive numbers, got {scales}")
    flip = section.flip if flip is None else flip
    use_crf = resolve_crf(crf, section.crf)
    dataset = dataset_from_config(cfg, split, builders)
    if list(dataset.class_names) != class_names:
        raise DatasetError(f"split {split!r} of {cfg.data.root}: classes {list(dataset.class_names)} differ from the "
                           f"segmenter's {class_names}")
    if voc_server_layout is None:
        voc_server_layout = cfg.data.dataset == "voc" and split == "test"
    out_dir = predictions_dir(run_dir, split)
    out_dirs = [out_dir] + ([voc_server_dir(run_dir)] if voc_server_layout else [])
    settings = {"checkpoint": file_stamp(checkpoint_path), "scales": [float(s) for s in scales], "flip": bool(flip),
                "fusion": section.fusion, "crf": SEG_CRF if use_crf else None, "split": split}
    if is_main_process():
        prepare_output_dir(out_dir, settings)
        if voc_server_layout:  # the server's folder holds the PNGs only: its record lies beside ``results/``
            prepare_output_dir(voc_server_dir(run_dir), settings, settings_file=seg_dir(run_dir) / "results.json")
    barrier()
    log.info("segmenting %d image(s) of %r (scales %s, flip %s, %s fusion, CRF %s) -> %s", len(dataset), split,
             scales, flip, section.fusion, "on" if use_crf else "off", " and ".join(str(d) for d in out_dirs))
    indices = shard(range(len(dataset)))
    loader = DataLoader(_SegJobs(dataset, indices, out_dirs), batch_size=None, num_workers=cfg.data.num_workers,
                        collate_fn=identity, pin_memory=device.type == "cuda")
    counts = {"written": 0, "reused": 0}
    for job in tqdm(loader, total=len(indices), disable=not (progress and is_main_process()), unit="img",
                    desc=f"segment {split}", dynamic_ncols=True):
        if job["reused"]:
            counts["reused"] += 1
            continue
        # float32 forwards, as the localization maps (infer.precision) and MCTformer's inference
        probs = segment_probabilities(model, job["image"].to(device), scales, flip, section.fusion, False,
                                      _memory_format(cfg, device))
        if use_crf:
            refined = dense_crf(job["pixels"].permute(1, 2, 0).numpy(), probs.cpu().numpy(), **SEG_CRF)
            prediction = refined.argmax(0).astype(np.uint8)
        else:
            prediction = probs.argmax(0).to(torch.uint8).cpu().numpy()
        for folder in out_dirs:
            save_label_png(folder / f"{job['id']}.png", prediction)
        counts["written"] += 1
    barrier()
    counts = sum_over_ranks(counts)
    log.info("segmentation: %d written, %d valid ones kept", counts["written"], counts["reused"])
    return out_dir


def evaluate_segmenter(run_dir: str | Path, split: str, *, overrides: Sequence[str] = (), progress: bool = True,
                       builders: Optional[Builders] = None) -> dict[str, Any]:
    """mIoU of ``RUN/seg/predictions/<split>`` against the split's masks -> ``RUN/eval/seg_<split>.json`` (+ .md).

    Returns the evaluator's result (``best.miou`` in percent, per-class IoU, protocol).
    """
    from mmcst.engine.evaluate import evaluate_maps

    run_dir = Path(run_dir)
    builders = builders or Builders()
    folder = predictions_dir(run_dir, split)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no predictions; write them first with `mmcst seg infer {run_dir} "
                                f"--split {split}`")
    record = seg_dir(run_dir) / "config.yaml"  # the segmenter's config: the dataset it was trained for
    cfg = stage_config(run_dir, overrides, stored=record.read_text() if record.is_file() else None)
    setup_logging(run_dir)
    dataset = dataset_from_config(cfg, split, builders)
    out = run_dir / "eval" / f"seg_{split}.json"
    result = run_on_main(lambda: evaluate_maps(folder, dataset, cfg.eval, out=out, map_format="png",
                                               progress=progress))
    log.info("segmentation of %r: mIoU %.2f (%s)", split, result["best"]["miou"], out)
    return result


__all__ = ["evaluate_segmenter", "infer_segmenter", "load_segmenter", "predictions_dir", "segment_probabilities",
           "segmentation_loss", "seg_dir", "train_segmenter", "voc_server_dir"]
