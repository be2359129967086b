"""Convergence against the detectors users pick instead: Ultralytics YOLO11n and RT-DETR beside
detrkit, each trained from random weights for the same CPU minutes on the same COCO data set and
scored by detrkit's own COCO evaluator.

    make bench-peers          # the demo set and the 640 px stand-in (docs/benchmarks.md)
    python benchmarks/peers.py --data data/synthetic/shapes-128 --minutes 10 --out runs/peers/demo
    python benchmarks/peers.py --data DIR --minutes 1 --models yolo11n,detrkit   # a smoke run

Ultralytics is a dependency of this benchmark only, never of detrkit: it lives in its own venv,
and its side runs there as a subprocess (benchmarks/peers_ultralytics.py), so detrkit's venv
never imports it::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190

(``make bench-peers`` does this when .venv-peers is missing; 8.4.190 is the version measured.)

Method; each point is a choice that bears on fairness:

- **Models.** ``yolo11n.yaml`` (YOLO11n) and ``rtdetr-l.yaml`` (the smallest RT-DETR that
  Ultralytics ships; its ResNet configurations are larger), built from the yaml: random
  weights, as detrkit's ``--recipe fast`` (no ``--weights``, no ``--backbone-weights``).
  detrkit runs ``detrkit train --recipe fast`` unless ``--detrkit-args`` says otherwise. Each
  side keeps its own recipe (batch, optimiser, schedule, augmentation): what a user gets.
- **Data.** The Ultralytics side trains on a YOLO copy of the same COCO files: the images are
  symlinks named by COCO image id (``images/{train,val}/<id>.jpg``), one label file per image
  (``class cx cy w h``, normalised by the image size from the COCO record, clipped to the
  image), empty for an image without objects; ``iscrowd`` boxes have no YOLO form and are left
  out of training (the evaluator still ignores detections on them). Class index ``i`` is the
  ``i``-th category in ascending id order; the detections are mapped back to the data set's
  own category ids, and file stems back to image ids, before scoring.
- **Image size.** Ultralytics' ``imgsz`` is the data's image size (the longest side of the
  training images, rounded up to a multiple of 32). detrkit uses its recipe's size
  (``--recipe fast``: ``auto``, the native size up to 256 px); the table says which.
- **Budget.** Ultralytics' own time budget, ``time=`` (hours) set to the same minutes: after
  each epoch it re-estimates how many epochs fit and re-shapes its schedule (learning-rate decay,
  the last no-mosaic epochs) to them, as detrkit's schedule follows its ``--minutes``. Its
  warm-up is 3 epochs when the first epoch starts, so a budget of one or two epochs is mostly
  warm-up: that is Ultralytics' behaviour, not changed here.
- **Time counted.** Both budgets count training only. detrkit's clock excludes evaluation and
  checkpointing; Ultralytics validates every epoch by default, turned off (``val=False``, it
  still validates once after the last epoch) so the minutes go to training; its clock includes
  the checkpoint saved after each epoch, so it may stop a little earlier. Reported "minutes" is
  the time inside the epochs on both sides (detrkit's ``results.csv`` seconds; for Ultralytics
  from each epoch's start callback to its end callback), and img/s = images trained / that time.
- **CPU.** The same torch threads on both sides (``--threads``, default detrkit's: all cores;
  Ultralytics would otherwise use cores - 1) and the same loader processes (``--workers``,
  default 0, the fast recipe's: on 2 cores a loader process takes a core from the model).
- **Offline.** ``plots=False`` and ``amp=False`` (no figures, no font, no AMP check that fetches
  weights), ``YOLO_OFFLINE=1``, the dataset check's font lookup skipped, and an audit hook that
  refuses every internet connection; each run's ``network_attempts`` must be empty.
- **Prediction and scoring.** The weights at the end of the budget (Ultralytics' ``last.pt``,
  its EMA; detrkit's last epoch) predict the validation images at confidence 0.001 with at most
  100 boxes per image (Ultralytics' NMS at its default IoU 0.7). Every side's detections go
  through :func:`detrkit.evaluate.coco_metrics` against the same validation JSON: the 12 COCO
  numbers. Ultralytics' own mAP of the last weights is kept in the JSON as a cross-check.
- **GFLOPs.** One forward pass of one image at the side's training size, counted by
  torch.utils.flop_counter for every model (benchmarks/flops.py); Ultralytics' own figure
  (thop) is in the JSON too.

Output: ``<out>/peers.json`` (every number, the machine, the commands) and ``<out>/peers.md``
(one markdown table row per model), also printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from detrkit.checkpoint import load_model
from detrkit.data.layouts import find_layout
from detrkit.evaluate import coco_metrics, detections_to_coco
from detrkit.run import read_results
from flops import forward_gflops

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers_ultralytics.py"
PEERS = {"yolo11n": "yolo11n.yaml", "rtdetr": "rtdetr-l.yaml"}  # the smallest of each family
MODELS = (*PEERS, "detrkit")
MAX_DETECTIONS = 100  # COCO AP's maxDets
REPORTED = ("AP", "AP50", "APs", "APm")


def load_json(path) -> object:
    return json.loads(Path(path).read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a COCO data folder (any layout `detrkit train --data` reads)")
    p.add_argument("--minutes", type=float, required=True, help="training budget of every model")
    p.add_argument("--out", default="runs/peers", help="output folder (default: runs/peers)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--peer-python", default=str(HERE.parent / ".venv-peers" / "bin" / "python"),
                   help="interpreter of the venv with ultralytics (default: .venv-peers/bin/python)")
    p.add_argument("--detrkit-args", default="--recipe fast",
                   help="flags added to `detrkit train` (default: '--recipe fast')")
    p.add_argument("--workers", type=int, default=0, help="data loader processes on both sides (default: 0)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads on both sides (default: {torch.get_num_threads()}, detrkit's)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


# ---------------------------------------------------------------------------------------------
# COCO -> YOLO, and the detections back to COCO (pure: no ultralytics)
# ---------------------------------------------------------------------------------------------
def yolo_label(bbox: list, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x, y, w, h]`` pixels -> YOLO ``(cx, cy, w, h)`` normalised by the image size,
    clipped to the image; None for a box with no area inside it."""
    x0, y0 = min(max(bbox[0], 0.0), width), min(max(bbox[1], 0.0), height)
    x1, y1 = min(max(bbox[0] + bbox[2], 0.0), width), min(max(bbox[1] + bbox[3], 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height


def write_yolo_split(coco: dict, image_root: Path, out: Path, split: str, index_of: dict) -> int:
    """``out/images/<split>/<image id><suffix>`` (symlinks) and ``out/labels/<split>/<image id>.txt``.

    Returns the number of boxes written. ``index_of`` maps category id -> class index.
    """
    images, labels = out / "images" / split, out / "labels" / split
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    lines: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue  # no YOLO form; the evaluator ignores detections on crowd regions
        if a["category_id"] not in index_of:
            raise ValueError(f"annotation {a['id']}: category_id {a['category_id']} is not among the categories")
        box = yolo_label(a["bbox"], *sizes[a["image_id"]])
        if box is not None:
            lines[a["image_id"]].append(f"{index_of[a['category_id']]} " + " ".join(f"{v:.6f}" for v in box))
    for im in coco["images"]:
        source = (image_root / im["file_name"]).resolve()
        (images / f"{im['id']}{source.suffix.lower()}").symlink_to(source)
        (labels / f"{im['id']}.txt").write_text("".join(line + "\n" for line in lines[im["id"]]))
    return sum(len(v) for v in lines.values())


def coco_to_yolo(paths: dict, out: Path) -> dict:
    """A YOLO copy of a COCO data set under ``out`` (rebuilt each time): ``data.yaml``, images,
    labels. Returns ``{"yaml": Path, "category_ids": [id of class 0, 1, ...], "boxes": {split: n}}``."""
    train, val = load_json(paths["train_json"]), load_json(paths["val_json"])
    categories = sorted(train["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    index_of = {cid: i for i, cid in enumerate(category_ids)}
    if out.exists():
        shutil.rmtree(out)
    boxes = {"train": write_yolo_split(train, Path(paths["train_images"]), out, "train", index_of),
             "val": write_yolo_split(val, Path(paths["val_images"]), out, "val", index_of)}
    data = {"path": str(out.resolve()), "train": "images/train", "val": "images/val",
            "names": {i: c["name"] for i, c in enumerate(categories)}}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "category_ids.json").write_text(json.dumps(category_ids))
    return {"yaml": out / "data.yaml", "category_ids": category_ids, "boxes": boxes}


def peer_detections_to_coco(predictions: dict, category_ids: list, max_det: int = MAX_DETECTIONS) -> list[dict]:
    """The child's ``{file stem (= image id): [[x0, y0, x1, y1, score, class index], ...]}`` -> COCO
    results with the data set's own category ids, the ``max_det`` best boxes of each image."""
    stems = sorted(predictions, key=int)
    per_image = []
    for stem in stems:
        rows = torch.tensor(predictions[stem], dtype=torch.float64).reshape(-1, 6)
        rows = rows[rows[:, 4].argsort(descending=True, stable=True)[:max_det]]  # (N, 6), best first
        labels = torch.tensor([category_ids[int(k)] for k in rows[:, 5].tolist()], dtype=torch.int64)
        per_image.append({"boxes": rows[:, :4], "scores": rows[:, 4], "labels": labels})
    return detections_to_coco(per_image, [int(s) for s in stems])


def images_trained(steps: int, batch: int, train_images: int) -> int:
    """Images in ``steps`` optimiser steps of ``batch`` images, epoch after epoch; the last step of
    each epoch takes what is left of it."""
    per_epoch = math.ceil(train_images / batch)
    return steps // per_epoch * train_images + min(steps % per_epoch * batch, train_images)


def image_size(coco: dict) -> int:
    """The training images' longest side (the most common one), rounded up to a multiple of 32."""
    sides = [max(im["width"], im["height"]) for im in coco["images"]]
    side = max(set(sides), key=sides.count)
    return int(math.ceil(side / 32) * 32)


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------
def run_logged(command: list, log: Path, env: dict | None = None) -> float:
    """Run ``command`` with its output in ``log``; returns its wall-clock seconds. Fails loudly."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{shlex.join(map(str, command))} failed ({done.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - start


def fresh_folder(folder: Path) -> Path:
    """An empty ``folder`` (this script's own, under ``--out``): nothing of an earlier run is read back."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def run_peer(name: str, yolo: dict, imgsz: int, args: argparse.Namespace, out: Path) -> dict:
    """Train and predict with one Ultralytics model in its venv; the row of numbers."""
    if not Path(args.peer_python).exists():
        raise SystemExit(f"{args.peer_python} not found; create the peers' venv (see this script's docstring) "
                         "or give --peer-python")
    folder = fresh_folder(out / name)
    command = [args.peer_python, str(PEER_SCRIPT), "--model", PEERS[name], "--data", str(yolo["yaml"]),
               "--minutes", str(args.minutes), "--imgsz", str(imgsz), "--out", str(folder),
               "--workers", str(args.workers), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of detrkit's on that side
    env["YOLO_CONFIG_DIR"] = str((out / "ultralytics-config").resolve())  # not the user's settings
    wall = run_logged(command, folder / "log.txt", env)
    result = load_json(folder / "result.json")
    detections = peer_detections_to_coco(result.pop("predictions"), yolo["category_ids"])
    return {"model": name, "command": shlex.join(command), "wall_seconds": wall, "image_size": imgsz,
            "seconds": result["train_seconds"], "images_seen": result["images_seen"],
            "train_images": result["train_images"], "gflops": result["gflops"], "detections": detections,
            "details": result}


def run_detrkit(args: argparse.Namespace, out: Path) -> dict:
    """``detrkit train`` for the budget (evaluated once, after the last step); the row of numbers."""
    run_dir = fresh_folder(out / "detrkit")
    # eval-every beyond any epoch count: the only evaluation is the one after the last epoch.
    command = [sys.executable, "-m", "detrkit", "train", "--data", str(args.data), "--minutes", str(args.minutes),
               "--out", str(run_dir), "--workers", str(args.workers), "--eval-every", "1000000",
               *shlex.split(args.detrkit_args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    wall = run_logged(command, out / "detrkit-log.txt", env)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    last = read_results(run_dir)[-1]  # the row of the last epoch: training seconds and steps so far
    size = int(config["data"]["image_size"])
    model = load_model(run_dir / "last")
    batch = config["train"]["batch_size"] * config["train"]["accumulate"]
    train_images = len(load_json(find_layout(args.data)["train_json"])["images"])
    steps = int(last["steps"])
    images = images_trained(steps, batch, train_images)
    return {"model": "detrkit", "command": shlex.join(command), "wall_seconds": wall, "image_size": size,
            "seconds": float(last["seconds"]), "images_seen": images, "train_images": train_images,
            "gflops": forward_gflops(model, [torch.zeros(3, size, size)]),
            "detections": load_json(run_dir / "detections.json"),
            "details": {"preset": config["train"]["model"], "batch": batch, "steps": steps,
                        "params": sum(p.numel() for p in model.parameters()), "network_attempts": []}}


# ---------------------------------------------------------------------------------------------
# Scores and the table
# ---------------------------------------------------------------------------------------------
def score(run: dict, val_json: Path) -> dict:
    """The run's numbers with the 12 COCO metrics of its detections (detrkit's evaluator)."""
    metrics = coco_metrics(val_json, run.pop("detections"), per_class=False)
    minutes = run["seconds"] / 60
    return {**run, "metrics": metrics, "minutes": minutes, "epochs": run["images_seen"] / run["train_images"],
            "img_s": run["images_seen"] / run["seconds"] if run["seconds"] else 0.0}


TABLE_HEADER = ("| model | data | px | AP | AP50 | APs | APm | x YOLO11n AP | epochs | img/s | minutes | GFLOPs |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict, data_name: str, yolo_ap: float | None) -> str:
    m = row["metrics"]
    ratio = f"{m['AP'] / yolo_ap:.2f}" if yolo_ap else "-"
    numbers = " | ".join(f"{m[k]:.3f}" for k in REPORTED)
    return (f"| {row['model']} | {data_name} | {row['image_size']} | {numbers} | {ratio} | {row['epochs']:.1f} | "
            f"{row['img_s']:.1f} | {row['minutes']:.1f} | {row['gflops']:.2f} |")


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                   platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_layout(args.data)
    imgsz = image_size(load_json(paths["train_json"]))
    yolo = coco_to_yolo(paths, out / "yolo-data") if set(args.models) & set(PEERS) else None
    rows = []
    for name in args.models:
        print(f"training {name} for {args.minutes:g} minutes ...", flush=True)
        run = run_detrkit(args, out) if name == "detrkit" else run_peer(name, yolo, imgsz, args, out)
        rows.append(score(run, paths["val_json"]))
        print(f"  {name}: AP {rows[-1]['metrics']['AP']:.3f}, {rows[-1]['minutes']:.1f} training minutes "
              f"({rows[-1]['wall_seconds'] / 60:.1f} in all)", flush=True)
    yolo_ap = next((r["metrics"]["AP"] for r in rows if r["model"] == "yolo11n"), None)
    data_name = Path(args.data).name
    table = "\n".join([TABLE_HEADER, *(table_row(r, data_name, yolo_ap) for r in rows)])
    report = {"machine": machine(), "data": str(args.data), "minutes": args.minutes, "threads": args.threads,
              "workers": args.workers, "command": shlex.join([sys.executable, *sys.argv]), "runs": rows}
    (out / "peers.json").write_text(json.dumps(report, indent=1))
    (out / "peers.md").write_text(table + "\n")
    print(f"\n{report['machine']['cpu']}, {args.threads} threads, {args.workers} loader workers; "
          f"{args.minutes:g} minutes each on {args.data}\n{table}")
    attempts = [a for r in rows for a in r["details"].get("network_attempts", [])]
    if attempts:
        print(f"network use was attempted (and refused): {attempts}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
