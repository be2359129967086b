"""Mosaic samples (DEIM's dense one-to-one matching): more objects per image, each sample a function
of (seed, epoch, index) whatever the loader workers. RT-DETR's augmentation: the same, and its stop. The sample order itself: tests/test_training.py."""
import pytest
import torch

from detrkit.config import DataConfig
from detrkit.data.build import augments, make_train_loader, train_samples
from detrkit.data.coco import CocoDetection
from detrkit.data.sampler import MosaicSamples, SeededSamples
from detrkit.data.transforms import Mosaic, train_transforms


@pytest.fixture(scope="module")
def train_set(synthetic):
    paths = synthetic(8, 2)
    return CocoDetection(paths["train_json"], paths["train_images"], train_transforms(64, None, "flip"))


def _same(a, b) -> bool:
    (image_a, target_a), (image_b, target_b) = a, b
    return torch.equal(image_a, image_b) and all(torch.equal(torch.as_tensor(target_a[k]), torch.as_tensor(target_b[k]))
                                                 for k in target_a)


def test_mosaics_hold_more_objects_and_depend_only_on_seed_epoch_and_index(train_set):
    cfg = DataConfig(image_size=64, mosaic=1.0)
    assert train_samples(train_set, cfg, mosaic=False) is train_set  # after mosaic_until
    assert train_samples(train_set, DataConfig(image_size=64), mosaic=True) is train_set  # mosaic 0: off
    mosaics = SeededSamples(train_samples(train_set, cfg, mosaic=True), seed=0, epoch=3)
    plain = SeededSamples(train_set, seed=0, epoch=3)
    n = len(train_set)
    objects = [len(mosaics[i][1]["labels"]) for i in range(n)]
    assert sum(objects) > 2 * sum(len(plain[i][1]["labels"]) for i in range(n))  # about 4 images' objects each
    image, target = mosaics[0]
    assert image.shape[-2:] == (64, 64) and target["image_id"] == train_set.image_ids[0]
    assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()  # cxcywh normalised
    # The same sample whatever was read before it (here: in reverse order), another one in another epoch.
    again = SeededSamples(train_samples(train_set, cfg, mosaic=True), seed=0, epoch=3)
    assert all(_same(again[i], mosaics[i]) for i in reversed(range(n)))
    other = SeededSamples(train_samples(train_set, cfg, mosaic=True), seed=0, epoch=4)
    assert not all(_same(other[i], mosaics[i]) for i in range(n))


def test_the_probability_is_the_share_of_mosaics(train_set, monkeypatch):
    made = []
    real = Mosaic.__call__
    monkeypatch.setattr(Mosaic, "__call__", lambda self, samples: made.append(1) or real(self, samples))
    samples = SeededSamples(MosaicSamples(train_set, Mosaic(32), train_set.transforms, 0.5), seed=1, epoch=0)
    for i in range(40):
        samples[i % len(train_set)]
    assert 10 <= len(made) <= 30
    with pytest.raises(ValueError):
        DataConfig(mosaic=1.5)


def test_loader_workers_read_the_same_mosaics(train_set):
    samples = train_samples(train_set, DataConfig(image_size=64, mosaic=0.5), mosaic=True)
    batches = [list(make_train_loader(samples, 4, workers, seed=0, epoch=1)) for workers in (0, 2)]
    for (images_a, _, targets_a), (images_b, _, targets_b) in zip(*batches):
        assert torch.equal(images_a, images_b)
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets_a, targets_b))


def test_rtdetr_augmentation_depends_only_on_seed_epoch_and_index_and_stops(synthetic):
    paths = synthetic(8, 2)
    cfg = DataConfig(image_size=64, resize="square", augment="rtdetr", augment_stop_epoch=-1)
    strong = CocoDetection(paths["train_json"], paths["train_images"],
                           train_transforms(cfg.image_size, cfg.max_size, cfg.augment, cfg.resize))
    n = len(strong)
    samples = SeededSamples(train_samples(strong, cfg, mosaic=False), seed=0, epoch=2)
    again = SeededSamples(train_samples(strong, cfg, mosaic=False), seed=0, epoch=2)
    assert all(_same(again[i], samples[i]) for i in reversed(range(n)))
    assert not all(_same(SeededSamples(strong, seed=0, epoch=3)[i], samples[i]) for i in range(n))
    assert not all(_same(SeededSamples(strong, seed=1, epoch=2)[i], samples[i]) for i in range(n))
    # Stopped: exactly the flip-only samples (the same draws for the flip), nothing of the rest.
    flip = CocoDetection(paths["train_json"], paths["train_images"], train_transforms(64, None, "flip", "square"))
    stopped = SeededSamples(train_samples(strong, cfg, mosaic=False, augment=False), seed=0, epoch=2)
    assert all(_same(stopped[i], SeededSamples(flip, seed=0, epoch=2)[i]) for i in range(n))
    assert not all(_same(stopped[i], samples[i]) for i in range(n))
    assert strong.transforms is not None and strong[0][0].shape == (3, 64, 64)  # the training set itself is unchanged


@pytest.mark.parametrize("stop,epochs,first_stopped", [(-1, 72, 71), (71, 72, 71), (-3, 120, 117), (-1, 12, 11),
                                                       (0, 5, 0), (-9, 3, 0), (10, 5, None), (None, 72, None)])
def test_the_augmentation_stops_at_its_epoch(stop, epochs, first_stopped):
    """RT-DETRv2's stop_epoch (71 of 72; 117 of 120), counted from 0, or back from the end."""
    cfg = DataConfig(augment="rtdetr", augment_stop_epoch=stop)
    on = [augments(cfg, epoch, epochs) for epoch in range(epochs)]
    assert on == [first_stopped is None or epoch < first_stopped for epoch in range(epochs)]
