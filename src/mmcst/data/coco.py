"""MS COCO 2014 with image-level labels and semantic GT built from the instance annotations.

Layout::

    <root>/train2014/COCO_train2014_000000000009.jpg   (and val2014/)
    <root>/annotations/instances_train2014.json         (and instances_val2014.json)

Classes are the JSON's categories in sorted category-id order (1..90 with gaps -> contiguous 1..80 in
masks, 0..79 in label vectors); names come from the JSON. Labels: every category with at least one
annotation in the image, crowd annotations included (the object is there even if not delineated).

Semantic GT (the documented conversion; COCO ships none): start from background 0, paint the non-crowd
instances with their class index **largest area first**, so a small object lying on a large one stays
visible, then paint crowd regions 255 (ignore) last so they win. Masks are rendered with pycocotools
(``COCO.annToMask``: polygons and RLE alike) on first use and cached as palette PNGs under
``<root>/mmcst_semantic/<split>/<file stem>.png`` (or ``cache_dir``). A ``manifest.json`` beside them
records the annotation file's size and time, so an edited JSON invalidates the cache.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pycocotools.coco import COCO

from mmcst.data.base import DatasetError, ImageDataset, read_label_mask, register_dataset
from mmcst.io import atomic_write_json, save_label_png

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train2014", "val": "val2014"}
RENDER_RULE = "non-crowd instances painted largest area first; crowd regions = 255, painted last"
_MANIFEST_VERSION = 1
# The 80 categories of the COCO 2014 instances JSON in sorted category-id order, as the dataset reads them;
# for tools that need the class list without the dataset (e.g. the CLIP prompts of ``mmcst model summary``).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def load_coco(path: Path) -> COCO:
    """Load an instances JSON with pycocotools, turning its failures into errors that name the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: COCO instances JSON not found", path)
    try:
        # pycocotools prints progress to stdout; keep the CLI's output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})", path) from exc
    except (KeyError, TypeError, AssertionError) as exc:
        raise DatasetError(f"{path}: not a COCO instances file (expected 'images', 'annotations' and "
                           f"'categories'; {type(exc).__name__}: {exc})", path) from exc
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise DatasetError(f"{path}: not a COCO instances file (no {key!r} list)", path)
    return coco


def render_semantic(coco: COCO, image_id: int, category_to_label: dict[int, int]) -> np.ndarray:
    """Render one image's semantic mask (uint8 HxW) from its instances; see the module docstring."""
    info = coco.imgs[image_id]
    mask = np.zeros((int(info["height"]), int(info["width"])), np.uint8)
    anns = coco.imgToAnns.get(image_id, [])
    things = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: (-float(a.get("area", 0.0)), a["id"]))
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation; harmless.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        for ann in things:
            mask[coco.annToMask(ann) > 0] = category_to_label[ann["category_id"]]
        for ann in anns:
            if ann.get("iscrowd", 0):
                mask[coco.annToMask(ann) > 0] = 255
    return mask


@register_dataset("coco")
class COCODataset(ImageDataset):
    """COCO 2014 ``train2014`` / ``val2014`` (``train`` / ``val`` accepted)."""

    name = "coco"

    def __init__(self, root: str | Path, split: str, cache_dir: Optional[str | Path] = None) -> None:
        self.root = Path(root)
        self.split = SPLIT_ALIASES.get(split, split)
        self.annotation_file = self.root / "annotations" / f"instances_{self.split}.json"
        self.image_dir = self.root / self.split
        self.coco = load_coco(self.annotation_file)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder of split {self.split!r} not found", self.image_dir)

        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.class_names = [str(c["name"]) for c in categories]
        self.category_ids = [int(c["id"]) for c in categories]
        self.category_to_label = {cid: k + 1 for k, cid in enumerate(self.category_ids)}

        self.coco_ids = sorted(self.coco.imgs)
        self.file_names = [str(self.coco.imgs[i]["file_name"]) for i in self.coco_ids]
        self.ids = [Path(name).stem for name in self.file_names]
        if len(set(self.ids)) != len(self.ids):
            raise DatasetError(f"{self.annotation_file}: image file names are not unique by stem", self.annotation_file)

        self._labels = np.zeros((len(self.ids), self.num_classes), np.float32)
        row_of = {image_id: row for row, image_id in enumerate(self.coco_ids)}
        for ann in self.coco.dataset["annotations"]:
            if ann["category_id"] not in self.category_to_label:
                raise DatasetError(f"{self.annotation_file}: annotation {ann.get('id')} has category_id "
                                   f"{ann['category_id']}, which is not in 'categories'", self.annotation_file)
            if ann["image_id"] not in row_of:
                raise DatasetError(f"{self.annotation_file}: annotation {ann.get('id')} refers to image_id "
                                   f"{ann['image_id']}, which is not in 'images'", self.annotation_file)
            self._labels[row_of[ann["image_id"]], self.category_to_label[ann["category_id"]] - 1] = 1.0

        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "mmcst_semantic" / self.split
        self._manifest = {
            "annotation_file": self.annotation_file.name,
            "size": self.annotation_file.stat().st_size,
            "mtime_ns": self.annotation_file.stat().st_mtime_ns,
            "rule": RENDER_RULE,
            "version": _MANIFEST_VERSION,
        }
        self._cache_writable = True
        # Settle the cache before data-loader workers fork, so they never race to clear it.
        self._check_manifest()

    # ---------------------------------------------------------------------------------------------

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.file_names[i]

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) from the JSON."""
        info = self.coco.imgs[self.coco_ids[i]]
        return int(info["height"]), int(info["width"])

    def get_labels(self, i: int) -> np.ndarray:
        return self._labels[i].copy()

    def label_matrix(self) -> np.ndarray:
        return self._labels.copy()

    def has_masks(self) -> bool:
        return True

    def mask_path(self, i: int) -> Path:
        return self.cache_dir / f"{self.ids[i]}.png"

    def render_mask(self, i: int) -> np.ndarray:
        """Render image ``i``'s semantic mask from the instances (no cache)."""
        return render_semantic(self.coco, self.coco_ids[i], self.category_to_label)

    def get_mask(self, i: int) -> np.ndarray:
        mask = self._cached(i)
        if mask is None:
            mask = self.render_mask(i)
            self._write(self.mask_path(i), mask)
        return mask

    def _cached(self, i: int) -> Optional[np.ndarray]:
        """The cached PNG of image ``i`` if present and sound (a damaged one is rendered again)."""
        path = self.mask_path(i)
        if not path.is_file():
            return None
        try:
            mask = read_label_mask(path, self.num_classes)
        except DatasetError:
            return None
        return mask if mask.shape == self.image_size(i) else None

    def _check_manifest(self) -> None:
        """Drop cached PNGs rendered from a different annotation file (ours only: we wrote the manifest)."""
        manifest_path = self.cache_dir / "manifest.json"
        if manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous != self._manifest:
                try:
                    for png in self.cache_dir.glob("*.png"):
                        png.unlink(missing_ok=True)
                    atomic_write_json(manifest_path, self._manifest)
                except OSError as exc:
                    raise DatasetError(f"{self.cache_dir}: semantic-mask cache is stale (rendered from another "
                                       f"annotation file) and cannot be cleared ({exc}); pass cache_dir", manifest_path
                                       ) from exc

    def _ensure_manifest(self) -> None:
        if not (self.cache_dir / "manifest.json").is_file():
            atomic_write_json(self.cache_dir / "manifest.json", self._manifest)

    def _write(self, path: Path, mask: np.ndarray) -> None:
        """Cache a rendered mask; on a read-only dataset folder, warn once and keep rendering in memory."""
        if not self._cache_writable:
            return
        try:
            self._ensure_manifest()
            save_label_png(path, mask)
        except OSError as exc:
            self._cache_writable = False
            logger.warning("%s: cannot cache rendered semantic masks (%s); rendering them in memory instead "
                           "(pass cache_dir to a writable folder, or run `mmcst data coco-gt`)", self.cache_dir, exc)

    def render_all(self, progress: bool = False) -> int:
        """Render and cache every missing or stale mask; returns how many PNGs were written."""
        from tqdm import tqdm

        try:
            self._ensure_manifest()
        except OSError as exc:
            raise DatasetError(f"{self.cache_dir}: cannot write the semantic-mask cache ({exc})", self.cache_dir
                               ) from exc
        written = 0
        for i in tqdm(range(len(self)), desc=f"coco {self.split} GT", disable=not progress):
            if self._cached(i) is None:
                path = self.mask_path(i)
                try:
                    save_label_png(path, self.render_mask(i))
                except OSError as exc:
                    raise DatasetError(f"{path}: cannot write the rendered semantic mask ({exc})", path) from exc
                written += 1
        return written

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "split_file": str(self.annotation_file),
            "label_source": "instances JSON: categories present in the image (crowd included), "
                            "in sorted category-id order",
            "mask_source": f"rendered from instances JSON ({RENDER_RULE}), cached in {self.cache_dir}",
            "has_masks": True,
            "category_ids": list(self.category_ids),
            "images_without_annotations": int((self._labels.sum(1) == 0).sum()),
        })
        return info


def render_coco_semantic(root: str | Path, split: str, out_dir: Optional[str | Path] = None,
                         progress: bool = False) -> int:
    """Render the semantic GT PNGs of a COCO split (``mmcst data coco-gt``); returns the number written.

    Existing valid PNGs are kept, so an interrupted run resumes.
    """
    return COCODataset(root, split, cache_dir=out_dir).render_all(progress=progress)


