"""File formats and safe writes: atomic files, localization-map files, palette PNGs.

Map files follow the IRN/ToCo convention: one ``.npy`` per image holding a pickled dict
``{"keys": int64 [K] present foreground class indices (0-based), "cam": float16 [K, H, W] in [0, 1]}``.
MCTformer's ``{class_index: HxW float map}`` dicts and PNG label maps are read too.

Pickled ``.npy`` files come from other people, so they are read by :func:`safe_load_npy`, which rebuilds
numpy arrays, torch tensors and plain Python containers and refuses anything else: opening a file never
runs code from it.
"""
from __future__ import annotations

import contextlib
import functools
import io as _io
import json
import os
import pickle
import stat
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
from PIL import Image


class MapFileError(ValueError):
    """A map or label file is missing, truncated or not in a known format."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and ``os.replace`` it into place on success.

    A killed process leaves at most a ``.tmp`` file, never a truncated ``path``. The file ends with the
    permissions a plain ``open(path, "w")`` would give it: an existing file keeps its mode, a new one gets
    ``0o666 & ~umask`` (``mkstemp`` alone would leave it ``0o600``, unreadable to the user's group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; doing that once here, before any thread of ours runs,
    # avoids racing other threads' file creation on every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask: read from ``/proc/self/status`` where Linux provides it (exact and thread-safe),
    else the value it had when this module was imported."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


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
# pickled .npy files, read without running code

def safe_load_npy(path: str | os.PathLike, what: str = ".npy file") -> np.ndarray:
    """Read a ``.npy`` file like ``np.load`` does, without ever running code stored in it.

    Numeric arrays load with ``allow_pickle=False``. Object arrays (the pickled dicts of map files and
    ``cls_labels.npy``) are an npy header followed by a pickle stream; that stream is read by an unpickler
    that rebuilds only numpy arrays, dtypes and scalars (numpy 1 and 2 module paths), torch tensors as a
    plain ``pickle`` of a tensor stores them (IRN's map files), numbers, strings, bytes, lists, tuples,
    sets and dicts. Anything else raises :class:`MapFileError` naming the file and the refused global;
    ``what`` names the file's role in the other errors ("map file not found").
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            header = _read_npy_header(handle)
            if header is None or not header[2].hasobject:
                handle.seek(0)
                return np.load(handle, allow_pickle=False)
            array = _DataUnpickler(handle).load()
    except FileNotFoundError:
        raise MapFileError(f"{path}: {what} not found") from None
    except _NotData as exc:
        raise MapFileError(f"{path}: refused to load this {what}: {exc}") from None
    except Exception as exc:
        raise MapFileError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(array, np.ndarray):
        raise MapFileError(f"{path}: unreadable {what}: its pickle holds a {type(array).__name__}, not an array")
    return array


def _read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``(shape, fortran_order, dtype)`` of an npy file; ``None`` for versions this reader leaves to numpy."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(handle)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(handle)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(handle)
    return None  # version 3 is written only for structured dtypes with unicode field names, never pickled


class _NotData(pickle.UnpicklingError):
    """The pickle asks for something other than plain data to be built."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` hands out only the constructors of plain data."""

    def __init__(self, handle: IO[bytes]) -> None:
        # latin1 keeps numpy arrays pickled under Python 2 readable, as numpy recommends.
        super().__init__(handle, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # Python 2 pickles
        # torch is imported only for files that hold tensors.
        table = _torch_globals() if module.startswith("torch.") else _data_globals()
        constructor = table.get((module, name))
        if constructor is None:
            raise _NotData(f"it references {module}.{name}, which is not data (only numpy arrays, torch tensors, "
                           f"numbers, strings, lists and dicts are read)")
        return constructor


@functools.lru_cache(maxsize=1)
def _data_globals() -> dict[tuple[str, str], Any]:
    # The functions arrays and scalars pickle with, wherever this numpy keeps them. _reconstruct accepts
    # only ndarray subtypes, and ndarray is the only one reachable here.
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]

    def latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
        # Python 3 pickles bytes as _codecs.encode(text, "latin1") under protocol 2 (PSA's cls_labels.npy).
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _NotData(f"_codecs.encode is read only as (str, 'latin1'), got encoding {encoding!r}")
        return text.encode("latin1")

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): latin1_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
    }
    for multiarray in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1, numpy 2
        allowed[(multiarray, "_reconstruct")] = reconstruct
        allowed[(multiarray, "scalar")] = scalar
    return allowed


@functools.lru_cache(maxsize=1)
def _torch_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """Safe stand-ins for the two functions a plain pickle of a CPU tensor calls.

    ``torch.storage._load_from_bytes`` itself runs ``torch.load(weights_only=False)`` on the storage's bytes;
    here they go through ``torch.load(weights_only=True)``, torch's own restricted unpickler.
    """
    import torch
    from torch._utils import _rebuild_tensor_v2

    def rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, torch.storage.TypedStorage):
            raise _NotData(f"a tensor is rebuilt only from a tensor storage, got {type(storage).__name__}")
        if backward_hooks:
            raise _NotData("a tensor with backward hooks is not data")
        if metadata is not None and not isinstance(metadata, dict):
            raise _NotData(f"tensor metadata must be a dict, got {type(metadata).__name__}")
        return _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict(), metadata)

    def load_storage(data: bytes) -> Any:
        if not isinstance(data, bytes):
            raise _NotData(f"a tensor storage is read only from bytes, got {type(data).__name__}")
        try:
            storage = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message goes on to suggest weights_only=False; keep only what it refused.
            reason = next((line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()),
                          "torch's weights-only reader refused it")
            raise _NotData(f"a tensor storage in it holds more than tensor data ({reason})") from None
        if not isinstance(storage, torch.storage.TypedStorage):
            raise _NotData(f"a tensor storage in it holds a {type(storage).__name__}")
        return storage

    return {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor, ("torch.storage", "_load_from_bytes"): load_storage}


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

    Accepts the mmcst dict ``{keys, cam}``, IRN's ``{keys, cam, high_res}`` (torch tensors included) and
    ToCo's ``{keys, high_res}``: when ``high_res`` is present it is returned, since it is at image size while
    IRN's ``cam`` is at stride 4. MCTformer's ``{class_index: HxW}`` dict is read too; a plain [K, H, W] array
    is refused (the class indices would be unknown). ``dtype=None`` keeps the stored dtype (float16 for
    mmcst files), which evaluation uses to skip a conversion. The file is read by :func:`safe_load_npy`.
    """
    path = Path(path)
    obj = safe_load_npy(path, what="map file")
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise MapFileError(f"{path}: expected a dict {{'keys', 'cam' and/or 'high_res'}} or {{class_index: HxW}}, "
                           f"got {type(obj).__name__}")
    if "keys" in obj and ("cam" in obj or "high_res" in obj):
        field = "high_res" if "high_res" in obj else "cam"
        keys = np.asarray(obj["keys"], dtype=np.int64).reshape(-1)
        cam = np.asarray(obj[field], dtype=dtype)
        if cam.ndim == 2:
            cam = cam[None]
        if cam.ndim != 3 or cam.shape[0] != keys.shape[0]:
            raise MapFileError(f"{path}: {field!r} has shape {cam.shape}, expected [{keys.shape[0]}, H, W]")
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
