"""The DETR transformer: an encoder over image features and a decoder over object queries.

Everything is batch-first: sequences are ``(B, L, D)``. Where positional information enters
is the heart of DETR and differs from the original "Attention is all you need":

* the image positional encoding ``pos`` is added to the queries and keys of every encoder
  self-attention and to the keys of every decoder cross-attention, never to the values;
* the learned object-query embedding ``query_pos`` is added to the queries and keys of every
  decoder self-attention and to the queries of every cross-attention;
* the decoder's content ``tgt`` (the "slots") starts at zero, so the queries differ only
  through ``query_pos``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.model.dropout import Dropout, draws_own_mask, dropout


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with the parameter layout of ``nn.MultiheadAttention``.

    The q, k and v projections are packed into ``in_proj_weight (3D, D)`` / ``in_proj_bias (3D,)``
    (rows q, then k, then v), the output projection is ``out_proj``: official checkpoints load
    as they are. The product itself is :func:`torch.nn.functional.scaled_dot_product_attention`,
    which never materialises the attention weights, except when training with dropout on a CPU
    (written out there, for a cheaper dropout mask: :mod:`detrkit.model.dropout`);
    :func:`capture_attention` makes the module also compute them, beside the unchanged product.
    """

    # A list while capture_attention is active: each call appends its weights (B, h, Lq, Lk).
    store: Optional[list] = None

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nheads = nheads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        # The initialisation of nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """``query (B, Lq, D)``, ``key``/``value (B, Lk, D)`` -> ``(B, Lq, D)``.

        ``key_padding_mask (B, Lk)`` and ``attn_mask (Lq, Lk)`` are bool with True = may NOT
        attend (the ``nn.MultiheadAttention`` convention).
        """
        return self.attend(*self.project(query, key, value), key_padding_mask, attn_mask)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The per-head queries, keys and values: ``q (B, h, Lq, D/h)``, ``k``, ``v (B, h, Lk, D/h)``."""
        b, lq, d = query.shape
        lk = key.shape[1]
        h = self.nheads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key:  # self-attention: q and k from the same input, one (2D, D) product
            q, k = F.linear(query, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        q = q.view(b, lq, h, d // h).transpose(1, 2)  # (B, h, Lq, D/h)
        k = k.view(b, lk, h, d // h).transpose(1, 2)  # (B, h, Lk, D/h)
        v = F.linear(value, w_v, b_v).view(b, lk, h, d // h).transpose(1, 2)  # (B, h, Lk, D/h)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
               attn_mask: Optional[Tensor] = None) -> Tensor:
        """Attention of per-head ``q (B, h, Lq, d)`` over ``k (B, h, Lk, d)``, ``v (B, h, Lk, D/h)``, scaled by
        ``1/sqrt(d)``, heads merged and through ``out_proj``: ``(B, Lq, D)``. Masks as :meth:`forward`."""
        b, h, lq = q.shape[:3]
        allowed = None  # SDPA takes a bool mask with True = may attend
        if key_padding_mask is not None:
            allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        if attn_mask is not None:
            allowed = ~attn_mask if allowed is None else allowed & ~attn_mask
        p = self.dropout if self.training else 0.0
        if p > 0.0 and draws_own_mask(q.device):
            # SDPA's own attention dropout on a CPU draws PyTorch's mask and costs several times
            # the attention (bench.py --only dropout): the same product written out, with ours.
            out = dropout(attention_weights(q, k, allowed), p) @ v  # (B, h, Lq, D/h)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, h, Lq, D/h)
        if self.store is not None:
            with torch.no_grad():
                self.store.append(attention_weights(q.float(), k.float(), allowed))
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, h * v.shape[-1]))


def attention_weights(q: Tensor, k: Tensor, allowed: Optional[Tensor]) -> Tensor:
    """``softmax(q k^T / sqrt(d))`` over the allowed keys: ``(B, h, Lq, Lk)``.

    The weights scaled_dot_product_attention applies to the values (before attention dropout),
    from the same projected ``q (B, h, Lq, d)`` and ``k (B, h, Lk, d)``; keys that may not be
    attended to get exactly 0.
    """
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, h, Lq, Lk)
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))  # in place: the product's backward needs q and k only
    return scores.softmax(-1)


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Record the attention weights of every :class:`MultiheadAttention` in ``model``.

    Yields a dict from module name (``"transformer.encoder.layers.0.self_attn"``,
    ``"transformer.decoder.layers.5.multihead_attn"``, ...) to the list of its weights, one
    ``(B, heads, Lq, Lk)`` float32 tensor per call, in call order; each row sums to 1 over the
    keys and padding keys get 0. The model's own computation is untouched (the outputs are
    bit-identical with and without capture): the weights are an extra softmax of the same
    ``q``, ``k``. Encoder self-attention is ``(B, h, HW, HW)``, decoder cross-attention
    ``(B, h, Q, HW)`` with ``HW`` the flattened feature map (row-major, as ``flatten(2)``).
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiheadAttention)]
    maps: dict[str, list[Tensor]] = {}
    for name, m in modules:
        m.store = maps.setdefault(name, [])
    try:
        yield maps
    finally:
        for _, m in modules:
            m.store = None


class _Sublayers(nn.Module):
    """What encoder and decoder layers share: the feed-forward network, and the residual
    connection around each sub-layer with its LayerNorm after it (post-norm, official) or
    before it (pre-norm)."""

    pre_norm: bool
    activation = staticmethod(F.relu)  # of the feed-forward network (the paper's); RT-DETR's AIFI: GELU

    def residual(self, x: Tensor, sublayer, norm: nn.LayerNorm, drop: nn.Module) -> Tensor:
        """``norm(x + drop(sublayer(x)))``, or ``x + drop(sublayer(norm(x)))`` with pre-norm."""
        if self.pre_norm:
            return x + drop(sublayer(norm(x)))
        return norm(x + drop(sublayer(x)))

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(_Sublayers):
    """Self-attention + FFN, each with a residual connection and LayerNorm (after, or before).
    RT-DETR's AIFI is this layer with a GELU feed-forward network (``activation="gelu"``)."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool,
                 activation: str = "relu") -> None:
        super().__init__()
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)  # inside the FFN
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        """``src``, ``pos (B, HW, D)`` (or ``(1, HW, D)``), ``key_padding_mask (B, HW)`` or None ->
        ``(B, HW, D)``."""
        def self_attention(x: Tensor) -> Tensor:
            q = k = x + pos  # position on queries and keys, not values
            return self.self_attn(q, k, x, key_padding_mask=key_padding_mask)

        src = self.residual(src, self_attention, self.norm1, self.dropout1)
        return self.residual(src, self.feed_forward, self.norm2, self.dropout2)


class DecoderLayer(_Sublayers):
    """Self-attention among queries, cross-attention to the image, FFN; residual + LayerNorm each."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Optional[Tensor], self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """``tgt``, ``query_pos (B, Q, D)``; ``memory``, ``pos (B, HW, D)`` -> ``(B, Q, D)``.

        ``self_attn_mask (Q, Q)`` (True = blocked) is for training-time query groups; the
        plain model passes None.
        """
        def cross_attention(x: Tensor) -> Tensor:
            return self.multihead_attn(x + query_pos, memory + pos, memory, key_padding_mask=memory_key_padding_mask)

        tgt = self.self_attention(tgt, query_pos, self_attn_mask)
        tgt = self.residual(tgt, cross_attention, self.norm2, self.dropout2)
        return self.residual(tgt, self.feed_forward, self.norm3, self.dropout3)

    def self_attention(self, tgt: Tensor, query_pos: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """The first sub-layer, with its residual connection: the queries attend to each other."""
        def attend(x: Tensor) -> Tensor:
            q = k = x + query_pos
            return self.self_attn(q, k, x, attn_mask=attn_mask)

        return self.residual(tgt, attend, self.norm1, self.dropout1)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: Optional[nn.LayerNorm]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm  # only with pre-norm: the last layer's output is otherwise un-normalised

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return self.norm(src) if self.norm is not None else src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Optional[Tensor], self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """Returns every layer's output, each through the shared final LayerNorm: ``(L, B, Q, D)``."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask, self_attn_mask)
            outputs.append(self.norm(tgt))  # the heads see normalised outputs at every layer
        return torch.stack(outputs)


class Transformer(nn.Module):
    """Encoder + decoder with DETR's positional scheme (see the module docstring)."""

    def __init__(self, d_model: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False,
                 decoder_layer: type[DecoderLayer] = DecoderLayer) -> None:
        """``decoder_layer``: the class of the decoder's layers, built with the same arguments as
        :class:`DecoderLayer` (a variant's own layer, composed of the blocks here, may take its place)."""
        super().__init__()
        enc = EncoderLayer(d_model, nheads, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(enc, enc_layers, nn.LayerNorm(d_model) if pre_norm else None)
        dec = decoder_layer(d_model, nheads, dim_feedforward, dropout, pre_norm)
        self.decoder = Decoder(dec, dec_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nheads = nheads
        # Official initialisation: Xavier-uniform on every matrix of the transformer.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor,
                self_attn_mask: Optional[Tensor] = None, tgt: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Run encoder and decoder.

        Args:
            src: projected features ``(B, D, H, W)``.
            mask: ``(B, H, W)`` bool, True = padding (never attended to).
            query_embed: the object-query embedding ``(Q, D)``, or ``(B, Q, D)`` when training-only
                queries are appended per image (:mod:`detrkit.aids`).
            pos: the positional encoding ``(B, D, H, W)``.
            self_attn_mask: ``(Q, Q)`` bool, True = query may not attend (training-only queries).
            tgt: the decoder's initial content ``(B, Q, D)``; None = zeros, the plain DETR.

        Returns:
            ``hs (L, B, Q, D)``: every decoder layer's output; ``memory (B, HW, D)``.
        """
        memory, pos, mask = self.encode(src, mask, pos)
        query_pos = query_embed.expand(src.shape[0], -1, -1)  # (B, Q, D)
        if tgt is None:
            tgt = torch.zeros_like(query_pos)  # the slots start empty
        hs = self.decoder(tgt.to(query_pos.dtype), memory, pos.to(src.dtype), query_pos, mask, self_attn_mask)
        return hs, memory

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder on a feature map: ``src``, ``pos (B, D, H, W)``, ``mask (B, H, W)`` ->
        ``memory (B, HW, D)`` and the flattened ``pos (B, HW, D)`` (in its own dtype: under
        autocast the encoder gets it in ``src``'s) and ``mask (B, HW)``."""
        src = src.flatten(2).transpose(1, 2)  # (B, HW, D)
        pos = pos.flatten(2).transpose(1, 2)  # (B, HW, D)
        mask = mask.flatten(1)  # (B, HW)
        return self.encoder(src, pos.to(src.dtype), mask), pos, mask
