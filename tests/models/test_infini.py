"""Infini-attention: the memory against a float64 loop of the paper's equations, causality
across segments, one segment runner for whole segments, pieces and tokens, the wrapper's
loss and generation, the cache's resets, dtypes, and the options."""

import pytest
import torch
import torch.nn.functional as F
from tests.tolerance import assert_close_fp

from retrolm import (
    FastweightMemory,
    InfiniConfig,
    InfiniLanguageModel,
    InfiniTransformer,
    InfiniTransformerWrapper,
)
from retrolm.generation import generate
from retrolm.models.infini.memory import Memories

SEG = 8
TINY = dict(num_tokens=64, dim=32, depth=2, heads=2, dim_head=8, segment_len=SEG, max_seq_len=32)
VARIANTS = {
    "linear": {},
    "delta": {"use_mem_delta_rule": True},
    "learned": {"use_mem_delta_rule": True, "learned_delta_update": True},
}


def lm(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    model = InfiniLanguageModel(InfiniConfig(**{**TINY, **kw})).to(dtype).eval()
    # gates away from 0 so the memory path and the local path weigh differently per head
    with torch.no_grad():
        for attn in model.net.attns:
            attn.memory.head_gates.copy_(torch.tensor([-1.0, 0.5]))
    return model


def ids(b, n, seed=1):
    return torch.randint(
        0, TINY["num_tokens"], (b, n), generator=torch.Generator().manual_seed(seed)
    )


# ---- the memory against the equations ---------------------------------------------------
def sigma(x):
    return F.elu(x) + 1


def oracle(segments, delta, betas, gates):
    """Eqs. 3-6 token by token in float64 with explicit sums: per segment the gated output
    of a given local output, then the write."""
    q0, k0, v0, _ = segments[0]
    b, h, _, dk = k0.shape
    dv = v0.shape[-1]
    M = torch.zeros(b, h, dk, dv, dtype=torch.float64)
    z = torch.zeros(b, h, dk, dtype=torch.float64)
    g = torch.sigmoid(gates)
    outs = []
    for (q, k, v, local), beta in zip(segments, betas, strict=True):
        out = torch.empty_like(local)
        for t in range(q.shape[2]):
            sq = sigma(q[:, :, t])  # (b, h, dk)
            num = torch.einsum("bhk,bhkv->bhv", sq, M)
            den = (sq * z).sum(-1, keepdim=True).clamp(min=1e-10)
            a_mem = num / den
            out[:, :, t] = g[None, :, None] * local[:, :, t] + (1 - g[None, :, None]) * a_mem
        outs.append(out)
        dM, dz = torch.zeros_like(M), torch.zeros_like(z)
        for t in range(k.shape[2]):
            sk = sigma(k[:, :, t])
            val = v[:, :, t]
            if delta:
                val = val - torch.einsum("bhk,bhkv->bhv", sk, M) / (sk * z).sum(
                    -1, keepdim=True
                ).clamp(min=1e-10)
            if beta is not None:
                val = val * beta[:, :, t, None]
            dM += sk[..., :, None] * val[..., None, :]
            dz += sk
        M, z = M + dM, z + dz
    return outs, (M, z)


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("learned", [False, True])
def test_memory_equals_a_float64_loop_of_the_equations(delta, learned):
    torch.manual_seed(0)
    mem = FastweightMemory(3, use_mem_delta_rule=delta).double()
    with torch.no_grad():
        mem.head_gates.copy_(torch.tensor([-2.0, 0.0, 1.5]))
    segs = [tuple(torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(4)) for _ in range(3)]
    betas = [torch.rand(2, 3, 5, dtype=torch.float64) if learned else None for _ in range(3)]
    expect_out, (M, z) = oracle(segs, delta, betas, mem.head_gates.detach())
    past = None
    for (q, k, v, local), beta, expect in zip(segs, betas, expect_out, strict=True):
        out = mem.retrieve_and_add_to_output(local, q, past)
        assert_close_fp(out, expect, reduction=20)
        past = mem.create_new_memories(k, v, past, weights=beta)
    assert_close_fp(past.kv_mem, M, reduction=20)
    assert_close_fp(past.k_norm, z, reduction=20)
    # the first segment is gated like the others: A_mem = 0, so out = sigmoid(g) * local
    q, _, _, local = segs[0]
    g = mem.head_gates.detach().sigmoid().view(1, -1, 1, 1)
    assert torch.equal(mem.retrieve_and_add_to_output(local, q), local * g)


def test_no_memory_is_the_zero_memory():
    torch.manual_seed(0)
    mem = FastweightMemory(2).double()
    q, local = (
        torch.randn(1, 2, 4, 8, dtype=torch.float64),
        torch.randn(1, 2, 4, 8, dtype=torch.float64),
    )
    zero = Memories(
        torch.zeros(1, 2, 8, 8, dtype=torch.float64), torch.zeros(1, 2, 8, dtype=torch.float64)
    )
    assert torch.equal(
        mem.retrieve_and_add_to_output(local, q), mem.retrieve_and_add_to_output(local, q, zero)
    )
    # a model with its memory off equals one fed all-zero memories in every segment
    model, x = lm(), ids(2, 3 * SEG)
    off = model(x, use_memory=False)
    zeros = [
        Memories(
            torch.zeros(2, 2, 8, 8, dtype=torch.float64), torch.zeros(2, 2, 8, dtype=torch.float64)
        )
    ] * 2
    chained = [
        model.net(x[:, s : s + SEG], past_memories=zeros).logits for s in range(0, 3 * SEG, SEG)
    ]
    assert_close_fp(off, torch.cat(chained, 1))
    assert not torch.allclose(off[:, SEG:], model(x)[:, SEG:])  # (on differs from off)
    assert torch.equal(
        off[:, :SEG], model(x)[:, :SEG]
    )  # the first segment reads nothing either way


def test_delta_rule_rewriting_a_segment_leaves_memory_unchanged():
    """sigma(K) one-hot (ELU(-1000) + 1 = 0 exactly): the second write of the same segment
    finds every value already retrievable and adds nothing to M."""
    n, dk = 5, 6
    k = torch.full((1, 1, n, dk), -1000.0, dtype=torch.float64)
    k[0, 0, torch.arange(n), torch.arange(n)] = 0.0  # sigma(0) = 1: one-hot rows
    v = torch.randn(1, 1, n, 4, dtype=torch.float64)
    delta = FastweightMemory(1, use_mem_delta_rule=True)
    once = delta.create_new_memories(k, v)
    twice = delta.create_new_memories(k, v, once)
    torch.testing.assert_close(twice.kv_mem, once.kv_mem, rtol=0, atol=1e-12)
    assert torch.equal(twice.k_norm, 2 * once.k_norm)  # z as in the linear rule
    linear = FastweightMemory(1).create_new_memories(k, v, once)
    torch.testing.assert_close(linear.kv_mem, 2 * once.kv_mem)  # (so the test can fail)


# ---- the model ------------------------------------------------------------------------
def test_layer_equals_local_attention_plus_gated_memory_read():
    """One Infini-attention layer in float64 against its definition: causal softmax over the
    rotated q, k (half layout, positions 0..n-1 of the segment) gated with eq. 3's read of
    the unrotated q, then the output projection."""
    model = lm()
    attn, n = model.net.attns[0], 6
    torch.manual_seed(3)
    x = torch.randn(2, n, 32, dtype=torch.float64)
    past = Memories(
        torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.rand(2, 2, 8, dtype=torch.float64)
    )
    out, _ = attn(x, model.net.rotary.span(0, n), past)
    q, k, v = (
        attn.to_qkv(attn.norm(x)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    )  # (b, h, n, d)
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    theta = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # (n, 4)
    cos, sin = theta.cos().repeat(1, 2), theta.sin().repeat(1, 2)

    def rot(t):
        return t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin

    scores = rot(q) @ rot(k).transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    local = scores.softmax(-1) @ v
    mem = (sigma(q) @ past.kv_mem) / (sigma(q) @ past.k_norm[..., None]).clamp(min=1e-10)
    g = attn.memory.head_gates.sigmoid().view(1, 2, 1, 1)
    expect = attn.to_out((g * local + (1 - g) * mem).transpose(1, 2).flatten(2))
    assert_close_fp(out, expect, dtype=torch.float32, reduction=64)  # (rotary tables: fp32)


def test_the_model_writes_unrotated_keys_of_the_first_layer():
    """Layer 0's memory after one segment, derived by hand from its projections: sigma(K)^T V
    and sum_t sigma(K_t) of the unrotated keys (rotary is for the local path only)."""
    model, x = lm(), ids(2, SEG)
    attn = model.net.attns[0]
    qkv = attn.to_qkv(attn.norm(model.net.token_emb(x)))  # (b, n, 3 h d)
    k, v = qkv.unflatten(-1, (3, 2, 8))[:, :, 1:].unbind(2)  # (b, n, h, d)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (b, h, n, d)
    mem = model.net(x, return_new_memories=True).past_memories[0]
    assert_close_fp(mem.kv_mem, sigma(k).transpose(-1, -2) @ v, reduction=SEG)
    assert_close_fp(mem.k_norm, sigma(k).sum(-2), reduction=SEG)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_across_segment_boundaries(variant):
    model, x = lm(**VARIANTS[variant]), ids(1, 3 * SEG + 4)
    base = model(x)
    for t in (1, SEG - 1, SEG, SEG + 3, 2 * SEG, 3 * SEG + 2):
        y = x.clone()
        y[:, t:] = (y[:, t:] + 7) % TINY["num_tokens"]
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:]), t
    # the memory carries a change in segment 0 to every later segment
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % TINY["num_tokens"]
    diff = (model(y) - base).abs().amax(-1)[0]
    assert all(diff[s * SEG : (s + 1) * SEG].max() > 1e-6 for s in range(4))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_language_model_equals_chained_segments_and_any_pieces(variant):
    model, x = lm(**VARIANTS[variant]), ids(2, 3 * SEG + 3)
    full = model(x)
    mems, outs = None, []
    for s in range(0, x.shape[1], SEG):
        r = model.net(x[:, s : s + SEG], past_memories=mems, return_new_memories=True)
        mems, outs = r.past_memories, outs + [r.logits]
    assert torch.equal(full, torch.cat(outs, 1))
    cache, parts, i = model.init_cache(2), [], 0
    for size in (3, 1, 9, 4, 1, 1, 8):
        parts.append(model(x[:, i : i + size], cache=cache))
        i += size
    assert i == x.shape[1]
    assert_close_fp(torch.cat(parts, 1), full, reduction=64)
    # the reference's token-by-token API inside one segment: only the last token is new
    ret = model.net(x[:, :1])
    for t in range(2, SEG + 1):
        ret = model.net(x[:, :t], cached_kv=ret.cached_kvs)
        assert_close_fp(ret.logits[:, 0], full[:, t - 1], reduction=64)


def greedy_full(model, prompt, n):
    """The oracle: every step a whole segment-recurrent forward from the start."""
    x = prompt.clone()
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[:, prompt.shape[1] :]


@pytest.mark.parametrize("variant", ["linear", "learned"])
def test_generation_equals_greedy_full_forwards_past_max_seq_len(variant):
    model = lm(**VARIANTS[variant])
    prompt = ids(2, SEG * 5 // 2)  # 2.5 segments
    new = TINY["max_seq_len"]  # the sequence ends past max_seq_len
    expect = greedy_full(model, prompt, new)
    wrapper = InfiniTransformerWrapper(model.net)
    assert torch.equal(wrapper.generate(seq_len=new, prompt=prompt, temperature=0), expect)
    lib = generate(model, prompt, new, temperature=0)
    assert torch.equal(lib.new_ids, expect)
    # every prompt segment reaches the memory (the reference kept only the last): the
    # first new token's logits differ with a prompt that differs in its first segment only
    other = prompt.clone()
    other[:, :3] = (other[:, :3] + 1) % TINY["num_tokens"]
    last = lambda p: model.net(p[:, 2 * SEG :]).logits  # noqa: E731
    assert torch.equal(last(prompt), last(other))  # the last segment alone cannot tell them apart
    seen = []
    keep = lambda logits: seen.append(logits.clone()) or logits  # noqa: E731
    for p in (prompt, other):
        wrapper.generate(seq_len=1, prompt=p, temperature=0, filter_fn=keep)
    assert not torch.allclose(seen[0], seen[1])


def test_cache_reset_clears_only_its_rows():
    model, x = lm(use_mem_delta_rule=True), ids(2, 4 * SEG)
    # at a segment boundary: row 0 then equals a fresh stream of its new document
    cache = model.init_cache(2)
    model(x[:, : 2 * SEG], cache=cache)
    cache.reset(torch.tensor([True, False]))
    after = model(x[:, 2 * SEG :], cache=cache)
    assert_close_fp(after[0], model(x[:1, 2 * SEG :])[0], reduction=64)
    assert_close_fp(after[1], model(x[1:])[0, 2 * SEG :], reduction=64)

    # mid-segment: what row 0 saw before the reset no longer matters; row 1 is untouched
    def run(y):
        c = model.init_cache(2)
        model(y[:, : SEG + 3], cache=c)
        c.reset(torch.tensor([True, False]))
        return model(y[:, SEG + 3 :], cache=c)

    y = x.clone()
    y[0, : SEG + 3] = (y[0, : SEG + 3] + 5) % TINY["num_tokens"]
    a, b = run(x), run(y)
    assert_close_fp(a[0], b[0], reduction=64)
    assert_close_fp(a[1], model(x)[1, SEG + 3 :], reduction=64)
    assert not torch.allclose(a[0], model(x)[0, SEG + 3 :])  # (row 0 was reset)
    with pytest.raises(ValueError, match="rows must be a bool tensor of shape"):
        cache.reset(torch.tensor([1, 0]))


def test_memory_state_stays_float32_under_bf16():
    model = lm(dtype=torch.float32)
    cache = model.init_cache(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids(2, 2 * SEG + 3), cache=cache)
    assert logits.dtype == torch.bfloat16
    assert all(m.kv_mem.dtype == m.k_norm.dtype == torch.float32 for m in cache.memories)
    cache64 = lm().init_cache(1)
    lm()(ids(1, SEG), cache=cache64)
    assert cache64.memories[0].kv_mem.dtype == torch.float64


# ---- the loss -------------------------------------------------------------------------
def test_padding_labels_are_ignored_and_token_zero_is_trained():
    model = lm()
    wrapper = InfiniTransformerWrapper(model.net)
    seq = ids(2, 2 * SEG + 5)
    seq[:, 0] = 0
    seq[0, 3] = 0  # a real token 0, predicted
    padded = seq.clone()
    padded[1, -6:] = -100  # padding at the end of row 1 (the reference crashed here)
    loss = wrapper(padded)
    logits = model(padded[:, :-1].clamp(min=0).masked_fill(padded[:, :-1] == -100, 0))
    labels = padded[:, 1:]
    expect = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
    assert_close_fp(loss, expect, reduction=64)
    assert_close_fp(model(padded, return_loss=True), expect, reduction=64)
    # token 0 is a label like any other
    masked = padded.clone()
    masked[0, 3] = -100
    assert not torch.allclose(wrapper(masked), loss)


def test_backward_per_window_equals_one_backward():
    model = lm(dtype=torch.float32)
    model.train()
    wrapper = InfiniTransformerWrapper(model.net, detach_mems_every_num_segments=2)
    seq = ids(2, 5 * SEG + 1)
    loss = wrapper(seq)
    loss.backward()
    one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss2 = wrapper(seq, backward=True, grad_accum_scale=0.5)
    assert loss2.requires_grad is False and torch.allclose(loss2, loss.detach())
    for g, p in zip(one, model.parameters(), strict=True):
        torch.testing.assert_close(2 * p.grad, g, rtol=1e-4, atol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = InfiniLanguageModel(InfiniConfig(**TINY))
    seq = ids(2, 3 * SEG + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(seq, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or float(loss.detach())
    assert float(loss.detach()) < 0.1 * first


# ---- options and configs --------------------------------------------------------------
OPTIONS = {
    "use_mem_delta_rule": True,
    "learned_delta_update": True,
    "head_gate_init_value": 3.0,
    "segment_len": 5,
    "rotary_base": 50.0,
    "dim_head": 4,
    "heads": 1,
    "depth": 1,
    "ff_mult": 2.0,
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_changes_the_output(name):
    x = ids(2, 3 * SEG)
    torch.manual_seed(0)
    base = InfiniLanguageModel(InfiniConfig(**TINY)).double().eval()
    torch.manual_seed(0)
    other = InfiniLanguageModel(InfiniConfig(**{**TINY, name: OPTIONS[name]})).double().eval()
    if name == "learned_delta_update":  # beta starts at ~0.5 and scales the writes
        other.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(base(x), other(x))


def test_training_only_options_have_an_effect():
    x = ids(2, 4 * SEG + 1)
    for name, value in (("attn_dropout", 0.5), ("ff_dropout", 0.5), ("pad_id", 5)):
        torch.manual_seed(0)
        a = InfiniLanguageModel(InfiniConfig(**TINY)).train()
        torch.manual_seed(0)
        b = InfiniLanguageModel(InfiniConfig(**{**TINY, name: value})).train()
        y = x.clone()
        y[:, 10:12] = -100
        torch.manual_seed(1)
        la = a(y, return_loss=True)
        torch.manual_seed(1)
        assert not torch.allclose(la, b(y, return_loss=True)), name
    # BPTT window: the first segment's gradient through later segments' memory reads
    grads = []
    for every in (1, 4):
        torch.manual_seed(0)
        m = InfiniLanguageModel(InfiniConfig(**{**TINY, "detach_mems_every_num_segments": every}))
        m(x, return_loss=True).backward()
        grads.append(m.net.attns[0].to_qkv.weight.grad.clone())
    assert not torch.allclose(*grads)


def test_gates_get_their_own_optimizer_group():
    from retrolm.train.optim import param_groups

    model = InfiniLanguageModel(InfiniConfig(**{**TINY, "gate_lr_scale": 20.0}))
    groups = param_groups(model, weight_decay=0.1)
    gates = {id(a.memory.head_gates) for a in model.net.attns}
    (group,) = [g for g in groups if {id(p) for p in g["params"]} & gates]
    assert {id(p) for p in group["params"]} == gates
    assert group["lr_scale"] == 20.0 and group["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"segment_len": 0}, "segment_len must be a positive int, got 0"),
        ({"dim_head": 7}, "dim_head must be even"),
        ({"attn_dropout": 1.0}, r"attn_dropout must be in \[0, 1\)"),
        ({"pad_id": 64}, "pad_id must be a token id"),
        ({"gate_lr_scale": 0.0}, "gate_lr_scale must be > 0"),
        ({"detach_mems_every_num_segments": 0}, "detach_mems_every_num_segments must be"),
        ({"segment_length": 4}, "unknown InfiniConfig fields"),
    ],
)
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        InfiniConfig(**{**TINY, **kw}) if "segment_length" not in kw else InfiniTransformer(
            **{**TINY, **kw}
        )


def test_bad_wrapper_values_raise():
    net = lm().net
    with pytest.raises(ValueError, match="segment_length must be a positive int, got -3"):
        InfiniTransformerWrapper(net, segment_length=-3)
    with pytest.raises(ValueError, match="detach_mems_every_num_segments must be a positive int"):
        InfiniTransformerWrapper(net, detach_mems_every_num_segments=0)
    with pytest.raises(ValueError, match="ignore_index must not be a token id"):
        InfiniTransformerWrapper(net, ignore_index=0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        InfiniTransformerWrapper(net).generate(seq_len=0)
    with pytest.raises(ValueError, match="InfiniTransformer needs num_tokens, dim and depth"):
        InfiniTransformer(dim=8)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        FastweightMemory(0)
