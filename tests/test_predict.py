"""Images in, detections out (detrkit.predict): files, decoded PIL images and uint8 tensors give the
same detections, for the model, a plain forward function and the model's own predict."""
import pytest
import torch
from conftest import THREE_CLASSES, tiny_config, write_image
from PIL import Image

from detrkit import build_model
from detrkit.data.images import image_tensor, open_rgb
from detrkit.predict import detection_records, predict_images

INFERENCE = {"image_size": 64, "max_size": None}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_queries=5, num_classes=3, arch="two_stage"))
    model.classes = [{"index": i, **c} for i, c in enumerate(THREE_CLASSES)]
    model.inference = dict(INFERENCE)
    return model


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["names"] == y["names"] and torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(x["scores"], y["scores"], rtol=0, atol=1e-6)


def test_files_pil_images_and_tensors_give_the_same_detections(model, tmp_path):
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    write_image(files[0], 80, 60, seed=1)
    write_image(files[1], 50, 70, mode="L", seed=2)
    common = dict(inference=INFERENCE, classes=model.classes, sigmoid_class=True, threshold=0.0)
    from_files = predict_images(model, files, **common)
    _same(from_files, predict_images(model, [open_rgb(f) for f in files], **common))
    _same(from_files, predict_images(model, [image_tensor(f) for f in files], **common))
    _same(from_files, model.predict(files, threshold=0.0))  # the model's predict is this function
    assert model.training  # predict switched it to eval mode and back
    # Boxes in the original image's pixels; category ids and names from the class mapping.
    (h, w) = image_tensor(files[1]).shape[-2:]
    boxes = from_files[1]["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert set(from_files[0]["labels"].tolist()) <= {3, 7, 12}
    assert len(from_files[0]["labels"]) == 5 * 3  # sigmoid classes, threshold 0: every (query, class) pair


def test_any_forward_function_and_a_single_image(model, tmp_path):
    """A plain function of the padded batch (as the ONNX detector and a server give) works the same."""
    write_image(tmp_path / "a.png", 64, 64)
    calls = []

    def forward(batch):
        calls.append(tuple(batch[0].shape))
        with torch.no_grad():
            return model.eval()(batch)

    common = dict(inference=INFERENCE, classes=model.classes, sigmoid_class=True, threshold=0.2)
    one = predict_images(forward, Image.open(tmp_path / "a.png"), **common)
    model.train()
    assert calls == [(1, 3, 64, 64)] and len(one) == 1
    _same(one, predict_images(model, [tmp_path / "a.png"], **common))
    assert all(s > 0.2 for s in one[0]["scores"].tolist())


def test_detection_records_are_json_ready():
    det = {"boxes": torch.tensor([[1.234, 2.0, 30.5, 40.129]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([7]), "names": ["square"]}
    assert detection_records(det) == [{"box": [1.23, 2.0, 30.5, 40.13], "score": 0.5, "category_id": 7,
                                       "name": "square"}]
