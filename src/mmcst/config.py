"""Typed configuration: dataclass schema + YAML files + ``key=value`` overrides (OmegaConf).

Every field has a default and a one-line description (the comment beside it). A run's resolved config
is saved as ``config.yaml`` in its run directory. A YAML file may name ``defaults: [other.yaml, ...]``
(paths relative to the file) which are merged first, so ablation configs stay a few lines long.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


@dataclass
class DataConfig:
    dataset: str = "voc"  # voc | coco | openimages | folder | synthetic
    root: str = "data/VOCdevkit/VOC2012"  # dataset root (for VOC: the folder holding JPEGImages)
    train_split: str = "train_aug"  # split used for training
    val_split: str = "val"  # split whose labels give the per-epoch classification mAP
    eval_split: str = "train"  # split on which maps are generated and evaluated (seed protocol)
    labels_file: Optional[str] = None  # optional PSA-style cls_labels.npy overriding dataset labels
    image_size: int = 448  # training crop size (square)
    augment: str = "mctformer"  # mctformer (RRC+flip+RandAugment+erasing) | light (RRC+flip) | none
    rrc_scale_min: float = 0.08  # lower bound of RandomResizedCrop's area scale
    num_workers: int = 4  # data-loader worker processes
    skip_bad: bool = False  # skip unreadable images (listed in the log) instead of stopping
    cache_images: bool = False  # keep decoded images in memory (small datasets)
    synthetic_train: int = 2000  # synthetic dataset: number of train images
    synthetic_val: int = 300  # synthetic dataset: number of val images
    synthetic_size: int = 224  # synthetic dataset: image side in pixels
    synthetic_seed: int = 0  # synthetic dataset: generator seed


@dataclass
class BackboneConfig:
    name: str = "vit_base_patch16_224.dino"  # timm model name (ViTs for token methods, resnet50 for CAM)
    weights: Optional[str] = None  # local weight file: DINO .pth, timm .safetensors/.bin (None = random init)
    patch_size: Optional[int] = None  # override the timm patch size (e.g. 8 for small demo models)
    embed_dim: Optional[int] = None  # override width (tiny test/demo models)
    depth: Optional[int] = None  # override number of blocks
    num_heads: Optional[int] = None  # override number of heads
    drop_path_rate: float = 0.1  # stochastic depth
    pos_embed_init: str = "bicubic"  # bicubic | replicate: how to resize checkpoint patch pos-embeds to the training grid
    img_size: Optional[int] = None  # native patch grid of the ViT = img_size / patch (None = 224; set to data.image_size for replicate)
    token_init_std: Optional[float] = None  # class tokens: None = copies of the checkpoint [CLS]; a std = distinct N(0, std^2) tokens (random-weight training)


@dataclass
class PriorConfig:
    kind: str = "clip"  # clip | none (no CLIP: random text tokens, no context loss)
    clip_model: str = "ViT-B-16-quickgelu"  # open_clip architecture name (quickgelu for OpenAI weights)
    clip_weights: Optional[str] = None  # local CLIP file: OpenAI TorchScript .pt, open_clip .bin/.safetensors
    templates: str = "single"  # single ("a photo of a {}.") | ensemble (CLIP's ImageNet template list)
    cache_dir: Optional[str] = None  # where text-embedding caches go (default: ~/.cache/mmcst)
    image_embed: str = "crop"  # crop (same augmented crop, on the fly) | cache (whole image, precomputed once)


@dataclass
class MMCSTConfig:
    tokens: str = "global_local"  # global_visual | global | local | global_local (poster table 1)
    visual_context: bool = True  # False = ablation row "visual context x" (global tokens in the maps)
    context: str = "image"  # image | caption | none: prior knowledge for image-language context (table 2)
    regularizer: str = "contrast"  # contrast (batch-contrastive CE) | l1
    captions_file: Optional[str] = None  # CSV image,caption for context=caption
    lambda_text: float = 1.0  # lambda1 in T_txt = T_in + lambda1 * T_out
    lambda_cls: float = 1.0  # lambda2 in T_cls = T_in + lambda2 * T_out
    learnable_lambda: bool = False  # learn lambda1/lambda2 as scalars
    gwrp_decay: float = 0.996  # GWRP decay d
    temperature: float = 0.07  # contrastive temperature tau
    learnable_temperature: bool = False  # learn log(1/tau), clamped like CLIP
    symmetric_contrast: bool = False  # average row- and column-wise CE
    text_bridge: str = "linear"  # linear (CLIP dim -> D, option A) | direct (C x D parameter, option B)
    text_pooling: str = "labels"  # labels (label-masked mean of LN(T_txt_out)) | all
    cls_token_loss: bool = True  # MCTformer-V1 class-token MLSM term
    text_token_loss: bool = False  # ablation: the same head on the text tokens
    context_design: str = "encoder"  # encoder (T_out = encoder output) | decoder (tokens cross-attend to patches)
    decoder_layers: int = 1  # layers of the alternative context decoder
    correlation_scale: str = "none"  # none | sqrt_d: divide correlations by sqrt(D)
    fusion: str = "F1"  # F1 sqrt(t2p*c2p) | F2 sum of normalised | F3 F1 x class attention
    attention_layers: int = 3  # F3: last K layers of class-to-patch attention


@dataclass
class MCTformerConfig:
    version: str = "v2"  # v1 | v2
    layer_index: int = 3  # localization: class-to-patch attention of the last K layers
    attention_reduce: str = "sum"  # sum (V1/V2) | mean (MCTformer+)
    fusion: str = "product"  # product (V2) | sqrt (MCTformer+)
    patch_pool: str = "gap"  # gap (V2) | gwrp (MCTformer+)
    gwrp_decay: float = 0.996  # GWRP decay for patch_pool=gwrp
    cls_token_loss: bool = True  # V1 class-token MLSM term
    cct_loss: bool = False  # MCTformer+ contrastive class-token loss (term "cct")
    cct_layers: int = 12  # CCT: class tokens of the last K blocks


@dataclass
class CAMConfig:
    output_stride: int = 16  # 32 (plain ResNet-50) | 16 (last stage dilated, as IRN) | 8


@dataclass
class ModelConfig:
    name: str = "mmcst"  # registry name: mmcst | mctformer | cam
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    mmcst: MMCSTConfig = field(default_factory=MMCSTConfig)
    mctformer: MCTformerConfig = field(default_factory=MCTformerConfig)
    cam: CAMConfig = field(default_factory=CAMConfig)


@dataclass
class TrainConfig:
    epochs: int = 45  # training epochs
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs when set)
    time_budget_s: Optional[float] = None  # stop after this many seconds of training (demo budgets)
    batch_size: int = 32  # images per step (global, across all ranks)
    lr: float = 5e-4  # base learning rate, scaled by batch_size / 512
    scale_lr: bool = True  # apply the linear batch/512 scaling
    weight_decay: float = 0.05  # AdamW weight decay (none on tokens, pos-embeds, norms, biases)
    warmup_epochs: float = 5.0  # linear warm-up length
    warmup_lr: float = 1e-6  # lr at the start of warm-up
    min_lr: float = 1e-5  # final lr of the cosine schedule
    clip_grad: Optional[float] = None  # gradient-norm clipping (None = off)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    log_every: int = 10  # steps between metrics.jsonl records
    keep_epoch_checkpoints: bool = False  # also keep checkpoints/epoch_XXX.pth at each epoch end
    deterministic: bool = False  # deterministic cuDNN kernels (slower; exact repeatability on GPU)


@dataclass
class InferConfig:
    scales: list = field(default_factory=lambda: [1.0, 0.75, 1.25])  # test-time scales
    flip: bool = True  # add horizontally flipped passes
    refine: bool = True  # patch-affinity refinement
    batch_size: int = 8  # images per forward (bucketed by size)
    max_images: Optional[int] = None  # only the first N images of the split (quick looks)


@dataclass
class EvalConfig:
    threshold_start: float = 0.0  # first background threshold of the curve
    threshold_stop: float = 0.95  # last background threshold (inclusive)
    threshold_step: float = 0.01  # grid step
    bg_rule: str = "constant"  # constant (plane = t) | power (plane = (1 - max)^k)
    bg_power: float = 1.0  # k for bg_rule=power
    wsol_step: float = 0.001  # PxAP/pIoU threshold step


@dataclass
class Config:
    name: str = "run"  # run name: runs/<name>/
    out_dir: str = "runs"  # parent of run directories
    seed: int = 0  # global seed (recorded in env.json)
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = raw.pop("defaults", [])
    raw.pop("demo_notes", None)  # documentation for the demo report, not a setting
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(parent), seen + (path,)))
    return OmegaConf.merge(merged, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then the YAML file (with its ``defaults`` chain), then ``key=value`` overrides."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}".strip()) from exc
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated Config from a (possibly partial) nested dict."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc)) from exc
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


_CHOICES = {
    "data.dataset": ("voc", "coco", "openimages", "folder", "synthetic"),
    "data.augment": ("mctformer", "light", "none"),
    "model.name": ("mmcst", "mctformer", "cam"),
    "model.prior.kind": ("clip", "none"),
    "model.prior.templates": ("single", "ensemble"),
    "model.prior.image_embed": ("crop", "cache"),
    "model.backbone.pos_embed_init": ("bicubic", "replicate"),
    "model.mmcst.tokens": ("global_visual", "global", "local", "global_local"),
    "model.mmcst.context": ("image", "caption", "none"),
    "model.mmcst.regularizer": ("contrast", "l1"),
    "model.mmcst.text_bridge": ("linear", "direct"),
    "model.mmcst.text_pooling": ("labels", "all"),
    "model.mmcst.context_design": ("encoder", "decoder"),
    "model.mmcst.correlation_scale": ("none", "sqrt_d"),
    "model.mmcst.fusion": ("F1", "F2", "F3"),
    "model.mctformer.version": ("v1", "v2"),
    "model.mctformer.attention_reduce": ("sum", "mean"),
    "model.mctformer.fusion": ("product", "sqrt"),
    "model.mctformer.patch_pool": ("gap", "gwrp"),
    "eval.bg_rule": ("constant", "power"),
    "device": ("auto", "cpu", "cuda"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size: expected >= 1, got {cfg.train.batch_size}")
    if not cfg.infer.scales or any(s <= 0 for s in cfg.infer.scales):
        raise ConfigError(f"infer.scales: expected positive numbers, got {cfg.infer.scales}")
    if not 0 < cfg.eval.threshold_step <= 1:
        raise ConfigError(f"eval.threshold_step: expected in (0, 1], got {cfg.eval.threshold_step}")
    if not 0 < cfg.model.mmcst.gwrp_decay <= 1:
        raise ConfigError(f"model.mmcst.gwrp_decay: expected in (0, 1], got {cfg.model.mmcst.gwrp_decay}")
