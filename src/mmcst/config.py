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
    pos_embed_resize: str = "timm"  # timm (antialiased bicubic) | official (MCTformer's plain bicubic, scale (n + 0.1) / N): run-time patch pos-embed resize for other input sizes
    img_size: Optional[int] = None  # native patch grid of the ViT = img_size / patch (None = 224; shipped ViT configs: ${data.image_size})
    token_init_std: Optional[float] = None  # class tokens: None = copies of the checkpoint [CLS] (random weights: distinct trunc-normal(0.02), as MCTformer); a std = distinct N(0, std^2) tokens
    stem: str = "patch"  # patch (linear patch embedding, as ViT/DINO) | conv (3x3 stride-2 conv+BN+ReLU stack of stride patch_size: random-weight training)
    stem_widths: Optional[list] = None  # conv stem: widths of its stride-2 convolutions, one per halving (None = 32, 64, 128, ...)


@dataclass
class PriorConfig:
    kind: str = "clip"  # clip | none (no CLIP: random text tokens, no context loss)
    clip_model: str = "ViT-B-16-quickgelu"  # open_clip architecture name (quickgelu for OpenAI weights)
    clip_weights: Optional[str] = None  # local CLIP file: OpenAI TorchScript .pt, open_clip .bin/.safetensors
    templates: str = "single"  # single ("a photo of a {}.") | ensemble (CLIP's ImageNet template list)
    cache_dir: Optional[str] = None  # where text-embedding caches go (default: ~/.cache/mmcst)
    image_embed: str = "crop"  # crop (same augmented crop, on the fly) | cache (whole image, computed once before training, kept in cache_dir or the run's cache/)


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
    cls_token_weight: float = 1.0  # weight of that term in the sum of losses (the paper sums them unweighted)
    text_token_loss: bool = False  # ablation: the same head on the text tokens
    context_design: str = "encoder"  # encoder (T_out = encoder output) | decoder (tokens cross-attend to patches)
    decoder_layers: int = 1  # layers of the alternative context decoder
    correlation_scale: str = "none"  # none | sqrt_d: divide correlations by sqrt(D)
    fusion: str = "F1"  # F1 sqrt(t2p*c2p) | F2 sum of normalised | F3 F1 x class attention | t2p | c2p (one map alone)
    token_balance: str = "first_batch"  # first_batch: scale T_in to the norm of lambda*LN(T_out) on the first training batch (METHOD 2.5) | none
    token_norm: str = "none"  # none: T = T_in + lambda*LN(T_out) | layernorm: T = LN(T_in) + lambda*LN(T_out)
    patch_norm: str = "layernorm"  # layernorm: correlate with LN(T_pat) (METHOD 2.4) | none: the raw patch tokens (as MCTformer's PatchCAM)
    attention_layers: int = 3  # F3: last K layers of class-to-patch attention
    score_decay: Optional[float] = None  # GWRP decay of the maps' classification score (None: gwrp_decay, as trained); lower reads the maps nearer their peak
    score: str = "auto"  # classification score (mAP monitor, classify): auto (cls_token with cls_token_loss, else maps) | cls_token | maps (mean of the GWRP t2p/c2p logits) | mean (of both, MCTformer+'s inference score)


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
    batch_size: Any = "auto"  # images per forward (bucketed by size): N | auto (1 on CPU, 8 on CUDA)
    max_images: Optional[int] = None  # only the first N images of the split (quick looks)
    precision: str = "fp32"  # fp32 | fp16 | bf16: autocast of the map forwards (fp32: no autocast)


@dataclass
class EvalConfig:
    threshold_start: float = 0.0  # first background threshold of the curve
    threshold_stop: float = 0.95  # last background threshold (inclusive)
    threshold_step: float = 0.01  # grid step
    bg_rule: str = "constant"  # constant (plane = t) | power (plane = (1 - max)^k)
    bg_power: float = 1.0  # k for bg_rule=power
    wsol_step: float = 0.001  # PxAP/pIoU threshold step


@dataclass
class AffinityConfig:
    label_method: str = "auto"  # confident labels: auto (crf when pydensecrf2 is installed, else par) | crf | par
    alpha_fg: float = 1.0  # "la" background power (1 - max)^alpha, leaves confident foreground (MCTformer 1; PSA 4)
    alpha_bg: float = 12.0  # "ha" background power, leaves confident background (MCTformer 12; PSA 32)
    train_split: Optional[str] = None  # split AffinityNet trains on (None = data.train_split)
    backbone: str = "resnet38"  # resnet38 (PSA layout, the paper's) | a timm ResNet name (resnet50, resnet18, resnet10t ...)
    weights: Optional[str] = None  # local init file: res38_cls.pth or converted ImageNet ResNet-38 .pth; timm/torchvision ResNet state dict (None = random)
    width: float = 1.0  # ResNet-38 channel multiplier (weight files need 1.0; tests and demos use 0.0625)
    freeze_bn: bool = True  # frozen backbone batch norm (PSA; pretrained weights); False to train from random weights
    frozen_layers: Optional[list] = None  # untrained backbone layers (None = PSA's: conv1a + b2* on ResNet-38, stem + layer1 on a timm ResNet; [] = none)
    radius: int = 5  # pairs join cells closer than this on the 1/8 grid (PSA: 5)
    crop: int = 448  # square training crop; smaller images are padded (image 0 after normalisation, labels ignore)
    resize_long: Optional[list] = None  # [min, max]: random resize of the long side before cropping (None = none, as PSA's train_aff.py)
    color_jitter: list = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])  # brightness, contrast, saturation, hue
    batch_size: int = 8  # images per step (global, across all ranks)
    epochs: int = 5  # training epochs (PSA's default)
    max_steps: Optional[int] = None  # stop after this many steps (overrides epochs; the poly schedule spans them)
    lr: float = 0.01  # base learning rate (x2 backbone biases, x10 heads: PSA's groups)
    weight_decay: float = 5e-4  # on weights (PSA: none on biases)
    momentum: float = 0.9  # SGD momentum (replaced by weight_decay under psa_optimizer_quirk)
    poly_power: float = 0.9  # lr = base * (1 - step / total_steps)^poly_power
    psa_optimizer_quirk: bool = False  # PSA's optimiser: weight decay lands in SGD's momentum slot (momentum = weight_decay)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    time_budget_s: Optional[float] = None  # stop after this many seconds of training (the schedule follows the clock)
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    beta: float = 8.0  # random walk: affinity power
    logt: int = 6  # random walk: 2^logt steps (MCTformer 6; PSA 8)
    walk_method: str = "power"  # power (T applied 2^logt times, banded) | squaring (PSA: T squared logt times)
    bg_threshold: Optional[float] = None  # constant background score of the seeds (MCTformer: 0.39); None = the run's best seed threshold, else 0.39
    bg_alpha: Optional[float] = None  # instead of a constant: PSA's background (1 - max)^bg_alpha (PSA: 16)


@dataclass
class SegConfig:
    model: str = "deeplab_v1"  # deeplab_v1 (LargeFOV on ResNet-38, the paper's) | deeplab_v2 | deeplab_v3 (timm ResNet trunk)
    backbone: Optional[str] = None  # timm ResNet for deeplab_v2/v3 (None = resnet101; resnet18, resnet10t for CPU); v1 is ResNet-38
    weights: Optional[str] = None  # local backbone file: res38_cls.pth (v1); torchvision resnet101-63fe2227.pth (v2/v3); None = random
    width: float = 1.0  # ResNet-38 channel multiplier (deeplab_v1; weight files need 1.0)
    freeze_bn: bool = True  # frozen backbone batch norm (MCTformer; pretrained weights); False to train from random weights
    frozen_layers: Optional[list] = None  # untrained backbone layers (None = conv1a for deeplab_v1, none for v2/v3; [] = none)
    train_split: Optional[str] = None  # split with pseudo masks to train on (None = data.train_split)
    eval_split: str = "val"  # split `mmcst pipeline` segments and scores (VOC/COCO: val; VOC test has no masks)
    crop: int = 321  # square training crop; pads: image 0 after normalisation, labels 255
    scale_range: list = field(default_factory=lambda: [0.7, 1.3])  # random rescale factor U(low, high) before cropping
    batch_size: int = 4  # images per step (global, across all ranks)
    epochs: int = 30  # training epochs (MCTformer's run_seg.sh)
    max_steps: Optional[int] = None  # stop after this many steps (overrides epochs; the poly schedule spans them)
    lr: float = 7e-4  # base learning rate (head x10)
    weight_decay: float = 1e-5  # SGD weight decay (MCTformer's --wt_dec; under the quirk it becomes the momentum)
    momentum: float = 0.9  # SGD momentum (replaced by weight_decay under psa_optimizer_quirk)
    poly_power: float = 0.9  # lr = base * (1 - step / total_steps)^poly_power
    psa_optimizer_quirk: bool = False  # MCTformer's optimiser: momentum = weight_decay and no weight decay (its numbers)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels-last memory layout on CUDA
    time_budget_s: Optional[float] = None  # stop after this many seconds of training (the schedule follows the clock)
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    scales: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])  # inference scales
    flip: bool = False  # inference: add flipped passes (MCTformer: none)
    fusion: str = "max"  # inference: per-pixel max (MCTformer) | mean of the softmax over scales and flips
    crf: Optional[bool] = None  # inference dense CRF (the paper's): true | false | null = when pydensecrf2 is installed


@dataclass
class WSSSConfig:
    affinity: AffinityConfig = field(default_factory=AffinityConfig)  # PSA / AffinityNet refinement (METHOD 4.4)
    seg: SegConfig = field(default_factory=SegConfig)  # segmentation network on the pseudo masks (METHOD 4.5)


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
    wsss: WSSSConfig = field(default_factory=WSSSConfig)


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
    "model.backbone.pos_embed_resize": ("timm", "official"),
    "model.mmcst.tokens": ("global_visual", "global", "local", "global_local"),
    "model.mmcst.context": ("image", "caption", "none"),
    "model.mmcst.regularizer": ("contrast", "l1"),
    "model.mmcst.text_bridge": ("linear", "direct"),
    "model.mmcst.text_pooling": ("labels", "all"),
    "model.mmcst.context_design": ("encoder", "decoder"),
    "model.mmcst.correlation_scale": ("none", "sqrt_d"),
    "model.mmcst.fusion": ("F1", "F2", "F3", "t2p", "c2p"),
    "model.mmcst.token_balance": ("first_batch", "none"),
    "model.mmcst.token_norm": ("none", "layernorm"),
    "model.mmcst.patch_norm": ("layernorm", "none"),
    "model.mmcst.score": ("auto", "cls_token", "maps", "mean"),
    "model.backbone.stem": ("patch", "conv"),
    "model.mctformer.version": ("v1", "v2"),
    "model.mctformer.attention_reduce": ("sum", "mean"),
    "model.mctformer.fusion": ("product", "sqrt"),
    "model.mctformer.patch_pool": ("gap", "gwrp"),
    "eval.bg_rule": ("constant", "power"),
    "device": ("auto", "cpu", "cuda"),
    "infer.precision": ("fp32", "fp16", "bf16"),
    "wsss.affinity.label_method": ("auto", "crf", "par"),
    "wsss.affinity.walk_method": ("power", "squaring"),
    "wsss.seg.model": ("deeplab_v1", "deeplab_v2", "deeplab_v3"),
    "wsss.seg.fusion": ("max", "mean"),
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys of a nested dict (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


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
    batch = cfg.infer.batch_size
    if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"infer.batch_size: expected auto or an integer >= 1, got {batch!r}")
    if not 0 < cfg.eval.threshold_step <= 1:
        raise ConfigError(f"eval.threshold_step: expected in (0, 1], got {cfg.eval.threshold_step}")
    if not 0 < cfg.model.mmcst.gwrp_decay <= 1:
        raise ConfigError(f"model.mmcst.gwrp_decay: expected in (0, 1], got {cfg.model.mmcst.gwrp_decay}")
    score_decay = cfg.model.mmcst.score_decay
    if score_decay is not None and not 0 < score_decay <= 1:
        raise ConfigError(f"model.mmcst.score_decay: expected in (0, 1] or null, got {score_decay}")
    if cfg.model.mmcst.cls_token_weight < 0:
        raise ConfigError(f"model.mmcst.cls_token_weight: expected >= 0, got {cfg.model.mmcst.cls_token_weight}")
    _validate_wsss(cfg.wsss)


def _validate_wsss(wsss: WSSSConfig) -> None:
    for name, section in (("affinity", wsss.affinity), ("seg", wsss.seg)):
        for key in ("crop", "batch_size", "epochs"):
            if getattr(section, key) < 1:
                raise ConfigError(f"wsss.{name}.{key}: expected >= 1, got {getattr(section, key)}")
        if section.max_steps is not None and section.max_steps < 1:
            raise ConfigError(f"wsss.{name}.max_steps: expected >= 1 or null, got {section.max_steps}")
        if section.lr <= 0 or section.weight_decay < 0 or section.momentum < 0 or section.poly_power < 0:
            raise ConfigError(f"wsss.{name}: expected lr > 0 and weight_decay, momentum, poly_power >= 0, got "
                              f"{section.lr}, {section.weight_decay}, {section.momentum}, {section.poly_power}")
        if section.width <= 0:
            raise ConfigError(f"wsss.{name}.width: expected > 0, got {section.width}")
    aff, seg = wsss.affinity, wsss.seg
    if aff.radius < 2:
        raise ConfigError(f"wsss.affinity.radius: expected >= 2, got {aff.radius}")
    if aff.alpha_fg <= 0 or aff.alpha_bg <= 0:
        raise ConfigError(f"wsss.affinity.alpha_fg/alpha_bg: expected > 0, got {aff.alpha_fg}, {aff.alpha_bg}")
    if aff.beta <= 0 or aff.logt < 0:
        raise ConfigError(f"wsss.affinity: expected beta > 0 and logt >= 0, got {aff.beta}, {aff.logt}")
    if aff.bg_threshold is not None and aff.bg_alpha is not None:
        raise ConfigError("wsss.affinity: give bg_threshold (constant background) or bg_alpha ((1 - max)^alpha), "
                          f"not both; got {aff.bg_threshold} and {aff.bg_alpha}")
    if aff.resize_long is not None and (len(aff.resize_long) != 2 or not 0 < aff.resize_long[0] <= aff.resize_long[1]):
        raise ConfigError(f"wsss.affinity.resize_long: expected [min, max] with 0 < min <= max, got {aff.resize_long}")
    if len(aff.color_jitter) != 4 or any(v < 0 for v in aff.color_jitter) or aff.color_jitter[3] > 0.5:
        raise ConfigError(f"wsss.affinity.color_jitter: expected [brightness, contrast, saturation, hue] >= 0 with "
                          f"hue <= 0.5, got {aff.color_jitter}")
    if len(seg.scale_range) != 2 or not 0 < seg.scale_range[0] <= seg.scale_range[1]:
        raise ConfigError(f"wsss.seg.scale_range: expected [low, high] with 0 < low <= high, got {seg.scale_range}")
    if not seg.scales or any(s <= 0 for s in seg.scales):
        raise ConfigError(f"wsss.seg.scales: expected positive numbers, got {seg.scales}")
    if seg.model == "deeplab_v1" and seg.backbone not in (None, "resnet38"):
        raise ConfigError(f"wsss.seg.backbone: deeplab_v1 is ResNet-38; got {seg.backbone!r} (use deeplab_v2/v3 for "
                          "a timm ResNet)")
