"""Routing Transformer properties: strict causality (and that the sweep catches the reference's
leaking balanced routing), padding, cached == full decoding, fast == reference attention,
reversible gradients, overfitting one batch, the seed's snippets."""

import pytest
import torch

from retrolm import (
    AutoregressiveWrapper,
    RoutingConfig,
    RoutingTransformer,
    RoutingTransformerEncDec,
    RoutingTransformerLM,
)
from retrolm.nn import attention_backend
from retrolm.nn.kmeans import kmeans_modules

V = 37
BASE = dict(
    num_tokens=V, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64, window_size=4, causal=True
)


def make(**kw):
    torch.manual_seed(0)
    return RoutingTransformerLM(**{**BASE, **kw})


def train_steps(model, steps=2, n=32, b=2):
    """A few optimizer steps so the centroids are initialised and moved by the EMA."""
    w = AutoregressiveWrapper(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    before = [km.means.clone() for km in kmeans_modules(model)]
    for _ in range(steps):
        opt.zero_grad()
        w(torch.randint(0, V, (b, n + 1)), return_loss=True).backward()
        opt.step()
    after = [km.means for km in kmeans_modules(model)]
    assert all(bool(km.initted) for km in kmeans_modules(model))
    assert any(not torch.equal(a, c) for a, c in zip(before, after))
    model.eval()
    return model


def causality_violations(model, n=24, seed=0):
    """For every cut t, change tokens >= t; count positions < t whose logits moved, and check
    the logits at >= t did move (so the sweep can fail)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (1, n), generator=g)
    with torch.no_grad():
        base = model(x)[0]
        bad, moved = 0, 0
        for t in range(1, n):
            x2 = x.clone()
            x2[:, t:] = torch.randint(0, V, (1, n - t), generator=g)
            y = model(x2)[0]
            bad += int(((y[:, :t] - base[:, :t]).abs().amax(-1) > 1e-5).sum())
            moved += int((y[:, t:] - base[:, t:]).abs().max() > 1e-4)
    return bad, moved


CAUSAL_VARIANTS = {
    "local+routed shared qk": dict(n_local_attn_heads=2),
    "routed only shared qk": dict(n_local_attn_heads=0),
    "unshared qk": dict(n_local_attn_heads=1, shared_qk=False),
    "memory kv": dict(n_local_attn_heads=2, num_mem_kv=3),
    "shift tokens + per-layer local heads": dict(n_local_attn_heads=(0, 2), shift_tokens=True),
}


@pytest.mark.parametrize("name", list(CAUSAL_VARIANTS))
def test_strictly_causal_at_every_position(name):
    model = train_steps(make(**CAUSAL_VARIANTS[name]))
    bad, moved = causality_violations(model)
    assert moved == 23, "later positions must change, or the sweep could not fail"
    assert bad == 0


def test_the_same_sweep_detects_the_leaking_balanced_mode():
    with pytest.raises(ValueError, match="allow_future_leak"):
        make(routing="balanced")
    model = train_steps(make(routing="balanced", allow_future_leak=True, n_local_attn_heads=2))
    bad, moved = causality_violations(model)
    assert moved == 23 and bad > 0


@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_reaches_real_positions(causal):
    model = train_steps(make(causal=causal, n_local_attn_heads=2, shift_tokens=True, num_mem_kv=1))
    x = torch.randint(0, V, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 15:] = False  # trailing padding
    mask[1, :3] = False  # leading padding
    x2 = torch.where(mask, x, torch.randint(0, V, x.shape))
    with torch.no_grad():
        y1, y2 = model(x, input_mask=mask)[0], model(x2, input_mask=mask)[0]
    torch.testing.assert_close(y1[mask], y2[mask], rtol=1e-5, atol=1e-5)
    assert y1.isfinite().all()


class _NoCache(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.max_seq_len = m, m.max_seq_len

    def forward(self, x, **kw):
        return self.m(x, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_local_attn_heads=2),
        dict(n_local_attn_heads=1, shared_qk=False, num_mem_kv=2),
        dict(shift_tokens=True),
    ],
)
def test_cached_generation_equals_full_forward(kw):
    model = train_steps(make(**kw))
    prompt = torch.randint(0, V, (2, 11))
    cached = AutoregressiveWrapper(model).generate(prompt, 30, temperature=0)
    full = AutoregressiveWrapper(_NoCache(model)).generate(prompt, 30, temperature=0)
    assert torch.equal(cached, full)
    # logits too, step by step
    cache = model.init_cache(2)
    seq = torch.cat((prompt, cached), dim=1)
    with torch.no_grad():
        steps = [model(seq[:, :11], cache=cache)[0]]
        steps += [model(seq[:, i : i + 1], cache=cache)[0] for i in range(11, seq.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), model(seq)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize(
    "kw", [dict(n_local_attn_heads=1), dict(n_local_attn_heads=1, shared_qk=False, num_mem_kv=1)]
)
def test_cached_steps_equal_full_forward_when_cluster_rings_wrap(kw, step):
    """A window of 4: clusters see more keys than their ring holds, so slots are reused;
    steps of several tokens at once are decoded one after the other, with the same result."""
    model = train_steps(make(window_size=4, max_seq_len=64, **kw))
    model.eval()
    seq = torch.randint(0, V, (2, 47))
    cache = model.init_cache(2)
    with torch.no_grad():
        outs = [model(seq[:, :11], cache=cache)[0]]
        outs += [model(seq[:, i : i + step], cache=cache)[0] for i in range(11, 47, step)]
        assert max(int(lc.counts.max()) for lc in cache.layers) > 4  # some ring wrapped
        torch.testing.assert_close(torch.cat(outs, 1), model(seq)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_local_attn_heads=2),
        dict(n_local_attn_heads=1, shared_qk=False),
        dict(causal=False, n_local_attn_heads=1),
        dict(routing="balanced", allow_future_leak=True, n_local_attn_heads=1),
    ],
)
def test_fast_attention_equals_reference_float64(kw):
    model = train_steps(make(**kw)).double()
    x = torch.randint(0, V, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    with torch.no_grad():
        fast = model(x, input_mask=mask)[0]
        with attention_backend("reference"):
            ref = model(x, input_mask=mask)[0]
    torch.testing.assert_close(fast[mask], ref[mask], rtol=1e-9, atol=1e-9)


def test_reversible_gradients_equal_plain_backward():
    model = make(reversible=True, n_local_attn_heads=2, num_mem_kv=1).double()
    train_steps(model)
    model.train()
    x = torch.randint(0, V, (2, 33))
    grads = []
    for recompute in (True, False):
        model.zero_grad()
        model.transformer._recompute = recompute
        means = [km.means.clone() for km in kmeans_modules(model)]
        AutoregressiveWrapper(model)(x, return_loss=True).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # the centroid update ran once, after the recomputation
        assert any(not torch.equal(a, km.means) for a, km in zip(means, kmeans_modules(model)))
        for km, m in zip(kmeans_modules(model), means):
            km.means = m  # same centroids for the second pass
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # k-means loss is fp32


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = RoutingTransformerLM(**{**BASE, "n_local_attn_heads": 2})
    w = AutoregressiveWrapper(model)
    x = torch.randint(0, V, (2, 33))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        opt.zero_grad()
        loss = w(x, return_loss=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def test_seed_snippets_at_reduced_sizes():
    torch.manual_seed(0)
    model = RoutingTransformerLM(
        num_tokens=200,
        dim=32,
        heads=4,
        depth=8,
        max_seq_len=64,
        causal=True,
        emb_dim=16,
        weight_tie=False,
        tie_embedding=False,
        dim_head=8,
        attn_dropout=0.1,
        attn_layer_dropout=0.0,
        ff_dropout=0.1,
        layer_dropout=0.0,
        window_size=8,
        n_local_attn_heads=2,
        reversible=True,
        ff_chunks=4,
        ff_glu=True,
        pkm_layers=(4, 7),
        pkm_num_keys=16,
        moe_layers=(3, 6),
        moe_num_experts=4,
        moe_loss_coef=1e-3,
        num_mem_kv=4,
        use_scale_norm=False,
        use_rezero=False,
        shift_tokens=True,
    )
    x = torch.randint(0, 200, (1, 64))
    input_mask = torch.ones_like(x).bool()
    y, aux_loss = model(x, input_mask=input_mask)  # (1, 64, 200), scalar
    assert y.shape == (1, 64, 200)
    aux_loss.backward()

    # bare transformer over embeddings
    bare = RoutingTransformer(
        dim=32, heads=4, depth=2, max_seq_len=64, window_size=8, n_local_attn_heads=2
    )
    out, aux = bare(torch.randn(1, 64, 32))
    assert out.shape == (1, 64, 32)

    # autoregressive wrapper with manual k-means updates
    lm = RoutingTransformerLM(
        num_tokens=200,
        dim=32,
        heads=4,
        depth=2,
        max_seq_len=64,
        causal=True,
        window_size=8,
        _register_kmeans_update=False,
    )
    model = AutoregressiveWrapper(lm)
    x = torch.randint(0, 200, (1, 65))
    loss = model(x, return_loss=True, randomly_truncate_sequence=True)
    loss.backward()
    before = [km.means.clone() for km in kmeans_modules(lm)]
    model.update_kmeans()
    assert any(not torch.equal(a, km.means) for a, km in zip(before, kmeans_modules(lm)))
    out = model.generate(
        torch.randint(0, 200, (1, 3)), 10, eos_token=None, temperature=0.9, top_p=0.9
    )
    assert out.shape == (1, 10)


def test_encdec_loss_logits_and_generate():
    torch.manual_seed(0)
    enc_dec = RoutingTransformerEncDec(
        dim=32,
        enc_num_tokens=50,
        enc_depth=2,
        enc_heads=4,
        enc_max_seq_len=32,
        enc_window_size=8,
        dec_num_tokens=50,
        dec_depth=2,
        dec_heads=4,
        dec_max_seq_len=32,
        dec_window_size=8,
        dec_n_local_attn_heads=1,
        dec_reversible=True,
    )
    src = torch.randint(0, 50, (2, 32))
    tgt = torch.randint(0, 50, (2, 33))
    src_mask, tgt_mask = torch.ones_like(src).bool(), torch.ones_like(tgt).bool()
    loss, aux_loss = enc_dec(
        src,
        tgt,
        enc_input_mask=src_mask,
        dec_input_mask=tgt_mask,
        return_loss=True,
        randomly_truncate_sequence=True,
    )
    enc_means = [km.means.clone() for km in kmeans_modules(enc_dec)]
    loss.backward()
    aux_loss.backward()
    assert any(not torch.equal(a, km.means) for a, km in zip(enc_means, kmeans_modules(enc_dec)))
    logits, aux = enc_dec(src, tgt[:, :-1])
    assert logits.shape == (2, 32, 50)
    samples = enc_dec.generate(src, torch.zeros(2, 1, dtype=torch.long), seq_len=20, eos_token=2)
    assert samples.shape[0] == 2 and samples.shape[1] <= 20
    # the decoder stays causal w.r.t. its own tokens
    enc_dec.eval()
    with torch.no_grad():
        a = enc_dec(src, tgt[:, :20])[0]
        t2 = tgt[:, :20].clone()
        t2[:, 12:] = (t2[:, 12:] + 1) % 50
        b = enc_dec(src, t2)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12])


def test_config_presets_and_validation():
    cfg = RoutingConfig.from_name("routing-tiny")
    assert RoutingConfig.from_dict(cfg.to_dict()) == cfg
    RoutingTransformerLM(config=cfg)
    with pytest.raises(ValueError, match="divisible by window_size"):
        RoutingConfig(max_seq_len=100, window_size=64)
    with pytest.raises(ValueError, match=r"pkm_layers are 1-indexed .* got \[0\]"):
        RoutingConfig(depth=2, pkm_layers=(0,))
    with pytest.raises(ValueError, match=r"moe_layers .* got \[3\]"):
        RoutingConfig(depth=2, moe_layers=(3,))
    with pytest.raises(ValueError, match="weight_tie"):
        RoutingConfig(depth=2, heads=4, n_local_attn_heads=(1, 2), weight_tie=True)
    with pytest.raises(ValueError, match="unknown routing preset"):
        RoutingConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown RoutingConfig fields"):
        RoutingTransformerLM(num_tokens=5, dim=8, depth=1, max_seq_len=8, window_size=4, bogus=1)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        make()(torch.zeros(1, 65, dtype=torch.long))


def test_split_modules_keep_the_public_imports():
    import retrolm.models.routing as routing
    from retrolm.models.routing import cache as routing_cache

    names = ("RoutingAttention", "RoutingCache", "RoutingTransformer", "RoutingTransformerLM")
    assert all(hasattr(routing, n) for n in names) and set(names) <= set(routing.__all__)
    assert routing.RoutingCache is routing_cache.RoutingCache
    lm = routing.RoutingTransformerLM(config=RoutingConfig.from_name("routing-tiny"))
    assert isinstance(lm.init_cache(1), routing_cache.RoutingCache)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_fused_qkv_projection_equals_separate_under_bf16(shared_qk):
    # without autograd (decoding, prefill) q|k|v is one matmul on the shared fused weight
    torch.manual_seed(0)
    model = RoutingTransformerLM(
        num_tokens=64, dim=32, depth=1, heads=4, dim_head=8, max_seq_len=64,
        window_size=16, n_local_attn_heads=2, shared_qk=shared_qk,
    ).eval()  # fmt: skip
    attn = next(m for m in model.modules() if type(m).__name__ == "RoutingAttention")
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fused = attn._project(x, x)
        separate = attn._project(x, x)  # autograd on: three projections
    for a, b in zip(fused[:3], separate[:3]):  # q, k, v (the 4th: q|k, a view when fused)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "shared_qk, mem", [(True, None), (True, 1), (False, 1)], ids=["shared", "shared-mem", "own-k"]
)
@pytest.mark.parametrize("w", [1, 5])
def test_real_token_step_equals_general_step(shared_qk, mem, w):
    """LayerCache.step_real (no padding: ring index and mask table) == LayerCache.step (the
    general path with its sink and masks), through ring wrap-around, bit for bit."""
    from retrolm.models.routing.cache import LayerCache

    torch.manual_seed(0)
    b, h, k, d, n = 2, 3, 4, 8, 13
    keys, vals = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    groups = torch.randint(0, k, (b, h, n))
    fast, slow = LayerCache(), LayerCache()
    for c in (fast, slow):
        c.fill_routed(keys, vals, groups, k, w)
    mem_kv = None if mem is None else (torch.randn(h, mem, d), torch.randn(h, mem, d))
    for _ in range(3 * k * w):  # every cluster's ring wraps
        q, kn, vn = (torch.randn(b, h, 1, d) for _ in range(3))
        kg = torch.randint(0, k, (b, h, 1))
        qg = kg if shared_qk else torch.randint(0, k, (b, h, 1))
        out = fast.step_real(q, kn, vn, kg, qg, shared_qk, mem_kv)
        assert torch.equal(out, slow.step(q, kn, vn, kg, qg, shared_qk, mem_kv))
    assert torch.equal(fast.counts, slow.counts) and torch.equal(fast.keys, slow.keys)
    assert int(fast.counts.max()) > 2 * w  # rings wrapped


def test_cached_steps_equal_full_forward_with_a_window_of_one():
    """Shared q/k without memory and window 1: the one key in a query's window is its own,
    which it attends because nothing else is allowed (as in the full forward)."""
    model = train_steps(make(window_size=1, n_local_attn_heads=1))
    seq = torch.randint(0, V, (2, 30))
    cache = model.init_cache(2)
    with torch.no_grad():
        outs = [model(seq[:, :5], cache=cache)[0]]
        outs += [model(seq[:, i : i + 1], cache=cache)[0] for i in range(5, 30)]
        torch.testing.assert_close(torch.cat(outs, 1), model(seq)[0], rtol=1e-4, atol=1e-4)
