"""Localization maps (multi-scale, flip, affinity refinement) and pseudo-labels for a split (METHOD.md 4.1-4.3).

For every image at its original resolution: each scale (bicubic resize; the model floors the patch grid)
and its flip go through ``model.localize`` together; maps are refined with the patch affinity, upsampled
bilinearly straight to the original H x W, flipped back and summed; absent classes (ground-truth image
labels) are dropped; each present class is min-max normalised. Files: ``maps/<split>/<id>.npy``
(``mmcst.io.save_map``) and, on request, ``pseudo_labels/<split>/<id>.png``.

Forwards run in float32 by default (``infer.precision``: fp16/bf16 autocast on request). Images of equal
size are batched (``infer.batch_size``; ``auto`` = 1 on CPU, where a batch-1 loop is as fast or faster, 8 on
CUDA); valid map files from an earlier (killed) run are kept; under ``torchrun`` every rank handles a
disjoint share of the images.
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmcst.data.base import DatasetError
from mmcst.engine.builders import Builders, dataset_from_config
from mmcst.engine.distributed import (
    barrier, init_distributed, is_main_process, memory_format_of, shard, sum_over_ranks,
)
from mmcst.engine.rundir import log, setup_logging
from mmcst.engine.train import model_from_run
from mmcst.io import MapFileError, atomic_write_json, load_map, save_label_png, save_map

DEFAULT_BG_THRESHOLD = 0.39  # MCTformer's PSA-stage default, "the optimal one obtained for seeds"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO_BATCH_SIZE = {"cpu": 1, "cuda": 8}  # infer.batch_size=auto; measurements in the README (performance)


def resolve_batch_size(setting: int | str, device: torch.device) -> int:
    """``infer.batch_size`` for ``device``: ``auto`` = 1 on CPU (batching does not pay off there), 8 on CUDA."""
    if setting == "auto":
        return AUTO_BATCH_SIZE.get(device.type, 1)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"infer.batch_size: expected auto or an integer >= 1, got {setting!r}")
    return setting


def precision_autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a map forward: disabled for fp32 (even inside an enclosing autocast, e.g. a
    training loop's), else autocast to float16 / bfloat16 on ``device``'s type."""
    if precision not in PRECISIONS:
        raise ValueError(f"infer.precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def check_precision(device: torch.device, precision: str) -> None:
    """Raise a clear error when this torch cannot autocast to ``precision`` on ``device`` (older torch releases
    disable CPU autocast to float16 with a warning, which would silently run float32)."""
    if precision == "fp32":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with precision_autocast(device, precision):
            probe = torch.ones(2, 2, device=device)
            dtype = (probe @ probe).dtype
    if dtype != PRECISIONS[precision]:
        alternatives = "fp32 or bf16" if precision == "fp16" else "fp32"
        raise ValueError(f"infer.precision={precision}: torch {torch.__version__} cannot autocast to "
                         f"{PRECISIONS[precision]} on {device.type}; use {alternatives}")


def map_file_is_valid(path: Path, keys: np.ndarray, height: int, width: int) -> bool:
    """True when ``path`` loads, holds exactly ``keys`` and finite [K, height, width] maps in [0, 1]."""
    if not path.is_file():
        return False
    try:
        stored_keys, cam = load_map(path)
    except MapFileError:
        return False
    return (np.array_equal(stored_keys, keys) and cam.shape == (len(keys), height, width)
            and bool(np.isfinite(cam).all()) and (cam.size == 0 or (cam.min() >= 0 and cam.max() <= 1)))


def pseudo_label(keys: np.ndarray, cam: np.ndarray, threshold: float) -> np.ndarray:
    """HxW label map: argmax over [background plane = ``threshold``, maps]; ties go to background.

    Returns uint8 values 0 (background) or ``key + 1`` for the winning present class.
    """
    keys = np.asarray(keys, dtype=np.int64)
    planes = np.concatenate([np.full((1, *cam.shape[1:]), threshold, np.float32), cam.astype(np.float32)])
    winner = planes.argmax(axis=0)  # first maximum: the background plane wins ties
    lookup = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lookup[winner]


def present_classes(labels: torch.Tensor) -> np.ndarray:
    return torch.nonzero(labels > 0).flatten().numpy().astype(np.int64)


class _MapJobs(Dataset):  # type: ignore[type-arg]
    """Loads images in workers; an image whose map file is already valid comes back as ``reused``."""

    def __init__(self, dataset: Any, indices: Sequence[int], maps_dir: Path, normalize: Any) -> None:
        self.dataset, self.indices, self.maps_dir, self.normalize = dataset, indices, maps_dir, normalize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index = self.indices[j]
        known = self._known_without_decoding(index)
        if known is not None and map_file_is_valid(self.maps_dir / f"{known[0]}.npy", *known[1:]):
            return {"id": known[0], "reused": True}
        sample = self.dataset[index]
        keys = present_classes(sample["labels"])
        height, width = sample["image"].shape[-2:]
        if known is None and map_file_is_valid(self.maps_dir / f"{sample['id']}.npy", keys, height, width):
            return {"id": sample["id"], "reused": True}
        return {"id": sample["id"], "reused": False, "keys": keys, "image": self.normalize(sample["image"]).float()}

    def _known_without_decoding(self, index: int) -> Optional[tuple[str, np.ndarray, int, int]]:
        """``(id, keys, H, W)`` from the labels and the image header, for datasets that expose ``image_path``."""
        if not (hasattr(self.dataset, "image_path") and hasattr(self.dataset, "get_labels")):
            return None
        try:
            with Image.open(self.dataset.image_path(index)) as image:
                width, height = image.size
        except Exception:  # unreadable here: the full load below reports it properly
            return None
        keys = present_classes(torch.as_tensor(np.asarray(self.dataset.get_labels(index))))
        return str(self.dataset.ids[index]), keys, height, width


class _LabelJobs(Dataset):  # type: ignore[type-arg]
    """Writes one pseudo-label PNG per item (in a worker) from the saved map file."""

    def __init__(self, ids: Sequence[str], maps_dir: Path, out_dir: Path, threshold: float) -> None:
        self.ids, self.maps_dir, self.out_dir, self.threshold = ids, maps_dir, out_dir, threshold

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> int:
        keys, cam = load_map(self.maps_dir / f"{self.ids[j]}.npy")
        save_label_png(self.out_dir / f"{self.ids[j]}.png", pseudo_label(keys, cam, self.threshold))
        return j


def _identity(item: Any) -> Any:
    return item


class _FirstImages:
    """The first ``count`` images of a dataset, with the same contract (for ``infer.max_images``)."""

    def __init__(self, dataset: Any, count: int) -> None:
        self._dataset = dataset
        self._count = count
        self.class_names = dataset.class_names
        self.ids = list(dataset.ids)[:count]

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._dataset[index]

    def get_labels(self, index: int) -> Any:
        return self._dataset.get_labels(index)

    def label_matrix(self) -> Any:
        return self._dataset.label_matrix()[:self._count]

    def has_masks(self) -> bool:
        return bool(self._dataset.has_masks())

    def describe(self) -> dict[str, Any]:
        info = dict(self._dataset.describe()) if hasattr(self._dataset, "describe") else {}
        info.update(images=self._count, max_images=self._count)
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


class MapGenerator:
    """Multi-scale + flip localization maps for batches of equally sized images.

    ``precision`` (``infer.precision``): fp32 runs the model without autocast, so attention, correlations and
    affinities are float32; fp16 / bf16 autocast the forwards (maps and affinities are summed in float32).
    """

    def __init__(self, model: nn.Module, scales: Sequence[float], flip: bool, refine: bool, device: torch.device,
                 precision: str = "fp32") -> None:
        check_precision(device, precision)
        self.model, self.scales, self.flip, self.refine, self.device = model, list(scales), flip, refine, device
        self.precision = precision
        self.memory_format = memory_format_of(model)
        model.to(memory_format=self.memory_format)
        self._warned_no_affinity = False

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, keys: Sequence[np.ndarray], normalize: bool = True
                 ) -> list[torch.Tensor]:
        """Maps of the present classes, each ``K_b x H x W`` float32 in [0, 1].

        Args:
            images: B x 3 x H x W normalised images of one size, on the device.
            keys: per image, the present (0-based) class indices.
            normalize: min-max normalise each map to [0, 1] (the stored form). False returns the raw sums over
                scales and flips, e.g. to fuse maps of several methods before normalising.
        """
        from mmcst.refine import affinity_refine

        batch, _, height, width = images.shape
        index = [torch.as_tensor(k, dtype=torch.long, device=images.device) for k in keys]
        sums = [images.new_zeros((len(k), height, width), dtype=torch.float32) for k in keys]
        for scale in self.scales:
            size = (max(1, int(height * scale)), max(1, int(width * scale)))
            scaled = images if size == (height, width) else \
                F.interpolate(images, size=size, mode="bicubic", align_corners=False)
            if self.flip:  # an image and its flip share a size: one forward for both
                scaled = torch.cat([scaled, scaled.flip(-1)])
            scaled = scaled.contiguous(memory_format=self.memory_format)
            with precision_autocast(self.device, self.precision):
                out = self.model.localize(scaled, need_affinity=self.refine)
            maps = out.maps.float()  # (B or 2B) x C x h x w
            if self.refine:
                if out.affinity is None:
                    if not self._warned_no_affinity:
                        log.warning("refine=True but %s gives no patch affinity: maps are not refined",
                                    type(self.model).__name__)
                        self._warned_no_affinity = True
                else:
                    maps = affinity_refine(maps, out.affinity.float())
            for b in range(batch):
                if not len(keys[b]):
                    continue
                views = [maps[b, index[b]]] + ([maps[batch + b, index[b]]] if self.flip else [])
                up = F.interpolate(torch.stack(views), size=(height, width), mode="bilinear", align_corners=False)
                sums[b] += up[0] + (up[1].flip(-1) if self.flip else 0)
        if not normalize:
            return sums
        results = []
        for total in sums:
            low = total.amin(dim=(1, 2), keepdim=True)
            high = total.amax(dim=(1, 2), keepdim=True)
            results.append((total - low) / (high - low + 1e-8))
        return results


def _bg_threshold(run_dir: Path, split: str, given: Optional[float]) -> tuple[float, str]:
    if given is not None:
        return float(given), "given"
    path = run_dir / "eval" / f"{split}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["best"]["threshold"]), f"best threshold of {path}"
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: no best threshold readable (%s)", path, exc)
    return DEFAULT_BG_THRESHOLD, "default (no evaluation of this split in the run)"


MAP_SETTINGS_FILE = "settings.json"


def _map_settings(run_dir: Path, scales: Sequence[float], flip: bool, refine: bool, precision: str
                  ) -> dict[str, Any]:
    """What the maps of a split depend on: test-time options, precision and the checkpoint they were made with."""
    stat = (run_dir / "checkpoints" / "last.pth").stat()
    return {"scales": [float(s) for s in scales], "flip": bool(flip), "refine": bool(refine), "precision": precision,
            "checkpoint": {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}}


def _prepare_maps_dir(maps_dir: Path, settings: dict[str, Any]) -> None:
    """Keep existing map files only when they were made with ``settings``; otherwise remove them.

    Resuming reuses every valid map file, so maps made with other scales, flip, refinement or precision, or with
    an older checkpoint of the run, must not survive a rerun: they would be silently mixed with new ones.
    """
    path = maps_dir / MAP_SETTINGS_FILE
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
    existing = sorted(maps_dir.glob("*.npy"))
    if existing and previous != settings:
        why = "no readable settings file" if previous is None else f"settings {previous}"
        log.warning("%s: %d map file(s) made with %s, not the current %s: removing them to regenerate all",
                    maps_dir, len(existing), why, settings)
        for old in existing:
            old.unlink()
    if previous != settings:
        atomic_write_json(path, settings)


def infer(run_dir: str | Path, split: str, scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None,
          refine: Optional[bool] = None, pseudo_labels: bool = False, bg_threshold: Optional[float] = None,
          evaluate: bool = True, progress: bool = True, max_images: Optional[int] = None, *,
          precision: Optional[str] = None, device: Optional[str] = None,
          builders: Optional[Builders] = None) -> dict[str, Any]:
    """Write localization maps (and pseudo-labels) of ``split`` with a trained run; evaluate when GT exists.

    Args:
        run_dir: a training run directory (``checkpoints/last.pth``).
        split: dataset split (the run's ``cfg.data`` names the dataset and root).
        scales, flip, refine: test-time options; None takes the run's ``cfg.infer`` values.
        pseudo_labels: also write VOC-palette PNGs ``pseudo_labels/<split>/<id>.png``.
        bg_threshold: background plane of the pseudo-labels; None = the best threshold of
            ``eval/<split>.json`` when it exists (evaluation runs first), else 0.39.
        evaluate: evaluate the maps when the split has masks (``eval/<split>.json``).
        progress: progress bars (main process).
        max_images: only the first N images (None = ``cfg.infer.max_images``).
        precision: fp32 | fp16 | bf16 autocast of the forwards (None = ``cfg.infer.precision``).
        device: override the run's ``cfg.device`` (auto | cpu | cuda).
        builders: replace the model/dataset builders (as given to ``train``).

    Returns:
        The evaluation result (``evaluate_maps``) with an added ``"infer"`` entry of counts, or ``{}``
        when nothing was evaluated.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    builders = builders or Builders()
    model, cfg, class_names = model_from_run(run_dir, "cpu", builders)
    torch_device = init_distributed(device or cfg.device)
    model.to(torch_device)
    setup_logging(run_dir)
    scales = list(scales) if scales is not None else list(cfg.infer.scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected positive numbers, got {scales}")
    flip = cfg.infer.flip if flip is None else flip
    refine = cfg.infer.refine if refine is None else refine
    max_images = cfg.infer.max_images if max_images is None else max_images
    precision = cfg.infer.precision if precision is None else precision
    batch_size = resolve_batch_size(cfg.infer.batch_size, torch_device)
    generator = MapGenerator(model, scales, flip, refine, torch_device, precision)

    dataset = dataset_from_config(cfg, split, builders)
    if list(dataset.class_names) != class_names:
        raise DatasetError(f"split {split!r} of {cfg.data.root}: classes {list(dataset.class_names)} differ from "
                           f"the run's {class_names}")
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < len(dataset):
        dataset = _FirstImages(dataset, count)
    maps_dir = run_dir / "maps" / split
    maps_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        _prepare_maps_dir(maps_dir, _map_settings(run_dir, scales, flip, refine, precision))
    barrier()
    log.info("maps for %d image(s) of %r -> %s (scales %s, flip %s, refine %s, %s, batch %d)", count, split,
             maps_dir, scales, flip, refine, precision, batch_size)

    my_indices = shard(range(count))
    loader = DataLoader(_MapJobs(dataset, my_indices, maps_dir, builders.normalize), batch_size=None,
                        num_workers=cfg.data.num_workers, collate_fn=_identity,
                        pin_memory=torch_device.type == "cuda")
    counts: dict[str, Any] = {"written": 0, "reused": 0}
    writer = ThreadPoolExecutor(max_workers=2)  # compression + fsync overlap the next forward
    pending: list[Future[None]] = []
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)

    def run_bucket(size: tuple[int, int]) -> None:
        jobs = buckets.pop(size)
        images = torch.stack([job["image"] for job in jobs]).to(torch_device, non_blocking=True)
        for job, cam in zip(jobs, generator(images, [job["keys"] for job in jobs])):
            pending.append(writer.submit(save_map, maps_dir / f"{job['id']}.npy", job["keys"], cam.cpu().numpy()))
        counts["written"] += len(jobs)
        while len(pending) > 64:
            pending.pop(0).result()

    try:
        for job in tqdm(loader, total=len(my_indices), disable=not (progress and is_main_process()),
                        unit="img", desc=f"maps {split}", dynamic_ncols=True):
            if job["reused"]:
                counts["reused"] += 1
                continue
            size = tuple(job["image"].shape[-2:])
            buckets[size].append(job)
            if len(buckets[size]) >= batch_size:
                run_bucket(size)
            elif sum(len(b) for b in buckets.values()) > 4 * batch_size:
                # Many distinct sizes: bound the images held back by running the fullest bucket.
                run_bucket(max(buckets, key=lambda s: len(buckets[s])))
        for size in list(buckets):
            run_bucket(size)
        for future in pending:
            future.result()
    finally:
        writer.shutdown(wait=True)
    barrier()
    counts = sum_over_ranks(counts)
    log.info("maps: %d written, %d valid ones kept", counts["written"], counts["reused"])

    result: dict[str, Any] = {}
    if evaluate:
        result = _evaluate(run_dir, split, maps_dir, dataset, cfg, progress)
    if pseudo_labels:
        threshold, source = _bg_threshold(run_dir, split, bg_threshold)
        out_dir = run_dir / "pseudo_labels" / split
        log.info("pseudo-labels with background threshold %.3f (%s) -> %s", threshold, source, out_dir)
        ids = [dataset.ids[i] for i in my_indices]
        label_loader = DataLoader(_LabelJobs(ids, maps_dir, out_dir, threshold), batch_size=None,
                                  num_workers=cfg.data.num_workers, collate_fn=_identity)
        for _ in tqdm(label_loader, total=len(ids), disable=not (progress and is_main_process()), unit="img",
                      desc=f"pseudo-labels {split}", dynamic_ncols=True):
            pass
        barrier()
        counts["pseudo_labels"] = count
        counts["bg_threshold"] = threshold
    if result:
        result["infer"] = {"images": count, "scales": scales, "flip": flip, "refine": refine, "precision": precision,
                           "batch_size": batch_size, **counts}
    return result


def _evaluate(run_dir: Path, split: str, maps_dir: Path, dataset: Any, cfg: Any, progress: bool) -> dict[str, Any]:
    if not dataset.has_masks():
        log.info("split %r has no masks: maps are not evaluated", split)
        return {}
    result: list[Any] = [None]
    if is_main_process():
        try:
            from mmcst.engine.evaluate import evaluate_maps
        except ImportError as exc:
            raise RuntimeError(f"evaluation is not available in this installation ({exc}); "
                               "run infer with evaluate=False") from exc
        result[0] = evaluate_maps(maps_dir, dataset, cfg.eval, out=run_dir / "eval" / f"{split}.json",
                                  progress=progress)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return dict(result[0])
