"""Run directories and logging.

A run directory ``<out_dir>/<name>/`` holds ``config.yaml`` (resolved), ``env.json`` (versions, seed, git
revision, command line), ``log.txt``, ``metrics.jsonl``, ``checkpoints/``, ``maps/<split>/``,
``pseudo_labels/<split>/`` and ``eval/``.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mmcst.config import Config, to_yaml
from mmcst.engine.distributed import is_main_process, world_size
from mmcst.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mmcst")
# Long records (the resolved config) go to log.txt only, not to any console.
file_log = logging.getLogger("mmcst.run_file")
file_log.propagate = False

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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


