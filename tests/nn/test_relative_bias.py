"""T5 relative position bias (``nn.relative_bias``) and ``attend``'s additive bias."""

import math

import pytest
import torch
from tests.tolerance import assert_close_fp

from retrolm.nn.attention import attend, reference_attend
from retrolm.nn.relative_bias import RelativePositionBias, relative_position_bucket


def t5_bucket(rel: int, buckets: int, max_distance: int, causal: bool) -> int:
    """The T5 rule written out for one distance (q - k), the oracle."""
    offset = 0
    if causal:
        n = max(rel, 0)
    else:
        buckets //= 2
        offset = buckets if rel < 0 else 0
        n = abs(rel)
    exact = buckets // 2
    if n < exact:
        return offset + n
    far = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact))
    return offset + min(far, buckets - 1)


@pytest.mark.parametrize("causal", [True, False])
def test_buckets_follow_the_t5_rule(causal):
    rel = torch.arange(-300, 300)
    got = relative_position_bucket(rel, 32, 128, causal)
    expect = [t5_bucket(int(r), 32, 128, causal) for r in rel]
    assert got.tolist() == expect
    if causal:
        assert got[rel <= 0].eq(0).all() and got.max() == 31


def test_bias_uses_the_given_positions():
    torch.manual_seed(0)
    bias = RelativePositionBias(heads=3, num_buckets=8, max_distance=16)
    # queries after 4 memory keys: query t at 4 + t
    b = bias(torch.arange(4, 6), torch.arange(6))  # (h, 2, 6)
    assert b.shape == (3, 2, 6)
    table = bias.table.weight  # (buckets, h)
    torch.testing.assert_close(b[:, 0, 0], table[t5_bucket(4, 8, 16, True)])
    torch.testing.assert_close(b[:, 1, 5], table[0])
    assert not torch.equal(b[:, 0, 0], b[:, 0, 4])  # distance 4 vs 0: different buckets


def test_bad_bias_config_raises():
    with pytest.raises(ValueError, match="max_distance=4"):
        RelativePositionBias(2, num_buckets=16, max_distance=4)


def biased_inputs(g, n: int, j: int, d: int, with_mask: bool, empty: tuple[int, int]):
    """float64 q (2, 4, n, d), one shared k/v head (2, 1, j, d), bias (1, 4, n, j), and a
    random mask (2, 1, n, j) whose row ``empty`` (batch, query) allows no key, or None."""
    q = torch.randn(2, 4, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 1, j, d, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 4, n, j, generator=g, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, n, j, generator=g) > 0.4
        mask[empty[0], 0, empty[1]] = False  # a row with no key: zeros
    return q, k, v, bias, mask


@pytest.mark.parametrize("with_mask", [False, True])
def test_attend_with_bias_equals_the_reference(with_mask):
    g = torch.Generator().manual_seed(0)
    q, k, v, bias, mask = biased_inputs(g, 5, 9, 8, with_mask, (0, 2))
    got = attend(q, k, v, mask, bias=bias, causal=True)
    expect = reference_attend(q, k, v, mask, bias=bias, causal=True)
    assert_close_fp(got, expect, reduction=9)
    if with_mask:
        assert (got[0, :, 2] == 0).all()
    # the bias matters
    assert not torch.allclose(got, attend(q, k, v, mask, causal=True))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attend_with_bias_in_bf16_takes_the_plain_path_and_equals_the_reference(with_mask, grad):
    """On a CPU in half precision the biased attention is a plain matmul-softmax-matmul (SDPA
    cannot skip blocks under a float mask): values and gradients as the float64 reference,
    within bf16 rounding."""
    from retrolm.nn import attention as att

    g = torch.Generator().manual_seed(1)
    q, k, v, bias, mask = biased_inputs(g, 6, 11, 16, with_mask, (1, 3))
    ins = [t.bfloat16().requires_grad_(grad) for t in (q, k, v, bias)]
    assert att._plain_bias(*[t.expand(2, 4, -1, -1) for t in ins[:3]])
    calls = []
    real = att._plain_bias_attend
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(att, "_plain_bias_attend", lambda *a: calls.append(1) or real(*a))
        got = attend(*ins[:3], mask, bias=ins[3], causal=True)
    assert calls == [1] and got.dtype == torch.bfloat16
    ref_in = [t.detach().requires_grad_(grad) for t in (q, k, v, bias)]
    expect = reference_attend(*ref_in[:3], mask, bias=ref_in[3], causal=True)
    torch.testing.assert_close(got.double(), expect, atol=3e-2, rtol=3e-2)
    if with_mask:
        assert (got[1, :, 3] == 0).all()
    if grad:
        w = torch.randn(expect.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((got.double() * w).sum(), ins)
        ref_grads = torch.autograd.grad((expect * w).sum(), ref_in)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a.double(), b, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("q_first,n,j", [(0, 5, 5), (3, 1, 4), (7, 3, 10), (40, 40, 80)])
def test_toeplitz_equals_explicit_positions_values_and_gradients(q_first, n, j):
    torch.manual_seed(0)
    bias = RelativePositionBias(3, num_buckets=8, max_distance=20).double()
    want = bias(torch.arange(q_first, q_first + n), torch.arange(j))
    got = bias.toeplitz(q_first, n, j)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    (gw,) = torch.autograd.grad((want * g).sum(), bias.table.weight)
    (gg,) = torch.autograd.grad((got * g).sum(), bias.table.weight)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)
