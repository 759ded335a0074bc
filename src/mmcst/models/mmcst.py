"""MMCST: multi-modal class-specific tokens (Xu et al., CVPR 2023), METHOD.md sections 2-4.

Sequence ``[C visual class tokens | C text tokens | h*w patches]`` through one ViT (fused attention in
training). Global tokens ``T_in`` are dataset-level parameters; local tokens ``T_out`` are the encoder
outputs at their positions (or, with ``context_design=decoder``, the outputs of a small transformer
decoder in which the global tokens cross-attend to the patches). Maps correlate the combined tokens
``T = T_in + lambda * LN(T_out)`` with ``LN(T_pat)``; GWRP turns them into logits for the ``t2p`` /
``c2p`` MLSM terms; the raw visual output tokens give the MCTformer-V1 ``cls_token`` term; the pooled
output text tokens, projected into CLIP's space, are pulled towards the CLIP image (or caption)
embedding of the same image by the batch-contrastive ``contrast`` term (or the ``l1`` term).

Ablation switches (config ``model.mmcst``): ``tokens`` (global_visual | global | local | global_local),
``visual_context`` (False: global tokens in the maps), ``context`` (image | caption | none),
``regularizer`` (contrast | l1), ``text_bridge`` (linear | direct), ``context_design`` (encoder | decoder),
``fusion`` (F1 | F2 | F3), learnable lambdas / temperature, ``correlation_scale``.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmcst.losses import batch_contrastive_ce, gwrp, l1_regularizer, mlsm
from mmcst.models.base import Localization, LocalizationModel
from mmcst.models.mctformer import (
    attention_request,
    build_token_vit,
    class_to_patch_attention,
    init_class_tokens,
    last_layers,
    patch_affinity,
    patch_layout,
    report_dicts,
)
from mmcst.models.registry import register_model


# CLIP clamps its learnable logit scale (1 / tau) at 100.
_MAX_LOGIT_SCALE = 100.0
# First-batch token balance: rescale T_in until its norm is within this factor of lambda*LN(T_out)'s (T_out
# itself moves a little when T_in is rescaled, so a few rounds are taken).
_BALANCE_TOLERANCE = 1.1
_BALANCE_ROUNDS = 4
# Names of the token-norm entries in ``forward``'s "token_norms" output (and in metrics.jsonl).
TOKEN_NORM_NAMES = ("norm_cls_in", "norm_cls_out", "norm_txt_in", "norm_txt_out")


@dataclass
class _Encoded:
    """One encoder pass, split into the parts the heads use."""

    cls_out: torch.Tensor  # B x C x D raw visual output tokens (for the class-token logits)
    txt_out: Optional[torch.Tensor]  # B x C x D raw text output tokens (None without text tokens)
    patches: torch.Tensor  # B x N_p x D, LayerNorm-ed (patch_norm=layernorm) or the raw residual stream
    grid: tuple[int, int]
    attentions: dict[int, torch.Tensor]
    rows: Optional[slice]


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per (image, class) min-max normalisation of B x C x h x w maps."""
    flat = maps.flatten(2)
    low = flat.amin(-1, keepdim=True)
    high = flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low + 1e-8)).view_as(maps)


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """Read a captions CSV with columns ``image,caption`` (several rows per image allowed).

    Keys are the ``image`` values as written and, when they differ, their file stems (so ``2007_000032.jpg``
    and ``2007_000032`` both match the dataset id).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.mmcst.captions_file: {path} not found (expected a CSV with columns image,caption)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns image,caption, got {reader.fieldnames}")
        captions: dict[str, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                raise ValueError(f"{path}:{line}: empty image or caption field")
            captions.setdefault(image, []).append(caption)
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


class MMCST(LocalizationModel):
    """The MMCST model; see the module docstring and METHOD.md 2-4."""

    def __init__(self, class_names: Sequence[str], model_cfg: Any) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("MMCST: expected at least one class name")
        cfg = model_cfg.mmcst
        prior = model_cfg.prior
        self.cfg = cfg
        self.class_names = list(class_names)
        self.num_classes = num_classes = len(self.class_names)
        self.use_text = cfg.tokens != "global_visual"
        self.use_decoder = cfg.context_design == "decoder"
        groups = [("cls", num_classes)] + ([("txt", num_classes)] if self.use_text else [])
        self.vit = build_token_vit(model_cfg.backbone, groups)
        dim = self.vit.embed_dim
        self.class_tokens = init_class_tokens(self.vit, num_classes, model_cfg.backbone.token_init_std)  # T_cls^in
        # Text tokens start with the visual tokens' norm (METHOD 2.3 option A: norm-matched P_in).
        token_norm = float(self.class_tokens.detach().norm(dim=-1).mean())

        self._clip_reports: list[Any] = []
        clip_model = None
        self.context_active = self.use_text and prior.kind == "clip" and cfg.context != "none"
        if self.use_text and prior.kind == "clip":
            from mmcst.models.priors import clip_text_embeddings, default_cache_dir, resolve_templates
            from mmcst.models.weights import load_clip

            clip_model, report = load_clip(prior.clip_model, prior.clip_weights)
            self._clip_reports.append(report)
            embeddings = clip_text_embeddings(clip_model, self.class_names, resolve_templates(prior.templates),
                                              cache_dir=prior.cache_dir or default_cache_dir())
            self._init_text_tokens(embeddings.float(), cfg.text_bridge, dim, token_norm)
        elif self.use_text:
            # No prior: a learnable random C x D parameter with the visual tokens' norm.
            generator = torch.Generator().manual_seed(0)
            random = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1) * token_norm
            self.text_tokens = nn.Parameter(random)
            self.text_proj = None

        for name, value in (("lambda_text", cfg.lambda_text), ("lambda_cls", cfg.lambda_cls)):
            if cfg.learnable_lambda:
                setattr(self, name, nn.Parameter(torch.tensor(float(value))))
            else:  # fixed weights stay out of parameters() (optimizer, DDP) but move with the model
                self.register_buffer(name, torch.tensor(float(value)))

        self.decoder: Optional[nn.TransformerDecoder] = None
        if self.use_decoder:
            if cfg.decoder_layers < 1:
                raise ValueError(f"model.mmcst.decoder_layers: expected >= 1, got {cfg.decoder_layers}")
            layer = nn.TransformerDecoderLayer(dim, self.vit.num_heads, 4 * dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True, layer_norm_eps=1e-6)
            self.decoder = nn.TransformerDecoder(layer, cfg.decoder_layers)

        self.fusion_layers = (last_layers(self.vit.depth, cfg.attention_layers, "model.mmcst.attention_layers")
                              if cfg.fusion == "F3" else [])
        if cfg.fusion == "t2p" and not self.use_text:
            raise ValueError("model.mmcst.fusion=t2p needs the text tokens; tokens=global_visual has only the visual "
                             "class tokens (its maps are c2p whatever the fusion)")

        self.context_proj: Optional[nn.Linear] = None
        self.clip_image = None
        self.clip_text = None
        # model.prior.image_embed=cache: whole-image targets computed once (training_extras), read from the batch.
        self.cached_image_context = prior.image_embed == "cache"
        self.embedding_cache_dir = prior.cache_dir
        if self.context_active:
            from mmcst.models.priors import ClipImageEncoder, ClipTextEncoder

            assert clip_model is not None
            clip_dim = int(clip_model.visual.output_dim)
            self.context_proj = nn.Linear(dim, clip_dim)  # W_out: D -> d_clip
            if cfg.learnable_temperature:
                self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
            if cfg.context == "image":
                self.clip_image = ClipImageEncoder(clip_model)
            else:
                if cfg.captions_file is None:
                    raise ValueError("model.mmcst.captions_file: context=caption needs a CSV image,caption")
                self.clip_text = ClipTextEncoder(clip_model)
                self._init_captions(cfg.captions_file)

    # ---------------------------------------------------------------- construction helpers
    def _init_text_tokens(self, embeddings: torch.Tensor, bridge: str, dim: int, token_norm: float) -> None:
        """Text tokens from frozen CLIP embeddings ``e`` (C x d_clip), norm-matched to the visual tokens."""
        self.register_buffer("text_embeddings", embeddings)  # e, frozen (saved: checkpoints are self-contained)
        if bridge == "linear":  # option A: T_txt^in = P_in(e)
            self.text_proj = nn.Linear(embeddings.shape[1], dim)
            with torch.no_grad():
                scale = token_norm / float(self.text_proj(embeddings).norm(dim=-1).mean())
                self.text_proj.weight.mul_(scale)
                self.text_proj.bias.mul_(scale)
            self.text_tokens = None
        else:  # option B: a C x D parameter initialised from the rescaled embeddings
            if embeddings.shape[1] != dim:
                raise ValueError(f"model.mmcst.text_bridge=direct needs the CLIP embedding width to equal the ViT "
                                 f"width, got {embeddings.shape[1]} vs {dim} (use text_bridge=linear, or a CLIP "
                                 f"model with {dim}-d embeddings such as ViT-L-14 for a ViT-B backbone)")
            self.text_tokens = nn.Parameter(F.normalize(embeddings, dim=-1) * token_norm)
            self.text_proj = None

    def _init_captions(self, path: str) -> None:
        captions = read_captions(path)
        assert self.clip_text is not None
        keys = list(captions)
        texts = [c for k in keys for c in captions[k]]
        embedded = self.clip_text(texts)  # N x d, L2-normalised
        rows, start = [], 0
        for k in keys:  # several captions of one image: mean of their embeddings, re-normalised
            count = len(captions[k])
            rows.append(F.normalize(embedded[start:start + count].mean(0), dim=-1))
            start += count
        self.caption_index: dict[str, int] = {}
        for i, k in enumerate(keys):
            self.caption_index[k] = i
            self.caption_index.setdefault(Path(k).stem, i)
        self.captions_file = str(path)
        # Training-only target: not saved in checkpoints (re-built from the CSV).
        self.register_buffer("caption_embeddings", torch.stack(rows), persistent=False)

    # ---------------------------------------------------------------- tokens
    def text_tokens_in(self) -> Optional[torch.Tensor]:
        """T_txt^in (C x D), or None without text tokens."""
        if not self.use_text:
            return None
        if self.text_proj is not None:
            return self.text_proj(self.text_embeddings)
        return self.text_tokens

    def _encode(self, images: torch.Tensor, attn_layers: Sequence[int] = (), attn_rows: Optional[slice] = None) -> _Encoded:
        text_in = self.text_tokens_in()
        prefix = {"cls": self.class_tokens}
        if text_in is not None:
            prefix["txt"] = text_in
        out = self.vit(images, prefix, attn_layers=tuple(attn_layers), attn_rows=attn_rows)
        patches = self.vit.norm(out.patches) if self.cfg.patch_norm == "layernorm" else out.patches
        if self.decoder is None:
            cls_out, txt_out = out.prefix["cls"], out.prefix.get("txt")
        else:
            # Decoder design: the global tokens cross-attend to this image's patches and the decoder output
            # replaces the in-encoder outputs as T_out (class-token logits included).
            queries = torch.cat([self.class_tokens, text_in]) if text_in is not None else self.class_tokens
            decoded = self.decoder(queries.unsqueeze(0).expand(images.shape[0], -1, -1).to(patches.dtype), patches)
            cls_out = decoded[:, :self.num_classes]
            txt_out = decoded[:, self.num_classes:] if text_in is not None else None
        return _Encoded(cls_out, txt_out, patches, out.grid, out.attentions, attn_rows)

    def combined_tokens(self, enc: _Encoded) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The tokens correlated with the patches: (T_cls, T_txt), each B x C x D (T_txt None without text).

        global / global_visual / visual_context=False: T = T_in; local: T = LN(T_out);
        global_local: T = T_in + lambda * LN(T_out).
        """
        batch = enc.patches.shape[0]
        mode = self.cfg.tokens
        if mode == "global_local" and not self.cfg.visual_context:
            mode = "global"

        def combine(t_in: torch.Tensor, t_out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            if self.cfg.token_norm == "layernorm":
                t_in = self.vit.norm(t_in)
            if mode in ("global", "global_visual"):
                return t_in.unsqueeze(0).expand(batch, -1, -1)
            local = self.vit.norm(t_out)
            return local if mode == "local" else t_in.unsqueeze(0) + lam * local

        t_cls = combine(self.class_tokens, enc.cls_out, self.lambda_cls)
        text_in = self.text_tokens_in()
        t_txt = None
        if text_in is not None:
            assert enc.txt_out is not None
            t_txt = combine(text_in, enc.txt_out, self.lambda_text)
        return t_cls, t_txt

    def part_norms(self, enc: _Encoded) -> torch.Tensor:
        """Mean L2 norms of the two parts of the combined tokens (METHOD 2.5), as in :data:`TOKEN_NORM_NAMES`.

        ``[||T_cls^in||, ||lambda_cls LN(T_cls^out)||, ||T_txt^in||, ||lambda_txt LN(T_txt^out)||]``, each the mean
        over classes (and images for the local parts); T_in is taken as it enters the sum (LayerNorm-ed with
        ``token_norm=layernorm``); NaN for a part the model does not have.
        """
        def global_norm(t_in: torch.Tensor) -> torch.Tensor:
            t_in = self.vit.norm(t_in) if self.cfg.token_norm == "layernorm" else t_in
            return t_in.detach().float().norm(dim=-1).mean()

        def local_norm(t_out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            return (lam.detach().float() * self.vit.norm(t_out.detach()).float()).norm(dim=-1).mean()

        nan = torch.tensor(float("nan"), device=enc.patches.device)
        text_in = self.text_tokens_in()
        values = [global_norm(self.class_tokens), local_norm(enc.cls_out, self.lambda_cls),
                  nan if text_in is None else global_norm(text_in),
                  nan if enc.txt_out is None else local_norm(enc.txt_out, self.lambda_text)]
        return torch.stack([v.to(nan.device) for v in values])

    def balances_tokens(self) -> bool:
        """Whether the combined tokens sum a global and a local part whose scales ``token_balance`` matches."""
        return (self.cfg.token_balance == "first_batch" and self.cfg.tokens == "global_local"
                and self.cfg.visual_context and self.cfg.token_norm == "none")

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Data-dependent start on the first training batch (METHOD 2.5: ``||lambda T_out|| ~ ||T_in||``).

        With ``token_balance=first_batch`` and global-local tokens, the global tokens T_in (visual, and text:
        ``P_in`` or the direct parameter) are rescaled, direction kept, until their mean norm matches that of
        ``lambda * LN(T_out)`` on ``images``. Without it a random start leaves T_in at trunc-normal(0.02)
        scale (norm ~0.02 sqrt(D)) against LN(T_out) at ~sqrt(D): the global tokens would carry nothing.
        Returns the norms before and after and the scale applied to each part (for the run's log).
        """
        def measure() -> dict[str, float]:
            norms = zip(TOKEN_NORM_NAMES, self.part_norms(self._encode(images)).tolist())
            return {name: value for name, value in norms if math.isfinite(value)}

        before = measure()
        record: dict[str, Any] = {"token_balance": self.cfg.token_balance, "before": before}
        scales = {"cls": 1.0, "txt": 1.0}
        if self.balances_tokens():
            norms = before
            for _ in range(_BALANCE_ROUNDS):
                done = True
                for part in ("cls", "txt"):
                    inner, outer = norms.get(f"norm_{part}_in", 0.0), norms.get(f"norm_{part}_out", 0.0)
                    if inner <= 0 or outer <= 0:
                        continue  # a part the model lacks, or lambda = 0: nothing to match
                    factor = outer / inner
                    if max(factor, 1 / factor) > _BALANCE_TOLERANCE:
                        self._scale_global_tokens(part, factor)
                        scales[part] *= factor
                        done = False
                if done:
                    break
                norms = measure()
            record["after"] = norms
        else:
            record["after"] = before
        record["scale"] = {k: v for k, v in scales.items() if k == "cls" or self.use_text}
        return record

    def _scale_global_tokens(self, part: str, factor: float) -> None:
        if part == "cls":
            self.class_tokens.mul_(factor)
        elif self.text_proj is not None:
            self.text_proj.weight.mul_(factor)
            self.text_proj.bias.mul_(factor)
        elif self.text_tokens is not None:
            self.text_tokens.mul_(factor)

    def monitor(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalars for metrics.jsonl: the token-part norms of the last training forward."""
        norms = outputs.get("token_norms")
        if norms is None:
            return {}
        return {name: float(value) for name, value in zip(TOKEN_NORM_NAMES, norms.tolist()) if math.isfinite(value)}

    def _correlate(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """B x C x N_p correlation ``T . T_pat^T`` (optionally / sqrt(D))."""
        corr = torch.einsum("bcd,bnd->bcn", tokens.to(patches.dtype), patches)
        if self.cfg.correlation_scale == "sqrt_d":
            corr = corr / math.sqrt(patches.shape[-1])
        return corr

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        enc = self._encode(images)
        outputs: dict[str, torch.Tensor] = {"cls_logits": enc.cls_out.mean(-1)}  # raw tokens (Appendix A.1)
        outputs["token_norms"] = self.part_norms(enc)
        t_cls, t_txt = self.combined_tokens(enc)
        outputs["c2p_logits"] = gwrp(self._correlate(t_cls, enc.patches), self.cfg.gwrp_decay)
        if t_txt is not None:
            outputs["t2p_logits"] = gwrp(self._correlate(t_txt, enc.patches), self.cfg.gwrp_decay)
            if self.cfg.text_token_loss:
                assert enc.txt_out is not None
                outputs["txt_logits"] = enc.txt_out.mean(-1)
        if self.context_active:
            assert enc.txt_out is not None and self.context_proj is not None
            outputs["context"] = self._context_embedding(enc.txt_out, labels)
            if self.clip_image is not None:
                cached = (extras or {}).get("clip_embedding")
                if cached is None and self.cached_image_context:
                    raise ValueError("model.prior.image_embed=cache: the batch holds no 'clip_embedding'; give forward "
                                     "each image's entry of training_extras() (the mmcst engine does) or use "
                                     "image_embed=crop")
                target = cached if cached is not None else self.clip_image(images)
                outputs["context_target"] = F.normalize(target.float().to(images.device), dim=-1)
        return outputs

    def _context_embedding(self, txt_out: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """u = L2norm(W_out z), z = mean of LN(T_txt^out) over the labelled classes (all when none / pooling=all)."""
        assert self.context_proj is not None
        tokens = self.vit.norm(txt_out)  # B x C x D
        if labels is None or self.cfg.text_pooling == "all":
            pooled = tokens.mean(1)
        else:
            weights = (labels.to(tokens.device) > 0).to(tokens.dtype)
            empty = weights.sum(1, keepdim=True) == 0
            weights = torch.where(empty, torch.ones_like(weights), weights)  # label-free image: all classes
            pooled = (weights.unsqueeze(-1) * tokens).sum(1) / weights.sum(1, keepdim=True)
        return F.normalize(self.context_proj(pooled).float(), dim=-1)

    def temperature(self) -> torch.Tensor | float:
        if self.cfg.learnable_temperature:
            return 1.0 / self.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)
        return float(self.cfg.temperature)

    def _caption_targets(self, ids: Sequence[str], device: torch.device) -> torch.Tensor:
        rows = []
        for image_id in ids:
            index = self.caption_index.get(str(image_id), self.caption_index.get(Path(str(image_id)).stem))
            if index is None:
                raise KeyError(f"{self.captions_file}: no caption for image {image_id!r} (context=caption needs one "
                               f"caption row per training image)")
            rows.append(index)
        return self.caption_embeddings[torch.tensor(rows, device=self.caption_embeddings.device)].to(device)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"].to(outputs["c2p_logits"].device)
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.cls_token_loss:
            terms["cls_token"] = self.cfg.cls_token_weight * mlsm(outputs["cls_logits"], labels)
        if "t2p_logits" in outputs:
            terms["t2p"] = mlsm(outputs["t2p_logits"], labels)
        terms["c2p"] = mlsm(outputs["c2p_logits"], labels)
        if "txt_logits" in outputs:
            terms["txt_token"] = mlsm(outputs["txt_logits"], labels)
        if "context" in outputs:
            u = outputs["context"]
            if "context_target" in outputs:
                v = outputs["context_target"]
            else:
                if "id" not in batch:
                    raise KeyError("context=caption: the batch needs the image ids under 'id'")
                v = self._caption_targets(list(batch["id"]), u.device)
            if self.cfg.regularizer == "contrast":
                terms["contrast"] = batch_contrastive_ce(u, v, self.temperature(), self.cfg.symmetric_contrast)
            else:
                terms["l1"] = l1_regularizer(u, v)
        return terms

    # ---------------------------------------------------------------- inference
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Classification logits (B x C) as ``model.mmcst.score`` says (auto: the class-token head when it is
        trained, else the maps' GWRP logits, pooled with ``score_decay``, by default the training decay)."""
        outputs = self.forward_logits(images, self.cfg.score_decay)
        score = self.cfg.score
        if score == "auto":
            score = "cls_token" if self.cfg.cls_token_loss else "maps"
        maps = torch.stack([outputs[k] for k in ("t2p_logits", "c2p_logits") if k in outputs]).mean(0)
        if score == "maps":
            return maps
        if score == "cls_token":
            return outputs["cls_logits"]
        return 0.5 * (outputs["cls_logits"] + maps)

    def forward_logits(self, images: torch.Tensor, decay: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Logits only (no context branch): for the mAP monitor; ``decay`` pools the maps (None: ``gwrp_decay``)."""
        decay = self.cfg.gwrp_decay if decay is None else decay
        enc = self._encode(images)
        t_cls, t_txt = self.combined_tokens(enc)
        outputs = {"cls_logits": enc.cls_out.mean(-1),
                   "c2p_logits": gwrp(self._correlate(t_cls, enc.patches), decay)}
        if t_txt is not None:
            outputs["t2p_logits"] = gwrp(self._correlate(t_txt, enc.patches), decay)
        return outputs

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        """Fused class maps (METHOD 4.1.4) and, on request, the patch affinity (sum over layers)."""
        num_prefix = self.vit.num_prefix
        layers, rows = attention_request(self.vit.depth, num_prefix, self.num_classes, self.fusion_layers, need_affinity)
        enc = self._encode(images, layers, rows)
        h, w = enc.grid
        t_cls, t_txt = self.combined_tokens(enc)
        c2p = F.relu(self._correlate(t_cls, enc.patches)).float().view(-1, self.num_classes, h, w)
        if t_txt is None or self.cfg.fusion == "c2p":  # visual tokens only, or the c2p map alone
            maps = c2p
        else:
            t2p = F.relu(self._correlate(t_txt, enc.patches)).float().view(-1, self.num_classes, h, w)
            if self.cfg.fusion == "t2p":
                maps = t2p
            elif self.cfg.fusion == "F2":
                maps = _min_max(t2p) + _min_max(c2p)
            else:
                maps = (t2p * c2p).sqrt()
        if self.cfg.fusion == "F3":
            assert rows is not None
            attn = class_to_patch_attention(enc.attentions, self.fusion_layers, rows, self.num_classes, num_prefix)
            maps = maps * attn.float().view(-1, self.num_classes, h, w)
        affinity = None
        if need_affinity:
            assert rows is not None
            affinity = patch_affinity(enc.attentions, self.vit.depth, rows, num_prefix).float()
        return Localization(maps=maps, affinity=affinity)

    # ---------------------------------------------------------------- bookkeeping
    def train(self, mode: bool = True) -> "MMCST":
        super().train(mode)
        for encoder in (self.clip_image, self.clip_text):
            if encoder is not None:
                encoder.clip_model.eval()  # the prior stays frozen and deterministic
        return self

    def training_extras(self, dataset: Any, work_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
        """``{"clip_embedding": {image id: whole-image CLIP embedding}}`` with ``model.prior.image_embed=cache``.

        Computed once and kept in ``model.prior.cache_dir`` (or ``work_dir``), in a file named after the image ids
        and the CLIP model, so a run on other images or weights recomputes it and a resumed run reads it back.
        """
        if self.clip_image is None or not self.cached_image_context:
            return {}
        from mmcst.models.priors import cache_image_embeddings, image_embedding_cache_file

        ids = getattr(dataset, "ids", None)
        path = image_embedding_cache_file(self.embedding_cache_dir or work_dir, self.clip_image, ids)
        return {"clip_embedding": cache_image_embeddings(self.clip_image, dataset, path)}

    def no_weight_decay(self) -> set[str]:
        # Tokens and everything that produces them (METHOD 5.2: the text-token parameters, P_in included).
        names = {"class_tokens", "text_tokens", "text_proj.weight", "text_proj.bias", "lambda_text", "lambda_cls",
                 "logit_scale"}
        names |= {n for n, _ in self.named_parameters() if "pos" in n.rsplit(".", 1)[-1] or ".prefix_pos." in n}
        if hasattr(self.vit, "no_weight_decay"):
            names |= {f"vit.{n}" for n in self.vit.no_weight_decay()}
        own = {n for n, _ in self.named_parameters()}
        return names & own

    def weight_report(self) -> list[dict[str, Any]]:
        return report_dicts(getattr(self.vit, "weight_report", None), self._clip_reports)

    def token_layout(self) -> str:
        c = self.num_classes
        patches = patch_layout(self.vit)
        layout = f"[{c} visual | {c} text | {patches}]" if self.use_text else f"[{c} visual | {patches}]"
        if self.decoder is not None:
            layout += f"; T_out from a {self.cfg.decoder_layers}-layer decoder (global tokens x patches)"
        return layout


@register_model("mmcst")
def build_mmcst(model_cfg: Any, class_names: Sequence[str]) -> MMCST:
    return MMCST(class_names, model_cfg)
