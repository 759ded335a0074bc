"""ViT encoder with named groups of extra (prefix) tokens, on timm blocks (METHOD.md 2.1, 2.4).

The sequence is ``[group_1 tokens | group_2 tokens | ... | patch tokens]``. Methods own their token
*contents* (class tokens, text tokens) and pass them to :meth:`TokenViT.forward`; the encoder owns the
position embeddings (``prefix_pos`` per group, interpolated patch pos-embeds) and the blocks.

Training runs timm's blocks unchanged (fused scaled-dot-product attention, no attention matrix).
When a method asks for attention of some layers, the probabilities of the requested query rows
are computed from the q/k the block itself produced, and the block output stays bit-identical.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, HybridEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcst.models.weights import WeightReport, load_vit_checkpoint

POS_EMBED_INIT = ("bicubic", "replicate")
POS_EMBED_RESIZE = ("timm", "official")
STEMS = ("patch", "conv")


@dataclass
class ViTOutput:
    prefix: dict[str, Tensor]  # group name -> B x n_g x D, raw residual stream (no final norm)
    patches: Tensor  # B x N_p x D, raw residual stream
    grid: tuple[int, int]  # (h, w) patch grid
    # layer index (0-based) -> B x R x N head-averaged softmax probabilities (R requested query rows,
    # N all tokens: prefix groups in order, then patches); only layers that were asked for.
    attentions: dict[int, Tensor] = field(default_factory=dict)
    layers: list[Tensor] = field(default_factory=list)  # per-block outputs B x N x D when return_all_layers


def resize_patch_pos_embed(pos_embed: Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                           mode: str = "bicubic") -> Tensor:
    """Resize patch position embeddings ``1 x (h*w) x D`` from ``old_grid`` to ``new_grid``.

    ``bicubic``: timm's antialiased bicubic resampling, the one timm uses for dynamic input sizes and
    when it adapts checkpoints (``F.interpolate(..., antialias=True)``; its cubic kernel differs slightly
    from DINO's plain ``bicubic``, so this reproduces timm exactly).
    ``replicate``: each entry becomes a 2x2 block (nearest x2, MCTformer+) when the new grid is exactly
    twice the old one; any other ratio falls back to bicubic.
    """
    old_h, old_w = int(old_grid[0]), int(old_grid[1])
    new_h, new_w = int(new_grid[0]), int(new_grid[1])
    if mode not in POS_EMBED_INIT:
        raise ValueError(f"model.backbone.pos_embed_init: expected one of {list(POS_EMBED_INIT)}, got {mode!r}")
    if pos_embed.shape[-2] != old_h * old_w:
        raise ValueError(f"patch pos-embed has {pos_embed.shape[-2]} entries, expected {old_h}x{old_w}")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    if mode == "replicate" and (new_h, new_w) == (2 * old_h, 2 * old_w):
        dim = pos_embed.shape[-1]
        grid = pos_embed.reshape(1, old_h, old_w, dim)
        return grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, new_h * new_w, dim)
    return resample_abs_pos_embed(pos_embed, new_size=[new_h, new_w], old_size=[old_h, old_w], num_prefix_tokens=0)


def resize_patch_pos_embed_official(pos_embed: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Resize patch pos-embeds ``1 x (h*w) x D`` as MCTformer's (and DINO's) ``interpolate_pos_encoding`` does.

    Plain bicubic (no antialias) given a *scale factor* of ``(new + 0.1) / old`` per axis rather than an output
    size: the output is still ``new_grid``, but torch maps output to input coordinates with that factor, so the
    values differ from a resize to ``new_grid`` (and from timm's antialiased one). Needed to reproduce the maps
    of the official MCTformer checkpoints (``model.backbone.pos_embed_resize=official``).
    """
    old_h, old_w = int(old_grid[0]), int(old_grid[1])
    new_h, new_w = int(new_grid[0]), int(new_grid[1])
    dim = pos_embed.shape[-1]
    if pos_embed.shape[-2] != old_h * old_w:
        raise ValueError(f"patch pos-embed has {pos_embed.shape[-2]} entries, expected {old_h}x{old_w}")
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((new_h + 0.1) / old_h, (new_w + 0.1) / old_w), mode="bicubic",
                            align_corners=False)
    if tuple(resized.shape[-2:]) != (new_h, new_w):  # the 0.1 exists to keep floor(old * factor) == new
        raise RuntimeError(f"official pos-embed resize {old_h}x{old_w} -> {new_h}x{new_w} gave "
                           f"{tuple(resized.shape[-2:])}")
    return resized.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)


def conv_stem_widths(stride: int, widths: Optional[Sequence[int]] = None) -> list[int]:
    """Channel widths of a stride-``stride`` convolutional stem: one 3x3 stride-2 convolution per halving.

    ``widths`` given: checked against the number of halvings; None: 32, 64, 128, ... (doubling).
    """
    if stride < 2 or stride & (stride - 1):
        raise ValueError(f"model.backbone.stem=conv: the patch size (the stem's stride) must be a power of two >= 2, "
                         f"got {stride}")
    count = stride.bit_length() - 1
    if widths is None:
        return [32 * 2 ** i for i in range(count)]
    widths = [int(w) for w in widths]
    if len(widths) != count or any(w < 1 for w in widths):
        raise ValueError(f"model.backbone.stem_widths: a stride-{stride} stem has {count} stride-2 convolutions, "
                         f"expected {count} positive widths, got {widths}")
    return widths


class ConvStem(nn.Sequential):
    """3x3 stride-2 convolution + BatchNorm + ReLU, once per halving (timm ``ConvNormAct`` layers).

    Feeding the transformer blocks with a small CNN's features (as timm's hybrid ViTs do through
    ``HybridEmbed``) gives the patch tokens a convolutional inductive bias: from random weights they learn
    far faster per step than a linear patch embedding (DESIGN.md 7).
    """

    def __init__(self, in_chans: int, widths: Sequence[int]) -> None:
        layers = []
        for width in widths:
            layers.append(ConvNormAct(in_chans, width, kernel_size=3, stride=2, padding=1))
            in_chans = width
        super().__init__(*layers)
        self.num_features = in_chans


def _conv_stem_embed(widths: Sequence[int], *, img_size: Any, patch_size: Any, in_chans: int = 3,
                     embed_dim: int = 768, bias: bool = True, dynamic_img_pad: bool = False, **kwargs: Any) -> HybridEmbed:
    """timm ``embed_layer`` factory: a :class:`ConvStem` of total stride ``patch_size`` + a 1x1 projection to D."""
    del patch_size  # the stem's stride is the patch size; its features are projected 1x1
    return HybridEmbed(ConvStem(in_chans, widths), img_size=img_size, patch_size=1, in_chans=in_chans,
                       embed_dim=embed_dim, bias=bias, dynamic_img_pad=dynamic_img_pad, **kwargs)


class TokenViT(nn.Module):
    """A timm ViT whose single ``[CLS]`` is replaced by named groups of extra tokens.

    Args:
        name: timm model name (``vit_base_patch16_224.dino``, ``vit_small_patch16_224``, ...); the
            architecture only, weights come from ``weights``.
        prefix_groups: ``(group name, token count)`` in sequence order.
        img_size: training input size; sets the native patch grid (other sizes are interpolated).
        patch_size, embed_dim, depth, num_heads: overrides of the timm architecture (tiny models).
        drop_path_rate: stochastic depth.
        weights: local DINO ``.pth`` / timm ``.safetensors`` / ``.bin`` file, or None for random init.
        pos_embed_init: how checkpoint patch pos-embeds are resized to the training grid.
        pos_embed_resize: how patch pos-embeds are resized at run time for other input sizes: ``timm``
            (antialiased bicubic to the grid) or ``official`` (:func:`resize_patch_pos_embed_official`).
        stem: ``patch`` (the ViT's linear patch embedding) or ``conv`` (:class:`ConvStem` of stride
            ``patch_size`` feeding the blocks, for training from random weights).
        stem_widths: channel widths of the conv stem (None: 32, 64, ...).
    """

    def __init__(self, name: str = "vit_base_patch16_224", prefix_groups: Sequence[tuple[str, int]] = (("cls", 1),),
                 img_size: int | tuple[int, int] = 224, patch_size: Optional[int] = None,
                 embed_dim: Optional[int] = None, depth: Optional[int] = None, num_heads: Optional[int] = None,
                 drop_path_rate: float = 0.0, weights: Optional[str] = None, pos_embed_init: str = "bicubic",
                 stem: str = "patch", stem_widths: Optional[Sequence[int]] = None,
                 pos_embed_resize: str = "timm") -> None:
        super().__init__()
        self.groups: list[tuple[str, int]] = _check_groups(prefix_groups)
        self.num_prefix: int = sum(n for _, n in self.groups)
        if pos_embed_init not in POS_EMBED_INIT:
            raise ValueError(f"model.backbone.pos_embed_init: expected one of {list(POS_EMBED_INIT)}, got {pos_embed_init!r}")
        self.pos_embed_init = pos_embed_init
        if pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"model.backbone.pos_embed_resize: expected one of {list(POS_EMBED_RESIZE)}, "
                             f"got {pos_embed_resize!r}")
        self.pos_embed_resize = pos_embed_resize
        overrides = {k: v for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                           num_heads=num_heads).items() if v is not None}
        if stem not in STEMS:
            raise ValueError(f"model.backbone.stem: expected one of {list(STEMS)}, got {stem!r}")
        self.stem = stem
        if stem == "conv":
            if weights is not None:
                raise ValueError("model.backbone.stem=conv trains the ViT from random weights; pretrained DINO/timm "
                                 f"weights ({weights}) fit the plain patch embedding (stem=patch)")
            stride = patch_size if patch_size is not None else _timm_patch_size(name)
            overrides["embed_layer"] = functools.partial(_conv_stem_embed, conv_stem_widths(stride, stem_widths))
        try:
            base = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                                     drop_path_rate=drop_path_rate, dynamic_img_size=True, **overrides)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"model.backbone.name: cannot build timm ViT {name!r} ({exc})") from exc
        if not isinstance(base, VisionTransformer):
            raise ValueError(f"model.backbone.name: {name!r} is a {type(base).__name__}, expected a timm VisionTransformer")
        if base.reg_token is not None:
            raise ValueError(f"model.backbone.name: {name!r} has register tokens, which TokenViT does not support")
        if base.pos_embed is None:
            raise ValueError(f"model.backbone.name: {name!r} has no absolute position embedding")

        self.model_name = name
        self.embed_dim: int = int(base.embed_dim)
        self.depth: int = len(base.blocks)
        self.num_heads: int = int(base.blocks[0].attn.num_heads)
        # A conv stem's stride is its feature ratio (HybridEmbed's own patch size is its 1x1 projection).
        patch = tuple(base.patch_embed.feat_ratio(as_scalar=False))
        if patch[0] != patch[1]:
            raise ValueError(f"model.backbone: non-square patches {patch} are not supported")
        self.patch_size: int = int(patch[0])
        self.grid_size: tuple[int, int] = tuple(int(g) for g in base.patch_embed.grid_size)  # native grid

        # Keep only the parts we use; the timm wrapper (head, its own cls token) is dropped.
        self.patch_embed = base.patch_embed
        self.pos_drop = base.pos_drop
        self.norm_pre = base.norm_pre
        self.blocks = base.blocks
        self.norm: nn.LayerNorm = base.norm
        # Checkpoint layout: class slot first unless the model adds pos-embeds to patches only.
        self._ckpt_has_class_slot = base.cls_token is not None and not base.no_embed_class
        full_pos = base.pos_embed.detach()
        slots = 1 if self._ckpt_has_class_slot else 0
        # 1 x N_p x D at the native grid. The slice keeps timm's batch stride ((1 + N_p) * D), which
        # is_contiguous() ignores for a size-1 dim, so .clone()/.contiguous() would keep it too; the
        # gradients arrive with packed strides, and DDP's bucket view (built from the parameter's
        # strides) would then need a copy on every step. Hence an explicitly packed copy.
        self.pos_embed = nn.Parameter(full_pos[:, slots:].clone(memory_format=torch.contiguous_format))
        class_pos = full_pos[0, 0] if slots else torch.zeros(self.embed_dim)
        self.prefix_pos = nn.ParameterDict(
            {g: nn.Parameter(class_pos.expand(n, -1).clone()) for g, n in self.groups})
        cls = base.cls_token.detach().reshape(-1) if base.cls_token is not None else torch.zeros(self.embed_dim)
        self.register_buffer("pretrained_cls", cls.clone())
        self.grad_checkpointing = False
        self._pos_cache: dict[tuple[Any, ...], tuple[int, Tensor]] = {}

        self.weight_report: Optional[WeightReport] = None
        if weights is not None:
            self.weight_report = load_vit_checkpoint(self, weights, num_prefix_slots_in_ckpt=slots)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def filter_checkpoint(self, state: dict[str, Tensor], num_prefix_slots: int = 1,
                          source: str = "checkpoint") -> tuple[dict[str, Tensor], list[str], list[str]]:
        """Map a timm/DINO ViT state dict onto this model: ``(tensors by our names, unexpected, notes)``.

        ``pos_embed`` = ``num_prefix_slots`` class slots + a square patch grid: the grid is resized
        to ours (``pos_embed_init``), class slot 0 initialises every row of every prefix group, and
        ``cls_token`` becomes ``pretrained_cls``. Classifier ``head.*`` tensors are dropped.
        """
        own = self.state_dict()
        adapted: dict[str, Tensor] = {}
        unexpected: list[str] = []
        notes: list[str] = []
        head = [k for k in state if k == "head" or k.startswith("head.")]
        if head:
            notes.append(f"dropped {len(head)} classifier/projection head tensors (head.*)")
        for key, tensor in state.items():
            if key in head:
                continue
            if key == "cls_token":
                adapted["pretrained_cls"] = tensor.reshape(-1)
            elif key == "pos_embed":
                adapted.update(self._adapt_pos_embed(tensor, num_prefix_slots, source, notes))
            elif key in own and not key.startswith("prefix_pos.") and key != "pretrained_cls":
                adapted[key] = tensor
            else:
                unexpected.append(key)
        return adapted, unexpected, notes

    def _adapt_pos_embed(self, pos: Tensor, slots: int, source: str, notes: list[str]) -> dict[str, Tensor]:
        pos = pos.reshape(1, -1, pos.shape[-1])
        num_patches = pos.shape[1] - slots
        side = math.isqrt(max(num_patches, 0))
        if num_patches == self.grid_size[0] * self.grid_size[1]:
            old_grid = self.grid_size
        elif side * side == num_patches and side > 0:
            old_grid = (side, side)
        else:
            raise ValueError(f"{source}: pos_embed has {pos.shape[1]} entries = {slots} class slot(s) + {num_patches} "
                             f"patches, which is not a square grid")
        out: dict[str, Tensor] = {}
        patch_pos = pos[:, slots:]
        if tuple(old_grid) != self.grid_size:
            mode = self.pos_embed_init
            if mode == "replicate" and self.grid_size != (2 * old_grid[0], 2 * old_grid[1]):
                mode = "bicubic"
            notes.append(f"patch pos-embed resized {old_grid[0]}x{old_grid[1]} -> "
                         f"{self.grid_size[0]}x{self.grid_size[1]} ({'nearest x2' if mode == 'replicate' else 'bicubic'})")
            patch_pos = resize_patch_pos_embed(patch_pos.float(), old_grid, self.grid_size, mode)
        out["pos_embed"] = patch_pos
        if slots >= 1:
            for group, count in self.groups:
                out[f"prefix_pos.{group}"] = pos[0, 0].expand(count, -1).clone()
            if slots > 1:
                notes.append(f"checkpoint has {slots} class slots; prefix rows initialised from slot 0")
            notes.append("class-slot pos-embed replicated to prefix groups "
                         + ", ".join(f"{g} x{n}" for g, n in self.groups))
        return out

    def no_weight_decay(self) -> set[str]:
        """Position embeddings are excluded from weight decay (as timm and DINO do)."""
        return {"pos_embed"} | {f"prefix_pos.{g}" for g, _ in self.groups}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory at large crops)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------------------
    # forward

    def patch_pos_embed(self, grid: tuple[int, int], square_input: bool = True) -> Tensor:
        """Patch pos-embeds ``1 x h*w x D`` for ``grid``, bicubic from the native grid (``pos_embed_resize``).

        ``official`` keeps the native pos-embeds only for a square input at the native grid, as MCTformer
        does: a non-square input whose grid is native (e.g. 224 x 230 px) is still resampled.
        Resized copies are cached per (grid, device, dtype) when no gradient flows to them
        (inference); the cache is invalidated whenever the parameter changes.
        """
        official = self.pos_embed_resize == "official"
        if tuple(grid) == self.grid_size and (square_input or not official):
            return self.pos_embed
        resize = resize_patch_pos_embed_official if official else resize_patch_pos_embed
        if torch.is_grad_enabled() and self.pos_embed.requires_grad:
            return resize(self.pos_embed, self.grid_size, grid)
        key = (tuple(grid), self.pos_embed.device, self.pos_embed.dtype)
        version = self.pos_embed._version
        hit = self._pos_cache.get(key)
        if hit is None or hit[0] != version:
            with torch.no_grad():
                hit = (version, resize(self.pos_embed, self.grid_size, grid))
            self._pos_cache[key] = hit
        return hit[1]

    def forward(self, images: Tensor, prefix: dict[str, Tensor], attn_layers: Sequence[int] = (),
                attn_rows: Optional[slice] = None, return_all_layers: bool = False) -> ViTOutput:
        """Encode ``images`` (B x 3 x H x W, ImageNet-normalised) with the given prefix tokens.

        ``prefix[g]`` is ``n_g x D`` (shared by the batch) or ``B x n_g x D``, without position
        embedding (``prefix_pos[g]`` is added here). The patch grid is ``floor(H/p) x floor(W/p)``;
        pixels beyond it are ignored. ``attn_layers`` (0-based, negatives count from the end) asks
        for head-averaged attention probabilities of the query rows ``attn_rows`` (default: all).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be B x 3 x H x W, got shape {tuple(images.shape)}")
        batch = images.shape[0]
        p = self.patch_size
        h, w = images.shape[-2] // p, images.shape[-1] // p
        if h == 0 or w == 0:
            raise ValueError(f"input {tuple(images.shape[-2:])} is smaller than one {p}x{p} patch")
        patches = self.patch_embed(images[..., : h * p, : w * p])  # B x h x w x D
        patches = patches.reshape(batch, h * w, -1) + self.patch_pos_embed(
            (h, w), square_input=images.shape[-2] == images.shape[-1])
        x = torch.cat([self._prefix_tokens(prefix, batch), patches], dim=1)
        x = self.norm_pre(self.pos_drop(x))

        wanted = self._resolve_layers(attn_layers)
        rows = attn_rows if attn_rows is not None else slice(None)
        attentions: dict[int, Tensor] = {}
        layers: list[Tensor] = []
        for index, block in enumerate(self.blocks):
            if index in wanted:
                x = _run_block_capturing_attention(block, x, rows, attentions, index)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if return_all_layers:
                layers.append(x)

        out_prefix: dict[str, Tensor] = {}
        start = 0
        for group, count in self.groups:
            out_prefix[group] = x[:, start:start + count]
            start += count
        return ViTOutput(out_prefix, x[:, start:], (h, w), attentions, layers)

    def _prefix_tokens(self, prefix: dict[str, Tensor], batch: int) -> Tensor:
        names = [g for g, _ in self.groups]
        if set(prefix) != set(names):
            raise ValueError(f"prefix tokens: expected groups {names}, got {sorted(prefix)}")
        tokens = []
        for group, count in self.groups:
            value = prefix[group]
            if value.dim() == 2:
                value = value.unsqueeze(0).expand(batch, -1, -1)
            if value.dim() != 3 or tuple(value.shape) != (batch, count, self.embed_dim):
                raise ValueError(f"prefix tokens {group!r}: expected [{count}, {self.embed_dim}] or "
                                 f"[{batch}, {count}, {self.embed_dim}], got {tuple(prefix[group].shape)}")
            tokens.append(value + self.prefix_pos[group])
        return torch.cat(tokens, dim=1)

    def _resolve_layers(self, attn_layers: Sequence[int]) -> set[int]:
        resolved = set()
        for layer in attn_layers:
            index = int(layer) + (self.depth if layer < 0 else 0)
            if not 0 <= index < self.depth:
                raise ValueError(f"attention layer {layer} out of range for a {self.depth}-block ViT")
            resolved.add(index)
        return resolved


def _timm_patch_size(name: str) -> int:
    """The patch size of timm architecture ``name`` (its pretrained config's input over its grid)."""
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
    return int(model.patch_embed.patch_size[0])


def _check_groups(prefix_groups: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    groups = [(str(g), int(n)) for g, n in prefix_groups]
    names = [g for g, _ in groups]
    if not groups:
        raise ValueError("prefix_groups: at least one group of extra tokens is required")
    if len(set(names)) != len(names):
        raise ValueError(f"prefix_groups: duplicate group names in {names}")
    for group, count in groups:
        if not group.isidentifier() or count < 1:
            raise ValueError(f"prefix_groups: group {group!r} needs an identifier name and >= 1 tokens, got {count}")
    return groups


def _run_block_capturing_attention(block: nn.Module, x: Tensor, rows: slice, store: dict[int, Tensor],
                                   index: int) -> Tensor:
    """Run ``block`` unchanged and record its head-averaged attention probabilities for ``rows``.

    A hook on the block's qkv projection re-uses the q/k it computes, so the block output is exactly
    the fused one and only R x N logits per head are formed.
    """
    attn = block.attn
    if not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise ValueError(f"block {index}: attention capture needs a timm Attention with a fused qkv projection")

    def hook(_module: nn.Module, _inputs: Any, qkv: Tensor) -> None:
        batch, tokens, _ = qkv.shape
        q, k, _v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # Probabilities in float32 even under bf16 autocast: they are summed and thresholded later.
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            logits = (q[:, :, rows].float() * attn.scale) @ k.float().transpose(-2, -1)  # B x heads x R x N
            store[index] = logits.softmax(dim=-1).mean(dim=1)

    handle = attn.qkv.register_forward_hook(hook)
    try:
        return block(x)
    finally:
        handle.remove()
