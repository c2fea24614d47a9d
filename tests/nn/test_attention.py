import pytest
import torch
from tests.tolerance import assert_close_fp

from retrolm.nn import (
    KVCache,
    MultiHeadAttention,
    attend,
    attention_backend,
    causal_mask,
    local_attend,
    reference_attend,
    sliding_window_mask,
)

D = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=D)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [1, 2])
def test_sdpa_equals_reference_float64(causal, gqa):
    torch.manual_seed(0)
    q, k, v = rand(2, 4, 5, 8), rand(2, 4 // gqa, 7, 8), rand(2, 4 // gqa, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    for m in (None, mask):
        out = attend(q, k, v, m, causal=causal)
        ref = reference_attend(q, k, v, m, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_mask", [False, True])
def test_single_query_decoding_step_equals_reference(with_mask):
    """A causal single query skips the mask (it sees every key); same result as the oracle,
    which does build the mask, and as the last row of the full causal attention."""
    torch.manual_seed(4)
    q, k, v = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 8)
    mask = (torch.rand(2, 1, 1, 6) > 0.3) if with_mask else None
    mask = mask.expand(2, 1, 6, 6) if with_mask else None
    full = reference_attend(q, k, v, mask, causal=True)
    last_mask = mask[:, :, -1:] if with_mask else None
    for fn in (attend, reference_attend):
        step = fn(q[:, :, -1:], k, v, last_mask, causal=True)
        torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal,with_mask", [(False, False), (True, False), (True, True)])
def test_half_precision_training_path_equals_sdpa(causal, with_mask):
    """On a CPU in bf16 with autograd, few keys take the plain matmul-softmax path: values
    and gradients as SDPA's (bf16 tolerance), fully masked rows zero; more keys use SDPA."""
    import retrolm.nn.attention as att

    torch.manual_seed(3)
    shape_q, shape_kv = (2, 4, 6, 8), (2, 2, 9, 8)  # grouped-query: 4 heads, 2 kv heads
    q, k, v = (torch.randn(s).bfloat16().requires_grad_() for s in (shape_q, shape_kv, shape_kv))
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, 6, 9) > 0.3
        mask[0, 0, 1] = False  # a row with no key
    assert att._use_math(q, k, v)
    out = attend(q, k, v, mask, causal=causal)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_in = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        assert not att._use_math(*ref_in)  # without autograd: SDPA
    kr, vr = (t.repeat_interleave(2, 1) for t in ref_in[1:])
    ref = reference_attend(ref_in[0].float(), kr.float(), vr.float(), mask, causal=causal)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)
    if with_mask:
        assert (out[0, :, 1] == 0).all()
    # past MATH_MAX_KEYS keys the plain path is taken only while the scores are small
    n = att.MATH_MAX_KEYS * 4
    small = torch.randn(1, 2, n, 8).bfloat16().requires_grad_()
    assert n * n * 2 <= att.MATH_MAX_SCORES and att._use_math(small, small, small)
    n = int(att.MATH_MAX_SCORES**0.5) + 1
    many = torch.randn(1, 1, n, 8).bfloat16().requires_grad_()
    assert n > att.MATH_MAX_KEYS and not att._use_math(many, many, many)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    for fn in (attend, reference_attend):
        out = fn(q, k, v, mask)
        assert out.isfinite().all()
        assert (out[:, :, 1] == 0).all()
        assert (out[:, :, 0].abs() > 0).any()


def test_causal_aligns_queries_with_last_keys():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]


def test_backend_switch_routes_to_reference():
    q, k, v = rand(1, 1, 3, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4)
    with attention_backend("reference"):
        a = attend(q, k, v, causal=True)
    torch.testing.assert_close(a, reference_attend(q, k, v, causal=True))
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("flash9"):
            pass


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,window", [(13, 4), (16, 4), (5, 8), (9, 1)])
def test_local_attention_equals_masked_reference(causal, n, window):
    torch.manual_seed(1)
    q, k, v = rand(2, 2, n, 4), rand(2, 2, n, 4), rand(2, 2, n, 4)
    keep = torch.rand(2, n) > 0.2
    keep[:, 0] = True
    out = local_attend(q, k, v, window, causal=causal, key_mask=keep)
    mask = sliding_window_mask(n, n, window, causal=causal) & keep[:, None, None, :]
    ref = reference_attend(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b", [1, 3])
def test_local_attention_without_key_mask_any_batch(b):
    q, k, v = rand(b, 2, 10, 4), rand(b, 2, 10, 4), rand(b, 2, 10, 4)
    out = local_attend(q, k, v, 3)
    ref = reference_attend(q, k, v, sliding_window_mask(10, 10, 3))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_multihead_cached_equals_full():
    torch.manual_seed(2)
    from retrolm.nn import RotaryEmbedding

    attn = MultiHeadAttention(16, heads=4, dim_head=8, causal=True, num_mem_kv=2).double().eval()
    rot = RotaryEmbedding(8)
    x = rand(2, 9, 16)
    full = attn(x, q_rotary=rot(torch.arange(9)), k_rotary=rot(torch.arange(9)))
    cache, outs = KVCache(), []
    for s, e in [(0, 4), (4, 5), (5, 9)]:
        r = rot(torch.arange(s, e))
        outs.append(attn(x[:, s:e], cache=cache, q_rotary=r, k_rotary=r))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention
@pytest.mark.parametrize("bias", [False, True])
def test_multihead_single_query_decode_path_equals_general_path(monkeypatch, kv_heads, bias):
    """One query with a cache and no autograd goes through ``_decode_step``; it must give
    what the general path gives (taken here with autograd on), token after token."""
    torch.manual_seed(4)
    from retrolm.nn import RotaryEmbedding

    attn = MultiHeadAttention(16, heads=4, dim_head=8, kv_heads=kv_heads, causal=True, bias=bias)
    attn = attn.double().eval()
    rot = RotaryEmbedding(8)
    x = rand(2, 7, 16)
    calls = []
    fast = attn._decode_step
    monkeypatch.setattr(attn, "_decode_step", lambda *a: calls.append(1) or fast(*a))
    outs = {}
    for grad in (False, True):  # no_grad: the decode path; grad: the general path
        cache, steps = KVCache(), []
        with torch.set_grad_enabled(grad):
            r = rot.span(0, 3)
            steps.append(attn(x[:, :3], cache=cache, q_rotary=r, k_rotary=r))  # a prefill
            for p in range(3, 7):
                r = rot.span(p, 1)
                steps.append(attn(x[:, p : p + 1], cache=cache, q_rotary=r, k_rotary=r))
        outs[grad] = torch.cat(steps, 1).detach()
    assert len(calls) == 4  # the four single-token steps without autograd, only those
    torch.testing.assert_close(outs[False], outs[True], rtol=1e-12, atol=1e-12)
    r = rot.span(0, 7)
    torch.testing.assert_close(outs[False], attn(x, q_rotary=r, k_rotary=r).detach())


def test_multihead_causal_prefix_independent_of_future():
    torch.manual_seed(3)
    attn = MultiHeadAttention(8, heads=2, dim_head=4, causal=True).double()
    x = rand(1, 6, 8)
    y = x.clone()
    y[:, 4:] += 1.0
    a, b = attn(x), attn(y)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_kv_cache_keep_last_and_growth():
    c = KVCache()
    for t in range(40):
        k, v = c.update(torch.full((1, 1, 1, 2), float(t)), torch.zeros(1, 1, 1, 2))
    assert k.shape[-2] == 40 and k[0, 0, :, 0].tolist() == list(range(40))
    c.keep_last(5)
    k, _ = c.update(torch.full((1, 1, 1, 2), 40.0), torch.zeros(1, 1, 1, 2))
    assert k[0, 0, :, 0].tolist() == [35, 36, 37, 38, 39, 40]
    kv, vv = c.view()  # the live positions, appending nothing
    assert kv[0, 0, :, 0].tolist() == [35, 36, 37, 38, 39, 40] and vv.shape == kv.shape
    with pytest.raises(ValueError, match="the cache is empty"):
        KVCache().view()


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_equals_separate_projections(bias):
    """Self-attention projects q, k, v with one matmul; same values and gradients as the three
    separate layers, with autograd (weights concatenated per call) and without (kept)."""
    torch.manual_seed(5)
    attn = MultiHeadAttention(16, heads=4, dim_head=8, kv_heads=2, bias=bias).double()
    x = rand(2, 5, 16)

    def split(lin, n):
        return lin(x).view(2, 5, n, 8).transpose(1, 2)

    ref = (split(attn.q_proj, 4), split(attn.k_proj, 2), split(attn.v_proj, 2))
    got = attn.project_qkv(x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = [torch.randn_like(t) for t in ref]
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    exp = torch.autograd.grad(ref, params, g)
    for a, b in zip(torch.autograd.grad(got, params, g), exp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for a, b in zip(attn.project_qkv(x), ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        attn.k_proj.weight.add_(1.0)  # the kept concatenation follows in-place updates
        k_new = attn.k_proj(x).view(2, 5, 2, 8).transpose(1, 2)
        torch.testing.assert_close(attn.project_qkv(x)[1], k_new, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_joint_qk_rotary_equals_separate_rotations(interleaved):
    """Without autograd, shared (i, r) tables rotate q and k in one call on the fused
    projection; the same as rotating each (the autograd path, and distinct q/k tables)."""
    from retrolm.nn import RotaryEmbedding

    torch.manual_seed(6)
    attn = MultiHeadAttention(16, heads=4, dim_head=8, kv_heads=2, causal=True).double()
    attn.interleaved_rotary = interleaved
    rot = RotaryEmbedding(6, interleaved=interleaved)
    x = rand(2, 5, 16)
    pos = rot(torch.arange(3, 8))
    with torch.no_grad():  # the fused projection and the joint rotary are the no-grad path
        joint = attn(x, q_rotary=pos, k_rotary=pos)
    pos_b = tuple(t.expand(2, 1, 5, 6) for t in pos)  # same values, not the shared fast path
    separate = attn(x, q_rotary=pos_b, k_rotary=tuple(t.clone() for t in pos_b))
    torch.testing.assert_close(joint, separate, rtol=1e-12, atol=1e-12)


def test_kv_cache_sliding_window_matches_a_plain_list():
    """keep_last only moves the start; appends past the buffer's end compact it. The live
    keys always equal the last n appended, over many wraps and uneven append sizes."""
    c, seen = KVCache(), []
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        t = int(torch.randint(1, 4, (), generator=g))
        new = torch.arange(len(seen), len(seen) + t, dtype=torch.float64)
        seen += new.tolist()
        k, v = c.update(new.view(1, 1, t, 1), -new.view(1, 1, t, 1))
        assert k[0, 0, :, 0].tolist() == seen[len(seen) - c.length :]
        assert torch.equal(v, -k)
        c.keep_last(5 + step % 3)
    assert c._k.shape[-2] <= 64  # compacted in place, not grown without bound


def test_block_attend_equals_reference_with_grads_float64():
    from retrolm.nn.attention import block_attend

    torch.manual_seed(3)
    q, k, v = (
        rand(3, 2, 4, 8).requires_grad_(),
        rand(3, 2, 6, 8).requires_grad_(),
        rand(3, 2, 6, 8).requires_grad_(),
    )
    mask = torch.rand(3, 1, 4, 6) > 0.4
    mask[1, 0, 2] = False  # a query with no key: zeros, not NaN
    out = block_attend(q, k, v, mask)
    ref = reference_attend(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out[1, :, 2].abs().max() == 0
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_attend_under_bf16_autocast_close_to_fp32():
    from retrolm.nn.attention import block_attend

    torch.manual_seed(4)
    q, k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = torch.rand(2, 2, 8, 12) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_attend(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v, mask), rtol=0.05, atol=0.05)


def test_rows_have_keys_skips_only_the_check():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.rand(2, 3, 4, 9) > 0.5
    mask[..., 0] = True  # every row allows a key
    assert torch.equal(attend(q, k, v, mask, rows_have_keys=True), attend(q, k, v, mask))
    ref = reference_attend(q.double(), k.double(), v.double(), mask)
    # fp32 against float64: rounding of fp32 sums over 9 keys and 8 channels
    assert_close_fp(attend(q, k, v, mask, rows_have_keys=True), ref, reduction=9)
