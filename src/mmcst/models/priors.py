"""The frozen CLIP prior (open_clip): prompts and natural class names, text and image embeddings, their caches.

Weight files are read by :mod:`mmcst.models.weights` (:func:`~mmcst.models.weights.load_clip`). CLIP is
used frozen (METHOD.md 2.10): text embeddings of the class prompts are computed once and cached on disk; image embeddings of training crops are computed on the fly by
:class:`ClipImageEncoder` (METHOD.md 5.4) or once per whole image by :func:`cache_image_embeddings`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcst.io import atomic_save_torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PROMPT_TEMPLATE = "a photo of a {}."

# Natural spellings used inside CLIP prompts (METHOD.md 2.3); keys are dataset class names (VOC's
# concatenated ids), anything else has its underscores turned into spaces.
PROMPT_NAMES = {
    "aeroplane": "aeroplane", "diningtable": "dining table", "motorbike": "motorbike",
    "pottedplant": "potted plant", "tvmonitor": "tv monitor",
}


def prompt_name(class_name: str) -> str:
    """The spelling of ``class_name`` inside a CLIP prompt (``pottedplant`` -> ``potted plant``)."""
    return PROMPT_NAMES.get(class_name, class_name.replace("_", " "))

# CLIP's 80 ImageNet prompt templates (CLIP notebook "Prompt_Engineering_for_ImageNet").
ENSEMBLE_TEMPLATES: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]


def resolve_templates(kind: str | Sequence[str]) -> list[str]:
    """``"single"`` -> [PROMPT_TEMPLATE], ``"ensemble"`` -> ENSEMBLE_TEMPLATES, a list of templates -> itself."""
    if isinstance(kind, str):
        if kind == "single":
            return [PROMPT_TEMPLATE]
        if kind == "ensemble":
            return list(ENSEMBLE_TEMPLATES)
        raise ValueError(f"model.prior.templates: expected 'single' or 'ensemble', got {kind!r}")
    templates = list(kind)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"prompt templates must each contain '{{}}', got {templates!r}")
    return templates


@functools.lru_cache(maxsize=8)
def _tokenizer_for(name: str) -> Callable[..., Tensor]:
    import open_clip

    return open_clip.get_tokenizer(name)  # reads the BPE vocabulary: worth keeping


def _clip_tokenizer(clip_model: nn.Module, model_name: Optional[str]) -> tuple[str, Callable[..., Tensor]]:
    name = model_name or getattr(clip_model, "model_name", None)
    if name is None:
        raise ValueError("CLIP model name unknown: pass model_name= or load the model with load_clip")
    return name, _tokenizer_for(name)


@torch.no_grad()
def encode_texts(clip_model: nn.Module, texts: Sequence[str], model_name: Optional[str] = None,
                 batch_size: int = 256) -> Tensor:
    """L2-normalised CLIP text embeddings of ``texts`` -> [N, d] float32 (frozen encoder, no gradients)."""
    _, tokenizer = _clip_tokenizer(clip_model, model_name)
    device = next(clip_model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    if not chunks:
        raise ValueError("encode_texts: no texts given")
    return torch.cat(chunks)


def default_cache_dir() -> Path:
    """``$MMCST_CACHE`` or ``~/.cache/mmcst``."""
    return Path(os.environ.get("MMCST_CACHE", Path.home() / ".cache" / "mmcst"))


def clip_text_embeddings(clip_model: nn.Module, class_names: Sequence[str], templates: str | Sequence[str] = (PROMPT_TEMPLATE,),
                         cache_dir: str | os.PathLike | None = None, key: Optional[str] = None,
                         model_name: Optional[str] = None) -> Tensor:
    """Class prompt embeddings -> [C, d], L2-normalised (METHOD.md 2.3).

    Each class name gets its natural spelling (``prompt_name``) in every template; embeddings are
    L2-normalised per template, averaged over templates and re-normalised. With ``cache_dir`` the
    result is stored under a hash of (checkpoint sha256 ``key``, class names, templates, model name)
    and re-used by later calls; ``key`` defaults to the sha256 recorded by :func:`load_clip`.
    """
    templates = resolve_templates(templates if isinstance(templates, str) else list(templates))
    name, _ = _clip_tokenizer(clip_model, model_name)
    key = key or getattr(clip_model, "weights_sha256", None)
    cache_file = None
    if cache_dir is not None and key is not None:
        ident = json.dumps([key, list(class_names), templates, name])
        cache_file = Path(cache_dir) / f"clip_text_{hashlib.sha256(ident.encode()).hexdigest()[:20]}.pt"
        if cache_file.is_file():
            try:
                cached = torch.load(cache_file, map_location="cpu", weights_only=True)
                if cached.shape[0] == len(class_names):
                    return cached
            except Exception as exc:  # a stale or damaged cache is recomputed, never trusted
                logger.warning("%s: unreadable text-embedding cache, recomputing (%s)", cache_file, exc)
    texts = [template.format(prompt_name(c)) for c in class_names for template in templates]
    embeddings = encode_texts(clip_model, texts, model_name=name)
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    embeddings = F.normalize(embeddings, dim=-1).cpu()
    if cache_file is not None:
        atomic_save_torch(cache_file, embeddings)
    return embeddings


class _FrozenClipPart(nn.Module):
    """Holds a frozen CLIP model without registering it as a submodule.

    The CLIP weights are a prior re-loaded from their file, so they stay out of ``parameters()``
    (no optimizer, DDP or weight-decay bookkeeping) and out of ``state_dict()`` (checkpoints keep
    only what is trained). ``.to()`` / ``.half()`` still reach them through ``_apply``.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        clip_model.eval().requires_grad_(False)
        object.__setattr__(self, "clip_model", clip_model)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "_FrozenClipPart":
        self.clip_model._apply(fn)
        return super()._apply(fn, recurse)


class ClipImageEncoder(_FrozenClipPart):
    """Frozen CLIP image embedding of ImageNet-normalised crops -> B x d, L2-normalised (METHOD.md 5.4)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__(clip_model)
        import open_clip

        visual = clip_model.visual
        size = visual.image_size
        self.input_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.embed_dim: int = int(visual.output_dim)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        # (mean, std) pairs as 1x3x1x1: ImageNet to undo, CLIP to apply.
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """ImageNet-normalised B x 3 x H x W -> CLIP-normalised B x 3 x S x S (bicubic, antialiased)."""
        pixels = images.float() * self.imagenet_std + self.imagenet_mean
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", antialias=True, align_corners=False)
        # Bicubic overshoots; CLIP saw 8-bit images, so keep the pixel range.
        pixels = pixels.clamp(0.0, 1.0)
        dtype = next(self.clip_model.parameters()).dtype
        return ((pixels - self.clip_mean) / self.clip_std).to(dtype)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        embeddings = self.clip_model.encode_image(self.preprocess(images))
        return F.normalize(embeddings.float(), dim=-1)


class ClipTextEncoder(_FrozenClipPart):
    """Frozen CLIP text embedding of free text (captions) -> [N, d], L2-normalised."""

    def __init__(self, clip_model: nn.Module, model_name: Optional[str] = None) -> None:
        super().__init__(clip_model)
        self.model_name, _ = _clip_tokenizer(clip_model, model_name)
        self.embed_dim: int = int(clip_model.visual.output_dim)  # the joint image-text space

    def forward(self, texts: Sequence[str]) -> Tensor:
        return encode_texts(self.clip_model, texts, model_name=self.model_name)


def _image_cache_key(encoder: ClipImageEncoder) -> Optional[str]:
    """What whole-image embeddings depend on besides the images: the CLIP architecture and its weight file."""
    sha = getattr(encoder.clip_model, "weights_sha256", None)
    return None if sha is None else f"{getattr(encoder.clip_model, 'model_name', '?')}:{sha}"


def image_embedding_cache_file(directory: str | os.PathLike, encoder: ClipImageEncoder,
                               ids: Optional[Sequence[str]]) -> Path:
    """The file :func:`cache_image_embeddings` uses in ``directory`` for these images and this CLIP model.

    Named by a hash of (architecture, weights sha256, image ids), so a directory shared by several runs holds
    one cache per dataset split and CLIP model instead of one file they keep overwriting.
    """
    ident = json.dumps([_image_cache_key(encoder), None if ids is None else [str(i) for i in ids]])
    return Path(directory) / f"clip_image_{hashlib.sha256(ident.encode()).hexdigest()[:20]}.pt"


@torch.no_grad()
def cache_image_embeddings(encoder: ClipImageEncoder, dataset: Any, path: str | os.PathLike,
                           batch_size: int = 32) -> dict[str, Tensor]:
    """Whole-image CLIP embeddings per image id, computed once and stored at ``path``.

    The speed variant of the image-language context target (``model.prior.image_embed=cache``): each
    full image is resized to the CLIP input size (whole content kept, aspect not), so it can differ
    from the embedding of an augmented crop. The file is re-used when its ids, CLIP architecture and
    weights match.
    """
    path = Path(path)
    ids = [str(i) for i in getattr(dataset, "ids", [])] or None
    key = _image_cache_key(encoder)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            same_images = stored.get("ids") == ids if ids is not None else len(stored.get("ids", ())) == len(dataset)
            if stored.get("key") == key and same_images:
                return dict(zip(stored["ids"], stored["embeddings"]))
            logger.info("%s: image-embedding cache is for other images or weights; recomputing", path)
        except Exception as exc:
            logger.warning("%s: unreadable image-embedding cache, recomputing (%s)", path, exc)
    device = encoder.imagenet_mean.device
    all_ids: list[str] = []
    chunks: list[Tensor] = []
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            chunks.append(encoder(torch.stack(batch).to(device)).cpu())
            batch.clear()

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for index in range(len(dataset)):
        item = dataset[index]
        pixels = item["image"].float().div(255.0).unsqueeze(0)
        pixels = F.interpolate(pixels, size=encoder.input_size, mode="bicubic", antialias=True, align_corners=False)
        batch.append(((pixels.clamp(0.0, 1.0) - mean) / std)[0])
        all_ids.append(str(item["id"]))
        if len(batch) == batch_size:
            flush()
    flush()
    if not chunks:
        raise ValueError(f"cache_image_embeddings: dataset is empty (cache {path})")
    embeddings = torch.cat(chunks)
    atomic_save_torch(path, {"ids": all_ids, "embeddings": embeddings, "key": key})
    return dict(zip(all_ids, embeddings))
