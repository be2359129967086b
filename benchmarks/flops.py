"""FLOPs of one forward pass, counted the same way for every model of the benchmarks.

torch.utils.flop_counter counts convolutions, matrix products and attention at 2 FLOPs per
multiply-add (the convention of the published GFLOPs of YOLO and RT-DETR); element-wise work,
normalisation and grid_sample are not counted. Its attention formulas are registered for the GPU
kernels only; the CPU kernel does the same arithmetic, so it is registered here too.

Only torch is imported: benchmarks/peers_ultralytics.py runs in a venv without detrkit.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_sdpa_cpu_flops._get_raw = _sdpa_cpu_backward_flops._get_raw = True  # they take tensors, not shapes
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def forward_gflops(model: torch.nn.Module, *inputs) -> float:
    """GFLOPs of ``model(*inputs)`` in eval mode.

    ``nn.MultiheadAttention``'s inference fast path is switched off while counting: its fused
    kernel is unknown to the counter, and its FLOPs would go uncounted.
    """
    was_training, fast_path = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / 1e9
