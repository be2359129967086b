"""What several test files share: tiny model settings and targets, small data sets made on the spot,
COCO ground truth with noisy detections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.checkpoint import load_model, load_state
from detrkit.config import ModelConfig
from detrkit.data.synthetic import make_synthetic
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# ---------------------------------------------------------------------------------------------
# Tiny models: a step or a forward pass takes well under a second on a CPU.
# ---------------------------------------------------------------------------------------------
TINY_TRANSFORMER = dict(d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64)
# ResNet-18 cut after layer3 (stride 16), every stage trainable.
TINY = dict(backbone="resnet18", backbone_stages=3, frozen_stages=0, **TINY_TRANSFORMER)


# A class mapping with the gaps real data sets have.
THREE_CLASSES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 12, "name": "star"}]


def tiny_config(**overrides) -> ModelConfig:
    """:data:`TINY` with field overrides (``num_queries``, ``num_classes``, ``arch``, ...)."""
    return ModelConfig(**{**TINY, **overrides})


def make_targets() -> list[dict]:
    """Targets of two images (3 classes): two boxes, then one; cxcywh normalised."""
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """``synthetic(num_train, num_val, seed=0)``: the paths of a 64 px synthetic shapes set, made once
    per session for each size. Tests that change files work on a copy."""
    made: dict[tuple, dict] = {}

    def make(num_train: int, num_val: int, seed: int = 0) -> dict:
        key = (num_train, num_val, seed)
        if key not in made:
            made[key] = make_synthetic(tmp_path_factory.mktemp("shapes"), num_train=num_train, num_val=num_val,
                                       image_size=64, seed=seed)
        return made[key]

    return make


# ---------------------------------------------------------------------------------------------
# Hand-made COCO files
# ---------------------------------------------------------------------------------------------
# Non-contiguous ids, out of order in the file, names with spaces: sorted by id they map to 0, 1, 2.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "traffic light"}]
DOG, LIGHT, BRUSH = 0, 1, 2  # contiguous indices of ids 3, 7, 90


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    """Random pixels saved at ``path`` (folders made), in PIL ``mode`` "RGB", "L", "P" or "RGBA"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        image = image.convert("RGBA")
    image.save(path)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def ann(aid, image_id, category_id, bbox, **extra):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


@pytest.fixture
def small_coco(tmp_path):
    """Four images: RGB JPEG, grayscale PNG in a sub-folder, an empty palette PNG, an RGBA PNG."""
    root = tmp_path / "images"
    write_image(root / "a.jpg", 64, 48)
    write_image(root / "sub" / "b.png", 40, 80, mode="L")
    write_image(root / "c.png", 30, 20, mode="P")
    write_image(root / "d.png", 50, 50, mode="RGBA")
    coco = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 20, "file_name": "sub/b.png", "width": 40, "height": 80},
            {"id": 30, "file_name": "c.png", "width": 30, "height": 20},
            {"id": 40, "file_name": "d.png", "width": 50, "height": 50},
        ],
        "annotations": [
            ann(1, 10, 3, [4, 6, 20, 10]),
            ann(2, 10, 90, [30, 10, 10, 20]),
            ann(3, 10, 7, [0, 0, 64, 48], iscrowd=1),
            ann(4, 20, 7, [0, 0, 40, 80]),
            ann(5, 40, 90, [10, 10, 5, 5]),
        ],
        "categories": CATEGORIES,
    }
    return write_json(tmp_path / "ann.json", coco), root


# ---------------------------------------------------------------------------------------------
# Ground truth and detections for the metrics (faster-coco-eval against pycocotools)
# ---------------------------------------------------------------------------------------------
# Non-contiguous ids, as real data sets have; "star" has no ground-truth box at all.
GT_CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"},
              {"id": 12, "name": "triangle"}, {"id": 20, "name": "star"}]
GT_CATEGORY_IDS = (3, 7, 12)
# Box sides giving each COCO area range: small < 32^2 <= medium < 96^2 <= large.
SIDES = {"small": (8, 28), "medium": (34, 90), "large": (100, 180)}


def make_ground_truth(seed: int = 0) -> dict:
    """Six images: five with 3-12 boxes of every size and class (one crowd box), one empty."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, 7):
        width, height = 320 + 40 * image_id, 240 + 20 * image_id
        images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "width": width, "height": height})
        if image_id == 4:
            continue  # an image without annotations: every detection on it is a false positive
        for j in range(int(rng.integers(3, 13))):
            lo, hi = SIDES[("small", "medium", "large")[j % 3]]
            w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(GT_CATEGORY_IDS)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    # A crowd region: detections inside it are ignored, neither true nor false positives.
    annotations.append({"id": len(annotations) + 1, "image_id": 2, "category_id": 7,
                        "bbox": [10.0, 10.0, 200.0, 150.0], "area": 30000.0, "iscrowd": 1})
    return {"images": images, "categories": GT_CATEGORIES, "annotations": annotations}


def make_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Noisy detections: exact, jittered (some past IoU 0.5), wrong class, duplicates, false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        kind = rng.choice(["exact", "jitter", "big_jitter", "wrong_class", "missed"], p=[.25, .35, .15, .15, .10])
        if kind == "missed":
            continue
        if kind in ("jitter", "big_jitter"):
            s = 0.08 if kind == "jitter" else 0.35
            x, y = x + rng.normal(0, s) * w, y + rng.normal(0, s) * h
            w, h = w * np.exp(rng.normal(0, s)), h * np.exp(rng.normal(0, s))
        category = ann["category_id"]
        if kind == "wrong_class":
            category = int(rng.choice([c for c in GT_CATEGORY_IDS if c != category]))
        dets.append({"image_id": ann["image_id"], "category_id": category,
                     "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.uniform(0.3, 1.0))})
        if rng.uniform() < 0.2:  # a duplicate: the second match of one box is a false positive
            dets.append({**dets[-1], "score": float(rng.uniform(0.05, 0.6))})
    for img in gt["images"]:
        for _ in range(int(rng.integers(2, 6))):  # false positives anywhere, the empty image included
            w, h = (float(v) for v in rng.uniform(10, 150, size=2))
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(GT_CATEGORY_IDS + (20,))),
                         "bbox": [float(rng.uniform(0, img["width"] - w)), float(rng.uniform(0, img["height"] - h)),
                                  w, h], "score": float(rng.uniform(0.0, 0.7))})
    # Inside the crowd region: ignored by COCOeval.
    dets.append({"image_id": 2, "category_id": 7, "bbox": [40.0, 30.0, 60.0, 50.0], "score": 0.95})
    return dets


@pytest.fixture
def files(tmp_path):
    """``(gt, detections, gt_path, detections_path)``: :func:`make_ground_truth` and :func:`make_detections`, also as files."""
    gt = make_ground_truth()
    dets = make_detections(gt)
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    return gt, dets, gt_path, dt_path


# ---------------------------------------------------------------------------------------------
# RT-DETR against Hugging Face transformers (tests/test_rtdetr*.py; they skip without transformers)
# ---------------------------------------------------------------------------------------------
R18_BACKBONE = dict(model_type="rt_detr_resnet", depths=[2, 2, 2, 2], layer_type="basic",
                    hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4])
R18 = dict(backbone_config=R18_BACKBONE, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=3)


def hf_rtdetr(kind: str, **config):
    """A Hugging Face RT-DETR in the R18 or R50 configuration of the published checkpoints ("r18",
    "r50"), or an RT-DETRv2 R18 with non-default sampling options ("v2", "v2_discrete"; "v2_release":
    3 points per level at the offset scale the release always uses, 0.5); fewer queries and classes,
    for speed; ``config``: more config values."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrV2Config, RTDetrV2ForObjectDetection

    common = {"num_queries": 30, "num_labels": 7, "use_pretrained_backbone": False, **config}
    if kind == "r18":
        return RTDetrForObjectDetection(RTDetrConfig(**R18, **common))
    if kind == "r50":
        return RTDetrForObjectDetection(RTDetrConfig(**common))
    method = "discrete" if kind == "v2_discrete" else "default"
    offset_scale = 0.5 if kind == "v2_release" else 0.75
    v2 = RTDetrV2Config(**R18, **common, decoder_n_points=3, decoder_offset_scale=offset_scale, decoder_method=method)
    return RTDetrV2ForObjectDetection(v2)


@torch.no_grad()
def randomise_hf_rtdetr(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw a Hugging Face RT-DETR's weights at a variance-preserving scale. Its own random
    initialisation makes every feature map nearly constant (BatchNorm weights ~ N(0, 0.01)), so the
    query selection would pick among near-ties and a comparison would mean little."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.weight.normal_(0, module.weight[0].numel() ** -0.5, generator=gen)
        if "BatchNorm" in type(module).__name__:
            module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    for name, p in model.named_parameters():
        if "class_embed" in name or "enc_score_head" in name:  # spread the class scores
            p.normal_(0, 0.2, generator=gen)
        elif ("bbox_embed" in name or "enc_bbox_head" in name) and "layers.2" in name:  # and the boxes
            p.normal_(0, 0.5, generator=gen)
    if hasattr(model.model, "denoising_class_embed"):
        model.model.denoising_class_embed.weight.normal_(generator=gen)


def hf_rtdetr_pair(folder: Path, kind: str, **config):
    """``(hf, ours, loaded)``: a randomised :func:`hf_rtdetr` in eval mode, saved in ``folder / kind``
    with ``save_pretrained``, read back by ``load_model`` (and ``load_state``)."""
    torch.manual_seed(0)
    hf = hf_rtdetr(kind, **config)
    randomise_hf_rtdetr(hf)
    hf.save_pretrained(folder / kind)
    return hf.eval(), load_model(folder / kind), load_state(folder / kind)


@pytest.fixture(scope="session")
def hf_rtdetr_pairs(tmp_path_factory):
    """``hf_rtdetr_pairs(kind)``: :func:`hf_rtdetr_pair` made once per session for each kind (the
    test files comparing with Hugging Face share them; tests copy what they change)."""
    made: dict[str, tuple] = {}

    def pair(kind: str):
        if kind not in made:
            made[kind] = hf_rtdetr_pair(tmp_path_factory.mktemp("hf"), kind)
        return made[kind]

    return pair


def to_pixel_input(x: torch.Tensor) -> torch.Tensor:
    """Pixels as Hugging Face takes them ([0, 1]) -> ImageNet-normalised, as every detrkit model takes
    them; a (3, H, W) image or a (B, 3, H, W) batch."""
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=x.dtype), torch.tensor(IMAGENET_STD, dtype=x.dtype)
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return (x - mean.view(shape)) / std.view(shape)


def rtdetr_images() -> list[torch.Tensor]:
    """Two images of different sizes (160 x 128, 128 x 160)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, 160, 128, generator=gen), torch.randn(3, 128, 160, generator=gen)]


def rtdetr_canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """The images on a zero 160 x 160 canvas at the top-left corner, as Hugging Face's processor pads."""
    x = torch.zeros(len(images), 3, 160, 160)
    for i, img in enumerate(images):
        x[i, :, : img.shape[1], : img.shape[2]] = img
    return x
