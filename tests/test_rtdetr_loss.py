"""RT-DETR's loss: detrkit's criterion, set up by the ``rtdetr`` recipe, against Hugging Face's own
(``RTDetrForObjectDetection(labels=...)``, transformers/loss/loss_rt_detr.py), term by term.

Both models run in float64 (see tests/test_rtdetr.py: their outputs then agree to ~1e-11), so that
the comparison is of the losses alone; ours computes them in float32, as in training. Hugging
Face's terms come weighted and named ``loss_vfl``, ``loss_bbox``, ``loss_giou`` with suffixes
``_aux_{i}`` (decoder layer i; the last ``_aux`` is the encoder's proposals) and ``_dn_{i}``
(denoising, per layer); ours are unweighted, ``loss_ce`` ..., with ``_{i}``, ``_enc`` and ``_dn``
(the denoising layers summed).
"""
import copy

import pytest
import torch

from conftest import rtdetr_canvas, rtdetr_images, to_pixel_input
from detrkit.aids import AidedModel
from detrkit.config import LossConfig
from detrkit.criterion import Normalizers, build_criterion
from detrkit.presets import recipe

pytest.importorskip("transformers")

REL = 1e-5
BOXES = [[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.8]], [[0.4, 0.5, 0.4, 0.6]]]
LABELS = [[1, 4, 6], [2]]


@pytest.fixture(scope="module")
def pairs(hf_rtdetr_pairs):
    """Float64 copies of the session's Hugging Face and detrkit models."""
    made = {}

    def pair(kind: str):
        if kind not in made:
            hf, ours, _ = hf_rtdetr_pairs(kind)
            made[kind] = (copy.deepcopy(hf).double(), copy.deepcopy(ours).double())
        return made[kind]

    return pair


def _criterion(model):
    loss = LossConfig(**recipe("rtdetr")["loss"])  # the one place RT-DETR's loss settings live
    return build_criterion(model.num_classes, loss, num_aux=len(model.decoder.layers) - 1, sigmoid_class=True)


def _targets():
    hf = [{"class_labels": torch.tensor(c), "boxes": torch.tensor(b, dtype=torch.float64)} for c, b in zip(LABELS, BOXES)]
    ours = [{"labels": torch.tensor(c), "boxes": torch.tensor(b)} for c, b in zip(LABELS, BOXES)]
    return hf, ours


def _as_ours(hf_losses: dict, layers: int) -> dict:
    """Hugging Face's weighted terms under our names; the denoising layers summed into ``_dn``."""
    out = {}
    for key, value in hf_losses.items():
        name, _, where = key.partition("_aux_") if "_aux_" in key else key.partition("_dn_")
        name = name.replace("loss_vfl", "loss_ce")
        if "_dn_" in key:
            name += "_dn"
        elif where:
            name += "_enc" if int(where) == layers - 1 else f"_{where}"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _assert_terms(ours: dict, criterion, ref) -> None:
    expected = _as_ours(ref.loss_dict, len(ref.intermediate_logits[0]))
    got = {k: float(ours[k]) * w for k, w in criterion.weight_dict.items() if k in ours}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        assert abs(got[key] - value) <= REL * abs(value), f"{key}: ours {got[key]:.8g}, Hugging Face {value:.8g}"
    assert abs(float(ours["loss"]) - float(ref.loss)) <= REL * float(ref.loss)


@pytest.mark.parametrize("kind", ["r18", "v2"])
def test_losses_equal_hugging_face_without_denoising(pairs, kind):
    hf, ours = pairs(kind)
    x = rtdetr_canvas(rtdetr_images()).double()
    hf_targets, targets = _targets()
    with torch.no_grad():  # eval mode: Hugging Face makes no denoising queries
        ref = hf.eval()(pixel_values=x, labels=hf_targets)
        out = ours.eval()(to_pixel_input(x))
    criterion = _criterion(ours)
    losses = criterion(out, targets)
    assert "loss_ce_enc" in losses and "loss_giou_1" in losses and "loss_ce_dn" not in losses
    _assert_terms(losses, criterion, ref)


@pytest.mark.parametrize("kind", ["r18", "v2"])
def test_losses_equal_hugging_face_with_its_denoising_queries(pairs, kind, monkeypatch):
    """Training mode; Hugging Face's own denoising queries (drawn with a fixed seed) are handed to
    our denoising aid, which then lays out, matches and normalises them its own way."""
    from transformers.models.rt_detr import modeling_rt_detr
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

    hf, ours = pairs(kind)
    module = modeling_rt_detr if kind == "r18" else modeling_rt_detr_v2
    made = {}
    original = module.get_contrastive_denoising_training_group

    def record(*args, **kwargs):
        content, boxes_logit, float_mask, meta = original(*args, **kwargs)
        # A float64 mask for the float64 run (see test_rtdetr.py's denoising test).
        made["queries"] = (content, boxes_logit, float_mask.to(content.dtype), meta)
        return made["queries"]

    monkeypatch.setattr(module, "get_contrastive_denoising_training_group", record)
    x = rtdetr_canvas(rtdetr_images()).double()
    hf_targets, targets = _targets()
    torch.manual_seed(3)
    with torch.no_grad():
        ref = hf.train()(pixel_values=x, labels=hf_targets)
    content, boxes_logit, float_mask, meta = made["queries"]
    e, q = meta["dn_num_split"]
    groups = meta["dn_num_group"]
    assert groups == 100 // 3  # num_denoising // the most targets of an image (ours: config.denoising_groups)
    order = torch.cat([torch.arange(e, e + q), torch.arange(e)])  # theirs first, ours after the model's queries
    blocked = torch.isinf(float_mask)[order][:, order]
    aided = AidedModel(ours.train(), LossConfig(**recipe("rtdetr")["loss"])).double()
    monkeypatch.setattr(aided.denoising, "queries", lambda t: (content, boxes_logit.sigmoid(), blocked,
                                                               {"pad": e // (2 * groups), "groups": groups}))
    with torch.no_grad():
        out = aided(to_pixel_input(x), targets)
    criterion = _criterion(ours)
    losses = criterion(out, targets)
    _assert_terms(losses, criterion, ref)
    # Layer by layer, too: Hugging Face's _dn_{i} against our denoising layer i alone.
    norm = criterion.normalizers([targets], out)
    dn_norm = Normalizers(norm.num_boxes * groups, norm.dn_ce_weight)
    layers = [*out["dn_outputs"]["aux_outputs"], out["dn_outputs"]]
    for i, layer in enumerate(layers):
        mine = criterion.layer_losses(layer, targets, dn_norm, log=False, indices=out["dn_indices"])
        theirs = float(ref.loss_dict[f"loss_vfl_dn_{i}"])
        assert abs(float(mine["loss_ce"]) * criterion.weight_dict["loss_ce"] - theirs) <= REL * theirs, i
