"""Parity with an independent implementation: Hugging Face transformers' DetrForObjectDetection.

A random-init DETR in the configuration of the published ``facebook/detr-resnet-50`` (timm
ResNet-50 backbone, nothing downloaded) is saved with ``save_pretrained``, loaded through
:func:`detrkit.load_model`, and run on the same padded two-image batch: every output and every
loss term must agree.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detrkit import build_criterion, load_model  # noqa: E402
from detrkit.config import LossConfig  # noqa: E402


def _randomise_frozen_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, so the frozen-BN arithmetic is really compared."""
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    for name, p in model.named_parameters():
        if "bn" in name or "downsample.1" in name:
            with torch.no_grad():
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # The configuration of facebook/detr-resnet-50 (COCO: 91 labels -> 92 logits).
    config = DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                        num_labels=91, auxiliary_loss=True, num_queries=100, d_model=256)
    hf = DetrForObjectDetection(config).eval()
    _randomise_frozen_bn(hf, gen)
    # Spread the box and class heads so predictions are not all alike.
    with torch.no_grad():
        hf.class_labels_classifier.weight.normal_(0, 0.2, generator=gen)
        hf.bbox_predictor.layers[-1].weight.normal_(0, 0.2, generator=gen)
    folder = tmp_path_factory.mktemp("hf") / "detr-resnet-50"
    hf.save_pretrained(folder)
    ours = load_model(folder)
    return hf, ours


def _batch():
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 160, 224, generator=gen), torch.randn(3, 192, 128, generator=gen)]
    h, w = 192, 224
    x = torch.zeros(2, 3, h, w)
    mask = torch.ones(2, h, w, dtype=torch.bool)
    for i, img in enumerate(images):
        x[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return images, x, mask


def _targets():
    gen = torch.Generator().manual_seed(2)
    targets = []
    for n in (3, 5):
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, 91, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)})
    return targets


@pytest.fixture(scope="module")
def both_runs(hf_and_ours):
    """One forward of each implementation on the same batch and targets."""
    hf, ours = hf_and_ours
    images, x, mask = _batch()
    targets = _targets()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        # Hugging Face returns the auxiliary (earlier decoder layer) outputs only with labels.
        ref = hf(pixel_values=x, pixel_mask=(~mask).long(), labels=labels)
        out = ours((x, mask))
        out_list = ours(images)  # a list of differently sized images pads to the same batch
    return ref, out, out_list, targets


def test_outputs_match_hugging_face(hf_and_ours, both_runs):
    ours = hf_and_ours[1]
    ref, out, out_list, _ = both_runs
    torch.testing.assert_close(out["pred_logits"], ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=1e-4, rtol=0)
    assert len(out["aux_outputs"]) == len(ref.auxiliary_outputs) == 5
    for a, r in zip(out["aux_outputs"], ref.auxiliary_outputs):
        torch.testing.assert_close(a["pred_logits"], r["logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["pred_boxes"], r["pred_boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out_list["pred_logits"], out["pred_logits"], atol=1e-5, rtol=0)
    # The class mapping comes from the Hugging Face config.
    assert len(ours.classes) == 91 and ours.classes[5]["id"] == 5


def test_losses_match_hugging_face(both_runs):
    ref, out, _, targets = both_runs
    criterion = build_criterion(91, LossConfig(), num_aux=5)
    losses = criterion(out, targets)
    compared = 0
    for key, value in ref.loss_dict.items():
        assert key in losses, key
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared == 6 * 4  # ce, bbox, giou, cardinality for the last and 5 auxiliary layers
    torch.testing.assert_close(losses["loss"], ref.loss, rtol=1e-5, atol=1e-6)
