"""File formats and safe writes: atomic files, localization-map files, palette PNGs.

Map files follow the IRN/ToCo convention: one ``.npy`` per image holding a pickled dict
``{"keys": int64 [K] present foreground class indices (0-based), "cam": float16 [K, H, W] in [0, 1]}``.
MCTformer's ``{class_index: HxW float map}`` dicts and PNG label maps are read too.
"""
from __future__ import annotations

import contextlib
import functools
import io as _io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
from PIL import Image


class MapFileError(ValueError):
    """A map or label file is missing, truncated or not in a known format."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and ``os.replace`` it into place on success.

    A killed process leaves at most a ``.tmp`` file, never a truncated ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# localization maps

def save_map(path: str | os.PathLike, keys: np.ndarray | list[int], cam: np.ndarray) -> None:
    """Save maps of the present classes: ``keys`` [K] 0-based class indices, ``cam`` [K, H, W] in [0, 1]."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cam = np.asarray(cam)
    if cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
        raise ValueError(f"cam must be [K, H, W] with K = len(keys) = {keys.shape[0]}, got {cam.shape}")
    buffer = _io.BytesIO()
    np.save(buffer, {"keys": keys, "cam": np.clip(cam, 0.0, 1.0).astype(np.float16)}, allow_pickle=True)
    atomic_write_bytes(path, buffer.getvalue())


def load_map(path: str | os.PathLike, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a map file as ``(keys int64 [K], cam float32 [K, H, W])``.

    Accepts the mmcst/IRN dict, MCTformer's ``{class_index: HxW}`` dict, and a plain [K, H, W] array is
    refused (the class indices would be unknown). ``dtype=None`` keeps the stored dtype (float16 for
    mmcst files), which evaluation uses to skip a conversion.
    """
    path = Path(path)
    try:
        obj = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise MapFileError(f"{path}: map file not found") from None
    except Exception as exc:
        raise MapFileError(f"{path}: unreadable map file ({exc})") from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise MapFileError(f"{path}: expected a dict {{'keys', 'cam'}} or {{class_index: HxW}}, got {type(obj).__name__}")
    if "cam" in obj and "keys" in obj:
        keys = np.asarray(obj["keys"], dtype=np.int64).reshape(-1)
        cam = np.asarray(obj["cam"], dtype=dtype)
        if cam.ndim == 2:
            cam = cam[None]
        if cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
            raise MapFileError(f"{path}: 'cam' has shape {cam.shape}, expected [{keys.shape[0]}, H, W]")
        return keys, cam
    try:
        items = sorted((int(k), np.asarray(v, dtype=dtype)) for k, v in obj.items())
    except (TypeError, ValueError) as exc:
        raise MapFileError(f"{path}: dict keys must be class indices or 'keys'/'cam' ({exc})") from exc
    if not items:
        return np.zeros(0, np.int64), np.zeros((0, 0, 0), dtype or np.float32)
    shapes = {v.shape for _, v in items}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MapFileError(f"{path}: class maps must all be HxW of one size, got {sorted(shapes)}")
    return np.array([k for k, _ in items], np.int64), np.stack([v for _, v in items])


def export_mctformer_map(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert one mmcst map file to MCTformer's ``{class_index: HxW float32}`` dict."""
    keys, cam = load_map(src)
    buffer = _io.BytesIO()
    np.save(buffer, {int(k): cam[i].astype(np.float32) for i, k in enumerate(keys)}, allow_pickle=True)
    atomic_write_bytes(dst, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# palette PNGs

def voc_palette(num: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class index), flat [R, G, B, ...] for PIL."""
    return list(_voc_palette(num))


@functools.lru_cache(maxsize=4)
def _voc_palette(num: int) -> tuple[int, ...]:
    palette = []
    for index in range(num):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Save an HxW label map (0 bg, 1..C classes, 255 ignore) as a VOC-palette PNG, atomically."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be HxW, got {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError("label values must be in 0..255")
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG (palette or greyscale) as an HxW uint8 array of indices."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise MapFileError(f"{path}: expected a palette or greyscale label PNG, got mode {image.mode}")
            return np.asarray(image).astype(np.uint8)
    except FileNotFoundError:
        raise MapFileError(f"{path}: label PNG not found") from None
    except MapFileError:
        raise
    except Exception as exc:
        raise MapFileError(f"{path}: unreadable label PNG ({exc})") from exc
