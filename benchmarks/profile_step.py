"""Where one training step of a preset spends its CPU time (torch.profiler), run by hand.

    python benchmarks/profile_step.py [--preset detr_r18_fast] [--batch-size 16] [--image-size 128]

Prints the step time (median of 5 after warm-up) and the operators by self CPU time, with the
allocator settings the ``detrkit`` command uses (detrkit.allocator). The dropout figures in
docs/benchmarks.md come from running it with ``--dropout 0.1`` and ``--dropout 0``.
"""
import argparse
import statistics
import time

import torch

from detrkit import build_criterion, build_model, preset
from detrkit.allocator import tune_allocator
from detrkit.config import LossConfig, TrainConfig
from detrkit.engine import make_optimizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="detr_r18_fast")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    args = p.parse_args()
    tune_allocator()  # as the detrkit command does at start-up
    torch.manual_seed(0)
    overrides = {"num_classes": 4} | ({"dropout": args.dropout} if args.dropout is not None else {})
    cfg = preset(args.preset, **overrides)
    model = build_model(cfg).train()
    criterion = build_criterion(4, LossConfig(), cfg.dec_layers - 1, sigmoid_class=model.sigmoid_class)
    optimizer = make_optimizer(model, TrainConfig())  # detrkit train's AdamW (fused)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
    mask = torch.zeros(args.batch_size, args.image_size, args.image_size, dtype=torch.bool)
    targets = [{"labels": torch.randint(0, 4, (3,), generator=gen),
                "boxes": torch.rand(3, 4, generator=gen) * 0.3 + 0.2} for _ in range(args.batch_size)]

    def step() -> None:
        optimizer.zero_grad()
        criterion(model((images, mask)), targets)["loss"].backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{args.preset} batch {args.batch_size} at {args.image_size} px: "
          f"{statistics.median(times) * 1000:.0f} ms per step ({args.batch_size / statistics.median(times):.1f} img/s)")
    with torch.profiler.profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
