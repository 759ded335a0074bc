"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """CLIP text-embedding caches go to a folder of the test session, never to the user's ~/.cache/mmcst."""
    import os

    os.environ["MMCST_CACHE"] = str(tmp_path_factory.mktemp("mmcst_cache"))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mmcst demo --quick`` run once per session (about a minute); its output folder.

    Tests read what it wrote (report.json/.md/.html, runs/, references/) and may add files beside them.
    """
    import torch

    from mmcst.cli import main

    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    threads = torch.get_num_threads()
    # One thread: on a machine shared with other jobs, two threads spin on each small operation (the random walk of
    # the WSSS stage ran 6x slower) and the demo can outlast the test timeout.
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# A whole `mmcst pipeline` at toy size: generated VOC-layout data (12 train / 6 val images of 64 px), MMCST on a
# 2-block ViT of width 64, AffinityNet and DeepLab-V1 on ResNet-38 at 1/16 width, one epoch each, CPU.
TINY_PIPELINE_YAML = """\
name: tiny_wsss
seed: 0
device: cpu
data:
  dataset: synthetic
  train_split: train
  val_split: val
  eval_split: train
  image_size: 64
  augment: none
  num_workers: 0
  synthetic_train: 12
  synthetic_val: 6
  synthetic_size: 64
model:
  name: mmcst
  backbone: {name: vit_small_patch16_224, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, img_size: 64,
             drop_path_rate: 0.0}
  prior: {kind: none}
  mmcst: {context: none, cls_token_loss: false}
train: {epochs: 1, batch_size: 6, lr: 1.0e-3, warmup_epochs: 0, amp: false}
infer: {scales: [1.0], flip: false, refine: false, batch_size: 4}
wsss:
  affinity: {backbone: resnet38, width: 0.0625, radius: 3, crop: 64, batch_size: 4, epochs: 1, label_method: par}
  seg: {model: deeplab_v1, width: 0.0625, crop: 64, batch_size: 4, epochs: 1, scales: [1.0], crf: "off",
        eval_split: val}
"""


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``mmcst pipeline`` of :data:`TINY_PIPELINE_YAML` run once per session through the CLI (about 10 CPU seconds):
    ``(config path, run directory)``. Tests that rerun it copy the run directory first."""
    import torch

    from mmcst.cli import main

    root = tmp_path_factory.mktemp("tiny_pipeline")
    config = root / "tiny_wsss.yaml"
    config.write_text(TINY_PIPELINE_YAML)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and does not spin when the CPUs are shared
    try:
        assert main(["pipeline", str(config), f"out_dir={root / 'runs'}", f"data.root={root / 'data'}",
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return config, root / "runs" / "tiny_wsss"
