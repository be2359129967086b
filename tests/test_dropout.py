"""The cheaper CPU dropout (detrkit.model.dropout): the same distribution as F.dropout, the same attention."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import detrkit.model.dropout as dropout_module
from detrkit.model.dropout import Dropout, dropout, keep_mask
from detrkit.model.transformer import MultiheadAttention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_each_element_is_dropped_with_probability_p_independently(p):
    torch.manual_seed(0)
    n = 1_000_000
    kept = keep_mask((n,), p).double()
    sigma = (p * (1 - p) / (n / 2)) ** 0.5  # of a fraction over n / 2 elements
    # The two 32-bit halves of every 64-bit draw (even and odd elements) are each uniform ...
    for half in (kept[0::2], kept[1::2]):
        assert abs(half.mean().item() - (1 - p)) < 5 * sigma
    # ... and independent of each other.
    both = (kept[0::2] * kept[1::2]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma


def test_probabilities_next_to_0_and_1_keep_everything_or_nothing():
    assert keep_mask((1000,), 1e-11).all()
    assert not keep_mask((1000,), 1 - 1e-11).any()


def test_the_mask_follows_the_seed():
    torch.manual_seed(3)
    a = keep_mask((4, 1000), 0.1)
    torch.manual_seed(3)
    b = keep_mask((4, 1000), 0.1)
    c = keep_mask((4, 1000), 0.1)
    assert a.shape == (4, 1000) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_kept_elements_are_scaled_and_the_gradient_is_the_scaled_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 257, requires_grad=True)  # an odd count: the last 64-bit draw is half used
    y = dropout(x, 0.3)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.8
    assert torch.equal(y[kept], (x * (1 / 0.7))[kept])
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * (1 / 0.7))


def test_eval_mode_and_the_end_points_behave_as_f_dropout():
    x = torch.randn(5, 7)
    module = Dropout(0.1).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


def test_attention_with_dropout_equals_nn_multiheadattention_given_the_same_mask(monkeypatch):
    """In training, the written-out CPU attention drops attention weights after the softmax,
    unrenormalised, as nn.MultiheadAttention does."""
    torch.manual_seed(0)
    b, lq, lk, d, h, p = 2, 5, 9, 16, 4, 0.25
    ours = MultiheadAttention(d, h, dropout=p).train()
    reference = nn.MultiheadAttention(d, h, dropout=p, batch_first=True).train()
    reference.load_state_dict(ours.state_dict())
    query = torch.randn(b, lq, d, requires_grad=True)
    key = torch.randn(b, lk, d)
    padding = torch.zeros(b, lk, dtype=torch.bool)
    padding[1, -3:] = True
    blocked = torch.zeros(lq, lk, dtype=torch.bool)
    blocked[0, :2] = True
    mask = torch.rand(b, h, lq, lk) > p  # one fixed dropout mask for both
    monkeypatch.setattr(dropout_module, "keep_mask", lambda shape, q: mask.expand(shape))
    monkeypatch.setattr(F, "dropout", lambda t, p, training=True, inplace=False: t * mask.reshape(t.shape) / (1 - p))

    out = ours(query, key, key, key_padding_mask=padding, attn_mask=blocked)
    expected, _ = reference(query, key, key, key_padding_mask=padding, attn_mask=blocked,
                            need_weights=True, average_attn_weights=False)
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    grad, = torch.autograd.grad(out.square().sum(), query)
    grad_expected, = torch.autograd.grad(expected.square().sum(), query)
    assert torch.allclose(grad, grad_expected, rtol=0, atol=1e-5)
