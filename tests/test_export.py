"""ONNX export: onnxruntime reproduces PyTorch on padded batches, with and without postprocessing."""
import argparse
import dataclasses
import json
import math
import sys

import pytest
import torch
from conftest import THREE_CLASSES as CLASSES
from conftest import tiny_config

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from detrkit import build_model, load_model, postprocess, save_model  # noqa: E402
from detrkit.config import ModelConfig, config_from_dict  # noqa: E402
from detrkit.data.batch import pad_images  # noqa: E402
from detrkit.export import (  # noqa: E402
    ONNX_EXTRA, RAW_OUTPUTS, OnnxDetector, add_export_arguments, check_onnx, export_onnx, run_export, sample_batch,
)
from detrkit.model.rtdetr_decoder import PRIOR_PROB  # noqa: E402
from detrkit.presets import preset  # noqa: E402

TINY = tiny_config(d_model=64, dim_feedforward=128, frozen_stages=1, num_queries=10, num_classes=3)
INFERENCE = {"image_size": 64, "max_size": None}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model(TINY), tmp_path_factory.mktemp("ckpt") / "tiny", classes=CLASSES,
                      inference=INFERENCE)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def dynamic_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "dynamic.onnx", image_size=(64, 80),
                       dynamic_batch=True)


def padded(*sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return pad_images([torch.randn(3, h, w, generator=gen) for h, w in sizes])


def run(path, images, mask, **extra):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy(), "mask": mask.numpy(), **{k: v.numpy() for k, v in extra.items()}}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (torch.from_numpy(a) for a in session.run(names, feeds))))


def test_padded_batch_matches_pytorch_and_the_mask_is_used(model, dynamic_onnx):
    images, mask = padded((64, 80), (40, 56))  # two sizes, padded together; H, W not the export's
    got = run(dynamic_onnx, images, mask)
    assert set(got) == {"pred_logits", "pred_boxes"}  # the last layer only, no auxiliary outputs
    with torch.no_grad():
        want = model((images, mask))
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=0, atol=1e-4)
    assert check_onnx(model, dynamic_onnx, images=images, mask=mask) < 1e-4
    # The mask is a real input of the graph, not a constant traced into it.
    unmasked = run(dynamic_onnx, images, torch.zeros_like(mask))
    assert (unmasked["pred_boxes"][1] - got["pred_boxes"][1]).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_and_image_size(model, dynamic_onnx, batch):
    images, mask = padded(*[(96, 72), (50, 70), (80, 40)][:batch], seed=batch)
    assert check_onnx(model, dynamic_onnx, images=images, mask=mask) < 1e-4


def test_fixed_batch(model, tmp_path):
    path = export_onnx(model, tmp_path / "fixed.onnx", image_size=(64, 64))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, "height", "width"], [1, "height", "width"]]
    images, mask = padded((64, 64), (48, 30))
    assert check_onnx(model, path, images=images, mask=mask) < 1e-4  # run one image at a time
    # The detector pads each chunk of images together, then runs them one by one: as predict does.
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(90, 120), (60, 50)]]
    got, want = OnnxDetector(path).predict(inputs, threshold=0.0), model.predict(inputs, threshold=0.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=0, atol=1e-3)


def test_postprocess_graph_matches_detrkit_postprocess(model, tmp_path):
    path = export_onnx(model, tmp_path / "post.onnx", image_size=(64, 64), dynamic_batch=True,
                       with_postprocess=True)
    images, mask = padded((64, 64), (48, 30))
    orig = torch.tensor([[480, 640], [300, 187]])
    got = run(path, images, mask, orig_sizes=orig)
    with torch.no_grad():
        want = postprocess(model((images, mask)), orig)  # threshold 0: every query, labels = indices
    for i, w in enumerate(want):
        torch.testing.assert_close(got["scores"][i], w["scores"], rtol=0, atol=1e-5)
        assert torch.equal(got["labels"][i], w["labels"])
        torch.testing.assert_close(got["boxes"][i], w["boxes"], rtol=0, atol=1e-2)  # pixels of 640
    assert check_onnx(model, path, images=images, mask=mask, orig_sizes=orig) < 1e-2


def test_metadata_describes_the_model(model, dynamic_onnx):
    meta = {p.key: p.value for p in onnx.load(str(dynamic_onnx)).metadata_props}
    assert json.loads(meta["classes"]) == model.classes
    assert json.loads(meta["inference"]) == INFERENCE
    assert config_from_dict(ModelConfig, json.loads(meta["model_config"])) == TINY


def test_export_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    m = build_model(TINY).train()
    export_onnx(m, tmp_path / "m.onnx", image_size=(64, 64))
    assert m.training and m.aux_loss and m.precision == "fp32"
    assert all(mod.training for mod in m.modules())


def test_onnx_detector_equals_predict(model, dynamic_onnx, tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in [(90, 120), (60, 50)]]
    Image.fromarray(images[1].permute(1, 2, 0).numpy()).save(tmp_path / "b.png")
    inputs = [images[0], tmp_path / "b.png", Image.fromarray(images[0].permute(1, 2, 0).numpy())]
    detector = OnnxDetector(dynamic_onnx)
    assert detector.classes == model.classes and detector.inference == INFERENCE
    got = detector.predict(inputs, threshold=0.0)
    want = model.predict(inputs, threshold=0.0)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert len(g["scores"]) == TINY.num_queries
        assert torch.equal(g["labels"], w["labels"]) and g["names"] == w["names"]
        assert set(g["labels"].tolist()) <= {3, 7, 12}
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=0, atol=1e-3)


def test_two_stage_model_exports(tmp_path):
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(TINY, arch="two_stage")).eval()
    path = export_onnx(m, tmp_path / "two.onnx", image_size=(64, 64), dynamic_batch=True, with_postprocess=True)
    images, mask = padded((64, 96), (70, 50))
    assert check_onnx(m, path, images=images, mask=mask) < 1e-3
    got = run(path, images, mask, orig_sizes=torch.tensor([[64, 96], [70, 50]]))
    with torch.no_grad():
        want = postprocess(m((images, mask)), [[64, 96], [70, 50]], sigmoid_class=True)
    assert torch.equal(got["labels"][0], want[0]["labels"])
    torch.testing.assert_close(got["scores"][1], want[1]["scores"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="too small"):  # 2 x 2 feature cells < 10 queries
        export_onnx(m, tmp_path / "small.onnx", image_size=(32, 32))


def test_command(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "cli.onnx"
    args = parser.parse_args(["--weights", str(checkpoint), "--format", "onnx", "--image-size", "64", "72",
                              "--with-postprocess", "--out", str(out)])
    assert run_export(args) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    diff = float(printed.rsplit(":", 1)[1])
    assert diff < 1e-3


def test_missing_onnxruntime_says_how_to_install(dynamic_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"pip install 'detrkit\[onnx\]'") as e:
        OnnxDetector(dynamic_onnx)
    assert str(e.value) == ONNX_EXTRA


def test_cli_export_then_predict_with_the_onnx_file(checkpoint, tmp_path):
    """`detrkit export` then `detrkit predict --weights x.onnx` gives the checkpoint's detections."""
    from PIL import Image

    from detrkit.cli import main

    images = tmp_path / "imgs"
    images.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate([(60, 80), (72, 50)]):
        Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()).save(
            images / f"{i}.png")
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(checkpoint), "--out", str(onnx_file), "--dynamic-batch"]) == 0
    assert main(["predict", "--weights", str(checkpoint), str(images), "--threshold", "0", "--out",
                 str(tmp_path / "a")]) == 0
    assert main(["predict", "--weights", str(onnx_file), str(images), "--threshold", "0", "--out",
                 str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "detections.json").read_text())
    b = json.loads((tmp_path / "b" / "detections.json").read_text())
    for ra, rb in zip(a, b):
        assert [d["category_id"] for d in ra["detections"]] == [d["category_id"] for d in rb["detections"]]
        for da, db in zip(ra["detections"], rb["detections"]):
            assert abs(da["score"] - db["score"]) < 1e-4
            assert max(abs(x - y) for x, y in zip(da["box"], db["box"])) < 0.02


# --- RT-DETR-R18 at real image sizes ------------------------------------------------------------------------------
@torch.no_grad()
def _redraw(model: torch.nn.Module, seed: int = 0) -> None:
    """Variance-preserving weights for an RT-DETR, so that its features, scores and boxes vary from
    cell to cell as a trained model's do (its own initialisation gives nearly constant maps and
    boxes equal to the anchors): every convolution and linear weight ~ N(0, 1 / fan_in), biases 0
    but the class heads' prior (-4.6; the off-grid cells, which carry no features, then score at
    the prior, below the selected ones), BatchNorm statistics and affine terms near the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=gen)
            if m.bias is not None:
                m.bias.zero_()
        if "BatchNorm" in type(m).__name__:
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    prior = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    for head in [model.decoder.enc_class, *model.decoder.class_embed]:
        head.bias.fill_(prior)


def test_rtdetr_r18_equals_pytorch_at_two_image_sizes(tmp_path):
    """rtdetr_r18 (3 classes) exported once, traced at 640 x 640, run by onnxruntime on two images of
    different sizes padded together, at 640 x 640 and at 480 x 800: every output within 1e-4 of PyTorch.

    The queries are the 300 best-scoring of the 8,400 encoder cells (6,000 at 480 x 800). Among that
    many scores some pairs lie within float rounding of each other (exact ties too), and onnxruntime's
    convolutions, rounding otherwise than PyTorch's, may rank such a pair the other way round. That
    swaps the two queries' slots and changes nothing else: the decoder treats its queries as a set
    (self-attention and the heads know no slot order) and postprocessing sorts by score. So each
    PyTorch query is paired with the onnxruntime query whose outputs are nearest; asserted: the pairing
    is one-to-one and unambiguous, only queries whose encoder scores tie (within 1e-5) changed slots,
    and every paired output is within 1e-4. A different set of queries (a cell in the top 300 on one
    side only) would change every query a little through self-attention and leave one unpaired: a failure.
    About 5 s on an idle 2-core machine (25 s on a busy one).
    """
    torch.manual_seed(0)
    model = build_model(preset("rtdetr_r18", num_classes=3)).eval()
    _redraw(model)
    path = export_onnx(model, tmp_path / "r18.onnx", image_size=(640, 640), dynamic_batch=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(640, 640), (480, 800)]:
        images, mask = sample_batch(size, 2, "cpu")  # (640, 640) + (480, 426) padded: the mask is used
        got = dict(zip(RAW_OUTPUTS, session.run(RAW_OUTPUTS, {"images": images.numpy(), "mask": mask.numpy()})))
        with torch.no_grad():
            want = model((images, mask))
        for b in range(2):
            ours = torch.cat([want["pred_logits"][b], want["pred_boxes"][b]], -1)  # (300, 3 + 4)
            theirs = torch.cat([torch.from_numpy(got["pred_logits"][b]), torch.from_numpy(got["pred_boxes"][b])], -1)
            distance = torch.cdist(ours.double(), theirs.double(), p=float("inf"))  # (300, 300)
            nearest = distance.topk(2, dim=1, largest=False)
            pair = nearest.indices[:, 0]
            assert len(set(pair.tolist())) == len(pair), (size, b)  # one-to-one
            assert nearest.values[:, 0].max() < 1e-4, (size, b, float(nearest.values[:, 0].max()))
            assert nearest.values[:, 1].min() > 1e-3, (size, b)  # unambiguous: every other query 10x farther
            score = want["enc_outputs"]["pred_logits"][b].max(-1).values  # (300,) the selection's, best first
            moved = (pair != torch.arange(len(pair))).nonzero().flatten()
            assert ((score[moved] - score[pair[moved]]).abs() < 1e-5).all(), (size, b, moved.tolist())
