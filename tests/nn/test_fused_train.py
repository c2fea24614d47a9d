"""The fused training kernels equal the composite ATen ops they stand for (to rounding), in
values and gradients, and the models take them where they apply."""

from __future__ import annotations

import logging

import pytest
import torch
from tests.tolerance import assert_argmax_within

from retrolm import HierarchicalTransformer
from retrolm.nn import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    cross_entropy,
    norm_shift,
    token_shift,
)
from retrolm.nn.fused import train as fused_train
from retrolm.nn.fused.train import _CrossEntropy, _NormShift, _Rotary
from retrolm.nn.norms import LayerNorm

ext = fused_train.extension()
needs_ext = pytest.mark.skipif(ext is None, reason="the fused kernels could not be built here")


@pytest.fixture
def aten():
    """Run the body with the fused kernels off (the composite reference)."""

    class Switch:
        def __enter__(self):
            self.before = fused_train.set_enabled(False)

        def __exit__(self, *exc):
            fused_train.set_enabled(self.before)

    return Switch()


def _norm(d: int, seed: int = 0) -> RMSNorm:
    torch.manual_seed(seed)
    norm = RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d))
    return norm


def _grads(fn, x: torch.Tensor, params, g: torch.Tensor, autocast: bool = False):
    """fn(x) (under CPU bf16 autocast if asked) and the gradients of <fn(x), g> (outside it,
    as a training loop calls backward)."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x)
    grads = torch.autograd.grad(out, (x, *params), g.to(out.dtype))
    return out, grads


@needs_ext
@pytest.mark.parametrize("shift", [0, 1, 3, 40])  # 40 > n: every shifted channel is zero
def test_norm_shift_equals_norm_then_token_shift_fp32(aten, shift):
    norm = _norm(24)
    x = torch.randn(2, 33, 24)
    g = torch.randn(2, 33, 24)

    def f(t):
        return norm_shift(t, norm, shift)

    out, grads = _grads(f, x, [norm.weight], g)
    with aten:
        ref, ref_grads = _grads(f, x, [norm.weight], g)
    assert out.dtype is torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the reference is what it claims: the RMSNorm, then the token shift
    torch.testing.assert_close(ref, token_shift(norm(x), (0, shift)))
    if shift:  # the shifted half of the first `shift` rows is zero, the rest is not
        assert (out[:, :shift, 12:] == 0).all()
        assert shift > 33 or (out[:, shift:, 12:] != 0).all()


@needs_ext
def test_norm_shift_under_autocast_hands_bf16_to_the_matmul(aten):
    norm = _norm(64)
    x = torch.randn(1, 50, 64)
    g = torch.randn(1, 50, 64)
    out, grads = _grads(lambda t: norm_shift(t, norm, 2), x, [norm.weight], g, True)
    with aten:
        ref, ref_grads = _grads(lambda t: norm_shift(t, norm, 2), x, [norm.weight], g)
    assert out.dtype is torch.bfloat16 and ref.dtype is torch.float32
    # one rounding of the fp32 value: at most one bf16 step apart from casting the reference
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=8e-3, atol=1e-6)
    g16 = g.bfloat16().float()  # the gradient the kernel received
    with aten:
        _, ref_grads = _grads(lambda t: norm_shift(t, norm, 2), x, [norm.weight], g16)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_ext
def test_norm_shift_of_a_bf16_stream_stays_bf16(aten):
    norm = _norm(32)
    x = torch.randn(2, 20, 32).bfloat16()
    g = torch.randn(2, 20, 32).bfloat16()
    out, grads = _grads(lambda t: norm_shift(t, norm, 4), x, [norm.weight], g)
    with aten:
        ref, ref_grads = _grads(lambda t: norm_shift(t, norm, 4), x, [norm.weight], g)
    assert out.dtype is ref.dtype is torch.bfloat16 and grads[0].dtype is torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-3, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("axial", [2, 4])
@pytest.mark.parametrize("autocast", [False, True])
def test_norm_shift_writes_interleaved_sub_sequences(aten, axial, autocast):
    from einops import rearrange

    norm = _norm(16)
    x = torch.randn(2, 24, 16)
    g = torch.randn(2 * axial, 24 // axial, 16)

    def f(t):
        return norm_shift(t, norm, axial, axial=axial)

    out, grads = _grads(f, x, [norm.weight], g, autocast)
    with aten:
        ref, ref_grads = _grads(f, x, [norm.weight], g.to(out.dtype).float(), autocast)
    assert out.shape == (2 * axial, 24 // axial, 16) and out.is_contiguous()
    plain = rearrange(token_shift(norm(x), (0, axial)), "b (q a) d -> (b a) q d", a=axial)
    torch.testing.assert_close(ref, plain)
    tol = dict(rtol=1e-5, atol=1e-5) if not autocast else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="divide the length 24"):
        norm_shift(x, norm, 1, axial=5)


@needs_ext
@pytest.mark.parametrize("norm", ["rms", "layer", "layer-bias"])
@pytest.mark.parametrize("shift,split", [(0, 3), (2, 3), (1, 0), (3, 6)])
def test_norm_shift_kernel_gradients_in_float64(shift, split, norm):
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    layer = norm != "rms"
    if norm == "layer-bias":
        assert torch.autograd.gradcheck(
            lambda a, w, b: _NormShift.apply(a, w, b, 1e-6, shift, split, torch.float64, 1, True),
            (x, w, b),
        )
    else:
        assert torch.autograd.gradcheck(
            lambda a, w: _NormShift.apply(a, w, None, 1e-6, shift, split, torch.float64, 1, layer),
            (x, w),
        )


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shift", [0, 2])
def test_norm_shift_of_a_layer_norm_equals_the_module(aten, bias, shift):
    torch.manual_seed(0)
    ln = LayerNorm(24, bias=bias)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(24))
        if bias:
            ln.bias.copy_(torch.randn(24))
    x = torch.randn(2, 33, 24) * 3 + 1  # a mean and scale for the norm to remove
    g = torch.randn(2, 33, 24)
    params = [p for p in ln.parameters()]
    out, grads = _grads(lambda t: norm_shift(t, ln, shift), x, params, g)
    assert out.grad_fn is not None and "NormShift" in type(out.grad_fn).__name__
    with aten:
        ref, ref_grads = _grads(lambda t: token_shift(ln(t), (0, shift)), x, params, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bf, _ = _grads(lambda t: norm_shift(t, ln, shift), x, params, g, autocast=True)
    assert bf.dtype is torch.bfloat16
    torch.testing.assert_close(bf.float(), ref.bfloat16().float(), rtol=0, atol=2e-2)


def _rotary_input(dtype, layout: str) -> torch.Tensor:
    base = torch.randn(2, 9, 3, 16).to(dtype)  # (b, i, h, d)
    return base.transpose(1, 2) if layout == "heads-view" else base.transpose(1, 2).contiguous()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [16, 8])  # full and partial rotary
@pytest.mark.parametrize("layout", ["heads-view", "contiguous"])
def test_rotary_equals_the_composite(aten, dtype, r, layout):
    cos, sin = RotaryEmbedding(r)(torch.arange(9))
    x = _rotary_input(dtype, layout)
    assert fused_train.rotary_applies(x, cos, sin, False)
    g = torch.randn(x.shape).to(dtype)
    out, (gx,) = _grads(lambda t: apply_rotary(t, cos, sin), x, [], g)
    with aten:
        ref, (ref_gx,) = _grads(lambda t: apply_rotary(t, cos, sin), x, [], g)
    assert out.dtype is dtype and out.stride() == x.stride()  # the same layout
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=8e-3, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gx, ref_gx, **tol)
    assert torch.equal(out[..., r:], x[..., r:])  # unrotated channels pass through


@needs_ext
def test_rotary_kernel_gradients_in_float64():
    cos, sin = RotaryEmbedding(8)(torch.arange(5))
    x = torch.randn(1, 2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Rotary.apply(t, cos, sin), (x,))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_F_cross_entropy(aten, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(300, 37) * 4).to(dtype)
    labels = torch.randint(0, 37, (300,))
    labels[::5] = -100  # ignored rows carry neither loss nor gradient
    out, (g,) = _grads(lambda t: cross_entropy(t, labels), logits, [], torch.ones(()))
    with aten:
        ref, (ref_g,) = _grads(lambda t: cross_entropy(t, labels), logits, [], torch.ones(()))
    assert out.dtype is torch.float32 and g.dtype is dtype
    torch.testing.assert_close(ref, torch.nn.functional.cross_entropy(logits.float(), labels))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype is torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(g, ref_g, **tol)
    assert (g[::5] == 0).all() and (g[1::5] != 0).all()
    # every label ignored: nan, as F.cross_entropy gives
    assert cross_entropy(logits, torch.full((300,), -100)).isnan()


@needs_ext
def test_cross_entropy_kernel_gradients_in_float64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda t: _CrossEntropy.apply(t, labels, -100), (logits,))
    with pytest.raises(RuntimeError, match="label 7 outside"):
        _CrossEntropy.apply(logits, torch.tensor([0, 7, 1, 1, 1, 1]), -100)


def test_what_the_kernels_do_not_take_runs_the_composite():
    cos, sin = RotaryEmbedding(8)(torch.arange(5))
    x = torch.randn(1, 2, 5, 8)
    assert not fused_train.rotary_applies(x, cos, sin, True)  # interleaved
    assert not fused_train.rotary_applies(x.double(), cos, sin, False)
    assert not fused_train.rotary_applies(x, cos[None], sin[None], False)  # (1, i, r) tables
    assert not fused_train.rotary_applies(x.transpose(-1, -2), cos, sin, False)
    ln = LayerNorm(8)
    h = torch.randn(1, 5, 8)
    torch.testing.assert_close(norm_shift(h, ln, 1), token_shift(ln(h), (0, 1)))
    from retrolm.nn.norms import ScaleNorm

    sn = ScaleNorm(8)  # no weight: the module's path
    torch.testing.assert_close(norm_shift(h, sn, 1), token_shift(sn(h), (0, 1)))
    norm = _norm(8)
    h64 = h.double()
    torch.testing.assert_close(
        norm_shift(h64, norm.double(), 1), token_shift(norm.double()(h64), (0, 1))
    )


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog, tmp_path):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("RETROLM_REQUIRE_KERNELS", raising=False)  # CI sets it
    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))  # no finished build to import
    monkeypatch.setattr(fused_train._EXT, "_module", None)
    monkeypatch.setattr(fused_train._EXT, "_failed", False)
    monkeypatch.setattr(cpp, "load", broken)
    norm = _norm(8)
    x = torch.randn(1, 4, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="retrolm.nn.fused.extension"):
        out = norm_shift(x, norm, 1)
        norm_shift(x, norm, 1)
    warnings = [r for r in caplog.records if "fused training kernels unavailable" in r.message]
    assert len(warnings) == 1 and "RETROLM_FUSED_TRAIN=0" in warnings[0].getMessage()
    torch.testing.assert_close(out, token_shift(norm(x), (0, 1)))


HIER = dict(
    num_tokens=64, dim=32, depth=2, heads=2, dim_head=16, seq_len=64,
    hierarchies=(1, 2, 4), window_sizes=(8, 16, None),
)  # fmt: skip


@needs_ext
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("n", [40, 37])  # 37: the streams' sub-sequences do not divide it
def test_hierarchical_training_step_is_the_same_with_the_kernels(aten, monkeypatch, autocast, n):
    torch.manual_seed(0)
    model = HierarchicalTransformer(**HIER)
    ids = torch.randint(0, 64, (2, n + 1))
    calls = []
    real = _NormShift.apply
    monkeypatch.setattr(_NormShift, "apply", lambda *a: calls.append(1) or real(*a))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = model(ids, return_loss=True)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run()
    # two sub-layers per block and each merge's norm; at n = 37 the attention of the two
    # compressed streams takes the modules' path
    fused = 2 * 3 * 2 + 2 - (0 if n == 40 else 2 * 2)
    assert len(calls) == fused
    with aten:
        ref_loss, ref_grads = run()
    assert len(calls) == fused  # none with the kernels off
    tol = dict(rtol=1e-4, atol=1e-5) if not autocast else dict(rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    worst = max(
        ((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads, ref_grads)
    )
    assert worst < (1e-4 if not autocast else 3e-2)


def test_the_environment_variable_turns_an_extension_off(monkeypatch):
    from retrolm.nn.fused.extension import LazyExtension

    monkeypatch.setenv("RETROLM_FUSED_TRAIN", "0")
    off = LazyExtension("x", "train_kernels.cpp", "fused training kernels", "RETROLM_FUSED_TRAIN")
    monkeypatch.setenv("RETROLM_FUSED_TRAIN", "1")
    on = LazyExtension("x", "train_kernels.cpp", "fused training kernels", "RETROLM_FUSED_TRAIN")
    assert not off.enabled and on.enabled
    assert off.set_enabled(True) is False and off.enabled
    before = fused_train.set_enabled(False)
    try:
        norm = _norm(8)
        h = torch.randn(1, 5, 8, requires_grad=True)
        out = norm_shift(h, norm, 1)
        assert out.grad_fn is not None and "NormShift" not in type(out.grad_fn).__name__
    finally:
        fused_train.set_enabled(before)


def test_builds_are_kept_per_source_torch_version_and_cpu(tmp_path, monkeypatch):
    from retrolm.nn.fused import extension

    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))
    ext_ = extension.LazyExtension("x", "train_kernels.cpp", "k", "RETROLM_FUSED_TRAIN")
    here = ext_.build_directory()
    tag = extension.cpu_tag()
    assert here.parent == tmp_path and here.name.endswith(tag) and len(tag) == 8
    assert here.name.startswith(f"train_kernels-torch{torch.__version__.split('+')[0]}-")
    monkeypatch.setattr(extension, "cpu_tag", lambda: "0badcafe")  # another machine's CPU
    other = ext_.build_directory()
    assert other != here and other.name.endswith("0badcafe")


@needs_ext
def test_a_finished_build_is_imported_without_the_builder(monkeypatch):
    """Another copy of the sources (a worktree, a mutant's copy) with the same text reuses
    the build: torch's builder, whose ninja file names sources by path, is not called."""
    import torch.utils.cpp_extension as cpp

    from retrolm.nn.fused import extension

    built = fused_train._EXT.get()
    assert (fused_train._EXT.build_directory() / extension.BUILT).is_file()

    def builder(**kwargs):
        raise AssertionError("the builder ran although a finished build exists")

    monkeypatch.setattr(cpp, "load", builder)
    again = extension.LazyExtension(
        fused_train._EXT.name, "train_kernels.cpp", "k", "RETROLM_FUSED_TRAIN"
    )
    module = again.get()
    assert module is not None and sorted(dir(module)) == sorted(dir(built))


def test_a_build_without_its_marker_goes_through_the_builder(tmp_path, monkeypatch):
    """A ``.so`` without the marker may be a build killed midway: never imported."""
    import torch.utils.cpp_extension as cpp

    from retrolm.nn.fused import extension

    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))
    monkeypatch.delenv("RETROLM_REQUIRE_KERNELS", raising=False)
    ext_ = extension.LazyExtension("x", "train_kernels.cpp", "k", "RETROLM_FUSED_TRAIN")
    (ext_.build_directory() / "x.so").write_bytes(b"half a library")
    calls = []

    def builder(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "load", builder)
    assert ext_.get() is None and calls == ["x"]


def test_a_changed_shared_header_is_a_new_build(tmp_path, monkeypatch):
    from retrolm.nn.fused import extension

    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path / "cache"))
    header = tmp_path / "vec_math.h"
    monkeypatch.setattr(extension, "_headers", lambda: [header])
    ext_ = extension.LazyExtension("x", "train_kernels.cpp", "k", "RETROLM_FUSED_TRAIN")
    header.write_text("// one version\n")
    first = ext_.build_directory()
    header.write_text("// another\n")
    assert ext_.build_directory() != first
    assert [p.name for p in extension.CSRC.glob("*.h")] == ["vec_math.h"]  # what is hashed


@needs_ext
def test_l2_normalize_takes_the_kernel_only_when_asked(monkeypatch):
    """The one ``l2_normalize``: the ATen path unless ``fused=True`` (the k-means' unit
    vectors stay bit for bit what they were), the kernel where it applies when asked."""
    from retrolm.nn.fused.train import _L2Norm
    from retrolm.nn.norms import l2_normalize

    calls = []
    real = _L2Norm.apply
    monkeypatch.setattr(_L2Norm, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 5, 8)
    aten = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    assert torch.equal(l2_normalize(x), aten) and torch.equal(l2_normalize(x, dtype=x.dtype), aten)
    assert calls == []
    fused = l2_normalize(x, fused=True)
    assert calls == [1]
    torch.testing.assert_close(fused, aten)
    l2_normalize(x, dim=1, fused=True)  # not the last dim: the ATen path
    l2_normalize(x[0], fused=True)  # not (b, h, n, d)
    assert calls == [1]


@needs_ext
def test_l2_normalize_kernel_gradients_in_float64():
    from retrolm.nn.fused.train import _L2Norm

    x = torch.randn(2, 3, 5, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _L2Norm.apply(t, 1e-12, torch.float64), (x,))


@needs_ext
@pytest.mark.parametrize(
    "dtype,out", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                  (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_l2_normalize_equals_the_composite(dtype, out):
    from retrolm.nn.norms import l2_normalize

    torch.manual_seed(0)
    base = torch.randn(2, 7, 3, 8).to(dtype).transpose(1, 2)  # a heads view, not contiguous
    base[0, 1, 2] = 0  # a zero row: the clamp takes eps
    g = torch.randn(base.shape).to(out)
    x = base.detach().requires_grad_()
    y = l2_normalize(x, dtype=out, fused=True)
    assert y.dtype is out and "L2Norm" in type(y.grad_fn).__name__
    (y.float() * g.float()).sum().backward()
    x_ref = base.detach().requires_grad_()
    ref = l2_normalize(x_ref.to(out))
    (ref.float() * g.float()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if out is torch.float32 else dict(rtol=1e-2, atol=8e-3)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    assert torch.allclose(y[0, 1, 2].float(), torch.zeros(8))


@needs_ext
def test_gelu_table_is_exact_gelu_rounded_once_for_every_bf16_value():
    import torch.nn.functional as F

    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    real = torch.isfinite(every)
    exact = F.gelu(every.double())  # rounded once to bf16 below
    got = ext.gelu_forward(every.contiguous())
    assert torch.equal(got[real], exact[real].bfloat16())
    ones = torch.ones(1, 65536, dtype=torch.bfloat16)
    slope, bias_grad = ext.gelu_backward(ones, every.view(1, -1).contiguous())
    x = every.double().requires_grad_()
    F.gelu(x).backward(torch.ones_like(x))
    # (ATen's float64 GELU backward is NaN at the largest magnitudes: compare |x| < 1e4)
    some = real & (every.float().abs() < 1e4)
    torch.testing.assert_close(slope.view(-1)[some].float(), x.grad[some].bfloat16().float())
    assert torch.isfinite(slope.view(-1)[real].float()).all()
    torch.testing.assert_close(bias_grad, slope.float().sum(0), equal_nan=True)


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_equals_the_composite_under_autocast(aten, monkeypatch, bias):
    import torch.nn.functional as F

    from retrolm.nn.feedforward import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(32, 4, bias=bias)
    x = torch.randn(2, 40, 32)
    g = torch.randn(2, 40, 32)
    calls = []
    real = fused_train._LinearGelu.apply
    monkeypatch.setattr(fused_train._LinearGelu, "apply", lambda *a: calls.append(1) or real(*a))
    params = list(ff.parameters())
    out, grads = _grads(ff, x, params, g, autocast=True)
    assert len(calls) == 1
    with aten:
        ref, ref_grads = _grads(ff, x, params, g, autocast=True)
    assert len(calls) == 1
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-2)
    for a, b in zip(grads, ref_grads):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    # outside autocast (fp32) and without autograd: the module's own path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ff(x)
    ff(x)
    assert len(calls) == 1
    h = F.gelu(F.linear(x, ff.up_proj.weight, ff.up_proj.bias))
    torch.testing.assert_close(ff(x), ff.down_proj(h))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_kmeans_assign_equals_the_composite_route(aten, dtype, masked):
    from retrolm.nn.kmeans import SphericalKMeans

    torch.manual_seed(0)
    km = SphericalKMeans(2, 8, 16)
    km.train()
    km.initted.fill_(True)
    base = torch.randn(2, 9, 2, 16).to(dtype).transpose(1, 2)  # a heads view
    base[1, 0, 3] = 0  # a zero row: the clamp takes eps
    mask = torch.rand(2, 9) > 0.3 if masked else None
    calls = []
    real = fused_train._KMeansAssign.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_train._KMeansAssign, "apply", lambda *a: calls.append(1) or real(*a))
        x = base.detach().requires_grad_()
        buckets, loss = km.route(x, mask)
        loss.backward()
        sums, counts = km._pending
        km.discard_pending()
        with aten:
            x_ref = base.detach().requires_grad_()
            ref_buckets, ref_loss = km.route(x_ref, mask)
            ref_loss.backward()
            ref_sums, ref_counts = km._pending
            km.discard_pending()
    assert len(calls) == 1
    # the C++ dot products and ATen's sum in other orders: a near tie may pick either cluster
    unit = torch.nn.functional.normalize(base.double(), dim=-1)
    sims = torch.einsum("bhnd,hkd->bhnk", unit, km.means.double())  # (b, h, n, k)
    assert_argmax_within(buckets, sims, torch.float32, reduction=16)
    keep = torch.ones_like(buckets, dtype=torch.bool) if mask is None else mask[:, None]
    keep = keep.expand_as(buckets)
    own = torch.stack([torch.bincount(buckets[:, i][keep[:, i]], minlength=8) for i in range(2)])
    assert torch.equal(counts.long(), own)  # the statistics count the kernel's own buckets
    if torch.equal(buckets, ref_buckets):  # (always so on the CPUs seen so far)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype is torch.float32 else dict(rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tol)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(counts, ref_counts)
    with torch.no_grad():  # evaluation: no statistics
        km.eval()
        km.route(base)
        assert km._pending is None
