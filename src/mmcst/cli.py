"""The ``mmcst`` command: demo, train, infer, eval, data, model, maps.

Every subcommand has ``--help``. Boolean options come in ``--x/--no-x`` pairs (real boolean parsing).
Configs take ``key=value`` overrides after the config path, e.g. ``mmcst train configs/voc/mmcst.yaml train.epochs=10``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

DATASETS = ("voc", "coco", "openimages", "folder", "synthetic")


def _add_dataset_args(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout")
    p.add_argument("--root", required=True, type=Path,
                   help="dataset root (VOC: the VOC2012 folder holding JPEGImages; COCO: the folder holding "
                        "train2014/ and annotations/; OpenImages: the wsolevaluation dataset root; "
                        "folder: the folder holding images/ and labels.csv; synthetic: its cache folder)")
    p.add_argument("--split", required=split_default is None, default=split_default,
                   help="split name as the benchmark names it (train, train_aug, val, train2014, test, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcst",
        description="Weakly supervised dense object localization: train MMCST / MCTformer / CAM from image-level "
                    "labels, generate localization maps and pseudo-labels, evaluate them exactly.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="generate the synthetic dataset, train and compare the methods, write a report",
                       description="The main job on the embedded default: a procedurally generated dataset in the "
                                   "PASCAL VOC layout, every method trained from random weights with the same budget, "
                                   "maps evaluated with the VOC protocol, and a report (report.md/.html/.json).")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the dataset cache, runs and report")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="a small dataset and short budgets (about 2 minutes) instead of the full demo (about 10)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of demo methods to train (default: all of mmcst, mctformer_v2, cam)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")

    p = sub.add_parser("train", help="train a method from a config",
                       description="Train a method. Writes runs/<name>/ with config.yaml, env.json, log.txt, "
                                   "metrics.jsonl and checkpoints/. Launch under torchrun for multi-GPU (DDP).")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=10 data.root=/data/VOC2012")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the run's last checkpoint (model, optimizer, schedule, RNG and sampler state)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    p = sub.add_parser("infer", help="generate localization maps (and pseudo-labels) with a trained run",
                       description="Multi-scale + flip localization maps for a split, written as maps/<split>/<id>.npy "
                                   "({'keys', 'cam'} float16, present classes only). Resumable. Evaluates at the end "
                                   "when the split has ground truth.")
    p.add_argument("run_dir", type=Path, help="run directory written by `mmcst train`")
    p.add_argument("--split", required=True, help="split to process (VOC seeds: train)")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="test-time scales (default: the run's config)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="add flipped passes")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="patch-affinity refinement (default: the run's config)")
    p.add_argument("--pseudo-labels", action=argparse.BooleanOptionalAction, default=False,
                   help="also write VOC-palette pseudo-label PNGs to pseudo_labels/<split>/")
    p.add_argument("--bg-threshold", type=float, default=None,
                   help="background threshold for pseudo-labels (default: best threshold of the run's evaluation)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the maps when the split has ground truth")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    p = sub.add_parser("eval", help="evaluate localization maps or label PNGs against ground truth",
                       description="mIoU over a background-threshold curve computed in one pass (VOC/COCO/folder/"
                                   "synthetic), with the best point and MCTformer's early-stopped protocol value; "
                                   "PxAP and pIoU for OpenImages. Prints the protocol and writes JSON, markdown and a plot.")
    p.add_argument("maps_dir", type=Path, help="folder of <id>.npy map files (mmcst/IRN or MCTformer dicts) or <id>.png label maps")
    _add_dataset_args(p)
    p.add_argument("--out", type=Path, default=None, help="report path X.json (X.md and X_curve.png are written beside it)")
    p.add_argument("--format", choices=("auto", "npy", "png"), default="auto", help="map file format")
    p.add_argument("--grid", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=(0.0, 0.95, 0.01),
                   help="background-threshold grid, inclusive")
    p.add_argument("--bg-rule", choices=("constant", "power"), default="constant",
                   help="background plane: constant t, or (1 - max)^k with k = --bg-power")
    p.add_argument("--bg-power", type=float, default=1.0, help="k for --bg-rule power")
    p.add_argument("--wsol-step", type=float, default=0.001, help="threshold step for PxAP/pIoU (OpenImages)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    p = sub.add_parser("data", help="dataset tools: check, export-labels, coco-gt, synth")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    q = dsub.add_parser("check", help="validate a dataset layout and print per-class counts and every problem",
                        description="Exit code 1 if any problem is found (missing or unreadable images, mask values "
                                    "outside 0..C/255, unknown class names, split lists naming missing ids).")
    _add_dataset_args(q)
    q = dsub.add_parser("export-labels", help="write image-level labels as a PSA-style cls_labels.npy")
    _add_dataset_args(q)
    q.add_argument("--out", type=Path, required=True, help="output .npy path ({image id: float32 [C]})")
    q = dsub.add_parser("coco-gt", help="render COCO semantic ground-truth PNGs from the instance JSON")
    q.add_argument("--root", type=Path, required=True, help="COCO root holding <split>/ and annotations/")
    q.add_argument("--split", default="val2014", help="train2014 or val2014")
    q.add_argument("--out", type=Path, default=None, help="output folder (default: <root>/mmcst_semantic/<split>)")
    q = dsub.add_parser("synth", help="generate the procedural dataset in the VOC layout")
    q.add_argument("out", type=Path, help="output folder (the VOC2012 root is <out>/VOCdevkit/VOC2012)")
    q.add_argument("--n-train", type=int, default=2000, help="number of train images")
    q.add_argument("--n-val", type=int, default=300, help="number of val images")
    q.add_argument("--size", type=int, default=224, help="image side in pixels")
    q.add_argument("--seed", type=int, default=0, help="generator seed")

    p = sub.add_parser("model", help="model tools: summary")
    msub = p.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    q = msub.add_parser("summary", help="build a model from a config and print parameters, token layout, weight loading",
                        description="Builds the model of CONFIG (with overrides), prints trainable/frozen parameter "
                                    "counts, the token layout and the weight-loading report of every local file.")
    q.add_argument("config", type=Path, help="YAML config")
    q.add_argument("overrides", nargs="*", help="key=value overrides")
    q.add_argument("--num-classes", type=int, default=None,
                   help="number of classes when the dataset is not available (default: read the dataset's class list)")

    p = sub.add_parser("maps", help="map-file tools: export to MCTformer's format")
    ssub = p.add_subparsers(dest="maps_command", metavar="MAPS_COMMAND")
    q = ssub.add_parser("export-mctformer", help="convert a folder of mmcst map files to MCTformer {class: HxW} dicts")
    q.add_argument("src", type=Path, help="folder of mmcst .npy map files")
    q.add_argument("dst", type=Path, help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mmcst import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args, parser)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Known input errors carry a message naming the file/field: print it without a traceback.
        print(f"mmcst {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        from mmcst.engine.demo import run_demo
        report = run_demo(args.out, quick=args.quick, methods=args.methods, progress=args.progress)
        print(f"report: {report}")
        return 0
    if args.command == "train":
        from mmcst.config import load_config
        from mmcst.engine.train import train
        run_dir = train(load_config(args.config, args.overrides), resume=args.resume, progress=args.progress)
        print(f"run directory: {run_dir}")
        return 0
    if args.command == "infer":
        from mmcst.engine.infer import infer
        result = infer(args.run_dir, args.split, scales=args.scales, flip=args.flip, refine=args.refine,
                       pseudo_labels=args.pseudo_labels, bg_threshold=args.bg_threshold, evaluate=args.eval,
                       max_images=args.max_images, progress=args.progress)
        if result:
            from mmcst.engine.evaluate import format_result
            print(format_result(result))
        return 0
    if args.command == "eval":
        from mmcst.config import EvalConfig
        from mmcst.data.base import build_dataset
        from mmcst.engine.evaluate import evaluate_maps, format_result
        eval_cfg = EvalConfig(threshold_start=args.grid[0], threshold_stop=args.grid[1], threshold_step=args.grid[2],
                              bg_rule=args.bg_rule, bg_power=args.bg_power, wsol_step=args.wsol_step)
        dataset = build_dataset(args.dataset, args.root, args.split)
        result = evaluate_maps(args.maps_dir, dataset, eval_cfg, out=args.out, map_format=args.format,
                               progress=args.progress)
        print(format_result(result))
        if args.out is not None:
            print(f"written: {args.out}")
        return 0
    if args.command == "data":
        return _data(args, parser)
    if args.command == "model":
        if args.model_command != "summary":
            parser.parse_args(["model", "--help"])
        from mmcst.config import load_config
        from mmcst.models.registry import build_model
        from mmcst.models.summary import format_summary, model_summary
        cfg = load_config(args.config, args.overrides)
        if args.num_classes is not None:
            class_names = [f"class_{i}" for i in range(args.num_classes)]
        else:
            from mmcst.engine.builders import dataset_from_config
            class_names = dataset_from_config(cfg, cfg.data.train_split).class_names
        print(format_summary(model_summary(build_model(cfg.model, class_names))))
        return 0
    if args.command == "maps":
        if args.maps_command != "export-mctformer":
            parser.parse_args(["maps", "--help"])
        from mmcst.io import export_mctformer_map
        files = sorted(args.src.glob("*.npy"))
        if not files:
            raise FileNotFoundError(f"{args.src}: no .npy map files")
        for path in files:
            export_mctformer_map(path, args.dst / path.name)
        print(f"exported {len(files)} map files to {args.dst}")
        return 0
    parser.print_help()
    return 2


def _data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.data_command == "check":
        from mmcst.data.check import check_dataset, format_report
        report = check_dataset(args.dataset, args.root, args.split)
        print(format_report(report))
        return 1 if report.problems else 0
    if args.data_command == "export-labels":
        from mmcst.data.base import build_dataset
        from mmcst.data.check import export_labels
        dataset = build_dataset(args.dataset, args.root, args.split)
        export_labels(dataset, args.out)
        print(f"wrote labels of {len(dataset)} images ({len(dataset.class_names)} classes) to {args.out}")
        return 0
    if args.data_command == "coco-gt":
        from mmcst.data.coco import render_coco_semantic
        count = render_coco_semantic(args.root, args.split, out_dir=args.out)
        print(f"rendered {count} semantic PNGs")
        return 0
    if args.data_command == "synth":
        from mmcst.data.synthetic import generate_synthetic
        root = generate_synthetic(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed)
        print(f"VOC-layout dataset: {root}")
        return 0
    parser.parse_args(["data", "--help"])
    return 2


if __name__ == "__main__":
    sys.exit(main())
