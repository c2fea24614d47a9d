"""Infini-attention's fused one-token step (models/infini/fused.py): token by token through
the C++ blocks equals the plain path and a float64 full forward across segment boundaries
(so the keys it leaves in the cache write the same memory), and it runs exactly where it
applies."""

import os
import subprocess
import sys

import pytest
import torch
from tests.tolerance import assert_close_fp

from retrolm import InfiniConfig, InfiniLanguageModel, InfiniTransformerWrapper
from retrolm.models.infini import fused
from retrolm.models.infini.memory import Memories
from retrolm.nn.fused import decode as fused_decode

needs_ext = pytest.mark.skipif(
    fused_decode.extension() is None, reason="the fused blocks could not be built here"
)
SEG = 8
TINY = dict(num_tokens=64, dim=32, depth=2, heads=2, dim_head=8, segment_len=SEG, max_seq_len=32)
VARIANTS = {
    "linear": {},
    "delta": {"use_mem_delta_rule": True},
    "learned": {"use_mem_delta_rule": True, "learned_delta_update": True},
}


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused steps, with the switch on for the test."""
    calls = []
    inner = fused.decode_step
    monkeypatch.setattr(fused, "decode_step", lambda *a: calls.append(1) or inner(*a))
    before = fused_decode.set_enabled(True)
    yield calls
    fused_decode.set_enabled(before)


def lm(**kw):
    torch.manual_seed(0)
    model = InfiniLanguageModel(InfiniConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # gates apart, so local and memory paths weigh differently per head
        for attn in model.net.attns:
            attn.memory.head_gates.copy_(torch.tensor([-1.0, 0.5]))
    return model


def ids(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["num_tokens"], (b, n), generator=g)


def tokens(model, x, first=3):
    """The first ``first`` tokens as one piece, then one token a call."""
    with torch.no_grad():
        cache = model.init_cache(x.shape[0])
        outs = [model(x[:, :first], cache=cache)]
        outs += [model(x[:, i : i + 1], cache=cache) for i in range(first, x.shape[1])]
    return torch.cat(outs, 1)


@needs_ext
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_steps_equal_the_plain_path_and_a_float64_forward(variant, spy):
    model, x = lm(**VARIANTS[variant]), ids(2, 3 * SEG + 5)
    with torch.no_grad():
        ref64 = lm(**VARIANTS[variant]).double()(x)
    out = tokens(model, x)
    # every one-token call inside a begun segment took the fused step; a segment's first
    # token (its cache still empty) the plain one
    assert len(spy) == sum(1 for i in range(3, x.shape[1]) if i % SEG)
    assert_close_fp(out, ref64, torch.float32, reduction=64)
    fused_decode.set_enabled(False)  # the switch: the plain path only
    n = len(spy)
    plain = tokens(model, x)
    assert len(spy) == n
    assert_close_fp(out, plain, torch.float32, reduction=64)
    assert not torch.allclose(out[:, 2 * SEG + 1], out[:, SEG + 1])  # the test can fail


@needs_ext
def test_fused_generation_equals_the_plain_path(spy):
    model = lm(use_mem_delta_rule=True)
    wrapper = InfiniTransformerWrapper(model.net)
    prompt = ids(2, 2 * SEG + 3)
    fast = wrapper.generate(seq_len=3 * SEG, prompt=prompt, temperature=0)
    assert len(spy) > 2 * SEG
    fused_decode.set_enabled(False)
    assert torch.equal(fast, wrapper.generate(seq_len=3 * SEG, prompt=prompt, temperature=0))


@needs_ext
def test_fused_step_only_where_it_applies(spy):
    model, x = lm(), ids(2, 2 * SEG)
    with torch.no_grad():
        cache = model.init_cache(2)
        model(x[:, :3], cache=cache)
        cache.reset(torch.tensor([True, False]))  # a document starts in row 0: a key mask
        out = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(3, 2 * SEG)], 1)
        # the masked steps take the plain path; after the segment ends, the fused one
        assert len(spy) == 2 * SEG - SEG - 1
        fused_decode.set_enabled(False)
        cache = model.init_cache(2)
        model(x[:, :3], cache=cache)
        cache.reset(torch.tensor([True, False]))
        plain = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(3, 2 * SEG)], 1)
    assert_close_fp(out, plain, torch.float32, reduction=64)
    fused_decode.set_enabled(True)
    n = len(spy)
    tokens(model.double(), ids(1, SEG + 2))  # float64: the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens(model.float(), ids(1, SEG + 2))  # autocast: the plain path
    model.train()
    tokens(model, ids(1, SEG + 2))  # training: the plain path (dropout)
    assert len(spy) == n


@needs_ext
def test_bf16_weights_stay_close(spy):
    model, x = lm(learned_delta_update=True), ids(1, 2 * SEG + 3)
    with torch.no_grad():
        full = model(x)
    before = fused_decode.set_weight_dtype(torch.bfloat16)
    try:
        out = tokens(model, x)
    finally:
        fused_decode.set_weight_dtype(before)
    assert spy
    assert_close_fp(out, full, torch.bfloat16, reduction=64)


@needs_ext
def test_the_block_rejects_a_memory_of_the_wrong_shape():
    model = lm()
    attn, seg = model.net.attns[0], model.init_cache(1).segment[0]
    with torch.no_grad():
        seg.append(*(torch.zeros(1, 2, 1, 8),) * 3, torch.ones(1, 2, 1, 1))
    rotary = tuple(t[0] for t in model.net.rotary.span(1, 1))
    past = Memories(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8))
    with pytest.raises(RuntimeError, match="memory must be"):
        fused._attention(attn, torch.randn(1, 32), rotary, past, seg)


def test_the_environment_switches_the_fused_step_off():
    code = (
        "import torch\n"
        "from retrolm.nn.fused import decode\n"
        "from retrolm.models.infini import fused\n"
        "from retrolm import InfiniTransformer\n"
        "assert not decode.enabled()\n"
        "net = InfiniTransformer(64, 32, 1, dim_head=8, heads=2, segment_len=8).eval()\n"
        "cache = net.init_cache(1)\n"
        "with torch.no_grad():\n"
        "    net.stream(torch.ones(1, 1, dtype=torch.long), cache)\n"
        "    one = torch.ones(1, 1, dtype=torch.long)\n"
        "    assert not fused.step_ok(net, one, cache.segment, None)\n"
    )
    env = {**os.environ, "RETROLM_FUSED_DECODE": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
