"""Method registry: ``@register_model("name")`` on a factory ``(model_cfg, class_names) -> LocalizationModel``."""
from __future__ import annotations

from typing import Any, Callable, Sequence

_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = factory
        return factory
    return deco


def model_names() -> list[str]:
    _import_all()
    return sorted(_MODELS)


def build_model(model_cfg: Any, class_names: Sequence[str]) -> Any:
    """Build the method named ``model_cfg.name`` for ``class_names`` (class names only: no dataset knowledge)."""
    _import_all()
    if model_cfg.name not in _MODELS:
        raise ValueError(f"model.name: unknown method {model_cfg.name!r}; expected one of {sorted(_MODELS)}")
    return _MODELS[model_cfg.name](model_cfg, list(class_names))


def _import_all() -> None:
    from mmcst.models import cam, mctformer, mmcst  # noqa: F401
