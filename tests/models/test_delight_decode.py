"""DExTra's decoding path (``models/delight/dextra_decode.py``): mixers and shuffles folded
into dense weights for a few rows without autograd. It must compute what the module computes
(a float64 oracle written from the paper's rules), take over only where it applies, and follow
the parameters when they change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.models.test_delight_blocks import _dextra_oracle
from tests.tolerance import assert_close_fp

from retrolm.models.delight import DExTra
from retrolm.models.delight import dextra_decode as dd

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
