"""Looking inside a trained model: attention maps or sampling points per detection, and the
matching of one image.

:func:`explain` runs a DETR model once on one image under
:func:`detrkit.model.transformer.capture_attention` and returns the detections with

* the decoder cross-attention of each detected object: the last decoder layer's attention of
  that object's query over the feature map, averaged over the heads (where the detection
  "looks" in the image; for a trained DETR, usually the object's extremities);
* the encoder self-attention of a few reference points: the last encoder layer's attention of
  the feature cell under each point over all cells (what that part of the image gathers
  context from; for a trained DETR, usually the object it lies on).

RT-DETR has no global attention map to show: its decoder samples a few points per feature level
around each query's box. For it :func:`explain` returns a :class:`SamplingExplanation`
(:func:`explain_sampling`, under :func:`detrkit.model.deformable.capture_sampling`): where the
last decoder layer's cross-attention of each detection sampled, on each level, with what weight.

:func:`match` runs the model on one annotated image and the Hungarian matcher on its output:
which query was assigned to which target, and the three cost terms of each pair.

They return plain tensors; :mod:`detrkit.visualize` draws them (:func:`~detrkit.visualize.draw_explanation`,
:func:`~detrkit.visualize.draw_sampling`, :func:`~detrkit.visualize.draw_matching`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from detrkit.boxes import cxcywh_to_xyxy, scale_boxes
from detrkit.data.coco import open_rgb
from detrkit.data.transforms import inference_transforms, prepare_image
from detrkit.config import LossConfig
from detrkit.data.coco import CocoDetection
from detrkit.matcher import HungarianMatcher, build_matcher
from detrkit.model.deformable import capture_sampling
from detrkit.model.detr import DETR
from detrkit.model.rtdetr import RTDETR
from detrkit.model.transformer import capture_attention


@dataclass
class Detections:
    """The detections of one image that an explanation explains (fields shared by
    :class:`Explanation` and :class:`SamplingExplanation`). Boxes are in pixels of the original
    image ``(H, W)``; detection ``n`` comes from decoder query ``queries[n]``."""

    image: Tensor  # (3, H, W) uint8, as given
    boxes: Tensor  # (N, 4) absolute (x0, y0, x1, y1)
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) dataset category ids
    names: list[str]  # N class names
    queries: Tensor  # (N,) int64: the decoder query behind each detection


@dataclass
class Explanation(Detections):
    """The detections of one image and the attention behind them (see the module docstring).

    Boxes and points are in pixels of the original image ``(H, W)``. Attention maps are over
    the feature map ``(h, w)`` (stride ``model.backbone.stride`` of the resized input); each
    sums to 1. :meth:`upsample` puts maps onto the image's pixels.
    """

    decoder_attention: Tensor  # (N, h, w): last decoder layer, cross-attention, mean over heads
    points: Tensor  # (P, 2) float (x, y) reference points
    encoder_attention: Tensor  # (P, h, w): last encoder layer, self-attention of each point's cell, mean over heads
    cell_size: tuple[float, float]  # (height, width) of one feature cell in original-image pixels
    attention: dict[str, Tensor] = field(repr=False)  # every captured map, by module name: (1, heads, Lq, Lk)

    def upsample(self, maps: Tensor) -> Tensor:
        """Feature-map maps ``(N, h, w)`` -> ``(N, H, W)`` on the original image (bilinear).

        Cell ``(i, j)`` covers the input pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``; the last
        row and column may reach past the image (the network pads it up to the stride).
        """
        n, h, w = maps.shape
        height, width = self.image.shape[-2:]
        ch, cw = self.cell_size
        full = F.interpolate(maps[:, None].float(), size=(round(h * ch), round(w * cw)), mode="bilinear",
                             align_corners=False)[:, 0]  # (N, ~h*ch, ~w*cw)
        full = F.pad(full, (0, max(0, width - full.shape[2]), 0, max(0, height - full.shape[1])))
        return full[:, :height, :width]


@torch.no_grad()
def explain(model: DETR, image, *, points: Optional[Sequence[Sequence[float]]] = None, threshold: float = 0.5,
            max_objects: int = 6, max_points: int = 4) -> Explanation:
    """Detect objects in one image and return the attention maps behind the detections.

    Args:
        model: a DETR or two-stage DETR (e.g. from :func:`detrkit.load_model`).
        image: a file path, PIL image or uint8 ``3 x H x W`` tensor; resized as ``predict`` does.
        points: reference points ``(x, y)`` in image pixels for the encoder maps; by default the
            centres of the best detections (up to ``max_points``), or four fixed points when
            nothing is detected.
        threshold: keep detections scoring above it (as ``predict``).
        max_objects: at most this many detections (the best), each with its decoder map.

    One detection per query: the query's best class (a two-stage model's ``predict`` may list a
    second class of the same query; here it shares that query's map anyway).

    An :class:`~detrkit.model.rtdetr.RTDETR` gets :func:`explain_sampling`'s answer instead
    (``points`` must then be None: it has no encoder attention map to show).
    """
    if isinstance(model, RTDETR):
        if points is not None:
            raise ValueError("reference points are for encoder attention maps, which RT-DETR does not have "
                             "(its explanation shows each detection's sampling points)")
        return explain_sampling(model, image, threshold=threshold, max_objects=max_objects)
    original, x, (height, width) = _prepared(model, image)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feature_mask = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: feature_mask.append(out[1]))
    try:
        with capture_attention(model) as maps:
            out = model([x.to(device)])
    finally:
        hook.remove()
        model.train(was_training)
    mask = feature_mask[0][0].cpu()  # (h, w) True = padding: none for a single image
    h, w = mask.shape
    stride = model.backbone.stride
    cell = (stride * height / x.shape[-2], stride * width / x.shape[-1])

    found = _detections(model, out, threshold, max_objects, height, width)  # one per query: its best class
    queries, boxes = found["queries"], found["boxes"]

    captured = {name: calls[0].cpu() for name, calls in maps.items() if calls}
    cross = captured[_last("transformer.decoder.layers", len(model.transformer.decoder.layers), "multihead_attn")]
    decoder_attention = cross[0].mean(0)[queries].view(-1, h, w)  # (N, h, w)

    if points is None:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        points = centres[:max_points] if len(centres) else torch.tensor(
            [[width * fx, height * fy] for fx, fy in ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))])
    points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    for px, py in points.tolist():
        if not (0 <= px < width and 0 <= py < height):
            raise ValueError(f"reference point ({px:g}, {py:g}) is outside the {width}x{height} image")
    rows = (points[:, 1] / cell[0]).long().clamp(max=h - 1)
    cols = (points[:, 0] / cell[1]).long().clamp(max=w - 1)
    self_attn = captured[_last("transformer.encoder.layers", len(model.transformer.encoder.layers), "self_attn")]
    encoder_attention = self_attn[0].mean(0)[rows * w + cols].view(-1, h, w)  # (P, h, w): row-major cells

    return Explanation(image=original, **found, decoder_attention=decoder_attention, points=points,
                       encoder_attention=encoder_attention, cell_size=cell, attention=captured)


def _prepared(model, image) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(original (3, H, W) uint8, model input (3, h, w), (H, W))`` of a path, PIL image or tensor."""
    if isinstance(image, (str, Path)):
        image = open_rgb(image)
    original = TF.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image  # (3, H, W) uint8
    x, size = prepare_image(original, inference_transforms(model.inference))
    return original, x, size


def _detections(model, out: dict, threshold: float, max_objects: int, height: int, width: int) -> dict:
    """One candidate per query (its best class), the best above ``threshold``: the fields of
    :class:`Detections` but the image (``queries``, ``scores``, ``boxes`` absolute xyxy, ``labels``
    category ids, ``names``)."""
    logits = out["pred_logits"][0].float().cpu()
    prob = logits.sigmoid() if model.sigmoid_class else logits.softmax(-1)[:, :-1]  # (Q, K)
    scores, classes = prob.max(-1)  # (Q,)
    order = scores.argsort(descending=True)
    queries = order[scores[order] > threshold][:max_objects]
    lut = [c["id"] for c in model.classes]
    return {"queries": queries, "scores": scores[queries],
            "boxes": _to_pixels(out["pred_boxes"][0].float().cpu()[queries], height, width),
            "labels": torch.tensor([lut[int(c)] for c in classes[queries]], dtype=torch.int64),
            "names": [model.classes[int(c)]["name"] for c in classes[queries]]}


@dataclass
class SamplingExplanation(Detections):
    """The detections of one image and where RT-DETR's last decoder layer sampled for each.

    Boxes and points are in pixels of the original image ``(H, W)`` (points may lie outside it:
    those samples read zeros). For detection n, head h, point p: ``points[n, h, p]`` (x, y) with
    weight ``weights[n, h, p]`` (each detection's weights sum to 1 over all heads' points / heads,
    i.e. to 1 per head), on feature level ``levels[p]`` (0 = the finest, stride ``strides[0]``).
    """

    points: Tensor  # (N, heads, P, 2) float (x, y) sampling locations
    weights: Tensor  # (N, heads, P) attention weight of each location (sums to 1 per head)
    levels: Tensor  # (P,) int64 the feature level each point samples
    strides: list[int]  # the stride of each level
    layer: str  # the module whose sampling this is ("decoder.layers.5.cross_attn")


@torch.no_grad()
def explain_sampling(model: RTDETR, image, *, threshold: float = 0.5, max_objects: int = 6) -> SamplingExplanation:
    """Detect objects in one image (resized as ``predict`` does) and return the sampling points of each
    detection's query in the last decoder layer (:class:`SamplingExplanation`)."""
    original, x, (height, width) = _prepared(model, image)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_sampling(model) as records:
            out = model([x.to(device)])
    finally:
        model.train(was_training)
    found = _detections(model, out, threshold, max_objects, height, width)
    layer = f"decoder.layers.{len(model.decoder.layers) - 1}.cross_attn"
    record = records[layer][0]
    # The canvas is the input padded to a multiple of the stride; locations are in [0, 1] of it.
    canvas_h, canvas_w = (-(-side // model.stride) * model.stride for side in x.shape[-2:])
    scale = torch.tensor([canvas_w * width / x.shape[-1], canvas_h * height / x.shape[-2]])
    counts = record["num_points"]
    return SamplingExplanation(
        image=original, **found,
        points=record["locations"][0].cpu()[found["queries"]] * scale,  # (N, heads, P, 2)
        weights=record["weights"][0].cpu()[found["queries"]],
        levels=torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]),
        strides=model.backbone.strides[-len(counts):], layer=layer)


def _last(prefix: str, num_layers: int, module: str) -> str:
    return f"{prefix}.{num_layers - 1}.{module}"


def _to_pixels(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, 4)`` normalised cxcywh -> absolute xyxy in an ``height x width`` image."""
    return scale_boxes(cxcywh_to_xyxy(boxes)[None], torch.tensor([[height, width]]))[0]


@dataclass
class Matching:
    """The Hungarian matching of one annotated image (see the module docstring).

    Boxes are absolute ``(x0, y0, x1, y1)`` in pixels of the original image. ``pairs`` lists
    ``(query, target)`` index pairs; ``costs`` holds, for each pair in that order, the
    unweighted ``class``, ``bbox`` (L1) and ``giou`` (-GIoU) terms and the weighted ``total``.
    """

    image: Tensor  # (3, H, W) uint8
    target_boxes: Tensor  # (T, 4)
    target_names: list[str]
    pred_boxes: Tensor  # (Q, 4): every query's box
    pred_scores: Tensor  # (Q,) the best class score of each query
    pred_names: list[str]  # Q names of each query's best class
    pairs: list[tuple[int, int]]  # (query, target)
    costs: dict[str, Tensor]  # "class", "bbox", "giou", "total": (len(pairs),) each
    weights: dict[str, float]  # the matcher's weights of "class", "bbox", "giou"
    class_cost_formula: str  # how the class term is computed: "-p", "1 - p" or "focal"
    image_path: Optional[Path] = None  # the image file


@torch.no_grad()
def match(model: DETR, dataset, index: int, matcher: HungarianMatcher) -> Matching:
    """Run ``model`` on ``dataset[index]`` and match its last-layer predictions to the targets.

    ``dataset`` is a :class:`detrkit.data.coco.CocoDetection` with evaluation transforms (the
    image is sized as the model was trained, without augmentation); ``matcher`` is the one
    training used (:func:`detrkit.matcher.build_matcher`: its cost weights; ``sigmoid_class`` for two-stage models).
    """
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index} is out of range: the data set has {len(dataset)} images")
    x, target = dataset[index]
    original = TF.pil_to_tensor(open_rgb(dataset.data.image_path(index)))  # (3, H, W) uint8
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model([x.to(device)])
    finally:
        model.train(was_training)
    logits, boxes = out["pred_logits"][0].float().cpu(), out["pred_boxes"][0].float().cpu()  # (Q, K(+1)), (Q, 4)
    labels, tgt = target["labels"], target["boxes"].float()  # (T,), (T, 4) cxcywh normalised
    (rows, cols), = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]}, [{"labels": labels, "boxes": tgt}])
    if len(labels):
        costs = {k: v[rows, cols] for k, v in matcher.cost_terms(logits, boxes, labels, tgt).items()}
        costs["total"] = matcher.cost_matrix(logits, boxes, labels, tgt)[rows, cols]
    else:  # nothing to match: every query is trained towards "no object"
        costs = {k: torch.zeros(0) for k in ("class", "bbox", "giou", "total")}

    height, width = original.shape[-2:]
    prob = logits.sigmoid() if model.sigmoid_class else logits.softmax(-1)[:, :-1]  # (Q, K)
    scores, classes = prob.max(-1)
    names = [c["name"] for c in dataset.categories]
    return Matching(
        image=original, target_boxes=_to_pixels(tgt, height, width), target_names=[names[int(i)] for i in labels],
        pred_boxes=_to_pixels(boxes, height, width), pred_scores=scores,
        pred_names=[model.classes[int(c)]["name"] for c in classes],
        pairs=list(zip(rows.tolist(), cols.tolist())), costs=costs,
        weights={"class": matcher.cost_class, "bbox": matcher.cost_bbox, "giou": matcher.cost_giou},
        class_cost_formula="focal" if matcher.sigmoid_class else ("1 - p" if matcher.class_cost_formula == "one_minus_prob" else "-p"),
        image_path=dataset.data.image_path(index),
    )


def match_annotated(model: DETR, json_path: Path, image_root: Path, index: int, loss: LossConfig) -> Matching:
    """:func:`match` on image ``index`` of a COCO file (sized as the model was trained, the model's
    classes), with the matcher training used (:func:`~detrkit.matcher.build_matcher` of ``loss``)."""
    dataset = CocoDetection(json_path, image_root,
                            transforms=inference_transforms(model.inference),
                            categories=[{"id": c["id"], "name": c["name"]} for c in model.classes])
    return match(model, dataset, index, build_matcher(loss, model.sigmoid_class))
