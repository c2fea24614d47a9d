import pytest
import torch

from retrolm.nn import (
    FeedForward,
    MultiHeadAttention,
    Residual,
    RotaryEmbedding,
    apply_rotary,
    deepnet_constants,
    deepnet_init_,
    make_norm,
    token_shift,
)
from retrolm.nn.token_shift import check_causal_shifts


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)  # was unseeded: the fp32 tables' rounding failed 1e-7 now and then
    rot = RotaryEmbedding(8)
    q, k = torch.randn(1, 8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rot(torch.tensor([pq]))
        ck, sk = rot(torch.tensor([pk]))
        return (
            apply_rotary(q, cq.double(), sq.double()) * apply_rotary(k, ck.double(), sk.double())
        ).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_other_channels(interleaved):
    rot = RotaryEmbedding(4, interleaved=interleaved)
    x = torch.randn(3, 10)
    cos, sin = rot(torch.arange(3))
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert torch.equal(y[:, 4:], x[:, 4:])
    torch.testing.assert_close(y[0], x[0])  # position 0 is the identity
    torch.testing.assert_close(y[:, :4].norm(dim=-1), x[:, :4].norm(dim=-1))  # a rotation


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_span_equals_computed_positions(interleaved):
    rot = RotaryEmbedding(8, interleaved=interleaved)
    for start, n in [(0, 5), (60, 10), (3, 200), (0, 1)]:  # the table grows past 64
        for got, exp in zip(rot.span(start, n), rot(torch.arange(start, start + n))):
            assert torch.equal(got, exp)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [4, 8])
def test_apply_rotary_equals_the_formula_and_its_gradient(interleaved, rot_dim):
    """x*cos + rotate(x)*sin on the first rot_dim channels, the rest passed through."""
    rot = RotaryEmbedding(rot_dim, interleaved=interleaved)
    cos, sin = (t.double() for t in rot(torch.arange(5)))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    xr = x[..., :rot_dim]
    if interleaved:
        turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        turned = torch.cat((-xr[..., rot_dim // 2 :], xr[..., : rot_dim // 2]), dim=-1)
    ref = torch.cat((xr * cos + turned * sin, x[..., rot_dim:]), dim=-1)
    # apply_rotary computes in fp32 (as the models do); compare at fp32 precision
    torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    (got,) = torch.autograd.grad(apply_rotary(x, cos, sin, interleaved), x, g)
    (exp,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


def test_apply_rotary_reuses_signed_sin_only_for_the_same_table():
    """The signed sin is kept for the last ``sin`` tensor (every layer of a decoding step
    passes the same one); another table, even of the same shape, is never served stale."""
    torch.manual_seed(0)
    rot = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)

    def formula(x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    for start in (0, 7, 0, 7):  # alternate two tables of one shape
        cos, sin = (t.double() for t in rot.span(start, 5))
        for _ in range(2):  # the second call reuses the first one's signed sin
            torch.testing.assert_close(apply_rotary(x, cos, sin), formula(x, cos, sin))
    sin = sin.clone().requires_grad_()  # with autograd: a fresh graph every call
    for _ in range(2):
        apply_rotary(x, cos, sin).sum().backward()
    assert sin.grad is not None


def test_rotary_bad_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)


@pytest.mark.parametrize("kind", ["rms", "layer", "scale"])
def test_norms_are_scale_invariant(kind):
    norm = make_norm(kind, 16)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(norm(x), norm(x * 7.0), rtol=1e-4, atol=1e-4)


def test_unknown_norm():
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        make_norm("batch", 4)


def test_feedforward_chunks_and_glu():
    torch.manual_seed(0)
    ff = FeedForward(8, mult=2, glu=True, activation="silu", chunks=3)
    x = torch.randn(2, 7, 8)
    out = ff(x)
    ff.chunks = 1
    torch.testing.assert_close(out, ff(x))
    assert ff.up_proj.out_features == 32  # GLU doubles the up projection
    assert FeedForward(8, mult=0.25).up_proj.out_features == 2  # reduction FFN


def test_token_shift():
    x = torch.arange(1, 7, dtype=torch.float32).view(1, 3, 2)  # channels [a, b]
    y = token_shift(x, (0, 1))
    assert y[0, :, 0].tolist() == [1, 3, 5]  # unshifted
    assert y[0, :, 1].tolist() == [0, 2, 4]  # one step from the past
    with pytest.raises(ValueError, match="future"):
        check_causal_shifts((0, -1))


def test_residual_pre_and_post_norm():
    torch.manual_seed(0)
    fn = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    pre = Residual(4, fn, "layer")
    torch.testing.assert_close(pre(x), x + fn(pre.norm(x)))
    post = Residual(4, fn, "layer", post_norm=True, alpha=2.0)
    torch.testing.assert_close(post(x), post.norm(2.0 * x + fn(x)))


def test_deepnet_constants_and_init():
    enc, dec = deepnet_constants(0, 12)
    assert dec.alpha == pytest.approx(24**0.25) and dec.beta == pytest.approx(96**-0.25)
    enc, dec = deepnet_constants(2, 6)
    assert enc.alpha == pytest.approx(0.81 * (16 * 6) ** (1 / 16))
    assert dec.beta == pytest.approx(72**-0.25)
    torch.manual_seed(0)
    m = torch.nn.ModuleList([MultiHeadAttention(64, 4, 16), FeedForward(64)])
    deepnet_init_(m, beta=0.1)
    big, small = m[0].q_proj.weight.std(), m[0].v_proj.weight.std()
    assert small < big * 0.2


def test_rmsnorm_custom_backward_equals_autograd_float64():
    from retrolm.nn import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, norm.weight), g)
    exp = torch.autograd.grad(ref, (x, norm.weight), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x[:1, :2],))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_in_lower_precision_tracks_float64(dtype):
    """The fused fp32 forward and the half-precision path: values and both gradients
    within their dtype's rounding of the float64 autograd reference."""
    from retrolm.nn import RMSNorm

    torch.manual_seed(1)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x64 = torch.randn(2, 33, 48, dtype=torch.float64, requires_grad=True)
    w64 = norm.weight.detach().double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64
    g = torch.randn_like(ref)
    exp_x, exp_w = torch.autograd.grad(ref, (x64, w64), g)
    x = x64.detach().to(dtype).requires_grad_()
    y = norm(x)
    assert y.dtype == dtype
    got_x, got_w = torch.autograd.grad(y, (x, norm.weight), g.to(dtype))
    assert got_x.dtype == dtype and got_w.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    torch.testing.assert_close(got_x.double(), exp_x, **tol)
    torch.testing.assert_close(got_w.double(), exp_w, rtol=tol["rtol"], atol=tol["atol"] * 10)


def test_rmsnorm_inference_path_equals_autograd_path():
    """Without autograd RMSNorm takes F.rms_norm; same values as the saving Function."""
    from retrolm.nn import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        fast = norm(x)
    torch.testing.assert_close(fast, norm(x.requires_grad_()), rtol=1e-12, atol=1e-12)
    xb = x.detach().bfloat16()
    norm32 = RMSNorm(6)
    with torch.no_grad():
        norm32.weight.copy_(norm.weight)
        fast_b = norm32(xb)  # fp32 weights, bf16 input: the training path's kernel
    assert fast_b.dtype == torch.bfloat16
    assert torch.equal(fast_b, norm32(xb.clone().requires_grad_()))
    with torch.no_grad():
        fast_b = norm.bfloat16()(xb)
    assert fast_b.dtype == torch.bfloat16
    torch.testing.assert_close(fast_b.float(), norm(xb.requires_grad_()).float())


def test_decode_linear_equals_linear_and_follows_weight_updates():
    from retrolm.nn.decode_linear import DecodeLinear

    torch.manual_seed(0)
    lin = DecodeLinear(8, 50, bias=True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=1e-12, atol=1e-12)  # transposed copy
        assert lin._weight_t.value is not None
        lin.weight.mul_(2.0)  # an in-place update (an optimizer step) invalidates the copy
        torch.testing.assert_close(
            lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-12, atol=1e-12
        )
        x32, lin32 = torch.randn(1, 1, 8), DecodeLinear(8, 50).eval()  # one decoding row
        exp32 = torch.nn.functional.linear(x32, lin32.weight, lin32.bias)
        torch.testing.assert_close(lin32(x32), exp32, rtol=1e-6, atol=1e-6)
        w_t = lin32._weight_t.value  # kept as the (out, in) view of an (in, out) copy
        assert w_t.shape == (50, 8) and w_t.t().is_contiguous()
        big = torch.randn(40, 8, dtype=torch.float64)  # more rows than max_rows: F.linear
        torch.testing.assert_close(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the copy in the autocast dtype
            lin32 = DecodeLinear(8, 50).eval()
            x32 = torch.randn(2, 8)
            got, exp = lin32(x32), torch.nn.functional.linear(x32, lin32.weight, lin32.bias)
        assert got.dtype == exp.dtype == torch.bfloat16
        torch.testing.assert_close(got, exp)
    out = lin(x)  # with autograd: plain nn.Linear, gradients flow
    out.sum().backward()
    assert lin.weight.grad is not None
    lin.train()
    assert lin._weight_t.value is None


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_feedforward_inplace_activation_without_autograd(glu, activation):
    """Without autograd the activation overwrites its input; same values as with it."""
    torch.manual_seed(0)
    ff = FeedForward(8, 2, glu=glu, activation=activation).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        fast = ff(x)
    torch.testing.assert_close(fast, ff(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dims", [(64, 48), (64, 16), (16, 64)])  # (in, out)
def test_decode_linear_bf16_packed_equals_linear(dims, packed, monkeypatch):
    """In bf16 on a CPU with oneDNN bf16 the decode copy is a packed weight: the values of
    F.linear in bf16, for a few rows and for many, rebuilt after an in-place update. Without
    it (``packed=False``: what a CPU without AVX-512 BF16 runs, tested on every machine) the
    copy is a plain bf16 tensor with the same values."""
    import retrolm.nn.decode_linear as dl

    if packed and not dl.PACKED_BF16:
        pytest.skip("no oneDNN bf16 on this machine")
    monkeypatch.setattr(dl, "PACKED_BF16", packed)
    torch.manual_seed(0)
    lin = dl.DecodeLinear(*dims).eval()
    with torch.no_grad():
        for rows in (1, 3, 40):
            x = torch.randn(2, rows, dims[0])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, exp = lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
            assert got.dtype == exp.dtype == torch.bfloat16
            if rows <= dl.MAX_ROWS:
                copy = lin._weight_t.value  # unpacked and narrowing: F.linear, no copy
                assert copy.is_mkldnn if packed else (copy is None or not copy.is_mkldnn)
            torch.testing.assert_close(got, exp)
        lin.weight.mul_(-1.0)
        xb = torch.randn(1, 1, dims[0], dtype=torch.bfloat16)
        lin_b = dl.DecodeLinear(*dims).to(torch.bfloat16).eval()  # bf16 weights
        lin_b.load_state_dict(lin.state_dict())
        for layer in (lin, lin_b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = layer(xb)
            exp = torch.nn.functional.linear(xb, lin.weight.bfloat16(), lin.bias.bfloat16())
            torch.testing.assert_close(got, exp)


def test_decode_linear_bf16_wide_weight_stays_packed(monkeypatch):
    """In bf16 a weight wide enough for the column blocks (the vocabulary) still runs as one
    packed oneDNN product (faster there than a bf16 batched matmul), with F.linear's values."""
    import retrolm.nn.decode_linear as dl

    if not dl.PACKED_BF16:
        pytest.skip("no oneDNN bf16 on this machine")
    monkeypatch.setattr(dl, "SPLIT_NUMEL", 1)
    torch.manual_seed(0)
    lin = dl.DecodeLinear(16, 51).eval()
    x = torch.randn(1, 1, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, exp = lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert lin._weight_t.value.is_mkldnn
        torch.testing.assert_close(got, exp)
        with torch.no_grad():  # fp32: the column blocks
            lin(x)
        assert lin._weight_t.value.shape == (2, 16, 26)
    finally:
        torch.set_num_threads(threads)


def test_fused_qkv_bf16_equals_separate_projections():
    """The fused q|k|v decode weight (packed in bf16) gives the three projections."""
    from retrolm.nn.multihead import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, heads=4, dim_head=8, kv_heads=2, bias=True).eval()
    x = torch.randn(2, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = mha.project_qkv(x)
        for got, lin, heads in ((q, mha.q_proj, 4), (k, mha.k_proj, 2), (v, mha.v_proj, 2)):
            exp = torch.nn.functional.linear(x, lin.weight, lin.bias)
            torch.testing.assert_close(got, exp.unflatten(-1, (heads, -1)).transpose(1, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_column_blocks_with_several_threads(monkeypatch, bias):
    """A wide weight is split into one column block per thread (a batched matmul): same
    values as F.linear, also when the width is not a multiple of the thread count."""
    import retrolm.nn.decode_linear as dl

    monkeypatch.setattr(dl, "SPLIT_NUMEL", 1)
    torch.manual_seed(0)
    lin = dl.DecodeLinear(8, 51, bias=bias).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for t in (2, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                got = lin(x)
            assert lin._weight_t.value.shape == (t, 8, -(-51 // t))
            ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_l2_normalize_is_f_normalize():
    import torch.nn.functional as F

    from retrolm.nn.norms import l2_normalize

    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone()
    x0[0, 0, 0] = 0.0  # the eps floor: zeros stay zeros
    assert torch.equal(l2_normalize(x0), F.normalize(x0, dim=-1))
    assert torch.equal(l2_normalize(x0.float(), dim=1), F.normalize(x0.float(), dim=1))
    g1 = torch.autograd.grad(l2_normalize(x).sum(), x)[0]
    g2 = torch.autograd.grad(F.normalize(x, dim=-1).sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_layer_norm_fp32_fast_path_and_bf16_input():
    import torch.nn.functional as F

    from retrolm.nn.norms import LayerNorm

    torch.manual_seed(0)
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(3, 16)
    assert torch.equal(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, ln.eps))
    y = ln(x.bfloat16())  # statistics in fp32, the result back in the input dtype
    assert y.dtype is torch.bfloat16
    assert torch.equal(y, F.layer_norm(x.bfloat16().float(), (16,), ln.weight, ln.bias).bfloat16())
    for half in (torch.bfloat16, torch.float16):  # the one-call inference path: same values
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = ln(x.to(half))
        assert y.dtype is half
        assert torch.equal(y, F.layer_norm(x.to(half).float(), (16,), ln.weight, ln.bias).to(half))


def test_rotary_span_rows_and_the_kept_signed_sin_follow_the_layout_and_the_table():
    """span rows equal forward(arange) as the table grows; one sin rotated in both layouts
    in turn gets each layout's own signs (the kept product is keyed on the layout)."""
    torch.manual_seed(0)
    for interleaved in (False, True):
        rot = RotaryEmbedding(8, interleaved=interleaved)
        for start, n in ((7, 5), (290, 5)):  # the second grows the table
            cos, sin = rot.span(start, n)
            ref = rot(torch.arange(start, start + n))
            assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
    x = torch.randn(2, 3, 5, 8)
    cos, sin = RotaryEmbedding(8).span(3, 5)
    pairs = {False: lambda t: torch.cat((-t[..., 4:], t[..., :4]), -1),
             True: lambda t: torch.stack((-t[..., 1::2], t[..., ::2]), -1).flatten(-2)}  # fmt: skip
    for interleaved in (False, True, False, True):
        got = apply_rotary(x, cos, sin, interleaved=interleaved)
        torch.testing.assert_close(got, x * cos + pairs[interleaved](x) * sin)
