"""The detector adapter and `detrkit predict` over many files: a folder of good images mixed with
files that are not images skips each bad file with one line, writes everything else, and fails."""
import json

import numpy as np
import pytest
import torch
from conftest import THREE_CLASSES, tiny_config
from PIL import Image

from detrkit import build_model, save_model
from detrkit.cli import main
from detrkit.detector import Detector

BAD = {"notes.jpg": b"these are my holiday notes, not a picture\n", "empty.jpg": b""}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_config(num_queries=5, num_classes=3))
    return save_model(model, tmp_path_factory.mktemp("det") / "tiny", classes=THREE_CLASSES,
                      inference={"image_size": 64, "max_size": None})


def _jpeg(path, width, height, seed) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((width, height)).save(path, quality=90)
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path):
    """Four good JPEGs of three sizes, and between them a text file, a zero-byte file and a
    truncated JPEG, all named .jpg; sorted by name the bad ones fall between good ones."""
    root = tmp_path / "photos"
    root.mkdir()
    for i, (name, (w, h)) in enumerate({"a.jpg": (64, 48), "c.jpg": (48, 64), "e.jpg": (64, 48),
                                        "g.jpg": (80, 60)}.items()):
        whole = _jpeg(root / name, w, h, seed=i)
    (root / "f-cut.jpg").write_bytes(whole[:len(whole) // 2])  # the first half of a JPEG
    for name, content in BAD.items():
        (root / name).write_bytes(content)
    return root


def test_predict_skips_each_unreadable_file_writes_the_rest_and_fails(checkpoint, folder, tmp_path, capsys):
    good = sorted(f for f in folder.iterdir() if len(f.stem) == 1)
    bad = sorted(set(folder.iterdir()) - set(good))
    assert len(good) == 4 and len(bad) == 3
    flags = ["--weights", str(checkpoint), "--threshold", "0.05", "--batch-size", "2", "--device", "cpu"]
    assert main(["predict", str(folder), *flags, "--out", str(tmp_path / "mixed")]) == 2
    out, err = capsys.readouterr()
    # One line per bad file, naming it and why; the summary names them all and the exit status is 2.
    lines = (out + err).splitlines()
    for f, why in zip(bad, ["empty file: 0 bytes", "truncated", "unidentifiedimageerror"]):
        skip_lines = [line for line in lines if line.startswith("skipped ") and str(f) in line]
        assert len(skip_lines) == 1 and why in skip_lines[0].lower(), (f, skip_lines)
    assert sum(line.startswith("skipped ") for line in lines) == 3
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("detrkit predict: error: 4 images") and all(str(f) in summary for f in bad)
    # Every good image has its picture and its detections; nothing of the bad files is written.
    assert sorted(p.name for p in (tmp_path / "mixed").glob("*.png")) == [f"{f.stem}.png" for f in good]
    records = json.loads((tmp_path / "mixed" / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(f) for f in good]
    assert sum(len(r["detections"]) for r in records) > 0
    # ... the same detections as a run on the good files alone (the batches are the same).
    assert main(["predict", *map(str, good), *flags, "--out", str(tmp_path / "clean")]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert json.loads((tmp_path / "clean" / "detections.json").read_text()) == records


def test_a_folder_of_only_bad_files_writes_an_empty_list_and_fails(checkpoint, tmp_path, capsys):
    root = tmp_path / "bad"
    root.mkdir()
    for name, content in BAD.items():
        (root / name).write_bytes(content)
    assert main(["predict", str(root), "--weights", str(checkpoint), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "0 images, 0 detections" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []


def test_detector_predict_and_detect(checkpoint, folder):
    detector = Detector(checkpoint, device="cpu")
    assert detector.backend == "pytorch" and detector.info()["classes"] == THREE_CLASSES
    files = [folder / "a.jpg", folder / "e.jpg"]  # the same size: one batch without padding
    every = detector.detect(files)
    kept = detector.predict(files, threshold=0.3)
    for all_, some in zip(every, kept):
        assert len(all_["scores"]) == 5  # threshold 0 keeps every query
        assert torch.equal(some["scores"], all_["scores"][all_["scores"] > 0.3])
