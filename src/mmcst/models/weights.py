"""Weight files, offline only: ViT (DINO / timm), CLIP (open_clip) and ResNet state dicts, with load reports.

Nothing here downloads. Every loader takes a local file, records its sha256 and what did and did not
load in a :class:`WeightReport`, and fails with a message naming the file and where to get it. Files
are data: state dicts are read with ``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mmcst.models.vit import TokenViT

logger = logging.getLogger(__name__)

# Where the default backbone weights come from (we never fetch them ourselves).
VIT_WEIGHT_SOURCES = (
    "DINO ViT-B/16: https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "timm: https://huggingface.co/timm/vit_base_patch16_224.dino (model.safetensors)",
)

# Wrappers around the weights in full training checkpoints, unwrapped in this order. DINO's full
# checkpoints hold "teacher" and "student"; the teacher is the one DINO evaluates.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")
_KEY_PREFIXES = ("module.", "backbone.", "model.", "encoder.")

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


# --------------------------------------------------------------------------------------------------
# ResNet

def load_resnet_weights(backbone: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a timm or torchvision ResNet state dict (same key names) into a trunk; drop the classifier."""
    state = load_state_dict_file(path)
    dropped = sorted(k for k in state if k.startswith(("fc.", "classifier.", "head.")))
    state = {k: v for k, v in state.items() if k not in dropped}
    own = backbone.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if mismatched:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise ValueError(f"{path}: ResNet weights do not fit model.backbone.name ({detail})")
    result = backbone.load_state_dict(state, strict=False)
    loaded = sorted(k for k in state if k in own)
    if not loaded:
        raise ValueError(f"{path}: no key of this checkpoint matches the ResNet trunk "
                         f"(first keys: {list(state)[:5]}); expected a timm/torchvision ResNet state dict")
    notes = [f"dropped classifier keys: {dropped}"] if dropped else []
    report = WeightReport(path=str(path), sha256=sha256_file(path), loaded=len(loaded),
                          missing=sorted(result.missing_keys), unexpected=sorted(result.unexpected_keys), notes=notes)
    return report.as_dict()


# --------------------------------------------------------------------------------------------------
# official MCTformer checkpoints

MCTFORMER_VERSIONS = ("v1", "v2")
_MCTFORMER_BLOCK_TENSORS = tuple(f"{layer}.{kind}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                                  "mlp.fc1", "mlp.fc2") for kind in ("weight", "bias"))


def official_mctformer_keys(depth: int) -> list[str]:
    """Tensor names of the official ``deit_small_MCTformerV{1,2}_patch16_224`` state dict with ``depth`` blocks.

    Both versions hold ``head.weight``/``head.bias``: V1's is DeiT's unused linear classifier, V2's the 3x3
    PatchCAM convolution.
    """
    blocks = [f"blocks.{i}.{name}" for i in range(depth) for name in _MCTFORMER_BLOCK_TENSORS]
    return ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", *blocks,
            "norm.weight", "norm.bias", "head.weight", "head.bias"]


def _block_count(names: Iterable[str], prefix: str = "blocks.") -> int:
    """Number of transformer blocks named ``<prefix><i>.*`` in ``names`` (highest index + 1; 0 if none)."""
    indices = {int(n[len(prefix):].split(".", 1)[0]) for n in names
               if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    return max(indices) + 1 if indices else 0


def convert_official_mctformer(state: dict[str, Tensor], version: str, target: dict[str, Tensor],
                               source: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """Map an official MCTformer state dict (``main.py``'s ``checkpoint['model']``) onto mmcst's MCTformer.

    Official layout (C classes, D width, N = h*w native patches): ``cls_token`` 1 x C x D (the class tokens),
    ``pos_embed`` 1 x (C + N) x D (class-token slots first), ``patch_embed.proj.*``, ``blocks.<i>.*`` (timm
    names), ``norm.*`` (never applied by MCTformer's forward) and ``head.*`` (V2: the C x D x 3 x 3 PatchCAM
    convolution; V1: DeiT's linear classifier, unused since V1's logits are class-token means, so dropped).

    Args:
        state: the official tensors by name.
        version: ``v1`` or ``v2``.
        target: ``state_dict()`` of the mmcst MCTformer that will receive the weights (names and shapes).
        source: the file, for error messages.

    Returns:
        ``(state dict for the target, notes on what was adapted)``. Raises ``ValueError`` naming ``source`` and
        the offending keys when the layout or a shape does not fit.
    """
    if version not in MCTFORMER_VERSIONS:
        raise ValueError(f"MCTformer version: expected one of {list(MCTFORMER_VERSIONS)}, got {version!r}")
    label = f"MCTformer-{version.upper()}"
    depth = _block_count(target, "vit.blocks.")
    expected = official_mctformer_keys(depth)
    missing = [k for k in expected if k not in state]
    known = set(expected)
    unexpected = sorted(k for k in state if k not in known)
    if missing or unexpected:
        parts = [f"{what}: {_short_list(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                 if keys]
        file_depth = _block_count(state)
        hint = (f"; the file has {file_depth} blocks, the config builds {depth} (model.backbone.depth)"
                if file_depth and file_depth != depth else "")
        raise ValueError(f"{source}: not an official {label} state dict of {depth} blocks ({'; '.join(parts)}){hint}")

    cls_token, pos_embed, head = state["cls_token"], state["pos_embed"], state["head.weight"]
    num_classes, dim = target["class_tokens"].shape
    num_patches = target["vit.pos_embed"].shape[1]
    if head.dim() == 4 and version == "v1":
        raise ValueError(f"{source}: head.weight {tuple(head.shape)} is V2's 3x3 PatchCAM convolution: an "
                         "MCTformer-V2 checkpoint (import it as mctformer_v2)")
    if head.dim() != 4 and version == "v2":
        raise ValueError(f"{source}: head.weight {tuple(head.shape)} is not V2's C x D x 3 x 3 PatchCAM "
                         "convolution: an MCTformer-V1 checkpoint? (import it as mctformer_v1)")
    if cls_token.dim() != 3 or cls_token.shape[:2] != (1, num_classes):
        raise ValueError(f"{source}: cls_token has shape {tuple(cls_token.shape)}, expected (1, {num_classes}, {dim}) "
                         f"({num_classes} class tokens; a plain ViT/DeiT checkpoint has one)")
    if pos_embed.dim() != 3 or pos_embed.shape[1] != num_classes + num_patches:
        raise ValueError(f"{source}: pos_embed has shape {tuple(pos_embed.shape)}, expected (1, {num_classes} class "
                         f"slots + {num_patches} patches, {dim}); a checkpoint trained at another input size needs "
                         "model.backbone.img_size set to it")

    converted: dict[str, Tensor] = {
        "class_tokens": cls_token[0],
        "vit.prefix_pos.cls": pos_embed[0, :num_classes],
        "vit.pos_embed": pos_embed[:, num_classes:],
        # Not part of the official model: it only initialises the class tokens of a newly built mmcst model.
        "vit.pretrained_cls": torch.zeros_like(target["vit.pretrained_cls"]),
    }
    notes = [(f"cls_token -> class_tokens ({num_classes} x {dim}); pos_embed -> vit.prefix_pos.cls (class slots) + "
              f"vit.pos_embed ({num_patches} patches)"),
             "vit.pretrained_cls set to zeros (not in the official model; only used to initialise new class tokens)",
             "norm.* -> vit.norm.* (MCTformer never applies the final norm, in the official code or here)"]
    for name in expected:
        if name.startswith(("patch_embed.", "blocks.", "norm.")):
            converted[f"vit.{name}"] = state[name]
    if version == "v2":
        converted["patch_head.weight"], converted["patch_head.bias"] = state["head.weight"], state["head.bias"]
    else:
        notes.append(f"dropped head.weight {tuple(head.shape)}, head.bias: DeiT's linear classifier, unused by V1 "
                     "(its logits are the channel means of the class tokens)")

    absent = sorted(set(target) - set(converted))
    extra = sorted(set(converted) - set(target))
    if absent or extra:
        raise ValueError(f"{source}: the {label} model built from the config does not fit the official layout "
                         f"(not filled: {_short_list(absent)}; no place for: {_short_list(extra)})")
    mismatched = [k for k in converted if tuple(converted[k].shape) != tuple(target[k].shape)]
    if mismatched:
        detail = "; ".join(f"{k} {tuple(converted[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:6])
        raise ValueError(f"{source}: tensor shapes do not fit the {label} built from the config (file vs model: "
                         f"{detail}{' ...' if len(mismatched) > 6 else ''}); check model.backbone (name, embed_dim, "
                         "patch_size, img_size)")
    converted = {k: v.detach().to(target[k].dtype).contiguous().clone() for k, v in converted.items()}
    return converted, notes


# --------------------------------------------------------------------------------------------------
# ResNet-38 in PSA's layout (the WSSS stage: AffinityNet, DeepLab-V1)

RESNET38_WEIGHT_SOURCES = (
    "ImageNet ResNet-38: ilsvrc-cls_rna-a1_cls1000_ep-0001.params from https://github.com/itijyou/ademxapp, "
    "converted to a state dict with convert_mxnet_to_torch in PSA's network/resnet38d.py and torch.save",
    "VOC-trained classifier res38_cls.pth: https://github.com/jiwoon-ahn/psa (README, 'Results and Trained Models')",
)
_RESNET38_STEM_KEY = "conv1a.weight"


def load_resnet38_weights(model: nn.Module, path: str | os.PathLike) -> WeightReport:
    """Load a ResNet-38 state dict in PSA's layout into a model, key for key; return what loaded.

    ``model`` is a :class:`mmcst.models.resnet38.ResNet38` or a module holding one as ``.backbone``
    (AffinityNet, DeepLab-V1): a file key ``k`` fills the model's ``k`` or ``backbone.k``. Accepted files:
    PSA's converted ImageNet weights, PSA's ``res38_cls.pth`` (its classifier ``fc8`` is reported as
    unexpected), PSA's ``resnet38_aff.pth`` and MCTformer's segmentation checkpoints (their heads load
    too, the names match), plain or wrapped (``state_dict`` / ``model``, ``module.`` prefixes).
    ``num_batches_tracked`` counters are neither required nor reported (frozen BN has none).
    """
    path = Path(path)
    if path.suffix == ".params":
        raise ValueError(f"{path}: is an MXNet .params file; mmcst does not read MXNet. Convert it once with "
                         f"convert_mxnet_to_torch from PSA's network/resnet38d.py and torch.save the result")
    if not path.is_file():
        raise _missing_file_error(path, "ResNet-38 weight file", RESNET38_WEIGHT_SOURCES)
    state = load_state_dict_file(path)
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        target = key if key in own else f"backbone.{key}" if f"backbone.{key}" in own else None
        if target is None:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(own[target].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(own[target].shape)} (weight files fit ResNet-38 at width 1 only; a head "
                             f"tensor differs when the number of classes does)")
        mapped[target] = tensor
    stem = next((k for k in (_RESNET38_STEM_KEY, f"backbone.{_RESNET38_STEM_KEY}") if k in own), None)
    if stem is None or stem not in mapped:
        hint = (" It looks like a torchvision/timm ResNet: use a timm/torchvision backbone with load_resnet_weights."
                if any(k.startswith("layer1.") for k in state) else "")
        raise ValueError(f"{path}: is not a ResNet-38 in PSA's layout (no {_RESNET38_STEM_KEY!r}; first keys: "
                         f"{_short_list(list(state), 5)}).{hint} Sources: {'; '.join(RESNET38_WEIGHT_SOURCES)}")
    model.load_state_dict(mapped, strict=False)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    notes = []
    if "fc8.weight" in unexpected:
        notes.append("PSA classifier fc8 not used (a new head is trained)")
    report = WeightReport(str(path), sha256_file(path), len(mapped), missing, sorted(unexpected), notes)
    logger.info("ResNet-38 weights: %s", report.summary())
    return report
