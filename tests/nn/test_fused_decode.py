"""The fused one-token decoding blocks equal the modules they stand for (to fp32 rounding),
and RETRO takes them exactly where they apply."""

from __future__ import annotations

import logging

import pytest
import torch

from retrolm import RETRO, generate
from retrolm.nn import FeedForward, MultiHeadAttention, Residual, RotaryEmbedding
from retrolm.nn.fused import decode as fused_decode
from retrolm.nn.kv_cache import KVCache

ext = fused_decode.extension()
needs_ext = pytest.mark.skipif(ext is None, reason="the fused blocks could not be built here")
NONE = torch.empty(0)
ALL = torch.empty(0, dtype=torch.bool)


@pytest.fixture
def fused_on():
    before = fused_decode.set_enabled(True)
    yield
    fused_decode.set_enabled(before)


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@needs_ext
@pytest.mark.parametrize("rot", [16, 8])  # full and partial rotary
def test_self_attention_block_equals_the_module(rot):
    torch.manual_seed(0)
    b, d, h, dh, n = 2, 32, 4, 16, 9
    res = Residual(d, MultiHeadAttention(d, h, dh, causal=True), "rms")
    _randomise(res)
    rotary = RotaryEmbedding(rot)
    x = torch.randn(b, n + 1, d)
    ref_cache, cache = KVCache(), KVCache()
    with torch.no_grad():
        res(x[:, :n], cache=ref_cache, q_rotary=rotary.span(0, n), k_rotary=rotary.span(0, n))
        res(x[:, :n], cache=cache, q_rotary=rotary.span(0, n), k_rotary=rotary.span(0, n))
        pos = rotary.span(n, 1)
        ref = res(x[:, n:], cache=ref_cache, q_rotary=pos, k_rotary=pos)[:, 0]
        attn = res.fn
        k_buf, v_buf, first, end = cache.claim(1)
        out, state = ext.self_attention_block(
            x[:, n].contiguous(), res.norm.weight, res.norm.eps, attn.q_proj.weight,
            attn.k_proj.weight, attn.v_proj.weight, attn.out_proj.weight, pos[0][0], pos[1][0],
            k_buf, v_buf, first, end, NONE, 0,
        )  # fmt: skip
    assert state.numel() == 0  # no token shift, no state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the block wrote this position's key and value where the module's cache has them
    k_ref, v_ref = ref_cache.update(torch.empty(b, h, 0, dh), torch.empty(b, h, 0, dh))
    k_new, v_new = cache.update(torch.empty(b, h, 0, dh), torch.empty(b, h, 0, dh))
    torch.testing.assert_close(k_new, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_new, v_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x[:, n])  # the block changed something: the test can fail


@needs_ext
def test_cross_attention_block_equals_attention_with_a_mask():
    torch.manual_seed(1)
    b, d, h, dh, s = 3, 32, 2, 16, 12
    res = Residual(d, MultiHeadAttention(d, h, dh), "rms")
    _randomise(res)
    x = torch.randn(b, d)
    big_k, big_v = torch.randn(b, 5, h, s, dh), torch.randn(b, 5, h, s, dh)
    kk, vv = big_k.select(1, 2), big_v.select(1, 2)  # strided views, as RETRO passes them
    allow = torch.rand(b, s) > 0.4
    allow[2] = False  # a row with no key: adds nothing (RETRO's chunk without neighbours)
    cos, sin = (t[3] for t in RotaryEmbedding(dh).span(0, 8))
    attn = res.fn
    with torch.no_grad():
        q = attn.q_proj(res.norm(x)).view(b, h, 1, dh)
        half = dh // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
        scores = (q @ kk.transpose(-1, -2)) / dh**0.5
        scores = scores.masked_fill(~allow[:, None, None], float("-inf"))
        p = torch.nan_to_num(scores.softmax(-1))
        ref = x + attn.out_proj((p @ vv).view(b, h * dh))
        out = ext.cross_attention_block(
            x, res.norm.weight, res.norm.eps, attn.q_proj.weight, attn.out_proj.weight,
            cos, sin, kk, vv, allow,
        )  # fmt: skip
        every = ext.cross_attention_block(
            x, res.norm.weight, res.norm.eps, attn.q_proj.weight, attn.out_proj.weight,
            cos, sin, kk, vv, ALL,
        )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], x[2], rtol=0, atol=0)
    assert not torch.allclose(every, out)  # the mask matters


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_block_equals_the_module(bias):
    torch.manual_seed(2)
    res = Residual(32, FeedForward(32, 4, bias=bias), "rms")
    _randomise(res)
    x = torch.randn(3, 32)
    ff = res.fn
    with torch.no_grad():
        ref = res(x)
        out, _ = ext.feed_forward_block(
            x, res.norm.weight, NONE, res.norm.eps, ff.up_proj.weight,
            ff.up_proj.bias if bias else NONE, ff.down_proj.weight,
            ff.down_proj.bias if bias else NONE, 0, True, NONE, 0, False,
        )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_feed_forward_block_computes_a_glu(act):
    torch.manual_seed(3)
    b, d = 3, 32
    res = Residual(d, FeedForward(d, glu=True, activation=act, hidden_dim=21, bias=False), "rms")
    _randomise(res)
    x = torch.randn(b, d)  # several rows: the GLU packs each row's hidden layer in place
    ff = res.fn
    with torch.no_grad():
        out, _ = fused_decode.feed_forward(
            x, res.norm, ff.up_proj.weight, None, ff.down_proj.weight, None, act=act, glu=True
        )
        torch.testing.assert_close(out, res(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="even"):
        fused_decode.feed_forward(x, None, torch.ones(5, d), None, torch.ones(d, 2), None, glu=True)


@needs_ext
def test_blocks_reject_bad_inputs():
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.feed_forward_block(
            x,
            w,
            NONE,
            1e-6,
            torch.ones(16, 8),
            NONE,
            torch.ones(8, 16),
            NONE,
            0,
            True,
            NONE,
            0,
            False,
        )
    with pytest.raises(RuntimeError, match=r"w2 must be \(8, 16\)"):
        ext.feed_forward_block(
            x.float(), w, NONE, 1e-6, torch.ones(16, 8), NONE, torch.ones(8, 4), NONE, 0, True,
            NONE, 0, False,
        )  # fmt: skip


def test_claim_counts_slots_and_grows():
    cache = KVCache()
    with pytest.raises(ValueError, match="filled cache"):
        cache.claim(1)
    k = torch.arange(16.0).view(1, 1, 16, 1)
    cache.update(k, k)  # capacity 16, full
    k_buf, _, first, end = cache.claim(1)  # grows, keeps the live part in front
    assert (first, end, cache.length) == (0, 16, 17) and k_buf.shape[2] >= 17
    torch.testing.assert_close(k_buf[0, 0, :16, 0], torch.arange(16.0))
    k_buf[0, 0, end, 0] = 99.0
    keys, _ = cache.update(torch.empty(1, 1, 0, 1), torch.empty(1, 1, 0, 1))
    assert keys[0, 0, -1, 0] == 99.0 and keys.shape[2] == 17


def _model(**kw) -> RETRO:
    torch.manual_seed(0)
    cfg = dict(
        num_tokens=300, max_seq_len=96, chunk_size=8, enc_dim=32, enc_depth=1, dec_dim=64,
        dec_depth=4, dec_cross_attn_layers=(2, 4), heads=4, dim_head=16,
    )  # fmt: skip
    cfg.update(kw)
    return RETRO(**cfg).eval()


def _steps(model, seq, ret, mask, prompt=5):
    """Logits of a prompt then one cached step per token, and how many steps ran fused."""
    from retrolm.models.retro import fused

    calls = []
    inner = fused.decode_step
    fused.decode_step = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        with torch.no_grad():
            cache = model.init_cache(seq.shape[0])
            outs = [model(seq[:, :prompt], ret, neighbour_mask=mask, cache=cache)]
            for i in range(prompt, seq.shape[1]):
                outs.append(model(seq[:, i : i + 1], ret, neighbour_mask=mask, cache=cache))
    finally:
        fused.decode_step = inner
    return torch.cat(outs, 1), len(calls)


@needs_ext
@pytest.mark.parametrize("kw", [{}, {"rotary_dim": 8}, {"copy_head": True}])
def test_retro_fused_steps_equal_the_full_forward(fused_on, kw):
    model = _model(**kw)
    b, n = 2, 60
    seq = torch.randint(1, 300, (b, n))
    ret = torch.randint(1, 300, (b, 12, 2, 16))
    mask = torch.ones(b, 12, 2, dtype=torch.bool)
    mask[0, 3, 1] = False
    mask[1, 4] = False  # a chunk with no neighbour at all
    full = model(seq, ret, neighbour_mask=mask)
    out, fused = _steps(model, seq, ret, mask)
    # 55 steps; the 7 that complete a chunk run the encoder through the ATen path
    assert fused == 55 - 7
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    fused_decode.set_enabled(False)
    aten, none = _steps(model, seq, ret, mask)
    assert none == 0
    torch.testing.assert_close(out, aten, rtol=1e-5, atol=1e-5)


@needs_ext
def test_retro_fused_without_retrieval_and_greedy_generation(fused_on):
    model = _model()
    seq = torch.randint(1, 300, (1, 40))
    out, fused = _steps(model, seq, None, None)
    assert fused == 35
    torch.testing.assert_close(out, model(seq), rtol=1e-5, atol=1e-5)
    prompt = torch.randint(1, 300, (1, 11))
    fast = generate(model, prompt, 30, temperature=0).new_ids
    fused_decode.set_enabled(False)
    ref = generate(model, prompt, 30, temperature=0).new_ids
    assert torch.equal(fast, ref)


@needs_ext
def test_retro_takes_the_aten_path_where_the_blocks_do_not_apply(fused_on):
    seq = torch.randint(1, 300, (1, 20))
    for model in (_model(norm="layer"), _model(ff_glu=True), _model().double()):
        _, fused = _steps(model, seq, None, None)
        assert fused == 0
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fused = _steps(model, seq, None, None)
    assert fused == 0


def test_usable_follows_the_switch_and_the_inputs(fused_on):
    x = torch.zeros(2)
    assert not fused_decode.usable(x)  # autograd on: training, not decoding
    with torch.no_grad():
        assert fused_decode.usable(x) == (ext is not None)
        assert not fused_decode.usable(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_decode.usable(x)
        fused_decode.set_enabled(False)
        assert not fused_decode.usable(x)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog, tmp_path):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("no compiler here\nmore detail")

    monkeypatch.delenv("RETROLM_REQUIRE_KERNELS", raising=False)  # CI sets it
    monkeypatch.setattr(fused_decode._EXT, "_module", None)
    monkeypatch.setattr(fused_decode._EXT, "_failed", False)
    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))  # no finished build to import
    with caplog.at_level(logging.WARNING, logger="retrolm.nn.fused.extension"):
        assert fused_decode.extension() is None
        assert fused_decode.extension() is None
    warnings = [r for r in caplog.records if "fused decoding blocks unavailable" in r.message]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with torch.no_grad():
        assert not fused_decode.usable(torch.zeros(2))


def test_a_failed_build_is_an_error_when_kernels_are_required(monkeypatch, tmp_path):
    """RETROLM_REQUIRE_KERNELS=1 (CI): a kernel that should build but does not stops the run
    with the reason, instead of a silent fallback that would skip its tests."""
    import torch.utils.cpp_extension as cpp

    from retrolm.nn.fused.extension import KernelBuildError

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("RETROLM_REQUIRE_KERNELS", "1")
    monkeypatch.setattr(fused_decode._EXT, "_module", None)
    monkeypatch.setattr(fused_decode._EXT, "_failed", False)
    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))  # no finished build to import
    with pytest.raises(KernelBuildError, match="decode_blocks.cpp.*no compiler here"):
        fused_decode.extension()
    monkeypatch.setenv("RETROLM_REQUIRE_KERNELS", "0")
    assert fused_decode.extension() is None  # the same failure, allowed: the ATen path


HIER = dict(num_tokens=256, dim=64, depth=2, heads=2, dim_head=16, seq_len=128)


@needs_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(hierarchies=(1, 2, 8), window_sizes=(8, 16, None)),
        dict(hierarchies=(1, 4), window_sizes=(8, None), hierarchical_stride=(1, 2)),
        dict(hierarchies=(1, 2), window_sizes=(0, 16), hierarchy_merge_all=True),
    ],
)
def test_hierarchical_fused_steps_equal_the_full_forward(fused_on, monkeypatch, kw):
    import retrolm.models.hierarchical as hier
    from retrolm.models.hierarchical import fused

    torch.manual_seed(0)
    model = hier.HierarchicalTransformer(**HIER, **kw).eval()
    seq = torch.randint(0, 256, (2, 60))
    calls = []
    inner = fused.block_step
    monkeypatch.setattr(fused, "block_step", lambda *a: calls.append(1) or inner(*a))

    def steps():
        with torch.no_grad():
            cache = model.init_cache(2)
            outs = [model(seq[:, :7], cache=cache)]
            outs += [model(seq[:, i : i + 1], cache=cache) for i in range(7, 60)]
        return torch.cat(outs, 1)

    out = steps()
    assert calls  # the fused blocks ran
    torch.testing.assert_close(out, model(seq), rtol=1e-5, atol=1e-5)
    fused_decode.set_enabled(False)
    n = len(calls)
    torch.testing.assert_close(out, steps(), rtol=1e-5, atol=1e-5)
    assert len(calls) == n  # switched off: the ATen path only
    fused_decode.set_enabled(True)
    prompt = seq[:1, :9]
    fast = model.generate(prompt, 24, temperature=0)
    fused_decode.set_enabled(False)
    assert torch.equal(fast, model.generate(prompt, 24, temperature=0))


@needs_ext
def test_bf16_weights_stay_close_and_follow_updates(fused_on):
    """``set_weight_dtype(bf16)``: the blocks read bf16 copies of the weights (the rest stays
    fp32), so the output moves by about bf16's rounding; an in-place update of a weight
    rebuilds its copy."""
    model = _model()
    seq = torch.randint(1, 300, (1, 40))
    full = model(seq)
    before = fused_decode.set_weight_dtype(torch.bfloat16)
    try:
        out, fused = _steps(model, seq, None, None)
        assert fused == 35
        err = (out - full).abs().max().item()
        assert 1e-5 < err < 0.05 * full.abs().max().item()  # changed, within bf16 rounding
        w = model.layers[0].ff.fn.up_proj.weight
        assert fused_decode.weight(w).dtype == torch.bfloat16
        assert fused_decode.weight(w) is fused_decode.weight(w)  # kept, not rebuilt
        with torch.no_grad():
            w.mul_(2.0)
        torch.testing.assert_close(fused_decode.weight(w).float(), w, rtol=1e-2, atol=0)
    finally:
        fused_decode.set_weight_dtype(before)
    assert fused_decode.weight(w) is w  # fp32: the parameter itself
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        fused_decode.set_weight_dtype(torch.float16)


def test_a_stale_build_lock_is_cleared(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))
    build = fused_decode.build_directory()
    assert build.parent == tmp_path and build.is_dir()
    lock = build / "lock"
    lock.touch()
    assert not fused_decode.clear_stale_lock(build)  # a build in progress: left alone
    assert lock.exists()
    old = time.time() - fused_decode.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert fused_decode.clear_stale_lock(build)
    assert not lock.exists()
    assert not fused_decode.clear_stale_lock(build)  # nothing to clear


def test_a_lock_left_by_a_killed_build_never_stalls_the_next(tmp_path, monkeypatch):
    """A fresh torch ``lock`` file (a build killed a moment ago) is removed once this process
    holds the build's flock; while another process holds it, the next one waits for it."""
    import subprocess
    import sys
    import time

    from retrolm.nn.fused.extension import build_lock

    monkeypatch.setenv("RETROLM_CACHE", str(tmp_path))
    build = fused_decode.build_directory()
    (build / "lock").touch()  # fresh: the age rule alone would leave it (torch: wait forever)
    with build_lock(build):
        assert not (build / "lock").exists()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(1.5)", str(build / ".retrolm-build.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with build_lock(build):
            waited = time.perf_counter() - t0
        assert waited > 0.5  # it waited for the holder
    finally:
        holder.wait(timeout=30)


ROUTING = dict(
    num_tokens=256, dim=64, depth=2, heads=4, max_seq_len=128, causal=True, window_size=16,
    dim_head=16,
)  # fmt: skip


def _trained_routing(**kw):
    """A causal routing LM whose centroids were initialised and moved by two steps."""
    from retrolm import RoutingTransformerLM

    torch.manual_seed(0)
    model = RoutingTransformerLM(**{**ROUTING, **kw})
    x = torch.randint(0, 256, (2, 96))
    for _ in range(2):
        y, aux = model(x)
        (y.mean() + aux).backward()
    return model.eval()


def _routing_steps(model, seq, prompt, monkeypatch):
    from retrolm.models.routing import fused

    calls = []
    inner = fused.decode_step
    monkeypatch.setattr(fused, "decode_step", lambda *a: calls.append(1) or inner(*a))
    with torch.no_grad():
        cache = model.init_cache(seq.shape[0])
        outs = [model(seq[:, :prompt], cache=cache)]
        outs += [model(seq[:, i : i + 1], cache=cache) for i in range(prompt, seq.shape[1])]
    monkeypatch.undo()
    logits = torch.cat([o[0] for o in outs], 1)
    return logits, torch.stack([o[1] for o in outs[1:]]), len(calls)


@needs_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(n_local_attn_heads=2),
        dict(n_local_attn_heads=0),
        dict(n_local_attn_heads=2, shared_qk=False),
        dict(n_local_attn_heads=1, num_mem_kv=2),
    ],
)
def test_routing_fused_steps_equal_the_full_forward(fused_on, monkeypatch, kw):
    model = _trained_routing(**kw)
    seq = torch.randint(0, 256, (2, 100))
    full, _ = model(seq)
    out, aux, fused = _routing_steps(model, seq, 30, monkeypatch)
    assert fused == 70  # every cached step
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    fused_decode.set_enabled(False)
    ref, ref_aux, none = _routing_steps(model, seq, 30, monkeypatch)
    assert none == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, ref_aux)  # the commitment loss of each step as well
    from retrolm import AutoregressiveWrapper

    fused_decode.set_enabled(True)
    prompt, wrapper = seq[:1, :20], AutoregressiveWrapper(model)
    fast = wrapper.generate(prompt, 24, temperature=0)
    fused_decode.set_enabled(False)
    assert torch.equal(fast, wrapper.generate(prompt, 24, temperature=0))


@needs_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(n_local_attn_heads=2, window_size=1),  # the local cache keeps no key
        dict(n_local_attn_heads=2, shift_tokens=True),
        dict(n_local_attn_heads=2, use_scale_norm=True),
        dict(n_local_attn_heads=2, ff_glu=True),
    ],
)
def test_routing_takes_the_aten_path_where_the_blocks_do_not_apply(fused_on, monkeypatch, kw):
    model = _trained_routing(**kw)
    seq = torch.randint(0, 256, (2, 40))
    out, _, fused = _routing_steps(model, seq, 20, monkeypatch)
    assert fused == 0
    torch.testing.assert_close(out, model(seq)[0], rtol=1e-5, atol=1e-5)


@needs_ext
def test_block_wrappers_reject_norms_they_do_not_compute():
    from retrolm.nn.norms import LayerNorm, RMSNorm

    x, w = torch.randn(2, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="LayerNorm with a bias"):
        fused_decode.feed_forward(x, LayerNorm(8, bias=False), w, None, w.t().contiguous(), None)
    attn = MultiHeadAttention(8, 2, 4, causal=True)
    with pytest.raises(ValueError, match="normalises with RMSNorm"):
        fused_decode.self_attention(x, LayerNorm(8), attn, (torch.ones(4), torch.zeros(4)),
                                    KVCache())  # fmt: skip
    out, state = fused_decode.feed_forward(x, RMSNorm(8), w, None, w.t().contiguous(), None)
    assert out.shape == (2, 8) and state.numel() == 0
