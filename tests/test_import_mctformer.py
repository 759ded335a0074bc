"""Importing the official MCTformer-V1/V2 checkpoints: key layout, maps against the official arithmetic, CLI.

The state dicts here are written in the exact layout of the official ``deit_small_MCTformerV{1,2}_patch16_224``
(models.py of xulianuwa/MCTformer): ``cls_token`` 1 x C x D, ``pos_embed`` 1 x (C + N) x D, timm-named
``blocks.*``, ``norm.*``, and ``head.*`` (V1: DeiT's linear classifier; V2: a 3x3 convolution). The reference
below recomputes the official map generation (``engine.generate_attention_maps_ms`` with ``--scales 1.0
--attention-type fused --layer-index 3 --patch-attn-refine``) from the raw state dict with explicit attention.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_data import write_jpeg, write_voc_xml
from mmcst.cli import main
from mmcst.config import ConfigError, load_config
from mmcst.data.base import VOC_CLASSES
from mmcst.engine.importer import import_mctformer
from mmcst.engine.train import RunExistsError, train
from mmcst.io import load_map
from mmcst.models.registry import build_model
from mmcst.models.vit import resize_patch_pos_embed_official
from mmcst.models.weights import convert_official_mctformer, official_mctformer_keys

C = len(VOC_CLASSES)
# A reduced DeiT-S: same names, width 64, 4 blocks (the last 3 give the class attention, all 4 the affinity),
# 2 heads, native grid 4 x 4 (64 px).
DIM, DEPTH, HEADS, PATCH, GRID = 64, 4, 2, 16, 4
TINY = [f"model.backbone.embed_dim={DIM}", f"model.backbone.depth={DEPTH}", f"model.backbone.num_heads={HEADS}",
        f"data.image_size={GRID * PATCH}", f"model.backbone.img_size={GRID * PATCH}", "data.num_workers=0"]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
# (id, width, height, classes): grids 3x5 and 4x2 (resized pos-embeds), 4x4 non-square (still resized by the
# official code), 4x4 square (native pos-embeds).
IMAGES = [("2007_000032", 90, 50, ["person", "dog"]), ("2007_000039", 40, 70, ["cat"]),
          ("2007_000063", 70, 66, ["car", "bus", "person"]), ("2008_000002", 64, 64, ["bird", "sofa"])]


# --------------------------------------------------------------------------------------------------
# the official layout


def official_shapes(version: str, dim: int = 384, depth: int = 12, grid: int = 14, patch: int = 16,
                    classes: int = C) -> dict[str, tuple[int, ...]]:
    """Names and shapes of deit_small_MCTformerV{1,2}_patch16_224 (num_classes=classes), as models.py builds it."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, classes, dim), "pos_embed": (1, classes + grid * grid, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        for name, shape in [("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                            ("norm2", (dim,)), ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))]:
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,),
                   "head.weight": (classes, dim, 3, 3) if version == "v2" else (classes, dim), "head.bias": (classes,)})
    return shapes


def official_state(version: str, seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, scaled so that attention is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(version, **sizes).items():
        value = torch.randn(shape, generator=gen)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1.0 + 0.2 * value
        elif name.endswith("bias"):
            value = 0.1 * value
        elif name == "pos_embed":
            value = 0.5 * value
        elif name != "cls_token":
            fan_in = math.prod(shape[1:])
            value = value * (2.0 if "qkv" in name else 1.0) / math.sqrt(fan_in)
        state[name] = value
    return state


def save_official(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"model": state, "epoch": 59}, path)  # what main.py writes (plus an epoch, as in the release)
    return path


def make_voc(root: Path) -> Path:
    voc = root / "VOC2012"
    for k, (image_id, width, height, names) in enumerate(IMAGES):
        write_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", seed=k, size=(width, height))
        write_voc_xml(voc / "Annotations" / f"{image_id}.xml", names)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i[0]}\n" for i in IMAGES))
    return voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


# --------------------------------------------------------------------------------------------------
# the official arithmetic, written out


def official_pos_embed(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """interpolate_pos_encoding: native pos-embeds only for a square input of the native patch count."""
    count = pos.shape[1] - C
    h0, w0 = height // PATCH, width // PATCH
    if h0 * w0 == count and height == width:
        return pos
    side = math.sqrt(count)
    grid = pos[:, C:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
    return torch.cat([pos[:, :C], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def official_cams(sd: dict[str, torch.Tensor], image: torch.Tensor, version: str) -> torch.Tensor:
    """1 x C x h x w refined maps of one normalised image (MCTformerV1/V2.forward + the refinement)."""
    height, width = image.shape[-2:]
    x = F.conv2d(image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    h, w = x.shape[-2:]
    x = torch.cat([sd["cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + official_pos_embed(sd["pos_embed"],
                                                                                               height, width)
    tokens, head_dim = x.shape[1], DIM // HEADS
    attentions = []
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (DIM,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            1, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1)  # 1 x heads x T x T
        attentions.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(1, tokens, DIM)
        x = x + F.linear(out, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(x, (DIM,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    weights = torch.stack(attentions).mean(dim=2)  # layers x 1 x T x T (head mean)
    cams = weights[-3:].sum(0)[:, :C, C:].reshape(1, C, h, w)  # --layer-index 3
    if version == "v2":  # --attention-type fused: attention x ReLU(PatchCAM); the final norm is never applied
        patches = x[:, C:].reshape(1, h, w, DIM).permute(0, 3, 1, 2)
        cams = cams * F.relu(F.conv2d(patches, sd["head.weight"], sd["head.bias"], padding=1))
    affinity = weights[:, :, C:, C:].sum(0)  # every layer, 1 x N x N
    return torch.matmul(affinity.unsqueeze(1), cams.reshape(1, C, -1, 1)).reshape(1, C, h, w)


def official_maps(sd: dict[str, torch.Tensor], path: Path, names: list[str], version: str) -> np.ndarray:
    """generate_attention_maps_ms at scale 1.0 with flip: K x H x W min-max maps of the present classes."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    image = ((pixels - MEAN[:, None, None]) / STD[:, None, None])[None]
    height, width = image.shape[-2:]
    labels = torch.zeros(C)
    labels[[VOC_CLASSES.index(n) for n in names]] = 1.0
    total = torch.zeros(C, height, width)
    for flipped in (False, True):
        view = image.flip(-1) if flipped else image
        cams = F.interpolate(official_cams(sd, view, version), size=(height, width), mode="bilinear",
                             align_corners=False)[0] * labels[:, None, None]
        total += cams.flip(-1) if flipped else cams
    present = total[labels > 0]
    low = present.amin(dim=(1, 2), keepdim=True)
    high = present.amax(dim=(1, 2), keepdim=True)
    return ((present - low) / (high - low + 1e-8)).numpy()


def max_map_difference(run_dir: Path, sd: dict[str, torch.Tensor], voc: Path, version: str) -> float:
    worst = 0.0
    for image_id, _, _, names in IMAGES:
        keys, cam = load_map(run_dir / "maps" / "train" / f"{image_id}.npy")
        assert list(keys) == sorted(VOC_CLASSES.index(n) for n in names)
        expected = official_maps(sd, voc / "JPEGImages" / f"{image_id}.jpg", names, version)
        assert cam.shape == expected.shape
        worst = max(worst, float(np.abs(cam - expected).max()))
    return worst


# --------------------------------------------------------------------------------------------------
# (a) key layout


def test_official_key_set_matches_models_py_at_full_size() -> None:
    """DeiT-S (12 blocks, 384 wide, 14 x 14 grid, 20 classes): every official tensor has its place and shape."""
    for version in ("v1", "v2"):
        state = official_state(version)
        assert list(official_shapes(version)) == official_mctformer_keys(12)
        cfg = load_config(Path(__file__).parents[1] / "configs" / "voc" / f"mctformer_{version}.yaml",
                          ["model.backbone.weights=null"])
        model = build_model(cfg.model, VOC_CLASSES)
        converted, notes = convert_official_mctformer(state, version, model.state_dict(), "full.pth")
        model.load_state_dict(converted)  # strict
        assert torch.equal(converted["class_tokens"], state["cls_token"][0])
        assert torch.equal(converted["vit.pos_embed"], state["pos_embed"][:, C:])
        assert converted["vit.pos_embed"].shape == (1, 196, 384)
        assert torch.equal(converted["vit.blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
        assert ("patch_head.weight" in converted) == (version == "v2")
        assert any("dropped head.weight" in n for n in notes) == (version == "v1")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_tensor_lands_in_its_place(version: str, voc: Path, tmp_path: Path) -> None:
    state = official_state(version, seed=1, dim=DIM, depth=DEPTH, grid=GRID)
    ckpt = save_official(tmp_path / "checkpoint.pth", state)
    run_dir = import_mctformer(ckpt, tmp_path / "runs" / "imported", version, [*TINY, f"data.root={voc}"])

    saved = torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert saved["format"] == "mmcst-checkpoint-v1" and saved["class_names"] == list(VOC_CLASSES)
    model = saved["model"]
    expected = {"class_tokens": state["cls_token"][0], "vit.prefix_pos.cls": state["pos_embed"][0, :C],
                "vit.pos_embed": state["pos_embed"][:, C:], "vit.pretrained_cls": torch.zeros(DIM)}
    for name in state:
        if name.startswith(("patch_embed.", "blocks.", "norm.")):
            expected[f"vit.{name}"] = state[name]
    if version == "v2":
        expected.update({"patch_head.weight": state["head.weight"], "patch_head.bias": state["head.bias"]})
    assert set(model) == set(expected)
    for name, value in expected.items():
        assert torch.equal(model[name], value), name

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.backbone.pos_embed_resize == "official" and cfg.model.backbone.weights is None
    assert (cfg.name, Path(cfg.out_dir)) == ("imported", tmp_path / "runs")
    env = json.loads((run_dir / "env.json").read_text())
    assert env["imported_from"]["format"] == f"mctformer_{version}" and len(env["imported_from"]["sha256"]) == 64
    assert str(ckpt) in (run_dir / "log.txt").read_text()

    with pytest.raises(RunExistsError, match="already holds a checkpoint"):
        import_mctformer(ckpt, run_dir, version, [*TINY, f"data.root={voc}"])
    with pytest.raises(ValueError, match="weights only"):
        train(cfg, resume=True, progress=False)


def _import_error(tmp_path: Path, state: dict[str, torch.Tensor], version: str, overrides: tuple[str, ...] = ()
                  ) -> str:
    ckpt = save_official(tmp_path / "bad.pth", state)
    run_dir = tmp_path / "runs" / "bad"
    with pytest.raises(ValueError) as info:
        import_mctformer(ckpt, run_dir, version, [*TINY, *overrides])
    assert not run_dir.exists()  # nothing written
    assert str(ckpt) in str(info.value)
    return str(info.value)


def test_wrong_layouts_name_the_file_and_the_keys(tmp_path: Path) -> None:
    sizes = {"dim": DIM, "depth": DEPTH, "grid": GRID}
    renamed = official_state("v1", **sizes)
    renamed["blocks.2.attn.in_proj.weight"] = renamed.pop("blocks.2.attn.qkv.weight")
    del renamed["norm.bias"]
    message = _import_error(tmp_path, renamed, "v1")
    assert "missing" in message and "blocks.2.attn.qkv.weight" in message and "norm.bias" in message
    assert "unexpected" in message and "blocks.2.attn.in_proj.weight" in message

    assert "mctformer_v2" in _import_error(tmp_path, official_state("v2", **sizes), "v1")
    assert "mctformer_v1" in _import_error(tmp_path, official_state("v1", **sizes), "v2")
    assert "cls_token" in _import_error(tmp_path, official_state("v1", classes=21, **sizes), "v1")
    assert "pos_embed" in _import_error(tmp_path, official_state("v2", dim=DIM, depth=DEPTH, grid=5), "v2")
    assert "the file has 4 blocks, the config builds 3" in _import_error(
        tmp_path, official_state("v1", **sizes), "v1", ("model.backbone.depth=3",))
    assert "head.weight" in _import_error(tmp_path, {k: v for k, v in official_state("v2", **sizes).items()
                                                      if not k.startswith("head.")}, "v2")
    # a plain DeiT classifier checkpoint (one [CLS], 1000-way head)
    deit = official_state("v1", classes=1, **sizes)
    assert "cls_token" in _import_error(tmp_path, deit, "v1")


def test_pos_embed_resize_is_a_validated_option() -> None:
    assert load_config(None, ["model.backbone.pos_embed_resize=official"]).model.backbone.pos_embed_resize == "official"
    with pytest.raises(ConfigError, match="model.backbone.pos_embed_resize"):
        load_config(None, ["model.backbone.pos_embed_resize=nearest"])


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def _bicubic_by_scale(grid: np.ndarray, out: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Brute force: output pixel i reads input coordinate (i + 0.5) / scale - 0.5, 4 x 4 taps, edges clamped."""
    rows, cols = grid.shape
    result = np.zeros(out)
    for i in range(out[0]):
        for j in range(out[1]):
            y, x = (i + 0.5) / scale[0] - 0.5, (j + 0.5) / scale[1] - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            for dy in range(-1, 3):
                for dx in range(-1, 3):
                    weight = _cubic(y - (y0 + dy)) * _cubic(x - (x0 + dx))
                    result[i, j] += weight * grid[min(max(y0 + dy, 0), rows - 1), min(max(x0 + dx, 0), cols - 1)]
    return result


@pytest.mark.parametrize("new", [(3, 5), (4, 4), (6, 2)])
def test_official_pos_embed_resize_matches_brute_force(new: tuple[int, int]) -> None:
    pos = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    resized = resize_patch_pos_embed_official(pos, (4, 4), new).reshape(*new, 3)
    for channel in range(3):
        expected = _bicubic_by_scale(pos[0, :, channel].reshape(4, 4).numpy(), new,
                                     ((new[0] + 0.1) / 4, (new[1] + 0.1) / 4))
        np.testing.assert_allclose(resized[..., channel].numpy(), expected, atol=1e-10)
    if new == (4, 4):  # same grid, yet not the identity: the factor is 4.1 / 4
        assert not torch.allclose(resized.reshape(1, 16, 3), pos)


# --------------------------------------------------------------------------------------------------
# (b) maps, (c) CLI


def test_v1_maps_match_the_official_arithmetic(voc: Path, tmp_path: Path) -> None:
    state = official_state("v1", seed=2, dim=DIM, depth=DEPTH, grid=GRID)
    ckpt = save_official(tmp_path / "v1.pth", state)
    run_dir = import_mctformer(ckpt, tmp_path / "v1_run", "v1", [*TINY, f"data.root={voc}"])
    import mmcst

    mmcst.infer(run_dir, "train", scales=[1.0], flip=True, refine=True, progress=False)
    difference = max_map_difference(run_dir, state, voc, "v1")
    print(f"V1 max |official - mmcst| = {difference:.2e}")
    assert difference <= 2e-3  # float16 storage rounds by <= 2.5e-4; the bound in the spec is 0.02


def test_cli_import_then_infer_matches_the_official_v2_maps(voc: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    state = official_state("v2", seed=3, dim=DIM, depth=DEPTH, grid=GRID)
    ckpt = save_official(tmp_path / "v2.pth", state)
    run_dir = tmp_path / "v2_run"
    assert main(["model", "import", "--format", "mctformer_v2", str(ckpt), str(run_dir), *TINY,
                 f"data.root={voc}"]) == 0
    assert main(["infer", str(run_dir), "--split", "train", "--scales", "1.0", "--flip", "--refine",
                 "--no-progress"]) == 0
    difference = max_map_difference(run_dir, state, voc, "v2")
    print(f"V2 max |official - mmcst| = {difference:.2e}")
    assert difference <= 2e-3

    # timm's antialiased pos-embed resize instead: visibly different maps, so the option is what matches
    timm_run = tmp_path / "v2_timm"
    assert main(["model", "import", "--format", "mctformer_v2", str(ckpt), str(timm_run), *TINY,
                 f"data.root={voc}", "model.backbone.pos_embed_resize=timm"]) == 0
    assert main(["infer", str(timm_run), "--split", "train", "--no-progress"]) == 0
    assert max_map_difference(timm_run, state, voc, "v2") > 0.02

    capsys.readouterr()
    assert main(["model", "import", "--format", "mctformer_v1", str(ckpt), str(tmp_path / "wrong"), *TINY]) == 2
    error = capsys.readouterr().err
    assert str(ckpt) in error and "mctformer_v2" in error
