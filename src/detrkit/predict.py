"""Images in, detections out: the one inference path of every model's ``predict`` (:class:`Predicts`),
the ONNX detector and the HTTP server.

Decoding stays separate (:func:`detrkit.data.images.open_rgb`): :func:`predict_images` takes
file paths, but equally images already decoded elsewhere (PIL images, uint8 ``(3, H, W)``
tensors), and returns per image::

    boxes   (N, 4)  absolute (x0, y0, x1, y1) in pixels of the original (EXIF-rotated) image
    scores  (N,)    above the threshold
    labels  (N,)    int64 dataset category ids
    names   list of N class names
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn

from detrkit.data.batch import pad_images
from detrkit.data.images import ImageInput
from detrkit.data.transforms import inference_transforms, prepare_image
from detrkit.postprocess import postprocess

# The network: a padded batch (images (B, 3, H, W), mask (B, H, W) bool, True = padding) ->
# a dict with at least pred_logits (B, Q, K(+1)) and pred_boxes (B, Q, 4) cxcywh in [0, 1].
Forward = Callable[[tuple[Tensor, Tensor]], dict]


@torch.inference_mode()
def predict_images(forward: Forward, images: Union[ImageInput, Sequence[ImageInput]], *, inference: dict,
                   classes: list[dict], sigmoid_class: bool, threshold: float = 0.5, batch_size: int = 8,
                   device: Union[str, torch.device] = "cpu") -> list[dict]:
    """Detect objects in ``images`` (one image or a list: paths, PIL images, uint8 ``3 x H x W`` tensors).

    Args:
        forward: the network on a padded batch (see :data:`Forward`); an ``nn.Module`` runs in
            eval mode for the call and gets its own mode back afterwards.
        inference: how the model sizes images, ``{"image_size", "max_size", "resize"}`` (a checkpoint's;
            :func:`~detrkit.data.transforms.inference_transforms`).
        classes: the class mapping ``[{"index", "id", "name"}]`` in index order.
        sigmoid_class: the model scores classes by per-class sigmoid (no "no object" column).
        threshold: keep detections scoring above it.
        batch_size: images per forward pass.
        device: where the batches go (the network's device).

    Returns one dict per image, in order (see the module docstring).
    """
    if isinstance(images, (str, Path, Image.Image, Tensor)):
        images = [images]
    transform = inference_transforms(inference)
    lut = [c["id"] for c in classes]
    names = {c["id"]: c["name"] for c in classes}
    results = []
    with _eval_mode(forward):
        for start in range(0, len(images), batch_size):
            tensors, sizes = zip(*(prepare_image(img, transform) for img in images[start:start + batch_size]))
            batch, mask = pad_images([t.to(device) for t in tensors])  # (B, 3, H, W), (B, H, W)
            detections = postprocess(forward((batch, mask)), sizes, threshold=threshold, index_to_category=lut,
                                     sigmoid_class=sigmoid_class)
            for d in detections:
                d["names"] = [names[int(i)] for i in d["labels"]]
            results += detections
    return results


class Predicts:
    """``predict`` for a detector module (DETR, RT-DETR): it reads the model's ``inference``,
    ``classes`` and ``sigmoid_class``."""

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], threshold: float = 0.5,
                batch_size: int = 8) -> list[dict]:
        """Detect objects in image files, PIL images or uint8 ``3 x H x W`` tensors.

        Images are resized as the model was trained (``self.inference``) and normalised.
        Returns one dict per image: ``boxes (N, 4)`` absolute ``(x0, y0, x1, y1)`` in the
        original image's pixels, ``scores (N,)``, ``labels (N,)`` dataset category ids and
        ``names`` (list of N class names), for detections scoring above ``threshold``
        (:func:`predict_images`).
        """
        return predict_images(self, images, inference=self.inference, classes=self.classes,
                              sigmoid_class=self.sigmoid_class, threshold=threshold, batch_size=batch_size,
                              device=next(self.parameters()).device)


def detection_records(detections: dict) -> list[dict]:
    """One image's detections (as :func:`predict_images` returns them) as JSON-ready records:
    ``box`` ``[x0, y0, x1, y1]`` in pixels (2 decimals), ``score``, ``category_id``, ``name``."""
    return [{"box": [round(v, 2) for v in box], "score": score, "category_id": label, "name": name}
            for box, score, label, name in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                               detections["labels"].tolist(), detections["names"])]


@contextlib.contextmanager
def _eval_mode(forward: Forward) -> Iterator[None]:
    """A module in eval mode for the block, its own mode restored after; anything else as it is."""
    if not isinstance(forward, nn.Module):
        yield
        return
    was_training = forward.training
    forward.eval()
    try:
        yield
    finally:
        forward.train(was_training)
