"""MCTformer-V1/V2 baselines (Xu et al., CVPR 2022) and the MCTformer+ switches (METHOD.md 7.1-7.3).

V1: C class tokens in a ViT; class logits are the channel means of the raw output class tokens (no final
LayerNorm); loss ``cls_token`` = MLSM. Maps: class-to-patch attention summed (or averaged, MCTformer+) over
the last ``layer_index`` layers. V2 adds a 3x3 conv "PatchCAM" head on the reshaped raw patch tokens,
pooled by GAP (or GWRP, MCTformer+) into the ``patch`` MLSM term; maps = attention x ReLU(PatchCAM) (or the
square root of that product, MCTformer+). The optional ``cct`` term is MCTformer+'s contrastive
class-token loss. Training runs fused attention: no attention matrix is materialised.

The attention helpers at the top are shared with the MMCST model.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmcst.losses import contrastive_class_token_loss, gwrp, mlsm
from mmcst.models.base import Localization, LocalizationModel
from mmcst.models.registry import register_model
from mmcst.models.vit import TokenViT


# --------------------------------------------------------------------------------------------------
# helpers shared by the token methods


def build_token_vit(backbone: Any, prefix_groups: Sequence[tuple[str, int]]) -> TokenViT:
    """A TokenViT from ``model.backbone`` (name, weights, size overrides) with the given prefix groups."""
    return TokenViT(
        name=backbone.name,
        prefix_groups=tuple(prefix_groups),
        img_size=getattr(backbone, "img_size", None) or 224,
        patch_size=backbone.patch_size,
        embed_dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=backbone.num_heads,
        drop_path_rate=backbone.drop_path_rate,
        weights=backbone.weights,
        pos_embed_init=backbone.pos_embed_init,
        stem=getattr(backbone, "stem", "patch"),
        stem_widths=getattr(backbone, "stem_widths", None),
        pos_embed_resize=getattr(backbone, "pos_embed_resize", "timm"),
    )


def report_dicts(*reports: Any) -> list[dict[str, Any]]:
    """Normalise weight reports (dataclasses, dicts, lists of them, None) into a list of dicts."""
    out: list[dict[str, Any]] = []
    for report in reports:
        if report is None:
            continue
        if isinstance(report, (list, tuple)):
            out.extend(report_dicts(*report))
        elif is_dataclass(report) and not isinstance(report, type):
            out.append(asdict(report))
        elif isinstance(report, dict):
            out.append(dict(report))
    return out


def attention_request(depth: int, num_prefix: int, class_rows: int, class_layers: Iterable[int],
                      need_affinity: bool) -> tuple[tuple[int, ...], Optional[slice]]:
    """Minimal (layers, rows) to ask the ViT for: class rows ``0..class_rows-1`` at ``class_layers`` and/or
    patch rows (from ``num_prefix``) at every layer for the affinity. Rows are one slice for all layers."""
    layers = set(class_layers)
    if need_affinity:
        layers |= set(range(depth))
    if not layers:
        return (), None
    wants_class = bool(class_rows) and bool(set(class_layers))
    if wants_class and need_affinity:
        rows = slice(0, None)
    elif wants_class:
        rows = slice(0, class_rows)
    else:
        rows = slice(num_prefix, None)
    return tuple(sorted(layers)), rows


def class_to_patch_attention(attentions: dict[int, torch.Tensor], layers: Sequence[int], rows: slice,
                             num_classes: int, num_prefix: int, reduce: str = "sum") -> torch.Tensor:
    """B x C x N_p class-to-patch attention (queries: the first C prefix tokens, keys: patches), summed or
    averaged over ``layers`` (METHOD 7.1, Appendix A.5: patch columns start after all prefix tokens)."""
    start = rows.start or 0
    stacked = torch.stack([attentions[layer][:, 0 - start:num_classes - start, num_prefix:] for layer in layers])
    return stacked.mean(0) if reduce == "mean" else stacked.sum(0)


def patch_affinity(attentions: dict[int, torch.Tensor], depth: int, rows: slice, num_prefix: int) -> torch.Tensor:
    """B x N_p x N_p: sum over all layers of the head-averaged patch-to-patch attention (not renormalised)."""
    start = rows.start or 0
    return torch.stack([attentions[layer][:, num_prefix - start:, num_prefix:] for layer in range(depth)]).sum(0)


def last_layers(depth: int, count: int, field_name: str) -> list[int]:
    if not 1 <= count <= depth:
        raise ValueError(f"{field_name}: expected 1..{depth} (the ViT depth), got {count}")
    return list(range(depth - count, depth))


def patch_layout(vit: TokenViT) -> str:
    """``h*w patches`` at the native grid, e.g. ``14x14=196 patches at 224x224 px``."""
    h, w = vit.grid_size
    return f"{h}x{w}={h * w} patches at {h * vit.patch_size}x{w * vit.patch_size} px"


def init_class_tokens(vit: TokenViT, num_classes: int, std: Optional[float] = None) -> nn.Parameter:
    """C x D class tokens: copies of the checkpoint's [CLS] token (MCTformer's initialisation), or with ``std``
    distinct N(0, std^2) vectors.

    The copies suit a pretrained backbone. With random weights there is no trained [CLS] to copy (timm starts its
    own at std 1e-6, so copies would be C identical, nearly zero tokens whose correlations with every patch start
    at ~0): the tokens keep MCTformer's own initialisation before it loads a checkpoint, distinct
    trunc-normal(std 0.02) vectors. ``model.backbone.token_init_std`` selects another random start.
    """
    if std is not None:
        if std <= 0:
            raise ValueError(f"model.backbone.token_init_std: expected a positive std or null, got {std}")
        return nn.Parameter(torch.randn(num_classes, vit.embed_dim) * std)
    if vit.weight_report is None:
        tokens = torch.empty(num_classes, vit.embed_dim)
        nn.init.trunc_normal_(tokens, std=0.02)
        return nn.Parameter(tokens)
    cls = vit.pretrained_cls.detach().float().reshape(-1)
    return nn.Parameter(cls.unsqueeze(0).repeat(num_classes, 1).clone())


# --------------------------------------------------------------------------------------------------


class MCTformer(LocalizationModel):
    """MCTformer-V1 (``version="v1"``) or -V2 (``version="v2"``) with the MCTformer+ switches."""

    def __init__(self, class_names: Sequence[str], backbone: Any, cfg: Any) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("MCTformer: expected at least one class name")
        if cfg.version == "v1" and not cfg.cls_token_loss:
            raise ValueError("model.mctformer.cls_token_loss: V1 has no other loss; keep it true or use version v2")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.cfg = cfg
        self.vit = build_token_vit(backbone, (("cls", self.num_classes),))
        self.class_tokens = init_class_tokens(self.vit, self.num_classes, backbone.token_init_std)
        # MCTformer never applies the final LayerNorm (raw residual stream, Appendix A.1); freezing it keeps
        # the trainable set equal to what receives gradients (DDP without find_unused_parameters).
        self.vit.norm.requires_grad_(False)
        self.map_layers = last_layers(self.vit.depth, cfg.layer_index, "model.mctformer.layer_index")
        cct_layers = getattr(cfg, "cct_layers", 12)
        self.cct_layers = (last_layers(self.vit.depth, min(cct_layers, self.vit.depth), "model.mctformer.cct_layers")
                           if getattr(cfg, "cct_loss", False) else [])
        self.patch_head = nn.Conv2d(self.vit.embed_dim, self.num_classes, 3, padding=1) if cfg.version == "v2" else None

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        # Fused attention: no attention matrix is materialised in training.
        out = self.vit(images, {"cls": self.class_tokens}, return_all_layers=bool(self.cct_layers))
        outputs = {"cls_logits": out.prefix["cls"].mean(-1)}  # raw residual stream (Appendix A.1)
        if self.patch_head is not None:
            cam = self._patch_cam(out.patches, out.grid)
            outputs["patch_cam"] = cam
            outputs["patch_logits"] = gwrp(cam, self.cfg.gwrp_decay) if self.cfg.patch_pool == "gwrp" else cam.mean((2, 3))
        if self.cct_layers:
            outputs["cct_tokens"] = torch.stack([out.layers[i][:, :self.num_classes] for i in self.cct_layers])
        return outputs

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"].to(outputs["cls_logits"].device)
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.cls_token_loss:
            terms["cls_token"] = mlsm(outputs["cls_logits"], labels)
        if "patch_logits" in outputs:
            terms["patch"] = mlsm(outputs["patch_logits"], labels)
        if "cct_tokens" in outputs:
            terms["cct"] = contrastive_class_token_loss(outputs["cct_tokens"], labels)
        return terms

    def _patch_cam(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        assert self.patch_head is not None
        feats = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)  # B x D x h x w
        return self.patch_head(feats)  # B x C x h x w

    # ---------------------------------------------------------------- inference
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.forward(images)
        if "patch_logits" not in outputs:
            return outputs["cls_logits"]
        if not self.cfg.cls_token_loss:
            return outputs["patch_logits"]
        return 0.5 * (outputs["cls_logits"] + outputs["patch_logits"])  # MCTformer+ inference score

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        num_prefix = self.vit.num_prefix
        layers, rows = attention_request(self.vit.depth, num_prefix, self.num_classes, self.map_layers, need_affinity)
        out = self.vit(images, {"cls": self.class_tokens}, attn_layers=layers, attn_rows=rows)
        assert rows is not None
        h, w = out.grid
        attn = class_to_patch_attention(out.attentions, self.map_layers, rows, self.num_classes, num_prefix,
                                        self.cfg.attention_reduce).reshape(-1, self.num_classes, h, w)
        maps = attn
        if self.patch_head is not None:
            fused = attn * F.relu(self._patch_cam(out.patches, out.grid))
            maps = fused.sqrt() if self.cfg.fusion == "sqrt" else fused
        affinity = patch_affinity(out.attentions, self.vit.depth, rows, num_prefix) if need_affinity else None
        return Localization(maps=maps.float(), affinity=None if affinity is None else affinity.float())

    # ---------------------------------------------------------------- bookkeeping
    def no_weight_decay(self) -> set[str]:
        names = {"class_tokens"}
        names |= {n for n, _ in self.named_parameters() if "pos" in n.rsplit(".", 1)[-1] or ".prefix_pos." in n}
        if hasattr(self.vit, "no_weight_decay"):
            names |= {f"vit.{n}" for n in self.vit.no_weight_decay()}
        return names

    def weight_report(self) -> list[dict[str, Any]]:
        return report_dicts(getattr(self.vit, "weight_report", None))

    def token_layout(self) -> str:
        return f"[{self.num_classes} class | {patch_layout(self.vit)}] (MCTformer-{self.cfg.version.upper()})"


@register_model("mctformer")
def build_mctformer(model_cfg: Any, class_names: Sequence[str]) -> MCTformer:
    return MCTformer(class_names, model_cfg.backbone, model_cfg.mctformer)
