"""HungarianMatcher: optimal, per-image, independent of the class-cost convention."""
import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detrkit import HungarianMatcher
from detrkit.matcher import full_matrix_match


def _random_problem(gen, batch, queries, counts, classes=5):
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=gen),
        "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1,
    }
    targets = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, classes, (n,), generator=gen), "boxes": torch.cat([cxcy, wh], 1)})
    return outputs, targets


def _total(cost, rows, cols):
    return float(cost[rows, cols].sum())


@pytest.mark.parametrize("seed", range(5))
def test_optimal_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    outputs, targets = _random_problem(gen, 1, 5, [3])
    matcher = HungarianMatcher()
    (rows, cols), = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                               targets[0]["labels"], targets[0]["boxes"])
    best = min(sum(float(cost[q, t]) for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert _total(cost, rows, cols) == pytest.approx(best, abs=1e-5)
    assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]


def test_batched_equals_one_image_at_a_time():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _random_problem(gen, 4, 20, [3, 0, 7, 1])
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b in range(4):
        single = matcher({k: v[b: b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_full_matrix_method_gives_the_same_assignment():
    """The official method: one (B*Q) x sum(T) cost matrix, split into per-image blocks."""
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_problem(gen, 3, 15, [4, 2, 6])
    matcher = HungarianMatcher()
    logits = outputs["pred_logits"].flatten(0, 1)
    boxes = outputs["pred_boxes"].flatten(0, 1)
    labels = torch.cat([t["labels"] for t in targets])
    tboxes = torch.cat([t["boxes"] for t in targets])
    full = matcher.cost_matrix(logits, boxes, labels, tboxes).view(3, 15, -1)
    blocks = full.split([len(t["labels"]) for t in targets], -1)
    for b, (rows, cols) in enumerate(matcher(outputs, targets)):
        r, c = linear_sum_assignment(blocks[b][b].numpy())
        assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()


@pytest.mark.parametrize("formula", ["neg_prob", "one_minus_prob"])
def test_block_costs_equal_the_full_matrix_reference_at_benchmark_size(formula):
    """benchmarks/bench.py's matcher problem (B=8, Q=300, T=50, 91 classes), and uneven counts:
    the official full-matrix method finds the same assignments."""
    gen = torch.Generator().manual_seed(9)
    matcher = HungarianMatcher(class_cost_formula=formula)
    for counts in ([50] * 8, [50, 0, 3, 17, 1, 50, 9, 0]):
        outputs, targets = _random_problem(gen, 8, 300, counts, classes=91)
        ours, ref = matcher(outputs, targets), full_matrix_match(matcher, outputs, targets)
        for (r, c), (rr, cr), n in zip(ours, ref, counts):
            assert len(r) == n and torch.equal(r, rr) and torch.equal(c, cr)


def test_batched_cost_equals_one_image_at_a_time_with_sigmoid_classes():
    gen = torch.Generator().manual_seed(10)
    matcher = HungarianMatcher(sigmoid_class=True)
    outputs, targets = _random_problem(gen, 3, 40, [6, 6, 6], classes=7)
    labels = torch.stack([t["labels"] for t in targets])
    batched = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels,
                                  torch.stack([t["boxes"] for t in targets]))
    assert batched.shape == (3, 40, 6)
    for b, t in enumerate(targets):
        single = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"])
        torch.testing.assert_close(batched[b], single, rtol=0, atol=1e-6)


def test_neg_prob_and_one_minus_prob_give_the_same_assignment():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _random_problem(gen, 4, 12, [5, 2, 9, 12])
    a = HungarianMatcher(class_cost_formula="neg_prob")(outputs, targets)
    b = HungarianMatcher(class_cost_formula="one_minus_prob")(outputs, targets)
    for (ra, ca), (rb, cb) in zip(a, b):
        assert torch.equal(ra, rb) and torch.equal(ca, cb)


def test_square_formulation_with_dummy_background_targets():
    """The explanation's version: pad targets with T..Q-1 "no object" columns of zero cost.

    The Q x Q problem assigns every prediction; restricted to the real targets it is the
    rectangular assignment.
    """
    gen = torch.Generator().manual_seed(5)
    for trial in range(5):
        outputs, targets = _random_problem(gen, 1, 8, [int(torch.randint(1, 8, (1,), generator=gen))])
        matcher = HungarianMatcher(class_cost_formula="one_minus_prob")
        (rows, cols), = matcher(outputs, targets)
        cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                                   targets[0]["labels"], targets[0]["boxes"])
        q, t = cost.shape
        square = torch.cat([cost, torch.zeros(q, q - t)], dim=1)  # (Q, Q)
        r, c = linear_sum_assignment(square.numpy())
        real = c < t
        assert _total(cost, r[real], c[real]) == pytest.approx(_total(cost, rows, cols), abs=1e-5)
        assert sorted(zip(c[real].tolist(), r[real].tolist())) == sorted(zip(cols.tolist(), rows.tolist()))


def test_empty_targets_give_empty_matches():
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _random_problem(gen, 2, 10, [0, 0])
    for rows, cols in HungarianMatcher()(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64


def test_nan_is_a_clear_error_naming_the_tensor():
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _random_problem(gen, 2, 10, [2, 3])
    outputs["pred_boxes"][1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1.*pred_boxes"):
        HungarianMatcher()(outputs, targets)
    outputs, targets = _random_problem(gen, 1, 10, [2])
    outputs["pred_logits"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="pred_logits"):
        HungarianMatcher()(outputs, targets)


def test_half_precision_inputs_are_matched_in_float32():
    """bf16 outputs are matched on their float32 values: the same assignment as the upcast inputs."""
    gen = torch.Generator().manual_seed(8)
    outputs, targets = _random_problem(gen, 2, 10, [3, 4])
    half = {k: v.bfloat16() for k, v in outputs.items()}
    upcast = {k: v.float() for k, v in half.items()}
    for (rh, ch), (ru, cu) in zip(HungarianMatcher()(half, targets), HungarianMatcher()(upcast, targets)):
        assert torch.equal(rh, ru) and torch.equal(ch, cu)
    cost = HungarianMatcher().cost_matrix(half["pred_logits"][0], half["pred_boxes"][0],
                                          targets[0]["labels"], targets[0]["boxes"])
    assert cost.dtype == torch.float32
