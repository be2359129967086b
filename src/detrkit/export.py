"""ONNX export of a DETR model, its check against onnxruntime, and an onnxruntime detector.

The exported graph takes a padded batch, exactly what the PyTorch model takes::

    images  float32 (B, 3, H, W)   ImageNet-normalised, zeros in the padding
    mask    bool    (B, H, W)      True = padding (so images of different sizes share a batch)

and returns the last decoder layer's predictions (never the auxiliary ones)::

    pred_logits  float32 (B, Q, K+1)   class logits, the last is "no object" (K columns for
                                       sigmoid-classification models)
    pred_boxes   float32 (B, Q, 4)     (cx, cy, w, h) in [0, 1] of each image's own unpadded size

``H`` and ``W`` are dynamic axes (any size works, not only the export size); ``B`` is dynamic
with ``dynamic_batch=True`` and fixed otherwise. With ``with_postprocess=True`` the graph also
takes ``orig_sizes`` int64 (B, 2) ``(h, w)`` and adds the outputs of
:func:`detrkit.postprocess` before its threshold (nothing is dropped inside the graph)::

    scores  float32 (B, N)      N = Q: the best class per query (softmax models), or the
    labels  int64   (B, N)      top-100 (query, class) pairs (sigmoid models), as postprocess;
    boxes   float32 (B, N, 4)   labels are class indices (metadata "classes" maps them to
                                dataset category ids), boxes absolute (x0, y0, x1, y1) in orig_sizes pixels

The file describes itself: its ``metadata_props`` hold JSON strings ``classes``
(``[{"index", "id", "name"}]``), ``inference`` (``{"image_size", "max_size", "resize"}``: how to resize
images), ``model_config`` and ``sigmoid_class``.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(dynamo=False)``): it
traces the model once in under a second, handles the padding mask, dynamic batch and dynamic
image size, and its graphs match PyTorch to ~1e-6. (The torch.export-based exporter also
works on this model but is ten times slower and needs onnxscript.)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from detrkit.checkpoint import default_classes, load_model
from detrkit.data.batch import pad_images
from detrkit.errors import DetrkitError
from detrkit.postprocess import score_boxes
from detrkit.predict import predict_images

DEFAULT_OPSET = 17  # ONNX opset 17 (LayerNormalization as one op); 14 is the least that has our attention
MIN_OPSET = 14  # the exporter writes scaled_dot_product_attention only from opset 14 on
ONNX_EXTRA = "ONNX export needs the onnx extra: pip install 'detrkit[onnx]'"
RAW_OUTPUTS = ["pred_logits", "pred_boxes"]
POSTPROCESS_OUTPUTS = ["scores", "labels", "boxes"]

PathLike = Union[str, Path]


class MissingExtraError(ImportError, DetrkitError):
    """onnx or onnxruntime is not installed (an ImportError; the CLI reports it as a usage error)."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(ONNX_EXTRA) from None


# ---------------------------------------------------------------------------------------------
# The exported computation
# ---------------------------------------------------------------------------------------------
class ExportWrapper(nn.Module):
    """What the ONNX graph computes: ``model((images, mask))``, last layer only, optionally postprocessed.

    It adds no arithmetic to the model's: ``pred_logits`` and ``pred_boxes`` are the model's own
    tensors, and the postprocessing is :func:`detrkit.postprocess.score_boxes`, the batch part of
    :func:`detrkit.postprocess` (its threshold and category-id lookup aside).
    """

    def __init__(self, model: nn.Module, with_postprocess: bool = False, top_k: int = 100) -> None:
        super().__init__()
        self.model = model
        self.with_postprocess = with_postprocess
        self.sigmoid_class = bool(getattr(model, "sigmoid_class", False))
        self.top_k = top_k  # sigmoid models: pairs kept per image (postprocess's default)

    def forward(self, images: Tensor, mask: Tensor, orig_sizes: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        out = self.model((images, mask))
        logits, boxes = out["pred_logits"], out["pred_boxes"]  # (B, Q, K+1), (B, Q, 4)
        if not self.with_postprocess:
            return logits, boxes
        scores, labels, abs_boxes = score_boxes(logits, boxes, orig_sizes.to(torch.float32), sigmoid_class=self.sigmoid_class,
                                                top_k=self.top_k)
        return logits, boxes, scores, labels, abs_boxes


@contextlib.contextmanager
def _inference_mode(model: nn.Module):
    """Eval mode, float32, no auxiliary outputs; everything restored afterwards.

    None of these changes the last layer's numbers: eval only switches dropout off, and
    ``aux_loss`` only decides whether the earlier layers' predictions are returned.
    """
    was_training = model.training
    saved = {k: getattr(model, k) for k in ("precision", "aux_loss") if hasattr(model, k)}
    model.eval()
    if "precision" in saved:
        model.precision = "fp32"  # a bf16 model exports its float32 weights as float32
    if "aux_loss" in saved:
        model.aux_loss = False
    try:
        with torch.no_grad():
            yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)
        if was_training:
            model.train()


def sample_batch(image_size: tuple[int, int], batch: int, device) -> tuple[Tensor, Tensor]:
    """``batch`` noise images padded into one ``(batch, 3, H, W)`` batch; every image after the
    first is smaller (about 3/4 x 2/3 of the size), so the mask holds padding."""
    h, w = image_size
    gen = torch.Generator().manual_seed(0)
    sizes = [(h, w)] + [(max(1, h * 3 // 4), max(1, w * 2 // 3))] * (batch - 1)
    images, mask = pad_images([torch.randn(3, hi, wi, generator=gen) for hi, wi in sizes])
    return images.to(device), mask.to(device)


def _valid_sizes(mask: Tensor) -> Tensor:
    """``(B, 2)`` int64 unpadded ``(h, w)`` of each image in a top-left padded batch."""
    inside = ~mask.cpu()
    return torch.stack([inside.any(2).sum(1), inside.any(1).sum(1)], dim=1).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: PathLike, *, image_size: Optional[Sequence[int]] = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, with_postprocess: bool = False,
                batch_size: int = 1) -> Path:
    """Export a DETR model to the ONNX file ``path`` (inputs and outputs in the module docstring).

    Args:
        model: a :class:`detrkit.DETR` (any mode and precision: it is exported in eval mode in
            float32 and left as it was).
        image_size: ``(H, W)`` of the sample batch the model is traced with. H and W stay
            dynamic in the graph, so this is not a limit. Default: a square of the model's
            ``inference["image_size"]``.
        opset: ONNX opset version (at least 14).
        dynamic_batch: a dynamic batch axis; otherwise the batch size is fixed to ``batch_size``.
        with_postprocess: also take ``orig_sizes`` and output ``scores``, ``labels``, ``boxes``.
        batch_size: the fixed batch size when ``dynamic_batch`` is False.

    Returns the path written.
    """
    onnx = _require("onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the attention needs opset {MIN_OPSET} or newer")
    if image_size is None:
        side = int(getattr(model, "inference", {}).get("image_size", 800))
        image_size = (side, side)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be two positive numbers (H, W), got {tuple(image_size)}")
    if not dynamic_batch and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    device = next(model.parameters()).device
    # Trace with two images when the batch is dynamic, so no axis is mistaken for a constant 1.
    images, mask = sample_batch((int(image_size[0]), int(image_size[1])), 2 if dynamic_batch else batch_size,
                                 device)
    args = (images, mask)
    input_names = ["images", "mask"]
    output_names = list(RAW_OUTPUTS)
    if with_postprocess:
        args += (_valid_sizes(mask).to(device),)
        input_names.append("orig_sizes")
        output_names += POSTPROCESS_OUTPUTS
    batch = {0: "batch"} if dynamic_batch else {}
    dynamic_axes = {
        "images": {**batch, 2: "height", 3: "width"},
        "mask": {**batch, 1: "height", 2: "width"},
        **{name: dict(batch) for name in input_names[2:] + output_names if batch},
    }
    with _inference_mode(model):
        queries = model((images, mask))["pred_logits"].shape[1]
    if queries != getattr(model, "num_queries", queries):
        # Two-stage models pick min(num_queries, feature cells) encoder tokens; tracing would
        # freeze the smaller number into the graph.
        raise ValueError(f"image_size {tuple(image_size)} is too small to trace this model: its feature map has "
                         f"fewer cells than the model's {model.num_queries} queries; use a larger image_size")
    with _inference_mode(model), warnings.catch_warnings():
        # Made here, after _inference_mode noted the model's mode: wrapper.eval() is recursive. It
        # must be in eval mode, since the exporter restores the wrapper's mode on the whole tree.
        wrapper = ExportWrapper(model, with_postprocess).eval()
        # Expected and harmless: the exporter's own deprecation notice and the tracer's notes on
        # the input checks in DETR._batch (shapes are Python values while tracing).
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapper, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )

    proto = onnx.load(str(path))
    for key, value in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _metadata(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    return {
        "classes": json.dumps(getattr(model, "classes", None) or default_classes(model.num_classes)),
        "inference": json.dumps(getattr(model, "inference", {"image_size": 800, "max_size": None})),
        "model_config": json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None),
        "sigmoid_class": json.dumps(bool(getattr(model, "sigmoid_class", False))),
    }


# ---------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------
def _session(path: PathLike, providers: Optional[Sequence[str]] = None):
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise DetrkitError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def _run(session, feeds: dict) -> dict:
    """Run ``session`` on numpy ``feeds``; a graph with a fixed batch size gets the batch in chunks."""
    n = len(next(iter(feeds.values())))
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else n
    names = [o.name for o in session.get_outputs()]
    parts = []
    for start in range(0, n, step):
        chunk = {k: v[start:start + step] for k, v in feeds.items()}
        m = len(chunk["images"])
        if m < step:  # a short last chunk: repeat its last image to fill the batch, drop the copies after
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - m, axis=0)]) for k, v in chunk.items()}
        parts.append([o[:m] for o in session.run(names, chunk)])
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def _feeds(session, images: Tensor, mask: Tensor, orig_sizes: Optional[Tensor]) -> dict:
    feeds = {"images": images.detach().cpu().float().numpy(), "mask": mask.detach().cpu().bool().numpy()}
    if "orig_sizes" in {i.name for i in session.get_inputs()}:
        sizes = _valid_sizes(mask) if orig_sizes is None else torch.as_tensor(orig_sizes)
        feeds["orig_sizes"] = sizes.cpu().to(torch.int64).numpy()
    return feeds


def check_onnx(model: nn.Module, path: PathLike, *, images: Tensor, mask: Tensor,
               orig_sizes: Optional[Tensor] = None) -> float:
    """Run the ONNX file in onnxruntime (CPU) and PyTorch on the same padded batch.

    ``images (B, 3, H, W)``, ``mask (B, H, W)`` as the model takes them; ``orig_sizes (B, 2)``
    for a graph with postprocessing (default: each image's unpadded size). Returns the largest
    absolute difference over the float outputs (``boxes`` in pixels); the integer ``labels``
    are not counted. The PyTorch side runs in eval mode and float32, as exported.
    """
    session = _session(path)
    feeds = _feeds(session, images, mask, orig_sizes)
    got = _run(session, feeds)
    device = next(model.parameters()).device
    wrapper = ExportWrapper(model, with_postprocess="orig_sizes" in feeds)
    with _inference_mode(model):
        args = [torch.from_numpy(v).to(device) for v in feeds.values()]
        ref = dict(zip(RAW_OUTPUTS + POSTPROCESS_OUTPUTS, wrapper(*args)))
    diffs = [float((torch.from_numpy(v) - ref[k].cpu()).abs().max()) if v.size else 0.0
             for k, v in got.items() if v.dtype.kind == "f"]
    return max(diffs)


class OnnxDetector:
    """Detect objects with an exported ONNX file in onnxruntime; :meth:`DETR.predict`'s contract.

    The file's metadata gives the class mapping and the image sizing; images are prepared,
    batched and postprocessed by detrkit's own code, so detections equal the PyTorch model's
    (to float precision) when the same ``batch_size`` is used.
    """

    def __init__(self, path: PathLike, *, providers: Optional[Sequence[str]] = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("classes", "inference") if k not in meta]
        if missing:
            raise DetrkitError(f"{self.path}: not a detrkit ONNX export (no {', '.join(missing)} in its metadata); "
                               f"export it with `detrkit export`")
        self.classes: list[dict] = json.loads(meta["classes"])
        self.inference: dict = json.loads(meta["inference"])
        self.sigmoid_class = bool(json.loads(meta.get("sigmoid_class", "false")))

    def predict(self, images, threshold: float = 0.5, batch_size: int = 8) -> list[dict]:
        """Image files, PIL images or uint8 ``3 x H x W`` tensors -> one dict per image:
        ``boxes (N, 4)`` absolute ``(x0, y0, x1, y1)`` in the original image's pixels, ``scores (N,)``,
        ``labels (N,)`` dataset category ids, ``names``; detections scoring above ``threshold``
        (:func:`detrkit.predict.predict_images`)."""
        return predict_images(self.forward, images, inference=self.inference, classes=self.classes,
                              sigmoid_class=self.sigmoid_class, threshold=threshold, batch_size=batch_size)

    def forward(self, batch: tuple[Tensor, Tensor]) -> dict:
        """The graph on a padded batch ``(images (B, 3, H, W), mask (B, H, W))`` -> ``pred_logits``, ``pred_boxes``."""
        got = _run(self.session, _feeds(self.session, *batch, None))
        return {k: torch.from_numpy(got[k]) for k in RAW_OUTPUTS}


# ---------------------------------------------------------------------------------------------
# Command line: `detrkit export`
# ---------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``detrkit export`` (``--debug`` is the CLI's common flag, not added here)."""
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="checkpoint to export (detrkit, official DETR / RT-DETR .pth or Hugging Face)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset version, at least {MIN_OPSET} (default: {DEFAULT_OPSET})")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="make the batch size a dynamic axis (default: fixed batch of 1)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size of the sample batch traced and checked; image height and width stay "
                             "dynamic in the graph (default: the checkpoint's inference image size, square)")
    parser.add_argument("--with-postprocess", action="store_true",
                        help="also take orig_sizes (B, 2) and output scores, labels (class indices) and "
                             "absolute xyxy boxes for every query (sigmoid models: the top 100 query-class pairs)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="ONNX file to write (default: the weights' path with the suffix .onnx)")


def default_output(weights: PathLike) -> Path:
    """``runs/x/best`` -> ``runs/x/best.onnx``; ``detr.pth`` -> ``detr.onnx``."""
    weights = Path(weights)
    return weights.parent / (weights.name + ".onnx") if weights.is_dir() else weights.with_suffix(".onnx")


def run_export(args: argparse.Namespace) -> int:
    """``detrkit export``: load, export, check against onnxruntime on two padded images, report."""
    for module in ("onnx", "onnxruntime"):  # fail before the (slow) model load
        _require(module)
    model = load_model(args.weights)
    out = Path(args.out) if args.out else default_output(args.weights)
    path = export_onnx(model, out, image_size=args.image_size, opset=args.opset,
                       dynamic_batch=args.dynamic_batch, with_postprocess=args.with_postprocess)
    side = int(model.inference["image_size"])
    images, mask = sample_batch(tuple(args.image_size) if args.image_size else (side, side), 2, "cpu")
    diff = check_onnx(model, path, images=images, mask=mask)
    session = _session(path)
    shapes = ", ".join(f"{i.name} {i.shape}" for i in session.get_inputs())
    print(f"written: {path} (opset {args.opset}; inputs {shapes}; outputs "
          f"{', '.join(o.name for o in session.get_outputs())})")
    print(f"max |onnxruntime - PyTorch| on two images of different sizes padded together: {diff:.2e}")
    return 0
