"""Decode-time weight copies: one per dtype (a bf16 prefill and fp32 steps keep both), rebuilt
exactly when the weight changes."""

import pytest
import torch
import torch.nn.functional as F

from retrolm.nn.decode_linear import TransposedWeight, decode_weight, linear_t
from retrolm.nn.weight_cache import WeightCache


def _same(a, b) -> bool:
    return a is b


@pytest.mark.parametrize("parts", [1, 2])
def test_transposed_weight_keeps_one_copy_per_dtype_and_tracks_updates(parts):
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    cache = TransposedWeight()
    f32 = cache.get(w, torch.float32, parts)
    b16 = cache.get(w, torch.bfloat16, parts)
    assert _same(cache.get(w, torch.float32, parts), f32)  # not rebuilt after the bf16 one
    assert _same(cache.get(w, torch.bfloat16, parts), b16)
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step: both copies are stale
    f32_new = cache.get(w, torch.float32, parts)
    b16_new = cache.get(w, torch.bfloat16, parts)
    assert not _same(f32_new, f32) and not _same(b16_new, b16)
    if parts == 1:
        x = torch.randn(3, 8)
        torch.testing.assert_close(linear_t(x, f32_new, None), F.linear(x, w))
    else:  # (parts, in, ceil(out / parts)) column blocks of w.T
        torch.testing.assert_close(f32_new.transpose(0, 1).flatten(1)[:, :12], w.t())
    other = torch.randn(12, 8)  # another tensor (new storage): rebuilt
    assert not _same(cache.get(other, torch.float32, parts), f32_new)
    cache.clear()
    assert not _same(cache.get(other, torch.float32, parts), f32_new)


def test_weight_cache_keeps_one_value_per_key_and_tracks_updates():
    builds = []

    def build(a, b, key):
        builds.append(key)
        return decode_weight(torch.cat((a, b)), key)

    a, b = torch.randn(4, 6), torch.randn(2, 6)
    cache = WeightCache(build)
    v32 = cache.get(a, b, key=torch.float32)
    v16 = cache.get(a, b, key=torch.bfloat16)
    assert _same(cache.get(a, b, key=torch.float32), v32)
    assert _same(cache.get(a, b, key=torch.bfloat16), v16)
    assert builds == [torch.float32, torch.bfloat16]
    with torch.no_grad():
        b.add_(1.0)
    fresh = cache.get(a, b, key=torch.float32)
    assert builds[-1] == torch.float32 and not _same(fresh, v32)
    x = torch.randn(1, 6)
    torch.testing.assert_close(linear_t(x, fresh, None), F.linear(x, torch.cat((a, b))))
    cache.get(a, b, key=torch.bfloat16)
    assert builds == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
