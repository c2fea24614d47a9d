"""Simple Hierarchical Transformer: causality, cached generation, reference path, losses."""

import pytest
import torch

from retrolm import HierarchicalTransformer
from retrolm.models.autoregressive import AutoregressiveWrapper
from retrolm.nn import attention_backend

V, N, SEQ = 17, 24, 32
D = torch.float64

# the README's configurations at tiny sizes, and every stride / merge / window variant
VARIANTS = {
    "readme_three": dict(hierarchies=(1, 2, 8), window_sizes=(4, 6, None)),
    "readme_four": dict(
        dim=(8, 12, 16, 16),
        ff_mult=(2, 2, 4, 4),
        dim_head=(4, 6, 8, 8),
        heads=(1, 2, 2, 2),
        hierarchies=(1, 2, 4, 16),
        hierarchical_stride=(1, 1, 1, 8),
        window_sizes=(4, 5, 3, None),
    ),
    "flat": dict(),
    "strides": dict(
        hierarchies=(1, 2, 4), hierarchical_stride=(1, 2, 2), window_sizes=(3, None, 2)
    ),
    "hourglass_stride": dict(hierarchies=(1, 8), hierarchical_stride=(1, 8)),
    "merge_all": dict(hierarchies=(1, 4), hierarchical_stride=(1, 4), hierarchy_merge_all=True),
    "merge_all_strided_predictor": dict(
        hierarchies=(2, 4), hierarchical_stride=(2, 4), hierarchy_merge_all=True
    ),
    "window_zero": dict(hierarchies=(1, 2, 4), window_sizes=(0, 0, None)),
    "predict_all": dict(
        hierarchies=(1, 2, 8), hierarchical_stride=(1, 2, 4), predict_use_all_hierarchy=True
    ),
    "predict_coarse": dict(hierarchies=(1, 2), predict_hierarchy=2, window_sizes=(3, 4)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to oversubscribed shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(num_tokens=V, dim=16, depth=2, dim_head=8, heads=2, seq_len=SEQ)
    kw.update(overrides)
    return HierarchicalTransformer(**kw).to(D).eval()


def effective_stride(model):
    """Positions whose own token reaches the logits: the predicting stream's stride."""
    cfg = model.config
    if cfg.predict_use_all_hierarchy:
        return min(cfg.hierarchical_stride)
    return cfg.hierarchical_stride[cfg.predict_index]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_sweep_every_position(name):
    model = build(**VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, N), generator=g)
    with torch.no_grad():
        base = model(ids)
        s = effective_stride(model)
        for t in range(N):
            other = ids.clone()
            other[:, t:] = (ids[:, t:] + torch.randint(1, V, (2, N - t), generator=g)) % V
            diff = (model(other) - base).abs().amax(dim=(0, 2))  # (N,)
            assert diff[:t].sum() == 0, f"{name}: future tokens >= {t} changed earlier logits"
            if t % s == 0:  # the test can fail: position t itself must see token t
                assert diff[t] > 1e-6, f"{name}: logits at {t} ignore token {t}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_forward_equals_full_forward(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, V, (2, N))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:6], cache=cache)]
        parts.append(model(ids[:, 6:], cache=cache))  # several tokens after the prefill
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def greedy_full(model, prompt, n):
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat((out, model(out)[:, -1:].argmax(-1)), dim=1)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_cached_generation_equals_full_forwards(name):
    model = build(**VARIANTS[name])
    prompt = torch.randint(0, V, (2, 3))
    cached = model.generate(prompt, N - 3, temperature=0)
    assert torch.equal(cached, greedy_full(model, prompt, N - 3))
    assert cached.shape == (2, N - 3)


@pytest.mark.parametrize("name", ["readme_three", "readme_four", "merge_all", "predict_all"])
def test_fast_attention_equals_reference_float64(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, V, (2, N + 1))
    with torch.no_grad():
        fast = model(ids, return_loss=True)
        with attention_backend("reference"):
            ref = model(ids, return_loss=True)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_use_flash_attn_false_takes_the_reference_path(monkeypatch):
    import retrolm.nn.attention as core

    calls = []
    original = core.reference_attend
    monkeypatch.setattr(
        core, "reference_attend", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    ids = torch.randint(0, V, (1, N))
    plain = build(use_flash_attn=False, **VARIANTS["readme_three"])
    with torch.no_grad():
        out = plain(ids)
    assert calls, "use_flash_attn=False must use the einsum reference attention"
    calls.clear()
    fast = build(**VARIANTS["readme_three"])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), out, rtol=1e-10, atol=1e-10)
    assert not calls


def test_token_zero_carries_loss():
    model = build(**VARIANTS["readme_three"]).train()
    ids = torch.zeros(2, N + 1, dtype=torch.long)  # every label is token 0
    loss, (ce, recon, ar) = model(ids, return_loss=True)
    assert ce > 0 and recon > 0 and torch.isfinite(loss)
    loss.backward()
    assert model.to_logits.weight.grad.abs().sum() > 0
    ignored = build(ignore_index=0, **VARIANTS["readme_three"])
    _, (ce0, _, _) = ignored(ids, return_loss=True)
    assert torch.isnan(ce0)  # ignore_index=0 (the reference default) drops every label here


def test_loss_parts_and_zero_weights_are_not_computed(monkeypatch):
    ids = torch.randint(0, V, (2, N + 1))
    model = build(**VARIANTS["readme_three"])
    loss, (ce, recon, ar) = model(ids, return_loss=True)
    torch.testing.assert_close(loss, ce + 0.1 * recon + 0.25 * ar)
    off = build(recon_loss_weight=0, hierarchical_ar_loss_weight=0, **VARIANTS["readme_three"])
    assert len(off.recon_heads) == 0 and len(off.ar_heads) == 0

    def boom(*a, **k):
        raise AssertionError("a loss with weight 0 was computed")

    monkeypatch.setattr(type(off), "_recon_loss", boom)
    monkeypatch.setattr(type(off), "_ar_loss", boom)
    loss, (ce, recon, ar) = off(ids, return_loss=True)
    assert recon == 0 and ar == 0 and torch.equal(loss, ce)


def test_ar_target_is_detached_by_default():
    ids = torch.randint(0, V, (2, N + 1))

    def grads(detach):
        model = build(recon_loss_weight=0, detach_ar_target=detach, **VARIANTS["readme_three"])
        _, (_, _, ar) = model(ids, return_loss=True)
        ar.backward()
        return model.compress[1].proj.weight.grad.clone()

    assert not torch.allclose(grads(True), grads(False))


def test_wrapper_and_generate_api():
    model = build(**VARIANTS["readme_three"])
    wrapper = AutoregressiveWrapper(model)
    ids = torch.randint(0, V, (2, N + 1))
    assert torch.isfinite(wrapper(ids, return_loss=True))
    out = model.generate(torch.randint(0, V, (5,)), 7)
    assert out.shape == (7,) and out.dtype == torch.long
    sampled = model.generate(torch.randint(0, V, (2, 4)), 6, top_k=3, top_p=0.9)
    assert sampled.shape == (2, 6)


def test_input_longer_than_seq_len_is_rejected():
    model = build()
    with pytest.raises(ValueError, match="input has 33 tokens but seq_len is 32"):
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))
    model(torch.zeros(1, SEQ + 1, dtype=torch.long), return_loss=True)  # n + 1 is fine


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = HierarchicalTransformer(
        num_tokens=V, dim=32, depth=2, dim_head=16, heads=2, seq_len=SEQ,
        hierarchies=(1, 2, 4), window_sizes=(8, 8, None),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = torch.randint(0, V, (4, SEQ + 1))
    for _ in range(80):
        loss, (ce, _, _) = model(ids, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ce.item() < 0.3, ce.item()


@pytest.mark.parametrize(
    "kw",
    [
        dict(hierarchies=(1, 2, 8), window_sizes=(8, 16, None)),
        dict(hierarchies=(1, 4), window_sizes=(8, None), hierarchical_stride=(1, 2)),
        dict(hierarchies=(1, 2), window_sizes=(0, 16), hierarchy_merge_all=True),
        dict(hierarchies=(1, 2, 4), window_sizes=(8, 8, 8), predict_use_all_hierarchy=True),
    ],
)
@pytest.mark.parametrize("prompt", [3, 20])  # shorter and longer than the shift distance
def test_prefill_keeping_the_last_logits_then_steps_equal_the_full_forward(kw, prompt):
    """``logits_to_keep=1`` on a prompt's cached forward skips the last layer's
    feed-forwards for all but the last position (generation's prefill): the kept logits and
    every later cached step still equal the full forward."""
    torch.manual_seed(0)
    model = HierarchicalTransformer(
        num_tokens=256, dim=64, depth=2, heads=2, dim_head=16, seq_len=128, **kw
    ).eval()
    seq = torch.randint(0, 256, (2, 40))
    full = model(seq)
    with torch.no_grad():
        cache = model.init_cache(2)
        first = model(seq[:, :prompt], cache=cache, logits_to_keep=1)
        steps = [model(seq[:, i : i + 1], cache=cache) for i in range(prompt, 40)]
    assert first.shape == (2, 1, 256)
    torch.testing.assert_close(torch.cat([first, *steps], 1), full[:, prompt - 1 :])
    torch.testing.assert_close(model(seq, logits_to_keep=2), full[:, -2:])


def test_the_ar_loss_cosine_equals_F_cosine_similarity():
    from retrolm.models.hierarchical.model import _cosine_similarity

    a = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    b.data[0, 0] = 0.0  # a zero row: eps keeps it finite, as in F
    ours = _cosine_similarity(a, b)
    ref = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(ours, ref)
    g = torch.randn(3, 7, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(ours, (a, b), g), torch.autograd.grad(ref, (a, b), g)):
        torch.testing.assert_close(x, y)


def test_the_compression_per_vocabulary_entry_changes_nothing(monkeypatch):
    """With fewer vocabulary entries than positions the compressed streams are computed per
    entry (CausalDownsample.forward_embedded): the same loss, gradients and causality as the
    convolution over the embedded sequence."""
    from retrolm.nn import CausalDownsample

    torch.manual_seed(0)
    kw = dict(num_tokens=12, dim=16, depth=2, heads=2, dim_head=8, seq_len=64)
    model = HierarchicalTransformer(hierarchies=(1, 2, 4), window_sizes=(4, 8, None), **kw).double()
    ids = torch.randint(0, 12, (2, 41))
    calls = []
    real = CausalDownsample.forward_embedded

    def spy(self, *a):
        calls.append(1)
        return real(self, *a)

    monkeypatch.setattr(CausalDownsample, "forward_embedded", spy)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, _ = model(ids, return_loss=True)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    assert len(calls) == 2  # the two compressed streams
    monkeypatch.setattr(
        CausalDownsample, "forward_embedded", lambda self, ids, table: self(table[ids])
    )
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(CausalDownsample, "forward_embedded", real)
    with torch.no_grad():
        x = ids[:, :-1]
        base = model(x)
        for p in (0, 17, 39):
            y = x.clone()
            y[:, p] = (y[:, p] + 1) % 12
            changed = (model(y) - base).abs().amax(dim=(0, 2)) > 0
            assert not changed[:p].any() and changed[p:].any(), p
