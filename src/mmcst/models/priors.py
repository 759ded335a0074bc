"""Pretrained priors, offline only: ViT weight files (DINO / timm) and frozen CLIP (open_clip).

Nothing here downloads. Every loader takes a local file, records its sha256 and what did and did not
load in a :class:`WeightReport`, and fails with a message naming the file and where to get it.

CLIP is used frozen (METHOD.md 2.10): text embeddings of the class prompts are computed once and
cached on disk; image embeddings of training crops are computed on the fly by
:class:`ClipImageEncoder` (METHOD.md 5.4) or once per whole image by :func:`cache_image_embeddings`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcst.data.base import prompt_name
from mmcst.io import atomic_save_torch

if TYPE_CHECKING:
    from mmcst.models.vit import TokenViT

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where the default backbone weights come from (we never fetch them ourselves).
VIT_WEIGHT_SOURCES = (
    "DINO ViT-B/16: https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "timm: https://huggingface.co/timm/vit_base_patch16_224.dino (model.safetensors)",
)

# Wrappers around the weights in full training checkpoints, unwrapped in this order. DINO's full
# checkpoints hold "teacher" and "student"; the teacher is the one DINO evaluates.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")
_KEY_PREFIXES = ("module.", "backbone.", "model.", "encoder.")

PROMPT_TEMPLATE = "a photo of a {}."

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


# --------------------------------------------------------------------------------------------------
# files and reports

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in chunks; cached by (path, mtime, size) so repeated loads are free."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class WeightReport:
    """What one pretrained file contributed to a model."""

    path: str
    sha256: str
    loaded: int  # model tensors filled from the file
    missing: list[str] = field(default_factory=list)  # model tensors the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file tensors the model did not use
    notes: list[str] = field(default_factory=list)  # adaptations made (resized pos-embeds, dropped head, ...)

    def summary(self) -> str:
        lines = [f"{self.path} (sha256 {self.sha256[:12]}): loaded {self.loaded} tensors, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        if self.missing:
            lines.append(f"  missing: {_short_list(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {_short_list(self.unexpected)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "loaded": self.loaded, "missing": list(self.missing),
                "unexpected": list(self.unexpected), "notes": list(self.notes)}


def _short_list(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def summarize_reports(reports: Iterable[Optional[WeightReport]]) -> str:
    """One block per loaded file, for logs and run reports."""
    present = [r for r in reports if r is not None]
    if not present:
        return "no pretrained weights loaded (random initialisation)"
    return "\n".join(r.summary() for r in present)


def _missing_file_error(path: Path, what: str, sources: Sequence[str]) -> FileNotFoundError:
    where = "; ".join(sources)
    return FileNotFoundError(f"{path}: {what} not found. mmcst never downloads weights: "
                             f"place the file there or point the config at it. Sources: {where}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weight file as a flat ``{name: tensor}`` dict.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``. Training
    checkpoints are unwrapped (``model`` / ``state_dict`` / DINO ``teacher`` / ``student``) and the
    prefixes ``module.``, ``backbone.``, ``model.``, ``encoder.`` are stripped from the names.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, "weight file", VIT_WEIGHT_SOURCES)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        if _is_torchscript_archive(path):
            raise ValueError(f"{path}: is a TorchScript archive (an OpenAI CLIP .pt?), not a state dict; "
                             f"CLIP weights go through load_clip / model.prior.clip_weights")
        try:
            # DINO's full checkpoints store their argparse options beside the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: could not be read as a tensor state dict ({_first_line(exc)}). If it holds pickled "
                             f"Python objects, re-save it with torch.save(model.state_dict(), path)") from exc
    for _ in range(4):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, dict):
            break
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    state = {_strip_prefixes(str(k)): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path}: holds no tensors (keys: {_short_list([str(k) for k in obj])})")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def load_vit_checkpoint(vit_model: "TokenViT", path: str | os.PathLike, num_prefix_slots_in_ckpt: int = 1) -> WeightReport:
    """Load a DINO / timm ViT weight file into a :class:`mmcst.models.vit.TokenViT`.

    The checkpoint's position embedding holds ``num_prefix_slots_in_ckpt`` class slots (1 for DINO,
    DeiT and timm ViTs: METHOD.md Appendix A.2) followed by its patch grid. The model adapts the
    file (``vit_model.filter_checkpoint``: pos-embed resizing, class slot -> every prefix row,
    ``cls_token`` -> ``pretrained_cls``, classifier head dropped); then the tensors are copied.
    """
    path = Path(path)
    state = load_state_dict_file(path)
    adapted, unexpected, notes = vit_model.filter_checkpoint(state, num_prefix_slots_in_ckpt, source=str(path))
    own = vit_model.state_dict()
    for name, tensor in adapted.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(own[name].shape)} (wrong backbone name or size overrides?)")
    vit_model.load_state_dict(adapted, strict=False)
    missing = [name for name in own if name not in adapted]
    report = WeightReport(str(path), sha256_file(path), len(adapted), missing, unexpected, notes)
    logger.info("ViT weights: %s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# CLIP

def _clip_sources(model_name: str) -> list[str]:
    import open_clip

    base = model_name.removesuffix("-quickgelu")
    url = open_clip.pretrained.get_pretrained_url(base, "openai")
    sources = [f"OpenAI {base}: {url}"] if url else []
    return sources + [f"open_clip: open_clip.list_pretrained() tags for {base}, saved as .bin/.safetensors"]


def load_clip(model_name: str = "ViT-B-16-quickgelu", path: str | os.PathLike | None = None,
              device: str | torch.device = "cpu") -> tuple[nn.Module, WeightReport]:
    """Build the open_clip model ``model_name`` and load a local CLIP weight file, frozen and in eval mode.

    Accepts OpenAI TorchScript ``.pt`` archives and open_clip ``.bin`` / ``.pt`` / ``.safetensors``
    state dicts. OpenAI weights were trained with QuickGELU: a plain-GELU name given with an OpenAI
    archive is switched to its ``-quickgelu`` variant (noted in the report), since the wrong
    activation silently changes every embedding. Loading is strict: keys must match the architecture.
    The returned model carries ``model_name`` and ``weights_sha256`` for the text-embedding cache.
    """
    import open_clip

    if path is None:
        raise ValueError(f"model.prior.clip_weights: no CLIP weight file given for {model_name!r}; mmcst never "
                         f"downloads. Get one from: {'; '.join(_clip_sources(model_name))}")
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, f"CLIP weight file for {model_name!r}", _clip_sources(model_name))
    if model_name not in open_clip.list_models():
        raise ValueError(f"model.prior.clip_model: unknown open_clip architecture {model_name!r}")
    openai_archive = _is_torchscript_archive(path)
    notes: list[str] = []
    name = model_name
    if openai_archive:
        notes.append("OpenAI TorchScript archive: weights read from its state dict (no JIT model kept)")
        if not name.endswith("-quickgelu"):
            quick = f"{name}-quickgelu"
            if quick in open_clip.list_models():
                name = quick
            notes.append(f"OpenAI weights need QuickGELU: using {name!r} instead of {model_name!r}")
    try:
        with warnings.catch_warnings():
            # torch.load announces that it hands TorchScript archives to torch.jit.load; that is intended.
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
            model = open_clip.create_model(name, pretrained=str(path), precision="fp32", device="cpu", jit=False,
                                           force_quick_gelu=openai_archive, weights_only=not openai_archive,
                                           pretrained_text=False, pretrained_image=False)
    except (RuntimeError, AssertionError, KeyError) as exc:  # open_clip's ways of saying "keys/shapes differ"
        raise ValueError(f"{path}: does not fit open_clip architecture {name!r} ({_first_line(exc)})") from exc
    model = model.to(device).eval().requires_grad_(False)
    model.model_name = name
    model.weights_sha256 = sha256_file(path)
    report = WeightReport(str(path), model.weights_sha256, len(model.state_dict()), [], [], notes)
    logger.info("CLIP weights: %s", report.summary())
    return model, report


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


@torch.no_grad()
def cache_image_embeddings(encoder: ClipImageEncoder, dataset: Any, path: str | os.PathLike,
                           batch_size: int = 32) -> dict[str, Tensor]:
    """Whole-image CLIP embeddings per image id, computed once and stored at ``path``.

    The speed variant of the image-language context target (``model.prior.image_embed=cache``): each
    full image is resized to the CLIP input size (whole content kept, aspect not), so it can differ
    from the embedding of an augmented crop. The file is re-used when its ids and CLIP weights match.
    """
    path = Path(path)
    ids = [str(i) for i in getattr(dataset, "ids", [])] or None
    key = getattr(encoder.clip_model, "weights_sha256", None)
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
