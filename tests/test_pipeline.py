"""``mmcst pipeline``: every stage in one run directory, records that make reruns skip, redo or resume stages.

The session fixture ``tiny_pipeline`` (conftest.py) runs the whole pipeline once through the CLI at toy size;
each test that reruns it works on a copy of that run directory (``shutil.copytree`` keeps modification times,
so the copy's records still match).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmcst.cli import main
from mmcst.config import load_config
from mmcst.engine.pipeline import INERT_KEYS, STAGES, config_values, flat_config, make_context, run_pipeline

STAGE_NAMES = ["train", "seed_maps", "seed_eval", "pseudo_labels", "affinity_labels", "affinity_train",
               "refined_masks", "seg_train", "seg_eval"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and does not spin when the CPUs are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy(tiny_pipeline: tuple[Path, Path], tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the session's run directory, and the overrides that point the pipeline at it."""
    config, run_dir = tiny_pipeline
    shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name)
    return config, [f"out_dir={tmp_path / 'runs'}", f"data.root={run_dir.parents[1] / 'data'}"]


def _rerun(config: Path, overrides: list[str], *extra: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    summary = run_pipeline(load_config(config, overrides + list(extra)), progress=False, echo=lines.append,
                           report=False)
    return summary, lines


def _statuses(summary: dict) -> dict[str, str]:
    return {row["name"]: row["status"] for row in summary["stages"]}


def test_full_pipeline_writes_every_stage_and_the_three_mious(tiny_pipeline):
    _, run_dir = tiny_pipeline
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert [row["name"] for row in summary["stages"]] == STAGE_NAMES
    assert all(row["status"] == "done" for row in summary["stages"])
    # The three scores are those of the evaluation files the stages wrote, on the splits the config names.
    for key, split, eval_file in (("seed", "train", "train.json"), ("refined", "train", "refined_train.json"),
                                  ("seg", "val", "seg_val.json")):
        evaluation = json.loads((run_dir / "eval" / eval_file).read_text())
        assert summary[key]["split"] == split
        assert summary[key]["miou"] == pytest.approx(evaluation["best"]["miou"])
        assert 0.0 <= summary[key]["miou"] <= 100.0
        assert summary[key]["images"] == (12 if split == "train" else 6)
    seed_eval = json.loads((run_dir / "eval" / "train.json").read_text())
    assert summary["seed"]["threshold"] == seed_eval["best"]["threshold"]
    # Every stage's outputs are where the engine functions put them, with a record each.
    for path in ("checkpoints/last.pth", "maps/train", "pseudo_labels/train", "affinity/labels/train",
                 "affinity/checkpoints/last.pth", "refined/train", "seg/checkpoints/last.pth", "seg/predictions/val"):
        assert (run_dir / path).exists(), path
    assert len(list((run_dir / "refined" / "train").glob("*.png"))) == 12
    assert len(list((run_dir / "seg" / "predictions" / "val").glob("*.png"))) == 6
    for name in STAGE_NAMES:
        record = json.loads((run_dir / "stages" / f"{name}.json").read_text())
        assert record["stage"] == name and record["identity"]["settings"]
        assert not (run_dir / "stages" / f"{name}.started.json").exists()
    # The pseudo-labels use the seeds' best threshold (no wsss.affinity.bg_threshold in the config).
    assert summary["bg_threshold"] == summary["seed"]["threshold"]
    markdown = (run_dir / "report" / "pipeline.md").read_text()
    assert "## WSSS stages" in markdown and f"| {summary['seg']['miou']:.1f} |" in markdown
    assert (run_dir / "report" / "wsss_overlays.png").read_bytes()[:4] == b"\x89PNG"
    html = (run_dir / "report" / "pipeline.html").read_text()
    assert "WSSS stages" in html and "refined masks" in html


def test_rerun_through_the_cli_skips_every_stage(tiny_pipeline, tmp_path, capsys):
    config, overrides = _copy(tiny_pipeline, tmp_path)
    run_dir = tmp_path / "runs" / "tiny_wsss"
    checkpoint = (run_dir / "checkpoints" / "last.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pipeline", str(config), *overrides, "--no-progress"]) == 0
    out = capsys.readouterr().out
    for number, stage in enumerate(STAGES, 1):
        assert f"[{number}/9] {stage.title}: skipped (record matches)" in out
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert summary["skipped"] == STAGE_NAMES
    assert (run_dir / "checkpoints" / "last.pth").stat().st_mtime_ns == checkpoint
    assert summary["seg"]["miou"] == json.loads((tiny_pipeline[1] / "pipeline.json").read_text())["seg"]["miou"]


def test_a_segmentation_setting_redoes_only_the_segmentation_stages(tiny_pipeline, tmp_path):
    config, overrides = _copy(tiny_pipeline, tmp_path)
    summary, lines = _rerun(config, overrides, "wsss.seg.epochs=2")
    statuses = _statuses(summary)
    assert [n for n, s in statuses.items() if s != "skipped"] == ["seg_train", "seg_eval"]
    assert statuses["seg_train"] == "done"  # afresh, not resumed from the 1-epoch checkpoint
    assert any("segmentation training: running (settings changed: wsss.seg.epochs)" in line for line in lines)
    assert any("redone before it: seg_train" in line for line in lines)
    steps = json.loads((tmp_path / "runs" / "tiny_wsss" / "seg" / "summary.json").read_text())["steps"]
    assert steps == 2 * json.loads((tiny_pipeline[1] / "seg" / "summary.json").read_text())["steps"]


def test_a_training_setting_redoes_everything_after_it(tiny_pipeline, tmp_path):
    config, overrides = _copy(tiny_pipeline, tmp_path)
    before = (tmp_path / "runs" / "tiny_wsss" / "checkpoints" / "last.pth").stat().st_mtime_ns
    summary, lines = _rerun(config, overrides, "train.lr=2.0e-3")
    assert set(_statuses(summary).values()) == {"done"}
    assert lines[0].endswith("running (settings changed: train.lr)")
    assert (tmp_path / "runs" / "tiny_wsss" / "checkpoints" / "last.pth").stat().st_mtime_ns != before
    record = json.loads((tmp_path / "runs" / "tiny_wsss" / "stages" / "train.json").read_text())
    assert record["identity"]["settings"]["train.lr"] == 2.0e-3


def test_a_killed_stage_resumes(tiny_pipeline, tmp_path, monkeypatch):
    """Killed in AffinityNet training, then in the random walk: each rerun resumes the stage where it died."""
    from mmcst.engine import affinity, stage

    class Killed(Exception):
        pass

    config, overrides = _copy(tiny_pipeline, tmp_path)
    run_dir = tmp_path / "runs" / "tiny_wsss"
    settings = ["wsss.affinity.epochs=2", "wsss.affinity.checkpoint_every=1"]

    def kill_at(target, name: str, call: int) -> None:
        original, calls = getattr(target, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                raise Killed(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(target, name, wrapper)

    kill_at(stage.PolyTrainer, "_train_step", 4)  # 3 steps done and checkpointed
    with pytest.raises(Killed):
        _rerun(config, overrides, *settings)
    assert (run_dir / "stages" / "affinity_train.started.json").is_file()
    assert not (run_dir / "stages" / "affinity_train.json").is_file()
    monkeypatch.undo()

    kill_at(affinity, "walk_image", 5)  # 4 refined masks written
    with pytest.raises(Killed):
        summary, _ = _rerun(config, overrides, *settings)
    monkeypatch.undo()
    assert (run_dir / "stages" / "refined_masks.started.json").is_file()
    assert len(list((run_dir / "refined" / "train").glob("*.png"))) == 4

    summary, lines = _rerun(config, overrides, *settings)
    statuses = _statuses(summary)
    assert statuses["affinity_train"] == "skipped"  # completed by the second run, which resumed it
    assert statuses["refined_masks"] == "resumed" and statuses["seg_train"] == "done"
    row = next(r for r in summary["stages"] if r["name"] == "refined_masks")
    assert row["result"]["seed_split_images"] == {"written": 8, "reused": 4}
    affinity_summary = json.loads((run_dir / "affinity" / "summary.json").read_text())
    assert affinity_summary["steps"] == affinity_summary["total_steps"] == 6  # 12 images, batch 4, 2 epochs
    assert "resumed from" in (run_dir / "affinity" / "log.txt").read_text()
    assert not list((run_dir / "stages").glob("*.started.json"))
    assert summary["refined"]["miou"] is not None and summary["seg"]["miou"] is not None


def test_a_config_field_added_or_retired_since_the_records_changes_nothing(tiny_pipeline, tmp_path, monkeypatch):
    """Records written before a field existed still match while the new field keeps its default (the old
    behaviour); a field the schema no longer has is no change either."""
    from mmcst.engine import pipeline

    original = pipeline.flat_config

    def newer_schema(cfg):
        fields = original(cfg)
        fields["model.mmcst.new_switch"] = "off"  # added, at its default
        del fields["model.mmcst.fusion"]  # retired
        return fields
    monkeypatch.setattr(pipeline, "flat_config", newer_schema)
    config, overrides = _copy(tiny_pipeline, tmp_path)
    summary, lines = _rerun(config, overrides)
    assert summary["skipped"] == STAGE_NAMES, lines


def test_a_run_trained_outside_the_pipeline_with_other_settings_is_refused(tiny_pipeline, tmp_path):
    config, overrides = _copy(tiny_pipeline, tmp_path)
    shutil.rmtree(tmp_path / "runs" / "tiny_wsss" / "stages")  # as if `mmcst train` had made the run
    with pytest.raises(ValueError, match="other settings .*train.lr"):
        _rerun(config, overrides, "train.lr=2.0e-3")
    assert (tmp_path / "runs" / "tiny_wsss" / "checkpoints" / "last.pth").is_file()  # never removed


def test_every_config_field_counts_for_a_stage_or_is_declared_inert(tiny_pipeline):
    """A new config field must be named by the stages it changes (or declared inert): else a rerun would keep
    outputs made with another value."""
    config, run_dir = tiny_pipeline
    cfg = load_config(config, [f"out_dir={run_dir.parent}", f"data.root={run_dir.parents[1] / 'data'}"])
    ctx = make_context(cfg)
    counted = set()
    for stage in STAGES:
        counted |= set(config_values(cfg, stage.keys(ctx), stage.exclude))
    assert set(flat_config(cfg)) - counted - set(INERT_KEYS) == set()
    assert not counted & set(INERT_KEYS)


@pytest.mark.parametrize("key, value, first", [
    ("eval.threshold_step", 0.05, "seed_eval"),
    ("wsss.affinity.alpha_bg", 6.0, "affinity_labels"),
    ("wsss.affinity.logt", 3, "refined_masks"),
    ("wsss.seg.scales", [1.0, 0.5], "seg_eval"),
    ("infer.flip", True, "seed_maps"),
])
def test_each_setting_belongs_to_the_stage_that_uses_it(tiny_pipeline, key, value, first):
    config, run_dir = tiny_pipeline
    base = [f"out_dir={run_dir.parent}", f"data.root={run_dir.parents[1] / 'data'}"]
    cfg_a, cfg_b = load_config(config, base), load_config(config, base + [f"{key}={json.dumps(value)}"])
    ctx_a, ctx_b = make_context(cfg_a), make_context(cfg_b)
    changed = [s.name for s in STAGES if config_values(cfg_a, s.keys(ctx_a), s.exclude) !=
               config_values(cfg_b, s.keys(ctx_b), s.exclude)]
    assert changed[0] == first



def test_quick_demo_carries_the_best_method_through_the_wsss_stages(quick_demo):
    """The demo's WSSS stage: the winner's own training run is adopted, and its seeds, refined masks and
    segmentation are scored on the same validation images (the seed number is the localization table's)."""
    summary = json.loads((quick_demo / "report.json").read_text())
    wsss = summary["wsss"]
    best = max(summary["methods"], key=lambda name: summary["methods"][name]["best_miou"])
    assert wsss["method"] == best
    pipeline = wsss["pipeline"]
    assert _statuses(pipeline)["train"] == "adopted"
    assert {pipeline[key]["split"] for key in ("seed", "refined", "seg")} == {"val"}
    assert pipeline["seed"]["miou"] == pytest.approx(summary["methods"][best]["best_miou"])
    assert pipeline["seed"]["images"] == pipeline["refined"]["images"] == pipeline["seg"]["images"] == \
        summary["meta"]["budget"]["n_val"]
    assert 0.0 <= pipeline["refined"]["miou"] <= 100.0 and 0.0 <= pipeline["seg"]["miou"] <= 100.0
    run_dir = Path(pipeline["run_dir"])
    assert len(list((run_dir / "refined" / "val").glob("*.png"))) == summary["meta"]["budget"]["n_val"]
    assert len(list((run_dir / "affinity" / "labels" / "wsss_train").glob("*.png"))) == wsss["train_images"]
    markdown = (quick_demo / "report.md").read_text()
    assert "## WSSS: seeds, refined masks, segmentation (%)" in markdown
    assert f"| {pipeline['refined']['miou']:.1f} |" in markdown
    assert (quick_demo / "wsss_overlays.png").read_bytes()[:4] == b"\x89PNG"
    assert wsss["notes"] and all(isinstance(note, str) for note in wsss["notes"])


def test_quick_demo_starts_the_wsss_networks_from_its_cam_classifier(quick_demo, tmp_path):
    """``mmcst model export-backbone``: the CAM run's trunk, written as a timm ResNet state dict, is what
    AffinityNet and the segmenter of the demo's WSSS stage loaded (every trunk tensor, none missing)."""
    import timm
    import torch

    from mmcst.config import ConfigError
    from mmcst.engine.importer import export_backbone

    cam_run = quick_demo / "runs" / "cam"
    out = tmp_path / "trunk.pth"
    assert main(["model", "export-backbone", str(cam_run), str(out)]) == 0
    trunk = torch.load(out, map_location="cpu", weights_only=True)
    model = torch.load(cam_run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]
    assert set(trunk) == {k[len("backbone."):] for k in model if k.startswith("backbone.")}
    assert all(torch.equal(trunk[k], model["backbone." + k]) for k in trunk)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0, output_stride=8)
    missing, unexpected = resnet.load_state_dict(trunk, strict=False)
    assert not missing and not unexpected

    summary = json.loads((quick_demo / "report.json").read_text())
    init = summary["wsss"]["init"]
    assert torch.load(init, map_location="cpu", weights_only=True).keys() == trunk.keys()
    run_dir = Path(summary["wsss"]["pipeline"]["run_dir"])
    for stage in ("affinity", "seg"):
        reports = json.loads((run_dir / stage / "summary.json").read_text())["weights"]
        assert [r["path"] for r in reports] == [init] and reports[0]["missing"] == []
        assert reports[0]["loaded"] == len(trunk)

    with pytest.raises(ConfigError, match="only a cam run"):
        export_backbone(quick_demo / "runs" / "mmcst", tmp_path / "x.pth")
