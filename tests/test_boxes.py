import torch
from torchvision.ops import generalized_box_iou

from detrkit.boxes import (
    cxcywh_to_xyxy, elementwise_generalized_box_iou, pairwise_generalized_box_iou, scale_boxes, xyxy_to_cxcywh,
)


def test_round_trip():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(50, 2, generator=gen), torch.rand(50, 2, generator=gen) * 0.5 + 0.01], 1)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes)
    xyxy = cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)


def test_known_values():
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(cxcywh_to_xyxy(box), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    scaled = scale_boxes(torch.tensor([[[0.1, 0.2, 0.5, 1.0]]]), torch.tensor([[100.0, 200.0]]))  # h=100, w=200
    torch.testing.assert_close(scaled, torch.tensor([[[20.0, 20.0, 100.0, 100.0]]]))


def test_elementwise_giou_is_the_diagonal_of_the_pairwise_matrix():
    gen = torch.Generator().manual_seed(1)
    a = cxcywh_to_xyxy(torch.cat([torch.rand(30, 2, generator=gen), torch.rand(30, 2, generator=gen) * 0.3 + 0.01], 1))
    b = cxcywh_to_xyxy(torch.cat([torch.rand(30, 2, generator=gen), torch.rand(30, 2, generator=gen) * 0.3 + 0.01], 1))
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)),
                               rtol=0, atol=1e-7)
    # Identical boxes: GIoU 1; far apart: negative.
    assert torch.allclose(elementwise_generalized_box_iou(a, a), torch.ones(30))
    far = elementwise_generalized_box_iou(torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 1.0, 1.0]]))
    assert far.item() < -0.9


def test_pairwise_giou_equals_torchvision_for_one_set_and_a_batch():
    gen = torch.Generator().manual_seed(2)

    def boxes(*shape):
        return cxcywh_to_xyxy(torch.cat([torch.rand(*shape, 2, generator=gen),
                                         torch.rand(*shape, 2, generator=gen) * 0.3 + 0.01], -1))

    a, b = boxes(4, 30), boxes(4, 7)
    batched = pairwise_generalized_box_iou(a, b)
    assert batched.shape == (4, 30, 7)
    for i in range(4):
        torch.testing.assert_close(batched[i], generalized_box_iou(a[i], b[i]), rtol=0, atol=1e-7)
        torch.testing.assert_close(pairwise_generalized_box_iou(a[i], b[i]), batched[i], rtol=0, atol=0)
