"""The ``mmcst`` command: demo, train, infer, eval, affinity, seg, pipeline, data, model, maps.

Every subcommand has ``--help``. Boolean options come in ``--x/--no-x`` pairs (real boolean parsing).
Configs take ``key=value`` overrides after the config path, e.g. ``mmcst train configs/voc/mmcst.yaml train.epochs=10``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from mmcst.config import Config

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
    p.add_argument("--wsss", action=argparse.BooleanOptionalAction, default=True,
                   help="carry the best method through AffinityNet and a segmentation network (about 3 minutes)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (runs with a time budget also "
                                                       "vary with the machine's speed)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="generator seed of the dataset (0: the shipped demo data; another value: held-out data of "
                        "the same kind, written to its own folder under --out)")
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
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="autocast dtype of the map forwards (default: the run's infer.precision, fp32)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    p = sub.add_parser("eval", help="evaluate localization maps or label PNGs against ground truth",
                       description="mIoU over a background-threshold curve computed in one pass (VOC/COCO/folder/"
                                   "synthetic), with the best point and MCTformer's early-stopped protocol value; "
                                   "PxAP and pIoU for OpenImages. Prints the protocol and writes JSON, markdown and a plot.")
    p.add_argument("maps_dir", type=Path, help="folder of <id>.npy map files (mmcst/IRN or MCTformer dicts) or <id>.png label maps")
    _add_dataset_args(p)
    p.add_argument("--out", type=Path, default=None, help="report path X.json (X.md, X_curve.png and the page X.html are written beside it)")
    p.add_argument("--format", choices=("auto", "npy", "png"), default="auto", help="map file format")
    p.add_argument("--grid", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=(0.0, 0.95, 0.01),
                   help="background-threshold grid, inclusive")
    p.add_argument("--bg-rule", choices=("constant", "power"), default="constant",
                   help="background plane: constant t, or (1 - max)^k with k = --bg-power")
    p.add_argument("--bg-power", type=float, default=1.0, help="k for --bg-rule power")
    p.add_argument("--wsol-step", type=float, default=0.001, help="threshold step for PxAP/pIoU (OpenImages)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    _add_wsss_parsers(sub)

    p = sub.add_parser("pipeline", help="the whole method in one run: train, maps, seeds, AffinityNet, refined masks, "
                                        "segmenter",
                       description="Runs every stage of a config in runs/<name>/: training, maps, seed evaluation, "
                                   "pseudo-labels, affinity labels, AffinityNet, refined masks (+ evaluation), the "
                                   "segmenter and its evaluation. Each stage records its settings and inputs in "
                                   "stages/<stage>.json; a rerun skips the stages whose record matches, redoes the "
                                   "others (and what depends on them) and resumes a stage that was killed. Writes "
                                   "pipeline.json (seed, refined-mask and segmentation mIoU) and report/pipeline.html.")
    p.add_argument("config", type=Path, help="YAML config with a wsss section (e.g. configs/voc/wsss_mmcst.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data/VOC2012 wsss.seg.epochs=10")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars inside the stages (the one line per stage is always printed)")

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

    p = sub.add_parser("model", help="model tools: summary, import, export-backbone")
    msub = p.add_subparsers(dest="model_command", metavar="MODEL_COMMAND")
    q = msub.add_parser("summary", help="build a model from a config and print parameters, token layout, weight loading",
                        description="Builds the model of CONFIG (with overrides), prints trainable/frozen parameter "
                                    "counts, the token layout and the weight-loading report of every local file.")
    q.add_argument("config", type=Path, help="YAML config")
    q.add_argument("overrides", nargs="*", help="key=value overrides")
    q.add_argument("--num-classes", type=int, default=None,
                   help="placeholder class names class_0.. (default: the dataset's class list; without the dataset "
                        "on disk, the fixed VOC, COCO or synthetic list)")
    q = msub.add_parser("import", help="turn an official MCTformer-V1/V2 checkpoint into an mmcst run directory",
                        description="Writes RUN_DIR (config.yaml, env.json, log.txt, checkpoints/last.pth) from a "
                                    "checkpoint written by the official MCTformer main.py ({'model': state_dict} of "
                                    "deit_small_MCTformerV1/V2_patch16_224, 20 VOC classes). `mmcst infer RUN_DIR "
                                    "--split S --scales 1.0 --flip --refine` then gives the maps of the official "
                                    "generation command (--layer-index 3 --attention-type fused --patch-attn-refine).")
    q.add_argument("--format", required=True, choices=("mctformer_v1", "mctformer_v2"), dest="import_format",
                   help="the checkpoint's model: MCTformer-V1 or -V2")
    q.add_argument("checkpoint", type=Path, help="the official checkpoint (.pth)")
    q.add_argument("run_dir", type=Path, help="run directory to create")
    q.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. data.root=/data/VOC2012")
    q.add_argument("--config", type=Path, default=None,
                   help="YAML config (default: configs/voc/mctformer_v1.yaml or mctformer_v2.yaml)")

    q = msub.add_parser("export-backbone", help="write a trained CAM run's ResNet trunk as a timm ResNet state dict",
                        description="Writes the ResNet trunk of RUN_DIR (a cam run) to OUT (.pth, tensors only), for "
                                    "wsss.affinity.weights / wsss.seg.weights with the same backbone name: AffinityNet "
                                    "and the segmenter then start from the classifier trained on the image labels, as "
                                    "PSA starts AffinityNet from its res38_cls.pth.")
    q.add_argument("run_dir", type=Path, help="a cam run directory")
    q.add_argument("out", type=Path, help="output .pth file")

    p = sub.add_parser("maps", help="map-file tools: export to MCTformer's format")
    ssub = p.add_subparsers(dest="maps_command", metavar="MAPS_COMMAND")
    q = ssub.add_parser("export-mctformer", help="convert a folder of mmcst map files to MCTformer {class: HxW} dicts")
    q.add_argument("src", type=Path, help="folder of mmcst .npy map files")
    q.add_argument("dst", type=Path, help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the process's entry point (console script, python -m): before any torch work
        from mmcst.engine.distributed import flush_subnormals_for_process
        flush_subnormals_for_process()
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
        report = run_demo(args.out, quick=args.quick, methods=args.methods, progress=args.progress, wsss=args.wsss,
                          seed=args.seed, data_seed=args.data_seed)
        print(f"report: {report}")
        return 0
    if args.command == "train":
        from mmcst.config import load_config
        from mmcst.engine.distributed import is_main_process
        from mmcst.engine.train import train
        run_dir = train(load_config(args.config, args.overrides), resume=args.resume, progress=args.progress)
        if is_main_process():  # under torchrun every rank gets here: one line, from rank 0
            print(f"run directory: {run_dir}")
        return 0
    if args.command == "infer":
        from mmcst.engine.infer import infer
        result = infer(args.run_dir, args.split, scales=args.scales, flip=args.flip, refine=args.refine,
                       pseudo_labels=args.pseudo_labels, bg_threshold=args.bg_threshold, evaluate=args.eval,
                       max_images=args.max_images, precision=args.precision, progress=args.progress)
        from mmcst.engine.distributed import is_main_process
        if result and is_main_process():  # every rank holds the (broadcast) result; rank 0 prints it
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
    if args.command in ("affinity", "seg"):
        return _wsss(args, parser)
    if args.command == "pipeline":
        from mmcst.config import load_config
        from mmcst.engine.pipeline import run_pipeline
        run_pipeline(load_config(args.config, args.overrides), progress=args.progress)
        return 0
    if args.command == "model":
        if args.model_command == "import":
            from mmcst.engine.importer import IMPORT_FORMATS, import_mctformer
            run_dir = import_mctformer(args.checkpoint, args.run_dir, IMPORT_FORMATS[args.import_format],
                                       args.overrides, config=args.config)
            print(f"run directory: {run_dir}")
            return 0
        if args.model_command == "export-backbone":
            from mmcst.engine.importer import export_backbone
            info = export_backbone(args.run_dir, args.out)
            print(f"{info['path']}: {info['tensors']} tensors of the {info['backbone']} trunk (step {info['step']})")
            return 0
        if args.model_command != "summary":
            parser.parse_args(["model", "--help"])
        from mmcst.config import load_config
        from mmcst.models.registry import build_model
        from mmcst.models.summary import format_summary, model_summary
        cfg = load_config(args.config, args.overrides)
        if args.num_classes is not None:
            class_names = [f"class_{i}" for i in range(args.num_classes)]
        else:
            class_names = _summary_class_names(cfg)
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


_OVERRIDES_HELP = ("key=value overrides of the wsss.* settings (also device, seed, data.root, data.num_workers), given "
                   "right after RUN_DIR, e.g. wsss.affinity.weights=res38_cls.pth")


def _add_wsss_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``mmcst affinity labels|train|refine`` and ``mmcst seg train|infer|eval`` (the WSSS stage, METHOD.md 4.4-4.5)."""
    p = sub.add_parser("affinity", help="PSA/AffinityNet refinement of a run's maps: labels, train, refine",
                       description="The PSA stage of weakly supervised semantic segmentation: confident labels from "
                                   "the maps (labels), AffinityNet trained on them (train), the random walk of the "
                                   "seeds on its affinities into pseudo masks (refine).")
    asub = p.add_subparsers(dest="affinity_command", metavar="AFFINITY_COMMAND")
    q = asub.add_parser("labels", help="confident labels (la/ha background, CRF or PAR) from the maps of a split",
                        description="Writes RUN_DIR/affinity/labels/<split>/<id>.png (class, 0 confident background, "
                                    "255 unsure) from RUN_DIR/maps/<split>/. Resumable.")
    q.add_argument("run_dir", type=Path, help="run directory with maps/<split>/ (mmcst infer)")
    q.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    q.add_argument("--split", required=True, help="split AffinityNet trains on (VOC: train_aug)")
    q.add_argument("--method", choices=("auto", "crf", "par"), default=None,
                   help="refinement of the two label passes: dense CRF (pip install mmcst[crf]), PAR (torch only), or "
                        "auto = CRF when installed (default: wsss.affinity.label_method, auto)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    q = asub.add_parser("train", help="train AffinityNet on the confident labels (PSA's recipe)",
                        description="Writes RUN_DIR/affinity/ (config.yaml, env.json, log.txt, metrics.jsonl, "
                                    "summary.json, checkpoints/last.pth). Launch under torchrun for multi-GPU (DDP).")
    q.add_argument("run_dir", type=Path, help="run directory with affinity/labels/<train split>/")
    q.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    q.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from affinity/checkpoints/last.pth (weights, optimizer, sampler position, RNG)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    q = asub.add_parser("refine", help="random walk of the seeds on AffinityNet's affinities -> pseudo masks",
                        description="Writes RUN_DIR/refined/<split>/<id>.png and, when the split has ground truth, "
                                    "RUN_DIR/eval/refined_<split>.json/.md. Resumable.")
    q.add_argument("run_dir", type=Path, help="run directory with maps/<split>/ and affinity/checkpoints/last.pth")
    q.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP + " or wsss.affinity.bg_threshold=0.39")
    q.add_argument("--split", required=True, help="split to refine (VOC: train_aug for the segmenter, train to evaluate)")
    q.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the masks when the split has ground truth")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    p = sub.add_parser("seg", help="segmentation network on pseudo masks: train, infer, eval",
                       description="DeepLab (V1 LargeFOV on ResNet-38 as the paper, or V2/V3 on a timm ResNet) trained "
                                   "on the run's pseudo masks, multi-scale inference with optional dense CRF, mIoU.")
    ssub = p.add_subparsers(dest="seg_command", metavar="SEG_COMMAND")
    q = ssub.add_parser("train", help="train the segmenter on pseudo masks",
                        description="Writes RUN_DIR/seg/ (config.yaml, env.json, log.txt, metrics.jsonl, summary.json, "
                                    "checkpoints/last.pth). Launch under torchrun for multi-GPU (DDP).")
    q.add_argument("run_dir", type=Path, help="run directory")
    q.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP.replace("wsss.affinity.weights", "wsss.seg.weights"))
    q.add_argument("--labels", default="refined",
                   help="pseudo masks: refined (RUN_DIR/refined/<split>, the paper's), pseudo "
                        "(RUN_DIR/pseudo_labels/<split>) or a folder of <id>.png label maps")
    q.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from seg/checkpoints/last.pth (weights, optimizer, sampler position, RNG)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    q = ssub.add_parser("infer", help="predict label maps of a split (multi-scale, optional CRF)",
                        description="Writes RUN_DIR/seg/predictions/<split>/<id>.png (VOC palette) and, for the VOC "
                                    "test split, RUN_DIR/seg/results/VOC2012/Segmentation/comp6_test_cls/ for the "
                                    "PASCAL evaluation server. Resumable.")
    q.add_argument("run_dir", type=Path, help="run directory with seg/checkpoints/last.pth")
    q.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP.replace("wsss.affinity.weights=res38_cls.pth",
                                                                        "wsss.seg.fusion=mean"))
    q.add_argument("--split", required=True, help="split to segment (val, test, val2014, ...)")
    q.add_argument("--scales", type=float, nargs="+", default=None,
                   help="inference scales (default: wsss.seg.scales, 0.5 0.75 1.0 1.25 1.5)")
    q.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add flipped views (default: wsss.seg.flip, off as MCTformer)")
    q.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="dense CRF on the fused probabilities (default: wsss.seg.crf; unset = when pydensecrf2 is "
                        "installed)")
    q.add_argument("--voc-server-layout", action=argparse.BooleanOptionalAction, default=None,
                   help="also write results/VOC2012/Segmentation/comp6_test_cls/ (default: for the VOC test split)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    q = ssub.add_parser("eval", help="mIoU of the predictions of a split",
                        description="Evaluates RUN_DIR/seg/predictions/<split>/ against the split's ground truth; "
                                    "writes RUN_DIR/eval/seg_<split>.json/.md.")
    q.add_argument("run_dir", type=Path, help="run directory with seg/predictions/<split>/")
    q.add_argument("overrides", nargs="*", help="key=value overrides (data.root=... when the dataset moved)")
    q.add_argument("--split", required=True, help="split to evaluate (VOC: val)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")


def _wsss(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mmcst.engine.distributed import is_main_process

    sub_command = getattr(args, f"{args.command}_command")
    if sub_command is None:
        parser.parse_args([args.command, "--help"])
    out: object
    if args.command == "affinity":
        from mmcst.engine import affinity
        if sub_command == "labels":
            out = affinity.make_affinity_labels(args.run_dir, args.split, method=args.method, overrides=args.overrides,
                                                progress=args.progress)
        elif sub_command == "train":
            out = affinity.train_affinity(args.run_dir, args.overrides, resume=args.resume, progress=args.progress)
        else:
            result = affinity.refine_masks(args.run_dir, args.split, evaluate=args.eval, overrides=args.overrides,
                                           progress=args.progress)
            out = result["refine"]["dir"]
            if "best" in result and is_main_process():
                from mmcst.engine.evaluate import format_result
                print(format_result(result))
    else:
        from mmcst.engine import seg
        if sub_command == "train":
            out = seg.train_segmenter(args.run_dir, args.labels, args.overrides, resume=args.resume,
                                      progress=args.progress)
        elif sub_command == "infer":
            out = seg.infer_segmenter(args.run_dir, args.split, scales=args.scales, crf=args.crf,
                                      voc_server_layout=args.voc_server_layout, flip=args.flip,
                                      overrides=args.overrides, progress=args.progress)
        else:
            from mmcst.engine.evaluate import format_result
            result = seg.evaluate_segmenter(args.run_dir, args.split, overrides=args.overrides, progress=args.progress)
            out = Path(args.run_dir) / "eval" / f"seg_{args.split}.json"
            if is_main_process():
                print(format_result(result))
    if is_main_process():  # under torchrun every rank gets here: one line, from rank 0
        print(f"written: {out}")
    return 0


def _summary_class_names(cfg: "Config") -> list[str]:
    """The dataset's class names; without the dataset on disk, the fixed lists of VOC, COCO and the synthetic set."""
    from mmcst.data.base import VOC_CLASSES, DatasetError
    from mmcst.data.coco import COCO_CLASSES
    from mmcst.data.synthetic import synthetic_class_names
    from mmcst.engine.builders import dataset_from_config

    if Path(cfg.data.root).exists():
        return list(dataset_from_config(cfg, cfg.data.train_split).class_names)
    fixed = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "synthetic": synthetic_class_names()}.get(cfg.data.dataset)
    if fixed is None:
        raise DatasetError(f"data.root {cfg.data.root}: not found, and the {cfg.data.dataset} dataset has no fixed "
                           "class list: point data.root at the dataset, or give --num-classes N (placeholder "
                           "names: CLIP prompts and the text tokens would not be the real classes)")
    print(f"note: data.root {cfg.data.root} not found: using the {len(fixed)} fixed {cfg.data.dataset} class names",
          file=sys.stderr)
    return list(fixed)


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
