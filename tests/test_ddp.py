"""Distributed training and inference on CPU (gloo): two processes set up from torchrun's environment variables."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from engine_helpers import TEST_BUILDERS, ddp_worker, free_port, state_of, tiny_config
from mmcst.engine.infer import infer
from mmcst.engine.train import train
from mmcst.io import load_map


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

    # Sharded inference: each image written once, by one rank, as a single process writes it (up to the
    # float rounding of differently composed batches).
    counts = [json.loads((out / f"infer{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1] and counts[0]["written"] == 7 and counts[0]["pseudo_labels"] == 7
    maps_dir = run / "maps" / "test"
    sharded = {p.name: load_map(p) for p in maps_dir.glob("*.npy")}
    assert len(sharded) == 7 and len(list((run / "pseudo_labels" / "test").glob("*.png"))) == 7
    for path in maps_dir.glob("*.npy"):
        path.unlink()
    infer(run, "test", progress=False, builders=TEST_BUILDERS)
    single_maps = {p.name: load_map(p) for p in maps_dir.glob("*.npy")}
    assert single_maps.keys() == sharded.keys()
    for name, (keys, cam) in single_maps.items():
        np.testing.assert_array_equal(keys, sharded[name][0])
        np.testing.assert_allclose(cam, sharded[name][1], atol=2e-3)
