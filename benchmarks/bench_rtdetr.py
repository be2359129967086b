"""The RT-DETR section of benchmarks/bench.py (``--only rtdetr``): detrkit's rtdetr_r18 against
Hugging Face's ``RTDetrForObjectDetection``, side by side in one process, the same weights.

Both sides are RT-DETR-R18 in the configuration of the published ``PekingU/rtdetr_r18vd``
(80 classes, 300 queries, 3 decoder layers), built by Hugging Face from random weights (nothing
can be downloaded), saved once with ``save_pretrained`` and loaded by both. Hugging Face's own
initialisation makes every feature map nearly constant, so its weights are first redrawn at a
variance-preserving scale (:func:`redraw`): then the outputs compared before any timing mean
something, and the query selection, matching and losses see scores and boxes that vary as a
trained model's do.

* inference: batch 1 at 640 x 640 (the release's evaluation size), eval mode, fp32 on both sides
  (and detrkit's bf16 mode, for information);
* training step: batch 2 at 640 x 640 with 5 targets per image; forward with the training-time
  denoising queries (100, as both sides' defaults), the loss (Hugging Face's own, through its
  ``labels`` argument; detrkit's criterion with the ``rtdetr`` recipe's settings, which equal it
  term by term: tests/test_rtdetr_loss.py), backward, gradient clipping at 0.1 and one fused
  AdamW step (lr 1e-4, weight decay 1e-4: the release's) on each side.

Hugging Face takes pixels in [0, 1], detrkit ImageNet-normalised ones (its model maps them back):
each side gets its form of the same pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from bench import _table, alternate, count_flops, random_targets

RTDETR_SIZES = {  # image (H, W), training batch; the tiny setting checks the plumbing only
    "full": {"image": (640, 640), "batch": 2},
    "quick": {"image": (640, 640), "batch": 1},
    "tiny": {"image": (64, 64), "batch": 2},
}
TARGETS_PER_IMAGE = 5
NUM_LABELS = 80  # COCO, as PekingU/rtdetr_r18vd
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet: what detrkit's input is normalised with


def hf_config(arch: str):
    """``r18``: Hugging Face's RTDetrConfig as PekingU/rtdetr_r18vd; ``tiny``: a quarter-width one."""
    from transformers import RTDetrConfig

    if arch == "r18":
        backbone = dict(model_type="rt_detr_resnet", depths=[2, 2, 2, 2], layer_type="basic",
                        hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4])
        return RTDetrConfig(backbone_config=backbone, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
                            decoder_layers=3, num_labels=NUM_LABELS, use_pretrained_backbone=False)
    backbone = dict(model_type="rt_detr_resnet", depths=[1, 1, 1, 1], layer_type="basic",
                    hidden_sizes=[16, 32, 64, 128], embedding_size=16, out_indices=[2, 3, 4])
    return RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32,
                        encoder_ffn_dim=64, d_model=32, decoder_ffn_dim=64, encoder_attention_heads=4,
                        decoder_attention_heads=4, decoder_layers=2, num_queries=10, decoder_n_points=2,
                        hidden_expansion=0.5, num_labels=NUM_LABELS, decoder_in_channels=[32, 32, 32],
                        use_pretrained_backbone=False)


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int = 0) -> None:
    """Variance-preserving weights: convolution and linear weights ~ N(0, 1 / fan_in), biases 0 but
    the class heads' prior, BatchNorm near the identity (its statistics too)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=gen)
            if m.bias is not None:
                m.bias.zero_()
        if "BatchNorm" in type(m).__name__:
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    prior = -math.log(0.99 / 0.01)  # RT-DETR's class-head prior probability 0.01
    for name, p in model.named_parameters():
        if name.endswith(".bias") and ("enc_score_head" in name or "class_embed" in name):
            p.fill_(prior)


def save_peer(arch: str, folder: Path) -> None:
    from transformers import RTDetrForObjectDetection

    torch.manual_seed(0)
    model = RTDetrForObjectDetection(hf_config(arch))
    redraw(model)
    model.save_pretrained(folder)


def load_peer(folder: Path):
    from transformers import RTDetrForObjectDetection
    from transformers.utils import logging

    logging.disable_progress_bar()
    return RTDetrForObjectDetection.from_pretrained(folder).eval()


def pixels(batch: int, size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise pixels in [0, 1] for the peer, ``(B, 3, H, W)``, and their ImageNet-normalised copy for detrkit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *size, generator=gen)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return x, (x - mean) / std


def paired_difference(ours: dict, logits: torch.Tensor, boxes: torch.Tensor) -> float:
    """The largest difference between the two sides' outputs, each detrkit query paired with the
    peer query nearest to it (max norm over logits and boxes): the 300 queries are the best of
    thousands of encoder scores, and cells whose scores tie within rounding may take each other's
    slots on the two sides (tests/test_export.py explains why that changes nothing else)."""
    a = torch.cat([ours["pred_logits"], ours["pred_boxes"]], -1).double()  # (B, Q, K + 4)
    b = torch.cat([logits, boxes], -1).double()
    return float(torch.cdist(a, b, p=float("inf")).min(-1).values.max())


def section_rtdetr(folder: Path, size_name: str, repeats: int, warmup: int, results: dict) -> None:
    """Inference and a training step, each side's median over alternating runs, and the ratios."""
    from detrkit import load_model

    arch = "tiny" if size_name == "tiny" else "r18"
    size = RTDETR_SIZES[size_name]
    save_peer(arch, folder)
    results["rtdetr"] = {"arch": arch, "image": list(size["image"]), "batch": size["batch"]}

    peer, ours, fast = load_peer(folder), load_model(folder), load_model(folder, precision="bf16")
    x, x_norm = pixels(1, size["image"])
    runs = {"peer fp32": lambda: peer(pixel_values=x), "detrkit fp32": lambda: ours(x_norm),
            "detrkit bf16": lambda: fast(x_norm)}
    with torch.inference_mode():
        ref, out = runs["peer fp32"](), ours(x_norm)
        diff = paired_difference(out, ref.logits, ref.pred_boxes)
        if diff > 1e-3:
            raise SystemExit(f"RT-DETR: the two models disagree (max |diff| {diff:.2e}): not the same weights")
        timed = alternate(runs, repeats, warmup)
    flops = {k: count_flops(fn) for k, fn in runs.items()}
    results["rtdetr"]["inference"] = {"max_abs_diff_vs_peer": diff, "flops": flops, "times": timed}
    h, w = size["image"]
    print(f"\nRT-DETR-{arch.upper()} inference, batch 1, {h}x{w} (outputs agree with the peer to {diff:.1e})")
    _table(results, timed, timed["peer fp32"]["median"], flops,
           precision_of=lambda k: "bf16" if "bf16" in k else "fp32", targets={"detrkit fp32": "0.90"})

    steps = make_rtdetr_steps(folder, size)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    timed = alternate(steps, repeats, warmup)
    results["rtdetr"]["train"] = {"targets_per_image": TARGETS_PER_IMAGE, "flops": flops, "times": timed}
    print(f"\nRT-DETR-{arch.upper()} training step, batch {size['batch']} at {h}x{w}, {TARGETS_PER_IMAGE} targets "
          f"per image, 100 denoising queries")
    _table(results, timed, timed["peer fp32"]["median"], flops, precision_of=lambda k: "fp32",
           targets={"detrkit fp32": "0.90"})


def make_rtdetr_steps(folder: Path, size: dict) -> dict[str, Callable[[], float]]:
    """One optimiser step of each side on the same batch (see the module docstring)."""
    from detrkit import build_criterion, load_model
    from detrkit.aids import AidedModel
    from detrkit.config import LossConfig
    from detrkit.presets import recipe

    x, x_norm = pixels(size["batch"], size["image"], seed=1)
    targets = random_targets(size["batch"], TARGETS_PER_IMAGE, NUM_LABELS)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    peer = load_peer(folder).train()
    loss_cfg = LossConfig(**recipe("rtdetr")["loss"])
    model = load_model(folder).train()
    ours = AidedModel(model, loss_cfg)  # the model with its denoising queries, as `detrkit train` runs it
    criterion = build_criterion(model.num_classes, loss_cfg, num_aux=len(model.decoder.layers) - 1,
                                sigmoid_class=True)

    def optimizer(m):  # the same on both sides: fused AdamW, the release's lr and weight decay
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4,
                                 fused=True)

    opt_peer, opt_ours = optimizer(peer), optimizer(ours)

    def step_peer() -> float:
        opt_peer.zero_grad(set_to_none=True)
        loss = peer(pixel_values=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 0.1)
        opt_peer.step()
        return loss.item()

    def step_ours() -> float:
        opt_ours.zero_grad(set_to_none=True)
        loss = criterion(ours(x_norm, targets), targets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.1)
        opt_ours.step()
        return loss.item()

    return {"peer fp32": step_peer, "detrkit fp32": step_ours}
