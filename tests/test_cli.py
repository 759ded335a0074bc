"""Smoke test: every command the README documents, run on a tiny generated dataset.

The README is parsed: each ``mmcst ...`` command it shows must belong to a sub-command exercised here, so
the documentation cannot drift from the CLI.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmcst.cli import build_parser, main
from mmcst.io import load_label_png, load_map

REPO = Path(__file__).resolve().parents[1]
TESTED = set()


def run(*argv: str) -> int:
    words = [a for a in argv if not a.startswith("-")]
    TESTED.add(" ".join(words[:2]) if words and words[0] in ("data", "model", "maps") else words[0])
    return main(list(argv))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert run("data", "synth", str(root / "synth"), "--n-train", "24", "--n-val", "8", "--size", "64") == 0
    return root


def tiny_overrides(root: Path, name: str) -> list[str]:
    return [f"name={name}", f"out_dir={root / 'runs'}", f"data.root={root / 'synth'}", "data.synthetic_train=24",
            "data.synthetic_val=8", "data.synthetic_size=64", "data.image_size=64", "data.num_workers=0",
            "model.backbone.img_size=64", "train.batch_size=4", "train.max_steps=3", "train.time_budget_s=null",
            "infer.batch_size=4"]


def test_help_of_every_command(capsys):
    out = subprocess.run([sys.executable, "-m", "mmcst.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "train", "infer", "eval", "affinity", "seg", "data", "model", "maps"):
        assert command in out.stdout
    parser = build_parser()
    for argv in (["demo"], ["train"], ["infer"], ["eval"], ["data", "check"], ["data", "export-labels"],
                 ["data", "coco-gt"], ["data", "synth"], ["model", "summary"], ["maps", "export-mctformer"],
                 ["affinity", "labels"], ["affinity", "train"], ["affinity", "refine"], ["seg", "train"],
                 ["seg", "infer"], ["seg", "eval"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv + ["--help"])
        assert exit_info.value.code == 0
        assert "usage: mmcst" in capsys.readouterr().out


def test_data_check_and_export(workspace, capsys, tmp_path):
    voc = workspace / "synth" / "VOCdevkit" / "VOC2012"
    assert run("data", "check", "--dataset", "voc", "--root", str(voc), "--split", "val") == 0
    assert "problem" in capsys.readouterr().out.lower()
    out = tmp_path / "cls_labels.npy"
    assert run("data", "export-labels", "--dataset", "voc", "--root", str(voc), "--split", "train", "--out", str(out)) == 0
    labels = np.load(out, allow_pickle=True).item()
    assert len(labels) == 24 and all(v.shape == (20,) for v in labels.values())
    # a broken image makes `data check` fail with the file named
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(voc, broken)
    victim = sorted((broken / "JPEGImages").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert run("data", "check", "--dataset", "voc", "--root", str(broken), "--split", "trainval") == 1
    assert victim.name in capsys.readouterr().out


def test_coco_gt(tmp_path, capsys):
    from fixtures_data import coco_expected_masks, make_coco
    root = make_coco(tmp_path / "coco")
    assert run("data", "coco-gt", "--root", str(root), "--split", "val2014", "--out", str(tmp_path / "sem")) == 0
    expected = coco_expected_masks()
    pngs = sorted((tmp_path / "sem").glob("*.png"))
    assert len(pngs) == len(expected)
    for png in pngs:
        assert (load_label_png(png) == expected[png.stem]).all(), png.name


def test_model_summary(capsys):
    assert run("model", "summary", str(REPO / "configs/demo/mmcst.yaml"), "--num-classes", "5") == 0
    out = capsys.readouterr().out
    assert "trainable" in out.lower() and "5" in out


def test_train_infer_eval_export(workspace, capsys):
    overrides = tiny_overrides(workspace, "smoke")
    assert run("train", str(REPO / "configs/demo/mmcst.yaml"), *overrides, "--no-progress") == 0
    run_dir = workspace / "runs" / "smoke"
    for name in ("config.yaml", "env.json", "log.txt", "metrics.jsonl", "checkpoints/last.pth"):
        assert (run_dir / name).is_file(), name
    # resume of a finished run is a no-op that still succeeds
    assert run("train", str(REPO / "configs/demo/mmcst.yaml"), *overrides, "--resume", "--no-progress") == 0
    assert run("infer", str(run_dir), "--split", "val", "--pseudo-labels", "--no-progress") == 0
    maps = sorted((run_dir / "maps" / "val").glob("*.npy"))
    assert len(maps) == 8
    keys, cam = load_map(maps[0])
    assert cam.shape[1:] == (64, 64) and 0.0 <= cam.min() and cam.max() <= 1.0
    pngs = sorted((run_dir / "pseudo_labels" / "val").glob("*.png"))
    assert len(pngs) == 8 and load_label_png(pngs[0]).max() <= 20
    out = workspace / "eval.json"
    assert run("eval", str(run_dir / "maps" / "val"), "--dataset", "synthetic", "--root", str(workspace / "synth"),
               "--split", "val", "--out", str(out), "--no-progress") == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["num_images"] == 8
    assert 0.0 <= result["best"]["miou"] <= 100.0
    assert (workspace / "eval.md").is_file() and (workspace / "eval_curve.png").is_file()
    assert 'data-explorer="eval"' in (workspace / "eval.html").read_text()
    assert run("maps", "export-mctformer", str(run_dir / "maps" / "val"), str(workspace / "mct")) == 0
    exported = np.load(workspace / "mct" / maps[0].name, allow_pickle=True).item()
    assert sorted(exported) == sorted(int(k) for k in keys)


def test_bad_input_is_a_clear_error(workspace, capsys, tmp_path):
    assert run("eval", str(tmp_path / "nomaps"), "--dataset", "voc", "--root", str(tmp_path / "missing"),
               "--split", "val") == 2
    err = capsys.readouterr().err
    assert "error" in err and "missing" in err
    assert run("train", str(REPO / "configs/demo/mmcst.yaml"), "model.mmcst.fusion=F7") == 2
    assert "model.mmcst.fusion" in capsys.readouterr().err


def test_pipeline(tiny_pipeline):
    TESTED.add("pipeline")  # the session fixture ran `mmcst pipeline CONFIG out_dir=... data.root=... --no-progress`
    summary = json.loads((tiny_pipeline[1] / "pipeline.json").read_text())
    assert [row["status"] for row in summary["stages"]] == ["done"] * 9
    assert all(summary[key]["miou"] is not None for key in ("seed", "refined", "seg"))


def test_demo_quick(quick_demo):
    TESTED.add("demo")  # the session fixture ran `mmcst demo --quick --out DIR --no-progress`
    report = quick_demo
    summary = json.loads((report / "report.json").read_text())
    assert summary["random_init"] is True
    assert summary["verdict"].startswith("MMCST")
    assert summary["references"]["gt"]["best_miou"] == pytest.approx(100.0)
    assert set(summary["methods"]) == {"mmcst", "mctformer_v2", "cam"}
    html = (report / "report.html").read_text()
    assert "random weights" in html and "data:image/png;base64" in html


def test_model_import(tmp_path):
    from test_import_mctformer import DEPTH, DIM, GRID, TINY, official_state, save_official

    checkpoint = save_official(tmp_path / "checkpoint.pth", official_state("v1", dim=DIM, depth=DEPTH, grid=GRID))
    assert run("model", "import", "--format", "mctformer_v1", str(checkpoint), str(tmp_path / "run"), *TINY) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pth").is_file()


def test_wsss_commands(tmp_path, capsys):
    import torch
    from test_wsss_engine import TINY_WSSS, make_run

    run_dir = str(make_run(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest
    try:
        assert run("affinity", "labels", run_dir, *TINY_WSSS, "--split", "train", "--no-progress") == 0
        assert run("affinity", "train", run_dir, *TINY_WSSS, "wsss.affinity.max_steps=1", "--no-progress") == 0
        assert run("affinity", "refine", run_dir, "--split", "train", "--no-progress") == 0
        assert run("seg", "train", run_dir, *TINY_WSSS, "wsss.seg.max_steps=1", "--no-progress") == 0
        assert run("seg", "infer", run_dir, "--split", "val", "--scales", "1.0", "--no-progress") == 0
        assert run("seg", "eval", run_dir, "--split", "val", "--no-progress") == 0
    finally:
        torch.set_num_threads(threads)
    assert "mIoU" in capsys.readouterr().out


def test_readme_commands_are_all_exercised():
    """Runs last in this module: every `mmcst X` the README shows was run above."""
    text = (REPO / "README.md").read_text()
    shown = set()
    for match in re.finditer(r"^\s*(?:\$ )?mmcst ([a-z-]+)(?: ([a-z-]+))?", text, flags=re.M):
        first, second = match.group(1), match.group(2)
        shown.add(f"{first} {second}" if first in ("data", "model", "maps") and second else first)
    assert shown, "the README shows no mmcst command"
    missing = shown - TESTED
    assert not missing, f"README documents commands the smoke test does not run: {sorted(missing)}"
