"""Dataset checks and label export (``mmcst data check`` / ``mmcst data export-labels``).

``check_dataset`` opens every image of a split (a full decode, so truncated JPEGs are caught), reads
every label and mask, and collects each problem with the file it is in, instead of stopping at the
first one as training would.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from mmcst.data.base import DatasetError, build_dataset
from mmcst.io import atomic_write_bytes


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``problems`` holds ``(path, message)`` pairs."""

    dataset: str
    root: str
    split: str
    n_images: int = 0
    n_with_masks: int = 0
    n_without_labels: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, exc: Exception, fallback: Path | str) -> None:
        path = getattr(exc, "path", None) or fallback
        message = str(exc)
        prefix = f"{path}: "
        self.problems.append((str(path), message[len(prefix):] if message.startswith(prefix) else message))


def _image_size(path: Path) -> tuple[int, int]:
    """Fully decode an image (``verify`` checks the structure, ``load`` the pixel data); returns (H, W)."""
    if not path.is_file():
        raise DatasetError(f"{path}: listed in the split but the image file is missing", path)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({exc})", path) from exc
    return height, width


def check_dataset_instance(dataset: Any, progress: bool = False) -> CheckReport:
    """Check an already-built dataset (see ``check_dataset``)."""
    from tqdm import tqdm

    report = CheckReport(dataset=getattr(dataset, "name", type(dataset).__name__), root=str(dataset.root),
                         split=str(dataset.split), n_images=len(dataset))
    counts = np.zeros(len(dataset.class_names), np.int64)
    for i in tqdm(range(len(dataset)), desc=f"check {report.dataset} {report.split}", disable=not progress):
        image_path = dataset.image_path(i)
        size: Optional[tuple[int, int]] = None
        try:
            size = _image_size(image_path)
        except DatasetError as exc:
            report.add(exc, image_path)
        try:
            labels = dataset.get_labels(i)
            counts += labels > 0
            report.n_without_labels += int(not labels.any())
        except DatasetError as exc:
            report.add(exc, image_path)
        try:
            mask = dataset.get_mask(i)
        except DatasetError as exc:
            # A mask reader that needs the image header fails again on a missing image: report it once.
            if not (size is None and getattr(exc, "path", None) == image_path):
                report.add(exc, image_path)
            continue
        if mask is None:
            continue
        report.n_with_masks += 1
        if size is not None and tuple(mask.shape) != size:
            mask_path = getattr(dataset, "mask_path", None)
            where = mask_path(i) if callable(mask_path) and mask_path(i) else image_path
            report.problems.append((str(where), f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                                                f"{image_path.name} is {size[1]}x{size[0]}"))
    report.class_counts = {name: int(n) for name, n in zip(dataset.class_names, counts)}
    report.description = dataset.describe()
    return report


def check_dataset(name: str, root: str | Path, split: str, progress: bool = False, **opts: Any) -> CheckReport:
    """Build dataset ``name`` and check every image, label and mask of ``split``.

    Problems found: split lists naming missing images, unreadable or truncated images, masks with values
    outside 0..C/255 or of another size than their image, XML naming an unknown class, missing
    annotation files. A dataset that cannot even be opened (missing split file, bad metadata) gives a
    report with that single problem.
    """
    try:
        dataset = build_dataset(name, root, split, **opts)
    except DatasetError as exc:
        report = CheckReport(dataset=name, root=str(root), split=split)
        report.add(exc, root)
        return report
    return check_dataset_instance(dataset, progress=progress)


def format_report(report: CheckReport, max_problems: int = 50) -> str:
    """Human-readable summary: counts, per-class image counts, problems."""
    lines = [
        f"dataset {report.dataset} split {report.split} at {report.root}",
        f"images: {report.n_images}   with masks: {report.n_with_masks}   without labels: {report.n_without_labels}",
    ]
    for key in ("split_file", "label_source", "mask_source"):
        if report.description.get(key):
            lines.append(f"{key.replace('_', ' ')}: {report.description[key]}")
    if report.class_counts:
        width = max(len(name) for name in report.class_counts)
        lines.append("images per class:")
        lines += [f"  {name:<{width}}  {count}" for name, count in report.class_counts.items()]
    if report.ok:
        lines.append("no problems found")
    else:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  {path}: {message}" for path, message in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"  ... and {len(report.problems) - max_problems} more")
    return "\n".join(lines)


def export_labels(dataset: Any, path: str | Path) -> int:
    """Write the dataset's labels as a PSA-style ``cls_labels.npy`` ({id: float32 [C]}); returns the count."""
    matrix = dataset.label_matrix().astype(np.float32)
    labels = {image_id: matrix[row] for row, image_id in enumerate(dataset.ids)}
    buffer = io.BytesIO()
    np.save(buffer, labels, allow_pickle=True)
    atomic_write_bytes(path, buffer.getvalue())
    return len(labels)
