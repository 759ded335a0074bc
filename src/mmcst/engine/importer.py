"""Import the MCTformer checkpoints the authors released (or that their ``main.py`` wrote) as mmcst runs.

``import_mctformer(ckpt, run_dir, "v1" | "v2")`` writes a run directory (``config.yaml``, ``env.json``,
``log.txt``, ``checkpoints/last.pth`` in mmcst's format) from which ``mmcst infer RUN --split S --scales 1.0
--flip --refine`` gives the maps of the official generation command (``main.py --gen_attention_maps
--attention-type fused --layer-index 3 --patch-attn-refine --scales 1.0``). The run's config is
``configs/voc/mctformer_{v1,v2}.yaml`` with the settings that reproduce the official arithmetic:

* ``model.backbone.pos_embed_resize=official``: MCTformer resizes position embeddings for other input sizes
  with a plain bicubic scale factor ``(n + 0.1) / sqrt(N)``, not timm's antialiased resize;
* ``model.backbone.weights=null``: every weight comes from the imported file.

Maps are computed in float32 (``infer.precision``'s default); the official generation autocasts to float16 on
CUDA, which rounds differently (``--precision fp16`` is the closest mmcst setting).

Everything else (class-to-patch attention of the last 3 layers summed, V2's product with ReLU(PatchCAM),
refinement by the patch affinity summed over all layers, bilinear upsampling, flip, sum, min-max) is what
mmcst's MCTformer already computes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mmcst.config import Config, ConfigError, load_config, to_yaml
from mmcst.data.base import VOC_CLASSES
from mmcst.engine.rundir import environment_info, log, make_run_dirs, setup_logging, write_config
from mmcst.engine.train import CHECKPOINT_FORMAT, RunExistsError
from mmcst.io import atomic_save_torch, atomic_write_json
from mmcst.models.weights import MCTFORMER_VERSIONS, convert_official_mctformer, load_state_dict_file, sha256_file

# ``mmcst model import --format`` -> MCTformer version.
IMPORT_FORMATS = {"mctformer_v1": "v1", "mctformer_v2": "v2"}

# Settings of the official generation command that differ from the configs' defaults (user overrides win).
OFFICIAL_MAP_SETTINGS = ("model.backbone.pos_embed_resize=official",)

# What the official generation command uses (``run.sh``); a config that differs is imported with a warning.
_OFFICIAL_MCTFORMER = {"layer_index": 3, "attention_reduce": "sum", "fusion": "product"}


def default_import_config(version: str) -> Path:
    """``configs/voc/mctformer_{version}.yaml`` of the project's configs folder."""
    from mmcst.engine.demo import config_dir

    return config_dir() / "voc" / f"mctformer_{version}.yaml"


def import_mctformer(checkpoint: str | Path, run_dir: str | Path, version: str, overrides: Sequence[str] = (),
                     config: Optional[str | Path] = None) -> Path:
    """Write an mmcst run directory holding an official MCTformer-V1/V2 checkpoint.

    Args:
        checkpoint: the official file, ``{'model': state_dict, ...}`` of ``deit_small_MCTformerV1_patch16_224``
            or ``deit_small_MCTformerV2_patch16_224`` with the 20 VOC classes in the standard order.
        run_dir: the run directory to create (its name and parent become ``name`` and ``out_dir``).
        version: ``v1`` or ``v2``.
        overrides: ``key=value`` config overrides, e.g. ``data.root=/data/VOCdevkit/VOC2012``.
        config: YAML config (default ``configs/voc/mctformer_{version}.yaml``).

    Returns:
        ``run_dir``. Nothing is written when the file does not fit (the error names it and the keys).
    """
    if version not in MCTFORMER_VERSIONS:
        raise ValueError(f"MCTformer version: expected one of {list(MCTFORMER_VERSIONS)}, got {version!r}")
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found (the official main.py writes checkpoint.pth "
                                "and checkpoint_best.pth in its --output_dir)")
    last = run_dir / "checkpoints" / "last.pth"
    if last.exists():
        raise RunExistsError(f"{run_dir} already holds a checkpoint ({last}): import into another directory")
    config_path = Path(config) if config is not None else default_import_config(version)
    forced = ["model.backbone.weights=null", f"name={run_dir.name}", f"out_dir={run_dir.parent}"]
    cfg = load_config(config_path, [*OFFICIAL_MAP_SETTINGS, *overrides, *forced])
    differing = _check_config(cfg, version, config_path)

    from mmcst.models.registry import build_model

    state = load_state_dict_file(checkpoint)
    model = build_model(cfg.model, VOC_CLASSES)
    converted, notes = convert_official_mctformer(state, version, model.state_dict(), source=str(checkpoint))
    model.load_state_dict(converted)  # strict: the conversion covers every tensor of the model

    digest = sha256_file(checkpoint)
    source = {"format": f"mctformer_{version}", "path": str(checkpoint.resolve()), "sha256": digest, "notes": notes}
    make_run_dirs(run_dir)
    setup_logging(run_dir)
    log.info("imported %s (sha256 %s) as MCTformer-%s: %d tensors", checkpoint, digest[:12], version.upper(),
             len(converted))
    for note in notes:
        log.info("  %s", note)
    log.info("config: %s with %s", config_path, [*OFFICIAL_MAP_SETTINGS, *overrides, *forced])
    if differing:
        log.warning("model.mctformer %s differs from the official generation command's %s: the maps will differ "
                    "from the official ones", differing, {k: _OFFICIAL_MCTFORMER[k] for k in differing})
    write_config(run_dir, cfg)
    env = environment_info(cfg.seed, torch.device("cpu"))
    env["imported_from"] = source
    atomic_write_json(run_dir / "env.json", env)
    atomic_save_torch(last, {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": to_yaml(cfg),
        "class_names": list(VOC_CLASSES),
        "imported_from": source,
    })
    log.info("run directory: %s (maps: mmcst infer %s --split train --scales 1.0 --flip --refine)", run_dir, run_dir)
    return run_dir


def _check_config(cfg: Config, version: str, path: Path) -> dict[str, Any]:
    """Raise unless ``cfg`` builds MCTformer ``version``; return the map settings that differ from the official."""
    if cfg.model.name != "mctformer" or cfg.model.mctformer.version != version:
        raise ConfigError(f"{path}: builds model {cfg.model.name!r} version {cfg.model.mctformer.version!r}, "
                          f"expected mctformer {version} for an MCTformer-{version.upper()} checkpoint")
    return {key: getattr(cfg.model.mctformer, key) for key, value in _OFFICIAL_MCTFORMER.items()
            if getattr(cfg.model.mctformer, key) != value}


# --------------------------------------------------------------------------------------------------
# a trained CAM classifier's trunk, as the initialisation of AffinityNet and the segmenter


def export_backbone(run_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write the ResNet trunk of a trained ``cam`` run as a plain timm/torchvision ResNet state dict.

    PSA initialises AffinityNet from its own trained CAM classifier (``res38_cls.pth``); this is the same step
    for a CAM run of mmcst on a timm ResNet: ``wsss.affinity.weights`` / ``wsss.seg.weights`` (with the same
    ``backbone`` name) then start from the classifier trained on the dataset's image-level labels. The
    classifier's 1x1 convolution is dropped. Returns ``{"path", "backbone", "tensors", "step"}``.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.name != "cam":
        raise ConfigError(f"{run_dir / 'config.yaml'}: model.name is {cfg.model.name!r}; only a cam run has a ResNet "
                          "trunk to export")
    from mmcst.engine.train import load_checkpoint

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pth", hint="the CAM run to export")
    prefix = "backbone."
    trunk = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    if not trunk:
        raise ValueError(f"{run_dir}: the checkpoint holds no '{prefix}*' tensors (not a CAM model)")
    atomic_save_torch(dest, trunk)
    return {"path": str(dest), "backbone": cfg.model.backbone.name, "tensors": len(trunk),
            "step": checkpoint.get("step")}
