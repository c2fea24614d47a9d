"""Product-key memory, mixture of experts and the k-means commitment loss against plain
oracles written from their papers' definitions (float64 where the block allows).

PKM (Lample et al. 2019): the top-k of the k x k candidate pairs must be the exact top-k over
all num_keys² product keys, read with softmax weights. MoE (Shazeer et al. 2017, Switch's
balancing loss): each real token goes to its top_k experts by gate probability, weighted by
the renormalised probabilities; padding goes nowhere. k-means commitment (Routing
Transformer, Roy et al. 2021 §4.1): the mean over real tokens of ||x/|x| - c||² / d with c
the nearest centroid; its gradient pulls each vector towards its centroid.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from tests.tolerance import fp_tol

from retrolm.nn.kmeans import SphericalKMeans
from retrolm.nn.moe import MixtureOfExperts
from retrolm.nn.pkm import ProductKeyMemory


@torch.no_grad()
def pkm_oracle(pkm: ProductKeyMemory, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """x (b, n, dim) -> output (b, n, dim) and, per (b, n, head), the set of slots read,
    by scoring every one of the num_keys² product keys."""
    b, n, _ = x.shape
    h, nk, dk = pkm.heads, pkm.num_keys, pkm.dim_key
    q = pkm.norm(pkm.to_queries(x).view(b, n, h, dk))  # (b, n, h, dk)
    out = torch.zeros(b, n, pkm.values.weight.shape[1], dtype=x.dtype)
    slots = []
    for bi, ni, hi in itertools.product(range(b), range(n), range(h)):
        q1, q2 = q[bi, ni, hi, : dk // 2], q[bi, ni, hi, dk // 2 :]
        scores = {
            i * nk + j: float(q1 @ pkm.keys[hi, 0, i] + q2 @ pkm.keys[hi, 1, j])
            for i in range(nk)
            for j in range(nk)
        }
        best = sorted(scores, key=scores.get, reverse=True)[: pkm.topk]
        w = torch.tensor([scores[s] for s in best], dtype=torch.float64).softmax(0)
        for wt, s in zip(w, best):
            out[bi, ni] += wt * pkm.values.weight[s]
        slots.append(set(best))
    return out, slots


def test_pkm_top_k_equals_an_exhaustive_top_k_over_all_product_keys():
    torch.manual_seed(0)
    pkm = ProductKeyMemory(16, num_keys=8, heads=2, topk=4).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref, slots = pkm_oracle(pkm, x)
    torch.testing.assert_close(pkm(x), ref)
    # the slots read are the exhaustive top-k (not only an output coincidence)
    read = {}
    pkm.values.register_forward_hook(lambda m, a, o: read.setdefault("idx", a[0]))
    pkm(x)
    got = [set(r.tolist()) for r in read["idx"].view(2 * 5 * 2, pkm.topk)]
    assert got == slots
    assert len(set().union(*slots)) > pkm.topk  # different tokens read different slots


@torch.no_grad()
def moe_oracle(moe: MixtureOfExperts, x: torch.Tensor, mask: torch.Tensor):
    """A loop over tokens and experts: (out (b, n, dim), aux)."""
    b, n, _ = x.shape
    E = moe.num_experts
    out = torch.zeros_like(x)
    first = torch.zeros(E, dtype=torch.float64)
    psum = torch.zeros(E, dtype=torch.float64)
    real = 0
    for bi, ni in itertools.product(range(b), range(n)):
        if not mask[bi, ni]:
            continue
        real += 1
        xt = x[bi, ni]
        p = F.softmax(moe.gate(xt), -1)
        order = sorted(range(E), key=lambda e: float(p[e]), reverse=True)[: moe.top_k]
        total = sum(float(p[e]) for e in order)
        for e in order:
            out[bi, ni] += float(p[e]) / total * moe.experts[e](xt[None, None])[0, 0]
        first[order[0]] += 1
        psum += p
    aux = moe.loss_coef * E * float((first / real * psum / real).sum())
    return out, aux


def test_moe_routing_and_balancing_loss_equal_a_loop_over_tokens_and_experts():
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, num_experts=4, top_k=2, loss_coef=1.0).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        y, aux = moe(x, mask)
    ref, ref_aux = moe_oracle(moe, x, mask)
    # the gate's softmax runs in fp32 by design (moe.py): agreement to fp32 precision
    tol = fp_tol(torch.float32, factor=16)["rtol"]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert float(aux) == pytest.approx(ref_aux, rel=tol)
    # every expert is used by some token, so the test covers all of them
    choice = F.softmax(moe.gate(x[mask]), -1).topk(2, -1).indices
    assert set(choice.flatten().tolist()) == set(range(4))


def test_kmeans_commitment_is_the_mean_squared_distance_to_the_centroid_and_pulls_to_it():
    torch.manual_seed(0)
    km = SphericalKMeans(2, 5, 8).eval()
    x = torch.randn(2, 2, 7, 8, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    buckets, loss = km.route(x, mask)
    xn = F.normalize(x.detach(), dim=-1)
    terms, tol = [], fp_tol(torch.float32, factor=16)["rtol"]
    for bi, hi, ni in itertools.product(range(2), range(2), range(7)):
        if mask[bi, ni]:
            sims = [float(xn[bi, hi, ni] @ km.means[hi, k]) for k in range(5)]
            c = int(buckets[bi, hi, ni])  # the nearest, or one tied with it to rounding
            assert sims[c] >= max(sims) - tol * max(1.0, abs(max(sims))), (sims, c)
            terms.append(float(((xn[bi, hi, ni] - km.means[hi, c]) ** 2).sum()) / 8)
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=tol)
    # a small step down its gradient brings every real vector closer to its centroid
    loss.backward()
    with torch.no_grad():
        step = F.normalize(x - 1e-1 * x.grad, dim=-1)
        c = km.means[torch.arange(2)[None, :, None], buckets]  # (b, h, n, d)
        before, after = ((xn - c) ** 2).sum(-1), ((step - c) ** 2).sum(-1)
    real = mask[:, None, :].expand_as(before)
    assert (after[real] < before[real]).all()
