"""Plumbing shared by the WSSS stages (:mod:`mmcst.engine.affinity`, :mod:`mmcst.engine.seg`).

* :func:`stage_config` — the run's config (``config.yaml``, or a stage checkpoint's) with ``wsss.*`` overrides.
* :class:`PolyTrainer` — SGD with a poly schedule over PSA-style parameter groups: resumable sampling and
  checkpoints (an interrupted run ends with the weights of an uninterrupted one), bf16 autocast on CUDA, DDP
  under ``torchrun``, a NaN stop, a time budget, ``metrics.jsonl`` and ``summary.json``.
* :func:`prepare_output_dir` / :func:`png_is_valid` / :class:`ImageJobs` — resumable folders of per-image PNGs:
  files made with other settings are removed, valid ones are kept and their images not even decoded.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmcst.config import Config, ConfigError, from_dict, load_config, to_yaml
from mmcst.data.wsss import dataset_image, dataset_image_size
from mmcst.engine.distributed import (
    all_reduce_flags, autocast, barrier, flush_subnormals, is_main_process, rank, world_size,
)
from mmcst.engine.randomness import rng_state, seed_everything, seed_worker, set_rng_state
from mmcst.engine.rundir import MetricsWriter, file_log, log, setup_logging, write_env
from mmcst.engine.train import (
    NonFiniteLossError,
    ResumableBatchSampler,
    RunExistsError,
    collate,
    config_from_checkpoint,
    load_checkpoint,
    load_model_state,
    to_device,
)
from mmcst.io import MapFileError, atomic_save_torch, atomic_write_json, atomic_write_text, load_label_png

# Keys a WSSS stage may override: its own section, and where the data and the device are now. The rest of the
# run's config describes the localization maps the stages start from.
OVERRIDABLE = ("wsss.", "device=", "seed=", "data.root=", "data.num_workers=", "data.skip_bad=")
SETTINGS_FILE = "settings.json"


# --------------------------------------------------------------------------------------------------
# configs and checkpoints


def _check_overrides(overrides: Sequence[str]) -> None:
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ConfigError(f"overrides must be key=value, got {malformed}")
    bad = [o for o in overrides if not o.startswith(OVERRIDABLE)]
    if bad:
        raise ConfigError(f"overrides {bad}: the WSSS stages take wsss.*, device, seed, data.root, data.num_workers "
                          "and data.skip_bad (the run's other settings describe the maps they start from)")


def stage_config(run_dir: str | Path, overrides: Sequence[str] = (), stored: Optional[str] = None) -> Config:
    """The config a WSSS stage runs with.

    ``stored`` (a stage's recorded config YAML) when given, else the run's ``config.yaml`` (else the config in
    its ``checkpoints/last.pth``); then ``overrides``.
    """
    _check_overrides(overrides)
    run_dir = Path(run_dir)
    if stored is None:
        path = run_dir / "config.yaml"
        if path.is_file():
            return load_config(path, list(overrides))
        checkpoint = run_dir / "checkpoints" / "last.pth"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml and no checkpoints/last.pth)")
        stored = to_yaml(config_from_checkpoint(load_checkpoint(checkpoint), checkpoint))
    try:
        merged = OmegaConf.merge(OmegaConf.create(stored), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides {list(overrides)}: {exc}") from exc
    return from_dict(OmegaConf.to_container(merged))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# resumable output folders


def png_is_valid(path: Path, size: Optional[tuple[int, int]]) -> bool:
    """True when ``path`` is a readable label PNG (of ``size`` = (H, W) when known)."""
    if not path.is_file():
        return False
    try:
        label = load_label_png(path)
    except MapFileError:
        return False
    return size is None or label.shape == tuple(size)


def prepare_output_dir(out_dir: Path, settings: dict[str, Any], pattern: str = "*.png",
                       settings_file: Optional[Path] = None) -> None:
    """Keep the files of ``out_dir`` only when they were made with ``settings`` (recorded in ``settings_file``,
    default ``out_dir/settings.json``); otherwise remove them, so that a rerun with other settings never mixes old
    and new files. Main process only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = settings_file or out_dir / SETTINGS_FILE
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    existing = sorted(out_dir.glob(pattern))
    if existing and previous != settings:
        why = "no readable settings file" if previous is None else f"settings {previous}"
        log.warning("%s: %d file(s) made with %s, not the current %s: removing them to regenerate all", out_dir,
                    len(existing), why, settings)
        for old in existing:
            old.unlink()
    if previous != settings:
        atomic_write_json(path, settings)


def file_stamp(path: Path) -> dict[str, int]:
    """Size and modification time: what tells a rewritten checkpoint or settings file from the one used before."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_settings(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / SETTINGS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def broadcast_from_main(value: Any) -> Any:
    """``value`` of the main process on every rank (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(action: Callable[[], Any]) -> Any:
    """Run ``action`` on the main process; every rank gets its result, or its error after the barrier."""
    result, error = None, None
    if is_main_process():
        try:
            result = action()
        except Exception as exc:  # re-raised on every rank below, so no process waits forever
            error = exc
    failed = broadcast_from_main(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"the main process failed: {failed}")
    return broadcast_from_main(result)


def identity(item: Any) -> Any:
    return item


class ImageJobs(Dataset):  # type: ignore[type-arg]
    """Base of the per-image jobs of a data loader that writes one PNG per image into each of ``out_dirs``.

    :meth:`load` decodes the image only when one of its outputs is missing or invalid (the image's size is read
    from the file header where the dataset has ``image_path``), so a resumed run skips finished images quickly.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], out_dirs: Sequence[Path]) -> None:
        self.dataset, self.indices, self.out_dirs = dataset, list(indices), list(out_dirs)

    def __len__(self) -> int:
        return len(self.indices)

    def done(self, image_id: str, size: Optional[tuple[int, int]]) -> bool:
        return all(png_is_valid(folder / f"{image_id}.png", size) for folder in self.out_dirs)

    def load(self, j: int) -> tuple[str, Optional[torch.Tensor]]:
        """``(id, image)``; image None when every output of the image is already valid."""
        index = self.indices[j]
        image_id = str(self.dataset.ids[index])
        size = dataset_image_size(self.dataset, index)
        if size is not None and self.done(image_id, size):
            return image_id, None
        image = dataset_image(self.dataset, index)
        if size is None and self.done(image_id, tuple(image.shape[-2:])):
            return image_id, None
        return image_id, image


# --------------------------------------------------------------------------------------------------
# training


class PolyTrainer:
    """One training run of a WSSS network (one object per process).

    Args:
        stage: ``affinity`` or ``seg``: the ``wsss`` section, the checkpoint format, the progress-bar label.
        stage_dir: where ``config.yaml``, ``env.json``, ``log.txt``, ``metrics.jsonl``, ``summary.json`` and
            ``checkpoints/last.pth`` go.
        cfg: the resolved config (stored in every checkpoint).
        section: ``cfg.wsss.affinity`` or ``cfg.wsss.seg`` (batch_size, epochs, max_steps, lr, momentum,
            weight_decay, poly_power, psa_optimizer_quirk, amp, time_budget_s, log_every, checkpoint_every).
        model: the network whose ``state_dict`` is saved, built by the caller after seeding.
        train_module: what runs forward (``model`` or a wrapper of it; DDP wraps this one).
        param_groups: optimizer groups with ``lr_mult`` (``lr_param_groups``), decay already set.
        samples: dataset of ``(epoch, index)`` keys (:class:`mmcst.engine.train.TrainSamples`).
        loss_fn: ``(outputs, batch) -> (loss, {name: value})`` for the forward's outputs.
        record: values stored in checkpoints and the summary (class names, label folder, ...).
        memory_format: layout of the weights and inputs (channels-last on CUDA where it helps).
    """

    def __init__(self, *, stage: str, stage_dir: Path, cfg: Config, section: Any, model: nn.Module,
                 train_module: nn.Module, param_groups: list[dict[str, Any]], samples: Dataset,  # type: ignore[type-arg]
                 loss_fn: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 record: dict[str, Any], resume: bool, progress: bool, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.stage, self.stage_dir, self.cfg, self.section = stage, stage_dir, cfg, section
        self.model, self.loss_fn, self.record = model, loss_fn, record
        self.progress, self.device, self.memory_format = progress, device, memory_format
        self.checkpoint_format = f"mmcst-{stage}-checkpoint-v1"
        self.config_yaml = to_yaml(cfg)
        self.last_path = stage_dir / "checkpoints" / "last.pth"
        if self.last_path.is_file() and not resume:
            raise RunExistsError(f"{stage_dir} already holds a checkpoint: pass resume=True (--resume) to continue "
                                 "it, or remove the folder to start again")
        checkpoint = None
        if resume and self.last_path.is_file():
            checkpoint = load_checkpoint(self.last_path, self.checkpoint_format, "resume")
            load_model_state(model, checkpoint["model"], self.last_path)
            self._warn_config_changes(checkpoint["config"])
        elif resume:
            log.info("resume: no checkpoint in %s, starting from scratch", self.last_path.parent)

        self.world = world_size()
        if section.batch_size % self.world or len(samples) < section.batch_size:  # type: ignore[arg-type]
            raise ConfigError(f"wsss.{stage}.batch_size: {section.batch_size} must be divisible by the {self.world} "
                              f"process(es) and at most the {len(samples)} training images")  # type: ignore[arg-type]
        self.sampler = ResumableBatchSampler(len(samples), section.batch_size, cfg.seed, rank(), self.world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = section.max_steps if section.max_steps is not None else \
            section.epochs * self.steps_per_epoch
        self.base_lr = float(section.lr)
        momentum = section.weight_decay if section.psa_optimizer_quirk else section.momentum
        self.optimizer = torch.optim.SGD(param_groups, lr=self.base_lr, momentum=momentum)
        workers = cfg.data.num_workers
        self.loader = DataLoader(samples, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                                 pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                                 persistent_workers=workers > 0,
                                 # A private generator: starting a loader must not consume the global RNG (resume).
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.step = self.epoch = self.position = 0
        self.elapsed = 0.0
        self.run_started, self.elapsed_before_run = time.perf_counter(), 0.0
        self.skipped: list[str] = []
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.step, self.epoch, self.position = checkpoint["step"], checkpoint["epoch"], checkpoint["position"]
            self.elapsed = float(checkpoint["elapsed_s"])
            self.skipped = list(checkpoint["skipped"])
            states = checkpoint["rng"]
            set_rng_state(states[rank()] if len(states) == self.world else states[0])
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.last_path, self.step, self.epoch,
                     self.position)
        else:
            seed_everything(cfg.seed + rank())  # per-rank streams for dropout
        if is_main_process():
            atomic_write_text(stage_dir / "config.yaml", self.config_yaml)
            write_env(stage_dir, cfg.seed, device)
            file_log.info("resolved config:\n%s", self.config_yaml)
            log.info("%s: %d training images, %d steps/epoch, %d steps in all; SGD lr %.3g (poly %.2f), momentum %g%s, "
                     "batch %d over %d process(es)", stage, len(samples), self.steps_per_epoch, self.total_steps,
                     self.base_lr, section.poly_power, momentum,
                     " (PSA optimiser quirk: weight decay as momentum)" if section.psa_optimizer_quirk else "",
                     section.batch_size, self.world)
        self.metrics = MetricsWriter(stage_dir / "metrics.jsonl",
                                     truncate_after_step=self.step if is_main_process() else None)
        self.model.to(device, memory_format=memory_format)
        self.forward_module: nn.Module = train_module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(train_module, device_ids=ids)

    def _warn_config_changes(self, stored_yaml: str) -> None:
        stored = OmegaConf.to_container(OmegaConf.create(stored_yaml))
        current = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        old = stored.get("wsss", {}).get(self.stage, {})  # type: ignore[union-attr]
        new = current["wsss"][self.stage]  # type: ignore[index]
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            log.warning("resume: wsss.%s differs from the checkpoint's in %s (using the new values)", self.stage,
                        changed)

    def _set_lr(self) -> None:
        """Poly schedule at the current step; with a time budget, at the share of the budget used when larger."""
        progress = self.step / self.total_steps
        if self.section.time_budget_s is not None:
            elapsed = self.elapsed_before_run + time.perf_counter() - self.run_started
            progress = max(progress, min(1.0, elapsed / max(self.section.time_budget_s, 1e-9)))
        factor = max(0.0, 1.0 - progress) ** self.section.poly_power
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_mult", 1.0) * factor

    def run(self) -> Path:
        with flush_subnormals(self.device):
            return self._run()

    def _run(self) -> Path:
        from tqdm import tqdm

        section = self.section
        budget = section.time_budget_s
        stopped_by = "max_steps" if section.max_steps is not None else "epochs"
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=self.stage, dynamic_ncols=True,
                   disable=not (self.progress and is_main_process()))
        self.run_started, self.elapsed_before_run = time.perf_counter(), self.elapsed
        saved_at = self.step if self.last_path.is_file() else -1
        last_logs: dict[str, float] = {}
        window_start, window_images = time.perf_counter(), 0
        self.model.train()
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch, self.position)
                for batch in self.loader:
                    self._note_skipped(batch["skipped"])
                    images_here = len(batch["id"])
                    if self.cfg.data.skip_bad and all_reduce_flags([images_here == 0], self.device)[0]:
                        self.position += 1  # every image of this batch was unreadable on some rank
                        continue
                    logs = self._train_step(to_device(batch, self.device))
                    self.step += 1
                    self.position += 1
                    window_images += images_here * self.world
                    bar.update(1)
                    self.elapsed = self.elapsed_before_run + time.perf_counter() - self.run_started
                    if self.step % section.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        last_logs = {k: float(v) for k, v in logs.items()}
                        speed = window_images / max(now - window_start, 1e-9)
                        window_start, window_images = now, 0
                        self.metrics.write({"step": self.step, "epoch": self.epoch,
                                            "lr": self.optimizer.param_groups[0]["lr"], **last_logs,
                                            "images_per_s": speed})
                        bar.set_postfix({**{k: f"{v:.4f}" for k, v in last_logs.items()}, "img/s": f"{speed:.1f}"})
                    if section.checkpoint_every and self.step % section.checkpoint_every == 0:
                        self._save()
                        saved_at = self.step
                    if self.step >= self.total_steps:
                        break
                    if budget is not None and all_reduce_flags([self.elapsed >= budget], self.device)[0]:
                        stopped_by = "time_budget"
                        break
                if self.position >= self.steps_per_epoch:
                    self.epoch += 1
                    self.position = 0
                    self._save()
                    saved_at = self.step
                if stopped_by == "time_budget":
                    break
        finally:
            bar.close()
        if saved_at != self.step:
            self._save()
        self._write_summary(stopped_by, last_logs)
        return self.stage_dir

    def _train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self._set_lr()
        with autocast(self.device, self.section.amp):
            images = batch["image"].contiguous(memory_format=self.memory_format)
            outputs = self.forward_module(images)
        loss, logs = self.loss_fn(outputs, batch)
        # One host sync per step: the price of stopping before a NaN reaches the weights.
        if all_reduce_flags([float(not torch.isfinite(loss.detach()))], self.device)[0]:
            kept = f"the last good checkpoint {self.last_path} is kept" if self.last_path.is_file() else \
                "no checkpoint was written yet"
            bad = {k: float(v) for k, v in logs.items() if not np.isfinite(float(v))}
            where = f"term(s) {bad}" if bad else "on another process"
            raise NonFiniteLossError(f"{self.stage}: non-finite loss at step {self.step + 1} (epoch {self.epoch}): "
                                     f"{where}; training stopped, {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}

    def _note_skipped(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self.skipped:
                self.skipped.append(message)
                log.warning("skipped unreadable sample: %s", message)

    def _save(self) -> None:
        states: list[Any] = [rng_state()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng_state())
        if not is_main_process():
            return
        atomic_save_torch(self.last_path, {
            "format": self.checkpoint_format,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "elapsed_s": self.elapsed,
            "rng": states,
            "config": self.config_yaml,
            "skipped": self.skipped,
            **self.record,
        })

    def _write_summary(self, stopped_by: str, last_logs: dict[str, float]) -> None:
        skipped = self.skipped
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.skipped)
            skipped = sorted({m for part in gathered for m in part})
        if not is_main_process():
            return
        images = self.step * self.section.batch_size
        atomic_write_json(self.stage_dir / "summary.json", {
            "stage": self.stage,
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs_completed": self.epoch,
            "stopped_by": stopped_by,
            "time_s": self.elapsed,
            "images_per_s": images / self.elapsed if self.elapsed > 0 else None,
            "final_losses": last_logs,
            "skipped_files": skipped,
            "world_size": self.world,
            "checkpoint": str(self.last_path),
            **self.record,
        })
        log.info("%s training finished (%s): %d steps in %.1f s; final losses %s", self.stage, stopped_by, self.step,
                 self.elapsed, {k: round(v, 5) for k, v in last_logs.items()})


def start_stage_logging(stage_dir: Path) -> None:
    """Create ``stage_dir`` (main process) and log to its ``log.txt``."""
    if is_main_process():
        (stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier()
    setup_logging(stage_dir)


__all__ = ["OVERRIDABLE", "ImageJobs", "PolyTrainer", "broadcast_from_main", "file_stamp", "identity",
           "png_is_valid", "prepare_output_dir", "read_settings", "run_on_main", "stage_config",
           "start_stage_logging"]
