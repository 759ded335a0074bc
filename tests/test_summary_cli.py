"""``mmcst model summary`` without the dataset on disk: the fixed class lists of VOC, COCO and the synthetic
set give the real class names (and so the real CLIP prompts); other datasets ask for what is needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmcst.cli import main
from mmcst.data.base import VOC_CLASSES
from mmcst.data.coco import COCO_CLASSES
from mmcst.data.synthetic import synthetic_class_names
from test_models import TINY_CLIP, clip_weights  # noqa: F401  (session fixture: a tiny open_clip model)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _summary(config: str, tmp_path: Path, clip: str, *extra: str) -> list[str]:
    return ["model", "summary", str(CONFIGS / config), f"data.root={tmp_path / 'not_here'}",
            "model.backbone.weights=null", "model.backbone.embed_dim=64", "model.backbone.depth=2",
            "model.backbone.num_heads=2", f"model.prior.clip_model={TINY_CLIP}", f"model.prior.clip_weights={clip}",
            f"model.prior.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parametrize("config, names", [("voc/mmcst.yaml", VOC_CLASSES), ("coco/mmcst.yaml", COCO_CLASSES)])
def test_fixed_class_lists_without_the_dataset(config, names, tmp_path, capsys, clip_weights):  # noqa: F811
    assert main(_summary(config, tmp_path, clip_weights)) == 0
    captured = capsys.readouterr()
    assert f"MMCST ({len(names)} classes)" in captured.out
    assert f"classes: {', '.join(names[:12])}, ... ({len(names) - 12} more)" in captured.out
    assert "input: 448 px = 28x28 patches of 16 px" in captured.out
    assert "not found: using the" in captured.err and not (tmp_path / "not_here").exists()


def test_synthetic_class_list_without_generating_the_dataset(tmp_path, capsys):
    assert main(["model", "summary", str(CONFIGS / "demo/mmcst.yaml"), f"data.root={tmp_path / 'not_here'}"]) == 0
    out = capsys.readouterr().out
    names = synthetic_class_names()
    assert f"({len(names)} classes)" in out and f"classes: {', '.join(names[:3])}" in out
    assert not (tmp_path / "not_here").exists()


def test_other_datasets_say_what_is_needed(tmp_path, capsys, clip_weights):  # noqa: F811
    assert main(_summary("openimages/mmcst.yaml", tmp_path, clip_weights)) == 2
    err = capsys.readouterr().err
    assert "not_here: not found, and the openimages dataset has no fixed class list" in err
    assert "--num-classes" in err
    assert main(_summary("openimages/mmcst.yaml", tmp_path, clip_weights, "--num-classes", "4")) == 0
    assert "classes: class_0, class_1, class_2, class_3" in capsys.readouterr().out
