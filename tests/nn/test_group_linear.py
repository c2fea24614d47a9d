import pytest
import torch
from tests.tolerance import assert_close_fp
from torch import nn

from retrolm.nn import GroupLinear, group_linear


@pytest.fixture(params=["regrouped", "plain"])
def strategy(request, monkeypatch):
    """Each training strategy for every dtype: ``_GroupMatmul`` (regrouped) or autograd
    through the strided bmm (plain); the layer picks one per compute dtype."""
    on = frozenset({torch.float64, torch.float32, torch.bfloat16})
    monkeypatch.setattr(
        group_linear, "REGROUPED_DTYPES", on if request.param == "regrouped" else frozenset()
    )
    return request.param


def _loop_oracle(gl: GroupLinear, x: torch.Tensor) -> torch.Tensor:
    """Group by group, in float64, with the shuffle's index written out."""
    g, i, o = gl.groups, gl.in_features, gl.out_features
    ig, og = i // g, o // g
    out = torch.zeros(*x.shape[:-1], o, dtype=torch.float64)
    for j in range(g):
        yj = x[..., j * ig : (j + 1) * ig].double() @ gl.weight[j].double()  # (..., o/g)
        for m in range(og):
            col = m * g + j if gl.shuffle else j * og + m
            out[..., col] = yj[..., m]
    if gl.bias is not None:
        out = out + gl.bias.double()
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_equals_a_float64_loop_over_groups(groups, bias, shuffle, strategy):
    torch.manual_seed(0)
    gl = GroupLinear(8, 12, groups, bias=bias, shuffle=shuffle).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(gl(x), _loop_oracle(gl, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(bias):
    gl = GroupLinear(24, 36, 3, bias=bias)
    assert sum(p.numel() for p in gl.parameters()) == 24 * 36 // 3 + (36 if bias else 0)


def test_one_group_is_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 10)
    gl = GroupLinear(6, 10, 1)
    with torch.no_grad():
        gl.weight[0].copy_(lin.weight.t())
        gl.bias.copy_(lin.bias)
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(gl(x), lin(x))


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_groups_outputs_depend_only_on_its_input_slice(shuffle):
    torch.manual_seed(0)
    g, i, o = 4, 8, 12
    gl = GroupLinear(i, o, g, shuffle=shuffle).double()
    jac = torch.autograd.functional.jacobian(gl, torch.randn(i, dtype=torch.float64))  # (o, i)
    for col in range(o):
        # which group produced output col, derived from the documented layout
        j = col % g if shuffle else col // (o // g)
        row = jac[col]
        assert row[j * (i // g) : (j + 1) * (i // g)].abs().min() > 0
        outside = torch.cat((row[: j * (i // g)], row[(j + 1) * (i // g) :]))
        assert torch.equal(outside, torch.zeros_like(outside))


def test_shuffle_interleaves_the_groups_outputs():
    g, og = 3, 2
    gl = GroupLinear(3, g * og, g, bias=False, shuffle=True)
    with torch.no_grad():  # group j's m-th output is 10·j + m for an input of ones
        for j in range(g):
            gl.weight[j] = torch.tensor([[10.0 * j + m for m in range(og)]])
    y = gl(torch.ones(3))
    # output m·g + j = group j's m-th output
    assert y.tolist() == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
    gl.shuffle = False
    assert gl(torch.ones(3)).tolist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]


def test_gradients_reach_every_weight():
    gl = GroupLinear(8, 8, 2, shuffle=True)
    gl(torch.randn(3, 8)).square().sum().backward()
    assert gl.weight.grad.abs().min() > 0 and gl.bias.grad.abs().min() > 0


@pytest.mark.parametrize(
    ("i", "o", "g", "match"),
    [
        (8, 12, 3, r"groups=3 .*in_features=8"),
        (9, 10, 3, r"groups=3 .*out_features=10"),
        (8, 8, 0, r"groups=0"),
    ],
)
def test_bad_group_counts_are_refused(i, o, g, match):
    with pytest.raises(ValueError, match=match):
        GroupLinear(i, o, g)


# --- the fast path (_GroupMatmul) against plain references, gradients included -----------


def _plain_bmm(gl: GroupLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer written the plain way (autograd through a strided bmm and a permute): the
    formulation before the fast path, kept as the reference for dtypes and autocast."""
    g = gl.groups
    xg = x.reshape(-1, g, gl.in_features // g).transpose(0, 1)  # (g, r, i/g)
    y = torch.bmm(xg, gl.weight)  # (g, r, o/g)
    y = y.permute(1, 2, 0) if gl.shuffle else y.transpose(0, 1)
    y = y.reshape(*x.shape[:-1], gl.out_features)
    return y if gl.bias is None else y + gl.bias


def _grads(fn, gl: GroupLinear, x: torch.Tensor, gy: torch.Tensor):
    """fn(x), and the gradients of <fn(x), gy> for x and every parameter of gl."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    params = [p for p in (gl.weight, gl.bias) if p is not None]
    return (y, *torch.autograd.grad(y, (x, *params), gy.to(y.dtype)))


@pytest.mark.parametrize("shape", [(8,), (1, 8), (2, 3, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [2, 4])
def test_forward_and_gradients_equal_the_float64_loop(groups, bias, shuffle, shape, strategy):
    torch.manual_seed(0)
    gl = GroupLinear(8, 12, groups, bias=bias, shuffle=shuffle).double()
    x = torch.randn(shape, dtype=torch.float64)
    gy = torch.randn(*shape[:-1], 12, dtype=torch.float64)
    fast = _grads(gl, gl, x, gy)
    ref = _grads(lambda t: _loop_oracle(gl, t), gl, x, gy)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the path without autograd (a strided bmm)
        torch.testing.assert_close(gl(x), ref[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("frozen", ["input", "weight"])
def test_gradients_of_a_partly_frozen_layer(frozen, strategy):
    torch.manual_seed(0)
    gl = GroupLinear(8, 8, 4, shuffle=True).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=frozen != "input")
    gl.weight.requires_grad_(frozen != "weight")
    gl(x).square().sum().backward()
    ref = GroupLinear(8, 8, 4, shuffle=True).double()
    ref.load_state_dict(gl.state_dict())
    x_ref = x.detach().requires_grad_(True)
    _loop_oracle(ref, x_ref).square().sum().backward()
    torch.testing.assert_close(gl.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
    if frozen == "input":
        assert x.grad is None
        torch.testing.assert_close(gl.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
    else:
        assert gl.weight.grad is None
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shuffle", [False, True])
def test_bfloat16_equals_the_float64_loop_within_rounding(shuffle, strategy):
    torch.manual_seed(0)
    rows, i, g = 64, 32, 4
    gl = GroupLinear(i, i, g, shuffle=shuffle).to(torch.bfloat16)
    x = torch.randn(rows, i, dtype=torch.bfloat16)
    gy = torch.randn(rows, i, dtype=torch.bfloat16)
    fast = _grads(gl, gl, x, gy)
    ref64 = GroupLinear(i, i, g, shuffle=shuffle).double()
    ref64.load_state_dict(gl.state_dict())  # the same bf16 values, held in float64
    ref = _grads(lambda t: _loop_oracle(ref64, t), ref64, x.double(), gy.double())
    assert [t.dtype for t in fast] == [torch.bfloat16] * 4
    # reductions: i/g terms (output), o/g (input gradient), rows (weight and bias gradients)
    for a, b, n in zip(fast, ref, (i // g, i // g, rows, rows), strict=True):
        assert_close_fp(a, b, reduction=n)


@pytest.mark.parametrize("shuffle", [False, True])
def test_autocast_computes_what_a_plain_bmm_does(shuffle, strategy):
    """Under bf16 autocast the product runs in bf16 and the fp32 bias is added in fp32 (the
    output is fp32), as autocast's bmm and ``y + bias`` give; gradients reach the fp32
    parameters in fp32."""
    torch.manual_seed(0)
    gl = GroupLinear(16, 24, 4, shuffle=shuffle)
    x, gy = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _grads(gl, gl, x, gy)
        ref = _grads(lambda t: _plain_bmm(gl, t), gl, x, gy)
    assert [t.dtype for t in fast] == [t.dtype for t in ref] == [torch.float32] * 4
    for a, b in zip(fast, ref, strict=True):  # the same bf16 products, summed in any order
        assert_close_fp(a, b, dtype=torch.bfloat16, reduction=10)


def test_gradcheck_and_double_backward(strategy):
    torch.manual_seed(0)
    gl = GroupLinear(8, 12, 4, shuffle=True).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gl, (x,))
    assert torch.autograd.gradgradcheck(gl, (x,))


@pytest.mark.parametrize(
    ("dtype", "autocast", "grad", "regrouped"),
    [
        (torch.bfloat16, False, True, True),
        (torch.float32, True, True, True),  # bf16 autocast: the product runs in bf16
        (torch.float32, False, True, False),
        (torch.float64, False, True, False),
        (torch.bfloat16, False, False, False),  # no autograd: the strided bmm
    ],
)
def test_the_strategy_follows_the_compute_dtype(dtype, autocast, grad, regrouped):
    gl = GroupLinear(8, 8, 2, shuffle=True).to(dtype)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.set_grad_enabled(grad),
    ):
        y = gl(torch.randn(3, 8, dtype=dtype))
    fns = [y.grad_fn, *(f for f, _ in y.grad_fn.next_functions)] if y.grad_fn else []
    assert any("GroupMatmul" in type(f).__name__ for f in fns) == regrouped
