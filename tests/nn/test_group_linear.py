import pytest
import torch
from torch import nn

from retrolm.nn import GroupLinear


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
def test_equals_a_float64_loop_over_groups(groups, bias, shuffle):
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
