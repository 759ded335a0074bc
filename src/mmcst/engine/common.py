"""Plumbing shared by training and inference: run directories, logging, devices, seeding, distributed set-up.

A run directory ``<out_dir>/<name>/`` holds ``config.yaml`` (resolved), ``env.json`` (versions, seed, git
revision, command line), ``log.txt``, ``metrics.jsonl``, ``checkpoints/``, ``maps/<split>/``,
``pseudo_labels/<split>/`` and ``eval/``. Distributed runs are configured from the environment that
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mmcst.config import Config, ConfigError, DataConfig, ModelConfig, to_yaml
from mmcst.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mmcst")
# Long records (the resolved config) go to log.txt only, not to any console.
file_log = logging.getLogger("mmcst.run_file")
file_log.propagate = False

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --------------------------------------------------------------------------------------------------
# pluggable builders


def _default_train_transform(data: DataConfig) -> Callable[[dict[str, Any]], dict[str, Any]]:
    from mmcst.data.transforms import train_transform

    return train_transform(data.image_size, data.augment, data.rrc_scale_min)


def _default_normalize(image: torch.Tensor) -> torch.Tensor:
    from mmcst.data.transforms import normalize

    return normalize(image)


def _default_build_model(model_cfg: ModelConfig, class_names: Sequence[str]) -> Any:
    from mmcst.models.registry import build_model

    return build_model(model_cfg, class_names)


def _default_build_dataset(name: str, root: str, split: str, **kwargs: Any) -> Any:
    from mmcst.data.base import build_dataset

    return build_dataset(name, root, split, **kwargs)


@dataclass
class Builders:
    """The pieces the engine builds from a config; replace any of them to train a custom model or dataset.

    Every callable must be a top-level function (picklable) so that data-loader workers and spawned
    distributed processes can use it.

    Attributes:
        model: ``(model_cfg, class_names) -> LocalizationModel``.
        dataset: ``(name, root, split, **kwargs) -> dataset`` following ``mmcst.data.base``'s contract.
        train_transform: ``(data_cfg) -> callable(sample) -> sample`` with a float normalised S x S image.
        normalize: ``uint8 3xHxW -> float`` ImageNet-normalised image (inference and the mAP monitor).
    """

    model: Callable[[ModelConfig, Sequence[str]], Any] = field(default=_default_build_model)
    dataset: Callable[..., Any] = field(default=_default_build_dataset)
    train_transform: Callable[[DataConfig], Callable[[dict[str, Any]], dict[str, Any]]] = field(
        default=_default_train_transform)
    normalize: Callable[[torch.Tensor], torch.Tensor] = field(default=_default_normalize)


def dataset_kwargs(data: DataConfig) -> dict[str, Any]:
    """Keyword arguments for ``build_dataset`` that the config implies (only those a dataset needs)."""
    kwargs: dict[str, Any] = {}
    if data.dataset == "synthetic":
        kwargs.update(n_train=data.synthetic_train, n_val=data.synthetic_val, size=data.synthetic_size,
                      seed=data.synthetic_seed)
    if data.labels_file is not None:
        if data.dataset not in ("voc", "synthetic"):
            raise ConfigError(f"data.labels_file: only the voc and synthetic datasets read a cls_labels.npy, "
                              f"not {data.dataset!r}")
        kwargs["labels_file"] = data.labels_file
    return kwargs


def dataset_from_config(cfg: Config, split: str, builders: Optional[Builders] = None) -> Any:
    """Build ``split`` of the dataset described by ``cfg.data``.

    In a distributed run the main process builds it first (datasets may generate or cache files on
    first use), then the others.
    """
    builders = builders or Builders()

    def build() -> Any:
        return builders.dataset(cfg.data.dataset, cfg.data.root, split, **dataset_kwargs(cfg.data))

    if not (dist.is_available() and dist.is_initialized()):
        return build()
    dataset, error = None, None
    for turn in (True, False):
        if is_main_process() == turn:
            try:
                dataset = build()
            except Exception as exc:  # re-raised after the barrier so no process waits forever
                error = exc
        barrier()
    if error is not None:
        raise error
    return dataset


# --------------------------------------------------------------------------------------------------
# run directories


def run_directory(cfg: Config) -> Path:
    return Path(cfg.out_dir) / cfg.name


def make_run_dirs(run_dir: Path) -> None:
    for sub in ("checkpoints", "maps", "pseudo_labels", "eval"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)


def write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def _git_revision() -> Optional[str]:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    revision = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                           capture_output=True, text=True, timeout=5)
    return revision + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info(seed: int, device: torch.device) -> dict[str, Any]:
    """Versions, hardware, seed, git revision and command line of this process."""
    from mmcst import __version__

    info: dict[str, Any] = {
        "mmcst": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "open_clip": _version("open_clip_torch"),
        "numpy": np.__version__,
        "device": str(device),
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "world_size": world_size(),
        "seed": seed,
        "git_revision": _git_revision(),
        "command": sys.argv,
    }
    return info


def write_env(run_dir: Path, seed: int, device: torch.device) -> dict[str, Any]:
    info = environment_info(seed, device)
    atomic_write_json(run_dir / "env.json", info)
    return info


# --------------------------------------------------------------------------------------------------
# logging


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Console handler that prints above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never crash the run
            self.handleError(record)


_HANDLER_MARK = "_mmcst_engine_handler"


def setup_logging(run_dir: Optional[Path]) -> logging.Logger:
    """Log ``mmcst.*`` records to ``run_dir/log.txt`` (main process) and to the console.

    The console handler is added only when the application has not configured logging itself (no
    root handler); otherwise records propagate to its handlers. Other ranks print warnings only.
    Calling it again (a second run in one process) replaces the handlers it added before.
    """
    for logger in (log, file_log):
        for handler in list(logger.handlers):
            if getattr(handler, _HANDLER_MARK, False):
                logger.removeHandler(handler)
                handler.close()
    log.setLevel(logging.INFO)
    file_log.setLevel(logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT)
    if not logging.getLogger().handlers:
        console = _TqdmHandler()
        console.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        console.setFormatter(formatter)
        setattr(console, _HANDLER_MARK, True)
        log.addHandler(console)
    if run_dir is not None and is_main_process():
        for logger in (log, file_log):
            handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
            handler.setFormatter(formatter)
            setattr(handler, _HANDLER_MARK, True)
            logger.addHandler(handler)
    return log


class MetricsWriter:
    """Appends one JSON record per line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, truncate_after_step: Optional[int] = None) -> None:
        self.path = path
        if truncate_after_step is not None and path.is_file():
            # A resumed run repeats the steps after its checkpoint: drop their records from the killed attempt.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not is_main_process():
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------
# devices and seeds


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available (``cuda:LOCAL_RANK``), else CPU; ``cuda`` without a GPU is an error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available (use device=auto or device=cpu)")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def memory_format_of(model: Any) -> torch.memory_format:
    """The layout a model asks for its weights and inputs (``LocalizationModel.memory_format``)."""
    return getattr(model, "memory_format", torch.contiguous_format)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp`` (bf16 has fp32's range: no loss scaler); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. ``seed, epoch, index``), independent of any RNG history."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_worker(worker_id: int) -> None:
    """Data-loader ``worker_init_fn``: derive python/numpy seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, ints, tail = state["python"]
    random.setstate((version, tuple(ints), tail))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# distributed


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device_choice: str) -> torch.device:
    """Select the device and, when ``WORLD_SIZE > 1``, join the process group (NCCL on GPU, gloo on CPU).

    The group is created once per process and kept for later calls (``train`` then ``infer`` in one
    ``torchrun`` script): tearing it down and re-creating it races between ranks. It is destroyed at exit.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_choice, local_rank())
    if size <= 1 or dist.is_initialized():
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {missing} are not set: launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    atexit.register(_destroy_process_group)
    return device


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_flags(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise max of small flags over ranks (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's disjoint share of ``indices`` (every ``world_size``-th element)."""
    return list(indices)[rank()::world_size()]
