"""The Ultralytics side of benchmarks/peers.py: train one model for a time budget, predict the
validation images, write the raw predictions and the timing as JSON.

Run by benchmarks/peers.py with the interpreter of the peers' own venv (.venv-peers), never
imported by detrkit's. It needs no detrkit: scoring happens in the parent, with detrkit's
evaluator. By hand (after peers.py has written the YOLO copy of the data)::

    .venv-peers/bin/python benchmarks/peers_ultralytics.py --model yolo11n.yaml \\
        --data runs/peers/yolo-data/data.yaml --minutes 1 --imgsz 128 --out runs/peers/yolo11n

What it changes from Ultralytics' defaults, and why (the parent's docstring has the rest):
- ``time=minutes / 60``: Ultralytics' own time budget. After each epoch it re-estimates how many
  epochs fit and re-shapes its learning-rate schedule (and the final no-mosaic epochs) to them.
- ``val=False``: no validation after each epoch, so the minutes go to training, as detrkit's
  budget excludes its evaluation. Ultralytics still validates after the last epoch (outside the
  budget; its mAP is kept as a cross-check); its second pass over the same weights as
  ``best.pt`` is skipped.
- ``plots=False, amp=False, pretrained=False``: no figures, no AMP check, random weights.
- Offline: ``YOLO_OFFLINE=1`` (no online check, no analytics), the dataset check's font lookup
  (``check_font``, for plots only) is skipped, and an audit hook refuses every internet
  connection and name lookup and records it: ``network_attempts`` in the output must be empty.
- Threads: Ultralytics sets ``torch.set_num_threads(cpu_count - 1)`` for CPU training (1 of 2
  cores here); ``--threads`` (the parent passes detrkit's count) replaces that number.

Timing: ``train_seconds`` is the time spent inside the epochs (from each epoch's start callback
to its end callback: data loading, forward, backward, optimiser), not the checkpoint saving
between epochs nor any validation. ``images_seen`` counts the batches of each epoch times the
batch size, the last batch of an epoch at its real size.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

NETWORK_ATTEMPTS: list[str] = []


def _refuse_network(event: str, args: tuple) -> None:
    """Audit hook: refuse internet connections and name lookups, and remember them (local sockets pass)."""
    if event == "socket.getaddrinfo" or (
            event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6)):
        NETWORK_ATTEMPTS.append(f"{event} {args[1:] if event == 'socket.connect' else args[:2]}")
        raise OSError(f"benchmarks/peers_ultralytics.py: network use refused ({event})")


# Before Ultralytics is imported: it checks whether it is online when imported.
os.environ["YOLO_OFFLINE"] = "1"
sys.addaudithook(_refuse_network)

import torch  # noqa: E402
import ultralytics  # noqa: E402
import ultralytics.data.utils  # noqa: E402
from ultralytics import RTDETR, YOLO  # noqa: E402
from ultralytics.utils import torch_utils  # noqa: E402

from flops import forward_gflops  # noqa: E402  (benchmarks/flops.py, next to this file)

ultralytics.data.utils.check_font = lambda *args, **kwargs: None  # a font for plots; plots are off


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Ultralytics model yaml (random weights), e.g. yolo11n.yaml")
    p.add_argument("--data", required=True, help="YOLO data.yaml written by benchmarks/peers.py")
    p.add_argument("--minutes", type=float, required=True, help="training budget (Ultralytics' time=)")
    p.add_argument("--imgsz", type=int, required=True, help="training and prediction image size")
    p.add_argument("--out", required=True, help="folder for Ultralytics' run and result.json")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: Ultralytics' 16)")
    p.add_argument("--seed", type=int, default=0, help="Ultralytics' seed (default: its 0)")
    return p.parse_args(argv)


def model_class(cfg: str):
    return RTDETR if "rtdetr" in Path(cfg).name else YOLO


class EpochClock:
    """Callbacks that add up the time inside the epochs and the images trained on."""

    def __init__(self) -> None:
        self.seconds, self.images, self.epochs, self.batches = 0.0, 0, 0, 0
        self._start = None

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_start", self.epoch_start)
        # At a batch's start: the batch that ends the budget leaves the loop before its end callback.
        model.add_callback("on_train_batch_start", self.batch_start)
        model.add_callback("on_train_epoch_end", self.epoch_end)

    def epoch_start(self, trainer) -> None:
        self._start, self.batches = time.perf_counter(), 0

    def batch_start(self, trainer) -> None:
        self.batches += 1

    def epoch_end(self, trainer) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += min(self.batches * trainer.batch_size, len(trainer.train_loader.dataset))
        self.epochs += 1


def skip_final_eval(trainer) -> None:
    """With ``val=False`` Ultralytics validates the last weights after the last epoch, then again as
    ``best.pt`` (the same weights: nothing else was validated); the second pass only costs time."""
    trainer.final_eval = lambda: None


def train(args: argparse.Namespace, clock: EpochClock):
    """Train from random weights for the budget; returns Ultralytics' trainer."""
    model = model_class(args.model)(args.model)
    clock.attach(model)
    model.add_callback("on_train_start", skip_final_eval)
    model.train(
        data=args.data, time=args.minutes / 60, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        device="cpu", val=False, plots=False, amp=False, pretrained=False, seed=args.seed,
        project=str(Path(args.out).resolve()), name="train", exist_ok=True,
    )
    return model.trainer


def predict(weights: Path, cfg: str, val_images: Path, imgsz: int) -> dict:
    """``{file stem: [[x0, y0, x1, y1, score, class index], ...]}``, boxes in original image pixels.

    conf 0.001 and max_det 100: what COCO AP needs (low-scoring boxes still add recall); NMS at
    Ultralytics' default IoU 0.7 (YOLO; RT-DETR has none).
    """
    model = model_class(cfg)(str(weights))
    found = {}
    for r in model.predict(source=str(val_images), imgsz=imgsz, conf=0.001, max_det=100, device="cpu",
                           batch=16, stream=True, verbose=False):
        boxes = r.boxes
        rows = torch.cat([boxes.xyxy, boxes.conf[:, None], boxes.cls[:, None]], dim=1)  # (N, 6)
        found[Path(r.path).stem] = rows.tolist()
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch_utils.NUM_THREADS = args.threads  # read by Ultralytics' select_device for CPU training
    clock, start = EpochClock(), time.perf_counter()
    trainer = train(args, clock)
    train_wall = time.perf_counter() - start
    val_images = Path(trainer.data["val"])
    weights = trainer.last  # the weights at the end of the budget (Ultralytics' EMA)
    predictions = predict(weights, args.model, val_images, args.imgsz)
    net = model_class(args.model)(str(weights)).model.float()
    result = {
        "model": Path(args.model).stem, "ultralytics": ultralytics.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "workers": args.workers, "batch": trainer.batch_size,
        "imgsz": args.imgsz, "minutes_budget": args.minutes, "train_seconds": clock.seconds,
        "train_call_seconds": train_wall, "images_seen": clock.images, "epochs_run": clock.epochs,
        "train_images": len(trainer.train_loader.dataset), "weights": str(weights),
        "params": sum(p.numel() for p in net.parameters()),
        "gflops": forward_gflops(net, torch.zeros(1, 3, args.imgsz, args.imgsz)),
        "gflops_ultralytics": torch_utils.get_flops(net, args.imgsz),  # its own count (thop), for reference
        "own_metrics": {k: float(v) for k, v in (trainer.metrics or {}).items()},
        "network_attempts": NETWORK_ATTEMPTS, "predictions": predictions,
    }
    Path(args.out, "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
