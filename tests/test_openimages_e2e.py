"""OpenImages30k end to end in the real wsolevaluation layout: train, ``infer`` (maps of the ground-truth class) and
``mmcst eval``, with PxAP and pIoU worked out by hand for a constructed case.

The model's maps are a fixed 4 x 4 block pattern per class (56 px blocks on 224 x 224 test images); masks are unions
of instance PNGs (one stored at twice the image size), minus an ignore box outside the foreground. Every pixel count is
a multiple of one block, so the metrics follow from counting blocks (see the comments).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from fixtures_data import OI_MIDS, _binary_png, write_jpeg

from mmcst.cli import main
from mmcst.config import ModelConfig, from_dict
from mmcst.engine.builders import Builders
from mmcst.engine.infer import infer
from mmcst.engine.train import train
from mmcst.io import load_map
from mmcst.models.base import Localization, LocalizationModel

BLOCK = 56  # 224 / 4
# Score levels per 4 x 4 block (rows top to bottom); every pattern holds 0 and 1, so min-max normalisation keeps
# the levels, and all are exact in float16.
PATTERNS = torch.tensor([
    [[1.00, 0.50, 0.00, 0.00],  # class 0 (test image b2)
     [0.25, 0.75, 0.00, 0.25],
     [0.00, 0.00, 0.00, 0.50],
     [0.00, 0.00, 0.00, 0.00]],
    [[0.00, 1.00, 0.00, 0.00],  # class 1 (no test image)
     [0.00, 0.00, 0.00, 0.00],
     [0.00, 0.00, 0.00, 0.00],
     [0.00, 0.00, 0.00, 0.00]],
    [[1.00, 0.75, 0.50, 0.00],  # class 2 (test image a1)
     [0.75, 0.25, 0.00, 0.00],
     [0.00, 0.00, 0.50, 0.25],
     [0.00, 0.25, 0.50, 1.00]],
])


class PatternNet(LocalizationModel):
    """Maps = the class patterns at the input resolution, whatever the image; one bias to train."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.num_classes = len(class_names)
        self.bias = torch.nn.Parameter(torch.zeros(self.num_classes))

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                extras: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        return {"logits": self.bias.expand(images.shape[0], -1)}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"cls": F.multilabel_soft_margin_loss(outputs["logits"], batch["labels"])}

    def localize(self, images: torch.Tensor, need_affinity: bool = False) -> Localization:
        maps = F.interpolate(PATTERNS[None], size=images.shape[-2:], mode="nearest")  # exact: 224 = 4 x 56
        return Localization(maps=maps.expand(images.shape[0], -1, -1, -1).to(images.device))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(images.shape[0], -1)


def build_pattern_net(model_cfg: ModelConfig, class_names: Sequence[str]) -> PatternNet:
    return PatternNet(class_names)


def blocks(*cells: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rectangle (y0, y1, x0, x1) spanning the given (row, col) blocks."""
    rows, cols = [r for r, _ in cells], [c for _, c in cells]
    return min(rows) * BLOCK, (max(rows) + 1) * BLOCK, min(cols) * BLOCK, (max(cols) + 1) * BLOCK


def make_wsol_dataset(root: Path) -> Path:
    """metadata/OpenImages/{train,test}/ and OpenImages/ images and masks, as wsolevaluation ships them."""
    meta, data = root / "metadata" / "OpenImages", root / "OpenImages"
    train = [f"train/{mid}/t{k}.jpg" for k, mid in enumerate(OI_MIDS)]
    for k, key in enumerate(train):
        write_jpeg(data / key, seed=50 + k)
    (meta / "train").mkdir(parents=True)
    (meta / "train" / "image_ids.txt").write_text("".join(f"{key}\n" for key in train))
    (meta / "train" / "class_labels.txt").write_text("".join(f"{key},{k}\n" for k, key in enumerate(train)))

    a1, b2 = f"test/{OI_MIDS[2]}/a1.jpg", f"test/{OI_MIDS[0]}/b2.jpg"
    for k, key in enumerate((a1, b2)):
        write_jpeg(data / key, seed=60 + k, size=(224, 224))
    a1_i1 = f"test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i1.png"
    a1_i2 = f"test/{OI_MIDS[2]}/a1_{OI_MIDS[2]}_i2.png"
    a1_ignore = f"test/{OI_MIDS[2]}/ignore/a1.png"
    b2_i1 = f"test/{OI_MIDS[0]}/b2_{OI_MIDS[0]}_i1.png"
    _binary_png(data / a1_i1, blocks((0, 0), (1, 0)), size=(224, 224))
    _binary_png(data / a1_i2, blocks((3, 3)), size=(224, 224))
    _binary_png(data / a1_ignore, blocks((0, 0), (0, 2)), size=(224, 224))  # over instance 1's top block too
    _binary_png(data / b2_i1, tuple(2 * v for v in blocks((0, 0), (1, 1))), size=(448, 448))  # at 2x the image
    (meta / "test").mkdir(parents=True)
    (meta / "test" / "image_ids.txt").write_text(f"{a1}\n{b2}\n")
    (meta / "test" / "class_labels.txt").write_text(f"{a1},2\n{b2},0\n")
    (meta / "test" / "localization.txt").write_text(f"{a1},{a1_i1},{a1_ignore}\n{a1},{a1_i2},\n{b2},{b2_i1},\n")
    return root


# Blocks counted (ignore excluded), by score level:
#   a1 (class 2): foreground (0,0)=1, (1,0)=.75, (3,3)=1; ignored (0,1), (0,2); background 11 blocks:
#                 .5 x2, .25 x3, 0 x6.
#   b2 (class 0): foreground (0,0)=1, (0,1)=.5, (1,0)=.25, (1,1)=.75; background 12 blocks: .5 x1, .25 x1, 0 x10.
#   In all: 7 foreground blocks (1 x3, .75 x2, .5 x1, .25 x1), 23 background (.5 x3, .25 x4, 0 x16).
#   score >= 1:   TP 3, FP 0  -> precision 1,   recall 3/7, IoU 3/7
#   score >= .75: TP 5, FP 0  -> precision 1,   recall 5/7, IoU 5/7
#   score >= .5:  TP 6, FP 3  -> precision 2/3, recall 6/7, IoU 6/10
#   score >= .25: TP 7, FP 7  -> precision 1/2, recall 1,   IoU 7/14
#   score >= 0:   TP 7, FP 23 -> recall unchanged, IoU 7/30
PXAP = 100 * (1 * 3 / 7 + 1 * 2 / 7 + 2 / 3 * 1 / 7 + 1 / 2 * 1 / 7)  # = 100 * 37/42
PIOU = 100 * 5 / 7  # reached for thresholds in (.5, .75]: the lowest on the 0.001 grid is 0.501


def test_openimages_infer_and_eval_give_hand_computed_pxap_and_piou(tmp_path: Path) -> None:
    """Catches: ignore regions counted as background, the ignore box applied inside the foreground, instances after
    the first dropped from the union, the 2x mask not resized to its image, a precision paired with the wrong recall
    step in PxAP, and a pIoU averaged over thresholds instead of peaked."""
    root = make_wsol_dataset(tmp_path / "wsol")
    cfg = from_dict({
        "name": "pattern", "out_dir": str(tmp_path / "runs"), "device": "cpu",
        "data": {"dataset": "openimages", "root": str(root), "train_split": "train", "val_split": "val",
                 "image_size": 32, "num_workers": 0},
        "train": {"max_steps": 1, "batch_size": 3, "amp": False},
        "infer": {"scales": [1.0], "flip": False, "refine": False, "batch_size": 1},
    })
    builders = Builders(model=build_pattern_net)
    run = train(cfg, progress=False, builders=builders)
    result = infer(run, "test", progress=False, builders=builders)
    assert result["infer"]["written"] == 2
    keys, cam = load_map(run / "maps" / "test" / "a1.npy")
    assert keys.tolist() == [2] and cam.shape == (1, 224, 224)  # the ground-truth class only
    assert result["pxap"] == pytest.approx(PXAP, abs=1e-9)
    assert result["piou"] == pytest.approx(PIOU, abs=1e-9)
    assert result["piou_threshold"] == pytest.approx(0.501, abs=1e-9)
    assert result["protocol"]["num_images"] == 2

    out = tmp_path / "cli_eval.json"
    assert main(["eval", str(run / "maps" / "test"), "--dataset", "openimages", "--root", str(root), "--split",
                 "test", "--out", str(out), "--no-progress"]) == 0
    cli = json.loads(out.read_text())
    assert cli["pxap"] == pytest.approx(PXAP, abs=1e-9) and cli["piou"] == pytest.approx(PIOU, abs=1e-9)
    assert (tmp_path / "cli_eval.md").is_file() and (tmp_path / "cli_eval_curve.png").is_file()
