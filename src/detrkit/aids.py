"""Training-only aids for fast convergence: query groups, denoising queries, hybrid queries.

One-to-one matching gives each image only as many positive queries as it has objects, and
early on the matching flips from step to step. The aids add training-only decoder queries
after the model's own, with an attention mask that keeps the model's own queries from
seeing them, so the model's outputs, its parameters and its inference graph stay exactly
those of the plain preset:

* **Query groups** (Group DETR, Chen et al. 2022): ``G - 1`` more sets of learned queries,
  each matched one-to-one to the targets on its own: G times the positives per image. The
  groups cannot attend to each other. Plain DETR only (its queries are learned).
* **Denoising queries** (DN-DETR, Li et al. 2022; contrastive form of DINO, Zhang et al. 2022):
  copies of the ground-truth boxes, jittered, with (sometimes flipped) label embeddings as
  content. A *positive* copy (corners moved by less than ``box_noise`` times half the box
  size) must reconstruct its object; a *negative* copy (moved by one to two times that) must
  predict "no object". Their targets are known, so they take no part in the Hungarian
  matching: a stable training signal from the first step.
* **Hybrid queries** (H-DETR, Jia et al. 2023): two-stage models only. The M encoder tokens
  ranked after the model's own Q queries also go through the decoder, as a separate branch
  matched one-to-many (every target repeated k times): many more positives per object. They
  have no parameters of their own; the model chooses them (``ExtraQueries.hybrid``).

The extra parameters (group queries, label embedding, box-to-position head) live here, in
:class:`AidedModel`, not in the model: checkpoints of the model never contain them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from detrkit.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from detrkit.config import LossConfig, denoising_groups
from detrkit.model.detr import DETR
from detrkit.model.heads import MLP, ExtraQueries, Images
from detrkit.model.position import box_sine_embedding


class QueryGroups(nn.Module):
    """``groups - 1`` extra sets of the model's ``Q`` learned queries (Group DETR)."""

    def __init__(self, model: DETR, groups: int) -> None:
        super().__init__()
        if model.sigmoid_class:
            raise ValueError("query groups need learned queries (plain DETR); two-stage models choose theirs "
                             "from the encoder (use loss.encoder_repeats for one-to-many training there)")
        self.groups = groups
        self.num_queries = model.num_queries
        self.query_embed = nn.Embedding((groups - 1) * model.num_queries, model.query_embed.embedding_dim)

    def queries(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """``content (B, E, D)`` zeros, ``position (B, E, D)`` and the ``(Q+E, Q+E)`` block mask, E = (G-1)Q."""
        pos = self.query_embed.weight.expand(batch, -1, -1)
        group = torch.arange(self.groups * self.num_queries, device=pos.device) // self.num_queries  # (Q+E,)
        mask = group[:, None] != group[None, :]  # True = other group: blocked
        return torch.zeros_like(pos), pos, mask

    def split(self, extra_outputs: dict) -> list[dict]:
        """The extra outputs ``(B, E, .)`` -> one output dict per extra group ``(B, Q, .)``."""
        q = self.num_queries
        return [_slice(extra_outputs, slice(g * q, (g + 1) * q)) for g in range(self.groups - 1)]


class Denoising(nn.Module):
    """Contrastive denoising queries (DINO): ``groups`` x (positive + negative) noised ground truth.

    The group count is ``groups`` when set, else ``queries // T`` with T the most targets of an
    image in the batch (a budget of queries in all, RT-DETR's rule; :func:`~detrkit.config.denoising_groups`).
    """

    def __init__(self, model: DETR, groups: int, box_noise: float, label_noise: float, queries: int = 0) -> None:
        super().__init__()
        d = model.d_model
        self.groups = groups
        self.queries_budget = queries
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.num_classes = model.num_classes
        self.model_queries = model.num_queries
        self.label_embed = nn.Embedding(model.num_classes, d)  # the content of a denoising query
        # Two-stage models turn a reference box into a query position themselves; plain DETR has
        # learned positions only, so a small training-only head maps the noised box to one.
        self.box_position = None if model.sigmoid_class else MLP(4 * (d // 2), d, d, 2)

    def queries(self, targets: list[dict]) -> Optional[tuple[Tensor, Tensor, Tensor, dict]]:
        """Noised copies of the targets.

        Returns ``content (B, E, D)``, ``boxes (B, E, 4)`` cxcywh, the ``(Q+E, Q+E)`` mask and
        ``meta`` (``pad`` = targets per half-group T, ``groups``), with E = groups * 2T: group g
        holds T positives then T negatives, query ``g*2T + i`` (``+ T``) is a copy of target i;
        images with fewer than T targets have padding queries whose target is "no object".
        None when the batch has no targets.
        """
        t = max(len(x["labels"]) for x in targets)
        g = denoising_groups(self.groups, self.queries_budget, t)
        if g == 0:
            return None
        device = self.label_embed.weight.device
        b = len(targets)
        labels = torch.full((b, t), 0, dtype=torch.int64, device=device)
        boxes = torch.full((b, t, 4), 0.5, device=device)  # padding: any valid box
        valid = torch.zeros(b, t, dtype=torch.bool, device=device)
        for i, x in enumerate(targets):
            n = len(x["labels"])
            labels[i, :n], boxes[i, :n], valid[i, :n] = x["labels"], x["boxes"].float(), True
        labels = labels[:, None, None].expand(b, g, 2, t)  # (B, G, 2, T): positive and negative halves
        boxes = boxes[:, None, None].expand(b, g, 2, t, 4)
        # Label noise: a fraction label_noise / 2 of the queries carry a random class (DINO).
        flip = torch.rand(labels.shape, device=device) < self.label_noise * 0.5
        labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        # Box noise: each corner moves by up to box_noise * half the box size; positives by a
        # fraction in [0, 1) of it, negatives in [1, 2) (DINO's contrastive denoising).
        xyxy = cxcywh_to_xyxy(boxes)
        half = torch.cat([boxes[..., 2:], boxes[..., 2:]], -1) / 2  # (B, G, 2, T, 4)
        part = torch.rand(xyxy.shape, device=device)
        part[:, :, 1] += 1.0
        sign = torch.randint_like(xyxy, 2) * 2 - 1
        xyxy = (xyxy + sign * part * half * self.box_noise).clamp(0, 1)
        noised = xyxy_to_cxcywh(xyxy)
        content = self.label_embed(labels).reshape(b, g * 2 * t, -1)  # (B, E, D)
        noised = noised.reshape(b, g * 2 * t, 4)  # (B, E, 4)
        # Padding queries start empty: nothing to denoise.
        pad = ~valid[:, None, None].expand(b, g, 2, t).reshape(b, g * 2 * t)
        content = content.masked_fill(pad[..., None], 0.0)
        return content, noised, self.mask(t, g), {"pad": t, "groups": g}

    def mask(self, t: int, groups: int) -> Tensor:
        """``(Q+E, Q+E)`` bool: the model's queries see none of the denoising queries (they hold the
        answers), and each denoising group sees the model's queries and itself only (DINO)."""
        q, e = self.model_queries, groups * 2 * t
        device = self.label_embed.weight.device
        group = torch.cat([torch.full((q,), -1, device=device), torch.arange(e, device=device) // (2 * t)])
        blocked = group[:, None] != group[None, :]  # (Q+E, Q+E): different groups
        blocked[q:, :q] = False  # denoising queries may look at the model's own
        return blocked

    @staticmethod
    def indices(targets: list[dict], meta: dict) -> list[tuple[Tensor, Tensor]]:
        """The known assignment of the positive denoising queries: ``(query, target)`` per image."""
        t, g = meta["pad"], meta["groups"]
        out = []
        for x in targets:
            n = len(x["labels"])
            tgt = torch.arange(n).repeat(g)  # (G*n,)
            src = (torch.arange(g)[:, None] * 2 * t + torch.arange(n)[None]).flatten()  # first half of each group
            out.append((src, tgt))
        return out


class AidedModel(nn.Module):
    """A model with its training-only aids: ``forward(images, targets)`` -> the model's outputs,
    plus ``group_outputs`` (a list of per-group output dicts), ``dn_outputs`` with ``dn_meta``
    (``groups``, ``pad``) and ``dn_indices`` (the known ``(query, target)`` pairs of each image,
    :meth:`Denoising.indices`), ``hybrid_outputs`` for :class:`detrkit.criterion.SetCriterion`,
    for the aids that are on.

    With every aid off it is the model itself: the same call, the same outputs.
    """

    def __init__(self, model: DETR, loss: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.groups = QueryGroups(model, loss.query_groups) if loss.query_groups > 1 else None
        self.denoising = (Denoising(model, loss.denoising, loss.dn_box_noise, loss.dn_label_noise, loss.denoising_queries)
                          if loss.denoising > 0 or loss.denoising_queries > 0 else None)
        if self.groups is not None and self.denoising is not None:
            raise ValueError("query groups and denoising queries cannot be combined (choose one)")
        self.hybrid = loss.hybrid_queries
        if self.hybrid and not model.sigmoid_class:
            raise ValueError("hybrid queries are chosen from the encoder: two-stage presets only "
                             "(plain DETR: use query_groups for one-to-many training)")

    def start_from(self, state: dict[str, Tensor]) -> list[str]:
        """Load the aids' parameters ``state`` holds (names as in this module's state dict, same
        shapes; e.g. a checkpoint's denoising label table). Returns the names loaded."""
        own = self.state_dict()
        kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict({**own, **kept})
        return sorted(kept)

    def forward(self, images: Images, targets: list[dict]) -> dict:
        if self.groups is not None:
            x, _ = DETR._batch(images)
            content, position, mask = self.groups.queries(x.shape[0])
            out = self.model(images, ExtraQueries(content, mask, position=position))
            out["group_outputs"] = self.groups.split(out.pop("extra_outputs"))
            return out
        extra, meta = None, None
        noised = self.denoising.queries(targets) if self.denoising is not None else None
        if noised is not None:
            content, boxes, mask, meta = noised
            if self.model.sigmoid_class:
                extra = ExtraQueries(content, mask, boxes=boxes, hybrid=self.hybrid)
            else:  # plain DETR (no hybrid queries)
                position = self.denoising.box_position(box_sine_embedding(boxes, self.model.d_model))
                extra = ExtraQueries(content, mask, position=position)
        elif self.hybrid:  # no denoising queries: an empty set of extra queries carries the request
            x, _ = DETR._batch(images)
            d, q = self.model.d_model, self.model.num_queries
            extra = ExtraQueries(x.new_zeros(x.shape[0], 0, d), torch.zeros(q, q, dtype=torch.bool, device=x.device),
                                 boxes=x.new_zeros(x.shape[0], 0, 4), hybrid=self.hybrid)
        out = self.model(images, extra) if extra is not None else self.model(images)
        extra_outputs = out.pop("extra_outputs", None)
        if meta is not None:  # with the known assignment, so the criterion never matches them
            out["dn_outputs"], out["dn_meta"] = extra_outputs, meta
            out["dn_indices"] = Denoising.indices(targets, meta)
        elif self.denoising is not None:
            # No targets in the batch, so no denoising queries. Keep the aid's parameters in the
            # graph: DDP expects a gradient for each of them.
            out["pred_logits"] = out["pred_logits"] + 0.0 * sum(p.sum() for p in self.denoising.parameters())
        return out


def _slice(outputs: dict, part: slice) -> dict:
    """The queries ``part`` of an output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs``)."""
    out = {k: outputs[k][:, part] for k in ("pred_logits", "pred_boxes")}
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [_slice(a, part) for a in outputs["aux_outputs"]]
    return out
