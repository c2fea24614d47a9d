import pytest
import torch
from tests.tolerance import assert_argmax_within, assert_close_fp

from retrolm.nn import attention_backend
from retrolm.nn.distributed import all_reduce_sum_, is_distributed
from retrolm.nn.kmeans import SphericalKMeans, update_after_backward, update_kmeans
from retrolm.nn.layer_drop import layer_drop_keep
from retrolm.nn.moe import MixtureOfExperts
from retrolm.nn.pkm import ProductKeyMemory, pkm_param_groups
from retrolm.nn.residual import Residual
from retrolm.nn.reversible import ReversibleSequence, _recomputing, is_recomputing
from retrolm.nn.sorted_window import dense_window_mask, sorted_window_attend
from retrolm.nn.token_shift import TokenShift

D = torch.float64


def test_dense_window_mask_definition():
    # groups along 6 positions; window 2: last 2 same-group keys at positions <= query
    g = torch.tensor([0, 1, 0, 0, 1, 0])[None, None]
    m = dense_window_mask(g, g, 2)[0, 0]
    assert m[5].nonzero().squeeze(-1).tolist() == [3, 5]  # not 0, 2: too old
    assert m[4].nonzero().squeeze(-1).tolist() == [1, 4]
    assert m[0].nonzero().squeeze(-1).tolist() == [0]
    nc = dense_window_mask(g, g, 2, causal=False)[0, 0]
    assert nc[2].nonzero().squeeze(-1).tolist() == [0, 2, 3]  # one neighbour each side
    gp = g.clone()
    gp[..., 3] = -1  # padding is never seen and never counts in a window
    assert dense_window_mask(gp, gp, 2)[0, 0, 5].nonzero().squeeze(-1).tolist() == [2, 5]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mem", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_blocked_sorted_window_equals_dense_reference(causal, mem, exclude_self):
    torch.manual_seed(0)
    b, h, n, d, w = 2, 3, 37, 8, 5
    q, k, v = (torch.randn(b, h, n, d, dtype=D) for _ in range(3))
    g = torch.randint(0, 4, (b, h, n))
    g[0, :, -3:] = -1  # padding
    mk = (torch.randn(h, 2, d, dtype=D), torch.randn(h, 2, d, dtype=D)) if mem else None
    kw = dict(causal=causal, mem_kv=mk, exclude_self=exclude_self)
    fast = sorted_window_attend(q, k, v, g, w, **kw)
    with attention_backend("reference"):
        ref = sorted_window_attend(q, k, v, g, w, **kw)
    real = g[..., None] >= 0
    torch.testing.assert_close(fast * real, ref * real, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_gathered_sorted_window_equals_dense_reference(causal):
    torch.manual_seed(1)
    b, h, n, d, w = 2, 2, 29, 4, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=D) for _ in range(3))
    qg, kg = torch.randint(0, 3, (b, h, n)), torch.randint(0, 3, (b, h, n))
    mk = (torch.randn(h, 1, d, dtype=D), torch.randn(h, 1, d, dtype=D))
    fast = sorted_window_attend(q, k, v, qg, w, k_group=kg, causal=causal, mem_kv=mk)
    with attention_backend("reference"):
        ref = sorted_window_attend(q, k, v, qg, w, k_group=kg, causal=causal, mem_kv=mk)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    q.requires_grad_(True)
    sorted_window_attend(
        q, k, v, qg, w, k_group=kg, mem_kv=mk
    ).sum().backward()  # chunked + checkpointed
    assert q.grad.isfinite().all()


def test_kmeans_routes_to_nearest_and_ema_renormalises():
    torch.manual_seed(0)
    km = SphericalKMeans(2, 3, 4, decay=0.5)
    km.train()
    x = torch.randn(1, 2, 20, 4)
    with torch.no_grad():
        km.route(x)  # lazy init in training only
    assert bool(km.initted)
    buckets, loss = km.route(x.requires_grad_(True))
    sims = torch.einsum("bhnd,hkd->bhnk", torch.nn.functional.normalize(x, dim=-1), km.means)
    assert_argmax_within(buckets, sims, torch.float32, reduction=4)
    loss.backward()
    assert x.grad.abs().sum() > 0  # commitment pulls queries to centroids
    old = km.means.clone()
    km.route(torch.randn(1, 2, 20, 4, requires_grad=True))  # statistics of another batch
    km.update()
    assert not torch.allclose(old, km.means)
    torch.testing.assert_close(km.means.norm(dim=-1), torch.ones(2, 3))
    assert km.means.dtype == torch.float32 and km.ema_count.dtype == torch.float32


def test_kmeans_never_initialises_in_eval_and_skips_recompute():
    km = SphericalKMeans(1, 2, 4)
    km.eval()
    km.route(torch.randn(1, 1, 5, 4))
    assert not bool(km.initted)
    km.train()
    with _recomputing():
        assert is_recomputing()
        km.route(torch.randn(1, 1, 5, 4, requires_grad=True))
    assert km._pending is None and not bool(km.initted)


def test_update_after_backward_hook():
    km = SphericalKMeans(1, 2, 4)
    km.train()
    mod = torch.nn.ModuleList([km])
    km.init_(torch.randn(1, 1, 6, 4))
    x = update_after_backward(torch.randn(1, 1, 6, 4), mod)
    _, loss = km.route(x * 2)
    old = km.means.clone()
    loss.backward()
    assert not torch.equal(old, km.means) and km._pending is None
    update_kmeans(mod)  # nothing pending: no-op


def test_distributed_helpers_are_noops_without_a_group():
    t = torch.ones(3)
    assert not is_distributed()
    all_reduce_sum_(t)
    assert t.tolist() == [1, 1, 1]


class _Branch(torch.nn.Module):
    def __init__(self, dim, aux_scale):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(0.3)
        self.aux_scale = aux_scale

    def forward(self, x, scale=1.0):
        out = self.drop(torch.tanh(self.lin(x))) * scale
        return out, self.aux_scale * out.pow(2).mean()


def test_reversible_recompute_grads_equal_plain_autograd():
    torch.manual_seed(0)
    blocks = [(_Branch(6, 0.1), _Branch(6, 0.2)) for _ in range(3)]
    rev = ReversibleSequence(blocks).double()
    x = torch.randn(2, 5, 6, dtype=D, requires_grad=True)
    grads = []
    for recompute in (True, False):
        rev.recompute = recompute
        rev.zero_grad()
        x.grad = None
        torch.manual_seed(1)  # same dropout masks
        y, aux = rev(x, scale=0.5)
        (y.pow(2).sum() + aux).backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in rev.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    y, aux = rev(x, keep=[True, False, True])
    assert aux > 0


def test_pkm_and_param_groups():
    torch.manual_seed(0)
    pkm = ProductKeyMemory(16, num_keys=8, heads=2, topk=4)
    y = pkm(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), pkm)
    groups = pkm_param_groups(model, lr=1e-3, pkm_value_lr=1e-2)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[1]["params"][0] is pkm.values.weight


def test_moe_outputs_and_balancing_loss():
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, num_experts=3, loss_coef=1.0)
    x = torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    y, aux = moe(x, mask)
    assert y.shape == x.shape and aux > 0
    assert (y[1, 4:] == 0).all()  # padding is not routed
    x2 = x.clone()
    x2[1, 4:] = 9.0
    torch.testing.assert_close(moe(x2, mask)[0][:, :4], y[:, :4])


def test_layer_drop_keeps_one_and_is_off_in_eval():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert any(layer_drop_keep(3, 0.99, True, g))
    assert layer_drop_keep(3, 0.5, False) == [True] * 3
    with pytest.raises(ValueError, match="layer dropout"):
        layer_drop_keep(3, 1.0, True)


def test_rezero_starts_as_identity_and_tuple_outputs_pass():
    lin = torch.nn.Linear(4, 4)
    r = Residual(4, lin, rezero=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(r(x), x)
    r2 = Residual(4, lambda x: (lin(x), torch.tensor(3.0)), "layer")
    y, aux = r2(x)
    assert aux == 3.0 and y.shape == x.shape
    with pytest.raises(ValueError, match="rezero"):
        Residual(4, lin, rezero=True, post_norm=True)


def test_token_shift_state_makes_incremental_equal_full():
    torch.manual_seed(0)
    ts = TokenShift(torch.nn.Identity(), (0, 1))
    x = torch.randn(1, 6, 4)
    full = ts(x)
    state: dict = {}
    parts = [ts(x[:, :3], shift_state=state)] + [
        ts(x[:, i : i + 1], shift_state=state) for i in range(3, 6)
    ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    with pytest.raises(ValueError, match="future"):
        TokenShift(torch.nn.Identity(), (0, -1), causal=True)


@pytest.mark.parametrize("b", [1, 2])
def test_kmeans_routes_a_batch_of_one_like_any_batch(b):
    """route's batch-of-one bmm path gives the same buckets and loss as the matmul path."""
    torch.manual_seed(0)
    km = SphericalKMeans(3, 5, 8).eval()
    x = torch.randn(b, 3, 7, 8)
    buckets, loss = km.route(x)
    xn = torch.nn.functional.normalize(x, dim=-1)
    sims = torch.matmul(xn, km.means.transpose(-1, -2))  # (b, h, n, k)
    # another kernel's fp32 dot products over 8 channels: picks within rounding of the best
    assert_argmax_within(buckets, sims, torch.float32, reduction=8)
    assert_close_fp(loss, ((2.0 - 2.0 * sims.max(dim=-1).values) / 8).mean(), reduction=8)
    for i in range(b):  # each row of a batch alone: the same
        bi, _ = km.route(x[i : i + 1])
        assert_argmax_within(bi, sims[i : i + 1], torch.float32, reduction=8)
