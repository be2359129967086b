"""Settings: validation, old field names still read, the one flat -> sections router."""
import dataclasses

import pytest

from detrkit.config import (
    ARCHS, CLASS_COST_FORMULAS, RENAMED, SECTIONS, DataConfig, LossConfig, ModelConfig, TrainConfig, config_from_dict,
    load_run_config, read_config_file, route, save_run_config,
)
from detrkit.presets import resolve
from detrkit.errors import DetrkitError


def test_arch_and_class_cost_formula_are_validated_naming_the_choices():
    for arch in ARCHS:  # each with a backbone of its family
        assert ModelConfig(arch=arch, backbone="resnet50vd" if arch == "rtdetr" else "resnet50").arch == arch
    with pytest.raises(ValueError, match="detr, two_stage, rtdetr"):
        ModelConfig(arch="yolo")
    with pytest.raises(ValueError, match="unknown RT-DETR backbone 'resnet50'"):
        ModelConfig(arch="rtdetr")
    for formula in CLASS_COST_FORMULAS:
        assert LossConfig(class_cost_formula=formula).class_cost_formula == formula
    with pytest.raises(ValueError, match="class_cost_formula"):
        LossConfig(class_cost_formula="p")


def test_old_field_names_are_read_as_the_fields_they_became():
    """config.json of older checkpoints and config.yaml of older runs say two_stage / class_cost."""
    assert config_from_dict(ModelConfig, {"two_stage": True}).arch == "two_stage"
    assert config_from_dict(ModelConfig, {"two_stage": False}).arch == "detr"
    assert config_from_dict(LossConfig, {"class_cost": "one_minus_prob"}).class_cost_formula == "one_minus_prob"
    assert config_from_dict(LossConfig, {"cost_class": 2.0}).cost_class == 2.0  # the weight keeps its name
    with pytest.raises(ValueError, match="unknown ModelConfig keys: two_stages"):
        config_from_dict(ModelConfig, {"two_stages": True})


def test_every_field_is_routed_to_its_own_section():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert route({f.name: 1}) == ({section: {f.name: 1}}, []), f.name
        for old in RENAMED.get(cls, {}):
            assert route({old: 1}) == ({section: {old: 1}}, [])
    sections, unknown = route({"lr-drop": 5, "bbox_loss": "l1", "dropout": 0.0, "lrr": 1, "preset": "x"})
    assert sections == {"train": {"lr_drop": 5}, "loss": {"bbox_loss": "l1"}, "model": {"dropout": 0.0}}
    assert unknown == ["lrr", "preset"]


def test_yaml_config_file_flat_keys_and_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: detr_r18_tiny, d_model: 32}\nlr: 0.0003\nclass_cost: one_minus_prob\n"
                    "loss: {bbox_loss: smooth_l1}\ndata: {image_size: 64}\n")
    sections = read_config_file(str(path))
    model, loss, data, train = resolve(None, sections)
    assert (train.model, model.d_model, model.nheads, train.lr) == ("detr_r18_tiny", 32, 4, 0.0003)
    assert (loss.bbox_loss, loss.class_cost_formula, data.image_size) == ("smooth_l1", "one_minus_prob", 64)
    path.write_text("lrr: 1\n")
    with pytest.raises(DetrkitError, match="unknown keys lrr"):
        read_config_file(str(path))


def test_no_decay_augment_and_warm_up_are_validated_and_read_as_written(tmp_path):
    """no_decay reads as the loggers do (comma lists, lists, "none"); a run's config.yaml keeps it."""
    assert TrainConfig(no_decay="norm, bias").no_decay == ("norm", "bias")
    assert TrainConfig(no_decay=["bias"]).no_decay == TrainConfig(no_decay="bias,bias").no_decay == ("bias",)
    assert TrainConfig(no_decay="none").no_decay == TrainConfig().no_decay == ()
    with pytest.raises(ValueError, match="no_decay: unknown kind 'weights'; choose from norm, bias"):
        TrainConfig(no_decay="norm,weights")
    with pytest.raises(ValueError, match="augment must be one of detr, flip, rtdetr"):
        DataConfig(augment="mosaic")
    with pytest.raises(ValueError, match="warmup must be a fraction"):
        TrainConfig(warmup_steps=-1)
    cfgs = resolve(None, {"train": {"model": "rtdetr_tiny"}})
    save_run_config(tmp_path / "config.yaml", *cfgs)
    assert load_run_config(tmp_path) == cfgs and cfgs[3].no_decay == ("norm", "bias")


def test_the_fast_recipe_trains_the_backbone_norm_of_a_random_backbone():
    """--recipe fast from random weights: BatchNorm with batch statistics, whatever the preset's; a
    pretrained backbone (--backbone-weights) or the user's own setting keeps its norm."""
    assert resolve("fast", {"train": {"model": "rtdetr_r18"}})[0].backbone_norm == "batch"
    assert resolve("fast", {"train": {"model": "detr_r50"}})[0].backbone_norm == "batch"
    assert resolve("fast", {"train": {"model": "rtdetr_r18", "backbone_weights": "r18.pth"}})[0].backbone_norm == "frozen"
    assert resolve("fast", {"train": {"model": "rtdetr_r18"}, "model": {"backbone_norm": "frozen"}})[0].backbone_norm \
        == "frozen"
    assert resolve(None, {"train": {"model": "detr_r50"}})[0].backbone_norm == "frozen"  # the paper's recipe
