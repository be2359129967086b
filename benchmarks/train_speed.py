"""Training throughput of model presets with the `fast` recipe's loss and aids, side by side.

    python benchmarks/train_speed.py --sizes 128 320 640                       # the default presets
    python benchmarks/train_speed.py --models detr_r18_fast rtdetr_n runs/candidate.yaml --sizes 128

For each image size, every model trains optimiser steps exactly as ``detrkit train --recipe fast
--model NAME`` does (the recipe's loss: varifocal, denoising groups, encoder one-to-many; its
AdamW and clipping; fp32 unless ``--precision bf16``) on the same random batch: ``--batch-size``
square images with 4 objects each, 10-40 % of the side (the demo's proportions). The models take
turns (ABBA order, after a warm-up step each), so a change of machine load hits all alike; the
figure is the median step's images per second, with its ratio to the first model (the peer run
in the same process), and the GFLOPs of one inference pass of one image at that size
(:func:`detrkit.count_flops`). A model is a preset name or a ``--config`` YAML file with a
``model:`` section (``preset:`` and field overrides), as ``detrkit train`` reads it.

Prints one table row per model and size; ``--json`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from detrkit import count_flops
from detrkit.aids import AidedModel
from detrkit.allocator import tune_allocator
from detrkit.config import read_config_file
from detrkit.criterion import build_criterion
from detrkit.engine import Trainer, make_optimizer
from detrkit.model.build import build_model
from detrkit.presets import resolve

NUM_CLASSES = 4  # the demo set's


def trainer_for(model: str, precision: str, lr_overrides: dict) -> tuple[Trainer, object]:
    """A trainer of ``model`` (preset name or YAML file) with the fast recipe's settings, and its model config."""
    if model.endswith((".yaml", ".yml")):
        layer = read_config_file(model)
    else:
        layer = {"train": {"model": model}}
    layer.setdefault("train", {}).update(precision=precision, **lr_overrides)
    model_cfg, loss_cfg, _, train_cfg = resolve("fast", layer)
    model_cfg.num_classes = NUM_CLASSES
    net = build_model(model_cfg).train()
    aided = AidedModel(net, loss_cfg).train()
    criterion = build_criterion(NUM_CLASSES, loss_cfg, num_aux=model_cfg.dec_layers - 1,
                                sigmoid_class=net.sigmoid_class).train()
    return Trainer(net, aided, aided, criterion, make_optimizer(aided, train_cfg), train_cfg, torch.device("cpu")), \
        model_cfg


def random_batch(batch: int, size: int, seed: int = 0) -> list:
    """One micro-batch ``[(images, mask, targets)]``: normalised-looking noise, 4 boxes per image."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        wh = torch.rand(4, 2, generator=gen) * 0.3 + 0.1  # 10-40 % of the side
        centre = wh / 2 + torch.rand(4, 2, generator=gen) * (1 - wh)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (4,), generator=gen),
                        "boxes": torch.cat([centre, wh], 1)})
    return [(images, mask, targets)]


def measure(models: list[str], size: int, batch: int, repeats: int, precision: str) -> list[dict]:
    """Median step seconds of each model at ``size`` px, the models taking turns (ABBA)."""
    trainers = {m: trainer_for(m, precision, {"batch_size": batch}) for m in models}
    data = random_batch(batch, size)

    def step(name: str) -> float:
        start = time.perf_counter()
        trainers[name][0].forward_backward(data)
        trainers[name][0].optimizer_step()
        return time.perf_counter() - start

    for name in models:  # warm-up: allocation, oneDNN kernel choice
        step(name)
    times: dict[str, list[float]] = {m: [] for m in models}
    for i in range(repeats):
        for name in (models if i % 2 == 0 else models[::-1]):
            times[name].append(step(name))
    rows, peer = [], None
    for name in models:
        median = statistics.median(times[name])
        peer = peer or median
        rows.append({"model": name, "size": size, "batch": batch, "precision": precision,
                     "step_ms": round(median * 1e3, 1), "img_s": round(batch / median, 2),
                     "vs_first": round(peer / median, 2),
                     "gflops": round(count_flops(trainers[name][1], (size, size)) / 1e9, 2),
                     "runs_ms": [round(t * 1e3) for t in times[name]]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["detr_r18_fast", "rtdetr_n", "rtdetr_r18"],
                   help="preset names or YAML files; the first is the peer the others are compared with")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 320, 640])
    p.add_argument("--batch-size", type=int, default=8, help="the fast recipe's")
    p.add_argument("--repeats", type=int, default=4, help="timed steps per model and size")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    tune_allocator()  # as the detrkit command does at start-up
    torch.manual_seed(0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.precision}, "
          f"batch {args.batch_size}, median of {args.repeats} steps")
    print("| model | px | GFLOPs (1 image) | step ms | img/s | x first |")
    print("|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        for row in measure(args.models, size, args.batch_size, args.repeats, args.precision):
            rows.append(row)
            print(f"| {row['model']} | {size} | {row['gflops']} | {row['step_ms']} | {row['img_s']} | "
                  f"{row['vs_first']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
