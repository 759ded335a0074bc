"""Benchmark functions at toy sizes: they run on CPU, return the figures the table needs, and the paired
reference implementations compute the same thing as ours."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import eval_speed, gpu_check, infer_speed, run, step_profile
from benchmarks.memory import PeakMemory
from benchmarks.model_speed import (build_training_step, compare_training, forward_flops, model_config, precision,
                                    set_explicit_attention)
from mmcst.engine.infer import MapGenerator
from mmcst.models.registry import build_model

TOY = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
CPU = torch.device("cpu")


@pytest.mark.parametrize("model", ["mmcst", "mctformer"])
def test_forward_flops_match_a_flop_counter(model):
    cfg = model_config(model, "vit_small_patch16_224", 32, TOY)
    net = build_model(cfg, ["a", "b", "c"]).eval()
    set_explicit_attention(net, True)  # Q K^T and attention x V as plain matmuls the counter sees
    prefix = {"cls": net.class_tokens} if model == "mctformer" else {"cls": net.class_tokens, "txt": net.text_tokens}
    images = torch.randn(1, 3, 40, 48)  # non-square: 5 x 6 patches, N = prefix + 30
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.vit(images, prefix)
    assert forward_flops(net, 40, 48) == counter.get_total_flops()


def test_training_pair_runs_and_variants_compute_the_same_loss():
    ours, reference = compare_training("mmcst", "vit_small_patch16_224", 32, 2, CPU, steps=2, warmup=0, classes=3,
                                       backbone_overrides=TOY, peak_tflops=1.0)
    for row in (ours, reference):
        assert row["images_per_s"] > 0 and row["step_s"] > 0 and row["losses_finite"]
        assert row["train_flops_per_image"] > 0 and row["achieved_tflops"] > 0 and "percent_of_peak" in row
        assert row["precision"] == "fp32" and row["peak_mem_mib"] >= 0  # CPU: peak resident memory
    assert (ours["attention"], reference["attention"]) == ("fused", "explicit")
    # Same seed, same data: fused and explicit attention are the same function (up to rounding).
    np.testing.assert_allclose(ours["losses"], reference["losses"], rtol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc (Linux)")
def test_cpu_peak_memory_sees_an_allocation_and_only_the_window():
    memory = PeakMemory(CPU).begin()
    block = torch.ones(200 * 2**18)  # 200 MiB
    assert 195 <= memory.read() <= 260
    del block
    memory.restart(rebase=True)
    assert memory.read() < 20  # freed before the window: not counted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc (Linux)")
def test_cpu_peak_memory_shows_what_explicit_attention_costs():
    """1,024 tokens: the explicit attention matrices (kept for the backward pass) dominate the step's memory."""
    ours, reference = compare_training("mmcst", "vit_small_patch16_224", 256, 2, CPU, steps=1, warmup=1, classes=3,
                                       backbone_overrides=TOY)
    assert reference["peak_mem_mib"] > ours["peak_mem_mib"] + 50


def test_cpu_autocast_option_runs_bf16_and_says_so():
    ours, reference = compare_training("mmcst", "vit_small_patch16_224", 32, 2, CPU, steps=1, warmup=1, classes=3,
                                       backbone_overrides=TOY, amp=True)
    assert ours["precision"] == reference["precision"] == "bf16"  # CPU autocast: no fp16 loss scaling
    assert ours["losses_finite"] and reference["losses_finite"]
    losses = {}
    for amp in (False, True):
        _, _, step = build_training_step("mmcst", "vit_small_patch16_224", 32, 2, "fused", CPU, classes=3,
                                         backbone_overrides=TOY, amp=amp)
        losses[amp] = float(step())
    # the same step in bf16: close to float32, but not equal (the autocast really ran)
    assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], rel=0.05)
    assert precision("fused", CPU) == "fp32" and precision("explicit", torch.device("cuda")) == "fp16+GradScaler"


def test_batch1_reference_maps_equal_ours():
    model = infer_speed.build_map_model("mmcst", "vit_small_patch16_224", CPU, backbone_overrides=TOY)
    data = infer_speed.make_images(3, size=(40, 48))
    generator = MapGenerator(model, infer_speed.SCALES, True, True, CPU, precision="fp32")
    batched = infer_speed.ours(generator, data, 2, CPU)
    one_by_one = infer_speed.reference(model, data, infer_speed.SCALES, True, True, CPU)
    for (_, keys), a, b in zip(data, batched, one_by_one):
        assert a.shape == b.shape == (len(keys), 40, 48)
        np.testing.assert_allclose(a, b, atol=1e-4)
    agreement = infer_speed.map_agreement(batched, one_by_one)
    assert agreement["max_abs_diff"] < 1e-4 and agreement["correlation"] > 0.9999
    # The check is sensitive: maps without the refinement differ.
    unrefined = infer_speed.reference(model, data, infer_speed.SCALES, True, False, CPU)
    assert infer_speed.map_agreement(batched, unrefined)["max_abs_diff"] > 1e-2


def test_eval_measure_flags_extrapolation_and_agrees():
    report = eval_speed.measure(n=3, num_thresholds=5, naive_images=2, naive_thresholds=2)
    assert report["subset_confusions_identical"] and report["naive_extrapolated"]
    subset = report["naive_timed_subset"]
    assert (subset["images"], subset["thresholds"]) == (2, 2) and report["images"] == 3
    assert report["single_pass_s"] >= 0 and report["speedup"] > 0


def test_run_toy_preset_table_and_json(tmp_path):
    preset = run.Preset(train=[("mctformer", "vit_small_patch16_224", 32, 2)], train_steps=1, train_warmup=0,
                        train_repeats=1, map_images=2, map_batch=2, eval_images=2, eval_thresholds=4,
                        naive_images=1, naive_thresholds=1, map_size=(40, 48), backbone_overrides=TOY)
    result = run.run("toy", CPU, None, preset)
    pair = result["training"][0]
    assert pair["speedup"] > 0 and pair["ours"]["variant"] == "fused" and pair["reference"]["variant"] == "explicit"
    assert result["maps"]["maps_equal"] and result["maps"]["images"] == 2
    assert result["evaluation"]["naive_extrapolated"] and result["targets"] == []
    assert len(result["env"]["loadavg_start"]) == 3 and len(result["env"]["loadavg_end"]) == 3
    table = run.format_tables(result)
    for text in ("Training step", "Map generation", "Evaluation", "EXTRAPOLATED", "mctformer"):
        assert text in table
    json.dumps(result)  # JSON-ready as it is


def test_targets_met_and_missed():
    row = {"model": "mctformer", "backbone": run.BACKBONES["vit_s16"], "size": 448, "batch": 32}
    result = {"training": [{**row, "ours": {"images_per_s": 800.0, "peak_mem_mib": 12000.0}}],
              "maps": {"ours_images_per_s": 31.0}}
    checked = {t["target"]: t for t in run.check_targets(result)}
    assert checked["MCTformer-V2 ViT-S/16 448 batch 32 >= 760 img/s"]["met"] is True
    assert checked["MCTformer-V2 ViT-S/16 448 batch 32 <= 10 GB"]["met"] is False
    assert checked["maps (3 scales + flip, 500x375, refinement) >= 32 img/s"]["met"] is False
    assert checked["MMCST ViT-S/16 448 batch 32 >= 600 img/s"]["met"] is None  # not measured


def test_gpu_check_stops_clearly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert "CUDA is not available" in json.loads(out.read_text())["error"]


def test_profile_categories_by_operator_name():
    assert step_profile.category("aten::mm") == "matrix products"
    assert step_profile.category("aten::addmm") == "matrix products"
    assert step_profile.category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert step_profile.category("aten::_softmax") == "attention"
    assert step_profile.category("aten::native_layer_norm_backward") == "normalisation"
    assert step_profile.category("aten::gelu_backward") == "element-wise"
    assert step_profile.category("aten::to") == "copies and casts"
    assert step_profile.category("aten::topk") == "reductions"
    assert step_profile.category("aten::mkldnn_convolution") == "convolution"
    assert step_profile.category("aten::empty") == "other"


@pytest.mark.parametrize("variant", ["fused", "explicit"])
def test_training_profile_attributes_the_step(variant):
    result = step_profile.profile_training("mmcst", "vit_small_patch16_224", 64, 2, CPU, variant, steps=2, warmup=1,
                                           top=1000, classes=3, backbone_overrides=TOY)
    # The wall time is measured without the profiler and the operator times with it: on a 10 ms toy step the
    # profiler's own overhead can double the busy time (25.9 ms against 10.4 ms seen once), so only the order
    # of magnitude is checked here.
    assert result["wall_ms_per_step"] > 0 and 0 < result["busy_ms_per_step"] <= 4 * result["wall_ms_per_step"]
    groups = result["categories"]
    assert sum(g["percent"] for g in groups.values()) == pytest.approx(100, abs=0.5)
    assert {"matrix products", "attention", "optimizer"} <= set(groups)
    names = {t["op"] for t in result["top"]}
    assert any("scaled_dot_product" in name for name in names) == (variant == "fused")
    assert any("softmax" in name for name in names) == (variant == "explicit")  # softmax(QK^T)V, no fused kernel
    assert "ms per step (wall)" in step_profile.format_profile(result)


def test_maps_profile_runs_the_map_generator():
    result = step_profile.profile_maps(CPU, images=2, batch=2, steps=1, warmup=0, backbone_overrides=TOY,
                                       size=(40, 48))
    assert result["images_per_s"] > 0 and "matrix products" in result["categories"]


def test_gpu_check_profiles_each_missed_case_once(monkeypatch):
    calls = []
    monkeypatch.setattr(step_profile, "profile_training", lambda *a, **k: calls.append(("training", a[:4])) or
                        {"work": "w", "device": "d", "wall_ms_per_step": 1, "busy_ms_per_step": 1, "time_of": "t",
                         "busy_fraction": 1, "categories": {}, "top": []})
    monkeypatch.setattr(step_profile, "profile_maps", lambda *a, **k: calls.append(("maps",)) or
                        (_ for _ in ()).throw(RuntimeError("boom")))
    targets = [{"target": t.name, "met": met} for t, met in zip(run.TARGETS, [False, False, True, None, False])]
    result = gpu_check.profile_missed_targets({"targets": targets}, CPU)
    # MCTformer-V2 448 speed + memory: one case, one profile; MMCST ViT-S met: none; ViT-B unmeasured and maps
    assert calls == [("training", ("mctformer", run.BACKBONES["vit_s16"], 448, 32)),
                     ("training", ("mmcst", run.BACKBONES["vit_b16"], 448, 32)), ("maps",)]
    assert result["profiled"] == 3
    assert "boom" in result["profiles"]["maps (3 scales + flip, 500x375, refinement) >= 32 img/s"]["error"]
