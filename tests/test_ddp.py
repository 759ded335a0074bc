"""Distributed training and inference on CPU (gloo): two processes set up from torchrun's environment variables."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

import mmcst.engine.evaluate
import mmcst.engine.infer
import mmcst.engine.train
from engine_helpers import TEST_BUILDERS, builders_with, ddp_worker, free_port, state_of, tiny_config
from mmcst.cli import main
from mmcst.config import from_dict
from mmcst.engine.infer import infer
from mmcst.engine.train import train
from mmcst.io import load_map
from mmcst.models.registry import build_model


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


def tiny_vit_worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    """A ``torchrun``-like process training a tiny MMCST; records its warnings and its console output."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    console = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(console):
        warnings.simplefilter("always")
        train(from_dict(cfg_dict), progress=False, builders=builders_with(build_model))
    record = {"warnings": [str(w.message) for w in caught], "console": console.getvalue()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def test_ddp_training_of_a_token_vit_needs_no_gradient_copy(tmp_path):
    """Every parameter's gradient fits its DDP bucket view: no per-step copy, no reducer warning.

    The patch position embedding used to keep the batch stride of the timm tensor it was sliced from.
    """
    cfg = tiny_config(tmp_path, name="vit", max_steps=2)
    cfg.model.name = "mmcst"
    backbone = cfg.model.backbone
    backbone.name, backbone.embed_dim, backbone.depth, backbone.num_heads = "vit_base_patch16_224", 64, 2, 2
    backbone.patch_size, backbone.img_size, backbone.drop_path_rate = 8, cfg.data.image_size, 0.0
    cfg.model.prior.kind = "none"
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = tmp_path / "records"
    out.mkdir()
    mp.start_processes(tiny_vit_worker, args=(2, free_port(), cfg_dict, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        stride_warnings = [w for w in record["warnings"] if "Grad strides do not match bucket view" in w]
        assert not stride_warnings, (rank, stride_warnings)
    # INFO logging (run directory, the end-of-training line) comes from rank 0 only
    assert "run directory" in records[0]["console"] and "training finished" in records[0]["console"]
    assert " INFO " not in records[1]["console"], records[1]["console"]


@pytest.mark.parametrize("rank", [0, 1])
def test_cli_prints_results_on_rank_zero_only(rank, tmp_path, monkeypatch, capsys):
    """Under ``torchrun`` every rank runs the command; only rank 0 prints the run directory and the results."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls = []
    monkeypatch.setattr(mmcst.engine.train, "train", lambda cfg, **kwargs: calls.append("train") or tmp_path / "run")
    monkeypatch.setattr(mmcst.engine.infer, "infer", lambda *args, **kwargs: calls.append("infer") or {"miou": 0.5})
    monkeypatch.setattr(mmcst.engine.evaluate, "format_result", lambda result: f"mIoU {result['miou']}")
    config = Path(__file__).resolve().parents[1] / "configs" / "voc" / "mmcst.yaml"
    assert main(["train", str(config), "--no-progress"]) == 0
    assert main(["infer", str(tmp_path / "run"), "--split", "train", "--no-progress"]) == 0
    assert calls == ["train", "infer"]
    printed = capsys.readouterr().out
    if rank == 0:
        assert printed.splitlines() == [f"run directory: {tmp_path / 'run'}", "mIoU 0.5"]
    else:
        assert printed == ""


def test_cpu_training_flushes_subnormal_floats_and_restores_them() -> None:
    """Training loops on a CPU treat subnormal floats as zero (they made a segmentation step 4x slower); the
    setting is undone afterwards, so evaluation keeps exact float semantics."""
    from mmcst.engine.distributed import flush_subnormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    tiny = torch.tensor([1e-39])
    assert (tiny * 1.0).item() != 0.0
    with flush_subnormals(torch.device("cpu")):
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
    with flush_subnormals(torch.device("meta")):  # not a CPU: nothing changes
        assert (tiny * 1.0).item() != 0.0


def test_the_command_line_flushes_subnormal_floats_for_its_whole_process() -> None:
    """``mmcst`` as a process (``main()`` without argv) sets it before any torch work, so that the intra-op
    threads inherit it; ``main(argv)`` called from Python (tests, notebooks) leaves the process alone."""
    import subprocess
    import sys

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    script = ("import sys, torch; sys.argv = ['mmcst', '--version']; from mmcst.cli import main; "
              "assert main({argv}) == 0; x = torch.full((4_000_000,), 1e-39); "
              "print('flushed' if bool(((x * 1.0) == 0).all()) else 'kept')")
    for argv, expected in (("", "flushed"), ("['--version']", "kept")):
        out = subprocess.run([sys.executable, "-c", script.format(argv=argv)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[-1] == expected, out
