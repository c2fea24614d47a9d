"""``prefill_dtype``: the prompt's forward in half precision, the cached steps in fp32."""

from collections import namedtuple
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from retrolm import AutoregressiveWrapper
from retrolm.generation import generate
from retrolm.nn import KVCache, cast_cache
from tests.test_generate import fake_db, hierarchical, routing_lm, tiny_retro

Pair = namedtuple("Pair", "a b")


@dataclass
class Nested:
    kv: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    pair: tuple | None = None
    ids: torch.Tensor | None = None
    module: nn.Module | None = None
    count: int = 0


def floating_dtypes(obj, seen=None) -> set:
    """Every floating dtype held anywhere in a cache (the test's own walk)."""
    if isinstance(obj, torch.Tensor):
        return {obj.dtype} if obj.is_floating_point() else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(floating_dtypes(v) for v in obj)) if obj else set()
    if isinstance(obj, dict):
        return floating_dtypes(list(obj.values()))
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        return floating_dtypes(list(vars(obj).values()))
    return set()


def test_cast_cache_reaches_every_container_and_leaves_the_rest():
    kv = KVCache()
    kv.update(torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4).bfloat16())
    lin = nn.Linear(2, 2).bfloat16()
    c = Nested(
        kv=[kv, [torch.ones(2, dtype=torch.bfloat16)]],
        extra={"shift": {"0": torch.zeros(3, dtype=torch.bfloat16)}},
        pair=Pair(torch.ones(1, dtype=torch.bfloat16), 3),
        ids=torch.arange(4),
        module=lin,
        count=5,
    )
    before = kv.update(torch.zeros(1, 2, 1, 4).bfloat16(), torch.zeros(1, 2, 1, 4).bfloat16())
    assert cast_cache(c, torch.float32) is c
    assert floating_dtypes(c) == {torch.float32}
    assert isinstance(c.pair, Pair) and c.pair.b == 3
    assert c.ids.dtype == torch.long and c.count == 5
    assert lin.weight.dtype == torch.bfloat16  # modules are not caches
    k, v = kv.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))  # still a working cache
    assert k.dtype == torch.float32 and k.shape[-2] == 5
    torch.testing.assert_close(k[..., :4, :], before[0].float())


def test_cast_cache_keeps_views_on_their_buffer():
    """A ring buffer and a view into it: after the cast both are one memory again."""
    c = Nested(kv=[torch.zeros(9, 4, dtype=torch.bfloat16)])
    c.extra["ring"] = c.kv[0][:-1].view(2, 4, 4)  # the last row: a sink, outside the view
    c.pair = (c.kv[0][3],)  # a row view, by another path
    cast_cache(c, torch.float32)
    buf, ring, row = c.kv[0], c.extra["ring"], c.pair[0]
    assert buf.dtype == ring.dtype == row.dtype == torch.float32
    buf[5] = 7.0
    ring[0, 3] = 2.0  # flat row 3
    assert torch.equal(ring[1, 1], torch.full((4,), 7.0)) and torch.equal(row, buf[3])
    assert torch.equal(buf[3], torch.full((4,), 2.0))


def _retro():
    return tiny_retro(), dict(retriever=fake_db(), num_neighbours=2)


MAKERS = {"retro": _retro, "routing": lambda: (routing_lm(), {}),
          "hierarchical": lambda: (hierarchical(), {})}  # fmt: skip


@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_prefill_then_fp32_steps(name, monkeypatch):
    """The prompt runs under bf16 autocast, every later step in fp32 against an fp32 cache;
    the logits stay within bf16 rounding of the all-fp32 run."""
    model, kw = MAKERS[name]()
    prompt = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    orig = model.forward

    def record(log):
        def spy(ids, *a, **k):
            cache = k.get("cache")
            log.append(
                dict(
                    width=ids.shape[1],
                    autocast=torch.is_autocast_enabled("cpu"),
                    cache_dtypes=floating_dtypes(cache),
                )
            )
            out = orig(ids, *a, **k)
            log[-1]["logits"] = (out[0] if isinstance(out, tuple) else out).float()
            return out

        return spy

    runs = {}
    for dtype in (None, "bf16"):
        log = []
        monkeypatch.setattr(model, "forward", record(log))
        res = generate(model, prompt, 4, temperature=0, prefill_dtype=dtype, **kw)
        runs[dtype] = (log, res)
    (ref_log, ref), (log, res) = runs[None], runs["bf16"]
    assert [e["autocast"] for e in log] == [True, False, False, False]
    assert [e["width"] for e in log] == [9, 1, 1, 1]
    assert all(e["cache_dtypes"] == {torch.float32} for e in log[1:])  # cast after the prompt
    assert not any(e["autocast"] for e in ref_log)
    lp, rp = log[0]["logits"][:, -1], ref_log[0]["logits"][:, -1]
    assert (lp - rp).abs().max() < 0.05 * rp.std() + 0.05  # bf16 rounding, not another model
    assert not torch.equal(lp, rp)  # the prompt really ran in bf16
    if torch.equal(res.ids[:, :10], ref.ids[:, :10]):  # same first token: same step input
        ls, rs = log[1]["logits"][:, -1], ref_log[1]["logits"][:, -1]
        assert (ls - rs).abs().max() < 0.05 * rs.std() + 0.05


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_cache_cast_away_and_back_decodes_exactly_as_before(name, monkeypatch):
    """fp32 -> fp64 -> fp32 is lossless, so a cache cast there and back after the prompt
    must decode bit for bit as the untouched one, through ring wrap-around and sliding
    windows: any view that lost its buffer in the cast would make the steps diverge."""
    import retrolm.generation as gen_mod

    model, kw = MAKERS[name]()
    prompt = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(6))

    def roundtrip(run, model, cache, dtype, device):
        out = run()
        cast_cache(cast_cache(cache, torch.float64), torch.float32)
        return out

    logits = {}
    for mode in ("plain", "roundtrip"):
        seen = []
        orig = type(model).forward

        def spy(self, ids, *a, _orig=orig, _seen=seen, **k):
            out = _orig(self, ids, *a, **k)
            _seen.append((out[0] if isinstance(out, tuple) else out).clone())
            return out

        monkeypatch.setattr(type(model), "forward", spy)
        if mode == "roundtrip":
            monkeypatch.setattr(gen_mod, "prefill", roundtrip)
        res = generate(model, prompt, 24, temperature=0, **kw)
        monkeypatch.undo()
        logits[mode] = (res.ids, seen)
    (ids_a, la), (ids_b, lb) = logits["plain"], logits["roundtrip"]
    assert torch.equal(ids_a, ids_b) and len(la) == len(lb) >= 20  # (retro-tiny stops at 32)
    assert all(torch.equal(a, b) for a, b in zip(la, lb))


def test_wrapper_generate_takes_a_prefill_dtype_and_checks_it():
    model = hierarchical()
    prompt = torch.randint(2, 250, (1, 12), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 6, temperature=0, prefill_dtype=torch.bfloat16)
    assert out.shape == (1, 6)
    wrapped = AutoregressiveWrapper(routing_lm())
    assert wrapped.generate(prompt, 3, temperature=0, prefill_dtype="bf16").shape == (1, 3)
    with pytest.raises(ValueError, match="prefill dtype must be a floating dtype.*int64"):
        wrapped.generate(prompt, 3, prefill_dtype=torch.int64)
    with pytest.raises(ValueError, match="'half-ish'"):
        generate(tiny_retro(), [3, 4], 2, prefill_dtype="half-ish")
