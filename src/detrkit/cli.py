"""The command line: parses flags into the config dataclasses and calls the modules.

Every default shown in ``--help`` is read from the config dataclasses (written once there).
Exit status: 0 on success, 2 on a usage or data error (one clear line; ``--debug`` shows the
traceback), 1 on anything unexpected.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from detrkit.allocator import tune_allocator
from detrkit.config import (
    AUGMENTS, AUTO_IMAGE_SIZE, CLASS_COST_FORMULAS, CLASS_LOSSES, DataConfig, LossConfig, ModelConfig, TrainConfig,
    config_from_dict, load_run_config, read_config_file, route,
)
from detrkit.distributed import note_slow_bf16, select_device
from detrkit.errors import DataError, DetrkitError
from detrkit.presets import FAMILY_RECIPES, PRESETS, RECIPES, resolve

PRECISION_HELP = ("fp32: exact; bf16: the network under bfloat16 autocast, scores and boxes in float32; faster only "
                  "where bf16 matrix products are (GPUs, CPUs with AMX; docs/benchmarks.md) (default: fp32)")


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def _flag(parser, cls, name: str, help: str, **kw) -> None:
    """A flag for dataclass field ``name``; argparse's default None means "not given"."""
    parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                        help=f"{help} (default: {_default(cls, name)})", **kw)


def _image_size(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'auto', got {value!r}") from None


def _data_sources(g) -> None:
    """Where the data is: a folder in a common layout, or explicit COCO files."""
    _flag(g, DataConfig, "data", "folder in COCO, Roboflow-COCO or YOLO layout", metavar="DIR")
    _flag(g, DataConfig, "train_json", "COCO annotation file of the training split", metavar="FILE")
    _flag(g, DataConfig, "train_images", "image root of the training split (file_name is relative to it)",
          metavar="DIR")
    _flag(g, DataConfig, "val_json", "COCO annotation file of the validation split", metavar="FILE")
    _flag(g, DataConfig, "val_images", "image root of the validation split", metavar="DIR")


def _data_flags(p) -> None:
    g = p.add_argument_group("data (a folder in a common layout, or explicit COCO files)")
    _data_sources(g)
    _flag(g, DataConfig, "image_size", "shorter image side at evaluation; training scales follow it; 'auto': the training "
          f"images' median shorter side, at most {AUTO_IMAGE_SIZE['detr']} px (RT-DETR: {AUTO_IMAGE_SIZE['rtdetr']})", type=_image_size)
    _flag(g, DataConfig, "max_size", "longer image side limit (None: image-size * 1333 / 800)", type=int)
    _flag(g, DataConfig, "workers", "data loader worker processes", type=int)
    g.add_argument("--no-check-images", dest="check_images", action="store_const", const=False, default=None,
                   help="do not open every image file (training and check-data open each once by default)")
    _flag(g, DataConfig, "augment", "training augmentation: detr (official multi-scale + crop), flip, or rtdetr "
          "(photometric distortion, zoom-out, IoU crop, flip)", choices=list(AUGMENTS))
    _flag(g, DataConfig, "augment_stop_epoch", "from this epoch on (from 0; -1 = the last) flip and resize only", type=int)
    _flag(g, DataConfig, "mosaic", "probability that a training image is a mosaic of four (DEIM's dense one-to-one "
          "matching; DEIM: 0.5); 0 = off", type=float)
    _flag(g, DataConfig, "mosaic_until", "fraction of training after which no mosaics are made", type=float)
    _flag(g, DataConfig, "resize", "shorter: the shorter side to image-size (DETR); square: image-size x image-size, "
          "the aspect ratio not kept (RT-DETR)", choices=["shorter", "square"])


def _common(p) -> None:
    p.add_argument("--debug", action="store_true", help="show the Python traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detrkit", description="DETR: train, evaluate and run object detectors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_demo_parser, _synth_parser, _check_data_parser, _train_parser, _eval_parser, _predict_parser,
                _export_parser, _serve_parser, _explain_parser):
        _common(add(sub))
    return parser


def _demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="make the synthetic shapes set, train on it, evaluate and draw predictions")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: the demo recipe's)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--data-dir", default="data/synthetic", help="where the synthetic set is cached (default: data/synthetic)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    return p


def _synth_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("synth", help="write the synthetic shapes data set (COCO format)")
    p.add_argument("out", help="output folder")
    p.add_argument("--num-train", type=int, default=2000, help="training images (default: 2000)")
    p.add_argument("--num-val", type=int, default=200, help="validation images (default: 200)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--objects", type=int, nargs=2, metavar=("MIN", "MAX"), default=(1, 6),
                   help="shapes per image, except the ~10%% empty images (default: 1 6)")
    p.add_argument("--object-size", type=float, nargs=2, metavar=("MIN", "MAX"), default=None, help="shape size "
                   "range in pixels, the circle a shape fits in (default: 10 60 at 128 px, scaled with --image-size)")
    return p


def _check_data_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("check-data", help="check a data set and print a summary with every problem found")
    _data_flags(p)
    return p


# The flags of `detrkit train` for TrainConfig and LossConfig fields: (name, help, type or choices).
# Every field is a flag (tests/test_cli.py checks it); defaults come from the dataclasses.
OPTIMISATION_FLAGS = [
    ("epochs", "number of epochs", int), ("minutes", "time budget in minutes (stops early)", float),
    ("batch_size", "images per process and micro-batch", int), ("lr", "learning rate of transformer and heads", float),
    ("lr_backbone", "learning rate of the backbone (0 freezes it)", float),
    ("weight_decay", "AdamW weight decay", float), ("clip", "gradient norm clipping (0 = off)", float),
    ("no_decay", "parameters without weight decay, comma-separated: norm (of norm layers), bias; or none", str),
    ("schedule", "learning-rate schedule", ["step", "cosine"]),
    ("lr_drop", "epoch of the x0.1 learning-rate drop (None: at 2/3 of training)", float),
    ("warmup", "linear warm-up as a fraction of training", float), ("warmup_steps", "linear warm-up over N optimiser steps instead", int),
    ("eval_every", "evaluate every N epochs", int), ("seed", "random seed", int),
    ("precision", "fp32; bf16 autocast; fp16 autocast with loss scaling (CUDA only); auto: fp32 or bf16, whichever "
     "trains faster here (a few steps of each timed at start-up). Matching and losses stay fp32",
     ["fp32", "bf16", "fp16", "auto"]),
    ("accumulate", "micro-batches per optimiser step (a step sees batch-size x accumulate x processes images, "
     "exactly as one larger batch)", int), ("ema_decay", "EMA decay", float),
    ("ema_warmup", "EMA warm-up: the decay ramps up as decay x (1 - exp(-steps / N)); 0 = constant", int),
    ("patience", "stop when validation AP has not improved for this many epochs (None: never)", int),
]
LOSS_FLAGS = [
    ("cost_class", "matching weight of the class term", float),
    ("cost_bbox", "matching weight of the L1 box term", float),
    ("cost_giou", "matching weight of the GIoU term", float),
    ("class_cost_formula", "the class term of the matching cost: -p (official) or 1-p", list(CLASS_COST_FORMULAS)),
    ("loss_ce", "weight of the classification loss", float), ("loss_bbox", "weight of the L1 box loss", float),
    ("loss_giou", "weight of the GIoU loss", float),
    ("eos_coef", "relative weight of the 'no object' class in the cross-entropy (softmax models)", float),
    ("bbox_loss", "box regression loss", ["l1", "smooth_l1"]),
    ("smooth_l1_beta", "Smooth L1 switch point, in normalised box units", float),
    ("class_loss", "classification loss of sigmoid models (two-stage, RT-DETR): focal; varifocal (IoU targets); mal "
     "(DEIM's matchability-aware loss: IoU^gamma targets, every positive weighted 1)", list(CLASS_LOSSES)),
    ("focal_alpha", "focal loss alpha (sigmoid models)", float), ("focal_gamma", "focal loss gamma", float),
    ("vfl_alpha", "varifocal weight of the negatives", float),
    ("mal_gamma", "MAL exponent of the IoU target and of the negatives' weight p^gamma", float),
    ("mal_alpha", "MAL factor on the negatives' weight (None: 1)", float),
    ("encoder_repeats", "two-stage and RT-DETR presets: match the encoder proposals against every target repeated K times "
     "(one-to-many, H-DETR); 1 = off", int),
    ("hybrid_queries", "two-stage and RT-DETR presets: M more encoder-chosen queries trained as a separate one-to-many "
     "branch (H-DETR hybrid matching; training only); 0 = off", int),
    ("hybrid_repeats", "how often each target is repeated for the hybrid queries (H-DETR's k)", int),
    ("query_groups", "training-only groups of learned queries (Group DETR, plain DETR presets); 1 = off", int),
    ("denoising", "training-only denoising query groups (DN-DETR/DINO); 0 = off", int),
    ("denoising_queries", "training-only denoising queries in all: groups = this // the most objects of an image "
     "in the batch (RT-DETR's rule); 0 = off; not with --denoising", int),
    ("dn_box_noise", "denoising box noise, in half box sizes", float), ("dn_label_noise", "denoising label noise ratio", float),
]


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a detector on COCO-format data")
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the flags below as flat keys "
                   "(lr: 0.0002) or in sections model/loss/data/train; a section model: {preset: NAME, field: value} "
                   "overrides preset fields; flags given here win")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="defaults for every setting: 'paper' (DETR-R50, the paper's optimisation), 'fast' (learns in "
                        "minutes from random weights) or 'rtdetr' (the RT-DETR release's training at 640x640); --config "
                        f"and flags win (default: {', '.join(f'{r} for {a}* presets' for a, r in FAMILY_RECIPES.items())}, else none)")
    g = p.add_argument_group("model")
    _flag(g, TrainConfig, "model", f"model preset: {', '.join(PRESETS)}")
    _flag(g, TrainConfig, "weights", "start from a checkpoint (detrkit, official DETR / RT-DETR .pth or Hugging Face folder); "
          "the class head is re-initialised when the classes differ", metavar="PATH")
    _flag(g, TrainConfig, "backbone_weights", "local torchvision ImageNet ResNet state dict", metavar="FILE")
    g.add_argument("--conditional-attention", action="store_const", const=True, default=None,
                   help="Conditional DETR's cross-attention in a two-stage preset: the reference point as a "
                        "separate spatial part of each head's query (default: off)")
    _flag(g, ModelConfig, "num_points", "RT-DETR presets: sampling points per head on each feature level "
          "(RT-DETRv2: a count per level)", type=int, nargs="+")
    _flag(g, ModelConfig, "offset_scale", "RT-DETR presets: sampling offsets in units of this x the box size "
          "(RT-DETRv2's option)", type=float)
    _flag(g, ModelConfig, "sampling_method", "RT-DETR presets: bilinear sampling, or one cell per point "
          "(RT-DETRv2's discrete sampling)", choices=["default", "discrete"])
    g = p.add_argument_group("optimisation")
    for name, help, kind in OPTIMISATION_FLAGS:
        _flag(g, TrainConfig, name, help, **({"choices": kind} if isinstance(kind, list) else {"type": kind}))
    g.add_argument("--ema", action="store_const", const=True, default=None,
                   help="keep an exponential moving average of the weights; it is evaluated and saved in "
                        "best/ and last/ (the raw weights stay in last/train_state.pt) (default: off)")
    g = p.add_argument_group("matching and losses")
    for name, help, kind in LOSS_FLAGS:
        _flag(g, LossConfig, name, help, **({"choices": kind} if isinstance(kind, list) else {"type": kind}))
    _data_flags(p)
    g = p.add_argument_group("run")
    _flag(g, TrainConfig, "out", "run folder", metavar="RUN_DIR")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint, with its "
                   "saved settings (--epochs, --minutes, --device, --patience, --eval-every, --log and the number of "
                   "processes may change)")
    _flag(g, TrainConfig, "device", "cpu, cuda, cuda:1 ... or auto")
    g.add_argument("--log", "--logger", dest="log", action="append", metavar="NAME", default=None, help="experiment "
                   "logging: tensorboard, mlflow, wandb (the last two: the log extra); repeat or comma-separate for "
                   "several; under torchrun write --logger (its --log-dir makes --log ambiguous) (default: none)")
    return p


def _eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on a data set")
    p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint (detrkit, official DETR / RT-DETR .pth or Hugging Face)")
    _data_flags(p)
    p.add_argument("--out", default=None, help="folder for metrics.json, detections.json, per_class.csv, "
                   "pr_curves.png, confusion_matrix.png/.json and f1_curve.png/.json (default: eval/ beside the weights)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda ... (default: auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help=PRECISION_HELP)
    p.add_argument("--iou-threshold", type=float, default=0.5,
                   help="IoU at which a detection hits a target, for the confusion matrix and the F1 curve (default: 0.5)")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="minimum score of the detections counted in the confusion matrix (default: 0.5, as predict)")
    return p


def _predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="detect objects in images and draw them", description="Writes OUT/NAME.png, "
                       "OUT/detections.json. Unreadable files are skipped (a line each), then named again; exit status 2")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="checkpoint (detrkit, official DETR / RT-DETR .pth or Hugging Face) or an exported .onnx file")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score (default: 0.5)")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda ... (default: auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help=PRECISION_HELP)
    return p


def _export_parser(sub) -> argparse.ArgumentParser:
    from detrkit.export import add_export_arguments

    p = sub.add_parser("export", help="export a checkpoint to ONNX and check it against onnxruntime")
    add_export_arguments(p)
    return p


def _serve_parser(sub) -> argparse.ArgumentParser:
    from detrkit.serve import add_serve_arguments

    p = sub.add_parser("serve", help="serve a detector over HTTP, with a page to try it in a browser")
    add_serve_arguments(p)
    return p


def _explain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="draw what a model attends to, or how the matcher assigned its predictions",
                       description="Without --matching: one PNG with the detections of IMAGE, the decoder cross-attention "
                       "of each and the encoder self-attention of a few reference points (RT-DETR: each one's sampling points). "
                       "With --matching: a training image with each target, the prediction the Hungarian matcher "
                       "assigned to it (and the cost terms), and the unmatched queries faded.")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file to explain (not with --matching)")
    p.add_argument("--weights", required=True, metavar="PATH", help="checkpoint (detrkit, official DETR / RT-DETR .pth or Hugging Face)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: runs/explain/IMAGE-NAME.png, or runs/explain/matching-SPLIT-INDEX.png)")
    p.add_argument("--device", default="auto", help="cpu, cuda ... (default: auto)")
    g = p.add_argument_group("attention maps")
    g.add_argument("--points", nargs="+", metavar="X,Y", default=None,
                   help="DETR models: reference points in image pixels for the encoder maps; put IMAGE before this flag (default: the centres of the best "
                        "detections, or four fixed points when nothing is detected)")
    g.add_argument("--threshold", type=float, default=0.5, help="minimum detection score (default: 0.5)")
    g.add_argument("--max-objects", type=int, default=6,
                   help="at most this many detections, each with its decoder map or sampling points (default: 6)")
    g = p.add_argument_group("matching view")
    g.add_argument("--matching", action="store_true", help="draw the matching of one annotated image instead")
    _data_sources(g)
    g.add_argument("--split", default="train", choices=["train", "val"], help="which split's image (default: train)")
    g.add_argument("--index", type=int, default=0, help="image number in the annotation file, from 0 (default: 0)")
    for name, what in (("cost_class", "class"), ("cost_bbox", "L1 box"), ("cost_giou", "GIoU")):
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None,
                       help=f"matching weight of the {what} term (default: the run's config.yaml beside the "
                            f"weights, else {_default(LossConfig, name)})")
    return p


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def _given(args) -> dict[str, dict]:
    """The config sections of the flags given (argparse's None means "not given")."""
    return route({k: v for k, v in vars(args).items() if v is not None})[0]


def cmd_train(args) -> int:
    from detrkit.run import train

    if args.resume:
        model_cfg, loss_cfg, data_cfg, train_cfg = load_run_config(Path(args.resume))
        overrides = {k: v for k, v in _given(args).get("train", {}).items()
                     if k in ("epochs", "minutes", "device", "patience", "eval_every", "log")}
        train_cfg = dataclasses.replace(train_cfg, **overrides, out=args.resume, resume=True)
    else:
        from_file = read_config_file(args.config) if args.config else {}
        model_cfg, loss_cfg, data_cfg, train_cfg = resolve(args.recipe, from_file, _given(args))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for all
    if main_process:
        note_slow_bf16(train_cfg.precision, train_cfg.device)
    run_dir = train(model_cfg, loss_cfg, data_cfg, train_cfg)
    if not main_process:
        return 0
    print(f"run folder: {run_dir}\nbest checkpoint: {run_dir / 'best'}\nresults: {run_dir / 'results.csv'}, "
          f"{run_dir / 'results.png'}")
    return 0


def cmd_check_data(args) -> int:
    from detrkit.data.build import data_paths
    from detrkit.data.coco import load_coco

    paths = data_paths(config_from_dict(DataConfig, _given(args).get("data", {})))
    if not any(k in paths for k in ("train_json", "val_json")):
        raise DetrkitError("no data given: use --data DIR or --train-json/--train-images (and/or --val-json/--val-images)")
    failed = False
    for split in ("train", "val"):
        if f"{split}_json" not in paths:
            continue
        data = load_coco(paths[f"{split}_json"], paths[f"{split}_images"], check_images=args.check_images is not False,
                         strict=False)
        print(f"== {split}: {paths[f'{split}_json']}")
        print(data.report.summary())
        failed |= bool(data.report.problems)
    if failed:
        raise DetrkitError("problems found (listed above); fix them before training")
    return 0


def cmd_eval(args) -> int:
    from detrkit import load_model
    from detrkit.analysis import format_best_threshold, write_analysis
    from detrkit.data.build import data_paths
    from detrkit.engine import evaluate_model
    from detrkit.evaluate import format_metrics, write_metrics

    for name in ("iou_threshold", "score_threshold"):
        if not 0 <= getattr(args, name) <= 1:
            raise DetrkitError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    note_slow_bf16(args.precision, args.device)
    model = load_model(args.weights, precision=args.precision)
    data = _given(args).get("data", {})
    metrics, detections = evaluate_model(model, data, batch_size=args.batch_size, device=args.device)
    gt_json = data_paths(config_from_dict(DataConfig, data))["val_json"]
    out = Path(args.out) if args.out else Path(args.weights).resolve().parent / "eval"
    write_metrics(out, metrics, detections)
    extras = write_analysis(out, gt_json, detections, iou_threshold=args.iou_threshold,
                            score_threshold=args.score_threshold)
    print(format_metrics(metrics))
    print(format_best_threshold(extras["best"], args.iou_threshold))
    print(f"written: {out / 'metrics.json'}, {out / 'detections.json'}, "
          f"{', '.join(f.name for f in extras['files'])}")
    return 0


def cmd_predict(args) -> int:
    from detrkit.data.images import image_files
    from detrkit.detector import Detector, predict_files

    files = image_files(args.paths)
    note_slow_bf16(args.precision, args.device)
    detector = Detector(args.weights, device=args.device, precision=args.precision)
    done = predict_files(detector, files, Path(args.out), threshold=args.threshold, batch_size=args.batch_size)
    if done.skipped:  # everything readable is written; the run still fails, as for any data error
        raise DataError(done.summary(Path(args.out)))
    print(done.summary(Path(args.out)))
    return 0


def cmd_synth(args) -> int:
    from detrkit.data.synthetic import make_synthetic

    paths = make_synthetic(args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                           seed=args.seed, min_objects=args.objects[0], max_objects=args.objects[1],
                           object_size=args.object_size)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    from detrkit.demo import run_demo

    run_demo(out=args.out, data_dir=args.data_dir, minutes=args.minutes, device=args.device)
    return 0


def cmd_export(args) -> int:
    from detrkit.export import run_export

    return run_export(args)


def cmd_serve(args) -> int:
    from detrkit.serve import run_serve

    return run_serve(args)


def cmd_explain(args) -> int:
    from detrkit import load_model

    if args.matching and args.image:
        raise DetrkitError("give either IMAGE (attention maps) or --matching with data flags, not both")
    if not args.matching and not args.image:
        raise DetrkitError("give an IMAGE to explain, or --matching with --data DIR (or --train-json/--train-images)")
    if args.max_objects < 0:
        raise DetrkitError("--max-objects must be >= 0")
    data = _given(args).get("data", {})  # the data flags of the matching view
    if args.matching:
        if not data:
            raise DetrkitError("--matching needs data: --data DIR, or --train-json FILE --train-images DIR")
    elif not Path(args.image).is_file():
        raise DetrkitError(f"{args.image}: no such image file")
    points = _points(args.points) if args.points else None
    model = load_model(args.weights, device=select_device(args.device))
    if args.matching:
        return _explain_matching(args, model, data)

    from detrkit.explain import SamplingExplanation, explain
    from detrkit.visualize import draw_explanation, draw_sampling

    result = explain(model, args.image, points=points, threshold=args.threshold, max_objects=args.max_objects)
    out = Path(args.out) if args.out else Path("runs/explain") / f"{Path(args.image).stem}.png"
    sampling = isinstance(result, SamplingExplanation)  # RT-DETR: sampling points instead of attention maps
    (draw_sampling if sampling else draw_explanation)(result, out)
    for i, (name, score, q) in enumerate(zip(result.names, result.scores.tolist(), result.queries.tolist())):
        print(f"{i + 1}: {name} {score:.2f} (query {q})")
    what = "their sampling points" if sampling else f"{len(result.points)} reference points"
    print(f"{len(result.names)} detections{'' if result.names else f' above --threshold {args.threshold:g}'}, {what} -> {out}")
    return 0


def _points(values: list[str]) -> list[tuple[float, float]]:
    points = []
    for v in values:
        try:
            x, y = (float(c) for c in v.split(","))
        except ValueError:
            raise DetrkitError(f"--points: {v!r} is not X,Y (two numbers, e.g. 120,64)") from None
        points.append((x, y))
    return points


def _explain_matching(args, model, data: dict) -> int:
    from detrkit.data.build import data_paths
    from detrkit.explain import match_annotated
    from detrkit.visualize import draw_matching

    paths = data_paths(config_from_dict(DataConfig, data))
    if f"{args.split}_json" not in paths:
        raise DetrkitError(f"no {args.split} split in the data given (use --split, or give --{args.split}-json and "
                           f"--{args.split}-images)")
    # Match as training did: the run's loss settings when the weights sit in a run folder.
    run_config = Path(args.weights).resolve().parent / "config.yaml"
    loss = load_run_config(run_config.parent)[1] if run_config.is_file() else LossConfig()
    loss = dataclasses.replace(loss, **{k: getattr(args, k) for k in ("cost_class", "cost_bbox", "cost_giou")
                                        if getattr(args, k) is not None})
    result = match_annotated(model, paths[f"{args.split}_json"], paths[f"{args.split}_images"], args.index, loss)
    out = Path(args.out) if args.out else Path("runs/explain") / f"matching-{args.split}-{args.index}.png"
    draw_matching(result, out)
    print(f"{result.image_path}: {len(result.target_names)} targets matched to queries "
          f"{[q for q, _ in sorted(result.pairs, key=lambda pair: pair[1])]} -> {out}")
    return 0


COMMANDS = {"explain": cmd_explain, "export": cmd_export, "train": cmd_train, "check-data": cmd_check_data,
            "eval": cmd_eval, "predict": cmd_predict, "synth": cmd_synth, "demo": cmd_demo, "serve": cmd_serve}


def main(argv: Optional[list[str]] = None) -> int:
    # glibc: keep freed memory for reuse instead of unmapping and faulting it in again on every
    # forward pass (up to 45 % of the CPU time; see detrkit.allocator and docs/benchmarks.md).
    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DetrkitError, ValueError) as e:
        # The user's input is wrong (data, weights, flags): one clear message, no traceback.
        if args.debug:
            traceback.print_exc()
            if getattr(e, "worker_traceback", None):  # raised in a data loader process: where it happened there
                print(e.worker_traceback, file=sys.stderr)
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""  # torchrun
        print(f"detrkit {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
