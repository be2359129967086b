"""`detrkit demo`: the synthetic shapes set, a short training run, evaluation and pictures.

The recipe lives in :data:`detrkit.presets.DEMO`; this module only strings the steps together.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from detrkit.checkpoint import load_model
from detrkit.presets import DEMO, resolve
from detrkit.data.images import image_tensor
from detrkit.data.synthetic import make_synthetic
from detrkit.evaluate import format_metrics
from detrkit.run import train
from detrkit.visualize import draw_detections, side_by_side


def run_demo(out: str = "runs/demo", data_dir: str = "data/synthetic", minutes: Optional[float] = None,
             device: str = "auto") -> dict:
    """Make (or reuse) the synthetic set, train for ``minutes``, evaluate, draw predictions.

    Returns ``{"AP": ..., "run_dir": ..., "plot": ..., "pictures": [...]}``.
    """
    size = DEMO["image_size"]
    paths = make_synthetic(Path(data_dir) / f"shapes-{size}", num_train=DEMO["num_train"], num_val=DEMO["num_val"],
                           image_size=size)
    model_cfg, loss_cfg, data_cfg, train_cfg = resolve(DEMO["recipe"], {
        "data": {**{k: str(v) for k, v in paths.items()}, "image_size": size},
        "train": {"minutes": minutes or DEMO["minutes"], "out": out, "device": device, "eval_every": DEMO["eval_every"]},
    })
    run_dir = train(model_cfg, loss_cfg, data_cfg, train_cfg)

    model = load_model(run_dir / "best")
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())  # written when it became the best
    print(format_metrics(metrics))
    pictures = draw_examples(model, paths["val_json"], paths["val_images"], run_dir / "predictions")
    print(f"\nmAP@[.5:.95] {metrics['AP']:.3f}   AP50 {metrics['AP50']:.3f}")
    print(f"run folder: {run_dir}\nplot: {run_dir / 'results.png'}\npictures: {pictures[0].parent}")
    return {"AP": metrics["AP"], "run_dir": run_dir, "plot": run_dir / "results.png", "pictures": pictures}


def draw_examples(model, json_path: Path, image_root: Path, out: Path, count: int = 6,
                  threshold: float = 0.5) -> list[Path]:
    """Predictions next to the ground truth for the first ``count`` images of a COCO file."""
    coco = json.loads(Path(json_path).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for info in coco["images"][:count]:
        image = image_tensor(Path(image_root) / info["file_name"])
        det = model.predict([image], threshold=threshold)[0]
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        gt_boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                 for a in anns], dtype=torch.float32).reshape(-1, 4)
        pred = draw_detections(image, det["boxes"], det["names"], det["scores"])
        gt = draw_detections(image, gt_boxes, [names[a["category_id"]] for a in anns])
        written.append(side_by_side(pred, gt, out / f"{Path(info['file_name']).stem}.png"))
    return written
