"""Pictures: boxes land where they should, files are written, curves survive sparse csvs."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.visualize import (
    class_color, draw_detections, plot_training_curves, save_image, side_by_side, training_curves_figure,
)


def gray(h=120, w=160):
    return torch.full((3, h, w), 128, dtype=torch.uint8)


def test_draw_detections_shape_and_pixels():
    image = gray()
    boxes = torch.tensor([[20.0, 30.0, 90.0, 100.0], [100.0, 10.0, 150.0, 50.0]])
    out = draw_detections(image, boxes, ["circle", "square"], scores=torch.tensor([0.93, 0.5]),
                          colors=["red", (0, 0, 255)])
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert torch.equal(image, gray())  # the input is not drawn on
    changed = (out != image).any(0)  # (H, W)
    # The box outlines are drawn in their colours...
    assert out[:, 100, 55].tolist() == [255, 0, 0]  # bottom edge of the first box
    assert out[:, 30, 150].tolist() == [0, 0, 255]  # right edge of the second box
    # ...the inside of a box (away from its caption) and far-away pixels are untouched.
    assert not changed[60:95, 30:85].any()
    assert not changed[110:, :].any()


def test_draw_detections_defaults_and_edge_cases():
    image = gray()
    out = draw_detections(image, torch.tensor([[-10.0, -5.0, 50.0, 60.0]]), ["star"])  # past the border
    assert out.shape == image.shape and (out != image).any()
    assert class_color("star") == class_color("star")
    one = draw_detections(image, torch.tensor([[10.0, 10.0, 50.0, 50.0]] * 2), ["a", "b"], colors=(0, 255, 0))
    assert one[:, 50, 30].tolist() == [0, 255, 0]
    per_box = draw_detections(image, torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]]),
                              ["a", "b"], colors=("red", "blue"))
    assert per_box[:, 50, 30].tolist() == [255, 0, 0] and per_box[:, 90, 75].tolist() == [0, 0, 255]
    empty = draw_detections(image, torch.zeros(0, 4), [])
    assert torch.equal(empty, image)
    with pytest.raises(ValueError, match="labels"):
        draw_detections(image, torch.zeros(2, 4), ["a"])
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(image.float(), torch.zeros(0, 4), [])


def test_save_image_round_trip(tmp_path):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    path = save_image(image, tmp_path / "sub" / "x.png")
    with Image.open(path) as im:
        back = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    assert torch.equal(back, image)


def test_side_by_side(tmp_path):
    pred = draw_detections(gray(), torch.tensor([[10.0, 10.0, 60.0, 60.0]]), ["a"], torch.tensor([0.8]))
    gt = gray(100, 140)
    path = side_by_side(pred, gt, tmp_path / "pair.png")
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def assert_png(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_training_curves_with_missing_metrics(tmp_path):
    header = ["epoch", "seconds", "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou",
              "lr", "AP", "AP50"]
    rows = []
    for epoch in range(1, 9):
        evaluated = epoch % 3 == 0  # AP only every third epoch: empty cells elsewhere
        rows.append([epoch, 12.5, 3.0 / epoch, 1.0 / epoch, 0.5 / epoch, 0.8 / epoch, 1e-4,
                     f"{0.05 * epoch:.4f}" if evaluated else "", f"{0.1 * epoch:.4f}" if evaluated else ""])
    write_csv(tmp_path / "results.csv", header, rows)
    out = plot_training_curves(tmp_path / "results.csv", tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)


def test_training_curves_one_panel_per_loss_term_and_metric(tmp_path):
    # As training writes it: the total loss (~20) beside terms of 0.05-2, and counters that are no losses.
    header = ["epoch", "seconds", "steps", "lr", "train_class_error", "train_loss", "train_loss_bbox",
              "train_loss_bbox_0", "train_loss_ce", "train_loss_giou", "AP", "AP50", "AP75", "AR100"]
    rows = [[e, 50.0, 250 * e, 1e-4, 70 - e, 24 - e, 0.5 / e, 0.6 / e, 2.0 - 0.1 * e, 1.2 / e,
             0.1 * e if e % 2 == 0 else "", 0.2 * e if e % 2 == 0 else "", 0.05 * e if e % 2 == 0 else "", 0.3]
            for e in range(1, 7)]
    write_csv(tmp_path / "results.csv", header, rows)
    fig = training_curves_figure(tmp_path / "results.csv")
    series = ["train_loss", "train_loss_bbox", "train_loss_bbox_0", "train_loss_ce", "train_loss_giou",
              "AP", "AP50", "AP75"]
    assert [ax.get_title() for ax in fig.axes] == series  # one panel each, the total first
    for ax, name in zip(fig.axes, series):
        col = header.index(name)
        want = [(r[0], float(r[col])) for r in rows if r[col] != ""]  # AP only where it was measured
        (line,) = ax.get_lines()
        assert np.allclose(line.get_xdata(), [e for e, _ in want]) and np.allclose(line.get_ydata(), [v for _, v in want])
        low, high = ax.get_ylim()
        top = max(v for _, v in want)
        assert high < 1.2 * top  # its own scale: 0.5 is not drawn flat under the total's 23
        if name.startswith("AP"):
            assert low == 0
    assert_png(plot_training_curves(tmp_path / "results.csv", tmp_path / "results.png"))


@pytest.mark.parametrize("header,row", [
    (["epoch", "seconds", "train_loss", "AP", "AP50"], [0, 3.2, 4.1, "", ""]),  # one row, never evaluated
    (["epoch", "seconds", "train_loss", "train_loss_ce"], [1, 3.2, 4.1, 1.2]),  # no metric columns
    (["epoch", "seconds", "train_loss", "AP", "AP50"], [1, 3.2, 4.1, 0.25, 0.5]),  # one evaluated row
])
def test_training_curves_one_row(tmp_path, header, row):
    write_csv(tmp_path / "results.csv", header, [row])
    assert_png(plot_training_curves(tmp_path / "results.csv", tmp_path / "curves.png"))


def test_training_curves_header_only(tmp_path):
    write_csv(tmp_path / "results.csv", ["epoch", "train_loss", "AP"], [])
    assert_png(plot_training_curves(tmp_path / "results.csv", tmp_path / "curves.png"))


def test_no_pyplot_state(tmp_path):
    """Our figures never go through pyplot: none is left open in its figure manager, and its backend
    and current figure are the caller's."""
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    plt.close("all")
    mine = plt.figure()  # the caller's own current figure
    write_csv(tmp_path / "results.csv", ["epoch", "train_loss"], [[1, 2.0], [2, 1.0]])
    plot_training_curves(tmp_path / "results.csv", tmp_path / "curves.png")
    side_by_side(gray(), gray(), tmp_path / "pair.png")
    assert plt.get_fignums() == [mine.number] and plt.gcf() is mine and plt.get_backend() == backend
    plt.close(mine)
