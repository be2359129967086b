import torch

from detrkit import postprocess


def test_absolute_xyxy_inside_the_image_and_category_ids():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=gen)
    boxes = torch.cat([torch.rand(2, 5, 2, generator=gen) * 0.5 + 0.25, torch.rand(2, 5, 2, generator=gen) * 0.4], -1)
    sizes = torch.tensor([[480, 640], [300, 200]])
    res = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, index_to_category=[3, 7, 11])
    for r, (h, w) in zip(res, sizes.tolist()):
        assert r["boxes"].shape == (5, 4)
        assert (r["boxes"][:, 0] >= 0).all() and (r["boxes"][:, 2] <= w).all()
        assert (r["boxes"][:, 1] >= 0).all() and (r["boxes"][:, 3] <= h).all()
        assert (r["boxes"][:, 2] >= r["boxes"][:, 0]).all()
        assert set(r["labels"].tolist()) <= {3, 7, 11}
    prob = logits.softmax(-1)[..., :-1]
    torch.testing.assert_close(res[0]["scores"], prob[0].max(-1).values)
    # Known box: centre (0.5, 0.5), size (0.5, 0.25) in a 480 x 640 (h x w) image.
    one = postprocess({"pred_logits": logits[:1, :1], "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])},
                      [[480, 640]])
    torch.testing.assert_close(one[0]["boxes"], torch.tensor([[160.0, 180.0, 480.0, 300.0]]))


def test_threshold_and_no_object_never_wins():
    logits = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]]])  # query 1 is "no object"
    res = postprocess({"pred_logits": logits, "pred_boxes": torch.full((1, 2, 4), 0.5)}, [[10, 10]], threshold=0.5)
    assert res[0]["scores"].shape == (1,) and res[0]["labels"].tolist() == [0]
