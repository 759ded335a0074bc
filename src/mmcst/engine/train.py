"""Training loop: resumable sampling, AdamW with warm-up + cosine schedule, bf16 autocast, DDP, atomic checkpoints.

``train(cfg)`` writes ``<out_dir>/<name>/`` (see :mod:`mmcst.engine.rundir`) and returns it. The model is
whatever ``cfg.model.name`` builds; the engine only calls ``forward``, ``loss``, ``classify``,
``no_weight_decay`` and the optional hooks of ``mmcst.models.base``. ``train(cfg, resume=True)`` continues from
``checkpoints/last.pth`` so that an interrupted run ends with the weights an uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmcst.config import Config, ConfigError, TrainConfig, flatten, from_dict, to_yaml
from mmcst.data.base import DatasetError
from mmcst.engine.builders import Builders, dataset_from_config
from mmcst.engine.distributed import (
    all_reduce_flags, autocast, barrier, flush_subnormals, init_distributed, is_main_process, memory_format_of, rank,
    shard, world_size,
)
from mmcst.engine.randomness import rng_state, sample_seed, seed_everything, seed_worker, set_rng_state
from mmcst.engine.rundir import (
    MetricsWriter, file_log, log, make_run_dirs, run_directory, setup_logging, write_config, write_env,
)
from mmcst.io import atomic_save_torch, atomic_write_json
from mmcst.metrics.classification import CHANCE_MARGIN, at_chance, chance_map, mean_average_precision

CHECKPOINT_FORMAT = "mmcst-checkpoint-v1"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or Inf; the message names the step and the term(s)."""


class RunExistsError(FileExistsError, ValueError):
    """The run directory already holds a checkpoint and ``resume`` was not asked for."""


# --------------------------------------------------------------------------------------------------
# data


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with python, numpy and torch-CPU RNGs seeded to ``seed``, restoring them afterwards.

    Augmentation seeded per sample this way does not depend on the process's RNG history, so a resumed
    run (or a different number of workers) draws exactly the same crops.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableBatchSampler:
    """Epoch-seeded permutation cut into global batches (incomplete last batch dropped).

    Each rank takes every ``world_size``-th element of each global batch, so the union of the ranks'
    batches is the batch a single process would see. ``set_epoch(epoch, start)`` resumes mid-epoch at
    global batch ``start``. Items are ``(epoch, index)`` pairs so the dataset can seed per-sample
    augmentation from them.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size: {batch_size} is not divisible by the {world_size} processes")
        if num_samples < batch_size:
            raise ConfigError(f"train.batch_size: {batch_size} is larger than the {num_samples} training images")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_samples // batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.permutation(self.epoch)
        for b in range(self.start, self.steps_per_epoch):
            chunk = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            yield [(self.epoch, int(i)) for i in chunk]

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start)


class TrainSamples(Dataset):  # type: ignore[type-arg]
    """Dataset items through the training transform, augmentation seeded from ``(seed, epoch, index)``.

    With ``skip_bad`` a :class:`DatasetError` while loading returns ``{"skipped": message}``, which
    :func:`collate` drops from the batch. With ``cache`` decoded samples stay in memory (per loading
    process: meant for small datasets). ``extras`` (``{name: {image id: tensor}}``, the model's
    ``training_extras``) adds each image's entries to its sample, so they follow the sampler's order.
    """

    def __init__(self, dataset: Any, transform: Any, seed: int, skip_bad: bool, cache: bool = False,
                 extras: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skip_bad = skip_bad
        self.cache: Optional[dict[int, dict[str, Any]]] = {} if cache else None
        self.extras = extras or {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        sample = self.cache.get(index) if self.cache is not None else None
        if sample is None:
            try:
                sample = self.dataset[index]
            except DatasetError as exc:
                if not self.skip_bad:
                    raise
                return {"skipped": str(exc)}
            if self.cache is not None:
                self.cache[index] = sample
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            out = self.transform(sample)
        for name, table in self.extras.items():
            value = table.get(str(sample["id"]))
            if value is None:
                raise KeyError(f"the model's per-image input {name!r} has no entry for training image {sample['id']!r}")
            out[name] = value
        return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape, keep other values as lists; gather skipped-file messages."""
    good = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {"skipped": [s["skipped"] for s in samples if "skipped" in s], "id": []}
    if not good:
        return batch
    for key in good[0]:
        values = [s[key] for s in good]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif all(v is None for v in values):
            batch[key] = None
        else:
            batch[key] = values
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# optimisation


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) and on ``model.no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(train_cfg: TrainConfig) -> float:
    return train_cfg.lr * train_cfg.batch_size / 512 if train_cfg.scale_lr else train_cfg.lr


def lr_at(step: int, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, steps_per_epoch: int, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    base_lr = scaled_lr(train_cfg)
    if base_lr <= 0:
        raise ConfigError(f"train.lr: expected a positive learning rate, got {train_cfg.lr}")
    optimizer = torch.optim.AdamW(parameter_groups(model, train_cfg.weight_decay), lr=base_lr, eps=1e-8,
                                  fused=device.type == "cuda")
    warmup_steps = min(total_steps, round(train_cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_at(step, base_lr, train_cfg.warmup_lr, train_cfg.min_lr, warmup_steps, total_steps) / base_lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------
# classification mAP monitor


class _ValSamples(Dataset):  # type: ignore[type-arg]
    """Whole images resized to the training size (the monitor batches them), normalised."""

    def __init__(self, dataset: Any, indices: Sequence[int], normalize: Any, size: int, skip_bad: bool) -> None:
        self.dataset, self.indices, self.normalize = dataset, indices, normalize
        self.size, self.skip_bad = size, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index = self.indices[j]
        try:
            sample = self.dataset[index]
        except DatasetError as exc:
            if not self.skip_bad:
                raise
            return {"skipped": str(exc)}
        image = self.normalize(sample["image"])[None].float()
        image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        return {"id": sample["id"], "image": image, "labels": sample["labels"].float(), "index": index}


@torch.inference_mode()
def classification_map(model: nn.Module, dataset: Any, cfg: Config, builders: Builders, device: torch.device,
                       batch_size: int) -> tuple[float, float]:
    """Classification mAP of ``model.classify`` on ``dataset`` (sharded over ranks, gathered), and the mAP a
    random ranking of the same labels is expected to reach (``chance_map``)."""
    samples = _ValSamples(dataset, shard(range(len(dataset))), builders.normalize, cfg.data.image_size,
                          cfg.data.skip_bad)
    loader = DataLoader(samples, batch_size=batch_size, num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    was_training = model.training
    model.eval()
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    try:
        for batch in loader:
            if not batch["id"]:
                continue
            with autocast(device, cfg.train.amp):
                images = batch["image"].to(device, non_blocking=True)
                logits = model.classify(images.contiguous(memory_format=memory_format_of(model)))
            scores.append(logits.float().cpu().numpy())
            targets.append(batch["labels"].numpy())
    finally:
        model.train(was_training)
    local = (np.concatenate(scores) if scores else np.zeros((0, len(dataset.class_names))),
             np.concatenate(targets) if targets else np.zeros((0, len(dataset.class_names))))
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
    return mean_average_precision(*local), chance_map(local[1])


# --------------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: Path, checkpoint_format: str = CHECKPOINT_FORMAT, hint: str = "") -> dict[str, Any]:
    """Read an mmcst checkpoint of ``checkpoint_format`` (tensors and plain Python values only, so ``weights_only``
    loading works); ``hint`` says in the error what the checkpoint was wanted for."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f" ({hint})" if hint else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != checkpoint_format:
        raise ValueError(f"{path}: not an mmcst checkpoint (expected format {checkpoint_format!r})")
    return checkpoint


def config_from_checkpoint(checkpoint: dict[str, Any], path: Path) -> Config:
    try:
        return from_dict(OmegaConf.to_container(OmegaConf.create(checkpoint["config"])))  # type: ignore[arg-type]
    except (ConfigError, KeyError) as exc:
        raise ValueError(f"{path}: the stored config does not fit this version's schema ({exc})") from exc


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and the keys that do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{name}: {head(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"{path}: checkpoint does not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state)


def model_from_run(run_dir: str | Path, device: str | torch.device = "cpu",
                   builders: Optional[Builders] = None) -> tuple[nn.Module, Config, list[str]]:
    """Load the model of a run from ``checkpoints/last.pth``; returns ``(model in eval mode, cfg, class_names)``."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / "last.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint in run directory {run_dir} (train it first)")
    checkpoint = load_checkpoint(path)
    cfg = config_from_checkpoint(checkpoint, path)
    class_names = list(checkpoint["class_names"])
    model = (builders or Builders()).model(cfg.model, class_names)
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg, class_names


# --------------------------------------------------------------------------------------------------
# the loop


class _Trainer:
    """State of one training run (one object per process)."""

    def __init__(self, cfg: Config, resume: bool, progress: bool, builders: Builders, device: torch.device) -> None:
        self.cfg = cfg
        self.config_yaml = to_yaml(cfg)  # once: every checkpoint stores it, and rendering it is not cheap
        self.progress = progress
        self.builders = builders
        self.device = device
        self.run_dir = run_directory(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pth"
        if self.last_path.is_file() and not resume:
            raise RunExistsError(f"{self.run_dir} already holds a checkpoint: pass resume=True (--resume) to "
                                  "continue it, or choose another name")
        if is_main_process():
            make_run_dirs(self.run_dir)
        barrier()
        setup_logging(self.run_dir)
        checkpoint = load_checkpoint(self.last_path) if resume and self.last_path.is_file() else None
        if resume and checkpoint is None:
            log.info("resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
        if checkpoint is not None and "optimizer" not in checkpoint:
            source = checkpoint.get("imported_from", {}).get("path", "another code base")
            raise ValueError(f"{self.last_path}: holds model weights only (imported from {source}): there is no "
                             "training state to resume")
        if checkpoint is not None:
            self._warn_config_changes(config_from_checkpoint(checkpoint, self.last_path))
        if cfg.train.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

        # Same seed on every rank for the data and the initial weights (DDP also broadcasts rank 0's).
        seed_everything(cfg.seed)
        self.dataset = dataset_from_config(cfg, cfg.data.train_split, builders)
        self.class_names = list(self.dataset.class_names)
        self.model: nn.Module = builders.model(cfg.model, self.class_names)
        if checkpoint is not None:
            if list(checkpoint["class_names"]) != self.class_names:
                raise ValueError(f"{self.last_path}: checkpoint classes {checkpoint['class_names']} differ from "
                                 f"the dataset's {self.class_names}")
            load_model_state(self.model, checkpoint["model"], self.last_path)
        self.memory_format = memory_format_of(self.model)
        self.model.to(self.device, memory_format=self.memory_format)

        self.world = world_size()
        self.sampler = ResumableBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.seed, rank(), self.world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps is not None else \
            cfg.train.epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.train, self.steps_per_epoch,
                                                         self.total_steps, self.device)
        extras = self._training_extras()
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            TrainSamples(self.dataset, builders.train_transform(cfg.data), cfg.seed, cfg.data.skip_bad,
                         cfg.data.cache_images, extras),
            batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", worker_init_fn=seed_worker, persistent_workers=workers > 0,
            # A private generator: creating a loader iterator must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(cfg.seed),
        )

        self.step = 0
        self.epoch = 0
        self.position = 0  # global batches done in the current epoch
        self.elapsed = 0.0  # training seconds, summed over resumed attempts
        self.warmup_ended_s: Optional[float] = None  # training seconds at the end of the warm-up (time budgets)
        self.skipped: list[str] = []
        self.val_map: Optional[float] = None
        self.val_chance: Optional[float] = None  # the mAP a random ranking reaches on the validation labels
        self.validated_at = -1  # step of the last validation
        self.calibration: dict[str, Any] = {}
        self.val_dataset: Any = None
        self.val_unavailable = False
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.step, self.epoch, self.position = checkpoint["step"], checkpoint["epoch"], checkpoint["position"]
            self.elapsed = float(checkpoint["elapsed_s"])
            self.warmup_ended_s = checkpoint.get("warmup_ended_s")
            self.skipped = list(checkpoint["skipped"])
            self.val_map = checkpoint.get("val_map")
            self.val_chance = checkpoint.get("val_chance")
            self.calibration = checkpoint.get("calibration") or {}
            states = checkpoint["rng"]
            set_rng_state(states[rank()] if len(states) == self.world else states[0])
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.last_path, self.step, self.epoch,
                     self.position)
        else:
            seed_everything(cfg.seed + rank())  # per-rank streams for dropout / stochastic depth

        if is_main_process():
            write_config(self.run_dir, cfg)
            env = write_env(self.run_dir, cfg.seed, self.device)
            log.info("run directory: %s", self.run_dir)
            log.info("resolved config: %s", self.run_dir / "config.yaml")
            file_log.info("resolved config:\n%s", self.config_yaml)
            log.info("environment: %s", {k: env[k] for k in ("python", "torch", "torchvision", "timm", "open_clip",
                                                              "device", "cuda_device", "git_revision")})
            log.info("seed %d; %d training images (%s), %d classes; %d steps/epoch, %d steps in all; "
                     "lr %.3g (batch %d over %d process(es))", cfg.seed, len(self.dataset), cfg.data.train_split,
                     len(self.class_names), self.steps_per_epoch, self.total_steps, scaled_lr(cfg.train),
                     cfg.train.batch_size, self.world)
            for report in getattr(self.model, "weight_report", lambda: [])():
                log.info("pretrained weights: %s", report)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl",
                                     truncate_after_step=self.step if is_main_process() else None)
        if checkpoint is None:
            self.calibration = self._calibrate()

        self.forward_model: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.train.compile:
            self.forward_model = torch.compile(self.forward_model)  # type: ignore[assignment]

    def _calibrate(self) -> dict[str, Any]:
        """The model's data-dependent start (``calibrate`` hook) on the first global batch, on every rank.

        Every rank computes it from the same images (the batch that step 1 trains on), so all start alike. It runs
        in training mode without gradients; RNG streams and buffers (e.g. BatchNorm statistics) are restored.
        """
        hook = getattr(self.model, "calibrate", None)
        if hook is None:
            return {}
        samples = self.loader.dataset
        order = self.sampler.permutation(0)[:self.cfg.train.batch_size]
        batch = collate([samples[(0, int(i))] for i in order])
        if not batch["id"]:
            return {}
        batch = to_device(batch, self.device)
        buffers = {name: value.clone() for name, value in self.model.named_buffers()}
        devices = [self.device.index if self.device.index is not None else 0] if self.device.type == "cuda" else []
        self.model.train()
        with torch.random.fork_rng(devices=devices), autocast(self.device, self.cfg.train.amp):
            record = hook(batch["image"].contiguous(memory_format=self.memory_format), batch["labels"])
        with torch.no_grad():
            for name, value in self.model.named_buffers():
                value.copy_(buffers[name])
        if record:
            log.info("first-batch calibration: %s", record)
            self.metrics.write({"step": 0, "calibration": record})
        return dict(record)

    def _training_extras(self) -> dict[str, dict[str, torch.Tensor]]:
        """The model's per-image training inputs (``training_extras`` hook), computed before training.

        The main process goes first: it writes the cache files that the other processes then read.
        """
        hook = getattr(self.model, "training_extras", None)
        if hook is None:
            return {}
        extras: dict[str, dict[str, torch.Tensor]] = {}
        error: Optional[Exception] = None
        for turn in (True, False):
            if is_main_process() == turn:
                try:
                    extras = hook(self.dataset, self.run_dir / "cache")
                except Exception as exc:  # re-raised after the barrier so no process waits forever
                    error = exc
            barrier()
        if error is not None:
            raise error
        for name, table in extras.items():
            log.info("per-image model input %r: %d training images", name, len(table))
        return extras

    def _warn_config_changes(self, stored: Config) -> None:
        old = OmegaConf.to_container(OmegaConf.structured(stored))
        new = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        old_flat = flatten(old)
        changed = [key for key, value in flatten(new).items() if old_flat.get(key) != value]
        if changed:
            log.warning("resume: config differs from the checkpoint's in %s (using the new values)", changed)

    # ----------------------------------------------------------------------------------------------

    def run(self) -> Path:
        with flush_subnormals(self.device):
            return self._run()

    def _run(self) -> Path:
        from tqdm import tqdm

        cfg = self.cfg.train
        stopped_by = "max_steps" if cfg.max_steps is not None else "epochs"
        last_terms: dict[str, float] = {}
        budget = cfg.time_budget_s
        bar_options = {"disable": not (self.progress and is_main_process()), "dynamic_ncols": True}
        if budget is None:
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=self.cfg.name, **bar_options)
        else:
            # A budgeted run ends on the clock, usually long before its scheduled steps: the bar counts seconds.
            bar = tqdm(total=budget, initial=min(self.elapsed, budget), unit="s",
                       desc=f"{self.cfg.name} step {self.step}", **bar_options,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                  "[{elapsed}<{remaining}{postfix}]")
        started = time.perf_counter()
        elapsed_before = self.elapsed
        self.run_started, self.elapsed_before_run = started, elapsed_before
        window_start, window_images = time.perf_counter(), 0
        terms: dict[str, torch.Tensor] = {}
        saved_at = self.step if self.last_path.is_file() else -1
        self.model.train()
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch, self.position)
                steps_before, batches_seen = self.step, 0
                for batch in self.loader:
                    batches_seen += 1
                    self._note_skipped(batch["skipped"])
                    images_here = len(batch["id"])
                    if self.cfg.data.skip_bad and all_reduce_flags([images_here == 0], self.device)[0]:
                        self.position += 1  # every image of this batch was unreadable on some rank
                        continue
                    terms, stats = self._train_step(to_device(batch, self.device))
                    self.step += 1
                    self.position += 1
                    window_images += images_here * self.world
                    if budget is None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        last_terms = {k: float(v.detach()) for k, v in terms.items()}
                        speed = window_images / max(now - window_start, 1e-9)
                        window_start, window_images = now, 0
                        record = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                                  "loss": sum(last_terms.values()), **last_terms, "images_per_s": speed, **stats}
                        self.metrics.write(record)
                        bar.set_postfix({**{k: f"{v:.4f}" for k, v in last_terms.items()}, "img/s": f"{speed:.1f}"})
                    self.elapsed = elapsed_before + time.perf_counter() - started
                    if budget is not None:
                        bar.set_description_str(f"{self.cfg.name} step {self.step}", refresh=False)
                        bar.update(min(self.elapsed, budget) - bar.n)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._save()
                        saved_at = self.step
                    if self.step >= self.total_steps:
                        break
                    if cfg.time_budget_s is not None and \
                            all_reduce_flags([self.elapsed >= cfg.time_budget_s], self.device)[0]:
                        stopped_by = "time_budget"
                        break
                if self.position >= self.steps_per_epoch:
                    if batches_seen and self.step == steps_before:
                        raise DatasetError(f"no readable training image in a whole epoch of split "
                                           f"{self.cfg.data.train_split!r} (skipped: {self.skipped[:3]} ...)")
                    self._end_epoch()
                    saved_at = self.step
                if stopped_by == "time_budget":
                    break
        finally:
            bar.close()
        self.elapsed = elapsed_before + time.perf_counter() - started
        if self.validated_at != self.step and self.step > 0:
            # Stopped mid-epoch (time budget, max_steps): the monitor reports the weights the run ends with.
            self._record_validation()
        if saved_at != self.step:
            self._save()
        if terms and not last_terms:
            last_terms = {k: float(v.detach()) for k, v in terms.items()}
        self._write_summary(stopped_by, last_terms)
        return self.run_dir

    def _train_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        with autocast(self.device, self.cfg.train.amp):
            images = batch["image"].contiguous(memory_format=self.memory_format)
            outputs = self.forward_model(images, batch["labels"], extras=batch)
            terms = self.model.loss(outputs, batch)
        total = torch.stack([t.float() for t in terms.values()]).sum()
        # One host sync per step: the price of stopping before a NaN reaches the weights.
        if all_reduce_flags([float(not torch.isfinite(total))], self.device)[0]:
            bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v.detach()).all()}
            where = f"term(s) {bad}" if bad else "on another process"
            kept = f"the last good checkpoint {self.last_path} is kept" if self.last_path.is_file() else \
                "no checkpoint was written yet"
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}): {where}; "
                                     f"training stopped, {kept}")
        if self.cfg.train.time_budget_s is not None:
            self._follow_time_budget()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.train.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.optimizer.step()
        if self.cfg.train.time_budget_s is None:
            self.scheduler.step()
        logged = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == self.total_steps
        monitor = getattr(self.model, "monitor", None)
        return terms, (monitor(outputs) if logged and monitor is not None else {})

    def _follow_time_budget(self) -> None:
        """With a wall-clock budget the schedule runs on whichever ends first, steps or time.

        The warm-up counts optimizer steps (``warmup_epochs``, as without a budget); the cosine after it runs on
        ``max(step progress, time progress)``, the time progress being the share of the budget left after the
        warm-up that has elapsed, so a run cut by its budget still ends at ``min_lr`` instead of stopping near
        the top of its schedule, and its schedule has the shape of a step-limited run of the same length. Such
        runs depend on timing, so they are not bitwise repeatable; step-limited runs are.
        """
        cfg = self.cfg.train
        elapsed = self.elapsed_before_run + time.perf_counter() - self.run_started
        base_lr = scaled_lr(cfg)
        warmup_steps = min(self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch))
        if self.step < warmup_steps:
            lr = lr_at(self.step, base_lr, cfg.warmup_lr, cfg.min_lr, warmup_steps, self.total_steps)
        else:
            if self.warmup_ended_s is None:
                self.warmup_ended_s = elapsed
            left = cfg.time_budget_s - self.warmup_ended_s
            by_time = 1.0 if left <= 0 else min(1.0, (elapsed - self.warmup_ended_s) / left)
            by_steps = (self.step - warmup_steps) / max(1, self.total_steps - warmup_steps)
            progress = min(1.0, max(by_time, by_steps))
            lr = cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _note_skipped(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self.skipped:
                self.skipped.append(message)
                log.warning("skipped unreadable sample: %s", message)

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._record_validation()
        self._save(epoch_copy=self.cfg.train.keep_epoch_checkpoints)

    def _record_validation(self) -> None:
        self.val_map = self._validate()
        self.validated_at = self.step
        record = {"step": self.step, "epoch": self.epoch, "val_map": self.val_map, "val_chance": self.val_chance}
        self.metrics.write(record)
        if self.val_map is not None:
            log.info("step %d (epoch %d): classification mAP on %s = %.2f (chance %.2f)", self.step, self.epoch,
                     self.cfg.data.val_split, 100 * self.val_map, 100 * (self.val_chance or float("nan")))

    def _validate(self) -> Optional[float]:
        if self.val_unavailable:
            return None
        if self.val_dataset is None:
            try:
                self.val_dataset = dataset_from_config(self.cfg, self.cfg.data.val_split, self.builders)
            except (DatasetError, FileNotFoundError) as exc:
                self.val_unavailable = True
                log.info("classification mAP skipped: split %r is not available (%s)", self.cfg.data.val_split, exc)
                return None
        per_rank = max(1, self.cfg.train.batch_size // self.world)
        value, chance = classification_map(self.model, self.val_dataset, self.cfg, self.builders, self.device,
                                           per_rank)
        self.val_chance = None if math.isnan(chance) else chance
        return None if math.isnan(value) else value

    def _save(self, epoch_copy: bool = False) -> None:
        states: list[Any] = [rng_state()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng_state())
        if not is_main_process():
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "elapsed_s": self.elapsed,
            "warmup_ended_s": self.warmup_ended_s,
            "rng": states,
            "config": self.config_yaml,
            "class_names": self.class_names,
            "skipped": self.skipped,
            "val_map": self.val_map,
            "val_chance": self.val_chance,
            "calibration": self.calibration,
        }
        atomic_save_torch(self.last_path, checkpoint)
        if epoch_copy:
            atomic_save_torch(self.ckpt_dir / f"epoch_{self.epoch:03d}.pth", checkpoint)

    def _write_summary(self, stopped_by: str, last_terms: dict[str, float]) -> None:
        skipped = self.skipped
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.skipped)
            skipped = sorted({m for part in gathered for m in part})
        if not is_main_process():
            return
        images = self.step * self.cfg.train.batch_size
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs_completed": self.epoch,
            "stopped_by": stopped_by,
            "time_s": self.elapsed,
            "images_per_s": images / self.elapsed if self.elapsed > 0 else None,
            "final_losses": last_terms,
            "val_map": self.val_map,
            "val_map_chance": self.val_chance,
            "classification_at_chance": None if self.val_map is None or self.val_chance is None else
            at_chance(self.val_map, self.val_chance),
            "calibration": self.calibration,
            "skipped_files": skipped,
            "world_size": self.world,
            "checkpoint": str(self.last_path),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        if summary["classification_at_chance"]:
            log.warning("the final classification mAP on %s (%.1f) is within %.0f points of chance (%.1f): the model "
                        "has not learned its classes, so its maps carry little class evidence",
                        self.cfg.data.val_split, 100 * self.val_map, 100 * CHANCE_MARGIN, 100 * self.val_chance)
        log.info("training finished (%s): %d steps in %.1f s; final losses %s%s", stopped_by, self.step,
                 self.elapsed, {k: round(v, 5) for k, v in last_terms.items()},
                 f"; {len(skipped)} unreadable file(s) skipped" if skipped else "")


def train(cfg: Config, resume: bool = False, progress: bool = True, *, builders: Optional[Builders] = None) -> Path:
    """Train ``cfg``'s method on ``cfg.data``; returns the run directory ``<out_dir>/<name>``.

    Args:
        cfg: a validated config (``mmcst.config.load_config``).
        resume: continue from ``checkpoints/last.pth`` (model, optimizer, schedule, sampler position, RNG).
            Without it, an existing checkpoint in the run directory is an error.
        progress: show a progress bar (main process only).
        builders: replace the model/dataset/transform builders (custom methods or datasets).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; ``cfg.train.batch_size`` is global.
    """
    device = init_distributed(cfg.device)
    return _Trainer(cfg, resume, progress, builders or Builders(), device).run()
