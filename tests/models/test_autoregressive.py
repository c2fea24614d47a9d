import torch
from torch import nn

from retrolm.models.autoregressive import AutoregressiveWrapper
from retrolm.nn import KVCache, MultiHeadAttention, RotaryEmbedding


class TinyLM(nn.Module):
    """A one-layer causal LM implementing the wrapper's cache protocol."""

    def __init__(self, vocab=11, dim=16, with_aux=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = MultiHeadAttention(dim, heads=2, dim_head=8, causal=True)
        self.rot = RotaryEmbedding(8)
        self.out = nn.Linear(dim, vocab)
        self.with_aux = with_aux
        self.max_seq_len = 64

    def init_cache(self, batch_size):
        return KVCache()

    def forward(self, x, cache=None):
        start = cache.length if cache is not None else 0
        r = self.rot(torch.arange(start, start + x.shape[1]))
        h = self.emb(x)
        logits = self.out(h + self.attn(h, cache=cache, q_rotary=r, k_rotary=r))
        return (logits, torch.tensor(0.5)) if self.with_aux else logits


class NoCacheLM(TinyLM):
    init_cache = None

    def __getattribute__(self, name):
        if name == "init_cache":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_loss_ignores_minus_100_not_token_zero():
    torch.manual_seed(0)
    w = AutoregressiveWrapper(TinyLM())
    x = torch.zeros(2, 9, dtype=torch.long)  # all token 0: must still carry loss
    assert w(x, return_loss=True) > 0
    w_aux = AutoregressiveWrapper(TinyLM(with_aux=True))
    w_aux.net.load_state_dict(w.net.state_dict())
    torch.testing.assert_close(w_aux(x, return_loss=True), w(x, return_loss=True) + 0.5)


def test_cached_greedy_generation_equals_full_forward_greedy():
    torch.manual_seed(1)
    net = TinyLM()
    prompt = torch.randint(0, 11, (2, 5))
    cached = AutoregressiveWrapper(net).generate(prompt, 12, temperature=0)
    nocache = NoCacheLM()
    nocache.load_state_dict(net.state_dict())
    full = AutoregressiveWrapper(nocache).generate(prompt, 12, temperature=0)
    assert torch.equal(cached, full)
    assert cached.shape == (2, 12)


def test_generation_stops_at_eos():
    torch.manual_seed(2)
    net = TinyLM()
    with torch.no_grad():
        net.out.bias.fill_(-10)
        net.out.bias[3] = 10  # always predicts 3
    out = AutoregressiveWrapper(net).generate(torch.tensor([1, 2]), 20, eos_token=3, temperature=0)
    assert out.tolist() == [3]


class MaskedLM(TinyLM):
    """TinyLM that takes an ``input_mask`` (b, n) and records the one it received."""

    def forward(self, x, cache=None, input_mask=None):
        self.seen_mask = input_mask
        return super().forward(x, cache)


def test_random_truncation_and_mask():
    """The loss is the cross-entropy of a random-length prefix, over labels whose token the
    mask keeps; the net receives the mask cut to its input."""
    torch.manual_seed(3)
    net = MaskedLM()
    w = AutoregressiveWrapper(net)
    x = torch.randint(0, 11, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False  # row 0: the last four tokens are padding
    mask[1, 2] = False
    lengths = set()
    for seed in range(16):
        torch.manual_seed(seed)
        n = int(torch.randint(1, 10, (1,)))  # the draw the wrapper makes
        torch.manual_seed(seed)
        loss = w(x, return_loss=True, randomly_truncate_sequence=True, input_mask=mask)
        lengths.add(n)
        assert torch.equal(net.seen_mask, mask[:, :n])
        logits = net(x[:, :n])
        labels = x[:, 1 : n + 1]
        keep = mask[:, 1 : n + 1]
        expect = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
        torch.testing.assert_close(loss, expect)
    assert len(lengths) > 3  # the prefix length really varies
    loss.backward()
    assert net.emb.weight.grad is not None
