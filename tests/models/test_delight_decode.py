"""DExTra's decoding path (``models/delight/dextra_decode.py``): mixers and shuffles folded
into dense weights for a few rows without autograd. It must compute what the module computes
(a float64 oracle written from the paper's rules), take over only where it applies, and follow
the parameters when they change."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tests.models.test_delight import KINDS, build, ids
from tests.models.test_delight_blocks import _dextra_oracle, _mix_oracle
from tests.tolerance import assert_close_fp

from retrolm.models.delight import DExTra
from retrolm.models.delight import dextra_decode as dd
from retrolm.models.delight.block import DeLighTBlock
from retrolm.nn.fused import decode as fused_decode
from retrolm.nn.norms import LayerNorm, RMSNorm, ScaleNorm

F64 = torch.float64


def _dextra(depth=5, glt_groups="paper", shuffle=True, max_groups=4, **kw) -> DExTra:
    torch.manual_seed(depth)
    d = DExTra(64, 24, depth=depth, glt_groups=glt_groups, shuffle=shuffle, max_groups=max_groups,
               **kw).double().eval()  # fmt: skip
    with torch.no_grad():  # norms away from their (1, 0) init, so a mix-up shows
        for n in d.modules():
            if isinstance(n, torch.nn.LayerNorm):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)
    return d


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("depth", "glt_groups"), [(1, "paper"), (4, "reference"), (5, "paper")])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_folded_path_equals_the_float64_oracle(depth, glt_groups, shuffle, shape):
    d = _dextra(depth, glt_groups, shuffle)
    x = torch.randn(*shape, 64, dtype=F64)
    with torch.no_grad():
        out = d(x)
    assert d._folded._value is not None  # the folded path ran
    # nn.norms.LayerNorm computes in fp32 even for fp64 inputs: an fp32 tolerance
    torch.testing.assert_close(out, _dextra_oracle(d, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("norm_type", "act_type"), [("rms", "gelu"), ("scale", "relu")])
def test_folded_path_follows_norm_and_activation(norm_type, act_type):
    d = _dextra(4, norm_type=norm_type, act_type=act_type).float()
    x = torch.randn(1, 64)
    d.train()  # the module's own path, autograd on: the reference here
    ref = d(x)
    d.eval()
    with torch.no_grad():
        assert_close_fp(d(x), ref, reduction=256)
    assert d._folded._value is not None


def test_wide_grouped_layers_stay_grouped_and_agree(monkeypatch):
    d = _dextra(5, max_groups=4)
    x = torch.randn(2, 64, dtype=F64)
    monkeypatch.setattr(dd, "FOLD_NUMEL", 0)  # every grouped GLT is "too wide" to fold
    plan = dd.fold(d, F64)
    groups = [g.groups for g in d.glts]
    assert [f is None for f in plan.glts] == [g > 1 for g in groups]
    assert any(g > 1 for g in groups) and any(g == 1 for g in groups)
    with torch.no_grad():
        torch.testing.assert_close(d(x), _dextra_oracle(d, x), rtol=1e-5, atol=1e-5)


def test_only_eval_mode_without_autograd_and_few_rows_take_the_folded_path():
    d = _dextra(3)
    x = torch.randn(1, 64, dtype=F64)
    d(x)  # autograd on
    assert d._folded._value is None
    d.train()
    with torch.no_grad():
        d(x)
    assert d._folded._value is None
    d.eval()
    with torch.no_grad():
        d(torch.randn(dd.MAX_ROWS + 1, 64, dtype=F64))  # a prefill: the grouped path
    assert d._folded._value is None
    with torch.no_grad():
        d(x)
    assert d._folded._value is not None


def test_changed_parameters_rebuild_the_folded_weights():
    d = _dextra(4)
    x = torch.randn(1, 64, dtype=F64)
    with torch.no_grad():
        before = d(x)
        for p in (d.glts[2].linear.weight, d.out_proj.bias):
            p.add_(0.1 * torch.randn_like(p))  # an optimizer step moves the version
            after = d(x)
            assert not torch.allclose(after, before)
            torch.testing.assert_close(after, _dextra_oracle(d, x), rtol=1e-5, atol=1e-5)
            before = after


def test_autocast_bf16_folds_in_the_compute_dtype():
    d = _dextra(4).float()
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref = d(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = d(x)
    assert d._folded._key[1] is torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.99


# --- the fused step (nn/fused/csrc/decode_blocks.cpp dextra_step): fp32 CPU decoding ---------
ext = fused_decode.extension()
needs_ext = pytest.mark.skipif(ext is None, reason="the fused blocks could not be built here")
_NORM_F64 = {
    LayerNorm: lambda t, n: F.layer_norm(t, t.shape[-1:], n.weight.double(), n.bias.double()),
    RMSNorm: lambda t, n: t * (t.pow(2).mean(-1, keepdim=True) + n.eps).rsqrt() * n.weight.double(),
    ScaleNorm: lambda t, n: t / t.norm(dim=-1, keepdim=True).clamp(min=n.eps) * n.g.double(),
}


def _oracle(d: DExTra, inp):
    """DExTra in float64 from its parameters by the paper's rules, any norm and activation."""
    act = {F.silu: F.silu, F.gelu: F.gelu, F.relu: F.relu}[d.act]

    def post(t, norm, g):  # the norm of each of the g slices, then the activation
        return act(_NORM_F64[type(norm)](t.unflatten(-1, (g, -1)), norm)).flatten(-2)

    x = post(
        F.linear(inp.double(), d.in_proj.weight.double(), d.in_proj.bias.double()), d.in_norm, 1
    )
    h = x
    for l, glt in enumerate(d.glts):  # noqa: E741
        lin, g = glt.linear, glt.groups
        u = _mix_oracle(x, h, g) if l else h
        ig, og = lin.in_features // g, lin.out_features // g
        y = torch.zeros(*u.shape[:-1], lin.out_features, dtype=F64)
        for j in range(g):
            yj = u[..., j * ig : (j + 1) * ig] @ lin.weight[j].double()
            for m in range(og):
                y[..., m * g + j if lin.shuffle else j * og + m] = yj[..., m]
        h = post(y + lin.bias.double(), glt.norm, g)
    u = _mix_oracle(x, h, d.glts[-1].groups)
    out = F.linear(u, d.out_proj.weight.double(), d.out_proj.bias.double())
    return post(out, d.out_norm, 1)


class _Spy:
    """The extension, counting its dextra_step calls (and naming every call in ``log``)."""

    def __init__(self, module, log=None):
        self.module, self.calls, self.log = module, 0, [] if log is None else log

    def __getattr__(self, name):
        self.log.append(name)
        if name == "dextra_step":
            self.calls += 1
        return getattr(self.module, name)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(ext)
    monkeypatch.setattr(fused_decode, "extension", lambda: s)
    before = fused_decode.set_enabled(True)
    yield s
    fused_decode.set_enabled(before)


def _fused_folded_oracle(d: DExTra, x, spy: _Spy):
    """(fused step, ATen folded path, float64 oracle) of d(x); checks the fused one ran."""
    with torch.no_grad():
        calls = spy.calls
        fused = d(x)
        assert spy.calls == calls + 1 and d._folded._value.fused is not None
        before = fused_decode.set_enabled(False)
        try:
            folded = d(x)
        finally:
            fused_decode.set_enabled(before)
        assert spy.calls == calls + 1  # switched off: the ATen folded path
    return fused, folded, _oracle(d, x)


def _randomise_norms(d: DExTra) -> DExTra:
    with torch.no_grad():  # away from the (1, 0) / sqrt(n) inits, so a mix-up shows
        for n in d.modules():
            for name in ("weight", "bias", "g"):
                t = (
                    getattr(n, name, None)
                    if isinstance(n, (LayerNorm, RMSNorm, ScaleNorm))
                    else None
                )
                if t is not None:
                    t.mul_(torch.empty_like(t).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(t))
    return d


def _close(fused, folded, oracle):
    assert_close_fp(fused, folded, reduction=256)
    assert_close_fp(fused, oracle, dtype=torch.float32, reduction=256)


@needs_ext
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(
    ("depth", "glt_groups"),
    [
        (1, "paper"),
        (2, "reference"),
        (3, "paper"),
        (4, "reference"),
        (5, "paper"),
        (5, "reference"),
    ],
)
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_step_equals_folded_path_and_float64_oracle(depth, glt_groups, shuffle, rows, spy):
    d = _randomise_norms(_dextra(depth, glt_groups, shuffle).float())
    _close(*_fused_folded_oracle(d, torch.randn(rows, 64), spy))


@needs_ext
@pytest.mark.parametrize("norm_type", ["ln", "rms", "scale"])
@pytest.mark.parametrize("act_type", ["swish", "gelu", "relu"])
def test_fused_step_computes_each_norm_and_activation(norm_type, act_type, spy):
    d = _dextra(4, "reference", norm_type=norm_type, act_type=act_type).float()
    _close(*_fused_folded_oracle(_randomise_norms(d), torch.randn(2, 1, 64), spy))


@needs_ext
@pytest.mark.parametrize("fold_numel", [0, 64 * 48])  # none grouped folded; the narrow ones
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_step_runs_wide_grouped_layers_grouped(fold_numel, shuffle, rows, spy, monkeypatch):
    monkeypatch.setattr(dd, "FOLD_NUMEL", fold_numel)
    d = _randomise_norms(_dextra(5, "reference", shuffle, max_groups=4).float())
    fused, folded, oracle = _fused_folded_oracle(d, torch.randn(rows, 64), spy)
    kept = [f is None for f in d._folded._value.glts]
    assert any(kept) and (fold_numel == 0 or not all(kept))  # grouped and folded mixed
    _close(fused, folded, oracle)


@needs_ext
def test_fused_step_follows_changed_norms_and_input_layer(spy):
    d = _randomise_norms(_dextra(3).float())
    x = torch.randn(1, 64)
    for p in (d.glts[1].norm.weight, d.in_proj.weight, d.out_norm.bias):
        with torch.no_grad():
            p.add_(0.2 * torch.randn_like(p))  # an in-place update the folded weights keep
        _close(*_fused_folded_oracle(d, x, spy))


def test_fused_step_only_for_fp32_and_switched_off_by_the_environment():
    assert dd.fold(_dextra(3), F64).fused is None  # float64: the ATen folded path
    code = "from retrolm.nn.fused import decode; assert not decode.enabled()"
    env = {**os.environ, "RETROLM_FUSED_DECODE": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


@needs_ext
@pytest.mark.parametrize(
    ("norm_type", "act_type", "fused"),
    [
        ("ln", "swish", True),
        ("rms", "gelu", True),
        ("ln", "relu", False),
        ("scale", "swish", False),
    ],
)
def test_block_decodes_its_ffn_as_the_fused_feed_forward_block(norm_type, act_type, fused, spy):
    torch.manual_seed(0)
    block = DeLighTBlock(64, 3, 2.0, max_groups=4, norm_type=norm_type, act_type=act_type)
    block = _randomise_norms(block.eval())
    x = torch.randn(2, 1, 64)
    assert (block._fused_ffn_act is not None) is fused
    calls = []
    real = fused_decode.feed_forward
    with pytest.MonkeyPatch.context() as m, torch.no_grad():
        m.setattr(fused_decode, "feed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = block(x)
        fused_decode.set_enabled(False)
        ref = block(x)  # every ATen path
    assert len(calls) == int(fused)
    assert_close_fp(out, ref, reduction=256)


@needs_ext
@pytest.mark.parametrize("kind", ["delight", "delight-rotary", "delight-define"])
def test_fused_decoding_steps_equal_the_full_forward_and_the_aten_steps(kind, monkeypatch):
    lm, x = build(**KINDS[kind]), ids(n=11)
    calls = []
    real = fused_decode.extension()
    monkeypatch.setattr(fused_decode, "extension", lambda: _Spy(real, calls))

    def decode():
        cache = lm.init_cache(2)
        steps = [lm(x[:, :4], cache=cache)]
        return torch.cat(steps + [lm(x[:, t : t + 1], cache=cache) for t in range(4, 11)], 1)

    with torch.no_grad():
        full, fused = lm(x), decode()
        assert calls.count("projected_attention_block") == 7 * len(lm.blocks)
        before = fused_decode.set_enabled(False)
        try:
            aten = decode()
        finally:
            fused_decode.set_enabled(before)
    assert_close_fp(fused, full, reduction=64)
    assert_close_fp(fused, aten, reduction=64)
