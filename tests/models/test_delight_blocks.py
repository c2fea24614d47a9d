import pytest
import torch
import torch.nn.functional as F

from retrolm.models.delight import DeLighTBlock, DExTra, GLTShape, mix
from retrolm.models.delight.dextra import default_max_groups
from retrolm.nn import KVCache, attention_backend

F64 = torch.float64


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _dextra_count(d_m: int, d_o: int, table: list[tuple[int, int, int]]) -> int:
    """Parameters of rules 1-5 with LayerNorms (weight + bias), from the table alone."""
    p = d_m // 2
    glts = sum(i * o // g + o + 2 * (o // g) for i, o, g in table)
    return (d_m * p + p + 2 * p) + glts + ((d_o + p) * d_o + d_o + 2 * d_o)


# ---------------------------------------------------------------- DExTra: tables and counts


def test_worked_example_reference_groups():
    d = DExTra(512, 256, depth=4, width_mult=2, max_groups=16, glt_groups="reference")
    assert d.layer_table() == [(256, 256, 2), (512, 1024, 4), (1280, 1024, 4), (1280, 256, 2)]
    assert _params(d) == 923_136
    assert _dextra_count(512, 256, d.layer_table()) == 923_136


def test_worked_example_paper_groups():
    d = DExTra(512, 256, depth=4, width_mult=2, max_groups=16, glt_groups="paper")
    table = [(256, 256, 1), (512, 1024, 2), (1280, 1024, 2), (1280, 256, 1)]
    assert d.layer_table() == table
    assert _params(d) == _dextra_count(512, 256, table)
    assert all(isinstance(s, GLTShape) for s in d.layer_table())


@pytest.mark.parametrize(
    ("depth", "glt_groups", "table"),
    [
        (1, "paper", [(256, 256, 1)]),
        (1, "reference", [(256, 256, 2)]),
        (3, "paper", [(256, 256, 1), (512, 1024, 2), (1280, 256, 1)]),
        (3, "reference", [(256, 256, 2), (512, 1024, 4), (1280, 256, 2)]),
        (
            5,
            "paper",
            [(256, 256, 1), (512, 640, 2), (896, 1024, 4), (1280, 640, 2), (896, 256, 1)],
        ),
        (
            5,
            "reference",
            [(256, 256, 2), (512, 640, 4), (896, 1024, 8), (1280, 640, 4), (896, 256, 2)],
        ),
    ],
)
def test_odd_and_short_depths(depth, glt_groups, table):
    # widths linspace(256, 1024, ceil(N/2)) mirrored without repeating the middle
    d = DExTra(512, 256, depth=depth, width_mult=2, max_groups=16, glt_groups=glt_groups)
    assert d.layer_table() == table
    assert _params(d) == _dextra_count(512, 256, table)


def test_eight_layers_groups_rise_and_fall_capped_at_max_groups():
    d = DExTra(512, 256, depth=8, width_mult=2, max_groups=16, glt_groups="reference")
    assert [s.groups for s in d.layer_table()] == [2, 4, 8, 16, 16, 8, 4, 2]
    d = DExTra(512, 256, depth=8, width_mult=2, max_groups=4, glt_groups="paper")
    assert [s.groups for s in d.layer_table()] == [1, 2, 4, 4, 4, 4, 2, 1]


def test_widths_are_truncated_then_rounded_up_to_the_groups_and_8():
    # p = 32, top = 2.143 * 64 = 137.152 -> 137 (truncated), then up to a multiple of 8: 144
    d = DExTra(64, 32, depth=4, width_mult=2.143, glt_groups="reference")
    assert d.layer_table() == [(32, 32, 2), (64, 144, 2), (176, 144, 2), (176, 32, 2)]
    # multiples of max(g_l, g_l+1, 8): 819 -> 832 next to 16 groups, 824 next to 8 and 4
    d = DExTra(512, 256, depth=8, width_mult=2.15, max_groups=16, glt_groups="reference")
    outs = [s.out_features for s in d.layer_table()]
    assert outs == [256, 544, 832, 1104, 1104, 824, 544, 256]
    assert [s.in_features for s in d.layer_table()] == [256] + [o + 256 for o in outs[:-1]]


@pytest.mark.parametrize(("d_m", "g"), [(512, 16), (64, 2), (96, 4), (16, 1), (32, 1)])
def test_default_max_groups(d_m, g):
    assert default_max_groups(d_m) == g
    assert DExTra(d_m, d_m // 2, depth=8, glt_groups="reference").max_groups == g


# ---------------------------------------------------------------- DExTra: behaviour


def _glt_oracle(glt, x):
    """One GLT from its parameters, group by group, in float64 (LayerNorm, swish)."""
    lin, g = glt.linear, glt.groups
    ig, og = lin.in_features // g, lin.out_features // g
    y = torch.zeros(*x.shape[:-1], lin.out_features, dtype=F64)
    for j in range(g):
        yj = x[..., j * ig : (j + 1) * ig] @ lin.weight[j]
        for m in range(og):
            y[..., m * g + j if lin.shuffle else j * og + m] = yj[..., m]
    y = (y + lin.bias).unflatten(-1, (g, og))
    return F.silu(F.layer_norm(y, (og,), glt.norm.weight, glt.norm.bias)).flatten(-2)


def _mix_oracle(x, h, g):
    p, o = x.shape[-1] // g, h.shape[-1] // g
    return torch.cat(
        [t for j in range(g) for t in (x[..., j * p : (j + 1) * p], h[..., j * o : (j + 1) * o])],
        -1,
    )


def _dextra_oracle(d: DExTra, inp):
    def ln(t, norm):
        return F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias)

    x = F.silu(ln(F.linear(inp, d.in_proj.weight, d.in_proj.bias), d.in_norm))
    h = x
    for l, glt in enumerate(d.glts):  # noqa: E741
        h = _glt_oracle(glt, _mix_oracle(x, h, glt.groups) if l else h)
    h = _mix_oracle(x, h, d.glts[-1].groups)
    return F.silu(ln(F.linear(h, d.out_proj.weight, d.out_proj.bias), d.out_norm))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("depth", "glt_groups"), [(4, "reference"), (5, "paper")])
def test_forward_equals_a_float64_oracle(depth, glt_groups, shuffle):
    torch.manual_seed(0)
    d = DExTra(64, 24, depth=depth, glt_groups=glt_groups, shuffle=shuffle, max_groups=4)
    d = d.double().eval()
    with torch.no_grad():  # norms away from their (1, 0) init, so a mix-up shows
        for n in d.modules():
            if isinstance(n, torch.nn.LayerNorm):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, dtype=F64)
    # nn.norms.LayerNorm computes in fp32 even for fp64 inputs: an fp32 tolerance
    torch.testing.assert_close(d(x), _dextra_oracle(d, x), rtol=1e-5, atol=1e-5)


def test_mixer_interleaves_input_and_previous_output_by_group():
    x, h = torch.arange(4.0), 100 + torch.arange(6.0)
    assert mix(x, h, 2).tolist() == [0, 1, 100, 101, 102, 2, 3, 103, 104, 105]
    assert mix(x, h, 1).tolist() == [0, 1, 2, 3, 100, 101, 102, 103, 104, 105]


def _dependency(glt, in_features):
    """(out, in) bool: which outputs of a GLT depend on which inputs."""
    jac = torch.autograd.functional.jacobian(glt, torch.randn(in_features, dtype=F64))
    return jac.abs() > 0


@pytest.mark.parametrize(
    ("glt_groups", "max_groups", "expected"),
    [
        ("paper", 8, [1, 2, 4, 4, 2, 1]),
        ("reference", 8, [2, 4, 8, 8, 4, 2]),
        ("paper", 2, [1, 2, 2, 2, 2, 1]),
    ],
)
def test_each_glt_is_block_diagonal_with_its_groups(glt_groups, max_groups, expected):
    # glt_groups and max_groups change which features each GLT mixes (shuffle off so that
    # output slice j is group j's)
    d = DExTra(128, 64, depth=6, glt_groups=glt_groups, max_groups=max_groups, shuffle=False)
    d = d.double()
    for glt, g in zip(d.glts, expected, strict=True):
        dep = _dependency(glt, glt.linear.in_features)
        blocks = torch.block_diag(*[torch.ones(dep.shape[0] // g, dep.shape[1] // g)] * g)
        assert torch.equal(dep, blocks.bool())


def test_shuffle_changes_the_output():
    torch.manual_seed(0)
    a = DExTra(64, 32, depth=4, glt_groups="reference", shuffle=True).eval()
    b = DExTra(64, 32, depth=4, glt_groups="reference", shuffle=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert not torch.allclose(a(x), b(x))
    b.glts.apply(lambda m: setattr(m, "shuffle", True) if hasattr(m, "shuffle") else None)
    torch.testing.assert_close(a(x), b(x))  # the only difference


@pytest.mark.parametrize(
    ("option", "other"), [("act_type", "gelu"), ("act_type", "relu"), ("norm_type", "rms")]
)
def test_act_and_norm_types_change_the_output(option, other):
    x = torch.randn(3, 64)
    torch.manual_seed(0)
    base = DExTra(64, 32, depth=3).eval()
    torch.manual_seed(0)  # the same linear weights (norms draw no random numbers)
    changed = DExTra(64, 32, depth=3, **{option: other}).eval()
    torch.testing.assert_close(base.in_proj.weight, changed.in_proj.weight)
    assert not torch.allclose(base(x), changed(x))


def test_dropout_acts_in_training_only():
    x = torch.randn(4, 64)
    d = DExTra(64, 32, depth=3, dropout=0.3)
    assert not torch.allclose(d(x), d(x))
    d.eval()
    torch.testing.assert_close(d(x), d(x))
    plain = DExTra(64, 32, depth=3)  # dropout 0: training is deterministic
    torch.testing.assert_close(plain(x), plain.eval()(x))


def test_dropout_acts_inside_every_glt():
    d = DExTra(64, 32, depth=3, dropout=0.5)
    for glt in d.glts:  # after the activation, only dropout gives exact zeros
        x = torch.randn(64, glt.linear.in_features)
        assert 0.3 < (glt(x) == 0).float().mean() < 0.7
        assert (glt.eval()(x) == 0).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 63}, r"in_features must be even .* got 63"),
        ({"depth": 0}, r"depth=0"),
        ({"out_features": 0}, r"out_features=0"),
        ({"width_mult": 0.0}, r"width_mult .* got 0.0"),
        ({"max_groups": 3}, r"power of two .* got 3"),
        ({"glt_groups": "define"}, r"unknown glt_groups 'define'"),
        ({"act_type": "tanh"}, r"unknown act_type 'tanh'"),
        ({"norm_type": "bn"}, r"unknown norm_type 'bn'"),
        ({"dropout": 1.0}, r"dropout .* got 1.0"),
        ({"in_features": 20, "max_groups": 4}, r"in_features/2=10 .* \(4\)"),
        ({"out_features": 3}, r"out_features=3 .* \(2\)"),
    ],
)
def test_bad_dextra_configs_are_refused(kwargs, match):
    args = {"in_features": 64, "out_features": 32, "depth": 4, "glt_groups": "reference"}
    with pytest.raises(ValueError, match=match):
        DExTra(**{**args, **kwargs})


# ---------------------------------------------------------------- DeLighT block


def _block(**kw) -> DeLighTBlock:
    torch.manual_seed(0)
    args = {"dim": 32, "depth": 4, "width_mult": 2.0, "max_groups": 2}
    return DeLighTBlock(**{**args, **kw})


@pytest.mark.parametrize(("dim", "ffn_red", "depth"), [(32, 4, 4), (64, 2, 5)])
def test_block_parameter_count(dim, ffn_red, depth):
    b = _block(dim=dim, ffn_red=ffn_red, depth=depth)
    d_o, h, dex = dim // 2, dim // ffn_red, _params(b.dextra)
    expected = 4 * dim + dex + 3 * d_o**2 + 3 * d_o + d_o * dim + dim + 2 * dim * h + h + dim
    assert _params(b) == expected
    assert (b.dextra.in_features, b.dextra.out_features) == (dim, d_o)
    assert b.ffn.up_proj.out_features == h


def test_block_is_causal():
    b = _block().double().eval()
    n = 6
    x = torch.randn(2, n, 32, dtype=F64)
    y = b(x)
    for i in range(n):
        later = x.clone()
        later[:, i + 1 :] += torch.randn(2, n - i - 1, 32, dtype=F64)
        torch.testing.assert_close(b(later)[:, : i + 1], y[:, : i + 1], rtol=0, atol=1e-12)
        here = x.clone()
        here[:, i] += torch.randn(2, 32, dtype=F64)  # (not a constant: the norm removes it)
        changed = (b(here) - y).abs().amax(dim=(0, 2))  # (n,)
        assert torch.all(changed[:i] < 1e-12) and torch.all(changed[i:] > 1e-6)


def test_block_matches_the_reference_attention_path():
    b = _block().double().eval()
    x = torch.randn(2, 5, 32, dtype=F64)
    with attention_backend("reference"):
        ref = b(x)
    torch.testing.assert_close(b(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefill", [1, 3])
def test_cached_decoding_equals_the_full_forward(prefill):
    b = _block().double().eval()
    x = torch.randn(2, 7, 32, dtype=F64)
    full = b(x)
    cache = KVCache()
    steps = [b(x[:, :prefill], cache=cache)]
    steps += [b(x[:, t : t + 1], cache=cache) for t in range(prefill, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
    assert cache.length == 7


@pytest.mark.parametrize("which", ["dropout", "attn_dropout", "delight_dropout"])
def test_each_dropout_acts_in_training_only(which):
    off = {"dropout": 0.0, "attn_dropout": 0.0, "delight_dropout": 0.0}
    b = _block(**{**off, which: 0.5})
    x = torch.randn(2, 6, 32)
    torch.manual_seed(1)
    a = b(x)
    assert not torch.allclose(a, b(x))
    b.eval()
    torch.testing.assert_close(b(x), b(x))
    plain = _block(**off)
    torch.testing.assert_close(plain(x), plain.eval()(x))


@pytest.mark.parametrize(
    ("option", "value"), [("act_type", "gelu"), ("shuffle", False), ("glt_groups", "reference")]
)
def test_block_options_change_the_output(option, value):
    x = torch.randn(2, 4, 32)
    base, changed = _block().eval(), _block(**{option: value}).eval()
    if option != "glt_groups":  # same shapes: same weights, only the option differs
        changed.load_state_dict(base.state_dict())
    assert not torch.allclose(base(x), changed(x))


def test_block_trains():
    b = _block(dropout=0.1, attn_dropout=0.1, delight_dropout=0.1)
    b(torch.randn(2, 5, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 31}, r"dim must be even .* got 31"),
        ({"ffn_red": 3}, r"ffn_red=3 .* dim=32"),
        ({"ffn_red": 0}, r"ffn_red=0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"attn_dropout": -0.1}, r"attn_dropout .* got -0.1"),
        ({"act_type": "tanh"}, r"unknown act_type 'tanh'"),
        ({"norm_type": "bn"}, r"unknown norm_type 'bn'"),
        ({"max_groups": 3}, r"max_groups .* got 3"),
    ],
)
def test_bad_block_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _block(**kwargs)
