"""The Memorizing Transformer's fast paths equal their plain float64 references: the local
attention (heads folded into one SDPA call over the shared key/value head, the causal bias
built once for every row, per-row key validity in one pass) and the gradient-free kNN read
(the search's own ``q·k`` products, only the values gathered)."""

import pytest
import torch
from tests.tolerance import assert_close_fp

from retrolm import MemorizingConfig, MemorizingLanguageModel
from retrolm.models.memorizing.knn_attention import LocalGeometry, local_attend
from retrolm.nn.attention import reference_attend
from retrolm.nn.relative_bias import RelativePositionBias


def plain_local(q, keys, key_ok, n, bias_mod, scale):
    """The oracle: the full (b, h, n, J) mask and bias, per-head attention, empty rows 0."""
    j = key_ok.shape[1]
    qpos, kpos = torch.arange(j - n, j), torch.arange(j)
    mask = (kpos[None, :] <= qpos[:, None])[None, None] & key_ok[:, None, None, :]
    bias = bias_mod(qpos, kpos)[None]  # (1, h, n, J), straight from the bucket table
    k, v = keys[:, None, :, 0], keys[:, None, :, 1]
    return reference_attend(q, k, v, mask, scale=scale, bias=bias)


KEY_OK = {
    "every-key": lambda b, j: torch.ones(b, j, dtype=torch.bool),
    "padding": lambda b, j: torch.rand(b, j, generator=torch.Generator().manual_seed(3)) > 0.2,
    "a-query-without-keys": lambda b, j: torch.arange(j)[None].expand(b, j) >= 9,
}


@pytest.mark.parametrize("case", list(KEY_OK))
@pytest.mark.parametrize("n", [1, 5, 12])
def test_local_attention_equals_the_plain_per_head_reference(case, n):
    torch.manual_seed(0)
    b, h, j, d = 2, 3, 12, 8
    bias_mod = RelativePositionBias(h, num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        bias_mod.table.weight.normal_()
    key_ok = KEY_OK[case](b, j)
    if case == "a-query-without-keys":
        key_ok = key_ok.clone()
        key_ok[1] = True  # row 0: its first queries (n = 12) see no key; row 1 all
    q = torch.randn(b, n, h, d, dtype=torch.float64).transpose(1, 2)  # strided, as in the model
    keys = torch.randn(b, j, 2, d, dtype=torch.float64)
    geo = LocalGeometry(key_ok, n, bias_mod)
    got = local_attend(q, keys, geo, 0.0, scale=0.7)
    expect = plain_local(q, keys, key_ok, n, bias_mod, 0.7)
    assert_close_fp(got, expect)
    if case != "every-key":  # the validity did matter
        assert (got - plain_local(q, keys, key_ok | True, n, bias_mod, 0.7)).abs().amax() > 1e-6


@pytest.mark.parametrize("gate", ["sigmoid", "joint_softmax"])
def test_the_gradient_free_memory_read_equals_the_gradient_path(gate):
    """No gradient needed (generation, evaluation): the logits come from the search's own
    products; with one they are recomputed over the gathered keys. Same numbers in float64,
    tokens with padding (pad_id 0) so the per-row key validity is exercised too."""
    torch.manual_seed(0)
    cfg = MemorizingConfig.from_name("memorizing-tiny", gate=gate)
    model = MemorizingLanguageModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate_bias" in name or "rel_pos_bias" in name:
                p.normal_(0, 1.0)
    x = torch.randint(0, 6, (2, 40), generator=torch.Generator().manual_seed(1))
    x[:, 0] = 3
    assert (x == 0).any()
    with torch.no_grad():
        fast = model(x)
        off = model(x, use_memory=False)
    plain = model(x)  # parameters require grad: the gathered-keys path
    assert plain.requires_grad
    assert_close_fp(fast, plain.detach(), reduction=64)
    assert (fast - off).abs().amax() > 1e-3  # the memory was read


@pytest.mark.parametrize("memorizing_layers", [(2,), (1,)])  # the last layer kNN, or XL
@pytest.mark.parametrize("keep", [1, 3, 11, 40])
def test_logits_to_keep_equals_the_tail_of_the_full_forward(keep, memorizing_layers):
    """The last layer runs only the kept positions' queries, yet leaves the same cache:
    the next piece's logits are unchanged. Pieces start mid-segment (5 fed first)."""
    torch.manual_seed(0)
    cfg = MemorizingConfig.from_name("memorizing-tiny", memorizing_layers=memorizing_layers)
    model = MemorizingLanguageModel(cfg).double().eval()
    x = torch.randint(0, 256, (2, 52), generator=torch.Generator().manual_seed(2))
    full, short = model.init_cache(2), model.init_cache(2)
    with torch.no_grad():
        for cache in (full, short):
            model(x[:, :5], cache=cache)
        expect = model(x[:, 5:45], cache=full)
        got = model(x[:, 5:45], cache=short, logits_to_keep=keep)
        assert got.shape == (2, min(keep, 40), 256)
        assert_close_fp(got, expect[:, -keep:], reduction=64)
        assert_close_fp(model(x[:, 45:], cache=short), model(x[:, 45:], cache=full), reduction=64)
