"""New shared blocks for hierarchical models: causal down/up-sampling, cached token shift,
windowed multi-head attention, feed-forward output width."""

import pytest
import torch

from retrolm.nn import (
    CausalDownsample,
    FeedForward,
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    reference_attend,
    repeat_upsample,
    sliding_window_mask,
    token_shift,
    token_shift_cached,
)

D = torch.float64


@pytest.mark.parametrize("factor,stride", [(1, 1), (2, 1), (4, 2), (8, 8), (4, 1)])
def test_downsample_token_covers_exactly_its_past_window(factor, stride):
    torch.manual_seed(0)
    ds = CausalDownsample(6, 5, factor, stride).double()
    n = 13
    x = torch.randn(2, n, 6, dtype=D)
    out = ds(x)
    m = -(-n // stride)
    assert out.shape == (2, m, 5)
    for p in range(n):
        y = x.clone()
        y[:, p] += 1.0
        changed = (ds(y) - out).abs().amax(dim=(0, 2)) > 0
        j = torch.arange(m)
        covers = (j * stride >= p) & (j * stride - factor + 1 <= p)
        assert torch.equal(changed, covers), (p, changed.tolist(), covers.tolist())


@pytest.mark.parametrize("grad", [True, False])  # without autograd: a cached (c d) weight
@pytest.mark.parametrize("factor,stride", [(1, 1), (4, 2), (8, 1)])
def test_downsample_step_equals_forward(factor, stride, grad):
    torch.manual_seed(1)
    ds = CausalDownsample(4, 4, factor, stride).double()
    x = torch.randn(1, 11, 4, dtype=D)
    with torch.set_grad_enabled(grad):
        for _ in range(2):  # the second time after an in-place weight update
            full = ds(x)
            padded = torch.cat((torch.zeros(1, factor - 1, 4, dtype=D), x), dim=1)
            for j in range(full.shape[1]):
                end = j * stride + factor  # exclusive end in padded coordinates
                step = ds.step(padded[:, end - factor : end])
                torch.testing.assert_close(step, full[:, j : j + 1])
            with torch.no_grad():
                for p in ds.parameters():
                    p.mul_(1.5)


@pytest.mark.parametrize("factor,stride", [(1, 1), (2, 1), (4, 2), (8, 1), (8, 8)])
def test_downsample_of_embeddings_per_vocabulary_entry_equals_the_conv(factor, stride):
    torch.manual_seed(2)
    ds = CausalDownsample(6, 5, factor, stride).double()
    table = torch.randn(9, 6, dtype=D, requires_grad=True)
    ids = torch.randint(0, 9, (2, 19))
    out, ref = ds.forward_embedded(ids, table), ds(table[ids])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    params = [table, *ds.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_downsample_of_embeddings_under_autocast_is_the_conv_to_bf16_rounding():
    torch.manual_seed(3)
    ds = CausalDownsample(64, 64, 8)
    table = torch.randn(32, 64)
    ids = torch.randint(0, 32, (1, 100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ds.forward_embedded(ids, table), ds(table[ids])
    assert out.dtype is ref.dtype is torch.bfloat16
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_downsample_rejects_bad_factor_and_stride():
    with pytest.raises(ValueError, match="factor must be a power of 2, got 3"):
        CausalDownsample(4, 4, 3)
    with pytest.raises(ValueError, match=r"stride must be a power of 2 <= factor \(2\), got 4"):
        CausalDownsample(4, 4, 2, 4)


def test_repeat_upsample_serves_token_j_at_its_stride_block():
    x = torch.arange(3.0).view(1, 3, 1)
    assert repeat_upsample(x, 4, 10)[0, :, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert torch.equal(repeat_upsample(x, 1, 3), x)


@pytest.mark.parametrize("steps", [[(0, 2), (2, 3), (3, 9)], [(i, i + 1) for i in range(9)]])
@pytest.mark.parametrize("shifts", [(0, 1), (0, 3), (0, 1, 2), (0, 0)])
def test_cached_token_shift_equals_full(shifts, steps):
    x = torch.randn(2, 9, 7)  # 7 channels: the last shift group is the wider one
    full = token_shift(x, shifts)
    past, outs = None, []
    for s, e in steps:
        out, past = token_shift_cached(x[:, s:e], shifts, past)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    with pytest.raises(ValueError, match="future"):
        token_shift_cached(x, (0, -1))


@pytest.mark.parametrize("window", [1, 3, 16])
def test_windowed_mha_equals_banded_reference_and_cache(window):
    torch.manual_seed(2)
    n = 11
    attn = MultiHeadAttention(8, heads=2, dim_head=4, causal=True, window=window).double().eval()
    rot = RotaryEmbedding(4)
    x = torch.randn(2, n, 8, dtype=D)
    r = rot(torch.arange(n))
    full = attn(x, q_rotary=r, k_rotary=r)
    # oracle: plain attention with the banded mask
    q = attn.q_proj(x).view(2, n, 2, 4).transpose(1, 2)
    from retrolm.nn import apply_rotary

    q = apply_rotary(q, *r)
    k, v = attn.project_kv(x, r)
    ref = reference_attend(q, k, v, sliding_window_mask(n, n, window))
    ref = attn.out_proj(ref.transpose(1, 2).reshape(2, n, 8))
    torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-10)
    for steps in ([(0, 4), (4, 5), (5, 6), (6, n)], [(i, i + 1) for i in range(n)]):
        cache, outs = KVCache(), []
        with torch.no_grad():  # the decoding path (one query: no band mask built)
            for s, e in steps:
                rr = rot(torch.arange(s, e))
                outs.append(attn(x[:, s:e], cache=cache, q_rotary=rr, k_rotary=rr))
                assert cache.length <= max(window - 1, 0) or window > e
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_windowed_mha_rejects_memory_kv():
    with pytest.raises(ValueError, match="window must be >= 1"):
        MultiHeadAttention(8, 2, 4, window=4, num_mem_kv=2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        MultiHeadAttention(8, 2, 4, window=0)


def test_feedforward_dim_out():
    ff = FeedForward(8, hidden_dim=6, dim_out=3)
    assert ff(torch.randn(2, 5, 8)).shape == (2, 5, 3)
    assert FeedForward(8).down_proj.out_features == 8  # default unchanged
