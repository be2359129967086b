"""detrkit against Hugging Face transformers' DETR (and RT-DETR), side by side in one process, run by hand.

    make bench                                  # the full run (about 6 minutes on 2 cores)
    python benchmarks/bench.py --quick          # smaller images, fewer repeats: a smoke run
    python benchmarks/bench.py --only matcher   # one section (peak, inference, train, memory, matcher,
                                                #   optimizer, dropout, agreement, rtdetr)
    python benchmarks/bench.py --only rtdetr    # RT-DETR-R18 at 640 x 640 against Hugging Face's
                                                #   RTDetrForObjectDetection (benchmarks/bench_rtdetr.py)

Both sides are DETR-R50 in the configuration of the published ``facebook/detr-resnet-50``
(timm ResNet-50, 6+6 layers, 100 queries, 92 logits), built from random weights (nothing can
be downloaded), saved once with ``save_pretrained`` and loaded by both: the *same* weights.
Random weights measure speed only; the outputs of the two are checked to agree before any
timing. Each case warms up, then alternates the two sides (ABBA...) and reports the median
of ``--repeats`` runs and the ratio detrkit / peer. The machine's matmul peak (fp32, bf16)
is measured first; each model run's FLOPs are counted once
(:class:`torch.utils.flop_counter.FlopCounterMode`) and reported as achieved GFLOP/s and as
a fraction of that peak.

Dropout: the official DETR uses 0.1 in attention, after attention and in the FFN; the peer's
config defaults switch two of these off (attention_dropout, activation_dropout = 0), so the
peer is configured with 0.1 for all three, as detrkit is, to train the same model.

Peak memory of a training step is the resident set size (RSS) of a fresh process per side:
torch.profiler and tracemalloc see only tensors (or only Python objects), not oneDNN's
scratch buffers or the allocator's own overhead, which are part of what a step costs. The
process builds the model, optimizer and batch, resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``; without it, the process's ``ru_maxrss`` is used) and runs three
steps; reported are that peak and the peak above the RSS before the first step (optimizer
state + activations + gradients), the second compared between the sides, since the first
also holds each library's imports.

Allocator: by default both sides run under detrkit's glibc settings (applied at start-up
exactly as the ``detrkit`` command applies them, :mod:`detrkit.allocator`); ``--malloc
default`` leaves glibc's defaults. docs/benchmarks.md records both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Problem sizes: the R50 cases of the speed targets, a --quick smoke run and a --tiny plumbing check (tests).
SIZES = {
    "full": {"arch": "r50", "infer": (800, 1066), "train": [(512, 683), (480, 640)], "matcher": (8, 300, 50),
             "peak_n": 2048, "conv": (256, 100, 134), "attention": (2, 8, 324, 32), "repeats": 7, "warmup": 2},
    "quick": {"arch": "r50", "infer": (400, 533), "train": [(256, 341), (240, 320)], "matcher": (8, 300, 50),
              "peak_n": 1024, "conv": (256, 50, 67), "attention": (2, 8, 81, 32), "repeats": 3, "warmup": 1},
    "tiny": {"arch": "tiny", "infer": (64, 96), "train": [(64, 96), (48, 80)], "matcher": (2, 10, 3),
             "peak_n": 128, "conv": (16, 8, 8), "attention": (1, 2, 16, 8), "repeats": 1, "warmup": 1},
}
TARGETS_PER_IMAGE = 5
NUM_LABELS = 91  # COCO, as facebook/detr-resnet-50: 92 logits with "no object"
SECTIONS = ("peak", "inference", "train", "memory", "matcher", "optimizer", "dropout", "agreement", "rtdetr")
# FlopCounterMode knows the GPU attention kernels; the CPU one does the same arithmetic.
def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_sdpa_cpu_flops._get_raw = _sdpa_cpu_backward_flops._get_raw = True  # they take tensors, not shapes
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


# ---------------------------------------------------------------------------------------------
# Models with the same weights
# ---------------------------------------------------------------------------------------------
def hf_config(arch: str):
    from transformers import DetrConfig

    common = dict(use_timm_backbone=True, use_pretrained_backbone=False, num_labels=NUM_LABELS,
                  auxiliary_loss=True, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    if arch == "r50":
        return DetrConfig(backbone="resnet50", num_queries=100, d_model=256, **common)
    return DetrConfig(backbone="resnet18", num_queries=10, d_model=32, encoder_layers=1, decoder_layers=2,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, **common)


def save_peer(arch: str, folder: Path) -> None:
    """A random-init peer model written with save_pretrained: the weights both sides load."""
    from transformers import DetrForObjectDetection

    torch.manual_seed(0)
    DetrForObjectDetection(hf_config(arch)).save_pretrained(folder)


def load_peer(folder: Path):
    from transformers import DetrForObjectDetection
    from transformers.utils import logging

    logging.disable_progress_bar()
    return DetrForObjectDetection.from_pretrained(folder).eval()


def load_ours(folder: Path, precision: str = "fp32"):
    from detrkit import load_model

    return load_model(folder, precision=precision)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images of the given sizes in one zero-padded batch: ``(B, 3, H, W)``, mask True = padding."""
    gen = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = torch.zeros(len(sizes), 3, h, w)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        x[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=gen)
        mask[i, :hi, :wi] = False
    return x, mask


def random_targets(batch: int, count: int, num_classes: int, seed: int = 1) -> list[dict]:
    """``count`` boxes per image: ``labels (T,)``, ``boxes (T, 4)`` cxcywh in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        cxcy = torch.rand(count, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(count, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (count,), generator=gen),
                        "boxes": torch.cat([cxcy, wh], 1)})
    return targets


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Warm each up, then run them in turn (ABBA order, so drift hits all alike), ``repeats`` times.

    Returns per name: ``median`` and ``min`` wall seconds, ``cpu`` median process CPU seconds
    (a check on a shared machine: CPU time hardly grows when other work takes the cores).
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            c, t = time.process_time(), time.perf_counter()
            runs[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: {"median": statistics.median(wall[k]), "min": min(wall[k]), "cpu": statistics.median(cpu[k]),
                "runs": [round(v, 4) for v in wall[k]]} for k in runs}


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls, convolutions, attention: what FlopCounterMode counts).

    Run with autograd on: FlopCounterMode's module tracker fails on parameters passed as
    arguments under no_grad / inference_mode. Only what ``fn`` runs is counted.
    """
    with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """GFLOP/s of an ``n x n`` matrix product: the best of ``repeats`` (the peak) and the median."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    times = alternate({"mm": lambda: torch.mm(a, b)}, max(repeats, 5), 2)["mm"]
    flops = 2.0 * n ** 3
    return {"n": n, "peak_gflops": flops / times["min"] / 1e9, "median_gflops": flops / times["median"] / 1e9}


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def conv_peak(dtype: torch.dtype, shape: tuple[int, int, int], repeats: int) -> dict:
    """GFLOP/s of a 3x3 convolution, ``C -> C`` channels on a ``C x H x W`` channels-last map
    (a ResNet stage's convolution), as for :func:`matmul_peak`."""
    c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        times = alternate({"conv": lambda: torch.nn.functional.conv2d(x, weight, padding=1)}, max(repeats, 5), 2)["conv"]
    flops = 2.0 * c * c * 9 * h * w
    return {"shape": shape, "peak_gflops": flops / times["min"] / 1e9, "median_gflops": flops / times["median"] / 1e9}


def section_peak(size: dict, results: dict) -> None:
    """The machine's rates: matrix products (fp32 and bf16 set the "of peak" columns) and, to show
    whether half precision can pay off here, fp16 products and 3x3 convolutions in all three."""
    for name, dtype in DTYPES.items():
        results["peak"][name] = matmul_peak(dtype, size["peak_n"], size["repeats"])
        r = results["peak"][name]
        print(f"matmul {name} {r['n']}x{r['n']}: peak {r['peak_gflops']:.0f} GFLOP/s (median {r['median_gflops']:.0f})")
    results["conv_peak"] = {}
    for name, dtype in DTYPES.items():
        r = results["conv_peak"][name] = conv_peak(dtype, size["conv"], size["repeats"])
        c, h, w = r["shape"]
        print(f"conv 3x3 {name} {c}->{c} on {h}x{w}: peak {r['peak_gflops']:.0f} GFLOP/s "
              f"(median {r['median_gflops']:.0f})")


def section_inference(folder: Path, size: dict, results: dict, ablation: bool) -> None:
    """Batch 1 at ``size['infer']``: exact fp32 and fast bf16 detrkit against the peer in fp32."""
    peer, ours, fast = load_peer(folder), load_ours(folder), load_ours(folder, "bf16")
    h, w = size["infer"]
    x, mask = padded_batch([(h, w)])
    pixel_mask = (~mask).long()  # the peer's mask: 1 = real pixel
    runs = {
        "peer fp32": lambda: peer(pixel_values=x, pixel_mask=pixel_mask),
        "detrkit fp32": lambda: ours((x, mask)),
        "detrkit bf16": lambda: fast((x, mask)),
    }
    if ablation:  # the exact-mode speed switches off, one and both
        plain = {}
        for name, fold, cl in (("no BN folding", False, True), ("no channels-last", True, False),
                               ("neither", False, False)):
            m = load_ours(folder)
            m.backbone.fold, m.backbone.channels_last = fold, cl
            plain[name] = m
        for name, m in plain.items():
            runs[f"detrkit fp32, {name}"] = (lambda m=m: m((x, mask)))
    with torch.inference_mode():
        ref, out, out_fast = runs["peer fp32"](), ours((x, mask)), fast((x, mask))
        exact_diff = max(float((ref.logits - out["pred_logits"]).abs().max()),
                         float((ref.pred_boxes - out["pred_boxes"]).abs().max()))
        fast_diff = float((out_fast["pred_boxes"] - out["pred_boxes"]).abs().max())
        if exact_diff > 1e-3:
            raise SystemExit(f"the two models disagree (max |diff| {exact_diff:.2e}): not the same weights")
        timed = alternate(runs, size["repeats"], size["warmup"])
    flops = {k: count_flops(fn) for k, fn in runs.items() if not k.startswith("detrkit fp32,")}
    peer_t = timed["peer fp32"]["median"]
    results["inference"] = {"image": [h, w], "max_abs_diff_vs_peer": exact_diff, "bf16_max_box_diff": fast_diff,
                            "flops": flops, "times": timed}
    print(f"\ninference, batch 1, {h}x{w} (outputs agree with the peer to {exact_diff:.1e}; bf16 boxes to {fast_diff:.1e})")
    _table(results, timed, peer_t, flops, precision_of=lambda k: "bf16" if "bf16" in k else "fp32",
           targets={"detrkit fp32": "0.90", "detrkit bf16": "0.50"})


def _table(results: dict, timed: dict, peer_t: float, flops: dict, precision_of, targets: dict) -> None:
    print(f"  {'case':<36} {'median s':>9} {'cpu s':>7} {'x peer':>7} {'target':>7} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'of peak':>8}")
    for name, t in timed.items():
        ratio = t["median"] / peer_t
        line = f"  {name:<36} {t['median']:9.3f} {t['cpu']:7.2f} {ratio:7.2f} {targets.get(name, ''):>7}"
        if name in flops:
            gflops = flops[name] / t["median"] / 1e9
            peak = results["peak"].get(precision_of(name), {}).get("peak_gflops")
            line += f" {flops[name] / 1e9:7.1f} {gflops:8.0f}" + (f" {gflops / peak:8.0%}" if peak else "")
            t["gflops_per_s"] = gflops
            t["fraction_of_peak"] = gflops / peak if peak else None
        t["ratio_to_peer"] = ratio
        print(line)


def make_train_steps(folder: Path, size: dict, sides: tuple[str, ...] = ("peer", "detrkit")
                     ) -> dict[str, Callable[[], float]]:
    """One optimiser step of each side on the same batch: forward, loss, backward, clip 0.1, fused AdamW.

    detrkit's bf16 step runs the model under bfloat16 autocast and its matching and losses in
    float32, as ``detrkit train --precision bf16`` does; the peer computes its loss through its
    own ``labels`` argument (its matcher and criterion).
    """
    from detrkit import build_criterion
    from detrkit.config import LossConfig

    x, mask = padded_batch(size["train"])
    targets = random_targets(x.shape[0], TARGETS_PER_IMAGE, NUM_LABELS)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~mask).long()

    def optimizer(model):
        # Fused AdamW on both sides: what `detrkit train` uses (engine.make_optimizer) and the
        # transformers Trainer's default with torch >= 2.8.
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4,
                                 fused=True)

    steps = {}
    if "peer" in sides:
        peer = load_peer(folder).train()
        # Official DETR trains layer2-4 of the backbone only. The peer's code means to freeze the
        # stem and layer1 too, but with transformers 5.x's timm backbone nothing is frozen: freeze
        # them here, so that both sides train the same parameters.
        for name, p in peer.model.backbone.named_parameters():
            if not any(f"layer{i}." in name for i in (2, 3, 4)):
                p.requires_grad_(False)
        opt_peer = optimizer(peer)
        steps["peer fp32"] = lambda: step_peer()
    if "detrkit" in sides:
        ours = load_ours(folder).train()
        opt_ours = optimizer(ours)
        criterion = build_criterion(ours.num_classes, LossConfig(), num_aux=len(ours.transformer.decoder.layers) - 1)
        steps["detrkit fp32"] = lambda: step_ours(False)
        steps["detrkit bf16"] = lambda: step_ours(True)

    def step_peer() -> float:
        opt_peer.zero_grad(set_to_none=True)
        loss = peer(pixel_values=x, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 0.1)
        opt_peer.step()
        return loss.item()

    def step_ours(bf16: bool) -> float:
        opt_ours.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = ours((x, mask))
        loss = criterion(outputs, targets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.1)
        opt_ours.step()
        return loss.item()

    return steps


def section_train(folder: Path, size: dict, results: dict) -> None:
    steps = make_train_steps(folder, size)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    timed = alternate(steps, size["repeats"], size["warmup"])
    results["train"] = {"images": size["train"], "targets_per_image": TARGETS_PER_IMAGE, "flops": flops, "times": timed}
    sizes = " + ".join(f"{h}x{w}" for h, w in size["train"])
    print(f"\ntraining step, batch {len(size['train'])} ({sizes}, padded), {TARGETS_PER_IMAGE} targets per image")
    _table(results, timed, timed["peer fp32"]["median"], flops,
           precision_of=lambda k: "bf16" if "bf16" in k else "fp32", targets={"detrkit fp32": "0.90", "detrkit bf16": "0.60"})


def memory_child(side: str, folder: Path, size_name: str) -> dict:
    """In a fresh process: peak RSS of three training steps of one side (see the module docstring)."""
    import resource

    size = SIZES[size_name]
    step = make_train_steps(folder, size, sides=(side.split()[0],))[side]
    before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(3):
        step()
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": side, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "step_peak_mib": (peak - before) / 1024, "method": "VmHWM after clear_refs" if reset else "ru_maxrss"}


def _rss_kib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def section_memory(folder: Path, size_name: str, results: dict, malloc: str) -> None:
    """Each side in its own process, one after the other, under the same allocator settings."""
    rows = {}
    for side in ("peer fp32", "detrkit fp32", "detrkit bf16"):
        cmd = [sys.executable, __file__, "--memory-child", side, "--folder", str(folder), "--size", size_name,
               "--malloc", malloc]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"memory measurement of {side} failed:\n{out.stderr[-2000:]}")
        rows[side] = json.loads(out.stdout.strip().splitlines()[-1])
    results["memory"] = rows
    peer = rows["peer fp32"]["step_peak_mib"]
    print(f"\npeak memory of a training step (RSS of a fresh process, {rows['peer fp32']['method']})")
    print(f"  {'side':<14} {'before MiB':>10} {'peak MiB':>9} {'step MiB':>9} {'x peer':>7}")
    for side, r in rows.items():
        print(f"  {side:<14} {r['rss_before_mib']:10.0f} {r['peak_mib']:9.0f} {r['step_peak_mib']:9.0f} "
              f"{r['step_peak_mib'] / peer:7.2f}")


def section_matcher(size: dict, results: dict) -> None:
    from detrkit import HungarianMatcher
    from detrkit.matcher import full_matrix_match

    b, q, t = size["matcher"]
    gen = torch.Generator().manual_seed(2)
    outputs = {"pred_logits": torch.randn(b, q, NUM_LABELS + 1, generator=gen),
               "pred_boxes": torch.rand(b, q, 4, generator=gen) * 0.5 + 0.1}
    targets = random_targets(b, t, NUM_LABELS, seed=3)
    matcher = HungarianMatcher()
    ours, ref = matcher(outputs, targets), full_matrix_match(matcher, outputs, targets)
    same = all(torch.equal(a, c) and torch.equal(bb, d) for (a, bb), (c, d) in zip(ours, ref))
    if not same:
        raise SystemExit("the block matcher and the full-matrix reference disagree")
    timed = alternate({"full matrix (official)": lambda: full_matrix_match(matcher, outputs, targets),
                       "per-image blocks (detrkit)": lambda: matcher(outputs, targets)},
                      max(size["repeats"], 7) * 3, size["warmup"] + 2)
    ratio = timed["full matrix (official)"]["median"] / timed["per-image blocks (detrkit)"]["median"]
    results["matcher"] = {"batch": b, "queries": q, "targets": t, "same_assignments": same, "times": timed,
                          "speedup": ratio}
    print(f"\nmatcher, batch {b}, {q} queries, {t} targets per image (same assignments: {same})")
    for name, r in timed.items():
        print(f"  {name:<28} {r['median'] * 1e3:8.2f} ms  (min {r['min'] * 1e3:.2f})")
    print(f"  speed-up {ratio:.1f}x (target >= 5x)")


def section_optimizer(folder: Path, size: dict, results: dict) -> None:
    """One AdamW step over a model's trainable parameters: detrkit's (fused) against PyTorch's
    default on this device (on CPUs a Python loop over the tensors) and ``foreach=True``; for
    the benchmark's model and for the ``detr_r18_fast`` preset (``make demo``'s)."""
    from detrkit import build_model, preset
    from detrkit.config import TrainConfig
    from detrkit.engine import make_optimizer

    cfg = TrainConfig()
    results["optimizer"] = {}
    for name, model in (("benchmark model", load_ours(folder)), ("detr_r18_fast", build_model(preset("detr_r18_fast")))):
        params = [p for p in model.train().parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(4)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        optimizers = {"PyTorch default": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      "foreach": torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True),
                      "detrkit (fused)": make_optimizer(model, cfg)}
        timed = alternate({k: opt.step for k, opt in optimizers.items()}, max(size["repeats"], 7), size["warmup"] + 1)
        base = timed["PyTorch default"]["median"]
        count = sum(p.numel() for p in params)
        results["optimizer"][name] = {"parameters": count, "times": timed,
                                      "ratio_to_default": {k: t["median"] / base for k, t in timed.items()}}
        print(f"\nAdamW step, {name}, {count / 1e6:.1f} M trainable parameters")
        for k, r in timed.items():
            print(f"  {k:<28} {r['median'] * 1e3:8.2f} ms  x default {r['median'] / base:.2f}")


def section_dropout(size: dict, results: dict) -> None:
    """Dropout 0.1 on the attention weights of one encoder layer (``size['attention']`` =
    batch, heads, tokens, head dim; the full size is the R50 at 576 px, batch 2): PyTorch's
    ``F.dropout`` against detrkit's mask, and attention with dropout, SDPA's against detrkit's
    written-out product, beside SDPA without dropout."""
    import torch.nn.functional as F

    from detrkit.model.dropout import dropout
    from detrkit.model.transformer import attention_weights

    b, h, n, d = size["attention"]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    weights = attention_weights(q, k, None)  # (B, h, N, N)
    timed = alternate({
        "F.dropout (PyTorch)": lambda: F.dropout(weights, 0.1, True),
        "dropout (detrkit)": lambda: dropout(weights, 0.1),
        "SDPA, no dropout": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA, dropout 0.1": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
        "written out, detrkit dropout 0.1": lambda: dropout(attention_weights(q, k, None), 0.1) @ v,
    }, max(size["repeats"], 7) * 3, size["warmup"] + 2)
    results["dropout"] = {"elements": weights.numel(), "times": timed}
    print(f"\ndropout 0.1 on {weights.numel() / 1e6:.1f} M attention weights ({b}x{h}x{n}x{n}), and attention with it")
    for name, r in timed.items():
        print(f"  {name:<34} {r['median'] * 1e3:8.2f} ms  (min {r['min'] * 1e3:.2f})")


def top_class_agreement(ours, fast, batches) -> tuple[int, int]:
    """Over every query that scores > 0.5 in fp32: how many have the same top class in bf16.

    Returns ``(agreeing, total)``. Scores are softmax without "no object" (DETR) or sigmoid
    (two-stage models), as postprocessing reads them. Each fp32 query is compared with the bf16
    query whose box is nearest (L1): a two-stage model's query slots are its encoder's
    best-scoring tokens in rank order, and bf16 rounding can swap two near-equal ranks, so the
    same slot may hold another object; DETR's learned slots pair with themselves.
    """
    def scores(out):
        return out["pred_logits"].sigmoid() if ours.sigmoid_class else out["pred_logits"].softmax(-1)[..., :-1]

    agree = total = 0
    with torch.inference_mode():
        for batch in batches:
            a, b = ours(batch), fast(batch)
            score, label = scores(a).max(-1)  # (B, Q)
            nearest = torch.cdist(a["pred_boxes"], b["pred_boxes"], p=1).argmin(-1)  # (B, Q): bf16 query per fp32 query
            label_fast = scores(b).argmax(-1).gather(1, nearest)  # (B, Q)
            keep = score > 0.5
            agree += int((label_fast[keep] == label[keep]).sum())
            total += int(keep.sum())
    return agree, total


def section_agreement(folder: Path, size: dict, results: dict, weights: str | None, images: str | None) -> None:
    """bf16 against fp32: the top class of every query scoring > 0.5 in fp32.

    On the R50: random weights give flat class scores, so the class head is sharpened (x20) to
    make many queries confident; that magnifies bf16's rounding in the logits, so the check is
    stricter, not looser, than on a trained head. With ``--agreement-weights`` and
    ``--agreement-images`` the same check runs on a trained checkpoint and real images too.
    """
    ours, fast = load_ours(folder), load_ours(folder, "bf16")
    for m in (ours, fast):
        with torch.no_grad():
            m.class_embed.weight.mul_(20)
            m.class_embed.bias.mul_(20)
    h, w = size["infer"]
    batches = [padded_batch([(h, w)], seed=10 + i) for i in range(3)]
    agree, total = top_class_agreement(ours, fast, batches)
    results["agreement"] = {"r50": {"queries_over_0.5": total, "same_top_class": agree}}
    print(f"\nbf16 vs fp32, top class of the queries scoring > 0.5 in fp32 (target >= 99 %)")
    print(f"  R50, sharpened head, 3 noise images at {h}x{w}: {agree}/{total} agree ({agree / max(total, 1):.1%})")
    if weights and images:
        from detrkit.data.batch import pad_images
        from detrkit.data.transforms import prepare_image, val_transforms

        ours, fast = load_ours(Path(weights)), load_ours(Path(weights), "bf16")
        transform = val_transforms(ours.inference["image_size"], ours.inference.get("max_size"))
        files = sorted(f for f in Path(images).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        tensors = [prepare_image(f, transform)[0] for f in files]
        batches = [pad_images(tensors[i:i + 8]) for i in range(0, len(tensors), 8)]
        agree, total = top_class_agreement(ours, fast, batches)
        results["agreement"]["checkpoint"] = {"weights": weights, "images": len(files), "queries_over_0.5": total,
                                              "same_top_class": agree}
        print(f"  {weights}, {len(files)} images: {agree}/{total} agree ({agree / max(total, 1):.1%})")


# ---------------------------------------------------------------------------------------------
def machine() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="size", const="quick", help="smaller images, 3 repeats")
    g.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                   help="a tiny model and 1 repeat: checks the harness's plumbing, measures nothing")
    g.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 7; --quick: 3)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--ablation", action="store_true", help="also time exact mode with each speed switch off")
    p.add_argument("--malloc", choices=["detrkit", "default"], default="detrkit",
                   help="glibc allocator settings for both sides: detrkit's (as the CLI applies them) or glibc's")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--agreement-weights", metavar="PATH", help="also check bf16 against fp32 on this checkpoint ...")
    p.add_argument("--agreement-images", metavar="DIR", help="... on the images in DIR")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.set_defaults(size="full")
    args = p.parse_args(argv)
    if args.malloc == "detrkit":
        from detrkit.allocator import tune_allocator

        tune_allocator()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.folder), args.size)))
        return {}
    size = dict(SIZES[args.size])
    if args.repeats:
        size["repeats"] = args.repeats
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    results: dict = {"machine": machine(), "size": args.size, "malloc": args.malloc, "peak": {},
                     "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    m = results["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads; Python {m['python']}, torch {m['torch']}, "
          f"transformers {m['transformers']}; allocator: {args.malloc}; median of {size['repeats']}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "detr"
        if {"inference", "train", "memory", "optimizer", "agreement"} & set(sections):
            save_peer(size["arch"], folder)
        if "peak" in sections:
            section_peak(size, results)
        if "inference" in sections:
            section_inference(folder, size, results, args.ablation)
        if "agreement" in sections:
            section_agreement(folder, size, results, args.agreement_weights, args.agreement_images)
        if "train" in sections:
            section_train(folder, size, results)
        if "memory" in sections:
            section_memory(folder, args.size, results, args.malloc)
        if "matcher" in sections:
            section_matcher(size, results)
        if "optimizer" in sections:
            section_optimizer(folder, size, results)
        if "dropout" in sections:
            section_dropout(size, results)
        if "rtdetr" in sections:
            from bench_rtdetr import section_rtdetr  # beside this file; imports this one's helpers

            section_rtdetr(Path(tmp) / "rtdetr", args.size, size["repeats"], size["warmup"], results)
    results["seconds"] = time.perf_counter() - t0
    print(f"\n({results['seconds']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"written: {args.json}")
    return results


if __name__ == "__main__":
    main()
