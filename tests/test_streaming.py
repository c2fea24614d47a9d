"""The pipeline's contract for ``streaming`` families (a cache that is a memory of the whole
past): evaluation streams each document whole, generation is not capped by max_seq_len."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrolm.evaluate import EvalConfig, evaluate
from retrolm.generation import generate
from tests.fakes import ByteTokenizer, StreamingToy, register_streaming_toy

register_streaming_toy()


@pytest.fixture
def held_out(tmp_path):
    d = tmp_path / "held"
    d.mkdir()
    (d / "a.txt").write_text("In the beginning was the word, and the word was with God. " * 2)
    (d / "b.txt").write_text("short one")
    (d / "c.txt").write_text("and the earth was without form, and void")
    return d


def toy():
    torch.manual_seed(0)
    return StreamingToy().eval()


@torch.no_grad()
def whole_nll(net, ids, memory=True):
    """One forward over the whole document (longer than max_seq_len): the oracle."""
    net.use_memory = memory
    x = torch.tensor([ids])
    logp = F.log_softmax(net(x[:, :-1]), -1)
    net.use_memory = True
    return float(-logp.gather(-1, x[:, 1:, None]).sum())


@pytest.mark.parametrize("piece,batch", [(None, 1), (1, 2), (5, 3), (1000, 2)])
def test_each_document_streams_whole_in_any_pieces_and_batches(held_out, piece, batch):
    net, tok = toy(), ByteTokenizer()
    res = evaluate(net, held_out, tokenizer=tok, config=EvalConfig(seq_len=piece, batch_size=batch))
    assert list(res.modes) == ["memory", "no_memory"]
    docs = [tok.encode(p.read_text()) + [1] for p in sorted(held_out.glob("*.txt"))]
    assert max(map(len, docs)) > 10 * net.config.max_seq_len  # no window could hold them
    for mode, memory in (("memory", True), ("no_memory", False)):
        expect = sum(whole_nll(net, d, memory) for d in docs)
        got = res.modes[mode]["nll_per_token"] * res.modes[mode]["tokens"]
        assert got == pytest.approx(expect, rel=1e-5)
    assert res.modes["memory"]["bits_per_byte"] != res.modes["no_memory"]["bits_per_byte"]
    assert "memory lowers bits/byte by" in res.table()


def test_max_tokens_cuts_each_streamed_document(held_out):
    net, tok = toy(), ByteTokenizer()
    res = evaluate(net, held_out, tokenizer=tok, config=EvalConfig(max_tokens=7))
    assert res.modes["memory"]["tokens"] == 3 * 6
    docs = [(tok.encode(p.read_text()) + [1])[:7] for p in sorted(held_out.glob("*.txt"))]
    expect = sum(whole_nll(net, d) for d in docs)
    assert res.modes["memory"]["nll_per_token"] * 18 == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("prompt_len", [2, 9])  # 9 > max_seq_len 6
def test_generation_is_not_capped_and_cached_equals_full(prompt_len):
    net = toy()
    prompt = torch.randint(2, 200, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    new = 3 * net.config.max_seq_len
    cached = generate(net, prompt, new, temperature=0)
    full = generate(net, prompt, new, temperature=0, use_cache=False)
    assert cached.ids.shape == (2, prompt_len + new)
    assert torch.equal(cached.ids, full.ids)
    # the oracle: greedy token by token with whole forwards
    ids = prompt.clone()
    for _ in range(new):
        ids = torch.cat([ids, net(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(cached.ids.numpy(), ids.numpy())
