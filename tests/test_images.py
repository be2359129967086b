"""Image files (detrkit.data.images): EXIF-rotated RGB, tensors, finding files, checking them."""
import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from detrkit.data.images import check_image, exif_size, image_files, image_tensor, open_rgb
from detrkit.errors import DataError


def test_every_mode_becomes_rgb_and_tensors_pass_through(tmp_path):
    for mode in ("RGB", "L", "P", "RGBA"):
        write_image(tmp_path / f"{mode}.png", 30, 20, mode=mode)
        image = open_rgb(tmp_path / f"{mode}.png")
        assert image.mode == "RGB" and image.size == (30, 20)
        tensor = image_tensor(tmp_path / f"{mode}.png")
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 20, 30)
        assert torch.equal(image_tensor(image), tensor)
    assert image_tensor(tensor) is tensor


def test_exif_rotation_is_applied_and_checked(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40 x 20, displayed 20 x 40
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "r.jpg") as raw:
        assert exif_size(raw) == (20, 40)
    assert open_rgb(tmp_path / "r.jpg").size == (20, 40)
    assert check_image(tmp_path / "r.jpg", (40, 20)) is None
    problem = check_image(tmp_path / "r.jpg", (20, 40))
    assert "is 20x40 but the JSON says 40x20" in problem and "before EXIF rotation" in problem


def test_unreadable_files_name_the_file_and_the_list(tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(DataError, match="cannot read the image .listed in ann.json"):
        open_rgb(tmp_path / "bad.jpg", "ann.json")
    assert "image file not found" in check_image(tmp_path / "missing.jpg", (1, 1))


def test_image_files_from_folders_files_and_patterns(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.JPEG"):
        write_image(tmp_path / name, 8, 8)
    (tmp_path / "notes.txt").write_text("-")
    assert image_files([str(tmp_path)]) == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub" / "c.JPEG"]
    assert image_files([str(tmp_path / "*.png"), str(tmp_path / "a.jpg")]) == [tmp_path / "b.png", tmp_path / "a.jpg"]
    with pytest.raises(DataError, match="no such file"):
        image_files([str(tmp_path / "nothing*.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        image_files([str(tmp_path / "empty")])
