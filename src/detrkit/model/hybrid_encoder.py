"""RT-DETR's hybrid encoder (Zhao et al. 2024, "DETRs Beat YOLOs on Real-time Object Detection").

DETR's encoder runs self-attention over every cell of one feature map: quadratic in the cell
count, which is why it stays at stride 32 (or 16). Deformable DETR's encoder attends across all
levels, and costs most of its detector's time. RT-DETR splits the work:

* **AIFI** (attention-based intra-scale feature interaction): a plain transformer encoder layer,
  but only on the stride-32 map, the one with few cells and the most semantic content;
* **CCFM** (CNN-based cross-scale feature fusion): a YOLO-style neck. Top-down (FPN), each
  coarser map is reduced by a 1x1 convolution, upsampled 2x and fused with the next finer one;
  bottom-up (PAN), each finer result is downsampled by a stride-2 3x3 convolution and fused with
  the next coarser one. A fusion is a CSP block (:class:`CSPRepLayer`) of RepVGG blocks.

Everything is 256 channels wide (384 in R101) after a 1x1 projection of each backbone map.
Convolutions carry BatchNorm (trained with batch statistics); in eval mode each BatchNorm is
folded into its convolution and each RepVGG block's two branches become one 3x3 convolution,
which changes nothing but the speed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.model.backbone import ACTIVATIONS, ConvNorm
from detrkit.model.transformer import EncoderLayer


def sincos_position_2d(h: int, w: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """RT-DETR's fixed 2-D position embedding of an ``h x w`` map -> ``(1, h*w, dim)`` in ``dtype``.

    Cells are in row-major order (as ``flatten(2)``). Each quarter of the channels holds one
    function of one coordinate: ``[sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)]``, with
    ``w_k = temperature ** (-k / (dim/4))`` for ``k = 0 .. dim/4 - 1`` and ``x, y`` the cell's
    column and row index (not normalised: unlike DETR's, this encoding does not rescale with
    the image size). Hugging Face's ``RTDetrSinePositionEmbedding`` order; RT-DETR's release
    names the halves the other way round, which agrees on square maps only.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / temperature ** (torch.arange(quarter, dtype=dtype, device=device) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                            torch.arange(w, dtype=dtype, device=device), indexing="ij")
    y = ys.reshape(-1, 1) * freq  # (hw, dim/4)
    x = xs.reshape(-1, 1) * freq
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)[None]  # (1, hw, dim)


class RepVggBlock(nn.Module):
    """``act(bn1(conv3x3(x)) + bn2(conv1x1(x)))`` (RepVGG, Ding et al. 2021).

    With fixed BatchNorm statistics both branches are affine convolutions, so their sum is one
    3x3 convolution: the 1x1 kernel added to the 3x3 kernel's centre (RepVGG's
    re-parameterisation). Eval mode runs that single convolution.
    """

    def __init__(self, channels: int, act: str = "silu") -> None:
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, 3)
        self.conv2 = ConvNorm(channels, channels, 1)
        self.act = act
        centre = torch.zeros(1, 1, 3, 3)
        centre[..., 1, 1] = 1.0
        self.register_buffer("centre", centre, persistent=False)  # a 1x1 kernel as a 3x3 one: w1 * centre
        self._merged: tuple = ()  # (folded 3x3 weight, folded 1x1 weight, merged weight, bias); never saved

    def forward(self, x: Tensor) -> Tensor:
        if self.conv1.folds() and self.conv2.folds():
            weight, bias = self.merged(x)
            y = F.conv2d(x, weight, bias, padding=1)  # (B, C, H, W)
        else:
            y = self.conv1(x) + self.conv2(x)
        return ACTIVATIONS[self.act](y)

    def merged(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two folded branches as one 3x3 (weight, bias): the 1x1 kernel added to the centre.

        Recomputed while gradients flow to the weights; otherwise cached for as long as the
        branches' folded weights are (the same tensors), so that it is a constant when traced.
        """
        w3, b3 = self.conv1.folded(x)
        w1, b1 = self.conv2.folded(x)
        if w3.requires_grad or w1.requires_grad:
            return w3 + w1 * self.centre.to(w1.dtype), b3 + b1
        if not self._merged or self._merged[0] is not w3 or self._merged[1] is not w1:
            layout = torch.channels_last if w3.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            with torch.inference_mode(False), torch.no_grad():
                weight = (w3 + w1 * self.centre.to(w1.dtype)).contiguous(memory_format=layout)
                self._merged = (w3, w1, weight, b3 + b1)
        return self._merged[2], self._merged[3]


class CSPRepLayer(nn.Module):
    """Cross-stage-partial fusion block: two 1x1 branches of ``expansion * out`` channels, one
    through ``blocks`` RepVGG blocks, summed, then a 1x1 convolution to ``out`` channels (none
    when the branches are already that wide)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int = 3, expansion: float = 1.0,
                 act: str = "silu") -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNorm(in_channels, hidden, 1, act=act)
        self.conv2 = ConvNorm(in_channels, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(*(RepVggBlock(hidden, act) for _ in range(blocks)))
        self.conv3 = ConvNorm(hidden, out_channels, 1, act=act) if hidden != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.bottlenecks(self.conv1(x)) + self.conv2(x)
        return self.conv3(y) if self.conv3 is not None else y


class HybridEncoder(nn.Module):
    """Backbone maps (strides 8, 16, 32) -> fused maps at the same strides, ``hidden_dim`` wide.

    Parameter names follow RT-DETR's release and Hugging Face: ``input_proj``, ``aifi`` (one
    stack of layers per encoded level), ``lateral_convs`` and ``fpn_blocks`` (top-down),
    ``downsample_convs`` and ``pan_blocks`` (bottom-up).
    """

    def __init__(self, in_channels: Sequence[int], *, hidden_dim: int = 256, nheads: int = 8,
                 dim_feedforward: int = 1024, enc_layers: int = 1, encode_levels: Sequence[int] = (2,),
                 dropout: float = 0.0, pre_norm: bool = False, expansion: float = 1.0, csp_blocks: int = 3,
                 pe_temperature: float = 10000.0, act: str = "silu", enc_act: str = "gelu") -> None:
        super().__init__()
        n = len(in_channels)
        self.hidden_dim = hidden_dim
        self.encode_levels = tuple(encode_levels)
        self.pe_temperature = pe_temperature
        self.input_proj = nn.ModuleList(ConvNorm(c, hidden_dim, 1) for c in in_channels)
        self.aifi = nn.ModuleList(
            nn.ModuleList(EncoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm, enc_act)
                          for _ in range(enc_layers))
            for _ in self.encode_levels
        )
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1, act=act) for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, csp_blocks, expansion, act)
                                        for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, csp_blocks, expansion, act)
                                        for _ in range(n - 1))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``features[l] (B, C_l, H_l, W_l)``, finest first, each coarser one exactly half the size
        of the one before -> ``[(B, hidden_dim, H_l, W_l)]``, the same strides."""
        maps = [proj(f) for proj, f in zip(self.input_proj, features)]
        for level, layers in zip(self.encode_levels, self.aifi):
            maps[level] = self._encode(maps[level], layers)
        # Top-down: inner[0] is the current coarsest result; each step prepends a finer one.
        inner = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            coarse = lateral(inner[0])
            inner[0] = coarse  # the reduced map is what the bottom-up path fuses with
            up = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
            inner.insert(0, block(torch.cat([up, maps[-2 - i]], dim=1)))
        # Bottom-up: from the finest result, each step appends a coarser one.
        outs = [inner[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outs.append(block(torch.cat([down(outs[-1]), inner[i + 1]], dim=1)))
        return outs

    def _encode(self, x: Tensor, layers: nn.ModuleList) -> Tensor:
        """AIFI on one map: ``(B, D, H, W)`` -> ``(B, D, H, W)`` (channels-last memory)."""
        if len(layers) == 0:
            return x
        b, d, h, w = x.shape
        # (B, D, H, W) -> (B, HW, D): free when x is channels-last (its memory is already B, H, W, D).
        src = x.permute(0, 2, 3, 1).reshape(b, h * w, d)
        # float32 (float64 for a float64 model), cast to the activations' dtype (bfloat16 under autocast)
        pos = sincos_position_2d(h, w, d, self.pe_temperature, x.device,
                                 torch.promote_types(src.dtype, torch.float32)).to(src.dtype)
        for layer in layers:
            src = layer(src, pos, None)  # AIFI: one map, no padding to mask
        return src.view(b, h, w, d).permute(0, 3, 1, 2)  # channels-last view, no copy
