"""Distributed training on CPU (gloo): two processes configured from torchrun's environment variables."""
from __future__ import annotations

import json

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from engine_helpers import TEST_BUILDERS, ddp_worker, free_port, state_of, tiny_config
from mmcst.engine.train import train


def test_two_processes_end_with_identical_weights_equal_to_one_process(tmp_path):
    cfg = tiny_config(tmp_path, name="ddp", epochs=2)  # global batch 4 = 2 per process
    cfg.model.backbone.drop_path_rate = 0.0  # the tiny net's dropout: off, so one process can match
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = tmp_path / "weights"
    out.mkdir()
    mp.start_processes(ddp_worker, args=(2, free_port(), cfg_dict, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    run = tmp_path / "runs" / "ddp"
    checkpoint = state_of(run)
    assert all(torch.equal(checkpoint[k], rank0[k]) for k in rank0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["val_map"] is not None

    # The ranks' shards of each global batch together are the single-process batch, and DDP averages
    # gradients: the same training up to float rounding.
    cfg.name = "single"
    single = train(cfg, progress=False, builders=TEST_BUILDERS)
    reference = state_of(single)
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key], atol=1e-4, rtol=1e-4)
