"""The pieces the engine builds from a config (model, dataset, transforms), replaceable for custom methods."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from mmcst.config import Config, ConfigError, DataConfig, ModelConfig
from mmcst.engine.distributed import barrier, is_main_process

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


